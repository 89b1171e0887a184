//! # sd-lora-model
//!
//! Tensors in, tensors out. This crate will hold everything that computes:
//! operations whose backward pass is correct and economical (frozen Linear and
//! Conv2d, softmax, LayerNorm, GroupNorm, attention), the CLIP tokenizer and text
//! encoders, the UNet (SD1/SD2/SDXL), the VAE, noise schedules and samplers,
//! weight loaders for diffusers folders and single-file checkpoints, and the LoRA
//! layers and file formats.
//!
//! So far it holds the first of these, the [`ops`] module: frozen Linear and
//! Conv2d layers whose backward computes only the input gradient, and softmax,
//! LayerNorm, GroupNorm, GELU/quick-GELU/GEGLU/SiLU and attention with a working
//! backward (several of candle-nn's versions silently drop the gradient — see the
//! module docs).
//!
//! It knows nothing of datasets or of the training loop: `sd-lora-train` drives
//! it, and `sd-lora-data` is independent of it.

pub mod blocks;
pub mod clip;
pub mod load;
pub mod ops;
pub mod schedule;
pub mod unet;
pub mod vae;
