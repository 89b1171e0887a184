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
    let h = xd.narrow(D::Minus1, 0, d)?;
    let gate = xd.narrow(D::Minus1, d, d)?;
    let y = (h * gate.gelu_erf()?)?;
    with_grad1("geglu", x, y, move |a| {
        let [x] = a.inputs;
        let h = x.narrow(D::Minus1, 0, d)?;
        let gate = x.narrow(D::Minus1, d, d)?;
        let dh = (a.grad * gate.gelu_erf()?)?;
        let dgate = ((a.grad * h)? * gelu_derivative(&gate)?)?;
        Ok([Some(Tensor::cat(&[dh, dgate], D::Minus1)?)])
    })
}

/// SiLU, `x·σ(x)`: candle's op, whose backward is exact.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}
