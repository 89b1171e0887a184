//! Reading a single-file checkpoint's configuration off its tensor shapes.
//!
//! A single file carries weights but no `config.json`; diffusers' `from_single_file` fetches a
//! stock config from the Hub. We do not assume the stock sizes: everything that shapes the
//! tensors is read from them, and the few values the weights cannot show are assumed from the
//! architecture, can be overridden, and are listed here.
//!
//! **Inferred from shapes** (UNet): `in_channels` (`input_blocks.0.0` in-channels),
//! `out_channels` (`out.2`), `block_out_channels` (each level's ResBlock `out_layers.3`
//! out-channels; levels end at a downsampler `input_blocks.N.0.op`), `layers_per_block` (ResBlocks
//! per level; must be equal on every level), down/up block types (a level has cross-attention iff
//! its blocks have a `.1.` SpatialTransformer), `mid_block_type`, `transformer_layers_per_block`
//! (count of `transformer_blocks.K`), `cross_attention_dim` (in-dim of `attn2.to_k`),
//! `use_linear_projection` (`proj_in` 2-D Linear vs 4-D 1×1 conv), `time_embedding_dim` when it
//! is not the default 4 × `block_out_channels[0]`.
//!
//! (VAE): `in_channels`, `out_channels`, `latent_channels` (`post_quant_conv`), `block_out_channels`
//! (`encoder.down.i.block.0.conv2`), `layers_per_block` (ResBlocks in `encoder.down.0`),
//! `mid_block_add_attention`.
//!
//! (Text encoder, read from the converted names): `vocab_size` and `hidden_size` (token
//! embedding), `max_position_embeddings` (position embedding), `num_hidden_layers` (count of
//! layers *after* conversion, so SD2's dropped last layer is not counted), `intermediate_size`
//! (`fc1`), `projection_dim` (OpenCLIP `text_projection` columns; hidden size when absent).
//!
//! **Assumed** (invisible in weights; override with [`LoadOptions`](super::LoadOptions)):
//! * UNet attention heads. SD1 uses 8 heads at every level (`attention_head_dim: 8`, diffusers'
//!   historical name for the head *count*); SD2 uses head dim 64, so heads = channels / 64 per
//!   level (`[5, 10, 20, 20]` for 320/640/1280/1280). If a level's channels are not a multiple of
//!   the rule's divisor (tiny test models), loading fails and asks for
//!   [`AttentionHeads`].
//! * Text-encoder heads = hidden / 64 (CLIP-L: 768 → 12, OpenCLIP-H: 1024 → 16, bigG: 1280 →
//!   20). Only valid for hidden ≥ 64 and a multiple of 64; otherwise loading asks for
//!   `text_encoder_heads`.
//! * `norm_num_groups` = 32 for UNet and VAE (every SD release). If a width is not a multiple
//!   of 32 it is certainly wrong, and loading asks for an override.
//! * `hidden_act`: `quick_gelu` for CLIP-L (SD1, SDXL's first encoder), `gelu` for OpenCLIP
//!   (SD2, SDXL's second).
//! * Token ids: BOS/EOS = the last two ids of the vocabulary (CLIP's `<|startoftext|>` 49406 and
//!   `<|endoftext|>` 49407); pad = EOS for SD1 (its tokenizer pads with `<|endoftext|>`), 0
//!   (`!`) for SD2. (Real SD folders' configs say 0/2/1, transformers' legacy placeholders; with
//!   EOS the largest id both pooling rules pick the same token.)
//! * `upcast_attention` = true for SD2 (numerically safe always, needed by SD2.1-768 in fp16;
//!   diffusers decides it from a training step count that safetensors files do not carry), false
//!   for SD1.
//! * `sample_size` (UNet 64, VAE 512; 96/768 for v-prediction SD2, the 768 px models; 128/1024
//!   for SDXL) and the VAE `scaling_factor` (0.18215; SDXL 0.13025): they do not shape any tensor.
//! * SDXL: `addition_time_embed_dim` = (in-width of `label_emb.0.0` − the second encoder's
//!   projection width) / 6, as the six size/crop ids share it; the first encoder is CLIP-L
//!   (`quick_gelu`), the second OpenCLIP-bigG (`gelu`), and `upcast_attention` is false.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Value, json};

use super::error::LoadError;
use super::safetensors_file::SafetensorsFile;
use super::weights::ComponentWeights;
use super::{Architecture, AttentionHeads, Prediction};

/// Shape look-ups for the keys under one prefix of a file.
pub(crate) struct Keys<'a> {
    file: &'a SafetensorsFile,
    prefix: &'a str,
}

impl<'a> Keys<'a> {
    pub(crate) fn new(file: &'a SafetensorsFile, prefix: &'a str) -> Self {
        Self { file, prefix }
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    pub(crate) fn shape(&self, suffix: &str) -> Option<&'a [usize]> {
        self.file
            .get(&format!("{}{suffix}", self.prefix))
            .map(|t| t.shape.as_slice())
    }

    /// The shape of `suffix`, which must have `rank` dimensions.
    pub(crate) fn require(
        &self,
        suffix: &str,
        rank: usize,
        why: &str,
    ) -> Result<&'a [usize], LoadError> {
        let key = format!("{}{suffix}", self.prefix);
        let shape = self.shape(suffix).ok_or_else(|| LoadError::MissingKey {
            file: self.path().to_path_buf(),
            key: key.clone(),
            context: format!(" (needed to infer {why})"),
        })?;
        if shape.len() != rank {
            return Err(LoadError::ShapeMismatch {
                file: self.path().to_path_buf(),
                key,
                found: shape.to_vec(),
                expected: format!("{rank} dimensions"),
            });
        }
        Ok(shape)
    }

    /// Suffixes (after the prefix) of every key starting with `prefix + start`.
    pub(crate) fn suffixes(&self, start: &str) -> impl Iterator<Item = &'a str> + 'a {
        let full = format!("{}{start}", self.prefix);
        let strip = self.prefix.len();
        self.file
            .tensors()
            .range(full.clone()..)
            .take_while(move |(k, _)| k.starts_with(&full))
            .map(move |(k, _)| &k[strip..])
    }

    pub(crate) fn any(&self, start: &str) -> bool {
        self.suffixes(start).next().is_some()
    }

    /// The distinct `N` of keys `prefix + start + "N." + ...`.
    pub(crate) fn indices(&self, start: &str) -> BTreeSet<usize> {
        self.suffixes(start)
            .filter_map(|s| s[start.len()..].split_once('.')?.0.parse().ok())
            .collect()
    }

    /// The first key (in name order) whose suffix ends with `end`, with its shape.
    pub(crate) fn find_ending(&self, end: &str) -> Option<(&'a str, &'a [usize])> {
        self.suffixes("")
            .find(|s| s.ends_with(end))
            .and_then(|s| Some((s, self.shape(s)?)))
    }
}

// ---------------------------------------------------------------------------------------------
// UNet
// ---------------------------------------------------------------------------------------------

/// One resolution level of the UNet, as seen in `input_blocks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UnetLevel {
    pub channels: usize,
    pub resnets: usize,
    pub attention: bool,
    pub transformer_depth: usize,
}

/// The UNet's structure: enough to rename its keys and to write its config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UnetLayout {
    pub in_channels: usize,
    pub out_channels: usize,
    pub levels: Vec<UnetLevel>,
    pub layers_per_block: usize,
    pub up_attention: Vec<bool>,
    pub mid_attention: bool,
    pub cross_attention_dim: Option<usize>,
    pub use_linear_projection: bool,
    pub time_embedding_dim: usize,
    /// SDXL: the input width of `label_emb.0.0` (pooled text + size/crop embeddings, 2816).
    pub addition_input_dim: Option<usize>,
}

impl UnetLayout {
    /// Reads the structure from the keys under [`UNET_PREFIX`](super::ldm_keys::UNET_PREFIX).
    pub(crate) fn infer(keys: &Keys) -> Result<Self, LoadError> {
        let conv_in = keys.require("input_blocks.0.0.weight", 4, "the UNet's input channels")?;
        let conv_out = keys.require("out.2.weight", 4, "the UNet's output channels")?;
        let time = keys.require("time_embed.0.weight", 2, "the UNet's time embedding size")?;
        let cannot = |what: &str, hint: String| LoadError::CannotInfer {
            file: keys.path().to_path_buf(),
            what: what.to_string(),
            hint,
        };

        let mut levels: Vec<UnetLevel> = Vec::new();
        let mut current: Option<UnetLevel> = None;
        let indices = keys.indices("input_blocks.");
        for &i in indices.iter().filter(|&&i| i > 0) {
            if keys.any(&format!("input_blocks.{i}.0.op.")) {
                let level = current.take().ok_or_else(|| {
                    cannot(
                        "the UNet levels",
                        format!("input_blocks.{i} is a downsampler with no ResBlock before it"),
                    )
                })?;
                levels.push(level);
                continue;
            }
            let out = keys.require(
                &format!("input_blocks.{i}.0.out_layers.3.weight"),
                4,
                "the UNet's block_out_channels",
            )?;
            let attention = keys.any(&format!("input_blocks.{i}.1."));
            let depth = keys
                .indices(&format!("input_blocks.{i}.1.transformer_blocks."))
                .len();
            match &mut current {
                None => {
                    current = Some(UnetLevel {
                        channels: out[0],
                        resnets: 1,
                        attention,
                        transformer_depth: depth,
                    })
                }
                Some(level) => {
                    if level.channels != out[0] || level.attention != attention {
                        return Err(cannot(
                            "the UNet levels",
                            format!(
                                "input_blocks.{i} differs in width or attention from the ResBlocks \
                                 before it, and no downsampler separates them"
                            ),
                        ));
                    }
                    level.resnets += 1;
                }
            }
        }
        levels.extend(current);
        let expected: BTreeSet<usize> = (0..=indices.last().copied().unwrap_or(0)).collect();
        if levels.is_empty() || indices != expected {
            return Err(cannot(
                "the UNet levels",
                format!("input_blocks indices are {indices:?}; expected 0, 1, 2, ... without gaps"),
            ));
        }
        let layers_per_block = levels[0].resnets;
        if levels.iter().any(|l| l.resnets != layers_per_block) {
            let counts: Vec<usize> = levels.iter().map(|l| l.resnets).collect();
            return Err(cannot(
                "layers_per_block",
                format!("the levels have different numbers of ResBlocks: {counts:?}"),
            ));
        }
        let per_level = layers_per_block + 1;
        let up_attention = (0..levels.len())
            .map(|b| {
                (0..per_level)
                    .any(|k| keys.any(&format!("output_blocks.{}.1.norm.", b * per_level + k)))
            })
            .collect();
        let cross_attention_dim = keys
            .find_ending("attn2.to_k.weight")
            .map(|(_, shape)| shape.get(1).copied().unwrap_or(0));
        let use_linear_projection = keys
            .find_ending("proj_in.weight")
            .is_some_and(|(_, shape)| shape.len() == 2);
        Ok(Self {
            in_channels: conv_in[1],
            out_channels: conv_out[0],
            levels,
            layers_per_block,
            up_attention,
            mid_attention: keys.any("middle_block.1."),
            cross_attention_dim,
            use_linear_projection,
            time_embedding_dim: time[0],
            addition_input_dim: keys
                .shape("label_emb.0.0.weight")
                .filter(|s| s.len() == 2)
                .map(|s| s[1]),
        })
    }

    /// The diffusers `unet/config.json` for this layout.
    pub(crate) fn config(
        &self,
        file: &Path,
        architecture: Architecture,
        prediction: Prediction,
        heads: Option<&AttentionHeads>,
        groups_overridden: bool,
        pooled_dim: Option<usize>,
    ) -> Result<Value, LoadError> {
        let channels: Vec<usize> = self.levels.iter().map(|l| l.channels).collect();
        let cannot = |what: &str, hint: String| LoadError::CannotInfer {
            file: file.to_path_buf(),
            what: what.to_string(),
            hint,
        };
        let default_heads = match architecture {
            Architecture::Sd1 => AttentionHeads::Fixed(8),
            _ => AttentionHeads::HeadDim(64),
        };
        let explicit = heads.is_some();
        let heads = heads.unwrap_or(&default_heads);
        let attention_head_dim = match heads {
            AttentionHeads::Fixed(n) => {
                if *n == 0 || channels.iter().any(|c| c % n != 0) {
                    return Err(cannot(
                        "the UNet's attention heads",
                        format!(
                            "{n} heads do not divide the level widths {channels:?}; pass \
                             LoadOptions::unet_attention_heads"
                        ),
                    ));
                }
                json!(n)
            }
            AttentionHeads::HeadDim(d) => {
                let per_level: Option<Vec<usize>> = channels
                    .iter()
                    .map(|c| (*d > 0 && c % d == 0 && c >= d).then_some(c / d))
                    .collect();
                let per_level = per_level.ok_or_else(|| {
                    cannot(
                        "the UNet's attention heads",
                        format!(
                            "{} rule heads = channels / {d} needs every level width {channels:?} \
                             to be a multiple of {d}; pass LoadOptions::unet_attention_heads",
                            if explicit { "the" } else { "SD2's" }
                        ),
                    )
                })?;
                json!(per_level)
            }
            AttentionHeads::PerLevel(list) => {
                if list.len() != channels.len() {
                    return Err(cannot(
                        "the UNet's attention heads",
                        format!(
                            "{} head counts given for {} levels",
                            list.len(),
                            channels.len()
                        ),
                    ));
                }
                json!(list)
            }
        };
        let groups = default_norm_groups(file, "UNet", &channels, groups_overridden)?;
        let depths: Vec<usize> = self
            .levels
            .iter()
            .map(|l| l.transformer_depth.max(1))
            .collect();
        let transformer_layers_per_block = if depths.iter().all(|&d| d == depths[0]) {
            json!(depths[0])
        } else {
            json!(depths)
        };
        let down: Vec<&str> = self
            .levels
            .iter()
            .map(|l| {
                if l.attention {
                    "CrossAttnDownBlock2D"
                } else {
                    "DownBlock2D"
                }
            })
            .collect();
        let up: Vec<&str> = self
            .up_attention
            .iter()
            .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
            .collect();
        let v768 = architecture == Architecture::Sd2 && prediction == Prediction::V;
        let sample_size = match architecture {
            Architecture::Sdxl => 128,
            _ if v768 => 96,
            _ => 64,
        };
        let mut config = json!({
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "attention_head_dim": attention_head_dim,
            "block_out_channels": channels,
            "center_input_sample": false,
            "cross_attention_dim": self.cross_attention_dim,
            "down_block_types": down,
            "downsample_padding": 1,
            "dual_cross_attention": false,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": self.in_channels,
            "layers_per_block": self.layers_per_block,
            "mid_block_scale_factor": 1,
            "mid_block_type": if self.mid_attention { "UNetMidBlock2DCrossAttn" } else { "UNetMidBlock2D" },
            "norm_eps": 1e-5,
            "norm_num_groups": groups,
            "only_cross_attention": false,
            "out_channels": self.out_channels,
            "sample_size": sample_size,
            "transformer_layers_per_block": transformer_layers_per_block,
            "up_block_types": up,
            "upcast_attention": architecture == Architecture::Sd2,
            "use_linear_projection": self.use_linear_projection,
        });
        if self.time_embedding_dim != 4 * channels[0] {
            config["time_embedding_dim"] = json!(self.time_embedding_dim);
        }
        if let Some(input) = self.addition_input_dim {
            // input = pooled width + 6 sinusoids (original h, w, crop top, left, target h, w).
            let time_ids = match pooled_dim {
                Some(p) if input > p && (input - p) % 6 == 0 => (input - p) / 6,
                _ => {
                    return Err(cannot(
                        "the UNet's addition_time_embed_dim",
                        format!(
                            "label_emb takes {input} values, which is not the pooled text width \
                             {pooled_dim:?} plus 6 equal size/crop embeddings; the file's second \
                             text encoder does not belong to its UNet"
                        ),
                    ));
                }
            };
            config["addition_embed_type"] = json!("text_time");
            config["addition_time_embed_dim"] = json!(time_ids);
            config["projection_class_embeddings_input_dim"] = json!(input);
        }
        Ok(config)
    }
}

/// 32 groups, unless a width shows that cannot be right (and the caller has no override).
fn default_norm_groups(
    file: &Path,
    what: &str,
    channels: &[usize],
    overridden: bool,
) -> Result<usize, LoadError> {
    if !overridden && channels.iter().any(|c| c % 32 != 0) {
        return Err(LoadError::CannotInfer {
            file: file.to_path_buf(),
            what: format!("the {what}'s norm_num_groups"),
            hint: format!(
                "Stable Diffusion uses 32 groups, which does not divide the widths {channels:?}; \
                 pass norm_num_groups in LoadOptions::config_overrides"
            ),
        });
    }
    Ok(32)
}

// ---------------------------------------------------------------------------------------------
// VAE
// ---------------------------------------------------------------------------------------------

/// The VAE's structure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VaeLayout {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub channels: Vec<usize>,
    pub layers_per_block: usize,
    pub mid_attention: bool,
}

impl VaeLayout {
    /// Reads the structure from the keys under [`VAE_PREFIX`](super::ldm_keys::VAE_PREFIX).
    pub(crate) fn infer(keys: &Keys) -> Result<Self, LoadError> {
        let conv_in = keys.require("encoder.conv_in.weight", 4, "the VAE's input channels")?;
        let conv_out = keys.require("decoder.conv_out.weight", 4, "the VAE's output channels")?;
        let latent = match keys.shape("post_quant_conv.weight") {
            Some(shape) if shape.len() == 4 => shape[0],
            _ => keys.require("decoder.conv_in.weight", 4, "the VAE's latent channels")?[1],
        };
        let levels = keys.indices("encoder.down.");
        let up_levels = keys.indices("decoder.up.");
        let expected: BTreeSet<usize> = (0..levels.len()).collect();
        if levels.is_empty() || levels != expected || up_levels != expected {
            return Err(LoadError::CannotInfer {
                file: keys.path().to_path_buf(),
                what: "the VAE levels".into(),
                hint: format!(
                    "encoder.down indices are {levels:?} and decoder.up indices {up_levels:?}; \
                     expected the same 0, 1, 2, ... in both"
                ),
            });
        }
        let channels = levels
            .iter()
            .map(|i| {
                keys.require(
                    &format!("encoder.down.{i}.block.0.conv2.weight"),
                    4,
                    "the VAE's block_out_channels",
                )
                .map(|s| s[0])
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            in_channels: conv_in[1],
            out_channels: conv_out[0],
            latent_channels: latent,
            channels,
            layers_per_block: keys.indices("encoder.down.0.block.").len(),
            mid_attention: keys.any("encoder.mid.attn_1."),
        })
    }

    /// The diffusers `vae/config.json` for this layout.
    pub(crate) fn config(
        &self,
        file: &Path,
        architecture: Architecture,
        prediction: Prediction,
        groups_overridden: bool,
    ) -> Result<Value, LoadError> {
        let n = self.channels.len();
        let v768 = architecture == Architecture::Sd2 && prediction == Prediction::V;
        let (sample_size, scaling_factor) = match architecture {
            Architecture::Sdxl => (1024, 0.13025),
            _ if v768 => (768, 0.18215),
            _ => (512, 0.18215),
        };
        Ok(json!({
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": self.channels,
            "down_block_types": vec!["DownEncoderBlock2D"; n],
            "in_channels": self.in_channels,
            "latent_channels": self.latent_channels,
            "layers_per_block": self.layers_per_block,
            "mid_block_add_attention": self.mid_attention,
            "norm_num_groups":
                default_norm_groups(file, "VAE", &self.channels, groups_overridden)?,
            "out_channels": self.out_channels,
            "sample_size": sample_size,
            "scaling_factor": scaling_factor,
            "up_block_types": vec!["UpDecoderBlock2D"; n],
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// Text encoder
// ---------------------------------------------------------------------------------------------

/// Which CLIP text tower a single file holds (the weights do not show the activation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TextTower {
    /// OpenAI's CLIP ViT-L/14: SD1's encoder and SDXL's first (`quick_gelu`, pads with the end
    /// token).
    ClipL,
    /// OpenCLIP ViT-H/14 converted for SD2 (`gelu`, pads with `!`).
    OpenClipH,
    /// OpenCLIP ViT-bigG/14 with its projection: SDXL's second encoder
    /// (`CLIPTextModelWithProjection`, `gelu`, pads with `!`).
    BigGWithProjection,
}

/// The transformers `text_encoder/config.json` for converted (`text_model.*`) weights.
pub(crate) fn text_config(
    file: &Path,
    weights: &ComponentWeights,
    tower: TextTower,
    projection_dim: Option<usize>,
    heads: Option<usize>,
) -> Result<Value, LoadError> {
    let shape = |key: &str, why: &str| {
        weights
            .get(key)
            .map(|e| e.shape().to_vec())
            .filter(|s| s.len() == 2)
            .ok_or_else(|| LoadError::MissingKey {
                file: file.to_path_buf(),
                key: key.to_string(),
                context: format!(" (a 2-D tensor, needed to infer {why})"),
            })
    };
    let token = shape(
        "text_model.embeddings.token_embedding.weight",
        "the text encoder's vocabulary and hidden size",
    )?;
    let position = shape(
        "text_model.embeddings.position_embedding.weight",
        "the text encoder's maximum length",
    )?;
    let fc1 = shape(
        "text_model.encoder.layers.0.mlp.fc1.weight",
        "the text encoder's intermediate size",
    )?;
    let layers: BTreeSet<usize> = weights
        .keys()
        .filter_map(|k| {
            let rest = k.strip_prefix("text_model.encoder.layers.")?;
            rest.split_once('.')?.0.parse().ok()
        })
        .collect();
    let (vocab, hidden) = (token[0], token[1]);
    let heads = match heads {
        Some(h) if h > 0 && hidden % h == 0 => h,
        Some(h) => {
            return Err(LoadError::CannotInfer {
                file: file.to_path_buf(),
                what: "the text encoder's attention heads".into(),
                hint: format!("{h} heads given, which does not divide the hidden size {hidden}"),
            });
        }
        None if hidden >= 64 && hidden % 64 == 0 => hidden / 64,
        None => {
            return Err(LoadError::CannotInfer {
                file: file.to_path_buf(),
                what: "the text encoder's attention heads".into(),
                hint: format!(
                    "the rule heads = hidden / 64 needs a hidden size that is a multiple of 64, \
                     this one is {hidden}; pass LoadOptions::text_encoder_heads"
                ),
            });
        }
    };
    let sd1 = tower == TextTower::ClipL;
    let eos = vocab.saturating_sub(1);
    let class = if tower == TextTower::BigGWithProjection {
        "CLIPTextModelWithProjection"
    } else {
        "CLIPTextModel"
    };
    Ok(json!({
        "architectures": [class],
        "attention_dropout": 0.0,
        "bos_token_id": vocab.saturating_sub(2),
        "eos_token_id": eos,
        "hidden_act": if sd1 { "quick_gelu" } else { "gelu" },
        "hidden_size": hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": fc1[0],
        "layer_norm_eps": 1e-5,
        "max_position_embeddings": position[0],
        "model_type": "clip_text_model",
        "num_attention_heads": heads,
        "num_hidden_layers": layers.len(),
        "pad_token_id": if sd1 { eos } else { 0 },
        "projection_dim": projection_dim.unwrap_or(hidden),
        "vocab_size": vocab,
    }))
}

/// Number of OpenCLIP resblocks under [`SD2_TEXT_PREFIX`](super::ldm_keys::SD2_TEXT_PREFIX).
pub(crate) fn open_clip_layers(keys: &Keys) -> usize {
    keys.indices("transformer.resblocks.").len()
}
