//! Before the first step: every latent and caption conditioning the run will
//! use is computed once, then the frozen encoders that produced them are
//! dropped from memory.
//!
//! * **Latents** (`train.cache_latents = "memory"` or `"disk"`) with
//!   `dataset.crop = "center"`: each image is encoded as it will be trained —
//!   its bucket's centred crop, and also mirrored when its subset has
//!   `flip = true` (the scheme kohya uses with `flip_aug` and cached latents).
//!   Then the VAE encoder is released. With `crop = "random"` every step may
//!   draw a new crop, so there is nothing to encode up front (kohya refuses
//!   cached latents with random crops); latents are then encoded when drawn,
//!   cached per crop, and the encoder stays loaded. With `cache_latents =
//!   "none"` every sample is encoded every time it is drawn.
//! * **Text embeddings** when the text encoder is not trained and captions are
//!   fixed (no `shuffle_caption`, no `caption_tag_dropout_rate`; caption
//!   dropout only adds the empty caption): every caption is encoded, then the
//!   text encoder is released — unless previews need it for their prompts.
//!
//! The text pass runs first, so its encoders are gone before the VAE's
//! working memory peaks. Each pass reports its progress (a bar with an ETA), and Ctrl-C stops it
//! between two images: latents already written to the disk cache are reused
//! by the next run.

use std::collections::BTreeSet;

use anyhow::{Result, bail};
use candle_core::Device;
use sd_lora_data::{CropMode, Dataset};
use sd_lora_model::pipeline::StableDiffusion;

use crate::config::TrainConfig;
use crate::latents::{LatentCache, TextEmbeddingCache};
use crate::trainer::TrainProgress;

/// What the preparation did, for the run's log and its tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prepared {
    /// Latents encoded or read before training (0 when not done up front).
    pub latents: usize,
    /// Of those, read from the disk cache.
    pub latents_from_disk: usize,
    /// Distinct captions encoded before training (0 when not done up front).
    pub captions: usize,
    /// The VAE encoder was dropped.
    pub vae_encoder_released: bool,
    /// The text encoder was dropped.
    pub text_encoder_released: bool,
}

/// Whether every latent a run draws is known before it starts.
pub fn latents_up_front(cfg: &TrainConfig) -> bool {
    cfg.train.cache_latents.is_cached() && cfg.dataset.crop == CropMode::Center
}

/// The captions a run will condition on, when they are known before it
/// starts (the text encoder not trained, no caption shuffling or tag
/// dropout); `None` otherwise.
pub fn fixed_captions(cfg: &TrainConfig, ds: &Dataset) -> Option<BTreeSet<String>> {
    if cfg.network.train_text_encoder {
        return None;
    }
    let mut captions = BTreeSet::new();
    for e in &ds.images {
        let ops = &ds.subsets[e.subset].caption_ops;
        if ops.shuffle || ops.tag_dropout_rate > 0.0 {
            return None;
        }
        if ops.caption_dropout_rate > 0.0 {
            captions.insert(String::new());
        }
        captions.insert(e.caption.clone());
    }
    Some(captions)
}

/// Fills the caches before training and releases what is no longer needed
/// (see the module docs). `keep_text_encoder`: previews will encode prompts.
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    cfg: &TrainConfig,
    ds: &Dataset,
    sd: &mut StableDiffusion,
    device: &Device,
    latents: &mut LatentCache,
    text: &mut TextEmbeddingCache,
    keep_text_encoder: bool,
    progress: &mut dyn TrainProgress,
    stop: &dyn Fn() -> bool,
) -> Result<Prepared> {
    let mut done = Prepared::default();
    // Text first: releasing the text encoders before the VAE encodes keeps
    // them out of the VAE's peak (SDXL's two encoders are 0.8 B parameters).
    if let Some(captions) = fixed_captions(cfg, ds) {
        let total = captions.len();
        progress.prepare("caching text embeddings", 0, total);
        for (n, caption) in captions.iter().enumerate() {
            text.get_or_encode(sd, caption, cfg.model.clip_skip)?;
            progress.prepare("caching text embeddings", n + 1, total);
        }
        done.captions = total;
        if !keep_text_encoder {
            sd.release_text_encoder()?;
            done.text_encoder_released = true;
        }
    }
    if latents_up_front(cfg) {
        let variants: Vec<(usize, bool)> = ds
            .images
            .iter()
            .enumerate()
            .flat_map(|(i, e)| {
                let flip = ds.subsets[e.subset].flip;
                std::iter::once((i, false)).chain(flip.then_some((i, true)))
            })
            .collect();
        let total = variants.len();
        let scaling = sd.vae_config.scaling_factor;
        let disk_before = latents.disk_hits();
        progress.prepare("caching latents", 0, total);
        for (n, &(image, flipped)) in variants.iter().enumerate() {
            if stop() {
                bail!(
                    "interrupted while caching latents ({n} of {total} done){}",
                    if cfg.train.cache_latents.is_disk() {
                        "; the disk cache keeps them for the next run"
                    } else {
                        ""
                    }
                );
            }
            let sample = ds
                .load_variant(image, flipped)
                .map_err(|p| anyhow::anyhow!("{p}"))?;
            latents.get_or_encode(&sd.vae, scaling, &sample, &ds.images[image].path, device)?;
            progress.prepare("caching latents", n + 1, total);
        }
        done.latents = total;
        done.latents_from_disk = latents.disk_hits() - disk_before;
        sd.vae.release_encoder();
        done.vae_encoder_released = true;
    }
    Ok(done)
}
