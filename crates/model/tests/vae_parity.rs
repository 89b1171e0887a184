//! VAE parity with the Python reference (diffusers `AutoencoderKL`) on the tiny
//! fixtures — encode (mean, log-variance, std) and decode — plus loading of the
//! old attention key names, half-precision storage and the config reader.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[path = "support/device.rs"]
mod device;
use device::test_device;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use sd_lora_model::vae::{AutoencoderKL, VaeConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Serves tensors from a map and records which keys were read.
#[derive(Clone)]
struct Tracking {
    tensors: Arc<HashMap<String, Tensor>>,
    used: Arc<Mutex<BTreeSet<String>>>,
}

impl SimpleBackend for Tracking {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        self.used.lock().unwrap().insert(name.to_string());
        SimpleBackend::get(&*self.tensors, s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.used.lock().unwrap().insert(name.to_string());
        SimpleBackend::get_unchecked(&*self.tensors, name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Max |a − b| divided by max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
}

fn config(model: &str) -> VaeConfig {
    VaeConfig::from_file(fixtures().join(model).join("vae/config.json")).unwrap()
}

fn weights(model: &str) -> HashMap<String, Tensor> {
    let path = fixtures()
        .join(model)
        .join("vae/diffusion_pytorch_model.safetensors");
    candle_core::safetensors::load(path, &test_device()).unwrap()
}

fn reference(model: &str) -> HashMap<String, Tensor> {
    let path = fixtures()
        .join("reference")
        .join(format!("{model}.safetensors"));
    candle_core::safetensors::load(path, &test_device()).unwrap()
}

fn check(model: &str) {
    let cfg = config(model);
    let weights = weights(model);
    let all: BTreeSet<String> = weights.keys().cloned().collect();
    let tracking = Tracking {
        tensors: Arc::new(weights),
        used: Arc::default(),
    };
    let vb = VarBuilder::from_backend(Box::new(tracking.clone()), DType::F32, test_device());
    let vae = AutoencoderKL::new(vb, &cfg).unwrap();
    let used = tracking.used.lock().unwrap().clone();
    let unused: Vec<_> = all.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "{model}: tensors in the file the VAE does not use: {unused:?}"
    );

    let reference = reference(model);
    let get = |k: &str| {
        reference
            .get(k)
            .unwrap_or_else(|| panic!("missing {k}"))
            .clone()
    };
    let dist = vae.encode(&get("vae.encode.image")).unwrap();
    let e_mean = rel_err(&dist.mean, &get("vae.encode.mean"));
    let e_logvar = rel_err(&dist.logvar, &get("vae.encode.logvar"));
    let e_std = rel_err(&dist.std, &get("vae.encode.std"));
    let decoded = vae.decode(&get("vae.decode.latent")).unwrap();
    let e_dec = rel_err(&decoded, &get("vae.decode.sample"));
    println!(
        "{model}: mean {e_mean:.2e}, logvar {e_logvar:.2e}, std {e_std:.2e}, decode {e_dec:.2e}"
    );
    for (name, e) in [
        ("mean", e_mean),
        ("logvar", e_logvar),
        ("std", e_std),
        ("decode", e_dec),
    ] {
        assert!(e <= 1e-4, "{model}: VAE {name} relative error {e}");
    }

    // sample = mean + std · noise.
    let noise = Tensor::ones(dist.mean.shape(), DType::F32, &test_device()).unwrap();
    let sample = dist.sample(&noise).unwrap();
    assert!(rel_err(&sample, &(&dist.mean + &dist.std).unwrap()) < 1e-7);
}

#[test]
fn sd1_tiny_vae_matches_reference() {
    check("sd1_tiny");
}

#[test]
fn sd2_tiny_vae_matches_reference() {
    check("sd2_tiny");
}

/// Old diffusers files name the mid-block attention `query/key/value/proj_attn`
/// (some conversions as 1×1 conv weights); they load to the same model.
#[test]
fn old_attention_names_load() {
    let cfg = config("sd1_tiny");
    let new = weights("sd1_tiny");
    let mut old = HashMap::new();
    for (k, v) in &new {
        let renamed = k
            .replace("attentions.0.to_q.", "attentions.0.query.")
            .replace("attentions.0.to_k.", "attentions.0.key.")
            .replace("attentions.0.to_v.", "attentions.0.value.")
            .replace("attentions.0.to_out.0.", "attentions.0.proj_attn.");
        // One projection stored as a [c, c, 1, 1] conv weight.
        let v = if renamed.ends_with("decoder.mid_block.attentions.0.key.weight") {
            v.unsqueeze(2).unwrap().unsqueeze(3).unwrap()
        } else {
            v.clone()
        };
        old.insert(renamed, v);
    }
    assert!(old.contains_key("encoder.mid_block.attentions.0.proj_attn.weight"));
    let dev = test_device();
    let a = AutoencoderKL::new(VarBuilder::from_tensors(new, DType::F32, &dev), &cfg).unwrap();
    let b = AutoencoderKL::new(VarBuilder::from_tensors(old, DType::F32, &dev), &cfg).unwrap();
    let reference = reference("sd1_tiny");
    let latent = &reference["vae.decode.latent"];
    let image = &reference["vae.encode.image"];
    assert_eq!(
        rel_err(&b.decode(latent).unwrap(), &a.decode(latent).unwrap()),
        0.0
    );
    assert_eq!(
        rel_err(
            &b.encode(image).unwrap().mean,
            &a.encode(image).unwrap().mean
        ),
        0.0
    );
}

/// f16/bf16 storage on the CPU (convs computed in f32 there) stays close to f32.
#[test]
fn half_precision_storage_on_cpu() {
    let cfg = config("sd2_tiny");
    let reference = reference("sd2_tiny");
    for (dtype, tol) in [(DType::F16, 5e-3), (DType::BF16, 5e-2)] {
        let vb = VarBuilder::from_tensors(weights("sd2_tiny"), dtype, &test_device());
        let vae = AutoencoderKL::new(vb, &cfg).unwrap();
        let mean = vae.encode(&reference["vae.encode.image"]).unwrap().mean;
        let decoded = vae.decode(&reference["vae.decode.latent"]).unwrap();
        assert_eq!(decoded.dtype(), dtype);
        let e_mean = rel_err(&mean, &reference["vae.encode.mean"]);
        let e_dec = rel_err(&decoded, &reference["vae.decode.sample"]);
        println!("{dtype:?}: mean {e_mean:.2e}, decode {e_dec:.2e}");
        assert!(e_mean < tol && e_dec < tol, "{dtype:?}: {e_mean}, {e_dec}");
    }
}

#[test]
fn config_defaults_and_errors() {
    let cfg: VaeConfig = serde_json::from_str(
        r#"{"_class_name": "AutoencoderKL", "shift_factor": null, "latents_mean": null}"#,
    )
    .unwrap();
    assert_eq!(cfg, VaeConfig::default());
    assert_eq!(cfg.block_out_channels, vec![64]);
    assert_eq!(cfg.layers_per_block, 1);
    assert_eq!(cfg.latent_channels, 4);
    assert_eq!(cfg.scaling_factor, 0.18215);
    assert_eq!(cfg.shift_factor, None);
    let sdxl =
        VaeConfig::from_json_str(r#"{"scaling_factor": 0.13025, "shift_factor": 0.1}"#).unwrap();
    assert_eq!(sdxl.scaling_factor, 0.13025);
    assert_eq!(sdxl.shift_factor, Some(0.1));

    let err = VaeConfig::from_json_str(r#"{"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("AttnDownEncoderBlock2D"), "{err}");
    let err = VaeConfig::from_json_str(r#"{"block_out_channels": [8, 12], "norm_num_groups": 8}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("norm_num_groups"), "{err}");
    let err = VaeConfig::from_file("/nonexistent/vae/config.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/vae/config.json"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let cfg = config("sd1_tiny");
    let mut w = weights("sd1_tiny");
    w.remove("decoder.up_blocks.0.resnets.1.conv2.weight");
    let err = AutoencoderKL::new(
        VarBuilder::from_tensors(w, DType::F32, &test_device()),
        &cfg,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("decoder.up_blocks.0.resnets.1.conv2.weight"),
        "{err}"
    );
}
