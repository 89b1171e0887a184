//! UNet parity with the Python reference (diffusers) on the tiny fixtures:
//! outputs for a batch of 2 with different timesteps, and the input gradients
//! of `sum(out · cotangent)`, for an SD1-like (conv projections, one head count
//! for all levels) and an SD2-like (linear projections, heads per level, upcast
//! attention) UNet.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[path = "support/device.rs"]
mod device;
use device::test_device;

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use sd_lora_model::unet::{UNet2DConditionModel, UNetConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Serves tensors from a map and records which keys were read, so the test can
/// check that the model uses every tensor in the file (an unused tensor would be
/// a module silently left out).
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
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
}

fn check(model: &str) {
    let dev = test_device();
    let dir = fixtures().join(model).join("unet");
    let cfg = UNetConfig::from_file(dir.join("config.json")).unwrap();
    let weights =
        candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &dev)
            .unwrap();
    let all: BTreeSet<String> = weights.keys().cloned().collect();
    let tracking = Tracking {
        tensors: Arc::new(weights),
        used: Arc::default(),
    };
    let vb = VarBuilder::from_backend(Box::new(tracking.clone()), DType::F32, dev.clone());
    let unet = UNet2DConditionModel::new(vb, &cfg).unwrap();
    let used = tracking.used.lock().unwrap().clone();
    let unused: Vec<_> = all.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "{model}: tensors in the file the UNet does not use: {unused:?}"
    );
    let reference = candle_core::safetensors::load(
        fixtures()
            .join("reference")
            .join(format!("{model}.safetensors")),
        &dev,
    )
    .unwrap();
    let get = |k: &str| {
        reference
            .get(k)
            .unwrap_or_else(|| panic!("missing {k}"))
            .clone()
    };
    let timesteps = get("unet.timesteps").to_dtype(DType::F32).unwrap();
    let sample = Var::from_tensor(&get("unet.sample")).unwrap();
    let context = Var::from_tensor(&get("unet.encoder_hidden_states")).unwrap();

    let out = unet.forward(&sample, &timesteps, &context).unwrap();
    let err_out = rel_err(&out, &get("unet.out"));

    let loss = (&out * get("unet.grad.cotangent"))
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let g_sample = grads.get(&sample).unwrap();
    let g_context = grads.get(&context).unwrap();
    let err_gs = rel_err(g_sample, &get("unet.grad.sample"));
    let err_gc = rel_err(g_context, &get("unet.grad.encoder_hidden_states"));
    println!("{model}: out {err_out:.2e}, d/dsample {err_gs:.2e}, d/dcontext {err_gc:.2e}");
    assert!(
        err_out <= 1e-4,
        "{model}: UNet output relative error {err_out}"
    );
    assert!(err_gs <= 1e-4, "{model}: d/dsample relative error {err_gs}");
    assert!(
        err_gc <= 1e-4,
        "{model}: d/dcontext relative error {err_gc}"
    );
}

#[test]
fn sd1_tiny_unet_matches_reference() {
    check("sd1_tiny");
}

#[test]
fn sd2_tiny_unet_matches_reference() {
    check("sd2_tiny");
}
