//! `sd-lora bench`: the LoRA training step of a full-size SD1.5 UNet, timed.
//!
//! The workload (mirrored by `tools/bench_reference.py` in PyTorch, so the two
//! can be compared on one machine — see `docs/performance.md`):
//!
//! - a UNet with SD1.5's exact configuration ([`SD15_UNET_CONFIG_JSON`]) and
//!   random weights drawn here (no download), stored as f32, f16 or bf16;
//! - LoRA (rank `r`, alpha `r`) on `to_q`, `to_k`, `to_v`, `to_out.0` of every
//!   attention of the UNet (the `attention` preset), trained by our AdamW;
//! - batch 1: random latents `[1, 4, res/8, res/8]`, random text embeddings
//!   `[1, 77, 768]`, a random timestep, MSE against random noise (ε target);
//! - `warmup` untimed steps, then `steps` timed ones. A step is forward, loss,
//!   backward ([`sd_lora_model::ops::checkpoint::backward`], which also serves
//!   gradient checkpointing) and the optimizer update; on a GPU the clock stops
//!   after a device synchronisation.
//!
//! Reported: seconds per step (and the median), peak RSS, peak GPU memory in
//! use (sampled after every step), and a nominal FLOP count of the step with
//! the throughput it implies. The FLOPs are counted by [`flops`] during the
//! forward of the first step: `2·(linear + conv) + 3·attention`, because the
//! backward of a frozen layer computes only the input gradient (one more
//! matmul/conv of the same size) while attention's backward has four matmuls
//! for its two. The count is the same with checkpointing on (its recomputation
//! is overhead, not useful work), and it leaves out norms, activations and the
//! LoRA adapters' own small matmuls.
//!
//! Random weights are uniform with the variance of `N(0, 1/fan_in)` (unit-scale
//! activations through every layer, as the built-in tiny model's; no
//! denormals), norm scales 1 and biases 0, drawn from a seeded splitmix64
//! stream per tensor so the same seed gives the same model.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use serde::Serialize;

use sd_lora_model::device_memory;
use sd_lora_model::lora::attach::{TrainOptions, create_trainable};
use sd_lora_model::lora::targets::{Preset, RankAlpha, TargetSpec};
use sd_lora_model::ops::checkpoint;
use sd_lora_model::ops::flops::{self, FlopCounts};
use sd_lora_model::unet::{UNet2DConditionModel, UNetConfig};

use crate::optim::{AdamW, AdamWConfig, ParamGroup};
use crate::outputs::{median, peak_rss_bytes};

/// SD1.5's `unet/config.json` (runwayml/stable-diffusion-v1-5), the fields that
/// shape the network.
pub const SD15_UNET_CONFIG_JSON: &str = r#"{
    "_class_name": "UNet2DConditionModel",
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": false,
    "flip_sin_to_cos": true,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": false,
    "upcast_attention": false
}"#;

/// The name the report gives the SD1.5 UNet.
pub const SD15_MODEL_NAME: &str = "sd15-unet";

/// Tokens of the text embeddings (CLIP's 77 positions).
pub const TEXT_TOKENS: usize = 77;

/// SD1.5's UNet configuration.
pub fn sd15_unet_config() -> Result<UNetConfig> {
    UNetConfig::from_json_str(SD15_UNET_CONFIG_JSON)
        .map_err(|e| anyhow::anyhow!("the built-in SD1.5 UNet config: {e}"))
}

/// Storage dtype of the frozen UNet weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    /// Parses `f32`, `f16`/`fp16`, `bf16`; the error is one line listing them.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => bail!("unknown precision {s:?}: use f32, f16 or bf16"),
        }
    }

    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }

    /// `f32`, `f16` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchOptions {
    /// Image side in pixels (the latent side is `resolution / 8`).
    pub resolution: usize,
    /// Timed steps (at least 1).
    pub steps: usize,
    /// Untimed steps before them.
    pub warmup: usize,
    pub precision: Precision,
    pub checkpointing: bool,
    /// Queries per attention chunk (`None`: the model's default — plain
    /// attention, chunked automatically when a score matrix would be large).
    pub attention_chunk: Option<usize>,
    /// LoRA rank (alpha = rank).
    pub rank: usize,
    /// Seed of the weights, the LoRA initialisation and the inputs.
    pub seed: u64,
}

impl Default for BenchOptions {
    /// 256 px, 5 timed steps after 1 warm-up, f32, no checkpointing, rank 16.
    fn default() -> Self {
        Self {
            resolution: 256,
            steps: 5,
            warmup: 1,
            precision: Precision::F32,
            checkpointing: false,
            attention_chunk: None,
            rank: 16,
            seed: 0,
        }
    }
}

impl BenchOptions {
    /// Checks the options that do not depend on the model; errors are one line.
    pub fn validate(&self) -> Result<()> {
        if self.resolution < 64 || !self.resolution.is_multiple_of(8) {
            bail!(
                "resolution {} is not usable: it must be a multiple of 8 and at least 64 (e.g. 256 or 512)",
                self.resolution
            )
        }
        if self.steps == 0 {
            bail!("steps must be at least 1 (the timed steps)")
        }
        if self.rank == 0 {
            bail!("rank must be at least 1")
        }
        if self.attention_chunk == Some(0) {
            bail!("attention chunk must be at least 1 query (or leave it out for automatic chunks)")
        }
        Ok(())
    }
}

/// The result, serialised as `sd-lora bench --json` prints it (keys and order
/// fixed by the benchmark contract; `tools/bench_reference.py` prints the same).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub model: String,
    pub resolution: usize,
    /// `[1, 4, res/8, res/8]`.
    pub latent: [usize; 4],
    pub steps: usize,
    pub warmup: usize,
    pub precision: Precision,
    pub checkpointing: bool,
    pub attention_chunk: Option<usize>,
    pub rank: usize,
    /// `cpu`, `cuda:N`, …
    pub device: String,
    /// CPU worker threads (candle's rayon pool).
    pub threads: usize,
    /// Trained (LoRA) parameters.
    pub lora_params: u64,
    /// Frozen UNet parameters.
    pub frozen_params: u64,
    /// Seconds to build the model, the LoRA and the optimizer.
    pub build_s: f64,
    /// Seconds of each timed step.
    pub step_s: Vec<f64>,
    pub median_step_s: f64,
    /// CPU seconds (user + system, all threads) the process spent in each timed
    /// step: steadier than wall time when other processes share the cores.
    pub step_cpu_s: Vec<f64>,
    /// Peak resident set size of the process (Linux `VmHWM`).
    pub peak_rss_bytes: Option<u64>,
    /// Largest GPU memory in use after a step (`None` on the CPU).
    pub peak_device_bytes: Option<u64>,
    /// Nominal FLOPs of one step (see the module docs).
    pub flop_per_step: u64,
    /// `flop_per_step / median_step_s / 1e9`.
    pub gflops: f64,
    /// Forward FLOPs by kind, from which `flop_per_step` is derived.
    pub forward_flops: FlopCounts,
    /// Median seconds of each phase of the timed steps.
    pub phases: Phases,
    /// The loss of the last step (a sanity check: finite, near 1 + ‖pred‖²).
    pub final_loss: f64,
}

/// Median seconds of the phases of a step (the device is synchronised at
/// each boundary, so on a GPU the sum is a little above the step time).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Phases {
    /// UNet forward and loss.
    pub forward_s: f64,
    /// Backward (with the recomputation when checkpointing).
    pub backward_s: f64,
    /// Gathering the gradients and the AdamW update.
    pub optimizer_s: f64,
}

/// One finished step, for progress display.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    /// 0-based over warm-up and timed steps.
    pub index: usize,
    pub total: usize,
    pub warmup: bool,
    pub seconds: f64,
    pub loss: f64,
}

/// Nominal FLOPs of a training step from the forward's counts (module docs).
pub fn step_flops(forward: &FlopCounts) -> u64 {
    2 * (forward.linear + forward.conv) + 3 * forward.attention
}

/// Runs the benchmark on SD1.5's UNet.
pub fn run_sd15(
    opts: &BenchOptions,
    device: &Device,
    device_name: &str,
    on_step: &mut dyn FnMut(StepInfo),
) -> Result<BenchReport> {
    let cfg = sd15_unet_config()?;
    run(&cfg, SD15_MODEL_NAME, opts, device, device_name, on_step)
}

/// Runs the benchmark on a UNet of configuration `cfg` (tests use tiny ones);
/// `model` and `device_name` only label the report.
pub fn run(
    cfg: &UNetConfig,
    model: &str,
    opts: &BenchOptions,
    device: &Device,
    device_name: &str,
    on_step: &mut dyn FnMut(StepInfo),
) -> Result<BenchReport> {
    opts.validate()?;
    let dtype = opts.precision.dtype();
    let side = opts.resolution / 8;
    let latent = [1, cfg.in_channels, side, side];
    let context_dim = cfg.cross_attention_dim.iter().copied().max().unwrap_or(768);

    // Model, LoRA, optimizer.
    let t_build = Instant::now();
    let backend = RandomWeights {
        seed: opts.seed,
        elements: Arc::default(),
    };
    let elements = backend.elements.clone();
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let mut unet = UNet2DConditionModel::new(vb, cfg).context("building the UNet")?;
    unet.set_attention_chunk(opts.attention_chunk);
    unet.set_gradient_checkpointing(opts.checkpointing);
    let ra = RankAlpha {
        rank: opts.rank,
        alpha: opts.rank as f32,
    };
    let spec = TargetSpec {
        preset: Preset::Attention,
        unet: true,
        text_encoder: false,
        unet_linear: ra,
        unet_conv: ra,
        text_encoder_rank: ra,
        ..TargetSpec::default()
    };
    let lora = create_trainable(
        &mut unet,
        None,
        &spec,
        &TrainOptions {
            seed: opts.seed,
            ..TrainOptions::default()
        },
    )
    .context("creating the LoRA")?;
    let vars = lora.vars();
    let lora_params = vars.iter().map(|v| v.elem_count() as u64).sum();
    let mut opt = AdamW::new(
        vec![ParamGroup {
            name: "unet".into(),
            vars: vars.clone(),
            lr: 1e-4,
            weight_decay: 1e-2,
        }],
        AdamWConfig::default(),
    )?;
    device.synchronize()?;
    let build_s = t_build.elapsed().as_secs_f64();

    // Steps.
    let total = opts.warmup + opts.steps;
    let mut step_s = Vec::with_capacity(opts.steps);
    let mut phase_s: [Vec<f64>; 3] = Default::default();
    let mut step_cpu_s = Vec::with_capacity(opts.steps);
    let mut forward_flops = FlopCounts::default();
    let mut peak_device_bytes: Option<u64> = None;
    let mut final_loss = f64::NAN;
    for index in 0..total {
        let s = splitmix64(opts.seed ^ 0x1234_5678 ^ (index as u64).wrapping_mul(0x9E37));
        let latents = random_tensor(s ^ 1, &latent, 1.0, device)?.to_dtype(dtype)?;
        let context =
            random_tensor(s ^ 2, &[1, TEXT_TOKENS, context_dim], 1.0, device)?.to_dtype(dtype)?;
        let noise = random_tensor(s ^ 3, &latent, 1.0, device)?;
        let timestep = (splitmix64(s ^ 4) % 1000) as f32;
        let timesteps = Tensor::from_vec(vec![timestep], 1, device)?;
        device.synchronize()?;

        let cpu0 = process_cpu_seconds();
        let t0 = Instant::now();
        // The FLOPs are counted in the first step's forward, whatever the
        // mode: a separate uncheckpointed forward would raise the peak memory
        // that the checkpointed runs are meant to measure.
        if index == 0 {
            flops::start();
        }
        let forward = unet.forward(&latents, &timesteps, &context);
        if index == 0 {
            forward_flops = flops::take_counts();
        }
        let pred = forward.context("UNet forward")?;
        let loss = (pred.to_dtype(DType::F32)? - &noise)?.sqr()?.mean_all()?;
        device.synchronize()?;
        let t_forward = t0.elapsed().as_secs_f64();
        let grads = checkpoint::backward(&loss).context("backward")?;
        device.synchronize()?;
        let t_backward = t0.elapsed().as_secs_f64();
        let g: Vec<Option<Tensor>> = vars.iter().map(|v| grads.get(v).cloned()).collect();
        drop(grads);
        opt.step(&[g], 1.0)?;
        device.synchronize()?;
        let seconds = t0.elapsed().as_secs_f64();
        let cpu = process_cpu_seconds().zip(cpu0).map(|(b, a)| b - a);

        final_loss = f64::from(loss.to_scalar::<f32>()?);
        drop((pred, loss));
        if let Some(used) = device_memory::used_bytes(device) {
            peak_device_bytes = Some(peak_device_bytes.map_or(used, |p| p.max(used)));
        }
        let warmup = index < opts.warmup;
        if !warmup {
            step_s.push(seconds);
            step_cpu_s.extend(cpu);
            phase_s[0].push(t_forward);
            phase_s[1].push(t_backward - t_forward);
            phase_s[2].push(seconds - t_backward);
        }
        on_step(StepInfo {
            index,
            total,
            warmup,
            seconds,
            loss: final_loss,
        });
    }
    if !final_loss.is_finite() {
        bail!("the benchmark's loss is not finite ({final_loss}); the step is broken")
    }

    let median_step_s = median(&step_s).unwrap_or(f64::NAN);
    let flop_per_step = step_flops(&forward_flops);
    Ok(BenchReport {
        implementation: "sd-lora".into(),
        model: model.into(),
        resolution: opts.resolution,
        latent,
        steps: opts.steps,
        warmup: opts.warmup,
        precision: opts.precision,
        checkpointing: opts.checkpointing,
        attention_chunk: opts.attention_chunk,
        rank: opts.rank,
        device: device_name.into(),
        threads: candle_core::utils::get_num_threads(),
        lora_params,
        frozen_params: elements.load(Ordering::Relaxed),
        build_s,
        step_s,
        median_step_s,
        step_cpu_s,
        peak_rss_bytes: peak_rss_bytes(),
        peak_device_bytes,
        flop_per_step,
        gflops: flop_per_step as f64 / median_step_s / 1e9,
        forward_flops,
        phases: Phases {
            forward_s: median(&phase_s[0]).unwrap_or(f64::NAN),
            backward_s: median(&phase_s[1]).unwrap_or(f64::NAN),
            optimizer_s: median(&phase_s[2]).unwrap_or(f64::NAN),
        },
        final_loss,
    })
}

/// User + system CPU seconds of this process so far, from `/proc/self/stat`
/// (Linux; `None` elsewhere). The kernel reports them in USER_HZ ticks, which
/// is 100 per second on every Linux ABI.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_proc_stat_cpu(&stat)
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line, in seconds.
fn parse_proc_stat_cpu(stat: &str) -> Option<f64> {
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

// ---------------------------------------------------------------------------
// Random weights and inputs
// ---------------------------------------------------------------------------

/// The splitmix64 output for `state` (builtin's generator, one step).
fn splitmix64(state: u64) -> u64 {
    let mut s = state;
    sd_lora_model::builtin::splitmix64(&mut s)
}

/// `n` values uniform in `[-bound, bound)` from stream `seed`. Filled in
/// parallel blocks (each block its own sub-stream, so the values do not
/// depend on the number of threads), because SD1.5 has 860 M weights and one
/// thread would take several seconds.
fn uniform(seed: u64, n: usize, bound: f32) -> Vec<f32> {
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 16;
    let mut data = vec![0f32; n];
    data.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(block, out)| {
            let mut state = splitmix64(seed ^ (block as u64).wrapping_mul(0xA24B_AED4_963E_E407));
            for v in out {
                state = splitmix64(state);
                // 24 random bits → [0, 1) exactly representable in f32.
                let u = (state >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
                *v = (2.0 * u - 1.0) * bound;
            }
        });
    data
}

/// A tensor of `dims` with standard deviation `std` (uniform), f32 on `device`.
fn random_tensor(seed: u64, dims: &[usize], std: f32, device: &Device) -> Result<Tensor> {
    let n = dims.iter().product();
    let data = uniform(seed, n, std * 3f32.sqrt());
    Ok(Tensor::from_vec(data, dims, &Device::Cpu)?.to_device(device)?)
}

/// A VarBuilder backend that invents every requested weight (see the module
/// docs for the distributions) and counts the elements.
struct RandomWeights {
    seed: u64,
    elements: Arc<AtomicU64>,
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        let n = s.elem_count();
        self.elements.fetch_add(n as u64, Ordering::Relaxed);
        let t = match dims {
            [] => candle_core::bail!("{name}: the benchmark UNet has no scalar parameters"),
            [_] if name.ends_with(".weight") => Tensor::ones(dims, DType::F32, &Device::Cpu)?,
            [_] => Tensor::zeros(dims, DType::F32, &Device::Cpu)?,
            [_, rest @ ..] => {
                let fan_in: usize = rest.iter().product();
                let bound = (3.0 / fan_in.max(1) as f32).sqrt();
                let data = uniform(self.seed ^ sd_lora_model::builtin::fnv1a(name), n, bound);
                Tensor::from_vec(data, dims, &Device::Cpu)?
            }
        };
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("benchmark UNet: no shape known for {name}")
    }

    /// Attention uses the current key names (`to_q`, not the old `query`).
    fn contains_tensor(&self, name: &str) -> bool {
        !(name.ends_with(".query.weight") || name.ends_with(".proj_attn.weight"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The FLOP counter is global: two benchmarks running at once would reset
    /// each other's counts, so the tests that run one take this lock.
    static COUNTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        COUNTER
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A UNet with SD1's layout at toy widths (as the built-in tiny model).
    fn tiny_config() -> UNetConfig {
        UNetConfig::from_json_str(sd_lora_model::builtin::TINY_UNET_CONFIG_JSON).unwrap()
    }

    #[test]
    fn sd15_config_has_sd15_shapes() {
        let c = sd15_unet_config().unwrap();
        assert_eq!(c.in_channels, 4);
        assert_eq!(c.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(c.cross_attention_dim.iter().max(), Some(&768));
        assert_eq!(c.norm_num_groups, 32);
    }

    #[test]
    fn options_are_checked_before_any_work() {
        let ok = BenchOptions::default();
        assert!(ok.validate().is_ok());
        for resolution in [0, 56, 100, 257] {
            let e = BenchOptions {
                resolution,
                ..ok.clone()
            }
            .validate()
            .unwrap_err();
            assert!(e.to_string().contains("multiple of 8"), "{e}");
        }
        assert!(
            BenchOptions {
                steps: 0,
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            BenchOptions {
                rank: 0,
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        let e = Precision::parse("f8").unwrap_err().to_string();
        assert!(e.contains("f32, f16 or bf16"), "{e}");
        assert_eq!(Precision::parse("BF16").unwrap(), Precision::Bf16);
    }

    #[test]
    fn cpu_time_is_read_from_proc_stat() {
        let line = "123 (a (b) c) R 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20";
        assert_eq!(parse_proc_stat_cpu(line), Some(3.0));
        assert_eq!(parse_proc_stat_cpu("garbage"), None);
    }

    #[test]
    fn step_flops_follow_the_documented_formula() {
        let f = FlopCounts {
            linear: 10,
            conv: 100,
            attention: 1000,
        };
        assert_eq!(step_flops(&f), 2 * 110 + 3 * 1000);
    }

    #[test]
    fn random_weights_have_the_requested_scale_and_are_seeded() {
        let a = uniform(7, 300_000, 0.5);
        let b = uniform(7, 300_000, 0.5);
        assert_eq!(a, b);
        assert!(a.iter().all(|v| (-0.5..0.5).contains(v)));
        let var = a.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / a.len() as f64;
        // Uniform on [-b, b): variance b²/3.
        assert!((var - 0.25 / 3.0).abs() < 1e-3, "{var}");
        assert_ne!(a, uniform(8, 300_000, 0.5));
    }

    #[test]
    fn tiny_unet_bench_runs_and_reports_sane_fields() {
        let _serial = serial();
        let opts = BenchOptions {
            resolution: 64,
            steps: 1,
            warmup: 1,
            rank: 4,
            ..BenchOptions::default()
        };
        let mut seen = Vec::new();
        let r = run(
            &tiny_config(),
            "tiny",
            &opts,
            &Device::Cpu,
            "cpu",
            &mut |s| seen.push((s.index, s.warmup)),
        )
        .unwrap();
        assert_eq!(seen, vec![(0, true), (1, false)]);
        assert_eq!(r.latent, [1, 4, 8, 8]);
        assert_eq!(r.step_s.len(), 1);
        assert!(r.median_step_s > 0.0 && r.median_step_s == r.step_s[0]);
        assert!(r.final_loss.is_finite());
        assert!(r.lora_params > 0 && r.frozen_params > r.lora_params);
        // The tiny UNet has conv, linear and attention FLOPs (other tests in
        // this process may add to the global counter, so no exact figure).
        let f = r.forward_flops;
        assert!(f.linear > 0 && f.conv > 0 && f.attention > 0, "{f:?}");
        assert_eq!(r.flop_per_step, step_flops(&f));
        assert!(r.gflops > 0.0);
        assert_eq!(r.peak_device_bytes, None);
        assert!(r.threads >= 1);

        let json = serde_json::to_value(&r).unwrap();
        for key in [
            "model",
            "resolution",
            "latent",
            "steps",
            "warmup",
            "precision",
            "checkpointing",
            "attention_chunk",
            "rank",
            "device",
            "threads",
            "lora_params",
            "frozen_params",
            "build_s",
            "step_s",
            "median_step_s",
            "peak_rss_bytes",
            "peak_device_bytes",
            "flop_per_step",
            "gflops",
        ] {
            assert!(json.get(key).is_some(), "missing key {key}");
        }
        assert_eq!(json["precision"], "f32");
        assert_eq!(json["attention_chunk"], serde_json::Value::Null);
    }

    #[test]
    fn tiny_unet_bench_runs_with_checkpointing_and_half_storage() {
        let _serial = serial();
        let opts = BenchOptions {
            resolution: 64,
            steps: 1,
            warmup: 0,
            rank: 4,
            checkpointing: true,
            precision: Precision::F16,
            attention_chunk: Some(16),
            ..BenchOptions::default()
        };
        let r = run(
            &tiny_config(),
            "tiny",
            &opts,
            &Device::Cpu,
            "cpu",
            &mut |_| {},
        )
        .unwrap();
        assert!(r.final_loss.is_finite());
        assert!(r.checkpointing);
        assert_eq!(r.attention_chunk, Some(16));
    }
}
