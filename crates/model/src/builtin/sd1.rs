//! `builtin:tiny`: SD1's layout — a CLIP text encoder with quick-GELU, the
//! real vocabulary and SD1's end-token padding, a UNet whose outer level is a
//! `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D` pair with conv projections
//! and whose inner level is a plain `DownBlock2D` / `UpBlock2D`, a four-level
//! AutoencoderKL (×8 downsampling, 4 latent channels, scaling factor 0.18215,
//! mid-block attention) and the DDPM scaled-linear ε schedule.

use std::collections::HashMap;

use candle_core::{DType, Device, Result};

use super::seeded::{RecordOptions, record};
use super::{BUILTIN_TINY, Parts, TINY_SEED, TinyWeights, assemble, vae_unchecked_shapes};
use crate::clip::{ClipTextConfig, ClipTextTransformer, HiddenAct};
use crate::load::Architecture;
use crate::pipeline::{PipelineError, StableDiffusion};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};

/// The VAE encoder's last conv gain that gives unscaled latents a standard
/// deviation near `1 / 0.18215 ≈ 5.5`, so the UNet trains on unit-scale latents.
const VAE_LATENT_GAIN: f64 = 7.5;

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

/// Draws the weights of [`tiny_sd1`] from `seed` (use [`TINY_SEED`]).
pub fn tiny_sd1_weights(seed: u64) -> Result<TinyWeights> {
    let te_cfg = tiny_text_encoder_config();
    let unet_cfg = tiny_unet_config().map_err(candle_core::Error::Msg)?;
    let vae_cfg = tiny_vae_config().map_err(candle_core::Error::Msg)?;

    let te = record(seed, RecordOptions::default(), HashMap::new(), |vb| {
        ClipTextTransformer::new(vb, &te_cfg).map(|_| ())
    })?;
    let unet = record(seed, RecordOptions::default(), HashMap::new(), |vb| {
        UNet2DConditionModel::new(vb, &unet_cfg).map(|_| ())
    })?;
    let vae_options = RecordOptions {
        latent_gain: VAE_LATENT_GAIN,
        ..RecordOptions::default()
    };
    let vae = record(seed, vae_options, vae_unchecked_shapes(&vae_cfg), |vb| {
        AutoencoderKL::new(vb, &vae_cfg).map(|_| ())
    })?;
    Ok(TinyWeights {
        text_encoder: te,
        text_encoder_2: None,
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
    let parts = Parts {
        path: BUILTIN_TINY,
        architecture: Architecture::Sd1,
        layout: "SD1",
        text_encoder_config: tiny_text_encoder_config(),
        text_encoder_2_config: None,
        unet_config: tiny_unet_config(),
        vae_config: tiny_vae_config(),
        weights: tiny_sd1_weights(TINY_SEED),
    };
    assemble(parts, dtype, device)
}
