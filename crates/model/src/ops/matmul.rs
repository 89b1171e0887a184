//! Matrix products for the ops' own forward and backward computations (no
//! graph), with a CPU f32 path that suits the shapes training produces.
//!
//! candle's CPU matmul zero-fills its output on the calling thread before the
//! product overwrites it, and runs a batch (attention's heads) one small product
//! at a time, each split across all threads. [`matmul`] on CPU f32 leaves the
//! output unfilled for the product to write, and gives whole products of a
//! batch to the threads when there are at least as many as threads (each
//! product then runs on one thread, without synchronisation). Everything else
//! (other devices and dtypes, broadcast batches) is candle's matmul.

use candle_core::{DType, Result, Storage, Tensor, bail};

/// `a·b` for `a: [..., m, k]` and `b: [..., k, n]` with the same leading
/// dimensions, without a graph.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match cpu_f32(a, b)? {
        Some(y) => Ok(y),
        None => a.matmul(b),
    }
}

/// The leading dimensions of a matrix stack collapse to one batch stride (or
/// there is at most one of them): `(batch stride, row stride, column stride)`.
fn strides(t: &Tensor) -> Option<(usize, usize, usize)> {
    let (dims, st) = (t.dims(), t.stride());
    let r = dims.len();
    let lead = r - 2;
    for i in 0..lead.saturating_sub(1) {
        if st[i] != st[i + 1] * dims[i + 1] {
            return None;
        }
    }
    let batch = if lead == 0 { 0 } else { st[lead - 1] };
    Some((batch, st[r - 2], st[r - 1]))
}

fn cpu_f32(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    if !a.device().is_cpu() || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return Ok(None);
    }
    let (ad, bd) = (a.dims(), b.dims());
    let r = ad.len();
    if r < 2 || bd.len() != r || ad[..r - 2] != bd[..r - 2] {
        return Ok(None);
    }
    let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
    if bd[r - 2] != k {
        bail!("matmul: shapes {ad:?} and {bd:?} do not chain")
    }
    let batch: usize = ad[..r - 2].iter().product();
    let mut out_dims = ad.to_vec();
    out_dims[r - 1] = n;
    if batch * m * n == 0 {
        return Tensor::zeros(out_dims, DType::F32, a.device()).map(Some);
    }
    let a = match strides(a) {
        Some(_) => a.clone(),
        None => a.contiguous()?,
    };
    let b = match strides(b) {
        Some(_) => b.clone(),
        None => b.contiguous()?,
    };
    let (Some((a_bs, a_rs, a_cs)), Some((b_bs, b_rs, b_cs))) = (strides(&a), strides(&b)) else {
        return Ok(None);
    };
    let (a_store, a_layout) = a.storage_and_layout();
    let (b_store, b_layout) = b.storage_and_layout();
    let (Storage::Cpu(a_cpu), Storage::Cpu(b_cpu)) = (&*a_store, &*b_store) else {
        return Ok(None);
    };
    let (a_data, b_data) = (a_cpu.as_slice::<f32>()?, b_cpu.as_slice::<f32>()?);
    let (a_off, b_off) = (a_layout.start_offset(), b_layout.start_offset());
    let out = products_f32(
        (a_data, a_off, (a_bs, a_rs, a_cs)),
        (b_data, b_off, (b_bs, b_rs, b_cs)),
        (batch, m, k, n),
    )?;
    drop((a_store, b_store));
    Tensor::from_vec(out, out_dims, a.device()).map(Some)
}

/// `dst (m×n, row stride dst_rs, unit column stride) ← beta · a·b`, or
/// `dst + beta · a·b` when `accumulate`, for `a` (m×k) and `b` (k×n) given as
/// `(pointer, row stride, column stride)`: the `gemm` call every CPU f32
/// product of the ops makes. Without `accumulate`, `dst` is only written
/// (gemm writes zeros when `k` is 0).
///
/// # Safety
/// Every element the strides address must lie inside the allocation of its
/// pointer; `dst`'s `m·n` elements must be writable (and initialised when
/// `accumulate`) and not accessed by anyone else meanwhile.
pub(crate) unsafe fn raw_product(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    accumulate: bool,
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, b_rs, b_cs): (*const f32, usize, usize),
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: forwarded from the caller. `alpha` (1) scales `dst` only when
    // it is read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// An f32 matrix operand: its data, the offset of its first element, and its
/// (batch, row, column) strides.
pub(crate) type Operand<'a> = (&'a [f32], usize, (usize, usize, usize));

/// The `batch` products `a_i·b_i` (`[m, k]·[k, n]`), contiguous `[batch, m, n]`.
pub(crate) fn products_f32(
    (a_data, a_off, (a_bs, a_rs, a_cs)): Operand<'_>,
    (b_data, b_off, (b_bs, b_rs, b_cs)): Operand<'_>,
    (batch, m, k, n): (usize, usize, usize, usize),
) -> Result<Vec<f32>> {
    if batch * m * n == 0 {
        return Ok(Vec::new());
    }
    // The furthest element each product reads, checked once against the
    // storages so that the pointer arithmetic below stays in bounds.
    let last = |off: usize, bs: usize, rs: usize, cs: usize, rows: usize, cols: usize| {
        off + (batch - 1) * bs + (rows - 1) * rs + (cols - 1) * cs
    };
    if k > 0
        && (last(a_off, a_bs, a_rs, a_cs, m, k) >= a_data.len()
            || last(b_off, b_bs, b_rs, b_cs, k, n) >= b_data.len())
    {
        bail!("matmul: operand layouts exceed their storage")
    }
    let threads = rayon::current_num_threads();
    let mut out: Vec<f32> = Vec::with_capacity(batch * m * n);
    let dst = out.spare_capacity_mut();
    let product = |i: usize, dst: *mut f32, parallelism: gemm::Parallelism| {
        // SAFETY: the operand pointers stay within their storages (checked
        // above); `dst` points to `m·n` writable floats of the output, which
        // the product writes in full without reading them (`read_dst` false:
        // gemm overwrites, and writes zeros when `k` is 0).
        unsafe {
            raw_product(
                (m, n, k),
                (dst, n),
                false,
                (a_data.as_ptr().add(a_off + i * a_bs), a_rs, a_cs),
                (b_data.as_ptr().add(b_off + i * b_bs), b_rs, b_cs),
                1.0,
                parallelism,
            )
        }
    };
    if batch >= threads && threads > 1 {
        use rayon::prelude::*;
        dst[..batch * m * n]
            .par_chunks_mut(m * n)
            .enumerate()
            .for_each(|(i, d)| product(i, d.as_mut_ptr().cast(), gemm::Parallelism::None));
    } else {
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        for (i, d) in dst[..batch * m * n].chunks_mut(m * n).enumerate() {
            product(i, d.as_mut_ptr().cast(), parallelism);
        }
    }
    // SAFETY: every product wrote its `m·n` block of the `batch·m·n` floats.
    unsafe { out.set_len(batch * m * n) };
    Ok(out)
}

/// `dst ← beta·a·b` (`accumulate` false) or `dst ← dst + beta·a·b` (true) for
/// one `[m, k]·[k, n]` product into the contiguous `[m, n]` `dst`, over all
/// threads.
pub(crate) fn product_into(
    dst: &mut [f32],
    (a_data, a_off, (_, a_rs, a_cs)): Operand<'_>,
    (b_data, b_off, (_, b_rs, b_cs)): Operand<'_>,
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
    beta: f32,
) -> Result<()> {
    if dst.len() != m * n {
        bail!("matmul: {} output values for a {m}×{n} product", dst.len())
    }
    if m * n == 0 {
        return Ok(());
    }
    if k > 0
        && (a_off + (m - 1) * a_rs + (k - 1) * a_cs >= a_data.len()
            || b_off + (k - 1) * b_rs + (n - 1) * b_cs >= b_data.len())
    {
        bail!("matmul: operand layouts exceed their storage")
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the operands' elements lie within their storages (checked
    // above) and `dst` holds the `m·n` values the product reads and writes.
    unsafe {
        raw_product(
            (m, n, k),
            (dst.as_mut_ptr(), n),
            accumulate,
            (a_data.as_ptr().add(a_off), a_rs, a_cs),
            (b_data.as_ptr().add(b_off), b_rs, b_cs),
            beta,
            parallelism,
        )
    };
    Ok(())
}
