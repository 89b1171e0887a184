//! # sd-lora-train
//!
//! The training side of sd-lora. This crate will hold the typed training config
//! (every option defined once, with its doc comment), the DreamBooth/LoRA
//! training loop with its denoising loss, min-SNR weighting and prior
//! preservation, AdamW and learning-rate schedules, mixed precision, gradient
//! checkpointing, the latent cache, resumable checkpoints and training logs.
//!
//! It drives `sd-lora-model` with samples from `sd-lora-data`; the `sd-lora`
//! binary is a thin command-line front end over it.
