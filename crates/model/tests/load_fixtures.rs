//! The fixture models (tests/fixtures/README.md) loaded both ways: a diffusers folder and the
//! single-file LDM checkpoint of the same weights must give identical tensors under identical
//! names, the same parameter counts, and configs that agree on every inferred field.

use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor};
use sd_lora_model::load::{
    Architecture, AttentionHeads, Component, ModelSource, Prediction, PredictionSource,
    SourceFormat,
};
use serde_json::Value;

#[path = "support/fixtures.rs"]
mod support;
use support::{fixtures, tiny_options};

/// Bit patterns of a float tensor's values (F32/F16/BF16 widen to f32 exactly).
fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Keys of the inferred config that a folder written by diffusers/transformers may lack.
const ONLY_INFERRED: [&str; 1] = ["architectures"];

fn compare(name: &str, folder: &ModelSource, single: &ModelSource, counts: [(Component, u64); 3]) {
    assert_eq!(folder.format(), SourceFormat::DiffusersFolder);
    assert_eq!(single.format(), SourceFormat::SingleFile);
    assert_eq!(folder.architecture(), single.architecture(), "{name}");
    assert_eq!(folder.prediction(), single.prediction(), "{name}");
    assert_eq!(folder.components(), single.components(), "{name}");
    assert_eq!(
        folder.components(),
        [Component::Unet, Component::Vae, Component::TextEncoder]
    );
    let device = Device::Cpu;
    for component in folder.components() {
        let (f, s) = (
            folder.component(component).unwrap(),
            single.component(component).unwrap(),
        );
        // Same key set.
        let fk: BTreeSet<&str> = f.weights.keys().collect();
        let sk: BTreeSet<&str> = s.weights.keys().collect();
        assert_eq!(
            fk.difference(&sk).collect::<Vec<_>>(),
            Vec::<&&str>::new(),
            "{name} {component}: only in the folder"
        );
        assert_eq!(
            sk.difference(&fk).collect::<Vec<_>>(),
            Vec::<&&str>::new(),
            "{name} {component}: only in the single file"
        );
        // Bit-equal values, same dtype and shape.
        for key in &fk {
            let (a, b) = (
                f.weights.load(key, &device, None).unwrap(),
                s.weights.load(key, &device, None).unwrap(),
            );
            assert_eq!(a.dtype(), b.dtype(), "{name} {component} {key}");
            assert_eq!(a.dims(), b.dims(), "{name} {component} {key}");
            assert!(
                bits(&a) == bits(&b),
                "{name} {component} {key}: values differ"
            );
        }
        // Every inferred config field the folder also has is equal; the rest are allowed extras.
        let (Value::Object(fc), Value::Object(sc)) = (&f.config, &s.config) else {
            panic!("configs are objects");
        };
        for (key, value) in sc {
            match fc.get(key) {
                Some(expected) => {
                    assert_eq!(value, expected, "{name} {component} config field {key}")
                }
                None => assert!(
                    ONLY_INFERRED.contains(&key.as_str()),
                    "{name} {component}: inferred config field {key} = {value} is not in the \
                     folder's config.json"
                ),
            }
        }
    }
    // Exact parameter counts (README), identical both ways.
    let (fi, si) = (folder.inspect(), single.inspect());
    let got: Vec<(Component, u64)> = fi
        .components
        .iter()
        .map(|c| (c.component, c.parameters))
        .collect();
    assert_eq!(got, counts, "{name} folder");
    let got: Vec<(Component, u64)> = si
        .components
        .iter()
        .map(|c| (c.component, c.parameters))
        .collect();
    assert_eq!(got, counts, "{name} single file");
    assert_eq!(fi.total_parameters, si.total_parameters);
    assert_eq!(
        fi.dtypes,
        ["F32"],
        "{name}: position_ids (I64) is a buffer, not listed"
    );
    assert_eq!(si.dtypes, ["F32"]);
}

#[test]
fn sd1_folder_and_single_file_are_identical() {
    let folder = ModelSource::open(fixtures().join("sd1_tiny")).unwrap();
    assert_eq!(folder.architecture(), Architecture::Sd1);
    assert_eq!(folder.prediction(), Prediction::Epsilon);
    assert_eq!(
        folder.prediction_source(),
        PredictionSource::SchedulerConfig
    );
    assert!(folder.tokenizer_dir(Component::TextEncoder).is_none());
    let single = ModelSource::open_with(
        fixtures().join("sd1_tiny.safetensors"),
        tiny_options(AttentionHeads::Fixed(2), None),
    )
    .unwrap();
    assert_eq!(single.prediction_source(), PredictionSource::AssumedDefault);
    compare(
        "sd1_tiny",
        &folder,
        &single,
        [
            (Component::Unet, 217_772),
            (Component::Vae, 43_711),
            (Component::TextEncoder, 60_160),
        ],
    );
}

#[test]
fn sd2_folder_and_openclip_single_file_are_identical() {
    let folder = ModelSource::open(fixtures().join("sd2_tiny")).unwrap();
    assert_eq!(folder.architecture(), Architecture::Sd2);
    assert_eq!(folder.prediction(), Prediction::V);
    assert_eq!(
        folder.prediction_source(),
        PredictionSource::SchedulerConfig
    );
    let single = ModelSource::open_with(
        fixtures().join("sd2_tiny.safetensors"),
        tiny_options(AttentionHeads::HeadDim(4), Some(Prediction::V)),
    )
    .unwrap();
    assert_eq!(single.prediction_source(), PredictionSource::Option);
    compare(
        "sd2_tiny",
        &folder,
        &single,
        [
            (Component::Unet, 217_772),
            (Component::Vae, 43_711),
            (Component::TextEncoder, 51_616),
        ],
    );
}

#[test]
fn single_files_without_overrides_are_inspectable_and_say_what_to_pass() {
    // inspect needs no config, so it works with default options on a tiny model.
    for (file, architecture) in [
        ("sd1_tiny.safetensors", Architecture::Sd1),
        ("sd2_tiny.safetensors", Architecture::Sd2),
    ] {
        let source = ModelSource::open(fixtures().join(file)).unwrap();
        let info = source.inspect();
        assert_eq!(info.architecture, architecture);
        assert_eq!(info.prediction_source, PredictionSource::AssumedDefault);
        assert!(info.notes.iter().any(|n| n.contains("assuming epsilon")));
        assert_eq!(
            info.total_parameters,
            217_772
                + 43_711
                + if architecture == Architecture::Sd1 {
                    60_160
                } else {
                    51_616
                }
        );
        // Widths of 8 and 16 rule out SD's 32 groups (and SD2's 64-wide heads): the error
        // names the file and the option to pass.
        let err = source.config(Component::Unet).unwrap_err().to_string();
        let option = if architecture == Architecture::Sd1 {
            "norm_num_groups"
        } else {
            "unet_attention_heads"
        };
        assert!(err.contains(option) && err.contains(file), "{err}");
        let err = source
            .config(Component::TextEncoder)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("text_encoder_heads") && err.contains(file),
            "{err}"
        );
        // Inferred without any option: everything that shapes a tensor.
        let weights = source.weights(Component::Unet).unwrap();
        assert_eq!(weights.len(), 684);
    }
}

#[test]
fn fixture_text_encoder_without_text_model_prefix_loads_the_same() {
    // Rewrite sd1_tiny's text encoder as transformers 5 saves it (no `text_model.` prefix).
    let src = fixtures().join("sd1_tiny");
    let dst = std::env::temp_dir().join(format!("sd-lora-load-noprefix-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    for sub in ["", "unet", "vae", "text_encoder", "scheduler"] {
        std::fs::create_dir_all(dst.join(sub)).unwrap();
    }
    for file in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
    ] {
        std::fs::copy(src.join(file), dst.join(file)).unwrap();
    }
    let tensors =
        candle_core::safetensors::load(src.join("text_encoder/model.safetensors"), &Device::Cpu)
            .unwrap();
    let stripped: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("text_model.").unwrap_or(&k).to_string(), v))
        .collect();
    assert!(stripped.contains_key("encoder.layers.0.mlp.fc1.weight"));
    candle_core::safetensors::save(&stripped, dst.join("text_encoder/model.safetensors")).unwrap();

    let a = ModelSource::open(&src).unwrap();
    let b = ModelSource::open(&dst).unwrap();
    let (wa, wb) = (
        a.weights(Component::TextEncoder).unwrap(),
        b.weights(Component::TextEncoder).unwrap(),
    );
    assert_eq!(wa.keys().collect::<Vec<_>>(), wb.keys().collect::<Vec<_>>());
    for key in wa.keys() {
        let (x, y) = (
            wa.load(key, &Device::Cpu, None).unwrap(),
            wb.load(key, &Device::Cpu, None).unwrap(),
        );
        assert!(bits(&x) == bits(&y), "{key}");
    }
    assert_eq!(wa.parameter_count(), 60_160);
    assert_eq!(wb.parameter_count(), 60_160);
    drop((a, b));
    std::fs::remove_dir_all(&dst).unwrap();
}
