//! The configuration of a CLIP text encoder, as transformers writes it in a
//! diffusers `text_encoder/config.json` (`CLIPTextConfig`).

use std::path::Path;

use candle_core::{Error, Result, bail};
use serde::{Deserialize, Serialize};

/// The activation of the MLPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// `x·σ(1.702·x)`: OpenAI's CLIP (SD1's CLIP ViT-L/14).
    QuickGelu,
    /// Exact erf GELU: OpenCLIP (SD2's ViT-H/14, SDXL's bigG).
    Gelu,
}

/// `CLIPTextConfig`. Unknown fields (`architectures`, `torch_dtype`, …) are
/// ignored; missing ones take transformers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    /// Number of token ids (49,408).
    pub vocab_size: usize,
    /// Width of the hidden states (768 for SD1, 1024 for SD2).
    pub hidden_size: usize,
    /// Width of the MLPs' hidden layer.
    pub intermediate_size: usize,
    /// Number of encoder layers (12 for SD1; 23 for SD2, whose 24th is dropped).
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Number of positions (77).
    pub max_position_embeddings: usize,
    /// The MLP activation.
    pub hidden_act: HiddenAct,
    /// Epsilon of every LayerNorm.
    pub layer_norm_eps: f64,
    /// Width of `text_projection` (used only by `CLIPTextModelWithProjection`).
    pub projection_dim: usize,
    /// Pad token id (unused by the model; informational).
    #[serde(deserialize_with = "null_as_default")]
    pub pad_token_id: u32,
    /// Start token id.
    #[serde(deserialize_with = "null_as_default")]
    pub bos_token_id: u32,
    /// End token id. Older configs (SD1, SD2) say 2, which transformers takes to
    /// mean "the end token is the largest id" (see
    /// [`crate::clip::text_encoder::eos_positions`]).
    #[serde(deserialize_with = "null_as_default")]
    pub eos_token_id: u32,
}

/// A `null` in the JSON takes the field's default.
fn null_as_default<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<u32, D::Error> {
    Ok(Option::<u32>::deserialize(d)?.unwrap_or_default())
}

impl Default for ClipTextConfig {
    /// transformers' `CLIPTextConfig()` defaults.
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: HiddenAct::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: 512,
            pad_token_id: 1,
            bos_token_id: 49406,
            eos_token_id: 49407,
        }
    }
}

impl ClipTextConfig {
    /// SD1's text encoder, OpenAI CLIP ViT-L/14 (as in SD1.5's `config.json`).
    pub fn sd1() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            projection_dim: 768,
            bos_token_id: 0,
            eos_token_id: 2,
            ..Self::default()
        }
    }

    /// SD2's text encoder, OpenCLIP ViT-H/14 with its last layer dropped (as in
    /// SD2.1's `config.json`).
    pub fn sd2() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: HiddenAct::Gelu,
            projection_dim: 512,
            bos_token_id: 0,
            eos_token_id: 2,
            ..Self::default()
        }
    }

    /// Parses the text of a `config.json`. A full `CLIPConfig` (with a
    /// `text_config` section) is accepted too.
    pub fn from_json_str(json: &str) -> std::result::Result<Self, serde_json::Error> {
        let value: serde_json::Value = serde_json::from_str(json)?;
        match value.get("text_config") {
            Some(text) if text.is_object() => serde_json::from_value(text.clone()),
            _ => serde_json::from_value(value),
        }
    }

    /// Reads a `text_encoder/config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Msg(format!("cannot read {}: {e}", path.display())))?;
        let config = Self::from_json_str(&text).map_err(|e| {
            Error::Msg(format!(
                "{}: not a CLIP text encoder config: {e}",
                path.display()
            ))
        })?;
        config
            .validate()
            .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    /// Checks the sizes fit together (heads divide the width, nothing is zero).
    pub fn validate(&self) -> Result<()> {
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            bail!(
                "CLIP text config: hidden_size {} is not a positive multiple of \
                 num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            )
        }
        if self.vocab_size == 0 || self.max_position_embeddings == 0 {
            bail!(
                "CLIP text config: vocab_size {} and max_position_embeddings {} must be positive",
                self.vocab_size,
                self.max_position_embeddings
            )
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }
}
