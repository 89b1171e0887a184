//! LayerNorm and GroupNorm with an analytic backward.
//!
//! candle-nn's `LayerNorm::forward` takes a fused kernel without a backward for
//! contiguous inputs (the usual case), which silently cuts the gradient; its
//! `GroupNorm` is differentiable but built from a dozen primitives that each keep
//! an intermediate and leave zero-filled gradient entries for the frozen affine
//! parameters. Here the forward is computed without a graph and the backward is
//! the closed form, with `x̂ = (x − μ)·rstd`:
//!
//! ```text
//! dx̂ = g·γ
//! dx = rstd · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂))     (means over each normalised group)
//! dγ = Σ g·x̂,  dβ = Σ g                                (sums over everything but the channel)
//! ```
//!
//! Only the per-row mean and `rstd` are kept for the backward; `x̂` is recomputed
//! from the input, which the graph keeps anyway. Half-precision inputs are
//! normalised in f32.

use candle_core::{D, DType, Result, Tensor, bail};

use super::custom_grad::with_grad3;

/// The dtype statistics are computed in: f32 for half-precision inputs.
pub(crate) fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// Mean and `1/sqrt(var + eps)` over the last dimension (kept as size 1).
pub(crate) fn stats(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    Ok((mean, rstd))
}

/// `dx` from `dx̂` and `x̂`, both shaped `[rows, n]` with the normalisation over `n`.
pub(crate) fn normalise_backward(dxhat: &Tensor, xhat: &Tensor, rstd: &Tensor) -> Result<Tensor> {
    let mean_dxhat = dxhat.mean_keepdim(D::Minus1)?;
    let mean_dxhat_xhat = (dxhat * xhat)?.mean_keepdim(D::Minus1)?;
    dxhat
        .broadcast_sub(&mean_dxhat)?
        .sub(&xhat.broadcast_mul(&mean_dxhat_xhat)?)?
        .broadcast_mul(rstd)
}

/// Layer normalisation over the last dimension: `(x − μ)/σ · γ + β` with
/// `γ, β: [n]` for `x: (..., n)`. `x`, `γ` and `β` all receive gradients when they
/// take part in the graph (a frozen `γ`/`β` gets none).
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let n = x.dim(D::Minus1)?;
    if gamma.dims1()? != n || beta.dims1()? != n {
        bail!(
            "layer_norm: input {:?} with gamma {:?} and beta {:?}",
            x.dims(),
            gamma.dims(),
            beta.dims()
        )
    }
    let dtype = x.dtype();
    let cdt = compute_dtype(dtype);
    let rows = x.elem_count() / n.max(1);
    let xc = x.detach().to_dtype(cdt)?.reshape((rows, n))?;
    let (mean, rstd) = stats(&xc, eps)?;
    let gamma_c = gamma.detach().to_dtype(cdt)?;
    let beta_c = beta.detach().to_dtype(cdt)?;
    let y = xc
        .broadcast_sub(&mean)?
        .broadcast_mul(&rstd)?
        .broadcast_mul(&gamma_c)?
        .broadcast_add(&beta_c)?
        .to_dtype(dtype)?
        .reshape(x.shape())?;
    with_grad3("layer-norm", [x, gamma, beta], y, move |a| {
        let [x, _, _] = a.inputs;
        let [need_x, need_gamma, need_beta] = a.needs_grad;
        let g = a.grad.to_dtype(cdt)?.reshape((rows, n))?;
        let xhat = || -> Result<Tensor> {
            x.to_dtype(cdt)?
                .reshape((rows, n))?
                .broadcast_sub(&mean)?
                .broadcast_mul(&rstd)
        };
        let xhat = if need_x || need_gamma {
            Some(xhat()?)
        } else {
            None
        };
        let dx = match (&xhat, need_x) {
            (Some(xhat), true) => {
                let dxhat = g.broadcast_mul(&gamma_c)?;
                Some(normalise_backward(&dxhat, xhat, &rstd)?.reshape(x.shape())?)
            }
            _ => None,
        };
        let dgamma = match (&xhat, need_gamma) {
            (Some(xhat), true) => Some((&g * xhat)?.sum(0)?),
            _ => None,
        };
        let dbeta = if need_beta { Some(g.sum(0)?) } else { None };
        Ok([dx, dgamma, dbeta])
    })
}

/// Group normalisation of `x: [batch, channels, ...]` over `groups` groups of
/// channels (and all spatial positions), then a per-channel `γ, β: [channels]`.
/// All three receive gradients when they take part in the graph.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 {
        bail!("group_norm: input {dims:?} has no channel dimension")
    }
    let (b, c) = (dims[0], dims[1]);
    if groups == 0 || c % groups != 0 {
        bail!("group_norm: {c} channels cannot be split into {groups} groups")
    }
    if gamma.dims1()? != c || beta.dims1()? != c {
        bail!(
            "group_norm: input {dims:?} with gamma {:?} and beta {:?}",
            gamma.dims(),
            beta.dims()
        )
    }
    let spatial: usize = dims[2..].iter().product();
    let per_group = c / groups * spatial;
    let dtype = x.dtype();
    let cdt = compute_dtype(dtype);
    // Grouped view `[b·groups, per_group]` for the statistics, channel view
    // `[b, c, spatial]` for the affine part.
    let grouped = (b * groups, per_group);
    let channels = (b, c, spatial);
    let xc = x.detach().to_dtype(cdt)?.reshape(grouped)?;
    let (mean, rstd) = stats(&xc, eps)?;
    let gamma_c = gamma.detach().to_dtype(cdt)?.reshape((1, c, 1))?;
    let beta_c = beta.detach().to_dtype(cdt)?.reshape((1, c, 1))?;
    let y = xc
        .broadcast_sub(&mean)?
        .broadcast_mul(&rstd)?
        .reshape(channels)?
        .broadcast_mul(&gamma_c)?
        .broadcast_add(&beta_c)?
        .to_dtype(dtype)?
        .reshape(x.shape())?;
    with_grad3("group-norm", [x, gamma, beta], y, move |a| {
        let [x, _, _] = a.inputs;
        let [need_x, need_gamma, need_beta] = a.needs_grad;
        let g = a.grad.to_dtype(cdt)?.reshape(channels)?;
        let xhat = if need_x || need_gamma {
            Some(
                x.to_dtype(cdt)?
                    .reshape(grouped)?
                    .broadcast_sub(&mean)?
                    .broadcast_mul(&rstd)?,
            )
        } else {
            None
        };
        let dx = match (&xhat, need_x) {
            (Some(xhat), true) => {
                let dxhat = g.broadcast_mul(&gamma_c)?.reshape(grouped)?;
                Some(normalise_backward(&dxhat, xhat, &rstd)?.reshape(x.shape())?)
            }
            _ => None,
        };
        let dgamma = match (&xhat, need_gamma) {
            (Some(xhat), true) => Some((&g * xhat.reshape(channels)?)?.sum((0, 2))?),
            _ => None,
        };
        let dbeta = if need_beta {
            Some(g.sum((0, 2))?)
        } else {
            None
        };
        Ok([dx, dgamma, dbeta])
    })
}
