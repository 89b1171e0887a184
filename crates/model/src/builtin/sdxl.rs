//! `builtin:tiny-sdxl`: SDXL base's layout at tiny widths — a CLIP-L-structured
//! first text encoder (quick-GELU, end-token padding), an OpenCLIP-bigG-structured
//! second one (GELU, `text_projection`, `!` padding), a UNet with a plain outer
//! level, two cross-attention levels with linear projections (one and two
//! transformer blocks, as SDXL's 2 and 10 at depth), `text_time` added
//! conditioning (`add_time_ids` + pooled text embedding), and the four-level VAE
//! with SDXL's scale 0.13025. Native resolution 64 px (an 8×8 latent).

use std::collections::HashMap;

use candle_core::{DType, Device, Result};

use super::seeded::{RecordOptions, record};
use super::{
    BUILTIN_TINY_SDXL, Parts, TINY_SEED, TinyWeights, assemble, tiny_text_encoder_config,
    vae_unchecked_shapes,
};
use crate::clip::{ClipTextConfig, ClipTextTransformer, HiddenAct};
use crate::load::Architecture;
use crate::pipeline::{PipelineError, StableDiffusion};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};

/// The VAE encoder's last conv gain that gives unscaled latents a standard
/// deviation near `1 / 0.13025 ≈ 7.7` (see [`super::sd1`]'s 7.5 for 5.5).
const VAE_LATENT_GAIN: f64 = 10.5;

/// The second text encoder: OpenCLIP ViT-bigG's structure as diffusers'
/// `CLIPTextModelWithProjection` holds it (GELU, the real vocabulary, `!` as
/// the pad id, a bias-free `text_projection`) at width 96 with 2 layers.
pub fn tiny_sdxl_text_encoder_2_config() -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 49408,
        hidden_size: 96,
        intermediate_size: 384,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        max_position_embeddings: 77,
        hidden_act: HiddenAct::Gelu,
        layer_norm_eps: 1e-5,
        projection_dim: 64,
        pad_token_id: 0,
        bos_token_id: 49406,
        eos_token_id: 49407,
    }
}

/// The UNet's diffusers `config.json`: SDXL base's settings except the widths
/// (32, 64, 64 instead of 320, 640, 1280), the transformer depths (1, 2 instead
/// of 2, 10), the heads (2, 4, 4 instead of 5, 10, 20), 8 groups instead of 32
/// and a time-id embedding of 8 instead of 256. The context is both text
/// encoders' widths (64 + 96) and the added-conditioning input is six time
/// ids × 8 + the 64-wide pooled embedding.
pub const TINY_SDXL_UNET_CONFIG_JSON: &str = r#"{
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": false,
    "flip_sin_to_cos": true,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 1, 2],
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 8,
    "norm_eps": 1e-5,
    "cross_attention_dim": 160,
    "attention_head_dim": [2, 4, 4],
    "use_linear_projection": true,
    "upcast_attention": false,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 112
}"#;

/// The VAE's diffusers `config.json`: `builtin:tiny`'s VAE with SDXL's scaling
/// factor and its `force_upcast` (SDXL's VAE overflows in f16).
pub const TINY_SDXL_VAE_CONFIG_JSON: &str = r#"{
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
    "scaling_factor": 0.13025,
    "force_upcast": true
}"#;

/// The resolved UNet configuration of [`tiny_sdxl`].
pub(super) fn tiny_sdxl_unet_config() -> std::result::Result<UNetConfig, String> {
    UNetConfig::from_json_str(TINY_SDXL_UNET_CONFIG_JSON).map_err(|e| e.to_string())
}

/// The resolved VAE configuration of [`tiny_sdxl`].
pub(super) fn tiny_sdxl_vae_config() -> std::result::Result<VaeConfig, String> {
    VaeConfig::from_json_str(TINY_SDXL_VAE_CONFIG_JSON).map_err(|e| e.to_string())
}

/// Draws the weights of [`tiny_sdxl`] from `seed` (use [`TINY_SEED`]).
pub fn tiny_sdxl_weights(seed: u64) -> Result<TinyWeights> {
    let te_cfg = tiny_text_encoder_config();
    let te2_cfg = tiny_sdxl_text_encoder_2_config();
    let unet_cfg = tiny_sdxl_unet_config().map_err(candle_core::Error::Msg)?;
    let vae_cfg = tiny_sdxl_vae_config().map_err(candle_core::Error::Msg)?;
    // The second encoder draws from its own stream family so that its keys,
    // which equal the first encoder's, get different weights.
    let te2_seed = seed ^ super::fnv1a("text_encoder_2");

    let te = record(seed, RecordOptions::default(), HashMap::new(), |vb| {
        ClipTextTransformer::new(vb, &te_cfg).map(|_| ())
    })?;
    let te2_options = RecordOptions {
        text_projection: true,
        ..RecordOptions::default()
    };
    let te2 = record(te2_seed, te2_options, HashMap::new(), |vb| {
        ClipTextTransformer::new(vb, &te2_cfg).map(|_| ())
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
        text_encoder_2: Some(te2),
        unet,
        vae,
    })
}

/// The built-in tiny SDXL model (see the module docs), weights stored as
/// `dtype` on `device`. Deterministic: the same call gives bit-identical weights.
pub fn tiny_sdxl(
    dtype: DType,
    device: &Device,
) -> std::result::Result<StableDiffusion, PipelineError> {
    let parts = Parts {
        path: BUILTIN_TINY_SDXL,
        architecture: Architecture::Sdxl,
        layout: "SDXL",
        text_encoder_config: tiny_text_encoder_config(),
        text_encoder_2_config: Some(tiny_sdxl_text_encoder_2_config()),
        unet_config: tiny_sdxl_unet_config(),
        vae_config: tiny_sdxl_vae_config(),
        weights: tiny_sdxl_weights(TINY_SEED),
    };
    assemble(parts, dtype, device)
}
