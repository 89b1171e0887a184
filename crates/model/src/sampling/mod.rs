//! Samplers for inference: DDIM (η = 0), Euler, Euler ancestral and
//! DPM++ 2M (optionally with Karras sigmas), reproducing diffusers'
//! `DDIMScheduler`, `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`
//! and `DPMSolverMultistepScheduler` (`dpmsolver++`, order 2,
//! `lower_order_final`), for ε- and v-prediction models.
//!
//! A [`Sampler`] is built for one run of `num_steps` steps: it holds the
//! timestep and sigma tables and, for DPM++ 2M, the previous step's data
//! prediction. [`sample`] is the whole loop — scale the initial noise, scale
//! each model input, call the model, step — as a diffusers pipeline does.
//!
//! Tables are computed in f64 (diffusers uses f32; they agree to ~1e-7) and
//! the update arithmetic in f32 on the latents' device, as diffusers upcasts.

mod rng;
mod tables;

pub use rng::NormalRng;

use crate::schedule::{NoiseSchedule, Prediction, ScheduleConfig};
use candle_core::{DType, Tensor};
use std::fmt;
use std::str::FromStr;

/// A sampler that cannot be built or run.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    /// A bad argument or configuration value; the message says which and what to do.
    #[error("sampler: {0}")]
    Invalid(String),
    /// A tensor operation failed.
    #[error("sampler: {0}")]
    Tensor(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, SamplingError>;

/// Which sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    /// DDIM, deterministic (η = 0).
    Ddim,
    /// Euler (k-diffusion), deterministic.
    Euler,
    /// Euler ancestral: fresh noise each step.
    EulerAncestral,
    /// DPM++ 2M on the schedule's own sigmas.
    DpmPp2m,
    /// DPM++ 2M on Karras sigmas.
    DpmPp2mKarras,
}

impl SamplerKind {
    /// Every sampler, in the order of [`Self::NAMES`].
    pub const ALL: [SamplerKind; 5] = [
        SamplerKind::Ddim,
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::DpmPp2m,
        SamplerKind::DpmPp2mKarras,
    ];

    /// Command-line names, in the order of [`Self::ALL`].
    pub const NAMES: [&'static str; 5] =
        ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"];

    /// The command-line name (`euler_a`).
    pub fn name(self) -> &'static str {
        Self::NAMES[self.index()]
    }

    /// The name AUTOMATIC1111 writes into PNG `parameters` (`Euler a`).
    pub fn a1111_name(self) -> &'static str {
        ["DDIM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras"][self.index()]
    }

    /// Whether each step draws fresh noise.
    pub fn is_ancestral(self) -> bool {
        self == SamplerKind::EulerAncestral
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SamplerKind {
    type Err = SamplingError;

    /// Accepts the command-line names and the A1111 display names, ignoring case.
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim();
        Self::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(t) || k.a1111_name().eq_ignore_ascii_case(t))
            .ok_or_else(|| {
                SamplingError::Invalid(format!(
                    "unknown sampler {s:?}; use one of {}",
                    Self::NAMES.join(", ")
                ))
            })
    }
}

/// How the inference timesteps are spread over the training steps
/// (diffusers `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    /// `linspace`: evenly from 0 to the last training step.
    Linspace,
    /// `leading`: multiples of the step ratio, plus `steps_offset` (SD's choice).
    Leading,
    /// `trailing`: counted down from the last training step.
    Trailing,
}

/// What the samplers need from a model's `scheduler_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    /// ᾱ_t per training step and the prediction type.
    pub schedule: NoiseSchedule,
    /// `timestep_spacing` (default `leading`, SD's).
    pub timestep_spacing: Spacing,
    /// `steps_offset` (SD: 1), added to `leading` timesteps.
    pub steps_offset: usize,
    /// `set_alpha_to_one` (DDIM's ᾱ after the last step: 1, else ᾱ₀; diffusers default true).
    pub set_alpha_to_one: bool,
    /// DDIM only: clamp the predicted x₀ to ±this (`clip_sample`, default
    /// true, and `clip_sample_range`, default 1). SD's own configs turn it
    /// off; a config that omits the key gets diffusers' default, clipping.
    pub clip_sample: Option<f64>,
}

impl SamplerConfig {
    /// From a schedule with explicit spacing options.
    pub fn new(
        schedule: NoiseSchedule,
        timestep_spacing: Spacing,
        steps_offset: usize,
        set_alpha_to_one: bool,
    ) -> Self {
        SamplerConfig {
            schedule,
            timestep_spacing,
            steps_offset,
            set_alpha_to_one,
            clip_sample: None,
        }
    }

    /// Stable Diffusion's usual scheduler (`leading`, offset 1, ᾱ after the
    /// end = ᾱ₀) on `schedule`: for single-file checkpoints, which carry no
    /// scheduler config.
    pub fn sd_default(schedule: NoiseSchedule) -> Self {
        Self::new(schedule, Spacing::Leading, 1, false)
    }

    /// Reads a diffusers `scheduler_config.json` file (a model folder's
    /// `scheduler/scheduler_config.json`).
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| SamplingError::Invalid(format!("cannot read {}: {e}", path.display())))?;
        Self::from_json_str(&text).map_err(|e| match e {
            SamplingError::Invalid(m) => SamplingError::Invalid(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Reads the contents of a diffusers `scheduler_config.json`.
    pub fn from_json_str(json: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| SamplingError::Invalid(format!("scheduler_config.json: {e}")))?;
        Self::from_json(&value)
    }

    /// Reads a parsed diffusers `scheduler_config.json`.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let cfg: ScheduleConfig = serde_json::from_value(value.clone())
            .map_err(|e| SamplingError::Invalid(format!("scheduler_config.json: {e}")))?;
        let schedule =
            NoiseSchedule::new(&cfg).map_err(|e| SamplingError::Invalid(e.to_string()))?;
        let timestep_spacing = match value.get("timestep_spacing").and_then(|v| v.as_str()) {
            None | Some("leading") => Spacing::Leading,
            Some("linspace") => Spacing::Linspace,
            Some("trailing") => Spacing::Trailing,
            Some(other) => {
                return Err(SamplingError::Invalid(format!(
                    "scheduler_config.json: timestep_spacing = {other:?}; use \"leading\", \"trailing\" or \"linspace\""
                )));
            }
        };
        let steps_offset = match value.get("steps_offset") {
            None | Some(serde_json::Value::Null) => 0,
            Some(v) => v.as_u64().ok_or_else(|| {
                SamplingError::Invalid(format!(
                    "scheduler_config.json: steps_offset = {v}; it must be a non-negative integer"
                ))
            })? as usize,
        };
        let set_alpha_to_one = value
            .get("set_alpha_to_one")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        let clip = value
            .get("clip_sample")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        let range = value
            .get("clip_sample_range")
            .and_then(|v| v.as_f64())
            .unwrap_or(1.0);
        let mut config = Self::new(schedule, timestep_spacing, steps_offset, set_alpha_to_one);
        config.clip_sample = clip.then_some(range);
        Ok(config)
    }

    /// The timesteps `kind` visits in `num_steps` steps, largest first.
    pub fn timesteps(&self, kind: SamplerKind, num_steps: usize) -> Result<Vec<f64>> {
        Ok(Sampler::new(kind, self, num_steps)?.timesteps)
    }

    /// The sigmas of `kind` for `num_steps` steps (`num_steps + 1`, ending
    /// in 0; empty for DDIM, which works with ᾱ directly).
    pub fn sigmas(&self, kind: SamplerKind, num_steps: usize) -> Result<Vec<f64>> {
        Ok(Sampler::new(kind, self, num_steps)?.sigmas)
    }

    /// Number of training timesteps.
    pub fn num_train_timesteps(&self) -> usize {
        self.schedule.alphas_cumprod.len()
    }

    /// What the model predicts.
    pub fn prediction(&self) -> Prediction {
        self.schedule.prediction
    }
}

/// One sampling run: tables for `num_steps` steps and the solver's memory.
#[derive(Debug, Clone)]
pub struct Sampler {
    kind: SamplerKind,
    config: SamplerConfig,
    timesteps: Vec<f64>,
    /// `num_steps + 1` sigmas ending in 0 (empty for DDIM).
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    /// DPM++ 2M: the previous step's x₀ prediction.
    previous_x0: Option<Tensor>,
}

impl Sampler {
    /// Builds the tables of `kind` for `num_steps` steps.
    pub fn new(kind: SamplerKind, config: &SamplerConfig, num_steps: usize) -> Result<Self> {
        let train = config.num_train_timesteps();
        if num_steps == 0 || num_steps > train {
            return Err(SamplingError::Invalid(format!(
                "{num_steps} sampling steps; use between 1 and {train} (the model's training steps)"
            )));
        }
        let train_sigmas = tables::train_sigmas(config);
        let (timesteps, sigmas) = match kind {
            SamplerKind::Ddim => (tables::spaced_timesteps(config, num_steps, true), vec![]),
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let t = tables::spaced_timesteps(config, num_steps, false);
                let mut s = tables::interp_sigmas(&train_sigmas, &t);
                s.push(0.0);
                (t, s)
            }
            SamplerKind::DpmPp2m => {
                let t = tables::dpm_timesteps(config, num_steps);
                let mut s = tables::interp_sigmas(&train_sigmas, &t);
                s.push(0.0);
                (t, s)
            }
            SamplerKind::DpmPp2mKarras => {
                let (min, max) = (train_sigmas[0], train_sigmas[train - 1]);
                let mut s = tables::karras_sigmas(min, max, num_steps);
                let t = s
                    .iter()
                    .map(|&x| tables::sigma_to_t(x, &train_sigmas).round())
                    .collect();
                s.push(0.0);
                (t, s)
            }
        };
        let init_noise_sigma = match kind {
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let max = sigmas.iter().cloned().fold(0.0, f64::max);
                match config.timestep_spacing {
                    Spacing::Linspace => max,
                    _ => (max * max + 1.0).sqrt(),
                }
            }
            _ => 1.0,
        };
        Ok(Sampler {
            kind,
            config: config.clone(),
            timesteps,
            sigmas,
            init_noise_sigma,
            previous_x0: None,
        })
    }

    /// Which sampler.
    pub fn kind(&self) -> SamplerKind {
        self.kind
    }

    /// Number of steps.
    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The timestep the model sees at each step, largest first.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The k-diffusion sigmas (`num_steps + 1`, ending in 0); empty for DDIM.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The standard deviation of the initial latent (multiply unit noise by it).
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    /// The model input at step `index`: the sample divided by √(σ² + 1) for
    /// the Euler samplers (their latents live at scale σ), unchanged otherwise.
    pub fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        self.check_index(index)?;
        match self.kind {
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let s = self.sigmas[index];
                Ok(sample.affine(1.0 / (s * s + 1.0).sqrt(), 0.0)?)
            }
            _ => Ok(sample.clone()),
        }
    }

    /// One step from `sample` at step `index` to the next, given the model's
    /// output for [`Self::scale_model_input`]. Steps must be taken in order
    /// from 0 (DPM++ 2M remembers the previous one). `rng` is only drawn
    /// from by ancestral samplers.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        rng: &mut NormalRng,
    ) -> Result<Tensor> {
        self.check_index(index)?;
        if model_output.dims() != sample.dims() {
            return Err(SamplingError::Invalid(format!(
                "model output has shape {:?} but the sample has shape {:?}",
                model_output.dims(),
                sample.dims()
            )));
        }
        let dtype = sample.dtype();
        let out = model_output.to_dtype(DType::F32)?;
        let x = sample.to_dtype(DType::F32)?;
        let prev = match self.kind {
            SamplerKind::Ddim => self.ddim_step(&out, index, &x)?,
            SamplerKind::Euler => {
                let (s, s_next) = (self.sigmas[index], self.sigmas[index + 1]);
                let x0 = self.k_x0(&out, &x, s)?;
                // x + (x − x₀)/σ · (σ_next − σ)
                let d = ((&x - &x0)? / s)?;
                (&x + (d * (s_next - s))?)?
            }
            SamplerKind::EulerAncestral => {
                let (s, s_next) = (self.sigmas[index], self.sigmas[index + 1]);
                let x0 = self.k_x0(&out, &x, s)?;
                let up = (s_next * s_next * (s * s - s_next * s_next) / (s * s)).sqrt();
                let down = (s_next * s_next - up * up).max(0.0).sqrt();
                let d = ((&x - &x0)? / s)?;
                let noise = rng.randn(x.shape(), x.device())?;
                ((&x + (d * (down - s))?)? + (noise * up)?)?
            }
            SamplerKind::DpmPp2m | SamplerKind::DpmPp2mKarras => self.dpm_step(&out, index, &x)?,
        };
        Ok(prev.to_dtype(dtype)?)
    }

    fn check_index(&self, index: usize) -> Result<()> {
        if index >= self.num_steps() {
            return Err(SamplingError::Invalid(format!(
                "step index {index} out of range for {} steps",
                self.num_steps()
            )));
        }
        Ok(())
    }

    /// x₀ from the model output in k-diffusion parametrisation (x = x₀ + σε).
    fn k_x0(&self, out: &Tensor, x: &Tensor, sigma: f64) -> Result<Tensor> {
        Ok(match self.config.prediction() {
            Prediction::Epsilon => (x - (out * sigma)?)?,
            Prediction::V => {
                let c = sigma * sigma + 1.0;
                ((out * (-sigma / c.sqrt()))? + (x / c)?)?
            }
        })
    }

    fn ddim_step(&self, out: &Tensor, index: usize, x: &Tensor) -> Result<Tensor> {
        let ac = &self.config.schedule.alphas_cumprod;
        let train = ac.len();
        let t = self.timesteps[index] as usize;
        // diffusers steps back by train/n regardless of the spacing.
        let prev_t = t as i64 - (train / self.num_steps()) as i64;
        let a = ac[t.min(train - 1)];
        let a_prev = if prev_t >= 0 {
            ac[prev_t as usize]
        } else if self.config.set_alpha_to_one {
            1.0
        } else {
            ac[0]
        };
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        let (x0, eps) = match self.config.prediction() {
            Prediction::Epsilon => (((x - (out * sb)?)? / sa)?, out.clone()),
            Prediction::V => (((x * sa)? - (out * sb)?)?, ((out * sa)? + (x * sb)?)?),
        };
        let x0 = match self.config.clip_sample {
            Some(r) => x0.clamp(-r, r)?,
            None => x0,
        };
        Ok(((x0 * a_prev.sqrt())? + (eps * (1.0 - a_prev).sqrt())?)?)
    }

    fn dpm_step(&mut self, out: &Tensor, index: usize, x: &Tensor) -> Result<Tensor> {
        // α_t = 1/√(σ²+1), σ_t = σ α_t, λ = ln α_t − ln σ_t.
        let alpha_sigma = |s: f64| {
            let a = 1.0 / (s * s + 1.0).sqrt();
            (a, s * a)
        };
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[index]);
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[index + 1]);
        let x0 = match self.config.prediction() {
            Prediction::Epsilon => ((x - (out * sigma_s0)?)? / alpha_s0)?,
            Prediction::V => ((x * alpha_s0)? - (out * sigma_s0)?)?,
        };
        let lambda = |a: f64, s: f64| a.ln() - s.ln();
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let n = self.num_steps();
        // The last step is always first order (the final sigma is zero), and
        // so is the first (nothing to extrapolate from).
        let first_order = index == n - 1 || self.previous_x0.is_none() || index == 0;
        let em1 = (-h).exp() - 1.0;
        let prev = if first_order {
            ((x * (sigma_t / sigma_s0))? - (&x0 * (alpha_t * em1))?)?
        } else {
            let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[index - 1]);
            let h0 = lambda_s0 - lambda(alpha_s1, sigma_s1);
            let r0 = h0 / h;
            let m1 = self.previous_x0.as_ref().ok_or_else(|| {
                SamplingError::Invalid("DPM++ 2M steps must be taken in order".into())
            })?;
            // Midpoint solver: D1 = (m0 − m1)/r0.
            let d1 = ((&x0 - m1)? * (1.0 / r0))?;
            (((x * (sigma_t / sigma_s0))? - (&x0 * (alpha_t * em1))?)?
                - (d1 * (0.5 * alpha_t * em1))?)?
        };
        self.previous_x0 = Some(x0);
        Ok(prev)
    }
}

/// Runs `sampler` from unit-variance `initial_noise`: scales it by the
/// initial sigma, then for each step calls `model(scaled_latents, timestep)`
/// and steps. Returns the final latents.
pub fn sample<F>(
    sampler: &mut Sampler,
    initial_noise: &Tensor,
    mut model: F,
    rng: &mut NormalRng,
) -> Result<Tensor>
where
    F: FnMut(&Tensor, f64) -> candle_core::Result<Tensor>,
{
    sample_with_progress(sampler, initial_noise, &mut model, rng, |_, _| {})
}

/// [`sample`] that also calls `progress(step, latents)` after each step
/// (for progress bars and trajectory inspection).
pub fn sample_with_progress<F, P>(
    sampler: &mut Sampler,
    initial_noise: &Tensor,
    mut model: F,
    rng: &mut NormalRng,
    mut progress: P,
) -> Result<Tensor>
where
    F: FnMut(&Tensor, f64) -> candle_core::Result<Tensor>,
    P: FnMut(usize, &Tensor),
{
    let mut x = initial_noise.affine(sampler.init_noise_sigma(), 0.0)?;
    for i in 0..sampler.num_steps() {
        let input = sampler.scale_model_input(&x, i)?;
        let out = model(&input, sampler.timesteps()[i])?;
        x = sampler.step(&out, i, &x, rng)?;
        progress(i, &x);
    }
    Ok(x)
}
