//! Activations: GELU (erf), quick-GELU, GEGLU and SiLU.
//!
//! candle's `gelu_erf` has a backward, but it uses `1/√(2π)` rounded to six digits
//! (0.398942), so its gradient is off by a few 1e-7 relative (measured 2.6e-7 on
//! N(0, 4) inputs, against 4e-11 for the exact form): four orders of magnitude
//! above finite-difference noise in f64, and a systematic disagreement with
//! PyTorch. [`gelu`] and [`geglu`] therefore use the exact derivative. [`silu`] is candle's own op,
//! whose backward is exact (the tests check it).

use candle_core::{D, Result, Tensor, bail};

use super::custom_grad::with_grad1;

/// `1/√(2π)`.
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// Derivative of the erf GELU: `Φ(x) + x·φ(x)`.
fn gelu_derivative(x: &Tensor) -> Result<Tensor> {
    let cdf = ((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5;
    let pdf = ((x.sqr()? * -0.5)?.exp()? * INV_SQRT_2PI)?;
    cdf? + (x * pdf)?
}

/// GELU with the exact erf form, `x·Φ(x)` (PyTorch's default `F.gelu`).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let y = x.detach().gelu_erf()?;
    with_grad1("gelu", x, y, |a| {
        let [x] = a.inputs;
        Ok([Some((a.grad * gelu_derivative(x)?)?)])
    })
}

/// CLIP's quick-GELU, `x·σ(1.702·x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    const K: f64 = 1.702;
    let xd = x.detach();
    let y = (&xd * candle_nn::ops::sigmoid(&(&xd * K)?)?)?;
    with_grad1("quick-gelu", x, y, |a| {
        let [x] = a.inputs;
        // d/dx x·s(kx) = s + k·x·s·(1 − s), with s recomputed rather than kept.
        let s = candle_nn::ops::sigmoid(&(x * K)?)?;
        let ds = ((x * K)? * (&s * (1.0 - &s)?)?)?;
        Ok([Some((a.grad * (s + ds)?)?)])
    })
}

/// GEGLU as in diffusers' feed-forward: the last dimension of `x` (of size `2·d`)
/// splits into `h` (first half) and `gate` (second half); the result is
/// `h · gelu(gate)`, of size `d`.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(D::Minus1)?;
    if n % 2 != 0 {
        bail!("geglu: last dimension {n} is odd")
    }
    let d = n / 2;
    let xd = x.detach();
    let y = match super::with_cpu_f32(&xd, |x| cpu_geglu::forward(x, d)) {
        Some(y) => {
            let mut dims = x.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = d;
            }
            Tensor::from_vec(y, dims, x.device())?
        }
        None => {
            let h = xd.narrow(D::Minus1, 0, d)?;
            let gate = xd.narrow(D::Minus1, d, d)?;
            (h * gate.gelu_erf()?)?
        }
    };
    with_grad1("geglu", x, y, move |a| {
        Ok([Some(geglu_backward(a.inputs[0], a.grad)?)])
    })
}

/// The gradient of [`geglu`] with respect to its input `x` (last dimension
/// `2·d`) given the gradient `grad` of its output (last dimension `d`).
pub(crate) fn geglu_backward(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let d = grad.dim(D::Minus1)?;
    if x.dim(D::Minus1)? != 2 * d || x.elem_count() != 2 * grad.elem_count() {
        bail!(
            "geglu: input {:?} for a gradient {:?}",
            x.dims(),
            grad.dims()
        )
    }
    let fast = super::with_cpu_f32(x, |x| {
        super::with_cpu_f32(grad, |g| cpu_geglu::backward(x, g, d))
    });
    if let Some(Some(dx)) = fast {
        return Tensor::from_vec(dx, x.dims(), x.device());
    }
    let h = x.narrow(D::Minus1, 0, d)?;
    let gate = x.narrow(D::Minus1, d, d)?;
    let dh = (grad * gate.gelu_erf()?)?;
    let dgate = ((grad * h)? * gelu_derivative(&gate)?)?;
    Tensor::cat(&[dh, dgate], D::Minus1)
}

/// GEGLU on contiguous f32 rows `[h | gate]` of width `2·d`, forward and
/// backward each in one parallel pass. Built from tensor ops, the backward
/// takes fifteen passes over the activations and evaluates `erf` twice; here
/// each element's `erf` and `exp` are computed once. Same formulas (and the
/// same `erff` as candle's `gelu_erf`) as the generic path.
mod cpu_geglu {
    use rayon::prelude::*;

    /// Rows per parallel task: enough work to amortise the task.
    fn rows_per_task(d: usize) -> usize {
        (16_384 / d.max(1)).max(1)
    }

    /// Φ(v) = ½(1 + erf(v/√2)), the standard normal CDF.
    #[inline]
    fn cdf(v: f32) -> f32 {
        (libm::erff(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5
    }

    /// `h · gelu(gate)` per row.
    pub fn forward(x: &[f32], d: usize) -> Vec<f32> {
        let rows = x.len() / (2 * d).max(1);
        let mut y = vec![0f32; rows * d];
        let per = rows_per_task(d);
        y.par_chunks_mut(per * d)
            .zip(x.par_chunks(per * 2 * d))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(2 * d)) {
                    let (h, gate) = x.split_at(d);
                    for ((y, &h), &v) in y.iter_mut().zip(h).zip(gate) {
                        *y = h * (cdf(v) * v);
                    }
                }
            });
        y
    }

    /// `[g · gelu(gate) | g · h · gelu'(gate)]` per row, gelu'(v) = Φ(v) + v·φ(v).
    pub fn backward(x: &[f32], g: &[f32], d: usize) -> Vec<f32> {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        let rows = g.len() / d.max(1);
        let mut dx = vec![0f32; rows * 2 * d];
        let per = rows_per_task(d);
        dx.par_chunks_mut(per * 2 * d)
            .zip(x.par_chunks(per * 2 * d))
            .zip(g.par_chunks(per * d))
            .for_each(|((dx, x), g)| {
                for ((dx, x), g) in dx
                    .chunks_exact_mut(2 * d)
                    .zip(x.chunks_exact(2 * d))
                    .zip(g.chunks_exact(d))
                {
                    let (dh, dgate) = dx.split_at_mut(d);
                    let (h, gate) = x.split_at(d);
                    for i in 0..d {
                        let (v, gi) = (gate[i], g[i]);
                        let phi = cdf(v);
                        let pdf = (-0.5 * v * v).exp() * INV_SQRT_2PI;
                        dh[i] = gi * (phi * v);
                        dgate[i] = gi * h[i] * (phi + v * pdf);
                    }
                }
            });
        dx
    }
}

/// SiLU, `x·σ(x)`: candle's op, whose backward is exact.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}
