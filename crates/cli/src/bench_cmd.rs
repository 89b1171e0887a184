//! `sd-lora bench`: `--train` runs the `train` command itself on a model and an
//! image folder and reports what a user waits for (see
//! `sd_lora_train::bench_pipeline`); `--vae` times one VAE encode and decode;
//! without either, it times LoRA training steps on a full-size SD1.5 UNet with
//! random weights built in memory (`sd_lora_train::bench`). `docs/performance.md`
//! says how to compare each with its PyTorch reference.

use anyhow::{Result, bail};
use clap::Args;
use sd_lora_data::Dataset;
use sd_lora_train::bench::{self, BenchOptions, BenchReport, Precision, StepInfo};
use sd_lora_train::config::{DeviceSpec, TrainConfig};
use std::path::PathBuf;

use crate::train_cmd::TrainArgs;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Benchmark the `train` command itself: load a real model (`--model` or the
    /// config's), cache the latents of a real image folder (`--data`), train
    /// `--warmup` + `--steps` steps with the config's (or the default) settings,
    /// and report load time and memory, caching time, the steady step and the
    /// whole run's peak memory. Without `--train` or `--vae`: the UNet step alone
    /// on random weights built in memory (no model files).
    #[arg(long, conflicts_with = "vae")]
    train: bool,
    /// Benchmark the VAE of `--model`: encode one image and decode one latent at
    /// `--resolution`, `--repeat` times each.
    #[arg(long)]
    vae: bool,
    /// `--train`: the training config (TOML), as for `sd-lora train --config`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// `--train`, `--vae`: the model, a diffusers folder or a `.safetensors` checkpoint.
    #[arg(long, value_name = "PATH")]
    model: Option<String>,
    /// `--train`: the folder of training images (`dataset.subsets[0].path`).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// `--train`: set any config key, as for `sd-lora train --set` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Image side in pixels (square); the latent is resolution/8. A multiple of 8, at least 64.
    /// Default 256; with `--train`, the config's `dataset.resolution` unless given.
    #[arg(long)]
    resolution: Option<usize>,
    /// Timed training steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps before the timed ones (first-touch allocations, caches).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// `--vae`: encodes and decodes timed.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Storage dtype of the frozen UNet weights: f32, f16 or bf16 (LoRA and
    /// optimizer stay f32). On the CPU, f16/bf16 save memory, not time.
    /// With `--train`, the config's `model.dtype` unless given, and also fp8.
    #[arg(long)]
    precision: Option<String>,
    /// Recompute each ResNet, transformer block and upsampler in the backward
    /// instead of keeping their activations (less memory, more time).
    #[arg(long)]
    checkpointing: bool,
    /// Queries per attention chunk on the generic path (GPU, f64). Left out: chunks sized so that
    /// at most 2^22 score values exist at once (attention never keeps its probabilities for the
    /// backward either way). The CPU f32 attention kernel sizes its own blocks and ignores it.
    #[arg(long, value_name = "N")]
    attention_chunk: Option<usize>,
    /// LoRA rank (default 16). Without `--train`, on to_q/to_k/to_v/to_out.0 with
    /// alpha = rank; with `--train`, `network.rank` unless given.
    #[arg(long)]
    rank: Option<usize>,
    /// Where to run: cpu, cuda or cuda:N (default cpu; with `--train`, the config's `model.device`).
    #[arg(long)]
    device: Option<String>,
    /// Seed of the random weights, LoRA initialisation and inputs (with
    /// `--train`, `train.seed` unless given).
    #[arg(long)]
    seed: Option<u64>,
    /// Print one JSON object on standard output instead of a table (progress still goes to stderr).
    #[arg(long)]
    json: bool,
}

/// The device name of a `--device` value, checked against this build.
fn device_name(device: &str) -> Result<String> {
    Ok(match DeviceSpec::parse(device) {
        Some(DeviceSpec::Cpu) => "cpu".to_string(),
        Some(DeviceSpec::Cuda(n)) => {
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "--device {device}: this sd-lora was built without CUDA; build it with `cargo build --release --features cuda -p sd-lora` (see docs/performance.md)"
                )
            }
            format!("cuda:{n}")
        }
        _ => bail!("--device {device:?}: use cpu, cuda or cuda:N"),
    })
}

/// The options and device name, or a one-line error; nothing is built yet.
fn parse(args: &BenchArgs) -> Result<(BenchOptions, String)> {
    if args
        .precision
        .as_deref()
        .is_some_and(|p| p.eq_ignore_ascii_case("fp8"))
    {
        bail!(
            "--precision fp8 applies to `--train` (the train path stores the UNet in fp8); the \
             UNet-only bench takes f32, f16 or bf16"
        );
    }
    let precision = Precision::parse(args.precision.as_deref().unwrap_or("f32"))?;
    let opts = BenchOptions {
        resolution: args.resolution.unwrap_or(256),
        steps: args.steps,
        warmup: args.warmup,
        precision,
        checkpointing: args.checkpointing,
        attention_chunk: args.attention_chunk,
        rank: args.rank.unwrap_or(16),
        seed: args.seed.unwrap_or(0),
    };
    opts.validate()?;
    let device = device_name(args.device.as_deref().unwrap_or("cpu"))?;
    Ok((opts, device))
}

pub fn run(args: &BenchArgs) -> Result<u8> {
    if args.train {
        return run_train(args);
    }
    if args.vae {
        return run_vae(args);
    }
    for (flag, given) in [
        ("--config", args.config.is_some()),
        ("--model", args.model.is_some()),
        ("--data", args.data.is_some()),
        ("--set", !args.sets.is_empty()),
    ] {
        if given {
            bail!(
                "{flag} belongs to `sd-lora bench --train` (or --vae); add --train to benchmark the training run"
            )
        }
    }
    let (opts, device_name) = parse(args)?;
    let device = sd_lora_train::trainer::device_from_name(&device_name)?;
    eprintln!(
        "sd-lora bench: building the SD1.5 UNet ({} storage) with random weights on {device_name} …",
        opts.precision.name()
    );
    let mut on_step = |s: StepInfo| {
        let what = if s.warmup { "warm-up" } else { "step" };
        eprintln!(
            "  {what} {}/{}: {:.3} s (loss {:.4})",
            s.index + 1,
            s.total,
            s.seconds,
            s.loss
        );
    };
    let report = bench::run_sd15(&opts, &device, &device_name, &mut on_step)?;
    if args.json {
        crate::emit(&(serde_json::to_string(&report)? + "\n"))?;
    } else {
        crate::emit(&render(&report))?;
    }
    Ok(0)
}

/// `sd-lora bench --train`: the config as `sd-lora train` resolves it, with
/// the bench's flags as overrides, run by the trainer itself.
fn run_train(args: &BenchArgs) -> Result<u8> {
    if args.attention_chunk.is_some() {
        bail!(
            "--attention-chunk applies to the UNet-only bench; `--train` runs attention as `train` does"
        )
    }
    if args.steps == 0 {
        bail!("--steps 0: at least one timed step is needed")
    }
    let mut sets = Vec::new();
    if let Some(p) = &args.precision {
        // fp8 storage exists on the `train` path only.
        let name = if p.eq_ignore_ascii_case("fp8") {
            "fp8"
        } else {
            Precision::parse(p)?.name()
        };
        sets.push(format!("model.dtype=\"{name}\""));
    }
    sets.extend(args.sets.iter().cloned());
    let train_args = TrainArgs {
        config: args.config.clone(),
        model: args.model.clone(),
        data: args.data.clone(),
        rank: args.rank,
        resolution: args.resolution.map(|r| r as u32),
        seed: args.seed,
        gradient_checkpointing: args.checkpointing,
        device: args.device.clone(),
        sets,
        ..Default::default()
    };
    let mut cfg = TrainConfig::load(args.config.as_deref(), &train_args.overrides())?;
    if cfg.model.is_builtin() && args.model.is_none() {
        eprintln!(
            "note: no --model given: benchmarking the built-in tiny model; pass --model with a real model for meaningful figures"
        );
    }
    if let Some(d) = &args.data
        && !d.is_dir()
    {
        bail!("--data {}: no such folder", d.display());
    }
    // The model opens (headers only) before the images are scanned, as in `train`.
    let facts = crate::train_cmd::model_facts(&cfg)?;
    if let Some(note) = cfg.apply_model_defaults(facts.native_resolution()) {
        eprintln!("{note}");
        cfg.validate()?;
    }
    let ds = Dataset::scan(&cfg.dataset)?;
    if !ds.has_images() {
        let folders: Vec<String> = cfg
            .dataset
            .subsets
            .iter()
            .map(|s| s.path.display().to_string())
            .collect();
        bail!(
            "no usable images in {}; put PNG/JPEG/WebP images there, and run `sd-lora check-data` on it for the reasons",
            folders.join(", ")
        );
    }
    eprintln!(
        "sd-lora bench --train: {} at {} px, {} LoRA rank {} on {}, {} images, {} warm-up + {} timed steps",
        cfg.model.path,
        cfg.dataset.resolution,
        cfg.network.preset,
        cfg.network.rank,
        cfg.model.device,
        ds.images.len(),
        args.warmup,
        args.steps
    );
    let mut on_event = |m: &str| eprintln!("{m}");
    let report = sd_lora_train::bench_pipeline::run_train(
        &cfg,
        &ds,
        args.warmup,
        args.steps,
        &mut on_event,
    )?;
    if args.json {
        crate::emit(&(serde_json::to_string(&report)? + "\n"))?;
    } else {
        let steps: Vec<String> = report.step_s.iter().map(|s| format!("{s:.3}")).collect();
        let rows = [
            (
                "load".to_string(),
                format!(
                    "{:.1} s, peak RSS {}",
                    report.load_s,
                    gb(report.load_peak_rss_bytes)
                ),
            ),
            (
                "cache latents".into(),
                format!(
                    "{:.1} s for {} ({} per image)",
                    report.cache_latents_s,
                    report.latents,
                    report
                        .encode_per_image_s
                        .map_or("-".into(), |s| format!("{s:.2} s"))
                ),
            ),
            (
                "cache captions".into(),
                format!("{:.1} s", report.cache_text_s),
            ),
            (
                "median step".into(),
                format!(
                    "{:.3} s   (steps: {} s)",
                    report.median_step_s,
                    steps.join(", ")
                ),
            ),
            (
                "ops per step".into(),
                format!(
                    "{}   ({} in place; {} graph nodes)",
                    report
                        .ops_per_step
                        .last()
                        .map_or("-".into(), |n| n.to_string()),
                    report.in_place_per_step,
                    report.graph_nodes
                ),
            ),
            ("peak RSS".into(), gb(report.peak_rss_bytes)),
        ];
        let mut out = String::new();
        for (k, v) in rows {
            out += &format!("  {k:<16} {v}\n");
        }
        crate::emit(&out)?;
    }
    Ok(0)
}

/// `sd-lora bench --vae`.
fn run_vae(args: &BenchArgs) -> Result<u8> {
    let Some(model) = &args.model else {
        bail!("--vae needs --model PATH (a diffusers folder or a .safetensors checkpoint)")
    };
    let resolution = args.resolution.unwrap_or(256);
    if resolution < 64 || !resolution.is_multiple_of(8) {
        bail!("--resolution {resolution}: must be a multiple of 8 and at least 64")
    }
    if args.repeat == 0 {
        bail!("--repeat 0: at least one encode and decode is needed")
    }
    let device_name = device_name(args.device.as_deref().unwrap_or("cpu"))?;
    let device = sd_lora_train::trainer::device_from_name(&device_name)?;
    let mut on_event = |m: &str| eprintln!("{m}");
    let report = sd_lora_train::bench_pipeline::run_vae(
        model,
        resolution,
        args.repeat,
        &device,
        &mut on_event,
    )?;
    if args.json {
        crate::emit(&(serde_json::to_string(&report)? + "\n"))?;
    } else {
        crate::emit(&format!(
            "  VAE at {resolution} px: encode {:.3} s, decode {:.3} s (median of {}), load {:.1} s, peak RSS {}\n",
            report.median_encode_s,
            report.median_decode_s,
            args.repeat,
            report.load_s,
            gb(report.peak_rss_bytes)
        ))?;
    }
    Ok(0)
}

fn gb(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| format!("{:.2} GB", b as f64 / 1e9))
}

/// The human-readable table.
fn render(r: &BenchReport) -> String {
    let steps: Vec<String> = r.step_s.iter().map(|s| format!("{s:.3}")).collect();
    let chunk = r
        .attention_chunk
        .map_or("automatic attention chunks".into(), |c| {
            format!("attention chunk {c}")
        });
    let rows = [
        (
            "median step".to_string(),
            format!("{:.3} s   (steps: {} s)", r.median_step_s, steps.join(", ")),
        ),
        (
            "phases (median)".into(),
            format!(
                "forward {:.3} s, backward {:.3} s, optimizer {:.3} s",
                r.phases.forward_s, r.phases.backward_s, r.phases.optimizer_s
            ),
        ),
        ("peak RSS".into(), gb(r.peak_rss_bytes)),
        ("peak device memory".into(), gb(r.peak_device_bytes)),
        (
            "throughput".into(),
            format!("{:.1} GFLOP/s (nominal)", r.gflops),
        ),
        (
            "FLOP / step".into(),
            format!("{:.1} GFLOP", r.flop_per_step as f64 / 1e9),
        ),
        ("build".into(), format!("{:.1} s", r.build_s)),
        (
            "parameters".into(),
            format!("{} LoRA, {} frozen", r.lora_params, r.frozen_params),
        ),
    ];
    let mut out = format!(
        "{} at {}×{} px (latent {:?}), {} storage, checkpointing {}, {chunk}, rank {}, {} ({} threads), {} warm-up + {} timed steps\n",
        r.model,
        r.resolution,
        r.resolution,
        r.latent,
        r.precision.name(),
        if r.checkpointing { "on" } else { "off" },
        r.rank,
        r.device,
        r.threads,
        r.warmup,
        r.steps
    );
    for (k, v) in rows {
        out += &format!("  {k:<20} {v}\n");
    }
    out
}
