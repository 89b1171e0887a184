//! `sd-lora bench`: time LoRA training steps on a full-size SD1.5 UNet with
//! random weights (no download) and report speed and peak memory; see
//! `sd_lora_train::bench` for the workload and `docs/performance.md` for how to
//! compare it with the PyTorch reference.

use anyhow::{Result, bail};
use clap::Args;
use sd_lora_train::bench::{self, BenchOptions, BenchReport, Precision, StepInfo};
use sd_lora_train::config::DeviceSpec;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Image side in pixels (square); the latent is resolution/8. A multiple of 8, at least 64.
    #[arg(long, default_value_t = 256)]
    resolution: usize,
    /// Timed training steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps before the timed ones (first-touch allocations, caches).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Storage dtype of the frozen UNet weights: f32, f16 or bf16 (LoRA and
    /// optimizer stay f32). On the CPU, f16/bf16 save memory, not time.
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Recompute each ResNet, transformer block and upsampler in the backward
    /// instead of keeping their activations (less memory, more time).
    #[arg(long)]
    checkpointing: bool,
    /// Queries per attention chunk. Left out: chunks sized so that at most 2^22 score values exist
    /// at once (attention never keeps its probabilities for the backward either way).
    #[arg(long, value_name = "N")]
    attention_chunk: Option<usize>,
    /// LoRA rank on to_q/to_k/to_v/to_out.0 (alpha = rank).
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Where to run: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Seed of the random weights, LoRA initialisation and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object on standard output instead of a table (progress still goes to stderr).
    #[arg(long)]
    json: bool,
}

/// The options and device name, or a one-line error; nothing is built yet.
fn parse(args: &BenchArgs) -> Result<(BenchOptions, String)> {
    let precision = Precision::parse(&args.precision)?;
    let opts = BenchOptions {
        resolution: args.resolution,
        steps: args.steps,
        warmup: args.warmup,
        precision,
        checkpointing: args.checkpointing,
        attention_chunk: args.attention_chunk,
        rank: args.rank,
        seed: args.seed,
    };
    opts.validate()?;
    let device = match DeviceSpec::parse(&args.device) {
        Some(DeviceSpec::Cpu) => "cpu".to_string(),
        Some(DeviceSpec::Cuda(n)) => {
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "--device {}: this sd-lora was built without CUDA; build it with `cargo build --release --features cuda -p sd-lora` (see docs/performance.md)",
                    args.device
                )
            }
            format!("cuda:{n}")
        }
        _ => bail!("--device {:?}: use cpu, cuda or cuda:N", args.device),
    };
    Ok((opts, device))
}

pub fn run(args: &BenchArgs) -> Result<u8> {
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
