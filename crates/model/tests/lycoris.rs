//! DoRA, LoHa and LoKr: forward and gradients against LyCORIS (the fixture of
//! `tools/make_lycoris_fixtures.py`), every trainable tensor of each type getting
//! a gradient through a whole model, kohya-format files that read back as
//! written, and merging that equals the unmerged forward.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use sd_lora_model::load::ModelSource;
use sd_lora_model::lora::adapted::{LoraConv2d, LoraLinear};
use sd_lora_model::lora::attach::{
    TrainOptions, attach, create_trainable, extract, merge, remove_all,
};
use sd_lora_model::lora::format::{Metadata, SaveDtype, read_lora, write_kohya, write_peft};
use sd_lora_model::lora::layer::{AdapterParams, LoraAdapter};
use sd_lora_model::lora::lycoris::{DoraAxis, KronFactor, LycorisModule, NetworkType};
use sd_lora_model::lora::targets::{Preset, TargetSpec};
use sd_lora_model::lora::{LoraModule, LoraWeights, ModuleWeights};
use sd_lora_model::ops::{FrozenConv2d, FrozenLinear};
use sd_lora_model::pipeline::StableDiffusion;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// `max|a − b| / max|b|`.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    max_abs(&d) / max_abs(b).max(1e-12)
}

/// The module of a fixture case from its parameters (named as in the files).
fn module_of(r: &HashMap<String, Tensor>, case: &str, alpha: f32) -> ModuleWeights {
    let get = |n: &str| r.get(&format!("{case}.param.{n}")).cloned();
    if let (Some(down), Some(up)) = (get("down"), get("up")) {
        let mut m = LoraModule::new(down, up, alpha);
        m.dora_scale = get("dora_scale");
        return ModuleWeights::LowRank(m);
    }
    if let Some(w1_a) = get("hada_w1_a") {
        return ModuleWeights::Lycoris(LycorisModule::Hada {
            w1_a,
            w1_b: get("hada_w1_b").unwrap(),
            w2_a: get("hada_w2_a").unwrap(),
            w2_b: get("hada_w2_b").unwrap(),
            alpha,
        });
    }
    let factor = |i: u8| match get(&format!("lokr_w{i}")) {
        Some(t) => KronFactor::Full(t),
        None => KronFactor::LowRank {
            a: get(&format!("lokr_w{i}_a")).unwrap(),
            b: get(&format!("lokr_w{i}_b")).unwrap(),
        },
    };
    ModuleWeights::Lycoris(LycorisModule::Kron {
        w1: factor(1),
        w2: factor(2),
        alpha,
    })
}

#[test]
fn forward_and_gradients_match_lycoris() {
    let path = fixtures().join("lycoris.safetensors");
    let r = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let st = safetensors::SafeTensors::read_metadata(&std::fs::read(&path).unwrap())
        .unwrap()
        .1;
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&st.metadata().as_ref().unwrap()["cases"]).unwrap();
    assert_eq!(cases.len(), 10);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let alpha = case["alpha"].as_f64().unwrap() as f32;
        let module = module_of(&r, name, alpha);
        let (weight, bias) = (&r[&format!("{name}.weight")], &r[&format!("{name}.bias")]);
        let params =
            AdapterParams::from_weights(&module, weight.dims(), DType::F32, &Device::Cpu).unwrap();
        let adapter = LoraAdapter::with_params(params.clone(), alpha);
        let x = Var::from_tensor(&r[&format!("{name}.x")]).unwrap();
        let y = if name.ends_with("_linear") {
            let layer = LoraLinear {
                base: FrozenLinear {
                    weight: weight.clone(),
                    bias: Some(bias.clone()),
                },
                lora: Some(adapter),
            };
            layer.forward(x.as_tensor()).unwrap()
        } else {
            let layer = LoraConv2d {
                base: FrozenConv2d {
                    weight: weight.clone(),
                    bias: Some(bias.clone()),
                    stride: 2,
                    padding: 1,
                },
                lora: Some(adapter),
            };
            layer.forward(x.as_tensor()).unwrap()
        };
        let e = rel_err(&y, &r[&format!("{name}.y")]);
        assert!(e < 1e-5, "{name}: output rel err {e:.2e}");
        let g = &r[&format!("{name}.g")];
        let grads = (y * g).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get(x.as_tensor()).expect("input gradient");
        let e = rel_err(dx, &r[&format!("{name}.dx")]);
        assert!(e < 1e-5, "{name}: input gradient rel err {e:.2e}");
        let mut worst = 0f64;
        for (param, var) in params.named_vars() {
            let got = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: {param} has no gradient"));
            let want = &r[&format!("{name}.grad.{param}")];
            assert!(
                max_abs(want) > 0.0,
                "{name}: {param}: the reference is zero"
            );
            let e = rel_err(got, want);
            assert!(e < 1e-4, "{name}: {param} gradient rel err {e:.2e}");
            worst = worst.max(e);
        }
        println!("{name}: worst parameter-gradient rel err {worst:.2e}");

        // A half-precision base takes the unfolded path (the update's product
        // apart from the frozen one's): the same values to f16's precision.
        if name.ends_with("_linear") {
            let params =
                AdapterParams::from_weights(&module, weight.dims(), DType::F32, &Device::Cpu)
                    .unwrap();
            let layer = LoraLinear {
                base: FrozenLinear {
                    weight: weight.to_dtype(DType::F16).unwrap(),
                    bias: Some(bias.to_dtype(DType::F16).unwrap()),
                },
                lora: Some(LoraAdapter::with_params(params.clone(), alpha)),
            };
            let xh =
                Var::from_tensor(&r[&format!("{name}.x")].to_dtype(DType::F16).unwrap()).unwrap();
            let y = layer.forward(xh.as_tensor()).unwrap();
            assert_eq!(y.dtype(), DType::F16);
            let e = rel_err(&y, &r[&format!("{name}.y")]);
            assert!(e < 1e-2, "{name} (f16 base): output rel err {e:.2e}");
            let grads = (y.to_dtype(DType::F32).unwrap() * g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let e = rel_err(
                grads.get(xh.as_tensor()).unwrap(),
                &r[&format!("{name}.dx")],
            );
            assert!(
                e < 1e-2,
                "{name} (f16 base): input gradient rel err {e:.2e}"
            );
            for (param, var) in params.named_vars() {
                let e = rel_err(
                    grads.get(var.as_tensor()).unwrap(),
                    &r[&format!("{name}.grad.{param}")],
                );
                assert!(e < 1e-2, "{name} (f16 base): {param} rel err {e:.2e}");
            }
        }
    }
}

fn load_tiny() -> StableDiffusion {
    let source = ModelSource::open(fixtures().join("sd1_tiny")).unwrap();
    StableDiffusion::load(&source, DType::F32, &Device::Cpu).unwrap()
}

fn options(network: NetworkType) -> TrainOptions {
    TrainOptions {
        seed: 5,
        network,
        lokr_factor: -1,
        dora_axis: DoraAxis::Output,
        ..TrainOptions::default()
    }
}

/// The conv preset with the text encoder: every layer kind gets each type.
fn spec() -> TargetSpec {
    TargetSpec {
        preset: Preset::Conv,
        text_encoder: true,
        ..TargetSpec::default()
    }
}

/// A small deterministic loss through the text encoder and the UNet.
fn loss(sd: &StableDiffusion) -> Tensor {
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[49406u32, 320, 1125, 539, 49407, 49407]], &dev).unwrap();
    let ids = ids.clamp(0u32, 999u32).unwrap();
    let ctx = sd.text_encoder.forward(&ids).unwrap().last_hidden_state;
    let n = 4 * 16 * 24;
    let sample = Tensor::arange(0f32, n as f32, &dev)
        .unwrap()
        .affine(0.37, 0.0)
        .unwrap()
        .sin()
        .unwrap()
        .reshape((1, 4, 16, 24))
        .unwrap();
    let t = Tensor::new(&[500f32], &dev).unwrap();
    let out = sd.unet.forward(&sample, &t, &ctx).unwrap();
    (out - sample.affine(0.5, 0.0).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
}

/// The tiny model with fresh trainable adapters of `network` (conv preset,
/// text encoder included).
fn tiny_with(
    network: NetworkType,
) -> (StableDiffusion, sd_lora_model::lora::attach::TrainableLora) {
    let mut sd = load_tiny();
    let lora = create_trainable(
        &mut sd.unet,
        Some(&mut sd.text_encoder),
        &spec(),
        &options(network),
    )
    .unwrap();
    (sd, lora)
}

/// Adds a deterministic pattern of ±0.05 to every trainable tensor.
fn perturb(lora: &sd_lora_model::lora::attach::TrainableLora) {
    let mut salt = 0.0f32;
    for m in &lora.modules {
        for (_, v) in m.params.named_vars() {
            salt += 0.71;
            let n = v.elem_count();
            let noise = Tensor::arange(0f32, n as f32, &Device::Cpu)
                .unwrap()
                .affine(1.37, salt as f64)
                .unwrap()
                .sin()
                .unwrap()
                .affine(0.05, 0.0)
                .unwrap()
                .reshape(v.dims())
                .unwrap();
            v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
        }
    }
}

#[test]
fn every_tensor_of_each_type_gets_a_gradient_and_training_starts_at_the_base() {
    let base_loss = loss(&load_tiny()).to_scalar::<f32>().unwrap();
    for network in [NetworkType::Dora, NetworkType::Loha, NetworkType::Lokr] {
        let (sd, lora) = tiny_with(network);
        assert!(lora.len() > 50);
        // At initialisation the update is zero (DoRA: up to its 1e-7 norm epsilon).
        let l0 = loss(&sd).to_scalar::<f32>().unwrap();
        assert!(
            ((l0 - base_loss) / base_loss).abs() < 1e-5,
            "{network}: initial loss {l0} vs base {base_loss}"
        );
        // As after some training: every tensor non-zero, so every gradient is.
        perturb(&lora);
        let grads = loss(&sd).backward().unwrap();
        let mut count = 0;
        for m in &lora.modules {
            for (name, v) in m.params.named_vars() {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{network}: {} {name}: no gradient", m.target.path));
                assert!(
                    max_abs(g) > 0.0,
                    "{network}: {} {name}: zero gradient",
                    m.target.path
                );
                count += 1;
            }
        }
        println!(
            "{network}: {} modules, {count} tensors with gradients",
            lora.len()
        );
    }
}

#[test]
fn files_of_each_type_read_back_and_merging_equals_the_adapter() {
    let dir = tempfile::TempDir::new().unwrap();
    for network in [NetworkType::Dora, NetworkType::Loha, NetworkType::Lokr] {
        let (sd, lora) = tiny_with(network);
        perturb(&lora);
        let with_lora = loss(&sd).to_scalar::<f32>().unwrap();
        let weights = extract(&sd.unet, Some(&sd.text_encoder)).unwrap();
        assert_eq!(weights.network_type(), network);
        let path = dir.path().join(format!("{network}.safetensors"));
        let md = Metadata::default().with_network_of(&weights);
        write_kohya(&path, &weights, &md, SaveDtype::F32).unwrap();
        // For tools/check_lycoris_in_reference.py: keep the files.
        if let Some(keep) = std::env::var_os("SD_LORA_KEEP_LYCORIS_FILES") {
            std::fs::copy(&path, PathBuf::from(keep).join(path.file_name().unwrap())).unwrap();
        }
        let file = read_lora(&path).unwrap();
        assert_eq!(file.weights.network_type(), network);
        assert_eq!(file.weights.len(), weights.len());
        assert_eq!(
            file.metadata.get("ss_network_module").map(String::as_str),
            Some("lycoris.kohya")
        );
        same_weights(&file.weights, &weights);

        // Read back, attached to a fresh model: the same loss; merged: the same again.
        let mut fresh = load_tiny();
        attach(
            &mut fresh.unet,
            Some(&mut fresh.text_encoder),
            &file.weights,
            1.0,
        )
        .unwrap();
        let attached = loss(&fresh).to_scalar::<f32>().unwrap();
        assert!(
            ((attached - with_lora) / with_lora).abs() < 1e-5,
            "{network}: {attached} vs {with_lora}"
        );
        merge(&mut fresh.unet, Some(&mut fresh.text_encoder), 1.0).unwrap();
        let merged = loss(&fresh).to_scalar::<f32>().unwrap();
        assert!(
            ((merged - with_lora) / with_lora).abs() < 1e-4,
            "{network}: merged {merged} vs {with_lora}"
        );
        remove_all(&mut fresh.unet, Some(&mut fresh.text_encoder));
        println!("{network}: loss with LoRA {with_lora}, read back {attached}, merged {merged}");

        // PEFT holds DoRA (as lora_magnitude_vector) but not LoHa/LoKr.
        let peft = dir.path().join(format!("{network}-peft.safetensors"));
        let written = write_peft(&peft, &weights, &md, SaveDtype::F32);
        if network == NetworkType::Dora {
            written.unwrap();
            let back = read_lora(&peft).unwrap();
            assert_eq!(back.weights.network_type(), NetworkType::Dora);
            let mut again = load_tiny();
            attach(
                &mut again.unet,
                Some(&mut again.text_encoder),
                &back.weights,
                1.0,
            )
            .unwrap();
            let l = loss(&again).to_scalar::<f32>().unwrap();
            assert!(((l - with_lora) / with_lora).abs() < 1e-5, "peft DoRA: {l}");
        } else {
            let e = written.unwrap_err().to_string();
            assert!(e.contains("kohya format"), "{e}");
        }
    }
}

fn same_weights(a: &LoraWeights, b: &LoraWeights) {
    let (a, b) = (a.all(), b.all());
    assert_eq!(a.len(), b.len());
    for ((ka, ma), (kb, mb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert_eq!(ma.alpha(), mb.alpha(), "{ka:?}");
        let shape = match ma {
            ModuleWeights::LowRank(m) => {
                let mut s = vec![m.up.dims()[0]];
                s.extend_from_slice(&m.down.dims()[1..]);
                s
            }
            ModuleWeights::Lycoris(m) => {
                let (o, i) = m.update_dims().unwrap();
                vec![o, i]
            }
        };
        let w = Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap();
        let e = rel_err(&ma.delta(&w).unwrap(), &mb.delta(&w).unwrap());
        assert!(e < 1e-6, "{ka:?}: {e}");
    }
}

#[test]
fn input_axis_dora_trains_and_is_refused_by_peft() {
    let mut sd = load_tiny();
    let lora = create_trainable(
        &mut sd.unet,
        None,
        &TargetSpec::default(),
        &TrainOptions {
            dora_axis: DoraAxis::Input,
            ..options(NetworkType::Dora)
        },
    )
    .unwrap();
    let m = &lora.modules[0];
    let (_, mag) = m
        .params
        .named_vars()
        .into_iter()
        .find(|(n, _)| n == "dora_scale")
        .unwrap();
    assert_eq!(mag.dims()[..2], [1, m.target.in_features]);
    let weights = extract(&sd.unet, None).unwrap();
    let dir = tempfile::TempDir::new().unwrap();
    let e = write_peft(
        &dir.path().join("x.safetensors"),
        &weights,
        &Metadata::default(),
        SaveDtype::F16,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("input axis"), "{e}");
    let md = Metadata::default().with_network_of(&weights);
    assert_eq!(md.network_args["wd_on_output"], "False");
}
