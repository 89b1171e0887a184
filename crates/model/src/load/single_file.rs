//! Single-file `.safetensors` checkpoints with original LDM key names.
//!
//! The architecture is told by which text encoder the file holds: `cond_stage_model.transformer.*`
//! (CLIP-L, SD1), `cond_stage_model.model.*` (OpenCLIP-H, SD2), `conditioner.embedders.*`
//! (SDXL). A file without a text encoder is classified by its UNet (linear `proj_in` → SD2).
//! Each component's keys are renamed by [`ldm_keys`] into a lazily loaded
//! [`ComponentWeights`]; configurations are inferred by [`ldm_config`](super::ldm_config).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use super::error::LoadError;
use super::ldm_config::{Keys, TextTower, UnetLayout, VaeLayout, open_clip_layers, text_config};
use super::ldm_keys::{self, Conversion, Rename};
use super::safetensors_file::SafetensorsFile;
use super::weights::{ComponentWeights, WeightEntry};
use super::{Architecture, Component, LoadOptions, Prediction};

/// An opened single-file checkpoint.
#[derive(Debug)]
pub(crate) struct SingleFile {
    pub file: Arc<SafetensorsFile>,
    pub architecture: Architecture,
    /// Converted weights per component; for the SDXL refiner, the original tensors (for
    /// counting only).
    pub weights: BTreeMap<Component, ComponentWeights>,
    /// False for the SDXL refiner: [`weights`](Self::weights) then hold original names.
    pub convertible: bool,
    unet: Option<UnetLayout>,
    vae: Option<VaeLayout>,
    text_projection_dim: Option<usize>,
    /// SDXL: the width of the second encoder's `text_projection` (the pooled embedding).
    text_2_projection_dim: Option<usize>,
    pub notes: Vec<String>,
}

impl SingleFile {
    pub(crate) fn open(path: &Path) -> Result<Self, LoadError> {
        let file = Arc::new(SafetensorsFile::open(path)?);
        let has = |prefix: &str| Keys::new(&file, prefix).any("");
        let unet_keys = Keys::new(&file, ldm_keys::UNET_PREFIX);
        if let Some(what) = other_family(&file) {
            return Err(LoadError::Unsupported {
                path: path.to_path_buf(),
                what: format!("{what}{SUPPORTED}"),
            });
        }
        if !has(ldm_keys::UNET_PREFIX) {
            return Err(not_a_checkpoint(&file));
        }
        // A UNet that takes more than the 4 latent channels is conditioned on an image too.
        if let Some(channels) = unet_keys
            .shape("input_blocks.0.0.weight")
            .filter(|s| s.len() == 4)
            .map(|s| s[1])
            .filter(|&c| c != 4)
        {
            return Err(LoadError::Unsupported {
                path: path.to_path_buf(),
                what: format!("{}{SUPPORTED}", unet_input_kind(channels)),
            });
        }
        let mut notes = Vec::new();

        // The SDXL refiner has only OpenCLIP-bigG, as embedder 0 (diffusers calls it
        // text_encoder_2), and a UNet conditioned on an aesthetic score: recognised and
        // counted, not converted.
        if has(ldm_keys::SDXL_REFINER_TEXT_2_PREFIX) {
            return Self::sdxl_refiner(file, notes);
        }
        let unet = UnetLayout::infer(&unet_keys)?;
        let architecture = if has(ldm_keys::SDXL_TEXT_2_PREFIX) {
            Architecture::Sdxl
        } else if has(ldm_keys::SD2_TEXT_PREFIX) {
            Architecture::Sd2
        } else if has(ldm_keys::SD1_TEXT_PREFIX) {
            Architecture::Sd1
        } else if unet_keys.any("label_emb.") {
            return Err(LoadError::Unsupported {
                path: path.to_path_buf(),
                what: "an SDXL UNet without its text encoders; give the full checkpoint".into(),
            });
        } else {
            let guess = if unet.use_linear_projection {
                Architecture::Sd2
            } else {
                Architecture::Sd1
            };
            notes.push(format!(
                "the file has no text encoder; architecture {guess} guessed from the UNet's \
                 {} projections",
                if unet.use_linear_projection {
                    "linear"
                } else {
                    "convolutional"
                }
            ));
            guess
        };

        let mut weights = BTreeMap::new();
        let lpb = unet.layers_per_block;
        let w = convert(
            &file,
            ldm_keys::UNET_PREFIX,
            Component::Unet,
            |k| ldm_keys::unet(k, lpb),
            &mut notes,
        )?;
        weights.insert(Component::Unet, w);

        let vae = if has(ldm_keys::VAE_PREFIX) {
            let layout = VaeLayout::infer(&Keys::new(&file, ldm_keys::VAE_PREFIX))?;
            let n = layout.channels.len();
            let w = convert(
                &file,
                ldm_keys::VAE_PREFIX,
                Component::Vae,
                |k| {
                    // Old checkpoints sometimes carry the VAE's training loss (discriminator).
                    if k.starts_with("loss.") {
                        Rename::Drop("VAE training loss, not part of the model")
                    } else {
                        ldm_keys::vae(k, n)
                    }
                },
                &mut notes,
            )?;
            weights.insert(Component::Vae, w);
            Some(layout)
        } else {
            None
        };

        let mut text_projection_dim = None;
        let mut text_2_projection_dim = None;
        match architecture {
            Architecture::Sd1 => {
                let w = convert(
                    &file,
                    ldm_keys::SD1_TEXT_PREFIX,
                    Component::TextEncoder,
                    ldm_keys::clip,
                    &mut notes,
                )?;
                weights.insert(Component::TextEncoder, w);
            }
            Architecture::Sd2 if has(ldm_keys::SD2_TEXT_PREFIX) => {
                let keys = Keys::new(&file, ldm_keys::SD2_TEXT_PREFIX);
                let layers = open_clip_layers(&keys);
                text_projection_dim = keys
                    .shape("text_projection")
                    .filter(|s| s.len() == 2)
                    .map(|s| s[1]);
                let w = convert(
                    &file,
                    ldm_keys::SD2_TEXT_PREFIX,
                    Component::TextEncoder,
                    |k| ldm_keys::open_clip(k, layers),
                    &mut notes,
                )?;
                notes.push(format!(
                    "SD2 text encoder: OpenCLIP has {layers} layers; as diffusers' conversion, the \
                     last one and text_projection are dropped (SD2 conditions on the penultimate \
                     layer), leaving num_hidden_layers = {}",
                    layers.saturating_sub(1)
                ));
                weights.insert(Component::TextEncoder, w);
            }
            Architecture::Sdxl => {
                let w = convert(
                    &file,
                    ldm_keys::SDXL_TEXT_PREFIX,
                    Component::TextEncoder,
                    ldm_keys::clip,
                    &mut notes,
                )?;
                weights.insert(Component::TextEncoder, w);
                text_2_projection_dim = Keys::new(&file, ldm_keys::SDXL_TEXT_2_PREFIX)
                    .shape("text_projection")
                    .filter(|s| s.len() == 2)
                    .map(|s| s[1]);
                let w = convert(
                    &file,
                    ldm_keys::SDXL_TEXT_2_PREFIX,
                    Component::TextEncoder2,
                    ldm_keys::open_clip_full,
                    &mut notes,
                )?;
                weights.insert(Component::TextEncoder2, w);
            }
            _ => {}
        }
        // SDXL's cross-attention reads both encoders' hidden states side by side.
        let text_width = |c: Component| {
            weights
                .get(&c)
                .and_then(|w| w.get("text_model.embeddings.token_embedding.weight"))
                .and_then(|e| e.shape().get(1).copied())
        };
        let context_width = match architecture {
            Architecture::Sdxl => text_width(Component::TextEncoder)
                .zip(text_width(Component::TextEncoder2))
                .map(|(a, b)| a + b),
            _ => text_width(Component::TextEncoder),
        };
        if let (Some(context), Some(text)) = (unet.cross_attention_dim, context_width)
            && context != text
        {
            notes.push(format!(
                "the UNet's cross-attention dim {context} differs from the text encoder's hidden \
                 size {text}: the two do not belong together"
            ));
        }

        Ok(Self {
            file,
            architecture,
            weights,
            convertible: true,
            unet: Some(unet),
            vae,
            text_projection_dim,
            text_2_projection_dim,
            notes,
        })
    }

    /// An SDXL refiner: each component's original tensors, for `inspect` only.
    fn sdxl_refiner(file: Arc<SafetensorsFile>, mut notes: Vec<String>) -> Result<Self, LoadError> {
        let mut weights = BTreeMap::new();
        for (component, prefix) in [
            (Component::Unet, ldm_keys::UNET_PREFIX),
            (Component::Vae, ldm_keys::VAE_PREFIX),
            (
                Component::TextEncoder2,
                ldm_keys::SDXL_REFINER_TEXT_2_PREFIX,
            ),
        ] {
            let w = convert(
                &file,
                prefix,
                component,
                |k| {
                    if ldm_keys::is_buffer(k) {
                        Rename::Drop("buffer")
                    } else {
                        Rename::To(vec![ldm_keys::Target {
                            key: k.to_string(),
                            conversion: Conversion::Same,
                        }])
                    }
                },
                &mut notes,
            )?;
            if !w.is_empty() {
                weights.insert(component, w);
            }
        }
        notes.push(
            "this is an SDXL refiner (one OpenCLIP-bigG text encoder, aesthetic-score \
             conditioning): it can be inspected but not trained or run; parameter counts are of \
             the original tensors (buffers excluded)"
                .into(),
        );
        Ok(Self {
            file,
            architecture: Architecture::Sdxl,
            weights,
            convertible: false,
            unet: None,
            vae: None,
            text_projection_dim: None,
            text_2_projection_dim: None,
            notes,
        })
    }

    /// The inferred diffusers/transformers config of `component` (before overrides).
    pub(crate) fn config(
        &self,
        component: Component,
        prediction: Prediction,
        options: &LoadOptions,
    ) -> Result<Value, LoadError> {
        let path = self.file.path();
        // An overridden group count replaces the assumed 32, so do not object to it.
        let groups_overridden = options
            .config_overrides
            .get(&component)
            .is_some_and(|m| m.contains_key("norm_num_groups"));
        match component {
            Component::Unet => self
                .unet
                .as_ref()
                .ok_or_else(|| self.unsupported())?
                .config(
                    path,
                    self.architecture,
                    prediction,
                    options.unet_attention_heads.as_ref(),
                    groups_overridden,
                    self.text_2_projection_dim,
                ),
            Component::Vae => self.vae.as_ref().ok_or_else(|| self.unsupported())?.config(
                path,
                self.architecture,
                prediction,
                groups_overridden,
            ),
            Component::TextEncoder | Component::TextEncoder2 => {
                let weights = self
                    .weights
                    .get(&component)
                    .ok_or_else(|| self.unsupported())?;
                let (tower, projection) = match (self.architecture, component) {
                    (Architecture::Sd1, _) | (Architecture::Sdxl, Component::TextEncoder) => {
                        (TextTower::ClipL, None)
                    }
                    (Architecture::Sdxl, _) => {
                        (TextTower::BigGWithProjection, self.text_2_projection_dim)
                    }
                    _ => (TextTower::OpenClipH, self.text_projection_dim),
                };
                let heads = if component == Component::TextEncoder {
                    options.text_encoder_heads
                } else {
                    options.text_encoder_2_heads
                };
                text_config(path, weights, tower, projection, heads)
            }
        }
    }

    pub(crate) fn unsupported(&self) -> LoadError {
        // The refiner is the only recognised kind that cannot be converted.
        let what = if self.architecture == Architecture::Sdxl {
            "this is an SDXL refiner (one OpenCLIP-bigG text encoder, aesthetic-score \
             conditioning): `sd-lora inspect` reads it, but it cannot be trained or run; \
             sd-lora trains LoRAs for SD1.x, SD2.x and SDXL base checkpoints (SDXL base and its \
             fine-tunes such as Pony or Illustrious)"
                .to_string()
        } else {
            format!(
                "{} single-file checkpoints of this kind are recognised (inspect works) but \
                 cannot be converted{SUPPORTED}",
                self.architecture
            )
        };
        LoadError::Unsupported {
            path: self.file.path().to_path_buf(),
            what,
        }
    }
}

/// Converts every key under `prefix` with `rename`. Unrecognised keys are skipped and noted
/// (real checkpoints carry odd extras), never silently renamed.
pub(crate) fn convert(
    file: &Arc<SafetensorsFile>,
    prefix: &str,
    component: Component,
    rename: impl Fn(&str) -> Rename,
    notes: &mut Vec<String>,
) -> Result<ComponentWeights, LoadError> {
    let mut weights = ComponentWeights::new(component);
    let mut unknown = Vec::new();
    let keys: Vec<&str> = Keys::new(file, prefix).suffixes("").collect();
    for suffix in keys {
        let full = format!("{prefix}{suffix}");
        match rename(suffix) {
            Rename::To(targets) => {
                for target in targets {
                    let entry =
                        WeightEntry::whole(file, &full).ok_or_else(|| LoadError::MissingKey {
                            file: file.path().to_path_buf(),
                            key: full.clone(),
                            context: String::new(),
                        })?;
                    let entry = match target.conversion {
                        Conversion::Same => entry,
                        Conversion::ConvToLinear => match entry.shape() {
                            [o, i, 1, 1] => {
                                let shape = vec![*o, *i];
                                entry.reshaped(shape)?
                            }
                            [_, _] => entry,
                            other => {
                                return Err(LoadError::ShapeMismatch {
                                    file: file.path().to_path_buf(),
                                    key: full,
                                    found: other.to_vec(),
                                    expected: "[out, in, 1, 1] (a 1×1 conv) or [out, in]".into(),
                                });
                            }
                        },
                        Conversion::Chunk { index, of } => entry.row_chunk(index, of)?,
                        Conversion::Transpose => entry.transposed()?,
                    };
                    weights.insert(target.key, entry)?;
                }
            }
            Rename::Drop(_) => {}
            Rename::Unknown => unknown.push(full),
        }
    }
    if !unknown.is_empty() {
        let shown: Vec<&str> = unknown.iter().take(3).map(String::as_str).collect();
        notes.push(format!(
            "{component}: {} unrecognised tensor(s) ignored, e.g. {}",
            unknown.len(),
            shown.join(", ")
        ));
    }
    Ok(weights)
}

/// The error for a `.safetensors` without a Stable Diffusion UNet, saying what it looks like.
/// What the refusals of other model families end with.
pub(crate) const SUPPORTED: &str =
    "; sd-lora trains LoRAs for SD1.x, SD2.x and SDXL (text-to-image) checkpoints";

/// A checkpoint of another model family, by the key names only it uses.
fn other_family(file: &SafetensorsFile) -> Option<&'static str> {
    let any = |pattern: &str| file.tensors().keys().any(|k| k.contains(pattern));
    if any("joint_blocks.") {
        Some("this is a Stable Diffusion 3 / 3.5 checkpoint (MMDiT `joint_blocks`)")
    } else if any("double_blocks.") && any("single_blocks.") {
        Some("this is a Flux checkpoint (`double_blocks` / `single_blocks`)")
    } else {
        None
    }
}

/// What a UNet with `channels` input channels (not 4) is.
pub(crate) fn unet_input_kind(channels: usize) -> String {
    match channels {
        9 => "this is an inpainting UNet (9 input channels: latents, mask, masked image)".into(),
        8 => "this is an image-conditioned UNet (8 input channels, as instruct-pix2pix)".into(),
        c => format!(
            "this UNet takes {c} input channels, not the 4 latent channels of text-to-image"
        ),
    }
}

fn not_a_checkpoint(file: &SafetensorsFile) -> LoadError {
    let keys = file.tensors();
    let any = |pred: &dyn Fn(&str) -> bool| keys.keys().any(|k| pred(k));
    let reason = if any(&|k| k.starts_with("lora_") || k.contains(".lora_") || k.contains("lora_A"))
    {
        "this is a LoRA file, not a base model; give the base model (a diffusers folder or a \
         full checkpoint) as the model and the LoRA separately"
    } else if any(&|k| k.starts_with("down_blocks.") || k.starts_with("encoder.down_blocks.")) {
        "this looks like one component of a diffusers folder (diffusers key names); give the whole \
         folder (the one holding model_index.json)"
    } else if any(&|k| k.starts_with("encoder.down.") || k.starts_with("first_stage_model.")) {
        "this looks like a VAE on its own, not a full checkpoint"
    } else {
        "no Stable Diffusion UNet found (no `model.diffusion_model.*` tensors); expected an SD1, \
         SD2 or SDXL single-file checkpoint"
    };
    LoadError::NotAModel {
        path: file.path().to_path_buf(),
        reason: reason.into(),
    }
}
