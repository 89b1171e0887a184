//! Before the first step: which latents and caption embeddings are computed
//! up front, which encoders are released after, and that training then runs
//! from the caches alone (the released encoders are never touched again).

use candle_core::Device;
use sd_lora_data::Dataset;
use sd_lora_train::config::TrainConfig;
use sd_lora_train::latents::{LatentCache, TextEmbeddingCache};
use sd_lora_train::prepare::{Prepared, prepare};
use sd_lora_train::trainer::{StepReport, TrainProgress, load_model, train};
use std::path::Path;

mod common;

fn config(out: &Path, extra: &[&str]) -> TrainConfig {
    let mut sets = common::tiny_run_sets(out);
    sets.push("train.steps=3".into());
    sets.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load(None, &sets).unwrap()
}

/// Records what the trainer reports.
#[derive(Default)]
struct Log {
    prepared: Vec<(String, usize, usize)>,
    notes: Vec<String>,
    steps: usize,
}

impl TrainProgress for Log {
    fn prepare(&mut self, what: &str, done: usize, total: usize) {
        self.prepared.push((what.to_string(), done, total));
    }
    fn begin(&mut self, _: usize, _: usize) {}
    fn step(&mut self, r: &StepReport) {
        assert!(r.loss.is_finite());
        self.steps += 1;
    }
    fn note(&mut self, m: &str) {
        self.notes.push(m.to_string());
    }
    fn end(&mut self) {}
}

/// Runs `prepare` on the tiny model with `cfg`; returns what it did and the
/// model afterwards.
fn run(
    cfg: &TrainConfig,
    keep_text_encoder: bool,
) -> (
    Prepared,
    sd_lora_model::pipeline::StableDiffusion,
    LatentCache,
    Log,
) {
    let ds = Dataset::scan(&cfg.dataset).unwrap();
    let mut sd = load_model(cfg, &Device::Cpu).unwrap();
    let mut latents = LatentCache::new(None, "builtin:tiny");
    let mut text = TextEmbeddingCache::new();
    let mut log = Log::default();
    let done = prepare(
        cfg,
        &ds,
        &mut sd,
        &Device::Cpu,
        &mut latents,
        &mut text,
        keep_text_encoder,
        &mut log,
        &|| false,
    )
    .unwrap();
    (done, sd, latents, log)
}

#[test]
fn centre_crops_are_encoded_up_front_and_the_encoders_released() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &[]);
    let images = Dataset::scan(&cfg.dataset).unwrap().images.len();
    let (done, sd, latents, log) = run(&cfg, false);
    assert_eq!(done.latents, images);
    assert_eq!(latents.len(), images);
    assert!(done.vae_encoder_released && sd.vae.encoder.is_none());
    // The decoder was built by the built-in model and is not the trainer's
    // business here; the text encoder is gone.
    assert!(done.text_encoder_released && sd.text_encoder.is_released());
    assert!(done.captions >= 1);
    // Progress: 0 first, total last, for each pass.
    let latent_calls: Vec<_> = log
        .prepared
        .iter()
        .filter(|(w, _, _)| w == "caching latents")
        .collect();
    assert_eq!(latent_calls.first().map(|c| c.1), Some(0));
    assert_eq!(
        latent_calls.last().map(|c| (c.1, c.2)),
        Some((images, images))
    );
    assert_eq!(latent_calls.len(), images + 1);
    // The released parts say why they cannot be used.
    let px =
        candle_core::Tensor::zeros((1, 3, 64, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = sd.vae.encode(&px).unwrap_err().to_string();
    assert!(e.contains("released"), "{e}");
    let ids = candle_core::Tensor::zeros((1, 77), candle_core::DType::U32, &Device::Cpu).unwrap();
    let e = sd
        .text_encoder
        .forward_with_clip_skip(&ids, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("released"), "{e}");
}

#[test]
fn flipped_subsets_cache_both_variants() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &["dataset.subsets[0].flip=true"]);
    let images = Dataset::scan(&cfg.dataset).unwrap().images.len();
    let (done, _, latents, _) = run(&cfg, false);
    assert_eq!(done.latents, 2 * images);
    assert_eq!(latents.len(), 2 * images);
}

#[test]
fn random_crops_and_no_cache_keep_the_vae_encoder() {
    let tmp = tempfile::tempdir().unwrap();
    for extra in ["dataset.crop=\"random\"", "train.cache_latents=\"none\""] {
        let cfg = config(tmp.path(), &[extra]);
        let (done, sd, latents, _) = run(&cfg, false);
        assert_eq!(done.latents, 0, "{extra}");
        assert!(latents.is_empty(), "{extra}");
        assert!(
            !done.vae_encoder_released && sd.vae.encoder.is_some(),
            "{extra}"
        );
    }
}

#[test]
fn changing_captions_previews_and_a_trained_text_encoder_keep_it() {
    let tmp = tempfile::tempdir().unwrap();
    for extra in [
        "dataset.subsets[0].shuffle_caption=true",
        "dataset.subsets[0].caption_tag_dropout_rate=0.1",
        "network.train_text_encoder=true",
    ] {
        let cfg = config(tmp.path(), &[extra]);
        let (done, sd, _, _) = run(&cfg, false);
        assert_eq!(done.captions, 0, "{extra}");
        assert!(!sd.text_encoder.is_released(), "{extra}");
    }
    // Caption dropout only adds the empty caption.
    let cfg = config(tmp.path(), &["dataset.subsets[0].caption_dropout_rate=0.5"]);
    let (without, _, _, _) = run(&config(tmp.path(), &[]), false);
    let (done, sd, _, _) = run(&cfg, false);
    assert_eq!(done.captions, without.captions + 1);
    assert!(sd.text_encoder.is_released());
    // Previews encode their prompts later: the text encoder stays.
    let (done, sd, _, _) = run(&config(tmp.path(), &[]), true);
    assert!(done.captions > 0 && !done.text_encoder_released);
    assert!(!sd.text_encoder.is_released());
}

/// The whole run trains from the caches: with every option that releases an
/// encoder, and with those that keep them.
#[test]
fn training_runs_from_the_caches() {
    for extra in [
        &[][..],
        &[
            "dataset.subsets[0].flip=true",
            "dataset.subsets[0].caption_dropout_rate=0.3",
        ][..],
        &["dataset.crop=\"random\""][..],
        &["train.cache_latents=\"none\""][..],
        &["network.train_text_encoder=true"][..],
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), extra);
        let ds = Dataset::scan(&cfg.dataset).unwrap();
        let mut log = Log::default();
        let outcome = train(&cfg, &ds, None, &mut log).unwrap();
        assert_eq!(outcome.steps, 3, "{extra:?}");
        assert_eq!(log.steps, 3, "{extra:?}");
        assert!(outcome.lora_file.is_file(), "{extra:?}");
    }
}
