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

use candle_core::{D, Result, Tensor, bail};

use super::custom_grad::{add_frozen, with_grad3};
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

/// Splits `0..t` into ranges of at most `chunk` items.
fn chunks(t: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(chunk)
        .map(move |start| (start, chunk.min(t - start)))
}

/// The softmax probabilities for queries `qc` (detached, no graph).
fn probs(qc: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = (qc.matmul(&k.t()?)? * scale)?;
    candle_nn::ops::softmax_last_dim(&scores.contiguous()?)
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
    let tdim = q.rank() - 2;
    let tq = q.dim(tdim)?;
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let outs = chunks(tq, chunk)
        .map(|(start, len)| probs(&qd.narrow(tdim, start, len)?, &kd, scale)?.matmul(&vd))
        .collect::<Result<Vec<_>>>()?;
    let y = Tensor::cat(&outs, tdim)?;
    drop(outs);
    with_grad3("attention-chunked", [q, k, v], y, move |a| {
        let [q, k, v] = a.inputs;
        let [need_q, need_k, need_v] = a.needs_grad;
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
        for (start, len) in chunks(tq, chunk) {
            let qc = q.narrow(tdim, start, len)?;
            let gc = a.grad.narrow(tdim, start, len)?;
            let p = probs(&qc, k, scale)?;
            if need_v {
                accumulate(&mut dv, p.t()?.matmul(&gc)?)?;
            }
            if need_q || need_k {
                // dS = P ⊙ (dP − rowsum(dP ⊙ P)), and rowsum(dP ⊙ P) = rowsum(g ⊙ o).
                let oc = a.output.narrow(tdim, start, len)?;
                let delta = (&gc * &oc)?.sum_keepdim(D::Minus1)?;
                let dp = gc.matmul(&v.t()?)?;
                let ds = ((dp.broadcast_sub(&delta))? * &p)?;
                if need_q {
                    dq.push((ds.matmul(k)? * scale)?);
                }
                if need_k {
                    accumulate(&mut dk, (ds.t()?.matmul(&qc)? * scale)?)?;
                }
            }
        }
        let dq = if need_q {
            Some(Tensor::cat(&dq, tdim)?)
        } else {
            None
        };
        Ok([dq, dk, dv])
    })
}
