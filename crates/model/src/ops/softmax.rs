//! Softmax over the last dimension, with a backward.
//!
//! `candle_nn::ops::softmax_last_dim` is a fused kernel without a backward: a
//! gradient through it is silently zero. `candle_nn::ops::softmax` is
//! differentiable but built from five primitive ops, each of which keeps its
//! intermediate for the backward. Here a fused kernel runs the forward and the
//! backward is the analytic `dx = y·(g − Σ g·y)`, written in terms of the output so
//! nothing else needs to be kept.
//!
//! On the CPU in f32 the forward is [`softmax_rows`]: candle-nn's kernel calls
//! the scalar `expf` once per value, which was 10 % of an SD1.5 step at 512 px
//! (attention over 4,096 tokens: 1.3 G exponentials per step); ours computes the
//! exponential with a polynomial the compiler vectorises (AVX2 + FMA when the
//! CPU has them).

use candle_core::{D, DType, Result, Tensor};
use rayon::prelude::*;

use super::custom_grad::with_grad1;

/// `softmax(x)` over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let y = softmax_rows(&x.detach())?;
    with_grad1("softmax-last-dim", x, y, |a| {
        let y = a.output;
        let dot = (a.grad * y)?.sum_keepdim(D::Minus1)?;
        let dx = (a.grad.broadcast_sub(&dot)? * y)?;
        Ok([Some(dx)])
    })
}

/// `softmax(x)` over the last dimension, without a graph: our kernel on the
/// CPU in f32, candle-nn's fused kernel otherwise.
pub fn softmax_rows(x: &Tensor) -> Result<Tensor> {
    // Both kernels read the input as contiguous rows.
    let x = x.contiguous()?;
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() == 0 {
        return candle_nn::ops::softmax_last_dim(&x);
    }
    let d = x.dim(D::Minus1)?;
    if d == 0 || x.elem_count() == 0 {
        return Ok(x);
    }
    let fast = simd_available();
    let out = super::with_f32_slice(&x, |src| {
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(d)
            .zip(src.par_chunks(d))
            .for_each(|(o, r)| softmax_row(r, o, fast));
        Ok(out)
    })?;
    Tensor::from_vec(out, x.shape(), x.device())
}

/// Whether the CPU runs the AVX2 + FMA builds of the row kernels.
#[cfg(target_arch = "x86_64")]
pub(crate) fn simd_available() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// Whether the CPU runs the AVX2 + FMA builds of the row kernels.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn simd_available() -> bool {
    false
}

fn softmax_row(row: &[f32], out: &mut [f32], fast: bool) {
    out.copy_from_slice(row);
    softmax_in_place(out, fast);
}

/// Softmax of one row in place; returns its log-sum-exp `max + ln Σ exp(x − max)`
/// (NaN when every value is −∞ or one is NaN: the row is then all NaN, as
/// candle-nn's kernel gives). `fast`: [`simd_available`].
pub(crate) fn softmax_in_place(row: &mut [f32], fast: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: `fast` is true only when the CPU has AVX2 and FMA.
        return unsafe { softmax_in_place_avx2(row) };
    }
    let _ = fast;
    softmax_in_place_generic(row)
}

/// `row[i] = exp(row[i] − shift)` (for `row[i] ≤ shift`); `fast`: [`simd_available`].
pub(crate) fn exp_shifted_in_place(row: &mut [f32], shift: f32, fast: bool) {
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: `fast` is true only when the CPU has AVX2 and FMA.
        return unsafe { exp_shifted_avx2(row, shift) };
    }
    let _ = fast;
    exp_shifted_generic(row, shift)
}

/// [`softmax_in_place_generic`] compiled for AVX2 + FMA (8 lanes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_in_place_avx2(row: &mut [f32]) -> f32 {
    softmax_in_place_generic(row)
}

/// [`exp_shifted_generic`] compiled for AVX2 + FMA (8 lanes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(row: &mut [f32], shift: f32) {
    exp_shifted_generic(row, shift)
}

#[inline(always)]
fn exp_shifted_generic(row: &mut [f32], shift: f32) {
    for v in row.iter_mut() {
        *v = exp(*v - shift);
    }
}

/// One row in place: `exp(x − max) / Σ exp(x − max)`. Each pass is a plain
/// loop over the row (eight running maxima / sums, so the compiler may keep
/// them in vector lanes: float additions are not reassociated for it).
#[inline(always)]
fn softmax_in_place_generic(row: &mut [f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let mut max = tail
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for m in lanes {
        max = if m > max { m } else { max };
    }
    if max == f32::NEG_INFINITY || max.is_nan() {
        // Every score masked (or a NaN): candle-nn gives NaN here too; keep
        // the same result rather than inventing one.
        row.fill(f32::NAN);
        return f32::NAN;
    }
    exp_shifted_generic(row, max);
    let mut sums = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (s, &v) in sums.iter_mut().zip(c) {
            *s += v;
        }
    }
    let sum = sums.iter().sum::<f32>() + tail.iter().sum::<f32>();
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
    max + sum.ln()
}

/// `eˣ` for `x ≤ 0` (softmax's shifted scores) within 2 ulp, without a libm
/// call so that loops over it vectorise: `eˣ = 2ⁿ·eʳ` with `n = round(x·log₂e)`,
/// `r = x − n·ln 2` (split in two constants, so `r` is exact to ~1e-11), and
/// `eʳ` by its Taylor polynomial of degree 7 on `|r| ≤ ln 2 / 2` (truncation
/// error < 3e-9). Below −87.3 (`2ⁿ` would leave the normal range) the result
/// is 0, and −∞ gives 0.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = if x < -87.3 { -87.3 } else { x };
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.3 { 0.0 } else { p * scale }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    /// Our exponential against the standard library's over softmax's range,
    /// and our rows against candle-nn's kernel (long and short rows, ragged
    /// lengths, −∞ entries as CLIP's causal mask makes, large magnitudes).
    #[test]
    fn matches_candle_nn() {
        let mut worst = 0f64;
        let mut x = 0f32;
        while x > -100.0 {
            let (ours, std) = (super::exp(x) as f64, (x as f64).exp());
            let rel = if std < 1e-37 {
                ours
            } else {
                (ours - std).abs() / std
            };
            worst = worst.max(rel);
            x -= 0.0137;
        }
        assert!(worst < 4e-7, "exp: worst relative error {worst}");
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);

        let dev = Device::Cpu;
        for (rows, d) in [(3, 4096), (5, 77), (2, 7), (4, 1)] {
            let x = (Tensor::randn(0f32, 1.0, (rows, d), &dev).unwrap() * 30.0).unwrap();
            let ours = super::softmax_rows(&x).unwrap();
            let theirs = candle_nn::ops::softmax_last_dim(&x).unwrap();
            let diff = (&ours - &theirs)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-6, "{rows}×{d}: {diff}");
        }
        // A causal mask: −∞ above the diagonal gives exact zeros.
        let mask: Vec<f32> = (0..16)
            .map(|i| {
                if i % 4 > i / 4 {
                    f32::NEG_INFINITY
                } else {
                    i as f32 * 0.1
                }
            })
            .collect();
        let y = super::softmax_rows(&Tensor::from_vec(mask, (4, 4), &dev).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, row) in y.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                assert!(if j > i { v == 0.0 } else { v > 0.0 }, "row {i}: {row:?}");
            }
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }
}
