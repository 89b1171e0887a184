//! `sd-lora bench --train` and `--vae`: what users run, timed.
//!
//! `--train` runs [`crate::trainer::train`] itself — the code of `sd-lora
//! train` — on a real model path and image folder, from a config or the
//! defaults, and records what a user waits for: loading (time, and the peak
//! RSS when it is done), the caching passes before the first step (latents
//! and caption embeddings), every step, and the peak RSS of the whole
//! process. Steps after the warm-up are the steady ones: with the latents
//! cached up front, no step after the first encodes an image. The run writes
//! into a temporary folder (no previews, no periodic checkpoints; the final
//! LoRA file is written as usual, after the timed steps).
//!
//! `--vae` loads only a model's VAE and times encoding one image and decoding
//! one latent at the resolution — what every latent cached, preview and class
//! image costs.
//!
//! `tools/bench_train_reference.py` runs the same two workloads in diffusers +
//! peft; `tools/bench_compare.sh --train/--vae` runs both and prints the
//! ratios (see docs/performance.md).

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use sd_lora_data::Dataset;
use sd_lora_model::load::{Component, ModelSource};
use sd_lora_model::ops::checkpoint;
use sd_lora_model::vae::{AutoencoderKL, VaeConfig};

use crate::config::TrainConfig;
use crate::outputs::{median, peak_rss_bytes};
use crate::trainer::{StepReport, TrainProgress, train};

/// What `sd-lora bench --train` reports (the keys of the reference's JSON).
#[derive(Debug, Clone, Serialize)]
pub struct TrainBenchReport {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub mode: String,
    pub model: String,
    pub resolution: u32,
    pub preset: String,
    pub rank: usize,
    pub alpha: f32,
    pub checkpointing: bool,
    pub dtype: String,
    pub device: String,
    pub threads: usize,
    /// Training images (after the scan).
    pub images: usize,
    /// Elements of the trained LoRA tensors.
    pub lora_params: usize,
    /// Seconds from the start of the run until the model is built with its LoRA.
    pub load_s: f64,
    /// Peak RSS when loading is done.
    pub load_peak_rss_bytes: Option<u64>,
    /// The latent caching pass (0 when nothing was cached up front).
    pub cache_latents_s: f64,
    /// Latents cached up front.
    pub latents: usize,
    /// `cache_latents_s / latents`: one VAE encode at the training resolution.
    pub encode_per_image_s: Option<f64>,
    /// The caption caching pass.
    pub cache_text_s: f64,
    pub steps: usize,
    pub warmup: usize,
    /// Seconds of each timed step.
    pub step_s: Vec<f64>,
    pub median_step_s: f64,
    /// Tensor ops of each timed step: tensors candle created (ops, copies,
    /// views) plus in-place updates (see `sd_lora_model::ops::op_count`). On a
    /// GPU each op that is not a view is at least one kernel launch.
    pub ops_per_step: Vec<u64>,
    /// The in-place part of `ops_per_step` (the last timed step).
    pub in_place_per_step: u64,
    /// Autograd graph nodes of the last timed step's loss.
    pub graph_nodes: usize,
    /// Peak RSS of the whole process (loading, caching, training, saving).
    pub peak_rss_bytes: Option<u64>,
    pub final_loss: Option<f64>,
}

/// Records the phases of a training run.
struct Recorder<'a> {
    start: Instant,
    load_s: Option<f64>,
    load_peak: Option<u64>,
    phase_start: Option<Instant>,
    latents: (f64, usize),
    text: f64,
    steps: Vec<f64>,
    ops: Vec<u64>,
    in_place: u64,
    graph_nodes: usize,
    warmup: usize,
    on_event: &'a mut dyn FnMut(&str),
}

impl TrainProgress for Recorder<'_> {
    fn loaded(&mut self) {
        // The caching phases run inside the load (the UNet is built after
        // them); they are reported on their own.
        let secs = self.start.elapsed().as_secs_f64() - self.latents.0 - self.text;
        self.load_s = Some(secs);
        self.load_peak = peak_rss_bytes();
        (self.on_event)(&format!("loaded in {secs:.1} s"));
    }
    fn prepare(&mut self, what: &str, done: usize, total: usize) {
        if done == 0 {
            self.phase_start = Some(Instant::now());
        }
        if done == total {
            let secs = self.phase_start.map_or(0.0, |t| t.elapsed().as_secs_f64());
            if what.contains("latent") {
                self.latents = (secs, total);
            } else {
                self.text = secs;
            }
            (self.on_event)(&format!("{what}: {total} in {secs:.1} s"));
        }
    }
    fn begin(&mut self, _: usize, _: usize) {}
    fn step(&mut self, r: &StepReport) {
        let warm = r.step <= self.warmup;
        if !warm {
            self.steps.push(r.seconds);
            self.ops.push(r.ops.total());
            self.in_place = r.ops.in_place;
            self.graph_nodes = r.graph_nodes;
        }
        (self.on_event)(&format!(
            "  {} {}/{}: {:.3} s (loss {:.4}, {} ops)",
            if warm { "warm-up" } else { "step" },
            r.step,
            r.total,
            r.seconds,
            r.loss,
            r.ops.total()
        ));
    }
    fn note(&mut self, m: &str) {
        (self.on_event)(m);
    }
    fn end(&mut self) {}
}

/// Runs `cfg` on `ds` for `warmup + steps` steps in a temporary output folder
/// and reports the phases (see the module docs).
pub fn run_train(
    cfg: &TrainConfig,
    ds: &Dataset,
    warmup: usize,
    steps: usize,
    on_event: &mut dyn FnMut(&str),
) -> Result<TrainBenchReport> {
    let tmp = tempfile::tempdir().context("cannot create a temporary output folder")?;
    let mut cfg = cfg.clone();
    cfg.train.steps = warmup + steps;
    cfg.output.dir = tmp.path().to_path_buf();
    cfg.output.save_every = 0;
    cfg.output.sample_prompts.clear();
    let mut rec = Recorder {
        start: Instant::now(),
        load_s: None,
        load_peak: None,
        phase_start: None,
        latents: (0.0, 0),
        text: 0.0,
        steps: Vec::new(),
        ops: Vec::new(),
        in_place: 0,
        graph_nodes: 0,
        warmup,
        on_event,
    };
    let outcome = train(&cfg, ds, None, &mut rec)?;
    let (cache_latents_s, latents) = rec.latents;
    Ok(TrainBenchReport {
        implementation: "sd-lora".into(),
        mode: "train".into(),
        model: cfg.model.path.clone(),
        resolution: cfg.dataset.resolution,
        preset: cfg.network.preset.clone(),
        rank: cfg.network.rank,
        alpha: cfg.network.alpha,
        checkpointing: cfg.train.gradient_checkpointing,
        dtype: format!("{:?}", cfg.model.dtype).to_lowercase(),
        device: cfg.model.device.clone(),
        threads: rayon::current_num_threads(),
        images: ds.images.len(),
        lora_params: outcome.lora_parameters,
        load_s: rec.load_s.unwrap_or(0.0),
        load_peak_rss_bytes: rec.load_peak,
        cache_latents_s,
        latents,
        encode_per_image_s: (latents > 0).then(|| cache_latents_s / latents as f64),
        cache_text_s: rec.text,
        steps,
        warmup,
        median_step_s: median(&rec.steps).unwrap_or(f64::NAN),
        step_s: rec.steps,
        ops_per_step: rec.ops,
        in_place_per_step: rec.in_place,
        graph_nodes: rec.graph_nodes,
        peak_rss_bytes: peak_rss_bytes(),
        final_loss: outcome.final_loss,
    })
}

/// What `sd-lora bench --vae` reports.
#[derive(Debug, Clone, Serialize)]
pub struct VaeBenchReport {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub mode: String,
    pub model: String,
    pub resolution: usize,
    pub threads: usize,
    pub load_s: f64,
    pub encode_s: Vec<f64>,
    pub decode_s: Vec<f64>,
    pub median_encode_s: f64,
    pub median_decode_s: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// Loads the VAE of `model` (f32, `device`) and times `repeat` encodes of a
/// random `resolution`² image and decodes of its latent.
pub fn run_vae(
    model: &str,
    resolution: usize,
    repeat: usize,
    device: &Device,
    on_event: &mut dyn FnMut(&str),
) -> Result<VaeBenchReport> {
    let t0 = Instant::now();
    let source = ModelSource::open(model)?;
    let config = VaeConfig::from_json_str(&source.config(Component::Vae)?.to_string())
        .map_err(|e| anyhow::anyhow!("{model}: VAE config: {e}"))?;
    let vb = source
        .weights(Component::Vae)?
        .clone()
        .into_var_builder(DType::F32, device);
    let vae =
        AutoencoderKL::new(vb, &config).with_context(|| format!("{model}: building the VAE"))?;
    let load_s = t0.elapsed().as_secs_f64();
    let x = Tensor::rand(
        -1f32,
        1f32,
        (1, config.in_channels, resolution, resolution),
        device,
    )?;
    let (mut enc, mut dec) = (Vec::new(), Vec::new());
    checkpoint::no_grad(|| -> Result<()> {
        for i in 0..repeat {
            let t = Instant::now();
            let z = vae.encode(&x)?.mode().clone();
            sync(&z)?;
            enc.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let y = vae.decode(&z)?;
            sync(&y)?;
            dec.push(t.elapsed().as_secs_f64());
            on_event(&format!(
                "  {}/{repeat}: encode {:.3} s, decode {:.3} s",
                i + 1,
                enc[i],
                dec[i]
            ));
        }
        Ok(())
    })?;
    Ok(VaeBenchReport {
        implementation: "sd-lora".into(),
        mode: "vae".into(),
        model: model.to_string(),
        resolution,
        threads: rayon::current_num_threads(),
        load_s,
        median_encode_s: median(&enc).unwrap_or(f64::NAN),
        median_decode_s: median(&dec).unwrap_or(f64::NAN),
        encode_s: enc,
        decode_s: dec,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Waits for `t` to be computed (a GPU runs asynchronously).
fn sync(t: &Tensor) -> Result<()> {
    t.device().synchronize()?;
    Ok(())
}
