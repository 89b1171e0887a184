//! The denoising objective: noising a batch of latents and the weighted loss.
//!
//! As in diffusers' and kohya's training scripts: per-sample timesteps (from
//! a range), `x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε`, target ε (or
//! `v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀`), optional noise offset, multi-resolution noise
//! and input perturbation; a per-sample loss (MSE, L1, pseudo-Huber or smooth
//! L1 with kohya's threshold schedules) weighted by min-SNR-γ, debiased
//! estimation and a per-sample loss weight (which is how prior preservation
//! weights class images).

use candle_core::{DType, Result, Tensor};
use schemars::JsonSchema;
use sd_lora_data::rng::Rng;
use sd_lora_model::schedule::{NoiseSchedule, Prediction};
use serde::{Deserialize, Serialize};

use crate::noise::{pyramid_noise, randn, randn_vec, sample_timesteps_in};

/// How noise and timesteps are drawn (kohya's noise options). The default
/// is plain Gaussian noise and uniform timesteps over the whole schedule.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct NoiseOptions {
    /// Per-channel constant noise of this strength added to ε (0 = off).
    pub offset: f64,
    /// Levels of multi-resolution noise (0 = off; 6–10 usual).
    pub multires_iterations: usize,
    /// Weight of each coarser level (`discountⁱ`).
    pub multires_discount: f64,
    /// Input perturbation γ: the UNet sees `x₀` noised with `ε + γ·ε'` while
    /// the target stays ε (0 = off; 0.1 usual).
    pub ip_noise_gamma: f64,
    /// Draw the perturbation's strength uniformly from `[0, γ)` per batch.
    pub ip_noise_random_strength: bool,
    /// Timesteps are drawn from `[min_timestep, max_timestep)`.
    pub min_timestep: usize,
    /// None = the schedule's length.
    pub max_timestep: Option<usize>,
}

impl NoiseOptions {
    /// Only a noise offset.
    pub fn with_offset(offset: f64) -> Self {
        NoiseOptions {
            offset,
            ..NoiseOptions::default()
        }
    }
}

/// The per-element loss (kohya's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Squared error (MSE), the standard denoising loss.
    #[default]
    L2,
    /// Absolute error.
    L1,
    /// Pseudo-Huber `2c(√(d² + c²) − c)`: quadratic for errors below the
    /// threshold c, linear above (less pull from outliers).
    Huber,
    /// Smooth L1 `2(√(d² + c²) − c)`: the pseudo-Huber loss divided by c.
    SmoothL1,
}

/// How the Huber threshold c depends on the timestep (kohya's
/// `huber_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HuberSchedule {
    /// `c_t = (1 − huber_c)/(1 + σ_t)² + huber_c` with σ_t = √((1−ᾱ_t)/ᾱ_t):
    /// near 1 (MSE-like) for small noise, `huber_c` for large.
    #[default]
    Snr,
    /// `c_t = huber_scale · exp(ln(huber_c) · t / T)`: from `huber_scale` at
    /// t = 0 down to `huber_c · huber_scale` at the last step.
    Exponential,
    /// `c = huber_c · huber_scale` at every timestep.
    Constant,
}

/// How the per-sample losses are computed and weighted.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossOptions {
    /// Min-SNR-γ weighting.
    pub min_snr_gamma: Option<f64>,
    /// Debiased estimation weighting (Yu et al. 2024): `1/√SNR` (ε) or
    /// `1/(SNR + 1)` (v), SNR capped at 1000.
    pub debiased_estimation: bool,
    /// The per-element loss.
    pub loss_type: LossType,
    /// The Huber threshold's schedule (Huber and smooth L1).
    pub huber_schedule: HuberSchedule,
    /// The Huber threshold parameter.
    pub huber_c: f64,
    /// Scale of the exponential and constant thresholds.
    pub huber_scale: f64,
    /// Weight of the area outside a loss mask (see [`masked_weighted_loss`]).
    pub unmasked_weight: f64,
}

impl LossOptions {
    /// Plain MSE, optionally min-SNR weighted.
    pub fn mse(min_snr_gamma: Option<f64>) -> Self {
        LossOptions {
            min_snr_gamma,
            huber_c: 0.1,
            huber_scale: 1.0,
            ..LossOptions::default()
        }
    }

    /// The Huber threshold of each sample (None unless the loss uses one).
    pub fn huber_thresholds(
        &self,
        timesteps: &[usize],
        schedule: &NoiseSchedule,
    ) -> Option<Vec<f64>> {
        matches!(self.loss_type, LossType::Huber | LossType::SmoothL1)
            .then(|| self.thresholds(timesteps, schedule))
    }

    /// The threshold of the Huber schedule at each timestep.
    fn thresholds(&self, timesteps: &[usize], schedule: &NoiseSchedule) -> Vec<f64> {
        let n = schedule.len() as f64;
        timesteps
            .iter()
            .map(|&t| match self.huber_schedule {
                HuberSchedule::Constant => self.huber_c * self.huber_scale,
                HuberSchedule::Exponential => {
                    let alpha = -self.huber_c.ln() / n;
                    (-alpha * t as f64).exp() * self.huber_scale
                }
                HuberSchedule::Snr => {
                    let a = schedule.alphas_cumprod[t.min(schedule.len() - 1)];
                    let sigma = ((1.0 - a) / a).sqrt();
                    (1.0 - self.huber_c) / (1.0 + sigma).powi(2) + self.huber_c
                }
            })
            .collect()
    }
}

/// A noised batch, ready for the UNet.
#[derive(Debug, Clone)]
pub struct NoisyBatch {
    /// `x_t`, same shape and dtype as the latents: `[b, c, h, w]`.
    pub noisy: Tensor,
    /// What the UNet should predict: ε or v, same shape and dtype as the latents.
    pub target: Tensor,
    /// Each sample's timestep in `[0, schedule.len())`.
    pub timesteps: Vec<usize>,
}

/// Per-sample `[b, 1, 1, 1]` tensor of `f(t)` in `dtype`, for broadcasting over a batch.
fn per_sample(
    timesteps: &[usize],
    f: impl Fn(usize) -> f64,
    like: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    let vals: Vec<f32> = timesteps.iter().map(|&t| f(t) as f32).collect();
    Tensor::from_vec(vals, (timesteps.len(), 1, 1, 1), like.device())?.to_dtype(dtype)
}

/// Noises `latents` (`[b, c, h, w]`, already scaled by the VAE's scaling factor).
///
/// Draws from `rng`, in this order: ε `[b, c, h, w]`; if the offset is not 0,
/// the offset noise `[b, c, 1, 1]` (added as `offset · N(0, 1)` to ε, so the
/// target includes it, as in diffusers); the multi-resolution levels (see
/// [`pyramid_noise`], also part of the target); the `b` timesteps; then, with
/// input perturbation, its strength (when random) and its noise, which only
/// the UNet's input sees. With the default options the stream is ε and the
/// timesteps, as before these options existed.
pub fn make_noisy_batch(
    schedule: &NoiseSchedule,
    latents: &Tensor,
    opts: &NoiseOptions,
    rng: &mut Rng,
) -> Result<NoisyBatch> {
    let dims = latents.dims();
    if dims.len() != 4 {
        candle_core::bail!(
            "make_noisy_batch: latents must be [batch, channels, height, width], got shape {:?}",
            dims
        );
    }
    let (b, c) = (dims[0], dims[1]);
    let (device, dtype) = (latents.device(), latents.dtype());
    let max_t = opts
        .max_timestep
        .unwrap_or(schedule.len())
        .min(schedule.len());
    if opts.min_timestep >= max_t {
        candle_core::bail!(
            "timesteps: min_timestep {} must be below max_timestep {max_t} (the schedule has {} steps)",
            opts.min_timestep,
            schedule.len()
        );
    }

    let mut noise = randn(dims, rng, device)?;
    if opts.offset != 0.0 {
        let offset = (randn(&[b, c, 1, 1], rng, device)? * opts.offset)?;
        noise = noise.broadcast_add(&offset)?;
    }
    if opts.multires_iterations > 0 {
        let mut host = noise.flatten_all()?.to_vec1::<f32>()?;
        pyramid_noise(
            &mut host,
            [dims[0], dims[1], dims[2], dims[3]],
            opts.multires_iterations,
            opts.multires_discount,
            rng,
        );
        noise = Tensor::from_vec(host, dims, device)?;
    }
    let noise = noise.to_dtype(dtype)?;
    let timesteps = sample_timesteps_in(b, opts.min_timestep, max_t, rng);
    let input_noise = if opts.ip_noise_gamma != 0.0 {
        let strength = if opts.ip_noise_random_strength {
            rng.next_f64() * opts.ip_noise_gamma
        } else {
            opts.ip_noise_gamma
        };
        let n: usize = dims.iter().product();
        let extra = Tensor::from_vec(randn_vec(n, rng), dims, device)?.to_dtype(dtype)?;
        (&noise + (extra * strength)?)?
    } else {
        noise.clone()
    };

    let sqrt_ab = per_sample(&timesteps, |t| schedule.coefficients(t).0, latents, dtype)?;
    let sqrt_1m_ab = per_sample(&timesteps, |t| schedule.coefficients(t).1, latents, dtype)?;
    let noisy = (latents.broadcast_mul(&sqrt_ab)? + input_noise.broadcast_mul(&sqrt_1m_ab)?)?;
    let target = match schedule.prediction {
        Prediction::Epsilon => noise,
        Prediction::V => (noise.broadcast_mul(&sqrt_ab)? - latents.broadcast_mul(&sqrt_1m_ab)?)?,
    };
    Ok(NoisyBatch {
        noisy,
        target,
        timesteps,
    })
}

/// The per-sample weights `loss_weights[i] · min_snr_weight(t_i, γ) ·
/// debiased(t_i)` (the second factor only when `min_snr_gamma` is set, the
/// third only with debiased estimation).
pub fn sample_weights(
    timesteps: &[usize],
    loss_weights: &[f32],
    schedule: &NoiseSchedule,
    opts: &LossOptions,
) -> Vec<f64> {
    timesteps
        .iter()
        .zip(loss_weights)
        .map(|(&t, &w)| {
            let snr_w = opts
                .min_snr_gamma
                .map_or(1.0, |g| schedule.min_snr_weight(t, g));
            let debiased = if opts.debiased_estimation {
                // kohya caps the SNR at 1000 (t = 0); the floor keeps a zero
                // terminal SNR finite with ε prediction.
                let snr = schedule.snr(t).clamp(1e-4, 1000.0);
                match schedule.prediction {
                    Prediction::Epsilon => 1.0 / snr.sqrt(),
                    Prediction::V => 1.0 / (snr + 1.0),
                }
            } else {
                1.0
            };
            w as f64 * snr_w * debiased
        })
        .collect()
}

/// The training loss: mean over the batch of `weight_i · L_i`, where `L_i` is
/// the mean over sample i's elements of the chosen per-element loss of
/// `pred − target` and `weight_i` is given by [`sample_weights`].
///
/// Computed in `pred`'s dtype (f32 in training) with differentiable ops, so
/// `loss.backward()` reaches `pred`. `pred` and `target` must have the same
/// shape `[b, …]`; `timesteps` and `loss_weights` must have `b` entries.
pub fn weighted_loss(
    pred: &Tensor,
    target: &Tensor,
    timesteps: &[usize],
    loss_weights: &[f32],
    schedule: &NoiseSchedule,
    opts: &LossOptions,
) -> Result<Tensor> {
    masked_weighted_loss(pred, target, timesteps, loss_weights, schedule, opts, None)
}

/// [`weighted_loss`] with a loss mask: `mask` (`[b, 1, h, w]` on the latent
/// grid, values in [0, 1]) multiplies each element's loss by
/// `u + (1 − u)·mask` (`u` = `opts.unmasked_weight`) before the mean over
/// the sample's elements — the whole latent, as kohya divides, so a sample
/// whose mask is half white weighs half as much.
pub fn masked_weighted_loss(
    pred: &Tensor,
    target: &Tensor,
    timesteps: &[usize],
    loss_weights: &[f32],
    schedule: &NoiseSchedule,
    opts: &LossOptions,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    if pred.dims() != target.dims() || pred.rank() < 1 {
        candle_core::bail!(
            "weighted_loss: prediction shape {:?} and target shape {:?} must be equal and [batch, …]",
            pred.dims(),
            target.dims()
        );
    }
    let b = pred.dim(0)?;
    if timesteps.len() != b || loss_weights.len() != b {
        candle_core::bail!(
            "weighted_loss: batch of {b} but {} timesteps and {} loss weights",
            timesteps.len(),
            loss_weights.len()
        );
    }
    let dtype = pred.dtype();
    let diff = (pred - target.to_dtype(dtype)?)?;
    let per_element = match opts.loss_type {
        LossType::L2 => diff.sqr()?,
        LossType::L1 => diff.abs()?,
        kind @ (LossType::Huber | LossType::SmoothL1) => {
            let c = opts.thresholds(timesteps, schedule);
            let mut shape = vec![b];
            shape.resize(pred.rank(), 1);
            let c32: Vec<f32> = c.iter().map(|&x| x as f32).collect();
            let c = Tensor::from_vec(c32, shape, pred.device())?.to_dtype(dtype)?;
            // √(d² + c²) − c, then 2c· (Huber) or 2· (smooth L1).
            let root = diff
                .sqr()?
                .broadcast_add(&c.sqr()?)?
                .sqrt()?
                .broadcast_sub(&c)?;
            match kind {
                LossType::Huber => root.broadcast_mul(&(c * 2.0)?)?,
                _ => (root * 2.0)?,
            }
        }
    };
    let per_element = match mask {
        Some(m) => {
            let u = opts.unmasked_weight;
            per_element.broadcast_mul(&m.to_dtype(dtype)?.affine(1.0 - u, u)?)?
        }
        None => per_element,
    };
    let per_sample = per_element.flatten_from(1)?.mean(1)?; // [b]
    let weights: Vec<f32> = sample_weights(timesteps, loss_weights, schedule, opts)
        .into_iter()
        .map(|w| w as f32)
        .collect();
    let weights = Tensor::from_vec(weights, b, pred.device())?.to_dtype(dtype)?;
    (per_sample * weights)?.mean_all()
}
