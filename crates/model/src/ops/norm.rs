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

/// The dtype norm statistics and attention are computed in: f32 for
/// half-precision inputs.
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
    if let Some(y) = layer_norm_cpu_f32(x, gamma, beta, eps, rows, n)? {
        return Ok(y);
    }
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
        let xhat = if need_x || need_gamma {
            Some(
                x.to_dtype(cdt)?
                    .reshape((rows, n))?
                    .broadcast_sub(&mean)?
                    .broadcast_mul(&rstd)?,
            )
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

/// [`layer_norm`] for contiguous f32 CPU tensors with frozen `γ, β` (the LoRA
/// case): forward and input gradient each in one parallel pass over the rows,
/// instead of a dozen tensor ops (several of them single-threaded reductions).
/// The row statistics are kept from the forward for the backward. `None` when
/// the inputs do not qualify.
fn layer_norm_cpu_f32(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    rows: usize,
    n: usize,
) -> Result<Option<Tensor>> {
    use rayon::prelude::*;
    if gamma.track_op() || beta.track_op() || n == 0 {
        return Ok(None);
    }
    let (gamma, beta) = (gamma.detach(), beta.detach());
    let per = (16_384 / n).max(1);
    let forward = super::with_cpu_f32(x, |xs| {
        super::with_cpu_f32(&gamma, |gs| {
            super::with_cpu_f32(&beta, |bs| {
                let mut y = vec![0f32; rows * n];
                let mut stats = vec![(0f32, 0f32); rows];
                y.par_chunks_mut(per * n)
                    .zip(stats.par_chunks_mut(per))
                    .zip(xs.par_chunks(per * n))
                    .for_each(|((y, st), x)| {
                        for ((y, st), x) in y.chunks_exact_mut(n).zip(st).zip(x.chunks_exact(n)) {
                            let mean = row_sum(x, |v| v) / n as f32;
                            let var = row_sum(x, |v| (v - mean) * (v - mean)) / n as f32;
                            let rstd = 1.0 / (var + eps as f32).sqrt();
                            for (((y, &v), &g), &b) in y.iter_mut().zip(x).zip(gs).zip(bs) {
                                *y = (v - mean) * rstd * g + b;
                            }
                            *st = (mean, rstd);
                        }
                    });
                (y, stats)
            })
        })
    });
    let Some(Some(Some((y, stats)))) = forward else {
        return Ok(None);
    };
    let y = Tensor::from_vec(y, x.shape(), x.device())?;
    let out = with_grad3("layer-norm", [x, &gamma, &beta], y, move |a| {
        let [x, gamma, _] = a.inputs;
        let grad = a.grad.contiguous()?;
        let dx = super::with_cpu_f32(x, |xs| {
            super::with_cpu_f32(gamma, |gs| {
                super::with_cpu_f32(&grad, |gr| {
                    let mut dx = vec![0f32; rows * n];
                    dx.par_chunks_mut(per * n)
                        .zip(stats.par_chunks(per))
                        .zip(xs.par_chunks(per * n).zip(gr.par_chunks(per * n)))
                        .for_each(|((dx, st), (x, g))| {
                            let rows = dx.chunks_exact_mut(n).zip(st);
                            for ((dx, &(mean, rstd)), (x, g)) in
                                rows.zip(x.chunks_exact(n).zip(g.chunks_exact(n)))
                            {
                                // dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)), dx̂ = g·γ.
                                let mut s1 = 0f32;
                                let mut s2 = 0f32;
                                for ((&v, &g), &w) in x.iter().zip(g).zip(gs) {
                                    let d = g * w;
                                    s1 += d;
                                    s2 += d * (v - mean) * rstd;
                                }
                                let (m1, m2) = (s1 / n as f32, s2 / n as f32);
                                for (((dx, &v), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(gs) {
                                    let xhat = (v - mean) * rstd;
                                    *dx = (g * w - m1 - xhat * m2) * rstd;
                                }
                            }
                        });
                    dx
                })
            })
        });
        let Some(Some(Some(dx))) = dx else {
            bail!("layer-norm: the CPU f32 backward got inputs it cannot read")
        };
        Ok([
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            None,
            None,
        ])
    })?;
    Ok(Some(out))
}

/// `Σ f(v)` over a row with eight independent accumulators, so the compiler
/// can vectorise the sum (a single f32 accumulator is a serial dependency).
#[inline]
fn row_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&v| f(v)).sum::<f32>()
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
    if !gamma.track_op()
        && !beta.track_op()
        && let Some((y, st)) = group_norm_cpu_f32(x, groups, gamma, beta, eps, false)
    {
        return with_grad3("group-norm", [x, gamma, beta], y, move |a| {
            let [x, gamma, beta] = a.inputs;
            let dx = group_norm_backward_cpu_f32(x, &st, groups, gamma, beta, a.grad, false);
            match dx {
                Some(dx) => Ok([Some(dx?), None, None]),
                None => bail!("group-norm: the CPU f32 backward got inputs it cannot read"),
            }
        });
    }
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

/// Per-group `(mean, rstd)` of a [`group_norm`], as kept by the CPU f32 kernels.
pub(crate) type GroupStats = Vec<(f32, f32)>;

/// `group_norm(x)` — followed by SiLU when `silu` — for a contiguous f32 CPU
/// `x: [b, c, ...]` and f32 `γ, β`, one parallel pass per group (a group's
/// channels are one contiguous block in NCHW), with the group statistics for
/// [`group_norm_backward_cpu_f32`]. No graph. `None` when the inputs do not
/// qualify (other device or dtype); the generic path then runs.
pub(crate) fn group_norm_cpu_f32(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    silu: bool,
) -> Option<(Tensor, GroupStats)> {
    use rayon::prelude::*;
    let dims = x.dims();
    let (b, c) = (*dims.first()?, *dims.get(1)?);
    if groups == 0 || c % groups != 0 || b == 0 {
        return None;
    }
    let spatial: usize = dims[2..].iter().product();
    let cpg = c / groups;
    let block = cpg * spatial;
    let gamma = gamma.contiguous().ok()?;
    let beta = beta.contiguous().ok()?;
    let (y, st) = super::with_cpu_f32(x, |xs| {
        super::with_cpu_f32(&gamma, |gs| {
            super::with_cpu_f32(&beta, |bs| {
                let mut y = vec![0f32; xs.len()];
                let mut st = vec![(0f32, 0f32); b * groups];
                y.par_chunks_mut(block.max(1))
                    .zip(xs.par_chunks(block.max(1)))
                    .zip(st.par_iter_mut())
                    .enumerate()
                    .for_each(|(gi, ((y, x), st))| {
                        let mean = row_sum(x, |v| v) / block as f32;
                        let var = row_sum(x, |v| (v - mean) * (v - mean)) / block as f32;
                        let rstd = 1.0 / (var + eps as f32).sqrt();
                        *st = (mean, rstd);
                        let ch0 = (gi % groups) * cpg;
                        for (k, (y, x)) in y
                            .chunks_exact_mut(spatial.max(1))
                            .zip(x.chunks_exact(spatial.max(1)))
                            .enumerate()
                        {
                            let (g, bb) = (gs[ch0 + k], bs[ch0 + k]);
                            for (y, &v) in y.iter_mut().zip(x) {
                                let p = (v - mean) * rstd * g + bb;
                                // candle's SiLU formula, so the output is the same.
                                *y = if silu { p / (1.0 + (-p).exp()) } else { p };
                            }
                        }
                    });
                (y, st)
            })
        })
    })???;
    Some((Tensor::from_vec(y, dims, x.device()).ok()?, st))
}

/// The input gradient of [`group_norm_cpu_f32`] (with the same `silu`) from the
/// gradient `grad` of its output and the statistics it returned: two passes
/// per group, the first writing `dx̂` (through the SiLU derivative, recomputing
/// the normalised value) and the row sums, the second finishing
/// `dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))` in place.
pub(crate) fn group_norm_backward_cpu_f32(
    x: &Tensor,
    st: &[(f32, f32)],
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    grad: &Tensor,
    silu: bool,
) -> Option<Result<Tensor>> {
    use rayon::prelude::*;
    let dims = x.dims();
    let c = *dims.get(1)?;
    let spatial: usize = dims[2..].iter().product();
    let cpg = c / groups.max(1);
    let block = (cpg * spatial).max(1);
    let grad = match grad.contiguous() {
        Ok(g) => g,
        Err(e) => return Some(Err(e)),
    };
    if grad.dims() != dims || st.len() * block != x.elem_count() {
        return None;
    }
    let dx = super::with_cpu_f32(x, |xs| {
        super::with_cpu_f32(gamma, |gs| {
            super::with_cpu_f32(beta, |bs| {
                super::with_cpu_f32(&grad, |gr| {
                    let mut dx = vec![0f32; xs.len()];
                    dx.par_chunks_mut(block)
                        .zip(xs.par_chunks(block).zip(gr.par_chunks(block)))
                        .zip(st.par_iter())
                        .enumerate()
                        .for_each(|(gi, ((dx, (x, g)), &(mean, rstd)))| {
                            let ch0 = (gi % groups) * cpg;
                            let (mut s1, mut s2) = (0f32, 0f32);
                            let sp = spatial.max(1);
                            for (k, ((dx, x), g)) in dx
                                .chunks_exact_mut(sp)
                                .zip(x.chunks_exact(sp))
                                .zip(g.chunks_exact(sp))
                                .enumerate()
                            {
                                let (w, bb) = (gs[ch0 + k], bs[ch0 + k]);
                                for ((dx, &v), &g) in dx.iter_mut().zip(x).zip(g) {
                                    let xh = (v - mean) * rstd;
                                    let dp = if silu {
                                        // silu'(p) = σ(p)·(1 + p·(1 − σ(p))).
                                        let p = xh * w + bb;
                                        let s = 1.0 / (1.0 + (-p).exp());
                                        g * s * (1.0 + p * (1.0 - s))
                                    } else {
                                        g
                                    };
                                    let d = dp * w;
                                    s1 += d;
                                    s2 += d * xh;
                                    *dx = d;
                                }
                            }
                            let (m1, m2) = (s1 / block as f32, s2 / block as f32);
                            for (dx, &v) in dx.iter_mut().zip(x.iter()) {
                                let xh = (v - mean) * rstd;
                                *dx = (*dx - m1 - xh * m2) * rstd;
                            }
                        });
                    dx
                })
            })
        })
    })????;
    Some(Tensor::from_vec(dx, dims, x.device()))
}
