//! # sd-lora-model
//!
//! Tensors in, tensors out: everything that computes, with forward *and*
//! backward right (checked against diffusers/transformers on fixtures and
//! against finite differences).
//!
//! - [`ops`]: operations with a correct, economical backward — frozen Linear
//!   and Conv2d that compute only the input gradient, softmax, LayerNorm,
//!   GroupNorm, GELU/quick-GELU/GEGLU/SiLU and (chunked) attention. Several of
//!   candle-nn's versions silently drop the gradient; see the module docs.
//! - [`clip`]: the CLIP tokenizer (embedded vocabulary or a model's own) and
//!   the text encoders (SD1 CLIP-L, SD2 OpenCLIP-H, SDXL's CLIP-L + OpenCLIP-bigG)
//!   with clip-skip.
//! - [`blocks`], [`unet`], [`vae`]: ResNet/transformer building blocks, the
//!   UNet2DConditionModel (per-sample timesteps, block-by-block steps for
//!   checkpointing, SDXL hooks) and the AutoencoderKL.
//! - [`load`]: diffusers folders and single-file LDM/sgm checkpoints (SD1.x/SD2.x/SDXL),
//!   pickles refused, exact parameter counts for `sd-lora inspect`.
//! - [`lora`]: LoRA adapters on any frozen Linear/Conv2d (presets and
//!   patterns, attach, merge), and LoRA files: kohya (default), PEFT and
//!   diffusers formats, read, written, validated against a model.
//! - [`schedule`]: the DDPM training schedule and SNR weights.
//! - [`pipeline`]: all of the above assembled from one model path.
//! - [`conditioning`]: the model-family seam (SD1, SD2, SDXL): text →
//!   context and added conditioning, the UNet's prediction, VAE geometry.
//! - [`prompt`]: A1111 prompt weights `(word:1.2)` and long prompts in chunks.
//! - [`sampling`]: DDIM, Euler, Euler ancestral and DPM++ 2M (Karras)
//!   samplers from the model's scheduler config.
//!
//! Module structs and fields mirror checkpoint key paths
//! (`down_blocks[i].attentions[j].transformer_blocks[k].attn1.to_q`), and every
//! layer is a public field, so LoRA can wrap any of them.
//!
//! It knows nothing of datasets or of the training loop: `sd-lora-train` drives
//! it, and `sd-lora-data` is independent of it.

pub mod atomic_file;
pub mod blocks;
pub mod builtin;
pub mod clip;
pub mod conditioning;
pub mod device_memory;
pub mod load;
pub mod lora;
pub mod ops;
pub mod pipeline;
pub mod prompt;
pub mod sampling;
pub mod schedule;
pub mod storage;
pub mod unet;
pub mod vae;
