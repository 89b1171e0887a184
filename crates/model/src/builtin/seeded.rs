//! Seeded weights for the built-in models: each tensor drawn from its own
//! splitmix64 stream, seeded by the model seed and a hash of the tensor's key,
//! with the distributions the module docs of [`super`] describe.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor, bail};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

/// splitmix64 step: the generator of every weight stream (also of the
/// benchmark's random SD1.5 weights).
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a key, to give each tensor its own stream.
pub fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `n` values `mean + std·N(0, 1)` (Box–Muller on splitmix64; f64 arithmetic,
/// rounded to f32 once, so the values are the same on every platform).
fn normals(seed: u64, n: usize, mean: f64, std: f64) -> Vec<f32> {
    let mut state = seed;
    let mut uniform = || ((splitmix64(&mut state) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    (0..n)
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            (mean + std * z) as f32
        })
        .collect()
}

/// The gain of a weight: the VAE encoder's last conv is scaled up by
/// `latent_gain` (and the decoder's first scaled down by the same factor) so
/// that, as with the real VAEs, unscaled latents have a standard deviation
/// near `1 / scaling_factor` and the latents the UNet trains on have unit
/// scale; everything else has gain 1.
fn gain(name: &str, latent_gain: f64) -> f64 {
    match name {
        "encoder.conv_out.weight" => latent_gain,
        "decoder.conv_in.weight" => 1.0 / latent_gain,
        _ => 1.0,
    }
}

/// The weight of key `name` (see the module docs for the distributions).
fn seeded_weight(seed: u64, name: &str, shape: &Shape, latent_gain: f64) -> Result<Tensor> {
    let dims = shape.dims();
    let mut s = seed ^ fnv1a(name);
    let stream = splitmix64(&mut s);
    let n = shape.elem_count();
    let data = match dims {
        [] => bail!("{name}: a scalar parameter was requested; the builtin model has none"),
        [_] if name.ends_with(".weight") => normals(stream, n, 1.0, 0.1),
        [_] => normals(stream, n, 0.0, 0.1),
        _ if name.ends_with("embedding.weight") => normals(stream, n, 0.0, 1.0),
        [_, rest @ ..] => {
            let fan_in: usize = rest.iter().product();
            normals(
                stream,
                n,
                0.0,
                gain(name, latent_gain) / (fan_in.max(1) as f64).sqrt(),
            )
        }
    };
    Tensor::from_vec(data, shape.clone(), &Device::Cpu)
}

/// A VarBuilder backend that invents each requested tensor from its key and
/// records it, so a component's exact key set comes from its own constructor.
#[derive(Clone)]
struct SeededRecorder {
    seed: u64,
    options: RecordOptions,
    /// Shapes of the tensors a constructor reads without giving one.
    unchecked: Arc<HashMap<String, Shape>>,
    recorded: Arc<Mutex<HashMap<String, Tensor>>>,
}

impl SeededRecorder {
    fn make(&self, name: &str, shape: &Shape, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = seeded_weight(self.seed, name, shape, self.options.latent_gain)?;
        self.recorded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(name.to_string(), t.clone());
        t.to_dtype(dtype)?.to_device(dev)
    }
}

impl SimpleBackend for SeededRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        self.make(name, &s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        match self.unchecked.get(name) {
            Some(shape) => self.make(name, shape, dtype, dev),
            None => bail!("builtin model: no shape known for {name}"),
        }
    }

    /// Optional tensors are absent unless asked for (`text_projection`, only
    /// for SDXL's second text encoder); attention uses the current key names.
    fn contains_tensor(&self, name: &str) -> bool {
        if name == "text_projection.weight" {
            return self.options.text_projection;
        }
        !(name.ends_with(".query.weight") || name.ends_with(".proj_attn.weight"))
    }
}

/// What a recording builder does beyond drawing each tensor.
#[derive(Debug, Clone, Copy)]
pub(super) struct RecordOptions {
    /// The VAE latent gain (see [`gain`]); 1 for components without a VAE.
    pub latent_gain: f64,
    /// Whether `text_projection.weight` exists (a `CLIPTextModelWithProjection`).
    pub text_projection: bool,
}

impl Default for RecordOptions {
    fn default() -> Self {
        Self {
            latent_gain: 1.0,
            text_projection: false,
        }
    }
}

/// Runs `build` on a recording VarBuilder and returns the tensors it asked for.
pub(super) fn record(
    seed: u64,
    options: RecordOptions,
    unchecked: HashMap<String, Shape>,
    build: impl FnOnce(VarBuilder) -> Result<()>,
) -> Result<HashMap<String, Tensor>> {
    let backend = SeededRecorder {
        seed,
        options,
        unchecked: Arc::new(unchecked),
        recorded: Arc::default(),
    };
    build(VarBuilder::from_backend(
        Box::new(backend.clone()),
        DType::F32,
        Device::Cpu,
    ))?;
    let recorded = backend
        .recorded
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    Ok(recorded)
}
