//! The training loop end to end on the built-in tiny SDXL model: the same loop
//! as SD1 learns through both text encoders, the pooled embedding and the size
//! conditioning; it resumes exactly; and the file it writes is an SDXL kohya
//! LoRA (sgm UNet names, `lora_te1_`/`lora_te2_`, SDXL metadata) that maps onto
//! the model.

use candle_core::Device;
use sd_lora_data::{Dataset, SubsetKind};
use sd_lora_model::builtin::BUILTIN_TINY_SDXL;
use sd_lora_model::lora::attach::attach;
use sd_lora_model::lora::format::{LoraFamily, read_lora};
use sd_lora_model::lora::{LoraComponent, LoraWeights};
use sd_lora_train::config::TrainConfig;
use sd_lora_train::trainer::{fixed_noise_loss, load_model, train};
use std::path::Path;

mod common;

use common::{Quiet, bits, quiet, read_for_model};

/// A run of the tiny SDXL model on the example dataset with both text
/// encoders trained, writing to `out`, with extra `--set`s.
fn config(out: &Path, extra: &[String]) -> TrainConfig {
    let mut sets = common::tiny_run_sets(out);
    sets.extend(
        [
            format!("model.path={BUILTIN_TINY_SDXL:?}").as_str(),
            "network.rank=8",
            "network.alpha=8.0",
            "network.train_text_encoder=true",
            "train.batch_size=2",
            "train.unet_lr=1e-3",
            "train.text_encoder_lr=1e-3",
            "train.text_encoder_2_lr=5e-4",
            "train.lr_scheduler=\"cosine\"",
            "train.warmup_steps=2",
            "output.save_dtype=\"f32\"",
            "output.name=\"x\"",
        ]
        .map(String::from),
    );
    sets.extend(extra.iter().cloned());
    TrainConfig::load(None, &sets).unwrap()
}

fn up_norm(w: &LoraWeights, component: LoraComponent) -> f32 {
    w.modules
        .iter()
        .filter(|((c, _), _)| *c == component)
        .map(|(_, m)| {
            m.up.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum()
}

#[test]
fn an_sdxl_run_learns_and_writes_an_sdxl_kohya_lora_with_both_text_encoders() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &["train.steps=100".into()]);
    let ds = Dataset::scan(&cfg.dataset).unwrap();
    let base = load_model(&cfg, &Device::Cpu).unwrap();
    let before = fixed_noise_loss(&cfg, &ds, &base).unwrap();

    let outcome = train(&cfg, &ds, None, &mut quiet()).unwrap();
    assert_eq!(outcome.steps, 100);

    let file = read_for_model(&cfg, &outcome.lora_file);
    let mut sd = load_model(&cfg, &Device::Cpu).unwrap();
    let (unet, encoders) = sd.lora_parts_mut(true);
    let attached = attach(unet, encoders, &file.weights, 1.0).unwrap();
    assert_eq!(attached, file.weights.modules.len());
    let after = fixed_noise_loss(&cfg, &ds, &sd).unwrap();
    eprintln!("SDXL fixed-noise loss {before:.4} → {after:.4}");
    assert!(
        after <= 0.8 * before,
        "loss went from {before} to {after}: less than a 20% drop"
    );

    // Every part trained: the UNet and both text encoders moved off zero.
    for c in [
        LoraComponent::Unet,
        LoraComponent::TextEncoder,
        LoraComponent::TextEncoder2,
    ] {
        assert!(up_norm(&file.weights, c) > 0.0, "{c:?} LoRA did not change");
    }
    // kohya's default (attention + feed-forward) targets of both encoders:
    // 6 Linear layers per CLIP layer, 2 layers each.
    let count = |c| file.weights.modules.keys().filter(|(k, _)| *k == c).count();
    assert_eq!(count(LoraComponent::TextEncoder), 12);
    assert_eq!(count(LoraComponent::TextEncoder2), 12);

    // The file speaks SDXL: sgm names, te1/te2, SDXL metadata.
    assert_eq!(file.family, LoraFamily::Sdxl);
    let raw = safetensors_keys(&outcome.lora_file);
    for needle in [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2.lora_up.weight",
        "lora_unet_output_blocks_0_1_proj_in.alpha",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te2_text_model_encoder_layers_1_mlp_fc2.lora_up.weight",
    ] {
        assert!(raw.iter().any(|k| k == needle), "{needle} missing");
    }
    assert!(!raw.iter().any(|k| k.starts_with("lora_unet_down_blocks")));
    assert!(!raw.iter().any(|k| k.starts_with("lora_te_")));
    let md = |k: &str| file.metadata.get(k).map(String::as_str);
    assert_eq!(md("ss_base_model_version"), Some("sdxl_base_v1-0"));
    assert_eq!(
        md("modelspec.architecture"),
        Some("stable-diffusion-xl-v1-base/lora")
    );
    assert_eq!(md("ss_v2"), Some("False"));
    assert_eq!(md("ss_network_module"), Some("networks.lora"));
    assert_eq!(md("ss_resolution"), Some("(64, 64)"));

    // Without the model, the names are read by the SDXL grammar to the same modules.
    let alone = read_lora(&outcome.lora_file).unwrap();
    assert_eq!(bits(&alone.weights), bits(&file.weights));
}

#[test]
fn an_sdxl_run_resumes_exactly() {
    let extra = [
        "train.steps=4".to_string(),
        "train.gradient_accumulation=2".into(),
    ];
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg_a = config(a.path(), &extra);
    let ds = Dataset::scan(&cfg_a.dataset).unwrap();
    let full = train(&cfg_a, &ds, None, &mut quiet()).unwrap();

    let cfg_b = config(b.path(), &extra);
    let mut stopper = Quiet {
        stop_after: Some(2),
        last: 0,
    };
    let first = train(&cfg_b, &ds, None, &mut stopper).unwrap();
    assert!(first.interrupted);
    let resumed = train(&cfg_b, &ds, Some(b.path()), &mut quiet()).unwrap();
    assert_eq!(resumed.steps, 4);
    let wa = read_for_model(&cfg_a, &full.lora_file).weights;
    let wb = read_for_model(&cfg_a, &resumed.lora_file).weights;
    assert_eq!(bits(&wa), bits(&wb), "resumed SDXL run differs");
}

#[test]
fn an_sdxl_run_with_prior_preservation_and_previews() {
    use sd_lora_train::png_meta::read_png_params;
    let tmp = tempfile::tempdir().unwrap();
    let class_dir = tmp.path().join("class");
    std::fs::create_dir_all(&class_dir).unwrap();
    let src = common::example_dataset().join("10_ohwx robot");
    for name in ["robot_00.png", "robot_01.png"] {
        std::fs::copy(src.join(name), class_dir.join(name)).unwrap();
    }
    let cfg = config(
        &tmp.path().join("out"),
        &[
            "train.steps=2".into(),
            format!("dataset.subsets[1].path={:?}", class_dir.to_string_lossy()),
            "dataset.subsets[1].kind=\"class\"".into(),
            "dataset.subsets[1].caption=\"a robot\"".into(),
            "output.sample_prompts=[\"ohwx robot\"]".into(),
            "output.sample_every=2".into(),
            "output.sample_steps=2".into(),
        ],
    );
    let ds = Dataset::scan(&cfg.dataset).unwrap();
    assert!(ds.subsets.iter().any(|s| s.kind == SubsetKind::Class));
    let outcome = train(&cfg, &ds, None, &mut quiet()).unwrap();
    assert_eq!(outcome.steps, 2);
    let preview = cfg.output.dir.join("samples").join("x-step000002-00.png");
    let p = read_png_params(&preview).unwrap().unwrap();
    assert_eq!((p.width, p.height), (64, 64));
    assert_eq!(p.loras.len(), 1);
    let img = image::open(&preview).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
}

/// The tensor names of a safetensors file, read from its header.
fn safetensors_keys(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect()
}
