//! Built-in models: tiny Stable Diffusion models built in code from a fixed
//! seed, so the quickstarts, the documentation examples and the trainer's
//! tests need no download.
//!
//! - `builtin:tiny` ([`sd1`]): SD1's layout — CLIP-L-structured text encoder,
//!   cross-attention UNet, four-level VAE with scale 0.18215, ε prediction.
//! - `builtin:tiny-sdxl` ([`sdxl`]): SDXL's layout — two text encoders (a
//!   CLIP-L-structured one and an OpenCLIP-bigG-structured one with its
//!   `text_projection`, padding with `!`), a UNet with `add_time_ids` + pooled
//!   text conditioning, linear projections and two transformer blocks in its
//!   inner level, and SDXL's VAE scale 0.13025.
//!
//! Both use the real 49,408-token CLIP vocabulary (the embedded tokenizer) at
//! widths small enough that one training step at 64 px takes a fraction of a
//! second on two CPU cores. Every key is the diffusers key of the real model,
//! so LoRA presets, files and `inspect` behave as on SD1.5 / SDXL base.
//!
//! The weights are random but *well scaled*, as the test fixtures' are: every
//! matrix/kernel is `N(0, 1/fan_in)` (so activations keep unit scale through
//! each layer), embeddings `N(0, 1)`, norm scales `1 + N(0, 0.1²)` and biases
//! `N(0, 0.1²)`. Each tensor is drawn from its own stream, seeded by
//! [`TINY_SEED`] and a hash of its key, so the weights do not depend on the
//! order in which layers are built and the same seed gives bit-identical
//! weights on every machine. The models know nothing, but their outputs have
//! unit-ish scale, gradients flow everywhere, and training a LoRA on them
//! lowers the denoising loss — which is what a smoke test and a tutorial need.

mod sd1;
mod sdxl;
mod seeded;

use std::collections::HashMap;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

pub use sd1::{
    TINY_UNET_CONFIG_JSON, TINY_VAE_CONFIG_JSON, tiny_sd1, tiny_sd1_weights,
    tiny_text_encoder_config, tiny_unet_config, tiny_vae_config,
};
pub use sdxl::{
    TINY_SDXL_UNET_CONFIG_JSON, tiny_sdxl, tiny_sdxl_text_encoder_2_config, tiny_sdxl_weights,
};
pub use seeded::{fnv1a, splitmix64};

use crate::clip::{ClipTextConfig, ClipTextTransformer, ClipTokenizer, PadStyle};
use crate::load::{Architecture, Component, Prediction};
use crate::pipeline::{PipelineError, SecondTextEncoder, StableDiffusion};
use crate::schedule::{NoiseSchedule, ScheduleConfig};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};

/// The model path that selects the tiny SD1 model (`model = "builtin:tiny"`).
pub const BUILTIN_TINY: &str = "builtin:tiny";

/// The model path that selects the tiny SDXL model.
pub const BUILTIN_TINY_SDXL: &str = "builtin:tiny-sdxl";

/// Every built-in model path, as error messages and docs list them.
pub const BUILTIN_MODELS: &[&str] = &[BUILTIN_TINY, BUILTIN_TINY_SDXL];

/// The seed of the built-in weights. Changing it changes every weight (and so
/// every LoRA trained on a built-in model); it is part of the models' identity.
pub const TINY_SEED: u64 = 0x5D1_7A1E;

/// Whether a model path names a built-in model (`builtin:…`), known or not.
pub fn is_builtin(path: &str) -> bool {
    path.starts_with("builtin:")
}

/// One of the built-in models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinModel {
    /// `builtin:tiny`.
    TinySd1,
    /// `builtin:tiny-sdxl`.
    TinySdxl,
}

impl BuiltinModel {
    /// The model a `builtin:…` path names; the error lists the ones there are.
    pub fn from_path(path: &str) -> std::result::Result<Self, PipelineError> {
        match path {
            BUILTIN_TINY => Ok(Self::TinySd1),
            BUILTIN_TINY_SDXL => Ok(Self::TinySdxl),
            _ => Err(PipelineError::Unsupported {
                path: path.to_string(),
                message: format!(
                    "no such built-in model; the built-in models are {}",
                    BUILTIN_MODELS.join(", ")
                ),
            }),
        }
    }

    /// Its model path (`builtin:…`).
    pub fn path(self) -> &'static str {
        match self {
            Self::TinySd1 => BUILTIN_TINY,
            Self::TinySdxl => BUILTIN_TINY_SDXL,
        }
    }

    /// Its architecture.
    pub fn architecture(self) -> Architecture {
        match self {
            Self::TinySd1 => Architecture::Sd1,
            Self::TinySdxl => Architecture::Sdxl,
        }
    }

    /// Its weights as f32 tensors on the CPU, drawn from `seed` (use [`TINY_SEED`]).
    pub fn weights(self, seed: u64) -> candle_core::Result<TinyWeights> {
        match self {
            Self::TinySd1 => tiny_sd1_weights(seed),
            Self::TinySdxl => tiny_sdxl_weights(seed),
        }
    }

    /// Its resolved UNet configuration.
    pub fn unet_config(self) -> std::result::Result<UNetConfig, String> {
        match self {
            Self::TinySd1 => tiny_unet_config(),
            Self::TinySdxl => sdxl::tiny_sdxl_unet_config(),
        }
    }

    /// Its resolved VAE configuration.
    pub fn vae_config(self) -> std::result::Result<VaeConfig, String> {
        match self {
            Self::TinySd1 => tiny_vae_config(),
            Self::TinySdxl => sdxl::tiny_sdxl_vae_config(),
        }
    }

    /// What `sd-lora inspect` reports about it (f32 weights, exact counts).
    pub fn info(self) -> candle_core::Result<crate::load::ModelInfo> {
        let weights = self.weights(TINY_SEED)?;
        let components: Vec<_> = weights
            .parameter_counts()
            .into_iter()
            .map(
                |(component, parameters, tensors)| crate::load::ComponentInfo {
                    component,
                    parameters,
                    tensors,
                    dtypes: vec!["F32".into()],
                    files: Vec::new(),
                },
            )
            .collect();
        Ok(crate::load::ModelInfo {
            path: self.path().into(),
            format: crate::load::SourceFormat::BuiltIn,
            architecture: self.architecture(),
            prediction: Prediction::Epsilon,
            prediction_source: crate::load::PredictionSource::BuiltIn,
            dtypes: vec!["F32".into()],
            total_parameters: components.iter().map(|c| c.parameters).sum(),
            components,
            notes: vec![format!(
                "built in code from seed {TINY_SEED:#x}; its weights are random (its images are noise)"
            )],
        })
    }

    /// The model, weights stored as `dtype` on `device`.
    pub fn load(
        self,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<StableDiffusion, PipelineError> {
        match self {
            Self::TinySd1 => tiny_sd1(dtype, device),
            Self::TinySdxl => tiny_sdxl(dtype, device),
        }
    }
}

/// Loads the built-in model named by `path` (see [`BuiltinModel::from_path`]).
pub fn load(
    path: &str,
    dtype: DType,
    device: &Device,
) -> std::result::Result<StableDiffusion, PipelineError> {
    BuiltinModel::from_path(path)?.load(dtype, device)
}

/// The weights of a built-in model as f32 tensors on the CPU, keyed exactly as
/// a diffusers folder stores them (`text_model.…` for the text encoders).
#[derive(Debug, Clone)]
pub struct TinyWeights {
    pub text_encoder: HashMap<String, Tensor>,
    /// SDXL's second text encoder (`None` for SD1).
    pub text_encoder_2: Option<HashMap<String, Tensor>>,
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
            Component::TextEncoder2 => self.text_encoder_2.as_ref(),
        }
    }

    /// `(component, parameter elements, tensors)` for each component, in the
    /// order `sd-lora inspect` lists them.
    pub fn parameter_counts(&self) -> Vec<(Component, u64, usize)> {
        [
            Component::Unet,
            Component::Vae,
            Component::TextEncoder,
            Component::TextEncoder2,
        ]
        .into_iter()
        .filter_map(|c| {
            let w = self.component(c)?;
            let n = w.values().map(|t| t.elem_count() as u64).sum();
            Some((c, n, w.len()))
        })
        .collect()
    }
}

/// The VAE's mid-block attention reads its projections without a shape (old
/// checkpoints store them as 1×1 convs), so their shapes are given up front.
fn vae_unchecked_shapes(vae: &VaeConfig) -> HashMap<String, Shape> {
    let c = *vae.block_out_channels.last().unwrap_or(&1);
    ["to_q", "to_k", "to_v", "to_out.0"]
        .iter()
        .flat_map(|p| {
            ["encoder", "decoder"].map(|side| {
                (
                    format!("{side}.mid_block.attentions.0.{p}.weight"),
                    Shape::from((c, c)),
                )
            })
        })
        .collect()
}

/// What [`assemble`] builds a built-in model from: its configs and weights
/// as their builders returned them (errors are turned into
/// [`PipelineError`]s naming the model in one place).
struct Parts {
    path: &'static str,
    architecture: Architecture,
    /// Its layout in the note users see (`SD1`, `SDXL`).
    layout: &'static str,
    text_encoder_config: ClipTextConfig,
    text_encoder_2_config: Option<ClipTextConfig>,
    unet_config: std::result::Result<UNetConfig, String>,
    vae_config: std::result::Result<VaeConfig, String>,
    weights: candle_core::Result<TinyWeights>,
}

/// Builds the pipeline of a built-in model from its configs and weights.
fn assemble(
    parts: Parts,
    dtype: DType,
    device: &Device,
) -> std::result::Result<StableDiffusion, PipelineError> {
    let path = parts.path.to_string();
    let config_err = |component, message| PipelineError::Config {
        path: path.clone(),
        component,
        message,
    };
    let unet_config = parts
        .unet_config
        .map_err(|e| config_err(Component::Unet, e))?;
    let vae_config = parts
        .vae_config
        .map_err(|e| config_err(Component::Vae, e))?;
    let weights = parts.weights.map_err(|e| PipelineError::Unsupported {
        path: path.clone(),
        message: format!("drawing the built-in weights: {e}"),
    })?;
    let note = format!(
        "{} is a tiny {}-layout model with random weights (seed {TINY_SEED:#x}), for trying the \
         tools out; its images are noise",
        parts.path, parts.layout
    );
    let build_err = |component: Component| {
        let path = path.clone();
        move |source: candle_core::Error| PipelineError::Build {
            path,
            component,
            source,
        }
    };
    let unsupported = |message: String| PipelineError::Unsupported {
        path: path.clone(),
        message,
    };
    let TinyWeights {
        text_encoder,
        text_encoder_2,
        unet,
        vae,
    } = weights;
    let text_encoder = ClipTextTransformer::new(
        VarBuilder::from_tensors(text_encoder, dtype, device),
        &parts.text_encoder_config,
    )
    .map_err(build_err(Component::TextEncoder))?;
    let tokenizer =
        || ClipTokenizer::embedded().map_err(|e| unsupported(format!("tokenizer: {e}")));
    let text_encoder_2 = match (parts.text_encoder_2_config, text_encoder_2) {
        (Some(config), Some(weights)) => Some(SecondTextEncoder {
            tokenizer: tokenizer()?,
            pad_style: PadStyle::Exclamation,
            model: ClipTextTransformer::new(
                VarBuilder::from_tensors(weights, dtype, device),
                &config,
            )
            .map_err(build_err(Component::TextEncoder2))?,
            config,
        }),
        _ => None,
    };
    let unet =
        UNet2DConditionModel::new(VarBuilder::from_tensors(unet, dtype, device), &unet_config)
            .map_err(build_err(Component::Unet))?;
    let vae_dtype =
        crate::pipeline::vae_storage_dtype(parts.architecture, dtype, &vae_config, None);
    let vae = AutoencoderKL::new(
        VarBuilder::from_tensors(vae, vae_dtype, device),
        &vae_config,
    )
    .map_err(build_err(Component::Vae))?;
    let schedule =
        NoiseSchedule::new(&ScheduleConfig::default()).map_err(|e| unsupported(e.to_string()))?;
    Ok(StableDiffusion {
        architecture: parts.architecture,
        prediction: Prediction::Epsilon,
        tokenizer: tokenizer()?,
        // SD1's and SDXL's first tokenizer pad with the end token.
        pad_style: PadStyle::EndToken,
        text_encoder_config: parts.text_encoder_config,
        text_encoder,
        text_encoder_2,
        unet_config,
        unet,
        vae_config,
        vae,
        schedule,
        notes: vec![note],
        unet_pending: false,
    })
}
