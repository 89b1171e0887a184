//! A VAE given apart from the model (`model.vae`), e.g. SDXL's fp16-safe VAE or SD1.5's
//! `vae-ft-mse-840000`. Accepted as:
//! - a diffusers VAE folder (`config.json` + `diffusion_pytorch_model[.VARIANT].safetensors`),
//!   or a whole diffusers model folder, whose `vae/` is taken;
//! - a single `.safetensors` file with the original (LDM) names (`encoder.down.0.block.0…`, with
//!   or without the `first_stage_model.` prefix), as A1111 and ComfyUI use them: converted like
//!   a checkpoint's VAE, its config inferred from the shapes with the base model's scaling
//!   factor;
//! - a single file with diffusers names when a `config.json` lies beside it.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use super::folder::{find_weight_files, open_weights, read_json};
use super::ldm_config::{Keys, VaeLayout};
use super::ldm_keys::{self, Rename};
use super::safetensors_file::SafetensorsFile;
use super::single_file::convert;
use super::weights::ComponentWeights;
use super::{Architecture, Component, LoadError, Prediction};

/// A separately given VAE: its config and weights (diffusers names).
#[derive(Debug)]
pub(crate) struct SeparateVae {
    pub config: Value,
    pub weights: ComponentWeights,
    pub notes: Vec<String>,
}

impl SeparateVae {
    /// Opens the VAE at `path` for a base model of `architecture` (whose scaling factor an
    /// LDM-named file without a config takes). `groups_overridden`: the options set the VAE's
    /// `norm_num_groups`, so an inferred config need not assume SD's 32.
    pub(crate) fn open(
        path: &Path,
        architecture: Architecture,
        prediction: Prediction,
        variant: Option<&str>,
        groups_overridden: bool,
    ) -> Result<Self, LoadError> {
        let metadata = std::fs::metadata(path).map_err(|e| LoadError::io(path, e))?;
        let mut notes = Vec::new();
        if metadata.is_dir() {
            let dir = if path.join("model_index.json").is_file() {
                path.join("vae")
            } else {
                path.to_path_buf()
            };
            let config_path = dir.join("config.json");
            if !config_path.is_file() {
                return Err(LoadError::NotAModel {
                    path: path.to_path_buf(),
                    reason: "model.vae: expected a VAE folder (config.json and \
                             diffusion_pytorch_model.safetensors), a diffusers model folder, or \
                             a VAE .safetensors file"
                        .into(),
                });
            }
            let config = read_json(&config_path)?;
            let files = find_weight_files(&dir, variant, &mut notes)?;
            let weights = open_weights(Component::Vae, &files)?;
            notes.push(format!("VAE from {}", dir.display()));
            return Ok(Self {
                config,
                weights,
                notes,
            });
        }
        let file = Arc::new(SafetensorsFile::open(path)?);
        let has = |prefix: &str| Keys::new(&file, prefix).any("");
        let ldm_prefix = if has("first_stage_model.encoder.down.") {
            Some(ldm_keys::VAE_PREFIX)
        } else if has("encoder.down.") {
            Some("")
        } else {
            None
        };
        if let Some(prefix) = ldm_prefix {
            let layout = VaeLayout::infer(&Keys::new(&file, prefix))?;
            let levels = layout.channels.len();
            let weights = convert(
                &file,
                prefix,
                Component::Vae,
                |k| {
                    if k.starts_with("loss.") {
                        Rename::Drop("VAE training loss, not part of the model")
                    } else if !k.starts_with("encoder.")
                        && !k.starts_with("decoder.")
                        && !k.starts_with("quant_conv.")
                        && !k.starts_with("post_quant_conv.")
                    {
                        Rename::Unknown
                    } else {
                        ldm_keys::vae(k, levels)
                    }
                },
                &mut notes,
            )?;
            let config = layout.config(path, architecture, prediction, groups_overridden)?;
            notes.push(format!(
                "VAE from {} (original names; scaling factor {} of the {architecture} base)",
                path.display(),
                config["scaling_factor"]
            ));
            return Ok(Self {
                config,
                weights,
                notes,
            });
        }
        if has("encoder.down_blocks.") {
            let config_path = path.with_file_name("config.json");
            if !config_path.is_file() {
                return Err(LoadError::NotAModel {
                    path: path.to_path_buf(),
                    reason: "model.vae: a VAE with diffusers names needs its config.json; give \
                             the folder that holds both"
                        .into(),
                });
            }
            let config = read_json(&config_path)?;
            let files = super::folder::WeightFiles::single(path.to_path_buf());
            let weights = open_weights(Component::Vae, &files)?;
            notes.push(format!("VAE from {}", path.display()));
            return Ok(Self {
                config,
                weights,
                notes,
            });
        }
        Err(LoadError::NotAModel {
            path: path.to_path_buf(),
            reason: "model.vae: no VAE in this file (no `encoder.down.*`, \
                     `first_stage_model.encoder.*` or `encoder.down_blocks.*` tensors)"
                .into(),
        })
    }
}
