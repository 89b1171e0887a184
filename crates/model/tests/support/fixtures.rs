//! The committed fixture models (`tests/fixtures`, README there): where they
//! are, the load options their single files need, and the relative error the
//! parity tests compare with. Each test binary uses a different part of it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use sd_lora_model::load::{AttentionHeads, Component, LoadOptions, Prediction};
use serde_json::json;

/// `tests/fixtures` of the workspace.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// What the tiny fixtures chose that weights cannot show (README "Model configurations"):
/// 4 norm groups, sample sizes 8 / 32, 4 text heads, and the UNet heads.
pub fn tiny_options(unet_heads: AttentionHeads, prediction: Option<Prediction>) -> LoadOptions {
    let mut options = LoadOptions {
        prediction,
        unet_attention_heads: Some(unet_heads),
        text_encoder_heads: Some(4),
        ..LoadOptions::default()
    };
    for (component, sample_size) in [(Component::Unet, 8), (Component::Vae, 32)] {
        let mut m = serde_json::Map::new();
        m.insert("norm_num_groups".into(), json!(4));
        m.insert("sample_size".into(), json!(sample_size));
        options.config_overrides.insert(component, m);
    }
    options
}

/// max |a − b| / max |b|, both read as f32 (the shapes must agree).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    assert_eq!(a.dims(), b.dims());
    let max = |t: Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    max((&a - &b).unwrap()) / max(b).max(1e-12)
}
