//! Scaled dot-product attention, `softmax(q·kᵀ·scale)·v`, with a backward.
//!
//! candle-nn's `sdpa` has no backward, and candle-transformers' attention goes
//! through the backward-less `softmax_last_dim`, so `to_q`/`to_k` would get no
//! gradient. [`attention`] is plain matmuls around the differentiable
//! [`softmax_last_dim`]. [`attention_chunked`] gives the same result and gradients
//! while never holding the probabilities of more than one chunk of queries: its
//! backward recomputes them chunk by chunk (as flash attention does), so neither
//! pass keeps the `[batch·heads, tq, tk]` matrix that dominates memory at high
//! resolution.
//!
//! Shapes: `q: [..., tq, d]`, `k: [..., tk, d]`, `v: [..., tk, dv]` with the same
//! leading dimensions, e.g. `[batch·heads, t, d]` or `[batch, heads, t, d]`.

use std::sync::Arc;

use candle_core::{D, DType, Result, Tensor, bail};

use super::custom_grad::{add_frozen, with_grad3};
use super::matmul::matmul;
use super::softmax::softmax_last_dim;

fn check_shapes(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
    let r = qd.len();
    if r < 2
        || kd.len() != r
        || vd.len() != r
        || qd[..r - 2] != kd[..r - 2]
        || kd[..r - 2] != vd[..r - 2]
        || qd[r - 1] != kd[r - 1]
        || kd[r - 2] != vd[r - 2]
    {
        bail!("attention: incompatible shapes q {qd:?}, k {kd:?}, v {vd:?}")
    }
    Ok(())
}

/// `softmax(q·kᵀ·scale)·v`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_with_bias(q, k, v, scale, None)
}

/// `softmax(q·kᵀ·scale + bias)·v`, where the constant `bias` broadcasts to the
/// scores `[..., tq, tk]` — e.g. CLIP's causal mask (`-inf` above the diagonal).
/// `bias` gets no gradient.
pub fn attention_with_bias(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    check_shapes(q, k, v)?;
    super::flops::add_attention(q.dims(), k.dims(), v.dims());
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match bias {
        Some(bias) => add_frozen(&scores, bias)?,
        None => scores,
    };
    softmax_last_dim(&scores)?.matmul(v)
}

/// Splits `0..t` into ranges `(start, len)` of at most `chunk` items.
pub(crate) fn chunks(t: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(chunk)
        .map(move |start| (start, chunk.min(t - start)))
}

/// The softmax probabilities for queries `qc` (detached, no graph). The scale
/// is applied to the queries, `d` values per row instead of `tk` scores.
fn probs(qc: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = matmul(&(qc * scale)?, &k.t()?)?;
    super::softmax::softmax_rows(&scores)
}

/// The same as [`attention`], processing `chunk` queries at a time in the forward
/// and the backward, so that at most `[..., chunk, tk]` probabilities exist at
/// once. Gradients for `q`, `k` and `v` equal those of [`attention`] up to
/// rounding.
pub fn attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    chunk: usize,
) -> Result<Tensor> {
    check_shapes(q, k, v)?;
    super::flops::add_attention(q.dims(), k.dims(), v.dims());
    if chunk == 0 {
        bail!("attention_chunked: chunk size must be at least 1")
    }
    let y = chunked_forward(&q.detach(), &k.detach(), &v.detach(), scale, chunk)?;
    with_grad3("attention-chunked", [q, k, v], y, move |a| {
        let [q, k, v] = a.inputs;
        chunked_backward([q, k, v], a.output, a.grad, a.needs_grad, scale, chunk)
    })
}

/// The forward of [`attention_chunked`] on detached tensors.
fn chunked_forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, chunk: usize) -> Result<Tensor> {
    let tdim = q.rank() - 2;
    let outs = chunks(q.dim(tdim)?, chunk)
        .map(|(start, len)| matmul(&probs(&q.narrow(tdim, start, len)?, k, scale)?, v))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&outs, tdim)
}

/// The backward of [`attention_chunked`] on detached tensors: the gradients of
/// `q`, `k`, `v` (those `needs` asks for) given the output `o` and its gradient
/// `g`, recomputing the probabilities `chunk` queries at a time.
fn chunked_backward(
    [q, k, v]: [&Tensor; 3],
    o: &Tensor,
    g: &Tensor,
    [need_q, need_k, need_v]: [bool; 3],
    scale: f64,
    chunk: usize,
) -> Result<[Option<Tensor>; 3]> {
    let tdim = q.rank() - 2;
    let mut dq = Vec::new();
    let mut dk: Option<Tensor> = None;
    let mut dv: Option<Tensor> = None;
    let accumulate = |acc: &mut Option<Tensor>, t: Tensor| -> Result<()> {
        *acc = Some(match acc.take() {
            Some(prev) => (prev + t)?,
            None => t,
        });
        Ok(())
    };
    for (start, len) in chunks(q.dim(tdim)?, chunk) {
        let qc = q.narrow(tdim, start, len)?;
        let gc = g.narrow(tdim, start, len)?;
        let p = probs(&qc, k, scale)?;
        if need_v {
            accumulate(&mut dv, matmul(&p.t()?, &gc)?)?;
        }
        if need_q || need_k {
            // dS = P ⊙ (dP − rowsum(dP ⊙ P)), and rowsum(dP ⊙ P) = rowsum(g ⊙ o).
            let oc = o.narrow(tdim, start, len)?;
            let delta = (&gc * &oc)?.sum_keepdim(D::Minus1)?;
            let ds = softmax_grad(&p, matmul(&gc, &v.t()?)?, &delta)?;
            if need_q {
                dq.push((matmul(&ds, k)? * scale)?);
            }
            if need_k {
                accumulate(&mut dk, (matmul(&ds.t()?, &qc)? * scale)?)?;
            }
        }
    }
    let dq = if need_q {
        Some(Tensor::cat(&dq, tdim)?)
    } else {
        None
    };
    Ok([dq, dk, dv])
}

/// The gradient of the scores given the probabilities `p`, their gradient `dp`
/// and `delta = rowsum(dp ⊙ p)` (one value per row): `p ⊙ (dp − delta)`. On
/// CPU f32 one parallel pass (the tensor ops take two and a temporary the size
/// of the scores).
fn softmax_grad(p: &Tensor, dp: Tensor, delta: &Tensor) -> Result<Tensor> {
    let n = p.dim(D::Minus1)?;
    let fast = super::with_cpu_f32(p, |ps| {
        super::with_cpu_f32(&dp, |dps| {
            super::with_cpu_f32(delta, |ds| {
                use rayon::prelude::*;
                if ps.len() != dps.len() || ds.len() * n != ps.len() {
                    return None;
                }
                let mut out = vec![0f32; ps.len()];
                out.par_chunks_mut(n)
                    .zip(ps.par_chunks(n).zip(dps.par_chunks(n)))
                    .zip(ds.par_iter())
                    .for_each(|((o, (p, g)), &d)| {
                        for ((o, &p), &g) in o.iter_mut().zip(p).zip(g) {
                            *o = p * (g - d);
                        }
                    });
                Some(out)
            })
        })
    });
    match fast.flatten().flatten().flatten() {
        Some(out) => Tensor::from_vec(out, p.dims(), p.device()),
        None => dp.broadcast_sub(delta)? * p,
    }
}

/// Score values processed at once by [`multi_head_attention`] when no chunk
/// size is given: 2^22 (16 MiB in f32).
pub const MAX_CHUNK_SCORES: usize = 1 << 22;

/// Score values per chunk of [`multi_head_attention`]'s backward, which goes
/// one head at a time: 2^20 (4 MiB in f32). The backward holds three arrays of
/// this size (probabilities, their gradient, the scores' gradient); a chunk of
/// 2^20 still gives the matrix products hundreds of rows (256 queries of
/// 4096 keys at 512 px).
pub const MAX_BACKWARD_HEAD_SCORES: usize = 1 << 20;

/// Queries per chunk for `lead` (batch·heads) score matrices of `tq × tk` values
/// when at most [`MAX_CHUNK_SCORES`] may exist at once (at least 1, at most `tq`).
pub fn auto_chunk(lead: usize, tq: usize, tk: usize) -> usize {
    (MAX_CHUNK_SCORES / (lead * tk).max(1)).clamp(1, tq.max(1))
}

/// `[b, t, heads·d]` → `[b, heads, t, d]` (contiguous).
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    x.reshape((b, t, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[b, heads, t, d]` → `[b, t, heads·d]` (contiguous).
fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, heads, t, d) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, t, heads * d))
}

/// Multi-head attention on unsplit projections: `q: [b, tq, heads·d]`,
/// `k: [b, tk, heads·d]`, `v: [b, tk, heads·dv]` → `[b, tq, heads·dv]`, each
/// head `softmax(q·kᵀ·scale)·v`.
///
/// One graph node from the projections to the merged output, so training keeps
/// only `q`, `k`, `v` and the output — no head-split copies, no scores, no
/// probabilities: the backward recomputes the probabilities `chunk` queries at a
/// time (as flash attention does; `None` = [`auto_chunk`]). f16/bf16 inputs are
/// computed in f32 (half-precision softmax over long sequences loses too much
/// for training; diffusers' `upcast_softmax`), and the output and gradients come
/// back in the input dtype.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    chunk: Option<usize>,
) -> Result<Tensor> {
    let ((b, tq, c), (bk, tk, ck), (bv, tv, cv)) = (q.dims3()?, k.dims3()?, v.dims3()?);
    if heads == 0 || c % heads != 0 || cv % heads != 0 || ck != c || bk != b || bv != b || tv != tk
    {
        bail!(
            "attention: incompatible shapes q {:?}, k {:?}, v {:?} for {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let chunk_given = match chunk {
        Some(0) => bail!("attention: chunk size must be at least 1"),
        other => other,
    };
    let dtype = q.dtype();
    let cdt = super::norm::compute_dtype(dtype);
    if q.device().is_cpu() && cdt == DType::F32 && b * tq * tk * c * cv > 0 {
        let dims = super::attention_cpu::Dims {
            b,
            tq,
            tk,
            heads,
            d: c / heads,
            dv: cv / heads,
        };
        return multi_head_attention_cpu([q, k, v], dims, scale as f32);
    }
    let chunk = chunk_given.unwrap_or_else(|| auto_chunk(b * heads, tq, tk));
    let split = move |x: &Tensor, heads: usize| split_heads(&x.to_dtype(cdt)?, heads);
    let (qs, ks, vs) = (
        split(&q.detach(), heads)?,
        split(&k.detach(), heads)?,
        split(&v.detach(), heads)?,
    );
    super::flops::add_attention(qs.dims(), ks.dims(), vs.dims());
    let y = merge_heads(&chunked_forward(&qs, &ks, &vs, scale, chunk)?)?.to_dtype(dtype)?;
    drop((qs, ks, vs));
    // The backward goes one head at a time, writing each head's gradients
    // into the merged `[b, t, heads·d]` results: only one head's split copies
    // and accumulators exist at once, instead of all heads' (five tensors the
    // size of `q` at the largest resolution).
    let head_chunk = chunk_given
        .unwrap_or_else(|| (MAX_BACKWARD_HEAD_SCORES / (b * tk).max(1)).clamp(1, tq.max(1)));
    with_grad3("multi-head-attention", [q, k, v], y, move |a| {
        let [q, k, v] = a.inputs;
        let (d, dv) = (c / heads, cv / heads);
        let widths = [d, d, dv];
        let mut grads: [Option<Tensor>; 3] = [None, None, None];
        for ((out, x), need) in grads.iter_mut().zip([q, k, v]).zip(a.needs_grad) {
            if need {
                *out = Some(Tensor::zeros(x.dims(), dtype, x.device())?);
            }
        }
        let head = |x: &Tensor, h: usize, width: usize| split(&x.narrow(2, h * width, width)?, 1);
        for h in 0..heads {
            let head_grads = chunked_backward(
                [&head(q, h, d)?, &head(k, h, d)?, &head(v, h, dv)?],
                &head(a.output, h, dv)?,
                &head(a.grad, h, dv)?,
                a.needs_grad,
                scale,
                head_chunk,
            )?;
            for ((out, g), width) in grads.iter_mut().zip(head_grads).zip(widths) {
                if let (Some(out), Some(g)) = (out.as_mut(), g) {
                    out.slice_set(&merge_heads(&g)?.to_dtype(dtype)?, 2, h * width)?;
                }
            }
        }
        Ok(grads)
    })
}

/// [`multi_head_attention`] on the CPU in f32 (f16/bf16 inputs converted):
/// the fused kernels of [`super::attention_cpu`], one graph node whose
/// backward recomputes the probabilities from the saved log-sum-exp of each
/// score row. Its memory is bounded by the kernel's blocks, whatever the chunk
/// size asked for.
fn multi_head_attention_cpu(
    [q, k, v]: [&Tensor; 3],
    dims: super::attention_cpu::Dims,
    scale: f32,
) -> Result<Tensor> {
    use super::attention_cpu as kernel;
    let dtype = q.dtype();
    let f32c = |x: &Tensor| x.detach().to_dtype(DType::F32)?.contiguous();
    let (qf, kf, vf) = (f32c(q)?, f32c(k)?, f32c(v)?);
    super::flops::add_attention(
        &[dims.b * dims.heads, dims.tq, dims.d],
        &[dims.b * dims.heads, dims.tk, dims.d],
        &[dims.b * dims.heads, dims.tk, dims.dv],
    );
    let (out, lse) = super::with_f32_slice(&qf, |qs| {
        super::with_f32_slice(&kf, |ks| {
            super::with_f32_slice(&vf, |vs| kernel::forward(qs, ks, vs, dims, scale))
        })
    })?;
    drop((qf, kf, vf));
    let y = Tensor::from_vec(out, (dims.b, dims.tq, dims.heads * dims.dv), q.device())?
        .to_dtype(dtype)?;
    let lse = Arc::new(lse);
    with_grad3("multi-head-attention", [q, k, v], y, move |a| {
        let [q, k, v] = a.inputs;
        let (qf, kf, vf) = (f32c(q)?, f32c(k)?, f32c(v)?);
        let (o, g) = (f32c(a.output)?, f32c(a.grad)?);
        let grads = super::with_f32_slice(&qf, |qs| {
            super::with_f32_slice(&kf, |ks| {
                super::with_f32_slice(&vf, |vs| {
                    super::with_f32_slice(&o, |o| {
                        super::with_f32_slice(&g, |g| {
                            let saved = kernel::Saved { o, lse: &lse, g };
                            kernel::backward([qs, ks, vs], saved, dims, scale, a.needs_grad)
                        })
                    })
                })
            })
        })?;
        let mut out: [Option<Tensor>; 3] = [None, None, None];
        for ((slot, grad), x) in out.iter_mut().zip(grads).zip([q, k, v]) {
            if let Some(grad) = grad {
                *slot = Some(Tensor::from_vec(grad, x.dims(), x.device())?.to_dtype(dtype)?);
            }
        }
        Ok(out)
    })
}
