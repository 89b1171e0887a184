//! Deterministic randomness for training: Gaussian noise and timesteps.
//!
//! Everything is drawn from [`sd_lora_data::rng::Rng`], a generator whose stream
//! this project fixes, rather than from a device RNG: the trainer derives one
//! generator per (seed, step, micro-batch) with `Rng::derive`, so the same seed
//! gives bit-identical runs on CPU and a resumed run needs no saved RNG state.
//! Noise is generated on the host and copied to the device, which is cheap next
//! to a UNet step and makes CPU and GPU runs see the same noise.

use candle_core::{Device, Result, Tensor};
use sd_lora_data::rng::Rng;

/// An f32 tensor of independent N(0, 1) samples, by the Box–Muller transform.
///
/// Values are produced in pairs (cos, sin) from two uniforms, in row-major
/// order; the stream consumed is `2·⌈n/2⌉` draws for `n` elements.
pub fn randn(shape: &[usize], rng: &mut Rng, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // 1 − u ∈ (0, 1], so the logarithm is finite.
        let u1 = 1.0 - rng.next_f64();
        let u2 = rng.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    Tensor::from_vec(out, shape, device)
}

/// `batch` timesteps drawn uniformly from `[0, num_train_timesteps)`.
///
/// `num_train_timesteps` must be non-zero (a built `NoiseSchedule` has ≥ 2).
pub fn sample_timesteps(batch: usize, num_train_timesteps: usize, rng: &mut Rng) -> Vec<usize> {
    let n = num_train_timesteps.max(1) as u64;
    (0..batch).map(|_| rng.below(n) as usize).collect()
}
