//! LoRA layers on the tiny fixture models (tests/fixtures/sd1_tiny, sd2_tiny):
//! the visitor's paths are exactly the checkpoint keys, presets and patterns
//! select the right layers, a zero `up` leaves the model unchanged, a non-zero
//! LoRA equals the formula computed by hand, every LoRA variable of the kohya
//! preset gets a gradient through UNet and text encoder (and no base weight
//! does), merge/unmerge, attach errors, extract, half-precision bases and dropout.
//! The finite-difference checks are in `lora_layer_fd.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use sd_lora_model::load::ModelSource;
use sd_lora_model::lora::attach::{
    TrainOptions, adapted_layers, attach, create_trainable, extract, merge, remove_all, unmerge,
};
use sd_lora_model::lora::targets::{
    Preset, TargetGroup, TargetSpec, glob_match, model_targets, select,
};
use sd_lora_model::lora::visit::LayerRef;
use sd_lora_model::lora::{LayerKind, LoraComponent, LoraModule, LoraWeights, TargetInfo};
use sd_lora_model::pipeline::StableDiffusion;
use sd_lora_model::unet::UNet2DConditionModel;

#[path = "support/random_unet.rs"]
mod random_unet;
use random_unet::{max_abs, rel_err};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load(model: &str, dtype: DType) -> StableDiffusion {
    let source = ModelSource::open(fixtures().join(model)).unwrap();
    StableDiffusion::load(&source, dtype, &Device::Cpu).unwrap()
}

fn reference(model: &str) -> std::collections::HashMap<String, Tensor> {
    let p = fixtures()
        .join("reference")
        .join(format!("{model}.safetensors"));
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

/// splitmix64, for seeded test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    fn tensor(&mut self, shape: &[usize], scale: f64) -> Tensor {
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| (self.next() * scale) as f32).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }
}

/// A LoRA with random non-zero weights on `targets`.
fn random_lora(targets: &[TargetInfo], rank: usize, alpha: f32, seed: u64) -> LoraWeights {
    let mut rng = Rng(seed);
    let mut out = LoraWeights::default();
    for t in targets {
        let (down, up) = match t.kind {
            LayerKind::Linear => (vec![rank, t.in_features], vec![t.out_features, rank]),
            LayerKind::Conv2d { kernel, .. } => (
                vec![rank, t.in_features, kernel[0], kernel[1]],
                vec![t.out_features, rank, 1, 1],
            ),
        };
        let fan_in: usize = down[1..].iter().product();
        out.modules.insert(
            (t.component, t.path.clone()),
            LoraModule {
                down: rng.tensor(&down, 1.0 / (fan_in as f64).sqrt()),
                up: rng.tensor(&up, 0.5),
                alpha,
                dora_scale: None,
            },
        );
    }
    out
}

fn unet_out(sd: &StableDiffusion, r: &std::collections::HashMap<String, Tensor>) -> Tensor {
    unet_fwd(&sd.unet, r)
}

fn unet_fwd(unet: &UNet2DConditionModel, r: &std::collections::HashMap<String, Tensor>) -> Tensor {
    let t = r["unet.timesteps"].to_dtype(DType::F32).unwrap();
    unet.forward(&r["unet.sample"], &t, &r["unet.encoder_hidden_states"])
        .unwrap()
}

fn te_out(sd: &StableDiffusion, r: &std::collections::HashMap<String, Tensor>) -> Tensor {
    let ids = r["text_encoder.input_ids"].to_dtype(DType::U32).unwrap();
    sd.text_encoder.forward(&ids).unwrap().last_hidden_state
}

fn paths(unet: &UNet2DConditionModel) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    unet.visit_layers(&mut |p, _| {
        assert!(out.insert(p.to_string()), "path {p} visited twice");
    });
    out
}

#[test]
fn visited_paths_are_the_checkpoint_weight_keys() {
    for model in ["sd1_tiny", "sd2_tiny"] {
        let sd = load(model, DType::F32);
        let file = candle_core::safetensors::load(
            fixtures()
                .join(model)
                .join("unet/diffusion_pytorch_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let want: BTreeSet<String> = file
            .iter()
            .filter(|(k, t)| k.ends_with(".weight") && matches!(t.rank(), 2 | 4))
            .map(|(k, _)| k.clone())
            .collect();
        let got: BTreeSet<String> = paths(&sd.unet)
            .into_iter()
            .map(|p| format!("{p}.weight"))
            .collect();
        assert_eq!(got, want, "{model} UNet");
        println!("{model}: {} UNet layers", got.len());
        for p in [
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
            "down_blocks.0.resnets.0.conv1",
            "down_blocks.0.downsamplers.0.conv",
            "conv_in",
            "time_embedding.linear_1",
        ] {
            assert!(got.contains(&format!("{p}.weight")), "{model}: {p}");
        }

        // Text encoder: every 2-D weight except the embedding tables.
        let te_file = candle_core::safetensors::load(
            fixtures()
                .join(model)
                .join("text_encoder/model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let want: BTreeSet<String> = te_file
            .iter()
            .filter(|(k, t)| k.ends_with(".weight") && t.rank() == 2 && !k.contains(".embeddings."))
            .map(|(k, _)| k.clone())
            .collect();
        let mut got = BTreeSet::new();
        sd.text_encoder.visit_layers(&mut |p, _| {
            got.insert(format!("{p}.weight"));
        });
        assert_eq!(got, want, "{model} text encoder");
        assert!(got.contains("text_model.encoder.layers.0.self_attn.q_proj.weight"));
        assert!(got.contains("text_model.encoder.layers.0.mlp.fc1.weight"));
    }
}

#[test]
fn target_info_matches_the_layers() {
    let sd = load("sd1_tiny", DType::F32);
    let targets = model_targets(&sd.unet, Some(&sd.text_encoder));
    let by_path: BTreeMap<_, _> = targets
        .iter()
        .map(|t| ((t.component, t.path.as_str()), t))
        .collect();
    let conv1 = by_path[&(LoraComponent::Unet, "down_blocks.0.resnets.0.conv1")];
    let w = &sd.unet.down_blocks[0].resnets[0].conv1.base.weight;
    assert_eq!(
        conv1.kind,
        LayerKind::Conv2d {
            kernel: [3, 3],
            stride: 1,
            padding: 1
        }
    );
    assert_eq!(
        (conv1.out_features, conv1.in_features),
        (w.dims()[0], w.dims()[1])
    );
    let down = by_path[&(LoraComponent::Unet, "down_blocks.0.downsamplers.0.conv")];
    assert!(matches!(
        down.kind,
        LayerKind::Conv2d {
            kernel: [3, 3],
            stride: 2,
            padding: 1
        }
    ));
    let q = by_path[&(
        LoraComponent::TextEncoder,
        "text_model.encoder.layers.0.self_attn.q_proj",
    )];
    assert_eq!(q.kind, LayerKind::Linear);
    assert_eq!((q.in_features, q.out_features), (32, 32));
}

/// The last segments of the selected UNet paths (with `to_out.0`, `net.0.proj`).
fn leaf_names(targets: &[TargetInfo], component: LoraComponent) -> BTreeSet<String> {
    targets
        .iter()
        .filter(|t| t.component == component)
        .map(|t| {
            let s: Vec<&str> = t.path.split('.').collect();
            let n = s.len();
            match (s[n - 2], s[n - 1]) {
                ("to_out", "0") => "to_out.0".to_string(),
                ("net", "2") => "net.2".to_string(),
                ("0", "proj") => "net.0.proj".to_string(),
                (_, last) => last.to_string(),
            }
        })
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn presets_and_patterns_select_the_documented_layers() {
    for model in ["sd1_tiny", "sd2_tiny"] {
        let sd = load(model, DType::F32);
        let all = model_targets(&sd.unet, Some(&sd.text_encoder));
        let spec = TargetSpec::default();
        let kohya = select(&all, &spec);
        assert_eq!(
            leaf_names(&kohya, LoraComponent::Unet),
            set(&[
                "proj_in",
                "proj_out",
                "to_q",
                "to_k",
                "to_v",
                "to_out.0",
                "net.0.proj",
                "net.2"
            ]),
            "{model}"
        );
        assert!(
            kohya
                .iter()
                .filter(|t| t.component == LoraComponent::Unet)
                .all(|t| t.path.contains(".attentions."))
        );
        assert_eq!(
            leaf_names(&kohya, LoraComponent::TextEncoder),
            set(&["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
        );
        // Per transformer: proj_in, proj_out, 2 × 4 attention projections, 2 ff layers.
        let transformers = all.iter().filter(|t| t.path.ends_with(".proj_in")).count();
        let blocks = all
            .iter()
            .filter(|t| t.path.ends_with(".attn1.to_q"))
            .count();
        let te_layers = sd.text_encoder.encoder.layers.len();
        assert_eq!(
            kohya.len(),
            2 * transformers + 10 * blocks + 6 * te_layers,
            "{model}"
        );
        println!(
            "{model}: kohya preset {} modules ({} UNet, {} TE)",
            kohya.len(),
            2 * transformers + 10 * blocks,
            6 * te_layers
        );

        let attn = select(
            &all,
            &TargetSpec {
                preset: Preset::Attention,
                ..spec.clone()
            },
        );
        assert_eq!(
            leaf_names(&attn, LoraComponent::Unet),
            set(&["to_q", "to_k", "to_v", "to_out.0"])
        );
        assert_eq!(
            leaf_names(&attn, LoraComponent::TextEncoder),
            set(&["q_proj", "k_proj", "v_proj", "out_proj"])
        );
        assert_eq!(attn.len(), 8 * blocks + 4 * te_layers);

        let conv = select(
            &all,
            &TargetSpec {
                preset: Preset::Conv,
                ..spec.clone()
            },
        );
        let conv_unet = leaf_names(&conv, LoraComponent::Unet);
        for name in [
            "conv1",
            "conv2",
            "time_emb_proj",
            "conv_shortcut",
            "conv",
            "proj_in",
            "to_q",
        ] {
            assert!(
                conv_unet.contains(name),
                "{model}: conv preset lacks {name}"
            );
        }
        for t in &conv {
            assert!(
                !matches!(t.path.as_str(), "conv_in" | "conv_out")
                    && !t.path.starts_with("time_embedding"),
                "{}",
                t.path
            );
        }
        assert!(conv.iter().any(|t| t.path == "mid_block.resnets.1.conv2"));
        assert!(
            conv.iter()
                .any(|t| t.path == "up_blocks.0.upsamplers.0.conv")
        );
        // Rank groups as kohya: 3×3 convs in the conv group, Linear and 1×1 in the UNet one.
        let group = |p: &str| {
            TargetSpec::group(
                all.iter()
                    .find(|t| t.path == p)
                    .unwrap_or_else(|| panic!("{p}")),
            )
        };
        assert_eq!(
            group("down_blocks.0.resnets.0.conv1"),
            TargetGroup::UnetConv
        );
        assert_eq!(
            group("down_blocks.0.downsamplers.0.conv"),
            TargetGroup::UnetConv
        );
        assert_eq!(
            group("down_blocks.0.resnets.0.time_emb_proj"),
            TargetGroup::UnetLinear
        );
        assert_eq!(
            group("down_blocks.0.attentions.0.proj_in"),
            TargetGroup::UnetLinear
        );
        assert_eq!(
            group("text_model.encoder.layers.0.mlp.fc1"),
            TargetGroup::TextEncoder
        );

        // Component switches.
        let unet_only = select(
            &all,
            &TargetSpec {
                text_encoder: false,
                ..spec.clone()
            },
        );
        assert!(unet_only.iter().all(|t| t.component == LoraComponent::Unet));
    }

    // Patterns: include adds, exclude removes (and wins), typos are reported.
    let sd = load("sd1_tiny", DType::F32);
    let all = model_targets(&sd.unet, Some(&sd.text_encoder));
    let spec = TargetSpec {
        include: vec!["conv_in".into(), "*.resnets.*.conv?".into()],
        exclude: vec!["*.ff.*".into(), "text_model.*.mlp.*".into()],
        ..TargetSpec::default()
    };
    spec.check_patterns(&all).unwrap();
    let chosen = select(&all, &spec);
    assert!(chosen.iter().any(|t| t.path == "conv_in"));
    assert!(
        chosen
            .iter()
            .any(|t| t.path == "up_blocks.1.resnets.2.conv2")
    );
    assert!(!chosen.iter().any(|t| t.path.contains(".ff.")));
    assert!(!chosen.iter().any(|t| t.path.contains(".mlp.")));
    assert!(chosen.iter().any(|t| t.path.ends_with(".attn2.to_k")));
    let bad = TargetSpec {
        include: vec!["*.to_qq".into()],
        ..TargetSpec::default()
    };
    let err = bad.check_patterns(&all).unwrap_err();
    assert!(err.contains("*.to_qq"), "{err}");
    let none = TargetSpec {
        preset: Preset::None,
        include: vec!["*attn2.to_v".into()],
        ..TargetSpec::default()
    };
    assert!(
        select(&all, &none)
            .iter()
            .all(|t| t.path.ends_with("attn2.to_v"))
    );
    assert!(glob_match("a*b?d", "a.x.bcd"));
    assert!(!glob_match("a*b?d", "a.x.bd"));
    assert!(glob_match("*", ""));
}

#[test]
fn zero_up_gives_exactly_the_base_output() {
    let r = reference("sd1_tiny");
    let mut sd = load("sd1_tiny", DType::F32);
    let (u0, t0) = (unet_out(&sd, &r), te_out(&sd, &r));
    let spec = TargetSpec {
        preset: Preset::Conv,
        ..TargetSpec::default()
    };
    let lora = create_trainable(
        &mut sd.unet,
        Some(&mut sd.text_encoder),
        &spec,
        &TrainOptions::default(),
    )
    .unwrap();
    assert!(!lora.is_empty());
    let (u1, t1) = (unet_out(&sd, &r), te_out(&sd, &r));
    let (du, dt) = (max_abs(&(u1 - &u0).unwrap()), max_abs(&(t1 - &t0).unwrap()));
    println!("zero up: max |Δ| UNet {du:e}, TE {dt:e}");
    assert_eq!(du, 0.0);
    assert_eq!(dt, 0.0);
    // A second create on the same layers is refused; a module there already.
    let err = create_trainable(
        &mut sd.unet,
        Some(&mut sd.text_encoder),
        &spec,
        &TrainOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("already has a LoRA"), "{err}");
}

#[test]
fn trainable_init_is_seeded_kaiming_uniform() {
    let make = |seed| {
        let mut sd = load("sd1_tiny", DType::F32);
        create_trainable(
            &mut sd.unet,
            Some(&mut sd.text_encoder),
            &TargetSpec {
                preset: Preset::Conv,
                unet_linear: sd_lora_model::lora::targets::RankAlpha {
                    rank: 8,
                    alpha: 4.0,
                },
                ..TargetSpec::default()
            },
            &TrainOptions {
                seed,
                dropout: 0.0,
                ..TrainOptions::default()
            },
        )
        .unwrap()
    };
    let (a, b, c) = (make(7), make(7), make(8));
    let mut total = 0usize;
    let mut sum_sq = 0.0;
    let mut sum_bound_sq = 0.0;
    for ((ma, mb), mc) in a.modules.iter().zip(&b.modules).zip(&c.modules) {
        assert_eq!(ma.target, mb.target);
        let (da, db, dc) = (
            ma.down().unwrap().as_tensor(),
            mb.down().unwrap().as_tensor(),
            mc.down().unwrap().as_tensor(),
        );
        assert_eq!(max_abs(&(da - db).unwrap()), 0.0, "same seed");
        assert!(max_abs(&(da - dc).unwrap()) > 0.0, "different seed");
        assert_eq!(
            max_abs(ma.up().unwrap().as_tensor()),
            0.0,
            "up starts at zero"
        );
        assert_eq!(ma.down().unwrap().dtype(), DType::F32);
        let fan_in: usize = da.dims()[1..].iter().product();
        let bound = 1.0 / (fan_in as f64).sqrt();
        assert!(max_abs(da) <= bound);
        let n = da.elem_count();
        total += n;
        sum_sq += da
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        sum_bound_sq += n as f64 * bound * bound;
        let rank = if TargetSpec::group(&ma.target) == TargetGroup::UnetLinear {
            8
        } else {
            4
        };
        assert_eq!(da.dims()[0], rank, "{}", ma.target.path);
    }
    // Uniform(−b, b) has E[x²] = b²/3.
    let ratio = sum_sq / (sum_bound_sq / 3.0);
    println!("kaiming-uniform: E[x²]/(b²/3) = {ratio:.4} over {total} values");
    assert!((ratio - 1.0).abs() < 0.05, "{ratio}");
    assert_eq!(a.vars().len(), 2 * a.len());
}

/// y = x·Wᵀ + b + s·(x·downᵀ)·upᵀ in f64, for a Linear layer.
fn manual_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, m: &LoraModule, s: f64) -> Tensor {
    let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let (x, w, down, up) = (f(x), f(w), f(&m.down), f(&m.up));
    let mut y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
    if let Some(b) = b {
        y = y.broadcast_add(&f(b)).unwrap();
    }
    let d = x
        .broadcast_matmul(&down.t().unwrap())
        .unwrap()
        .broadcast_matmul(&up.t().unwrap())
        .unwrap();
    (y + (d * s).unwrap()).unwrap()
}

/// y = conv(x, W) + b + s·conv1×1(conv(x, down), up) in f64, with candle's own conv.
fn manual_conv(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    m: &LoraModule,
    s: f64,
    stride: usize,
    padding: usize,
) -> Tensor {
    let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let (x, w, down, up) = (f(x), f(w), f(&m.down), f(&m.up));
    let y = x
        .conv2d(&w, padding, stride, 1, 1)
        .unwrap()
        .broadcast_add(&f(b).reshape((1, (), 1, 1)).unwrap())
        .unwrap();
    let d = x
        .conv2d(&down, padding, stride, 1, 1)
        .unwrap()
        .conv2d(&up, 0, 1, 1, 1)
        .unwrap();
    (y + (d * s).unwrap()).unwrap()
}

#[test]
fn nonzero_lora_changes_the_output_and_equals_the_formula() {
    let r = reference("sd1_tiny");
    let mut sd = load("sd1_tiny", DType::F32);
    let base_u = unet_out(&sd, &r);
    let base_t = te_out(&sd, &r);
    let all = model_targets(&sd.unet, Some(&sd.text_encoder));
    let spec = TargetSpec {
        preset: Preset::Conv,
        ..TargetSpec::default()
    };
    let (rank, alpha, multiplier) = (4, 8.0f32, 0.7f32);
    let weights = random_lora(&select(&all, &spec), rank, alpha, 11);
    let n = attach(
        &mut sd.unet,
        Some(&mut sd.text_encoder),
        &weights,
        multiplier,
    )
    .unwrap();
    assert_eq!(n, weights.modules.len());
    let du = rel_err(&unet_out(&sd, &r), &base_u);
    let dt = rel_err(&te_out(&sd, &r), &base_t);
    println!("random LoRA changes UNet output by {du:.3} and TE output by {dt:.3} (relative)");
    assert!(du > 1e-2 && dt > 1e-2);

    let s = multiplier as f64 * alpha as f64 / rank as f64;
    let mut rng = Rng(5);
    // Linear: attn1.to_q (no bias) and ff.net.2 (bias), on [b, t, in] inputs.
    let block = &sd.unet.down_blocks[0].attentions[0].transformer_blocks[0];
    for (path, layer) in [
        (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            &block.attn1.to_q,
        ),
        (
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
            &block.ff.net_2,
        ),
    ] {
        let m = &weights.modules[&(LoraComponent::Unet, path.to_string())];
        let x = rng.tensor(&[2, 5, m.down.dims()[1]], 1.0);
        let got = layer.forward(&x).unwrap();
        let want = manual_linear(&x, &layer.base.weight, layer.base.bias.as_ref(), m, s);
        let e = rel_err(&got, &want);
        println!("{path}: |lora layer − formula| = {e:.2e}");
        assert!(e < 1e-5, "{path}: {e}");
    }
    // Conv: a 3×3 stride-1 ResNet conv and the 3×3 stride-2 downsampler, with odd
    // and mismatched spatial sizes.
    let down0 = &sd.unet.down_blocks[0];
    for (path, layer) in [
        ("down_blocks.0.resnets.0.conv1", &down0.resnets[0].conv1),
        (
            "down_blocks.0.downsamplers.0.conv",
            &down0.downsamplers[0].conv,
        ),
    ] {
        let m = &weights.modules[&(LoraComponent::Unet, path.to_string())];
        let x = rng.tensor(&[2, m.down.dims()[1], 7, 6], 1.0);
        let got = layer.forward(&x).unwrap();
        let bias = layer.base.bias.as_ref().unwrap();
        let want = manual_conv(
            &x,
            &layer.base.weight,
            bias,
            m,
            s,
            layer.base.stride,
            layer.base.padding,
        );
        let e = rel_err(&got, &want);
        println!("{path}: |lora layer − formula| = {e:.2e}");
        assert!(e < 1e-5, "{path}: {e}");
    }
    // 1×1 conv projection (SD1's proj_in).
    let path = "down_blocks.0.attentions.0.proj_in";
    let sd_lora_model::blocks::Projection::Conv(proj) =
        &sd.unet.down_blocks[0].attentions[0].proj_in
    else {
        panic!("sd1 proj_in is a conv")
    };
    let m = &weights.modules[&(LoraComponent::Unet, path.to_string())];
    let x = rng.tensor(&[1, m.down.dims()[1], 4, 4], 1.0);
    let e = rel_err(
        &proj.forward(&x).unwrap(),
        &manual_conv(
            &x,
            &proj.base.weight,
            proj.base.bias.as_ref().unwrap(),
            m,
            s,
            1,
            0,
        ),
    );
    println!("{path}: |lora layer − formula| = {e:.2e}");
    assert!(e < 1e-5);

    // Multiplier 0 is the base model; resuming training from the attached LoRA
    // gives trainable variables that get gradients.
    sd_lora_model::lora::attach::set_multiplier(&mut sd.unet, Some(&mut sd.text_encoder), 0.0);
    assert_eq!(max_abs(&(unet_out(&sd, &r) - &base_u).unwrap()), 0.0);
    sd_lora_model::lora::attach::set_multiplier(&mut sd.unet, Some(&mut sd.text_encoder), 1.0);
    let resumed = sd_lora_model::lora::attach::collect_trainable(
        &mut sd.unet,
        Some(&mut sd.text_encoder),
        &TrainOptions::default(),
    )
    .unwrap();
    assert_eq!(resumed.len(), weights.modules.len());
    let grads = loss(&sd, &r).backward().unwrap();
    for m in &resumed.modules {
        assert!(
            grad_max(&grads, m.down().unwrap()) > 0.0 && grad_max(&grads, m.up().unwrap()) > 0.0,
            "{}",
            m.target.path
        );
    }

    // extract gives back what was attached; remove_all restores the base model.
    let back = extract(&sd.unet, Some(&sd.text_encoder)).unwrap();
    assert_eq!(back.modules.len(), weights.modules.len());
    for (k, m) in &weights.modules {
        let b = &back.modules[k];
        assert_eq!(max_abs(&(&b.down - &m.down).unwrap()), 0.0);
        assert_eq!(max_abs(&(&b.up - &m.up).unwrap()), 0.0);
        assert_eq!(b.alpha, m.alpha);
    }
    assert_eq!(
        remove_all(&mut sd.unet, Some(&mut sd.text_encoder)),
        weights.modules.len()
    );
    assert_eq!(max_abs(&(unet_out(&sd, &r) - &base_u).unwrap()), 0.0);
    assert!(adapted_layers(&sd.unet, Some(&sd.text_encoder)).is_empty());
}

#[test]
fn attach_reports_every_unmatched_or_misshaped_module_and_attaches_nothing() {
    let mut sd = load("sd1_tiny", DType::F32);
    let all = model_targets(&sd.unet, Some(&sd.text_encoder));
    let mut weights = random_lora(&select(&all, &TargetSpec::default()), 2, 2.0, 3);
    let good = weights.modules.len();
    let some = weights.modules.values().next().unwrap().clone();
    weights.modules.insert(
        (
            LoraComponent::Unet,
            "down_blocks.0.attentions.0.nope".into(),
        ),
        some.clone(),
    );
    weights.modules.insert(
        (
            LoraComponent::Unet,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k".into(),
        ),
        some.clone(),
    );
    weights.modules.insert(
        (LoraComponent::TextEncoder2, "text_model.x".into()),
        some.clone(),
    );
    let err = attach(&mut sd.unet, Some(&mut sd.text_encoder), &weights, 1.0)
        .unwrap_err()
        .to_string();
    println!("{err}");
    assert!(err.contains("3 problem"), "{err}");
    assert!(err.contains("unet:down_blocks.0.attentions.0.nope"));
    assert!(err.contains("attn2.to_k: down is"), "{err}");
    assert!(err.contains("text_encoder_2:text_model.x"));
    assert!(adapted_layers(&sd.unet, Some(&sd.text_encoder)).is_empty());

    // Text-encoder modules without a text encoder.
    let weights = random_lora(&select(&all, &TargetSpec::default()), 2, 2.0, 3);
    let err = attach(&mut sd.unet, None, &weights, 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no text encoder was given"), "{err}");
    assert_eq!(
        attach(&mut sd.unet, Some(&mut sd.text_encoder), &weights, 1.0).unwrap(),
        good
    );
}

#[test]
fn merge_equals_unmerged_and_unmerge_restores_the_weights() {
    for dtype in [DType::F32, DType::F16] {
        let r = reference("sd1_tiny");
        let mut sd = load("sd1_tiny", dtype);
        let all = model_targets(&sd.unet, Some(&sd.text_encoder));
        let spec = TargetSpec {
            preset: Preset::Conv,
            ..TargetSpec::default()
        };
        let weights = random_lora(&select(&all, &spec), 4, 4.0, 21);
        let original: Vec<Tensor> = {
            let mut v = Vec::new();
            sd.unet.visit_layers(&mut |_, l| v.push(l.weight().clone()));
            sd.text_encoder
                .visit_layers(&mut |_, l| v.push(l.weight().clone()));
            v
        };
        attach(&mut sd.unet, Some(&mut sd.text_encoder), &weights, 1.0).unwrap();
        // Multiplier 0.6 through merge (it sets the adapters' multiplier).
        sd_lora_model::lora::attach::set_multiplier(&mut sd.unet, Some(&mut sd.text_encoder), 0.6);
        let (u0, t0) = (unet_out(&sd, &r), te_out(&sd, &r));
        let n = merge(&mut sd.unet, Some(&mut sd.text_encoder), 0.6).unwrap();
        assert_eq!(n, weights.modules.len());
        let (u1, t1) = (unet_out(&sd, &r), te_out(&sd, &r));
        let (eu, et) = (rel_err(&u1, &u0), rel_err(&t1, &t0));
        println!("{dtype:?}: merged vs unmerged: UNet {eu:.2e}, TE {et:.2e}");
        let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
        assert!(eu < tol && et < tol, "{dtype:?}: {eu} {et}");
        // Merging twice does nothing more.
        assert_eq!(
            merge(&mut sd.unet, Some(&mut sd.text_encoder), 0.6).unwrap(),
            0
        );
        assert_eq!(unmerge(&mut sd.unet, Some(&mut sd.text_encoder)), n);
        let mut i = 0;
        let mut check = |_: &str, l: LayerRef<'_>| {
            let d = max_abs(&(l.weight() - &original[i]).unwrap());
            assert_eq!(d, 0.0, "weight {i} not restored");
            i += 1;
        };
        sd.unet.visit_layers(&mut check);
        sd.text_encoder.visit_layers(&mut check);
        let u2 = unet_out(&sd, &r);
        assert_eq!(max_abs(&(u2 - &u0).unwrap()), 0.0, "unmerged output");
    }
}

/// Whether a gradient is all zero (or absent).
fn grad_max(grads: &GradStore, v: &Var) -> f64 {
    grads.get(v.as_tensor()).map(max_abs).unwrap_or(0.0)
}

/// MSE loss of the UNet's prediction, conditioned by the text encoder. On the
/// 16×24 sample: at 8×8 the mid-block works on a single pixel, where
/// self-attention's softmax is exactly 1 and `attn1.to_q`/`to_k` truly get no
/// gradient.
fn loss(sd: &StableDiffusion, r: &std::collections::HashMap<String, Tensor>) -> Tensor {
    let ids = r["text_encoder.input_ids"].to_dtype(DType::U32).unwrap();
    let ctx = sd.text_encoder.forward(&ids).unwrap().last_hidden_state;
    let t = r["unet_hw.timesteps"].to_dtype(DType::F32).unwrap();
    let out = sd.unet.forward(&r["unet_hw.sample"], &t, &ctx).unwrap();
    let target = r["unet_hw.out"]
        .affine(0.5, 0.1)
        .unwrap()
        .to_dtype(out.dtype())
        .unwrap();
    (out - target)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
}

/// No frozen weight or bias of any layer has a gradient.
fn assert_no_base_grads(sd: &StableDiffusion, grads: &GradStore) {
    let mut n = 0;
    let mut check = |p: &str, l: LayerRef<'_>| {
        let (w, b) = match l {
            LayerRef::Linear(l) => (&l.base.weight, l.base.bias.as_ref()),
            LayerRef::Conv(c) => (&c.base.weight, c.base.bias.as_ref()),
        };
        assert!(grads.get(w).is_none(), "{p}.weight has a gradient");
        assert!(
            b.is_none_or(|b| grads.get(b).is_none()),
            "{p}.bias has a gradient"
        );
        n += 1;
    };
    sd.unet.visit_layers(&mut check);
    sd.text_encoder.visit_layers(&mut check);
    assert!(n > 100);
}

#[test]
fn every_kohya_lora_variable_gets_a_gradient_through_unet_and_text_encoder() {
    let r = reference("sd1_tiny");
    let mut sd = load("sd1_tiny", DType::F32);
    let lora = create_trainable(
        &mut sd.unet,
        Some(&mut sd.text_encoder),
        &TargetSpec::default(),
        &TrainOptions {
            seed: 1,
            dropout: 0.0,
            ..TrainOptions::default()
        },
    )
    .unwrap();
    let te_modules = lora
        .modules
        .iter()
        .filter(|m| m.target.component == LoraComponent::TextEncoder)
        .count();
    assert!(te_modules > 0 && te_modules < lora.len());

    // At initialisation (up = 0): up's gradient is non-zero, down's exactly zero.
    let grads = loss(&sd, &r).backward().unwrap();
    let mut min_up = f64::INFINITY;
    for m in &lora.modules {
        let (gd, gu) = (
            grad_max(&grads, m.down().unwrap()),
            grad_max(&grads, m.up().unwrap()),
        );
        assert_eq!(gd, 0.0, "{}: down gradient at up = 0", m.target.path);
        assert!(gu > 0.0, "{}: no up gradient", m.target.path);
        min_up = min_up.min(gu);
    }
    assert_no_base_grads(&sd, &grads);

    // With up non-zero (as after a training step): both non-zero everywhere.
    let mut rng = Rng(9);
    for m in &lora.modules {
        m.up()
            .unwrap()
            .set(&rng.tensor(m.up().unwrap().dims(), 0.1))
            .unwrap();
    }
    let grads = loss(&sd, &r).backward().unwrap();
    let (mut min_d, mut min_u) = (f64::INFINITY, f64::INFINITY);
    for m in &lora.modules {
        let (gd, gu) = (
            grad_max(&grads, m.down().unwrap()),
            grad_max(&grads, m.up().unwrap()),
        );
        assert!(gd > 0.0, "{}: no down gradient", m.target.path);
        assert!(gu > 0.0, "{}: no up gradient", m.target.path);
        min_d = min_d.min(gd);
        min_u = min_u.min(gu);
    }
    println!(
        "{} modules ({te_modules} TE): smallest max|grad| up@0 {min_up:.2e}; after: down {min_d:.2e}, up {min_u:.2e}",
        lora.len()
    );
    assert_no_base_grads(&sd, &grads);
}

#[test]
fn half_precision_base_with_f32_lora_runs_forward_and_backward() {
    for dtype in [DType::F16, DType::BF16] {
        let r = reference("sd1_tiny");
        let mut sd = load("sd1_tiny", dtype);
        let lora = create_trainable(
            &mut sd.unet,
            Some(&mut sd.text_encoder),
            &TargetSpec {
                preset: Preset::Conv,
                ..TargetSpec::default()
            },
            &TrainOptions::default(),
        )
        .unwrap();
        let mut rng = Rng(4);
        for m in &lora.modules {
            assert_eq!(m.down().unwrap().dtype(), DType::F32);
            assert_eq!(m.up().unwrap().dtype(), DType::F32);
            m.up()
                .unwrap()
                .set(&rng.tensor(m.up().unwrap().dims(), 0.1))
                .unwrap();
        }
        let l = loss(&sd, &r);
        let value = l.to_scalar::<f32>().unwrap();
        assert!(value.is_finite());
        let grads = l.backward().unwrap();
        for m in &lora.modules {
            for v in [&m.down().unwrap(), &m.up().unwrap()] {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{dtype:?} {}: no gradient", m.target.path));
                assert_eq!(g.dtype(), DType::F32);
                let gm = max_abs(g);
                assert!(gm.is_finite() && gm > 0.0, "{dtype:?} {}", m.target.path);
            }
        }
        assert_no_base_grads(&sd, &grads);
        println!(
            "{dtype:?} base: loss {value:.4}, all {} LoRA grads finite, non-zero",
            2 * lora.len()
        );
    }
}

#[test]
fn dropout_is_seeded_per_step_and_off_in_eval() {
    let r = reference("sd1_tiny");
    let mut sd = load("sd1_tiny", DType::F32);
    let lora = create_trainable(
        &mut sd.unet,
        Some(&mut sd.text_encoder),
        &TargetSpec::default(),
        &TrainOptions {
            seed: 3,
            dropout: 0.5,
            ..TrainOptions::default()
        },
    )
    .unwrap();
    let mut rng = Rng(8);
    for m in &lora.modules {
        m.up()
            .unwrap()
            .set(&rng.tensor(m.up().unwrap().dims(), 0.3))
            .unwrap();
    }
    let eval = unet_out(&sd, &r);
    let eval_te = te_out(&sd, &r);
    // Eval mode is the default: same output as a model without dropout.
    let mut no_dropout = sd.unet.clone();
    let mut clear = |_: &str, mut l: sd_lora_model::lora::visit::LayerMut<'_>| {
        if let Some(a) = l.lora_mut() {
            a.dropout = None;
        }
    };
    no_dropout.visit_layers_mut(&mut clear);
    assert_eq!(max_abs(&(unet_fwd(&no_dropout, &r) - &eval).unwrap()), 0.0);

    lora.dropout.set_training(true);
    lora.dropout.set_step(1);
    let a = unet_out(&sd, &r);
    let a_te = te_out(&sd, &r);
    let again = unet_out(&sd, &r);
    lora.dropout.set_step(2);
    let b = unet_out(&sd, &r);
    assert_eq!(
        max_abs(&(&again - &a).unwrap()),
        0.0,
        "same step, same mask"
    );
    let dab = rel_err(&b, &a);
    let dae = rel_err(&a, &eval);
    let dte = rel_err(&a_te, &eval_te);
    println!("dropout: step 1 vs 2 {dab:.3}, train vs eval {dae:.3} (TE {dte:.3})");
    assert!(dab > 1e-4 && dae > 1e-4 && dte > 1e-4);
    lora.dropout.set_training(false);
    assert_eq!(max_abs(&(unet_out(&sd, &r) - &eval).unwrap()), 0.0);
}
