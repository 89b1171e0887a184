//! # sd-lora-train
//!
//! The training side of sd-lora.
//!
//! - [`config`]: the typed training config (every option defined once, with
//!   its doc comment) and [`overrides`] for `--set KEY=VALUE`.
//! - [`trainer`]: the DreamBooth/LoRA training loop — one step reads top to
//!   bottom — with checkpoints and [`state`] for exact resume.
//! - [`loss`], [`noise`]: noising, ε/v targets, min-SNR and prior weights,
//!   seeded noise; [`optim`], [`lr`]: AdamW, AdamW8bit, Prodigy, Adafactor
//!   and Lion with parameter groups,
//!   accumulation, clipping, and learning-rate schedules.
//! - [`latents`]: VAE latent and text-embedding caches (memory or disk),
//!   filled before the first step by [`prepare`], which then releases the
//!   frozen encoders; [`rare_token`]: the DreamBooth identifier check.
//! - [`bench`]: the UNet training step alone against PyTorch;
//!   [`bench_pipeline`]: the `train` command itself and the VAE, timed.
//! - [`validation`]: held-out images evaluated at fixed noise during the run.
//! - [`outputs`], [`progress`]: loss log, plot, summary, progress display;
//!   [`png_meta`]: PNGs with A1111 `parameters` metadata, preview grids;
//!   [`generate`]: text-to-image generation (prompts, guidance, samplers).
//!
//! It drives `sd-lora-model` with samples from `sd-lora-data`; the `sd-lora`
//! binary is a thin command-line front end over it.

mod adamw_cpu;
pub mod bench;
pub mod bench_pipeline;
pub mod class_images;
pub mod config;
pub mod events;
pub mod generate;
pub mod kohya_dataset;
pub mod latents;
pub mod loss;
pub mod lr;
pub mod masks;
pub mod noise;
pub mod optim;
pub mod outputs;
pub mod overrides;
pub mod png_meta;
pub mod prepare;
pub mod previews;
pub mod progress;
pub mod rare_token;
pub mod state;
pub mod trainer;
pub mod validation;
