//! The UNet configuration, read from a diffusers `unet/config.json`.
//!
//! The JSON is first read into [`RawUNetConfig`] (every field optional, unknown
//! fields ignored, `null` = absent), then resolved into [`UNetConfig`]: diffusers'
//! defaults filled in, per-level settings given as one number expanded to one
//! value per level, and settings this implementation does not support rejected
//! with a message naming them.
//!
//! diffusers' naming quirk, mirrored here: in SD1/SD2 configs `attention_head_dim`
//! holds the *number of heads* of each level (8 for SD1; `[5, 10, 20, 20]` for
//! SD2), and the head width is `channels / heads`. `num_attention_heads`, when
//! present, takes precedence over it — exactly what
//! `UNet2DConditionModel.__init__` does.

use std::path::Path;

use serde::Deserialize;

/// A setting given either once for all levels or once per level.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerLevel<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> PerLevel<T> {
    fn expand(&self, levels: usize, name: &str) -> Result<Vec<T>, String> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); levels]),
            Self::Many(v) if v.len() == levels => Ok(v.clone()),
            Self::Many(v) => Err(format!(
                "`{name}` has {} entries but there are {levels} down blocks",
                v.len()
            )),
        }
    }
}

/// `unet/config.json` as written, every field optional.
/// The fields mean what they mean in diffusers.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawUNetConfig {
    pub sample_size: Option<PerLevel<usize>>,
    pub in_channels: Option<usize>,
    pub out_channels: Option<usize>,
    pub center_input_sample: Option<bool>,
    pub flip_sin_to_cos: Option<bool>,
    pub freq_shift: Option<f64>,
    pub down_block_types: Option<Vec<String>>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Option<Vec<String>>,
    pub only_cross_attention: Option<PerLevel<bool>>,
    pub block_out_channels: Option<Vec<usize>>,
    pub layers_per_block: Option<PerLevel<usize>>,
    pub downsample_padding: Option<usize>,
    pub mid_block_scale_factor: Option<f64>,
    pub act_fn: Option<String>,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: Option<f64>,
    pub cross_attention_dim: Option<PerLevel<usize>>,
    pub transformer_layers_per_block: Option<PerLevel<usize>>,
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    pub encoder_hid_dim: Option<usize>,
    pub attention_head_dim: Option<PerLevel<usize>>,
    pub num_attention_heads: Option<PerLevel<usize>>,
    pub dual_cross_attention: Option<bool>,
    pub use_linear_projection: Option<bool>,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub num_class_embeds: Option<usize>,
    pub upcast_attention: Option<bool>,
    pub resnet_time_scale_shift: Option<String>,
    pub resnet_skip_time_act: Option<bool>,
    pub resnet_out_scale_factor: Option<f64>,
    pub time_embedding_type: Option<String>,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: Option<usize>,
    pub conv_out_kernel: Option<usize>,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub attention_type: Option<String>,
    pub class_embeddings_concat: Option<bool>,
    pub mid_block_only_cross_attention: Option<bool>,
    pub cross_attention_norm: Option<String>,
    pub addition_embed_type_num_heads: Option<usize>,
}

/// Kinds of down/up blocks this UNet knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`: ResNets interleaved with
    /// transformers.
    CrossAttn,
    /// `DownBlock2D` / `UpBlock2D`: ResNets only.
    Plain,
}

/// SDXL's added conditioning (`addition_embed_type = "text_time"`): the pooled
/// text embedding and the six size/crop numbers are embedded and added to the
/// time embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct TextTimeConfig {
    /// `addition_time_embed_dim`: sinusoidal width per time id (256 in SDXL).
    pub addition_time_embed_dim: usize,
    /// `projection_class_embeddings_input_dim`: pooled text width + 6 × the above
    /// (2816 in SDXL).
    pub projection_class_embeddings_input_dim: usize,
}

/// A resolved UNet configuration: diffusers' defaults applied, per-level values
/// expanded. [`Default`] is diffusers' default, i.e. the SD1 architecture.
///
/// Deserialising it (`serde_json::from_str::<UNetConfig>`) reads a
/// [`RawUNetConfig`] and resolves it with [`UNetConfig::from_raw`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawUNetConfig")]
pub struct UNetConfig {
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<BlockKind>,
    pub up_block_types: Vec<BlockKind>,
    pub block_out_channels: Vec<usize>,
    /// Per level.
    pub layers_per_block: Vec<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    /// Per level.
    pub cross_attention_dim: Vec<usize>,
    /// Per level (SDXL: `[1, 2, 10]`).
    pub transformer_layers_per_block: Vec<usize>,
    /// Per level: the *number of heads* (`num_attention_heads`, else diffusers'
    /// misnamed `attention_head_dim`).
    pub num_attention_heads: Vec<usize>,
    pub use_linear_projection: bool,
    /// Accepted for completeness; attention is always computed in f32 when storage
    /// is f16/bf16, so the flag changes nothing.
    pub upcast_attention: bool,
    /// Width of the time embedding (`time_embedding_dim`, default
    /// `4 · block_out_channels[0]`).
    pub time_embed_dim: usize,
    /// SDXL's `addition_embed_type = "text_time"`.
    pub addition_embed: Option<TextTimeConfig>,
}

impl TryFrom<RawUNetConfig> for UNetConfig {
    type Error = String;

    fn try_from(raw: RawUNetConfig) -> Result<Self, String> {
        Self::from_raw(raw)
    }
}

impl Default for UNetConfig {
    fn default() -> Self {
        // An empty JSON object resolves to diffusers' defaults, which are valid.
        Self::from_raw(RawUNetConfig::default()).unwrap_or_else(|e| unreachable!("{e}"))
    }
}

/// Errors while reading a UNet configuration.
#[derive(Debug, thiserror::Error)]
pub enum UNetConfigError {
    #[error("cannot read UNet config {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("UNet config {path} is not valid JSON for a UNet2DConditionModel: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("UNet config {path}: {message}")]
    Invalid { path: String, message: String },
}

/// Rejects a setting whose value is not one of `allowed` (absent/`null` is
/// always fine: it means diffusers' default, which is supported).
fn require_default<T: PartialEq + std::fmt::Debug>(
    name: &str,
    value: &Option<T>,
    allowed: &[T],
) -> Result<(), String> {
    match value {
        Some(v) if !allowed.contains(v) => {
            let supported = if allowed.is_empty() {
                "only absent or null is supported".to_string()
            } else {
                format!("supported: {allowed:?}")
            };
            Err(format!(
                "`{name}` = {v:?} is not supported by this UNet implementation ({supported})"
            ))
        }
        _ => Ok(()),
    }
}

fn block_kind(name: &str, cross: &str, plain: &str) -> Result<BlockKind, String> {
    if name == cross {
        Ok(BlockKind::CrossAttn)
    } else if name == plain {
        Ok(BlockKind::Plain)
    } else {
        Err(format!(
            "block type `{name}` is not supported (supported: `{cross}`, `{plain}`)"
        ))
    }
}

impl UNetConfig {
    /// Reads and resolves `path` (a diffusers `unet/config.json`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, UNetConfigError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| UNetConfigError::Io {
            path: shown.clone(),
            source,
        })?;
        Self::from_json_str_named(&text, &shown)
    }

    /// Parses and resolves a config from JSON text.
    pub fn from_json_str(text: &str) -> Result<Self, UNetConfigError> {
        Self::from_json_str_named(text, "<json>")
    }

    fn from_json_str_named(text: &str, path: &str) -> Result<Self, UNetConfigError> {
        let raw: RawUNetConfig =
            serde_json::from_str(text).map_err(|source| UNetConfigError::Json {
                path: path.to_string(),
                source,
            })?;
        Self::from_raw(raw).map_err(|message| UNetConfigError::Invalid {
            path: path.to_string(),
            message,
        })
    }

    /// Applies diffusers' defaults and checks that the settings are supported.
    pub fn from_raw(raw: RawUNetConfig) -> Result<Self, String> {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let down_names = raw.down_block_types.clone().unwrap_or_else(|| {
            strings(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ])
        });
        let up_names = raw.up_block_types.clone().unwrap_or_else(|| {
            strings(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ])
        });
        let levels = down_names.len();
        if levels == 0 || up_names.len() != levels {
            return Err(format!(
                "`down_block_types` ({levels}) and `up_block_types` ({}) must be non-empty and \
                 of the same length",
                up_names.len()
            ));
        }
        let down_block_types = down_names
            .iter()
            .map(|n| block_kind(n, "CrossAttnDownBlock2D", "DownBlock2D"))
            .collect::<Result<Vec<_>, _>>()?;
        let up_block_types = up_names
            .iter()
            .map(|n| block_kind(n, "CrossAttnUpBlock2D", "UpBlock2D"))
            .collect::<Result<Vec<_>, _>>()?;
        let block_out_channels = raw
            .block_out_channels
            .clone()
            .unwrap_or_else(|| vec![320, 640, 1280, 1280]);
        if block_out_channels.len() != levels {
            return Err(format!(
                "`block_out_channels` has {} entries but there are {levels} down blocks",
                block_out_channels.len()
            ));
        }
        let mid = raw
            .mid_block_type
            .as_deref()
            .unwrap_or("UNetMidBlock2DCrossAttn");
        if mid != "UNetMidBlock2DCrossAttn" {
            return Err(format!(
                "`mid_block_type` = `{mid}` is not supported (supported: `UNetMidBlock2DCrossAttn`)"
            ));
        }
        if let Some(only) = &raw.only_cross_attention
            && only.expand(levels, "only_cross_attention")?.contains(&true)
        {
            return Err("`only_cross_attention` = true is not supported".to_string());
        }
        require_default("act_fn", &raw.act_fn, &["silu".to_string()])?;
        require_default("dual_cross_attention", &raw.dual_cross_attention, &[false])?;
        require_default("class_embed_type", &raw.class_embed_type, &[])?;
        require_default("num_class_embeds", &raw.num_class_embeds, &[])?;
        require_default("encoder_hid_dim", &raw.encoder_hid_dim, &[])?;
        require_default(
            "resnet_time_scale_shift",
            &raw.resnet_time_scale_shift,
            &["default".to_string()],
        )?;
        require_default("resnet_skip_time_act", &raw.resnet_skip_time_act, &[false])?;
        require_default(
            "resnet_out_scale_factor",
            &raw.resnet_out_scale_factor,
            &[1.0],
        )?;
        require_default(
            "time_embedding_type",
            &raw.time_embedding_type,
            &["positional".to_string()],
        )?;
        require_default("time_embedding_act_fn", &raw.time_embedding_act_fn, &[])?;
        require_default("timestep_post_act", &raw.timestep_post_act, &[])?;
        require_default("time_cond_proj_dim", &raw.time_cond_proj_dim, &[])?;
        require_default("conv_in_kernel", &raw.conv_in_kernel, &[3])?;
        require_default("conv_out_kernel", &raw.conv_out_kernel, &[3])?;
        require_default(
            "attention_type",
            &raw.attention_type,
            &["default".to_string()],
        )?;
        require_default(
            "class_embeddings_concat",
            &raw.class_embeddings_concat,
            &[false],
        )?;
        require_default(
            "mid_block_only_cross_attention",
            &raw.mid_block_only_cross_attention,
            &[false],
        )?;
        require_default("cross_attention_norm", &raw.cross_attention_norm, &[])?;
        if raw
            .reverse_transformer_layers_per_block
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return Err("`reverse_transformer_layers_per_block` is not supported".to_string());
        }

        let per_level = |v: &Option<PerLevel<usize>>, default: usize, name: &str| {
            v.clone()
                .unwrap_or(PerLevel::One(default))
                .expand(levels, name)
        };
        let layers_per_block = per_level(&raw.layers_per_block, 2, "layers_per_block")?;
        let cross_attention_dim = per_level(&raw.cross_attention_dim, 1280, "cross_attention_dim")?;
        let transformer_layers_per_block = per_level(
            &raw.transformer_layers_per_block,
            1,
            "transformer_layers_per_block",
        )?;
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`.
        let heads_source = raw
            .num_attention_heads
            .clone()
            .or_else(|| raw.attention_head_dim.clone());
        let num_attention_heads = per_level(&heads_source, 8, "attention_head_dim")?;
        let norm_num_groups = raw.norm_num_groups.unwrap_or(32);
        for (level, (&c, &heads)) in block_out_channels
            .iter()
            .zip(&num_attention_heads)
            .enumerate()
        {
            if heads == 0 || !c.is_multiple_of(heads) {
                return Err(format!(
                    "level {level}: {c} channels cannot be split into {heads} attention heads"
                ));
            }
            if norm_num_groups == 0 || !c.is_multiple_of(norm_num_groups) {
                return Err(format!(
                    "level {level}: {c} channels cannot be split into {norm_num_groups} groups \
                     (`norm_num_groups`)"
                ));
            }
        }
        let addition_embed = match raw.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => Some(TextTimeConfig {
                addition_time_embed_dim: raw.addition_time_embed_dim.ok_or(
                    "`addition_embed_type` = \"text_time\" needs `addition_time_embed_dim`",
                )?,
                projection_class_embeddings_input_dim: raw
                    .projection_class_embeddings_input_dim
                    .ok_or(
                        "`addition_embed_type` = \"text_time\" needs \
                         `projection_class_embeddings_input_dim`",
                    )?,
            }),
            Some(other) => {
                return Err(format!(
                    "`addition_embed_type` = `{other}` is not supported (supported: `text_time`)"
                ));
            }
        };
        let sample_size = match raw.sample_size {
            None => None,
            Some(PerLevel::One(s)) => Some(s),
            Some(PerLevel::Many(v)) => v.first().copied(),
        };
        Ok(Self {
            sample_size,
            in_channels: raw.in_channels.unwrap_or(4),
            out_channels: raw.out_channels.unwrap_or(4),
            center_input_sample: raw.center_input_sample.unwrap_or(false),
            flip_sin_to_cos: raw.flip_sin_to_cos.unwrap_or(true),
            freq_shift: raw.freq_shift.unwrap_or(0.0),
            down_block_types,
            up_block_types,
            time_embed_dim: raw.time_embedding_dim.unwrap_or(4 * block_out_channels[0]),
            block_out_channels,
            layers_per_block,
            downsample_padding: raw.downsample_padding.unwrap_or(1),
            mid_block_scale_factor: raw.mid_block_scale_factor.unwrap_or(1.0),
            norm_num_groups,
            norm_eps: raw.norm_eps.unwrap_or(1e-5),
            cross_attention_dim,
            transformer_layers_per_block,
            num_attention_heads,
            use_linear_projection: raw.use_linear_projection.unwrap_or(false),
            upcast_attention: raw.upcast_attention.unwrap_or(false),
            addition_embed,
        })
    }
}
