//! CLIP: the tokenizer and the text encoders of Stable Diffusion.
//!
//! - [`tokenizer::ClipTokenizer`]: text → token ids, identical to transformers'
//!   `CLIPTokenizer`, from a diffusers `tokenizer/` folder or from the CLIP
//!   vocabulary embedded in the binary ([`vocab`]), with SD1-style (end token)
//!   and SD2/SDXL-style (`!`) padding to 77 tokens.
//! - [`config::ClipTextConfig`]: a transformers `text_encoder/config.json`.
//! - [`text_encoder::ClipTextTransformer`]: the text encoder (SD1's CLIP ViT-L
//!   with quick-GELU, SD2's OpenCLIP ViT-H with GELU), returning every hidden
//!   state and the pooled output, with clip skip, differentiable end to end.

pub mod config;
pub mod text_encoder;
pub mod tokenizer;
pub mod vocab;

pub use config::{ClipTextConfig, HiddenAct};
pub use text_encoder::{ClipTextOutput, ClipTextTransformer};
pub use tokenizer::{ClipTokenizer, MAX_LENGTH, PadStyle};
