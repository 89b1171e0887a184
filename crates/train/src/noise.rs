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
    Tensor::from_vec(randn_vec(n, rng), shape, device)
}

/// `n` independent N(0, 1) samples, as [`randn`] draws them.
pub fn randn_vec(n: usize, rng: &mut Rng) -> Vec<f32> {
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
    out
}

/// `batch` timesteps drawn uniformly from `[0, num_train_timesteps)`.
///
/// `num_train_timesteps` must be non-zero (a built `NoiseSchedule` has ≥ 2).
pub fn sample_timesteps(batch: usize, num_train_timesteps: usize, rng: &mut Rng) -> Vec<usize> {
    sample_timesteps_in(batch, 0, num_train_timesteps, rng)
}

/// `batch` timesteps drawn uniformly from `[min, max)` (kohya's
/// `--min_timestep` / `--max_timestep`); `max > min` is required (an empty
/// range gives `min`).
pub fn sample_timesteps_in(batch: usize, min: usize, max: usize, rng: &mut Rng) -> Vec<usize> {
    let n = max.saturating_sub(min).max(1) as u64;
    (0..batch).map(|_| min + rng.below(n) as usize).collect()
}

/// Multi-resolution ("pyramid") noise, as kohya's `pyramid_noise_like`
/// (after Whitaker's multi-resolution noise): to `noise` (`[b, c, h, w]`,
/// row-major) it adds, for i = 0, 1, …, `iterations − 1`, fresh noise drawn
/// at `h / rⁱ × w / rⁱ` (r uniform in [2, 4) per level, at least 1×1),
/// upsampled bilinearly and scaled by `discountⁱ`, stopping after the first
/// level that reaches one pixel; then it divides by the result's standard
/// deviation (unbiased, over the whole batch) to keep unit variance. Low
/// frequencies get more noise than plain Gaussian noise has, which lets a
/// LoRA change an image's overall brightness and composition.
///
/// Draws per level: one uniform for r, then the level's noise.
pub fn pyramid_noise(
    noise: &mut [f32],
    [b, c, h, w]: [usize; 4],
    iterations: usize,
    discount: f64,
    rng: &mut Rng,
) {
    for i in 0..iterations {
        let r = rng.next_f64() * 2.0 + 2.0;
        let scale = r.powi(i as i32);
        let hn = ((h as f64 / scale) as usize).max(1);
        let wn = ((w as f64 / scale) as usize).max(1);
        let low = randn_vec(b * c * hn * wn, rng);
        let up = upsample_bilinear(&low, b * c, (hn, wn), (h, w));
        let weight = discount.powi(i as i32) as f32;
        for (x, u) in noise.iter_mut().zip(&up) {
            *x += u * weight;
        }
        if hn == 1 || wn == 1 {
            break;
        }
    }
    let n = noise.len() as f64;
    let mean = noise.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = noise
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0).max(1.0);
    let inv = (1.0 / var.sqrt()) as f32;
    noise.iter_mut().for_each(|x| *x *= inv);
}

/// Bilinear resize of `planes` row-major `src` planes from `(hs, ws)` to
/// `(h, w)`, as PyTorch's `interpolate(mode="bilinear", align_corners=False)`:
/// output pixel centres mapped back onto the input, clamped at the edges.
pub fn upsample_bilinear(
    src: &[f32],
    planes: usize,
    (hs, ws): (usize, usize),
    (h, w): (usize, usize),
) -> Vec<f32> {
    // Source coordinate, lower index, whether there is an upper neighbour,
    // and the weight of the upper one.
    let axis = |out: usize, inp: usize| -> Vec<(usize, usize, f32)> {
        let scale = inp as f32 / out as f32;
        (0..out)
            .map(|o| {
                let s = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
                let i0 = (s as usize).min(inp - 1);
                let step = usize::from(i0 < inp - 1);
                (i0, step, s - i0 as f32)
            })
            .collect()
    };
    let ys = axis(h, hs);
    let xs = axis(w, ws);
    let mut out = vec![0.0f32; planes * h * w];
    for p in 0..planes {
        let plane = &src[p * hs * ws..(p + 1) * hs * ws];
        for (oy, &(y0, dy, ly)) in ys.iter().enumerate() {
            for (ox, &(x0, dx, lx)) in xs.iter().enumerate() {
                let at = |y: usize, x: usize| plane[y * ws + x];
                let top = at(y0, x0) * (1.0 - lx) + at(y0, x0 + dx) * lx;
                let bottom = at(y0 + dy, x0) * (1.0 - lx) + at(y0 + dy, x0 + dx) * lx;
                out[p * h * w + oy * w + ox] = top * (1.0 - ly) + bottom * ly;
            }
        }
    }
    out
}
