//! The denoising objective: noising a batch of latents and the weighted MSE.
//!
//! As in diffusers' and kohya's training scripts: per-sample timesteps,
//! `x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε`, target ε (or `v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀`),
//! optional noise offset, and a per-sample MSE weighted by min-SNR-γ and by a
//! per-sample loss weight (which is how prior preservation weights class images).

use candle_core::{DType, Result, Tensor};
use sd_lora_data::rng::Rng;
use sd_lora_model::schedule::{NoiseSchedule, Prediction};

use crate::noise::{randn, sample_timesteps};

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
/// Draws from `rng`, in this order: ε `[b, c, h, w]`; if `noise_offset ≠ 0`, the
/// offset noise `[b, c, 1, 1]` (added as `offset · N(0, 1)` to ε, so the target
/// includes it, as in diffusers); then the `b` timesteps.
pub fn make_noisy_batch(
    schedule: &NoiseSchedule,
    latents: &Tensor,
    noise_offset: f64,
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

    let mut noise = randn(dims, rng, device)?;
    if noise_offset != 0.0 {
        let offset = (randn(&[b, c, 1, 1], rng, device)? * noise_offset)?;
        noise = noise.broadcast_add(&offset)?;
    }
    let noise = noise.to_dtype(dtype)?;
    let timesteps = sample_timesteps(b, schedule.len(), rng);

    let sqrt_ab = per_sample(&timesteps, |t| schedule.coefficients(t).0, latents, dtype)?;
    let sqrt_1m_ab = per_sample(&timesteps, |t| schedule.coefficients(t).1, latents, dtype)?;
    let noisy = (latents.broadcast_mul(&sqrt_ab)? + noise.broadcast_mul(&sqrt_1m_ab)?)?;
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

/// The per-sample weights `loss_weights[i] · min_snr_weight(t_i, γ)` (the second
/// factor only when `min_snr_gamma` is set).
pub fn sample_weights(
    timesteps: &[usize],
    loss_weights: &[f32],
    schedule: &NoiseSchedule,
    min_snr_gamma: Option<f64>,
) -> Vec<f64> {
    timesteps
        .iter()
        .zip(loss_weights)
        .map(|(&t, &w)| {
            let snr_w = min_snr_gamma.map_or(1.0, |g| schedule.min_snr_weight(t, g));
            w as f64 * snr_w
        })
        .collect()
}

/// The training loss: mean over the batch of `weight_i · MSE_i`, where `MSE_i`
/// is sample i's mean squared error over all its elements and `weight_i` is
/// given by [`sample_weights`].
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
    min_snr_gamma: Option<f64>,
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
    let mse = diff.sqr()?.flatten_from(1)?.mean(1)?; // [b]
    let weights: Vec<f32> = sample_weights(timesteps, loss_weights, schedule, min_snr_gamma)
        .into_iter()
        .map(|w| w as f32)
        .collect();
    let weights = Tensor::from_vec(weights, b, pred.device())?.to_dtype(dtype)?;
    (mse * weights)?.mean_all()
}
