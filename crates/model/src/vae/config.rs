//! The VAE configuration, read from a diffusers `vae/config.json`.
//!
//! Unknown fields are ignored, absent or `null` ones take diffusers' defaults
//! (`AutoencoderKL.__init__`); settings this implementation does not support are
//! rejected with a message naming them.

use std::path::Path;

use serde::Deserialize;

/// `vae/config.json` as written, every field optional.
/// The fields mean what they mean in diffusers.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawVaeConfig {
    pub in_channels: Option<usize>,
    pub out_channels: Option<usize>,
    pub down_block_types: Option<Vec<String>>,
    pub up_block_types: Option<Vec<String>>,
    pub block_out_channels: Option<Vec<usize>>,
    pub layers_per_block: Option<usize>,
    pub act_fn: Option<String>,
    pub latent_channels: Option<usize>,
    pub norm_num_groups: Option<usize>,
    pub sample_size: Option<usize>,
    pub scaling_factor: Option<f64>,
    pub shift_factor: Option<f64>,
    pub force_upcast: Option<bool>,
    pub use_quant_conv: Option<bool>,
    pub use_post_quant_conv: Option<bool>,
    pub mid_block_add_attention: Option<bool>,
}

/// A resolved VAE configuration. [`Default`] is diffusers' default; SD1/SD2 VAEs
/// have `block_out_channels = [128, 256, 512, 512]`, `layers_per_block = 2`.
///
/// Deserialising it reads a [`RawVaeConfig`] and resolves it with
/// [`VaeConfig::from_raw`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawVaeConfig")]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: usize,
    /// Latents are `(z − shift_factor) · scaling_factor` for the UNet.
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    /// diffusers runs this VAE in f32 even in a half-precision pipeline.
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

/// Errors while reading a VAE configuration.
#[derive(Debug, thiserror::Error)]
pub enum VaeConfigError {
    #[error("cannot read VAE config {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("VAE config {path} is not valid JSON for an AutoencoderKL: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("VAE config {path}: {message}")]
    Invalid { path: String, message: String },
}

impl TryFrom<RawVaeConfig> for VaeConfig {
    type Error = String;

    fn try_from(raw: RawVaeConfig) -> Result<Self, String> {
        Self::from_raw(raw)
    }
}

impl Default for VaeConfig {
    fn default() -> Self {
        // An empty JSON object resolves to diffusers' defaults, which are valid.
        Self::from_raw(RawVaeConfig::default()).unwrap_or_else(|e| unreachable!("{e}"))
    }
}

impl VaeConfig {
    /// Reads and resolves `path` (a diffusers `vae/config.json`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, VaeConfigError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| VaeConfigError::Io {
            path: shown.clone(),
            source,
        })?;
        Self::from_json_str_named(&text, &shown)
    }

    /// Parses and resolves a config from JSON text.
    pub fn from_json_str(text: &str) -> Result<Self, VaeConfigError> {
        Self::from_json_str_named(text, "<json>")
    }

    fn from_json_str_named(text: &str, path: &str) -> Result<Self, VaeConfigError> {
        let raw: RawVaeConfig =
            serde_json::from_str(text).map_err(|source| VaeConfigError::Json {
                path: path.to_string(),
                source,
            })?;
        Self::from_raw(raw).map_err(|message| VaeConfigError::Invalid {
            path: path.to_string(),
            message,
        })
    }

    /// Applies diffusers' defaults and checks that the settings are supported.
    pub fn from_raw(raw: RawVaeConfig) -> Result<Self, String> {
        let block_out_channels = raw.block_out_channels.unwrap_or_else(|| vec![64]);
        let levels = block_out_channels.len();
        if levels == 0 {
            return Err("`block_out_channels` is empty".to_string());
        }
        let check_types = |types: &Option<Vec<String>>, name: &str, expected: &str| {
            let Some(types) = types else { return Ok(()) };
            if types.len() != levels {
                return Err(format!(
                    "`{name}` has {} entries but `block_out_channels` has {levels}",
                    types.len()
                ));
            }
            match types.iter().find(|t| t.as_str() != expected) {
                Some(t) => Err(format!(
                    "`{name}` contains `{t}`, which is not supported (supported: `{expected}`)"
                )),
                None => Ok(()),
            }
        };
        check_types(
            &raw.down_block_types,
            "down_block_types",
            "DownEncoderBlock2D",
        )?;
        check_types(&raw.up_block_types, "up_block_types", "UpDecoderBlock2D")?;
        if let Some(act) = &raw.act_fn
            && act != "silu"
        {
            return Err(format!(
                "`act_fn` = `{act}` is not supported (supported: `silu`)"
            ));
        }
        let norm_num_groups = raw.norm_num_groups.unwrap_or(32);
        if let Some(c) = block_out_channels
            .iter()
            .find(|&&c| norm_num_groups == 0 || !c.is_multiple_of(norm_num_groups))
        {
            return Err(format!(
                "{c} channels cannot be split into {norm_num_groups} groups (`norm_num_groups`)"
            ));
        }
        Ok(Self {
            in_channels: raw.in_channels.unwrap_or(3),
            out_channels: raw.out_channels.unwrap_or(3),
            block_out_channels,
            layers_per_block: raw.layers_per_block.unwrap_or(1),
            latent_channels: raw.latent_channels.unwrap_or(4),
            norm_num_groups,
            sample_size: raw.sample_size.unwrap_or(32),
            scaling_factor: raw.scaling_factor.unwrap_or(0.18215),
            shift_factor: raw.shift_factor,
            force_upcast: raw.force_upcast.unwrap_or(true),
            use_quant_conv: raw.use_quant_conv.unwrap_or(true),
            use_post_quant_conv: raw.use_post_quant_conv.unwrap_or(true),
            mid_block_add_attention: raw.mid_block_add_attention.unwrap_or(true),
        })
    }
}
