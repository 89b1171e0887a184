//! A whole Stable Diffusion model — tokenizer, text encoder, UNet, VAE and
//! noise schedule — built from a [`ModelSource`] (a diffusers folder or a
//! single-file checkpoint).

use crate::clip::{ClipTextConfig, ClipTextTransformer, ClipTokenizer, PadStyle};
use crate::load::{Architecture, Component, LoadError, ModelSource, Prediction};
use crate::schedule::{NoiseSchedule, ScheduleConfig};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig, VaeParts};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

/// Why a model could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Opening or reading the model files failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A component's configuration is unusable.
    #[error("{path}: {component} config: {message}")]
    Config {
        /// The model path.
        path: String,
        /// Which component.
        component: Component,
        /// What is wrong.
        message: String,
    },
    /// Building a component from its weights failed (a missing or mis-shaped tensor).
    #[error("{path}: building the {component}: {source}")]
    Build {
        /// The model path.
        path: String,
        /// Which component.
        component: Component,
        /// The underlying error, naming the tensor.
        source: candle_core::Error,
    },
    /// Something this version cannot do yet.
    #[error("{path}: {message}")]
    Unsupported {
        /// The model path.
        path: String,
        /// What and why.
        message: String,
    },
}

/// The dtype the VAE is stored and run in: `explicit` if given; else f32 for SDXL's VAE under
/// an f16 model when its config asks for it (`force_upcast`, true unless an fp16-safe VAE's
/// config says otherwise) — its activations overflow f16 and the latents become NaN, as
/// diffusers' SDXL pipelines avoid the same way; else the model's `dtype`.
pub fn vae_storage_dtype(
    architecture: Architecture,
    dtype: DType,
    config: &VaeConfig,
    explicit: Option<DType>,
) -> DType {
    match explicit {
        Some(d) => d,
        None if architecture == Architecture::Sdxl
            && dtype == DType::F16
            && config.force_upcast =>
        {
            DType::F32
        }
        None => dtype,
    }
}

/// The UNet's weights in `dtype`, its Linear/Conv2d weights in fp8 when the source was opened
/// with [`crate::load::LoadOptions::fp8_unet`].
fn unet_var_builder(
    source: &ModelSource,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, PipelineError> {
    let weights = source.weights(Component::Unet)?.clone();
    Ok(if source.options().fp8_unet {
        VarBuilder::from_backend(
            Box::new(crate::storage::Fp8Weights(weights)),
            dtype,
            device.clone(),
        )
    } else {
        weights.into_var_builder(dtype, device)
    })
}

/// The weights of a placeholder model: every tensor one zero broadcast to its
/// shape (no memory), so the model has its structure but no weights.
struct Placeholder;

impl SimpleBackend for Placeholder {
    fn get(
        &self,
        s: Shape,
        _: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::zeros(1, dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("placeholder weights: {name} has no known shape")
    }

    /// As the built-in models: current attention key names.
    fn contains_tensor(&self, name: &str) -> bool {
        !(name.ends_with(".query.weight") || name.ends_with(".proj_attn.weight"))
    }
}

/// SDXL's second text encoder (OpenCLIP-bigG with its projection) and its tokenizer.
pub struct SecondTextEncoder {
    /// The tokenizer (`tokenizer_2/`, else the embedded CLIP vocabulary).
    pub tokenizer: ClipTokenizer,
    /// How prompts are padded (SDXL: `!`).
    pub pad_style: PadStyle,
    /// Its configuration.
    pub config: ClipTextConfig,
    /// The encoder.
    pub model: ClipTextTransformer,
}

/// An SD1.x, SD2.x or SDXL model ready to run.
pub struct StableDiffusion {
    /// sd1, sd2 or sdxl.
    pub architecture: Architecture,
    /// What the UNet predicts.
    pub prediction: Prediction,
    /// The CLIP tokenizer (the folder's, else the embedded vocabulary).
    pub tokenizer: ClipTokenizer,
    /// How prompts are padded to 77 tokens (SD1: end token; SD2: `!`).
    pub pad_style: PadStyle,
    /// Text encoder configuration.
    pub text_encoder_config: ClipTextConfig,
    /// The text encoder (SDXL: the first, CLIP-L).
    pub text_encoder: ClipTextTransformer,
    /// SDXL's second text encoder; `None` for SD1/SD2.
    pub text_encoder_2: Option<SecondTextEncoder>,
    /// UNet configuration.
    pub unet_config: UNetConfig,
    /// The UNet.
    pub unet: UNet2DConditionModel,
    /// VAE configuration.
    pub vae_config: VaeConfig,
    /// The VAE.
    pub vae: AutoencoderKL,
    /// The training noise schedule.
    pub schedule: NoiseSchedule,
    /// Things the user may want to know (e.g. a tokenizer/text-encoder vocabulary mismatch).
    pub notes: Vec<String>,
    /// The UNet is a placeholder without weights until [`Self::load_unet`] (see
    /// [`Self::load_parts_unet_later`]).
    pub unet_pending: bool,
}

impl StableDiffusion {
    /// Builds every component of `source` with weights stored as `dtype` on `device`.
    pub fn load(
        source: &ModelSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, PipelineError> {
        Self::load_parts(source, dtype, device, VaeParts::ALL)
    }

    /// [`Self::load`] building only the VAE halves in `vae` (training without
    /// previews never decodes, generation never encodes): the weights of the
    /// others are not read.
    ///
    /// Each weight is held once: tensors are built one at a time from the
    /// memory-mapped files, whose pages are released as soon as a tensor is
    /// built (see [`crate::load::safetensors_file`]).
    pub fn load_parts(
        source: &ModelSource,
        dtype: DType,
        device: &Device,
        vae: VaeParts,
    ) -> Result<Self, PipelineError> {
        Self::load_inner(source, dtype, device, vae, true)
    }

    /// [`Self::load_parts`] with the UNet's weights not read yet: it is a
    /// placeholder of the right structure (every tensor one broadcast zero, no
    /// memory) until [`Self::load_unet`]. Training caches its latents and text
    /// conditioning first, so the VAE's working memory and the text encoders
    /// never share memory with the UNet.
    pub fn load_parts_unet_later(
        source: &ModelSource,
        dtype: DType,
        device: &Device,
        vae: VaeParts,
    ) -> Result<Self, PipelineError> {
        Self::load_inner(source, dtype, device, vae, false)
    }

    /// Builds the UNet from `source` in place of the placeholder of
    /// [`Self::load_parts_unet_later`].
    pub fn load_unet(
        &mut self,
        source: &ModelSource,
        dtype: DType,
        device: &Device,
    ) -> Result<(), PipelineError> {
        let component = Component::Unet;
        self.unet =
            UNet2DConditionModel::new(unet_var_builder(source, dtype, device)?, &self.unet_config)
                .map_err(|e| PipelineError::Build {
                    path: source.path().display().to_string(),
                    component,
                    source: e,
                })?;
        self.unet_pending = false;
        Ok(())
    }

    fn load_inner(
        source: &ModelSource,
        dtype: DType,
        device: &Device,
        vae: VaeParts,
        unet_now: bool,
    ) -> Result<Self, PipelineError> {
        let path = source.path().display().to_string();
        let architecture = source.architecture();
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
        let json =
            |c: Component| -> Result<String, PipelineError> { Ok(source.config(c)?.to_string()) };

        let build_text_encoder =
            |c: Component| -> Result<(ClipTextConfig, ClipTextTransformer), PipelineError> {
                let config = ClipTextConfig::from_json_str(&json(c)?)
                    .map_err(|e| config_err(c, e.to_string()))?;
                config
                    .validate()
                    .map_err(|e| config_err(c, e.to_string()))?;
                let model = ClipTextTransformer::new(
                    source.weights(c)?.clone().into_var_builder(dtype, device),
                    &config,
                )
                .map_err(build_err(c))?;
                Ok((config, model))
            };
        let te = Component::TextEncoder;
        let (text_encoder_config, text_encoder) = build_text_encoder(te)?;
        let second = if architecture == Architecture::Sdxl {
            let (config, model) = build_text_encoder(Component::TextEncoder2)?;
            if model.text_projection.is_none() {
                return Err(config_err(
                    Component::TextEncoder2,
                    "SDXL's second text encoder has no text_projection (the pooled embedding \
                     needs it)"
                        .into(),
                ));
            }
            Some((config, model))
        } else {
            None
        };

        let unet_config = UNetConfig::from_json_str(&json(Component::Unet)?)
            .map_err(|e| config_err(Component::Unet, e.to_string()))?;
        let unet_vb = if unet_now {
            unet_var_builder(source, dtype, device)?
        } else {
            VarBuilder::from_backend(Box::new(Placeholder), dtype, device.clone())
        };
        let unet =
            UNet2DConditionModel::new(unet_vb, &unet_config).map_err(build_err(Component::Unet))?;

        let vae_config = VaeConfig::from_json_str(&json(Component::Vae)?)
            .map_err(|e| config_err(Component::Vae, e.to_string()))?;
        let vae_dtype =
            vae_storage_dtype(architecture, dtype, &vae_config, source.options().vae_dtype);
        let vae = AutoencoderKL::with_parts(
            source
                .weights(Component::Vae)?
                .clone()
                .into_var_builder(vae_dtype, device),
            &vae_config,
            vae,
        )
        .map_err(build_err(Component::Vae))?;

        let mut schedule_config = match source.scheduler_config() {
            Some(v) => serde_json::from_value::<ScheduleConfig>(v.clone()).map_err(|e| {
                PipelineError::Unsupported {
                    path: path.clone(),
                    message: format!("scheduler/scheduler_config.json: {e}"),
                }
            })?,
            None => ScheduleConfig::default(),
        };
        // The source's prediction already accounts for a user override.
        schedule_config.prediction_type = source.prediction();
        let schedule =
            NoiseSchedule::new(&schedule_config).map_err(|e| PipelineError::Unsupported {
                path: path.clone(),
                message: e.to_string(),
            })?;

        // SD1's and SDXL's first tokenizer pad with the end token, OpenCLIP's with `!`.
        let default_pad = match architecture {
            Architecture::Sd1 | Architecture::Sdxl => PadStyle::EndToken,
            Architecture::Sd2 => PadStyle::Exclamation,
        };
        let tok_err = |e: candle_core::Error| PipelineError::Unsupported {
            path: path.clone(),
            message: format!("tokenizer: {e}"),
        };
        let tokenizer_of = |c: Component,
                            default_pad: PadStyle|
         -> Result<(ClipTokenizer, PadStyle), PipelineError> {
            match source.tokenizer_dir(c) {
                Some(dir) => Ok((
                    ClipTokenizer::from_folder(dir).map_err(tok_err)?,
                    ClipTokenizer::folder_pad_style(dir)
                        .map_err(tok_err)?
                        .unwrap_or(default_pad),
                )),
                None => Ok((ClipTokenizer::embedded().map_err(tok_err)?, default_pad)),
            }
        };
        let (tokenizer, pad_style) = tokenizer_of(te, default_pad)?;
        let text_encoder_2 = match second {
            Some((config, model)) => {
                let (tokenizer, pad_style) =
                    tokenizer_of(Component::TextEncoder2, PadStyle::Exclamation)?;
                Some(SecondTextEncoder {
                    tokenizer,
                    pad_style,
                    config,
                    model,
                })
            }
            None => None,
        };
        let mut notes = source.notes().to_vec();
        if tokenizer.vocab_size() != text_encoder_config.vocab_size {
            notes.push(format!(
                "the tokenizer has {} tokens but the text encoder's vocabulary has {}; prompts may produce ids it cannot embed",
                tokenizer.vocab_size(),
                text_encoder_config.vocab_size
            ));
        }
        Ok(StableDiffusion {
            architecture,
            prediction: source.prediction(),
            tokenizer,
            pad_style,
            text_encoder_config,
            text_encoder,
            text_encoder_2,
            unet_config,
            unet,
            vae_config,
            vae,
            schedule,
            notes,
            unet_pending: !unet_now,
        })
    }

    /// Drops the text encoder's weights (a training run that has cached every
    /// caption's conditioning); prompts can no longer be encoded.
    pub fn release_text_encoder(&mut self) -> candle_core::Result<()> {
        self.text_encoder.release_weights()?;
        if let Some(second) = &mut self.text_encoder_2 {
            second.model.release_weights()?;
        }
        Ok(())
    }
}
