//! `builtin:tiny`: a tiny Stable Diffusion 1.x model built in code from a fixed
//! seed, so the quickstart, the documentation examples and the trainer's tests
//! need no download.
//!
//! It has SD1's layout — a CLIP text encoder with quick-GELU and the real
//! 49,408-token vocabulary (the embedded tokenizer, SD1's end-token padding),
//! a UNet whose outer level is a `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`
//! pair with conv projections and whose inner level is a plain
//! `DownBlock2D` / `UpBlock2D`, a four-level AutoencoderKL (×8 downsampling,
//! 4 latent channels, scaling factor 0.18215, mid-block attention) and the DDPM
//! scaled-linear ε schedule — at widths small enough that one training step at
//! 64 px takes a fraction of a second on two CPU cores. Every key is the
//! diffusers key of the real model, so LoRA presets, files and `inspect`
//! behave as on SD1.5.
//!
//! The weights are random but *well scaled*, as the test fixtures' are: every
//! matrix/kernel is `N(0, 1/fan_in)` (so activations keep unit scale through
//! each layer), embeddings `N(0, 1)`, norm scales `1 + N(0, 0.1²)` and biases
//! `N(0, 0.1²)`. Each tensor is drawn from its own stream, seeded by
//! [`TINY_SEED`] and a hash of its key, so the weights do not depend on the
//! order in which layers are built and the same seed gives bit-identical
//! weights on every machine. The model knows nothing, but its outputs have
//! unit-ish scale, gradients flow everywhere, and training a LoRA on it lowers
//! the denoising loss — which is what a smoke test and a tutorial need.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor, bail};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use crate::clip::{ClipTextConfig, ClipTextTransformer, ClipTokenizer, HiddenAct, PadStyle};
use crate::load::{Architecture, Component, Prediction};
use crate::pipeline::{PipelineError, StableDiffusion};
use crate::schedule::{NoiseSchedule, ScheduleConfig};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};

/// The model path that selects this model (`model = "builtin:tiny"`).
pub const BUILTIN_TINY: &str = "builtin:tiny";

/// The seed of [`tiny_sd1`]'s weights. Changing it changes every weight (and so
/// every LoRA trained on the built-in model); it is part of the model's identity.
pub const TINY_SEED: u64 = 0x5D1_7A1E;

/// Whether a model path names a built-in model (`builtin:…`).
pub fn is_builtin(path: &str) -> bool {
    path.starts_with("builtin:")
}

/// The text encoder: CLIP ViT-L/14's structure (quick-GELU, 77 positions, the
/// real vocabulary and special ids) at width 64 with 2 layers.
pub fn tiny_text_encoder_config() -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 49408,
        hidden_size: 64,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        max_position_embeddings: 77,
        hidden_act: HiddenAct::QuickGelu,
        layer_norm_eps: 1e-5,
        projection_dim: 64,
        pad_token_id: 49407,
        bos_token_id: 49406,
        eos_token_id: 49407,
    }
}

/// The UNet's diffusers `config.json`: SD1.5's settings except the widths
/// (32, 64 instead of 320, 640, 1280, 1280), two levels instead of four, and
/// 4 heads and 8 groups instead of 8 and 32.
pub const TINY_UNET_CONFIG_JSON: &str = r#"{
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": false,
    "flip_sin_to_cos": true,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 8,
    "norm_eps": 1e-5,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
    "use_linear_projection": false,
    "upcast_attention": false
}"#;

/// The VAE's diffusers `config.json`: SD's AutoencoderKL with four levels (so a
/// 64 px image gives an 8×8 latent, as 512 px gives 64×64 on SD1.5) at widths
/// 8, 16, 16, 16 and one ResNet per level.
pub const TINY_VAE_CONFIG_JSON: &str = r#"{
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.18215
}"#;

/// The resolved UNet configuration of [`tiny_sd1`].
pub fn tiny_unet_config() -> std::result::Result<UNetConfig, String> {
    UNetConfig::from_json_str(TINY_UNET_CONFIG_JSON).map_err(|e| e.to_string())
}

/// The resolved VAE configuration of [`tiny_sd1`].
pub fn tiny_vae_config() -> std::result::Result<VaeConfig, String> {
    VaeConfig::from_json_str(TINY_VAE_CONFIG_JSON).map_err(|e| e.to_string())
}

/// The weights of [`tiny_sd1`] as f32 tensors on the CPU, keyed exactly as a
/// diffusers folder stores them (`text_model.…` for the text encoder).
#[derive(Debug, Clone)]
pub struct TinyWeights {
    pub text_encoder: HashMap<String, Tensor>,
    pub unet: HashMap<String, Tensor>,
    pub vae: HashMap<String, Tensor>,
}

impl TinyWeights {
    /// The weights of one component (`None` for a component the model lacks).
    pub fn component(&self, component: Component) -> Option<&HashMap<String, Tensor>> {
        match component {
            Component::TextEncoder => Some(&self.text_encoder),
            Component::Unet => Some(&self.unet),
            Component::Vae => Some(&self.vae),
            Component::TextEncoder2 => None,
        }
    }

    /// `(component, parameter elements, tensors)` for each component, in the
    /// order `sd-lora inspect` lists them.
    pub fn parameter_counts(&self) -> Vec<(Component, u64, usize)> {
        [Component::Unet, Component::Vae, Component::TextEncoder]
            .into_iter()
            .filter_map(|c| {
                let w = self.component(c)?;
                let n = w.values().map(|t| t.elem_count() as u64).sum();
                Some((c, n, w.len()))
            })
            .collect()
    }
}

/// Draws the weights of [`tiny_sd1`] from `seed` (use [`TINY_SEED`]).
pub fn tiny_sd1_weights(seed: u64) -> Result<TinyWeights> {
    let te_cfg = tiny_text_encoder_config();
    let unet_cfg = tiny_unet_config().map_err(candle_core::Error::Msg)?;
    let vae_cfg = tiny_vae_config().map_err(candle_core::Error::Msg)?;

    let te = record(seed, HashMap::new(), |vb| {
        ClipTextTransformer::new(vb, &te_cfg).map(|_| ())
    })?;
    let unet = record(seed, HashMap::new(), |vb| {
        UNet2DConditionModel::new(vb, &unet_cfg).map(|_| ())
    })?;
    // The VAE's mid-block attention reads its projections without a shape (old
    // checkpoints store them as 1×1 convs), so the shapes are given here.
    let c = *vae_cfg.block_out_channels.last().unwrap_or(&1);
    let unchecked = ["to_q", "to_k", "to_v", "to_out.0"]
        .iter()
        .flat_map(|p| {
            ["encoder", "decoder"].map(|side| {
                (
                    format!("{side}.mid_block.attentions.0.{p}.weight"),
                    Shape::from((c, c)),
                )
            })
        })
        .collect();
    let vae = record(seed, unchecked, |vb| {
        AutoencoderKL::new(vb, &vae_cfg).map(|_| ())
    })?;
    Ok(TinyWeights {
        text_encoder: te,
        unet,
        vae,
    })
}

/// The built-in tiny SD1 model (see the module docs), weights stored as `dtype`
/// on `device`. Deterministic: the same call gives bit-identical weights.
pub fn tiny_sd1(
    dtype: DType,
    device: &Device,
) -> std::result::Result<StableDiffusion, PipelineError> {
    let path = BUILTIN_TINY.to_string();
    let config_err = |component: Component, message: String| PipelineError::Config {
        path: path.clone(),
        component,
        message,
    };
    let build_err = |component: Component| {
        let path = path.clone();
        move |source: candle_core::Error| PipelineError::Build {
            path,
            component,
            source,
        }
    };
    let text_encoder_config = tiny_text_encoder_config();
    let unet_config = tiny_unet_config().map_err(|e| config_err(Component::Unet, e))?;
    let vae_config = tiny_vae_config().map_err(|e| config_err(Component::Vae, e))?;
    let weights = tiny_sd1_weights(TINY_SEED).map_err(|e| PipelineError::Unsupported {
        path: path.clone(),
        message: format!("drawing the built-in weights: {e}"),
    })?;

    let te = Component::TextEncoder;
    let text_encoder = ClipTextTransformer::new(
        VarBuilder::from_tensors(weights.text_encoder, dtype, device),
        &text_encoder_config,
    )
    .map_err(build_err(te))?;
    let unet = UNet2DConditionModel::new(
        VarBuilder::from_tensors(weights.unet, dtype, device),
        &unet_config,
    )
    .map_err(build_err(Component::Unet))?;
    let vae = AutoencoderKL::new(
        VarBuilder::from_tensors(weights.vae, dtype, device),
        &vae_config,
    )
    .map_err(build_err(Component::Vae))?;
    let schedule =
        NoiseSchedule::new(&ScheduleConfig::default()).map_err(|e| PipelineError::Unsupported {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let tokenizer = ClipTokenizer::embedded().map_err(|e| PipelineError::Unsupported {
        path: path.clone(),
        message: format!("tokenizer: {e}"),
    })?;
    Ok(StableDiffusion {
        architecture: Architecture::Sd1,
        prediction: Prediction::Epsilon,
        tokenizer,
        pad_style: PadStyle::EndToken,
        text_encoder_config,
        text_encoder,
        text_encoder_2: None,
        unet_config,
        unet,
        vae_config,
        vae,
        schedule,
        notes: vec![format!(
            "{BUILTIN_TINY} is a tiny SD1-layout model with random weights (seed {TINY_SEED:#x}), \
             for trying the tools out; its images are noise"
        )],
    })
}

// ---------------------------------------------------------------------------
// Seeded weights
// ---------------------------------------------------------------------------

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

/// The VAE encoder's last conv is scaled up (and the decoder's first scaled
/// down by the same factor) so that, as with SD's real VAE, unscaled latents
/// have a standard deviation near `1 / 0.18215 ≈ 5.5` and the latents the UNet
/// trains on have unit scale; everything else has gain 1.
const VAE_LATENT_GAIN: f64 = 7.5;

fn gain(name: &str) -> f64 {
    match name {
        "encoder.conv_out.weight" => VAE_LATENT_GAIN,
        "decoder.conv_in.weight" => 1.0 / VAE_LATENT_GAIN,
        _ => 1.0,
    }
}

/// The weight of key `name` (see the module docs for the distributions).
fn seeded_weight(seed: u64, name: &str, shape: &Shape) -> Result<Tensor> {
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
            normals(stream, n, 0.0, gain(name) / (fan_in.max(1) as f64).sqrt())
        }
    };
    Tensor::from_vec(data, shape.clone(), &Device::Cpu)
}

/// A VarBuilder backend that invents each requested tensor from its key and
/// records it, so a component's exact key set comes from its own constructor.
#[derive(Clone)]
struct SeededRecorder {
    seed: u64,
    /// Shapes of the tensors a constructor reads without giving one.
    unchecked: Arc<HashMap<String, Shape>>,
    recorded: Arc<Mutex<HashMap<String, Tensor>>>,
}

impl SeededRecorder {
    fn make(&self, name: &str, shape: &Shape, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = seeded_weight(self.seed, name, shape)?;
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

    /// Optional tensors are absent: SD1's text encoder has no
    /// `text_projection`, and attention uses the current key names.
    fn contains_tensor(&self, name: &str) -> bool {
        !(name == "text_projection.weight"
            || name.ends_with(".query.weight")
            || name.ends_with(".proj_attn.weight"))
    }
}

/// Runs `build` on a recording VarBuilder and returns the tensors it asked for.
fn record(
    seed: u64,
    unchecked: HashMap<String, Shape>,
    build: impl FnOnce(VarBuilder) -> Result<()>,
) -> Result<HashMap<String, Tensor>> {
    let backend = SeededRecorder {
        seed,
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
