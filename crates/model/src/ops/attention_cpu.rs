//! Multi-head attention on the CPU in f32, forward and backward, one task per
//! block of queries of one head.
//!
//! The generic path ([`super::attention`]) splits the heads into copies,
//! and per head and chunk of queries runs a dozen tensor ops (scores, softmax,
//! products, the softmax gradient, concatenations), each a pass over memory
//! and a tensor of its own: 300 ops per attention call in the backward. At
//! 512 px (4,096 tokens, eight heads of 40) the score matrices are 134 M
//! values per attention, and what is not a matrix product is memory traffic.
//!
//! Here every task takes `q`, `k`, `v` where they lie — the unsplit
//! projections `[b, t, heads·d]`, read with strides — and keeps its block's
//! scores in a buffer of its own (at most [`BLOCK_SCORES`] values, so it stays
//! in the core's cache):
//!
//! - forward: `S = scale·Q_blk·Kᵀ`, softmax in place (keeping each row's
//!   log-sum-exp), `O_blk = P·V` written straight into the merged output;
//! - backward: `P = exp(scale·Q_blk·Kᵀ − lse)` from the saved log-sum-exp,
//!   `dV += Pᵀ·dO_blk`, `dP = dO_blk·Vᵀ`, `dS = P ⊙ (dP − rowsum(dO ⊙ O))·scale`,
//!   `dQ_blk = dS·K` (written in place), `dK += dSᵀ·Q_blk`. `dK` and `dV` sum
//!   over all query blocks, so each task accumulates its own part and the parts
//!   of a head are added at the end.
//!
//! The products are single-threaded `gemm` calls (the tasks are the
//! parallelism). Inputs are checked against the shape once at entry; every
//! pointer below is derived from that shape.

use candle_core::{Result, bail};
use rayon::prelude::*;

use super::SendPtr;
use super::matmul::raw_product;
use super::softmax::{exp_shifted_in_place, simd_available, softmax_in_place};

/// Score values of one task's block of queries: 2^17 (512 KiB in f32), so that
/// a block of scores stays in a core's L2 cache between the products and the
/// softmax. At 4,096 keys that is 32 queries per block.
pub(crate) const BLOCK_SCORES: usize = 1 << 17;

/// The shape of a multi-head attention on unsplit projections:
/// `q: [b, tq, heads·d]`, `k: [b, tk, heads·d]`, `v: [b, tk, heads·dv]`,
/// output `[b, tq, heads·dv]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dims {
    pub b: usize,
    pub tq: usize,
    pub tk: usize,
    pub heads: usize,
    pub d: usize,
    pub dv: usize,
}

impl Dims {
    /// Queries per block: `block_scores / tk`, at least 1, at most `tq`.
    fn block(&self, block_scores: usize) -> usize {
        (block_scores / self.tk.max(1)).clamp(1, self.tq.max(1))
    }

    fn check(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<()> {
        let Dims {
            b,
            tq,
            tk,
            heads,
            d,
            dv,
        } = *self;
        if b * tq * tk * heads * d * dv == 0 {
            bail!("attention kernel: empty shape {self:?}")
        }
        if q.len() != b * tq * heads * d
            || k.len() != b * tk * heads * d
            || v.len() != b * tk * heads * dv
        {
            bail!(
                "attention kernel: {} / {} / {} values for q / k / v of shape {self:?}",
                q.len(),
                k.len(),
                v.len()
            )
        }
        Ok(())
    }
}

/// [`raw_product`] on the calling thread only (the kernel spreads blocks over
/// the threads itself).
///
/// # Safety
/// As [`raw_product`].
unsafe fn product(
    dims: (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: (*const f32, usize, usize),
    b: (*const f32, usize, usize),
    beta: f32,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        raw_product(
            dims,
            (dst, dst_rs),
            accumulate,
            a,
            b,
            beta,
            gemm::Parallelism::None,
        )
    }
}

/// The forward: the output `[b, tq, heads·dv]` and the log-sum-exp of every
/// score row `[b, heads, tq]` (what the backward needs to recompute the
/// probabilities without their maxima and sums).
pub(crate) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: Dims,
    scale: f32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    forward_blocks(q, k, v, dims, scale, BLOCK_SCORES)
}

fn forward_blocks(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: Dims,
    scale: f32,
    block_scores: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    dims.check(q, k, v)?;
    let Dims {
        b,
        tq,
        tk,
        heads,
        d,
        dv,
    } = dims;
    let (hd, hdv) = (heads * d, heads * dv);
    let bq = dims.block(block_scores);
    let blocks = tq.div_ceil(bq);
    let fast = simd_available();
    let mut out: Vec<f32> = Vec::with_capacity(b * tq * hdv);
    let mut lse = vec![0f32; b * heads * tq];
    let out_ptr = SendPtr(out.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    let lse_ptr = SendPtr(lse.as_mut_ptr());
    (0..b * heads * blocks).into_par_iter().for_each_init(
        || vec![0f32; bq * tk],
        |s, task| {
            let (bh, blk) = (task / blocks, task % blocks);
            let (bi, h) = (bh / heads, bh % heads);
            let q0 = blk * bq;
            let n = bq.min(tq - q0);
            let s = &mut s[..n * tk];
            // SAFETY: `check` made the slices hold the whole shape: rows
            // `q0..q0 + n` of item `bi`, columns `h·d..(h+1)·d` of `q`; all
            // `tk` rows of item `bi`, head `h` of `k` and `v`. This task alone
            // writes rows `q0..q0 + n`, head `h` of the output and their `lse`.
            unsafe {
                let qp = q.as_ptr().add((bi * tq + q0) * hd + h * d);
                let kp = k.as_ptr().add(bi * tk * hd + h * d);
                let vp = v.as_ptr().add(bi * tk * hdv + h * dv);
                // Kᵀ: element (c, j) at j·hd + c.
                product(
                    (n, tk, d),
                    s.as_mut_ptr(),
                    tk,
                    false,
                    (qp, hd, 1),
                    (kp, 1, hd),
                    scale,
                );
                let lse_rows = lse_ptr.ptr().add(bh * tq + q0);
                for (i, row) in s.chunks_exact_mut(tk).enumerate() {
                    *lse_rows.add(i) = softmax_in_place(row, fast);
                }
                let op = out_ptr.ptr().add((bi * tq + q0) * hdv + h * dv);
                product(
                    (n, dv, tk),
                    op,
                    hdv,
                    false,
                    (s.as_ptr(), tk, 1),
                    (vp, hdv, 1),
                    1.0,
                );
            }
        },
    );
    // SAFETY: the tasks cover every (item, head, block of rows): each output
    // value was written by one product (`accumulate` false overwrites).
    unsafe { out.set_len(b * tq * hdv) };
    Ok((out, lse))
}

/// What the backward is given besides `q`, `k`, `v`: the forward's output
/// `o` and log-sum-exp `lse`, and the output's gradient `g`.
pub(crate) struct Saved<'a> {
    pub o: &'a [f32],
    pub lse: &'a [f32],
    pub g: &'a [f32],
}

/// The gradients of `q`, `k`, `v` that `needs` asks for.
pub(crate) type Grads = [Option<Vec<f32>>; 3];

/// The backward (see the module docs).
pub(crate) fn backward(
    [q, k, v]: [&[f32]; 3],
    saved: Saved<'_>,
    dims: Dims,
    scale: f32,
    needs: [bool; 3],
) -> Result<Grads> {
    backward_blocks([q, k, v], saved, dims, scale, needs, BLOCK_SCORES)
}

fn backward_blocks(
    [q, k, v]: [&[f32]; 3],
    Saved { o, lse, g }: Saved<'_>,
    dims: Dims,
    scale: f32,
    [need_q, need_k, need_v]: [bool; 3],
    block_scores: usize,
) -> Result<Grads> {
    dims.check(q, k, v)?;
    let Dims {
        b,
        tq,
        tk,
        heads,
        d,
        dv,
    } = dims;
    let (hd, hdv) = (heads * d, heads * dv);
    if o.len() != b * tq * hdv || g.len() != o.len() || lse.len() != b * heads * tq {
        bail!("attention kernel: output, gradient or log-sum-exp do not match the shape {dims:?}")
    }
    let bq = dims.block(block_scores);
    let blocks = tq.div_ceil(bq);
    // Each head's query blocks are split into `groups` tasks, enough for every
    // thread to have two; each group keeps its own dK and dV parts.
    let threads = rayon::current_num_threads();
    let groups = (2 * threads).div_ceil(b * heads).clamp(1, blocks);
    let per_group = blocks.div_ceil(groups);
    let groups = blocks.div_ceil(per_group);
    let fast = simd_available();
    let need_ds = need_q || need_k;
    let mut dq: Vec<f32> = if need_q {
        Vec::with_capacity(b * tq * hd)
    } else {
        Vec::new()
    };
    let dq_ptr = SendPtr(dq.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    let parts: Vec<[Vec<f32>; 2]> = (0..b * heads * groups)
        .into_par_iter()
        .map(|task| {
            let (bh, group) = (task / groups, task % groups);
            let (bi, h) = (bh / heads, bh % heads);
            let mut p = vec![0f32; bq * tk];
            let mut ds = if need_ds {
                vec![0f32; bq * tk]
            } else {
                Vec::new()
            };
            let mut dk_part = vec![0f32; if need_k { tk * d } else { 0 }];
            let mut dv_part = vec![0f32; if need_v { tk * dv } else { 0 }];
            let first = group * per_group;
            for (nth, blk) in (first..blocks.min(first + per_group)).enumerate() {
                let q0 = blk * bq;
                let n = bq.min(tq - q0);
                let p = &mut p[..n * tk];
                let accumulate = nth > 0;
                // SAFETY: as in the forward, every pointer addresses rows
                // `q0..q0 + n` (queries) or all `tk` rows (keys) of item `bi`,
                // head `h`, inside slices `check` sized for the whole shape;
                // this task alone writes rows `q0..q0 + n`, head `h` of `dq`
                // and its own parts.
                unsafe {
                    let qp = q.as_ptr().add((bi * tq + q0) * hd + h * d);
                    let kp = k.as_ptr().add(bi * tk * hd + h * d);
                    let vp = v.as_ptr().add(bi * tk * hdv + h * dv);
                    let gp = g.as_ptr().add((bi * tq + q0) * hdv + h * dv);
                    product(
                        (n, tk, d),
                        p.as_mut_ptr(),
                        tk,
                        false,
                        (qp, hd, 1),
                        (kp, 1, hd),
                        scale,
                    );
                    let lse_rows = &lse[bh * tq + q0..bh * tq + q0 + n];
                    for (row, &l) in p.chunks_exact_mut(tk).zip(lse_rows) {
                        exp_shifted_in_place(row, l, fast);
                    }
                    if need_v {
                        // dV += Pᵀ·dO: Pᵀ's element (j, i) at i·tk + j.
                        product(
                            (tk, dv, n),
                            dv_part.as_mut_ptr(),
                            dv,
                            accumulate,
                            (p.as_ptr(), 1, tk),
                            (gp, hdv, 1),
                            1.0,
                        );
                    }
                    if !need_ds {
                        continue;
                    }
                    let ds = &mut ds[..n * tk];
                    // dP = dO·Vᵀ: Vᵀ's element (c, j) at j·hdv + c.
                    product(
                        (n, tk, dv),
                        ds.as_mut_ptr(),
                        tk,
                        false,
                        (gp, hdv, 1),
                        (vp, 1, hdv),
                        1.0,
                    );
                    for (i, (dsr, pr)) in
                        ds.chunks_exact_mut(tk).zip(p.chunks_exact(tk)).enumerate()
                    {
                        // rowsum(dP ⊙ P) = rowsum(dO ⊙ O) for this row.
                        let at = (bi * tq + q0 + i) * hdv + h * dv;
                        let delta: f32 = g[at..at + dv]
                            .iter()
                            .zip(&o[at..at + dv])
                            .map(|(a, b)| a * b)
                            .sum();
                        for (x, &pv) in dsr.iter_mut().zip(pr) {
                            *x = pv * (*x - delta) * scale;
                        }
                    }
                    if need_q {
                        let dqp = dq_ptr.ptr().add((bi * tq + q0) * hd + h * d);
                        product(
                            (n, d, tk),
                            dqp,
                            hd,
                            false,
                            (ds.as_ptr(), tk, 1),
                            (kp, hd, 1),
                            1.0,
                        );
                    }
                    if need_k {
                        // dK += dSᵀ·Q: dSᵀ's element (j, i) at i·tk + j.
                        product(
                            (tk, d, n),
                            dk_part.as_mut_ptr(),
                            d,
                            accumulate,
                            (ds.as_ptr(), 1, tk),
                            (qp, hd, 1),
                            1.0,
                        );
                    }
                }
            }
            [dk_part, dv_part]
        })
        .collect();
    let dq = need_q.then(|| {
        // SAFETY: every (item, head, block of rows) was in one task, whose
        // product overwrote its rows of the head's columns.
        unsafe { dq.set_len(b * tq * hd) };
        dq
    });
    // Adds each head's parts into the merged `[b, tk, heads·width]` gradient.
    let merge = |width: usize, which: usize| {
        let mut out = vec![0f32; b * tk * heads * width];
        for (task, part) in parts.iter().enumerate() {
            let (bh, _) = (task / groups, task % groups);
            let (bi, h) = (bh / heads, bh % heads);
            for (j, row) in part[which].chunks_exact(width).enumerate() {
                let at = (bi * tk + j) * heads * width + h * width;
                for (o, x) in out[at..at + width].iter_mut().zip(row) {
                    *o += x;
                }
            }
        }
        out
    };
    let dk = need_k.then(|| merge(d, 0));
    let dv = need_v.then(|| merge(dv, 1));
    Ok([dq, dk, dv])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// The kernel against the generic, differentiable path in f64
    /// (`ops::attention` on split heads): output and all three gradients,
    /// for one block and many, one group and several, cross-attention shapes
    /// (`tk ≠ tq`, `dv ≠ d`) and a batch of two.
    #[test]
    fn matches_the_generic_path() -> Result<()> {
        let dev = Device::Cpu;
        for (dims, block_scores) in [
            (
                Dims {
                    b: 1,
                    tq: 16,
                    tk: 16,
                    heads: 2,
                    d: 4,
                    dv: 4,
                },
                1 << 17,
            ),
            (
                Dims {
                    b: 2,
                    tq: 37,
                    tk: 11,
                    heads: 3,
                    d: 5,
                    dv: 7,
                },
                40,
            ),
            (
                Dims {
                    b: 1,
                    tq: 64,
                    tk: 64,
                    heads: 1,
                    d: 8,
                    dv: 8,
                },
                64 * 3,
            ),
        ] {
            let Dims {
                b,
                tq,
                tk,
                heads,
                d,
                dv,
            } = dims;
            let scale = 1.0 / (d as f64).sqrt();
            let q = (Tensor::randn(0f64, 1.0, (b, tq, heads * d), &dev)? * 2.0)?;
            let k = (Tensor::randn(0f64, 1.0, (b, tk, heads * d), &dev)? * 2.0)?;
            let v = Tensor::randn(0f64, 1.0, (b, tk, heads * dv), &dev)?;
            let g = Tensor::randn(0f64, 1.0, (b, tq, heads * dv), &dev)?;
            // Reference: per head, the differentiable generic attention.
            let (qv, kv, vv) = (
                candle_core::Var::from_tensor(&q)?,
                candle_core::Var::from_tensor(&k)?,
                candle_core::Var::from_tensor(&v)?,
            );
            let split = |x: &Tensor, w: usize| -> Result<Tensor> {
                let (b, t, _) = x.dims3()?;
                x.reshape((b, t, heads, w))?.transpose(1, 2)?.contiguous()
            };
            let y = crate::ops::attention(
                &split(qv.as_tensor(), d)?,
                &split(kv.as_tensor(), d)?,
                &split(vv.as_tensor(), dv)?,
                scale,
            )?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, tq, heads * dv))?;
            let grads = (&y * &g)?.sum_all()?.backward()?;
            let f32s = |t: &Tensor| -> Result<Vec<f32>> {
                t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
            };
            let (qs, ks, vs, gs) = (f32s(&q)?, f32s(&k)?, f32s(&v)?, f32s(&g)?);
            let (o, lse) = forward_blocks(&qs, &ks, &vs, dims, scale as f32, block_scores)?;
            let [dq, dk, dvv] = backward_blocks(
                [&qs, &ks, &vs],
                Saved {
                    o: &o,
                    lse: &lse,
                    g: &gs,
                },
                dims,
                scale as f32,
                [true, true, true],
                block_scores,
            )?;
            let close = |ours: &[f32], want: &Tensor, what: &str| -> Result<()> {
                let want = f32s(want)?;
                assert_eq!(ours.len(), want.len(), "{what} {dims:?}");
                let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
                let worst = ours
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    worst <= 2e-5 * scale,
                    "{what} {dims:?}: worst {worst} of {scale}"
                );
                Ok(())
            };
            close(&o, &y, "output")?;
            let get = |v: &candle_core::Var| grads.get(v.as_tensor()).cloned();
            close(&dq.unwrap_or_default(), &get(&qv).unwrap(), "dq")?;
            close(&dk.unwrap_or_default(), &get(&kv).unwrap(), "dk")?;
            close(&dvv.unwrap_or_default(), &get(&vv).unwrap(), "dv")?;
            // Only some gradients asked for: the others are not computed, the
            // asked ones are the same.
            let [dq2, dk2, dv2] = backward_blocks(
                [&qs, &ks, &vs],
                Saved {
                    o: &o,
                    lse: &lse,
                    g: &gs,
                },
                dims,
                scale as f32,
                [false, true, false],
                block_scores,
            )?;
            assert!(dq2.is_none() && dv2.is_none());
            close(&dk2.unwrap_or_default(), &get(&kv).unwrap(), "dk alone")?;
        }
        Ok(())
    }

    #[test]
    fn rejects_wrong_lengths() {
        let dims = Dims {
            b: 1,
            tq: 2,
            tk: 2,
            heads: 1,
            d: 2,
            dv: 2,
        };
        let x = vec![0f32; 4];
        assert!(forward(&x, &x, &x[..3], dims, 1.0).is_err());
        assert!(forward(&x, &x, &x, Dims { tq: 0, ..dims }, 1.0).is_err());
    }
}
