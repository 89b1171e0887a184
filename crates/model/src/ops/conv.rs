//! 2-D convolution over a frozen kernel.
//!
//! candle's `conv2d` backward always computes the kernel gradient as well (a
//! convolution as expensive as the forward) and stores it, even for a constant
//! kernel; for the input gradient it uses `conv_transpose2d`, which on CPU is a
//! naive loop, and it derives that op's output padding from the height alone, so
//! a stride-2 conv on an input whose height and width differ in parity fails in
//! the backward. [`FrozenConv2d`] computes only the input gradient:
//!
//! - on the CPU (f32/f64), any stride: `cols = Wᵀ·g`, then col2im (the adjoint
//!   of the forward's im2col), in parallel per input plane;
//! - elsewhere, stride 1 and a square kernel: `dx = conv2d(g, W′, padding
//!   k−1−p)` where `W′` is the kernel flipped in height and width with its
//!   in/out channels swapped;
//! - otherwise (stride 2 for the downsamplers): `conv_transpose2d(g, W)` with the
//!   output padding that restores the input size.
//!
//! The forward (`conv2d_plain`) runs on detached tensors — on the CPU our own
//! im2col + one matrix product, elsewhere candle's `conv2d` — and the result is
//! attached to `x` with [`with_grad1`].
//!
//! Layers that may carry a trainable addition (a LoRA adapter) are held by the
//! models as [`ConvLayer`]s: `ops` defines the trait, `crate::lora` implements it.

use candle_core::{DType, Module, Result, Storage, Tensor, WithDType, bail};

use super::SendPtr;
use super::custom_grad::with_grad1;
use super::matmul::raw_product;

/// `y = conv2d(x, W) + b` with a frozen kernel `W: [out, in, kh, kw]` and bias
/// `b: [out]`, on `x: [batch, in, h, w]`; one group, no dilation. Only `x`
/// receives a gradient.
#[derive(Debug, Clone)]
pub struct FrozenConv2d {
    /// `[out_channels, in_channels, kh, kw]`, as stored in checkpoints.
    pub weight: Tensor,
    /// `[out_channels]`.
    pub bias: Option<Tensor>,
    /// The same stride in height and width.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

/// A Conv2d layer as a model holds it: a frozen convolution, possibly with a
/// trainable addition to its output (a LoRA adapter: `crate::lora` implements
/// this trait). Fusions that rely on the layer being frozen (a backward that
/// only needs the kernel) ask [`is_adapted`](Self::is_adapted) first.
pub trait ConvLayer {
    /// The frozen convolution.
    fn frozen(&self) -> &FrozenConv2d;
    /// The layer's output: the frozen convolution plus any active addition.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// Whether a trainable addition takes part in the forward.
    fn is_adapted(&self) -> bool;
}

impl ConvLayer for FrozenConv2d {
    fn frozen(&self) -> &FrozenConv2d {
        self
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        FrozenConv2d::forward(self, x)
    }
    fn is_adapted(&self) -> bool {
        false
    }
}

impl FrozenConv2d {
    /// Wraps a kernel and optional bias, checking their shapes.
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let (out_channels, _, _, _) = weight.dims4()?;
        if let Some(b) = &bias
            && b.dims1()? != out_channels
        {
            bail!(
                "conv2d bias has shape {:?}, expected [{out_channels}]",
                b.dims()
            )
        }
        if stride == 0 {
            bail!("conv2d stride must be at least 1")
        }
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }

    /// Applies the convolution to `x: [batch, in, h, w]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (out_channels, _, kh, kw) = self.weight.dims4()?;
        // The stored kernel, whatever its dtype; `x` may compute in another
        // one (f32 for a half-precision kernel on the CPU): the kernel is then
        // converted for this call only, and again in the backward, so no
        // converted copy lives in the graph between the two.
        let stored = self.weight.detach();
        let mut y = {
            let weight = stored.to_dtype(x.dtype())?;
            let y = conv2d_plain(&x.detach(), &weight, self.padding, self.stride)?;
            super::flops::add_conv(y.dims(), weight.dims());
            y
        };
        if let Some(b) = &self.bias {
            let b = b.detach().to_dtype(y.dtype())?;
            y = y.broadcast_add(&b.reshape((1, out_channels, 1, 1))?)?;
        }
        let (stride, padding) = (self.stride, self.padding);
        with_grad1("frozen-conv2d", x, y, move |a| {
            let dx = input_grad(a.grad, &stored, (h, w), (kh, kw), stride, padding)?;
            Ok([Some(dx)])
        })
    }
}

/// `conv2d(x, weight)` with one group and no dilation, without a graph.
///
/// On the CPU (f32/f64) this is a full im2col in one parallel pass straight
/// from NCHW, then one matrix product with the kernel viewed as `[out, in·kh·kw]`
/// — its storage order, so the kernel is never copied — which yields NCHW
/// directly. candle's tiled CPU conv instead reorders the whole kernel and
/// transposes the input to NHWC on one thread at every call, which for
/// SD1.5's 589 M conv weights cost more than the arithmetic. Elsewhere
/// (CUDA, half precision) candle's conv2d.
pub(crate) fn conv2d_plain(
    x: &Tensor,
    weight: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        return x.conv2d(weight, padding, stride, 1, 1);
    }
    let (b, c, h, w) = x.dims4()?;
    let (co, ci, kh, kw) = weight.dims4()?;
    if ci != c {
        bail!(
            "conv2d: input has {c} channels, the kernel {ci} (shapes {:?}, {:?})",
            x.dims(),
            weight.dims()
        )
    }
    if h + 2 * padding < kh || w + 2 * padding < kw {
        bail!(
            "conv2d: input {:?} smaller than the kernel {:?}",
            x.dims(),
            weight.dims()
        )
    }
    let (oh, ow) = (
        (h + 2 * padding - kh) / stride + 1,
        (w + 2 * padding - kw) / stride + 1,
    );
    let k = ci * kh * kw;
    if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        let w2 = weight.contiguous()?.reshape((co, k))?;
        return kernel_product(&w2, &x.reshape((b, k, oh * ow))?)?.reshape((b, co, oh, ow));
    }
    if (kh, kw, stride) == (3, 3, 1)
        && padding <= 2
        && x.dtype() == DType::F32
        && super::winograd::worthwhile(oh, ow)
    {
        let kernel = super::with_f32_slice(&weight.contiguous()?, |k| {
            super::winograd::Kernel3x3::new(k, co, ci)
        })?;
        let y = super::with_f32_slice(&x.contiguous()?, |x| {
            super::winograd::conv(x, (b, c, h, w), &kernel, padding, COL_CHUNK_VALUES)
        })?;
        return Tensor::from_vec(y, (b, co, oh, ow), x.device());
    }
    let geometry = Im2Col {
        dims: (b, c, h, w),
        kernel: (kh, kw),
        stride,
        padding,
        out: (oh, ow),
    };
    match x.dtype() {
        DType::F64 => geometry.forward::<f64>(x, weight, COL_CHUNK_VALUES),
        _ => geometry.forward::<f32>(x, weight, COL_CHUNK_VALUES),
    }
}

/// `w2 · cols[i]` for each batch item: the kernel as a `[co, k]` matrix times
/// columns `[b, k, p]`, giving `[b, co, p]`.
fn kernel_product(w2: &Tensor, cols: &Tensor) -> Result<Tensor> {
    if cols.dim(0)? == 1 {
        super::matmul::matmul(w2, &cols.squeeze(0)?)?.unsqueeze(0)
    } else {
        w2.broadcast_matmul(cols)
    }
}

/// The geometry of an im2col: input `[b, c, h, w]`, kernel `kh × kw`, output
/// `oh × ow`.
struct Im2Col {
    dims: (usize, usize, usize, usize),
    kernel: (usize, usize),
    stride: usize,
    padding: usize,
    out: (usize, usize),
}

impl Im2Col {
    /// The output columns `lo..hi` whose input column `ox·stride + j − padding`
    /// (kernel column `j`) lies inside the image; the others read padding.
    fn valid_columns(&self, j: usize) -> (usize, usize) {
        let (_, _, _, w) = self.dims;
        let (_, ow) = self.out;
        let (s, pad) = (self.stride, self.padding);
        // ox·s + j ≥ pad  ⇔  ox ≥ ⌈(pad − j) / s⌉;  ox·s + j < w + pad  ⇔  ox < ⌈(w + pad − j) / s⌉.
        let lo = pad.saturating_sub(j).div_ceil(s);
        let hi = (w + pad).saturating_sub(j).div_ceil(s).min(ow);
        (lo.min(hi), hi)
    }

    /// Output rows whose columns (`c·kh·kw·ow` values each, every input
    /// channel) fit in `max_values`: at least one, at most all.
    fn rows_per_pass(&self, max_values: usize) -> usize {
        let (_, c, _, _) = self.dims;
        let per_row = c * self.kernel.0 * self.kernel.1 * self.out.1;
        (max_values / per_row.max(1)).clamp(1, self.out.0.max(1))
    }

    /// The bands of output rows of one pass each (see [`Self::rows_per_pass`]).
    fn bands(&self, max_values: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        let (oh, rows) = (self.out.0, self.rows_per_pass(max_values));
        (0..oh).step_by(rows).map(move |r0| r0..(r0 + rows).min(oh))
    }

    /// The conv's output `[b, co, oh, ow]` for the kernel `weight`: per
    /// batch item, the columns of a band of output rows at a time (every input
    /// channel, at most `max_values` values) times the whole kernel — one
    /// band, one product in the usual case. Banding the rows keeps each
    /// product's inner dimension the full `ci·kh·kw`: a large image costs more
    /// products of the same efficient shape, not skinny ones.
    fn forward<T: WithDType>(
        &self,
        x: &Tensor,
        weight: &Tensor,
        max_values: usize,
    ) -> Result<Tensor> {
        let (b, ci, _, _) = self.dims;
        let (kh, kw) = self.kernel;
        let (oh, ow) = self.out;
        let (kk, p) = (kh * kw, oh * ow);
        let co = weight.dim(0)?;
        let x = x.contiguous()?;
        // The kernel viewed as `[co, ci·kh·kw]`, its storage order: never copied.
        let w2 = weight.contiguous()?.reshape((co, ci * kk))?;
        let threads = rayon::current_num_threads();
        if T::DTYPE == DType::F32 && threads > 1 && b * p >= threads * MIN_TASK_COLUMNS {
            return self.forward_tasks_f32(&x, &w2, max_values / threads, threads);
        }
        if self.rows_per_pass(max_values) >= oh {
            let cols = self
                .run::<T>(&x, 0..b * ci, 0..oh)?
                .reshape((b, ci * kk, p))?;
            return kernel_product(&w2, &cols)?.reshape((b, co, oh, ow));
        }
        let mut out: Vec<T> = vec![T::zero(); b * co * p];
        for bi in 0..b {
            for rows in self.bands(max_values) {
                let cols = self.run::<T>(&x, bi * ci..(bi + 1) * ci, rows.clone())?;
                let part = super::matmul::matmul(&w2, &cols)?;
                let (storage, layout) = part.storage_and_layout();
                let Storage::Cpu(cpu) = &*storage else {
                    bail!("conv2d: expected a CPU product")
                };
                let band = rows.len() * ow;
                let src = &cpu.as_slice::<T>()?[layout.start_offset()..][..co * band];
                // Row `o` of the band's product is output channel `o`'s pixels
                // `rows.start·ow ..` of this batch item.
                for (o, chunk) in src.chunks_exact(band).enumerate() {
                    let at = (bi * co + o) * p + rows.start * ow;
                    out[at..at + band].copy_from_slice(chunk);
                }
            }
        }
        Tensor::from_vec(out, (b, co, oh, ow), x.device())
    }

    /// The f32 forward on several threads: the output is cut into tasks —
    /// a batch item's band of output rows, at least one task per thread, each
    /// band's columns at most `max_values` — and each thread takes whole tasks:
    /// its own im2col and a single-threaded product written straight into the
    /// output. On a 2-core AMD EPYC, two independent single-threaded
    /// products ran 1.1–1.4× faster than the gemm crate sharing each product
    /// between the threads for the VAE's shapes (e.g. 128×1152×3584: 48 against
    /// 34 GFLOP/s) and no slower for the UNet's. The 3×3 stride-1 convs on
    /// large images go to [`super::winograd`] instead; this serves the
    /// downsamplers and the small levels.
    fn forward_tasks_f32(
        &self,
        x: &Tensor,
        w2: &Tensor,
        max_values: usize,
        threads: usize,
    ) -> Result<Tensor> {
        use rayon::prelude::*;
        let (b, ci, h, w) = self.dims;
        let (kh, kw) = self.kernel;
        let (oh, ow) = self.out;
        let (kk, p) = (kh * kw, oh * ow);
        let co = w2.dim(0)?;
        let per_item = threads.div_ceil(b.max(1));
        let rows = self
            .rows_per_pass(max_values)
            .min(oh.div_ceil(per_item))
            .max(1);
        let tasks: Vec<(usize, std::ops::Range<usize>)> = (0..b)
            .flat_map(|bi| {
                (0..oh)
                    .step_by(rows)
                    .map(move |r0| (bi, r0..(r0 + rows).min(oh)))
            })
            .collect();
        let (x_store, x_layout) = x.storage_and_layout();
        let (w_store, w_layout) = w2.storage_and_layout();
        let (Storage::Cpu(x_cpu), Storage::Cpu(w_cpu)) = (&*x_store, &*w_store) else {
            bail!("conv2d: expected CPU tensors")
        };
        let (Some((x0, x1)), Some((w0, w1))) =
            (x_layout.contiguous_offsets(), w_layout.contiguous_offsets())
        else {
            bail!("conv2d: expected contiguous input and kernel")
        };
        let src = &x_cpu.as_slice::<f32>()?[x0..x1];
        let kernel = &w_cpu.as_slice::<f32>()?[w0..w1];
        if src.len() != b * ci * h * w || kernel.len() != co * ci * kk {
            bail!("conv2d: input or kernel size does not match its shape")
        }
        let mut out: Vec<f32> = Vec::with_capacity(b * co * p);
        let dst = SendPtr(out.spare_capacity_mut().as_mut_ptr().cast::<f32>());
        tasks.par_iter().for_each(|(bi, rows)| {
            let band = rows.len() * ow;
            let n = ci * kk * band;
            let mut cols: Vec<f32> = Vec::with_capacity(n);
            for (c, chunk) in cols.spare_capacity_mut()[..n]
                .chunks_mut(kk * band)
                .enumerate()
            {
                let plane = &src[(bi * ci + c) * h * w..(bi * ci + c + 1) * h * w];
                self.fill_plane(plane, chunk, rows);
            }
            // SAFETY: `fill_plane` wrote every element of each plane's chunk.
            unsafe { cols.set_len(n) };
            // SAFETY: the task writes rows `o·p + rows.start·ow ..` (`band`
            // values) of batch item `bi` for each output channel `o`: inside
            // the `b·co·p` floats of `out`, and disjoint from every other
            // task's (tasks are distinct (item, band) pairs). The operands are
            // the contiguous kernel `[co, ci·kk]` and columns `[ci·kk, band]`.
            unsafe {
                raw_product(
                    (co, band, ci * kk),
                    (dst.ptr().add(bi * co * p + rows.start * ow), p),
                    false,
                    (kernel.as_ptr(), ci * kk, 1),
                    (cols.as_ptr(), band, 1),
                    1.0,
                    gemm::Parallelism::None,
                )
            }
        });
        // SAFETY: the tasks cover every (item, output row) once, and each
        // product wrote all `co × band` of its values.
        unsafe { out.set_len(b * co * p) };
        drop((x_store, w_store));
        Tensor::from_vec(out, (b, co, oh, ow), x.device())
    }

    /// The im2col of the input planes `planes` (indices into the `b·c`
    /// planes) for the output rows `rows`: `[planes·kh·kw, rows·ow]`, rows in
    /// the kernel's `(c, i, j)` order; one task per plane, each writing its own
    /// `kh·kw` rows.
    fn run<T: WithDType>(
        &self,
        x: &Tensor,
        planes: std::ops::Range<usize>,
        rows: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        use rayon::prelude::*;
        let (b, c, h, w) = self.dims;
        let (kh, kw) = self.kernel;
        let (oh, ow) = self.out;
        if planes.end > b * c || rows.end > oh {
            bail!(
                "im2col: planes {planes:?} of {}, rows {rows:?} of {oh}",
                b * c
            )
        }
        let p = rows.len() * ow;
        let (storage, layout) = x.storage_and_layout();
        let src = match &*storage {
            Storage::Cpu(cpu) => cpu.as_slice::<T>()?,
            _ => bail!("im2col: expected a CPU tensor"),
        };
        let src = &src[layout.start_offset() + planes.start * h * w
            ..layout.start_offset() + planes.end * h * w];
        // Every element is written exactly once below (padding as zeros), in
        // parallel: no serial zero-fill of the largest buffer of the step.
        let count = planes.len();
        let n = count * kh * kw * p;
        let mut cols: Vec<T> = Vec::with_capacity(n);
        cols.spare_capacity_mut()[..n]
            .par_chunks_mut(kh * kw * p)
            .enumerate()
            .for_each(|(bc, chunk)| {
                self.fill_plane(&src[bc * h * w..(bc + 1) * h * w], chunk, &rows)
            });
        // SAFETY: the loop above wrote all `n` elements: each task owns the
        // `kh·kw` rows of one (batch, channel) plane, and every row position
        // `r·ow + ox` of the band is written — as a zero outside `lo..hi` or an
        // invalid input row, else from the input.
        unsafe { cols.set_len(n) };
        drop(storage);
        Tensor::from_vec(cols, (count * kh * kw, p), x.device())
    }

    /// Writes the `kh·kw` im2col rows of one input plane (`h·w` values) for
    /// the output rows `rows` into `chunk` (`kh·kw·rows·ow` values): every
    /// element, padding as zeros.
    fn fill_plane<T: WithDType>(
        &self,
        plane: &[T],
        chunk: &mut [std::mem::MaybeUninit<T>],
        rows: &std::ops::Range<usize>,
    ) {
        let (_, _, h, w) = self.dims;
        let (kh, kw) = self.kernel;
        let ow = self.out.1;
        let (stride, pad) = (self.stride, self.padding);
        let p = rows.len() * ow;
        let zero = std::mem::MaybeUninit::new(T::zero());
        for i in 0..kh {
            for j in 0..kw {
                let row = &mut chunk[(i * kw + j) * p..(i * kw + j + 1) * p];
                let (lo, hi) = self.valid_columns(j);
                for (r, oy) in rows.clone().enumerate() {
                    let dst = &mut row[r * ow..(r + 1) * ow];
                    let iy = (oy * stride + i) as isize - pad as isize;
                    if iy < 0 || iy >= h as isize {
                        dst.fill(zero);
                        continue;
                    }
                    let line = &plane[iy as usize * w..(iy as usize + 1) * w];
                    dst[..lo].fill(zero);
                    dst[hi..].fill(zero);
                    if stride == 1 {
                        // A contiguous run: a vectorised copy.
                        let from = &line[lo + j - pad..hi + j - pad];
                        for (d, &v) in dst[lo..hi].iter_mut().zip(from) {
                            d.write(v);
                        }
                    } else {
                        for (ox, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
                            d.write(line[ox * stride + j - pad]);
                        }
                    }
                }
            }
        }
    }

    /// The adjoint of [`Self::run`] for `n` consecutive input planes and the
    /// output rows `rows`: `cols` (`[n·kh·kw, rows·ow]`, contiguous) added onto
    /// `planes` (`n` planes of `h·w`), one parallel task per plane.
    fn col2im_into<T: WithDType>(
        &self,
        cols: &Tensor,
        planes: &mut [T],
        rows: std::ops::Range<usize>,
    ) -> Result<()> {
        use rayon::prelude::*;
        let (_, _, h, w) = self.dims;
        let (kh, kw) = self.kernel;
        let ow = self.out.1;
        let (stride, pad) = (self.stride, self.padding);
        let p = rows.len() * ow;
        let n = planes.len() / (h * w).max(1);
        let (storage, layout) = cols.storage_and_layout();
        let src = match &*storage {
            Storage::Cpu(cpu) => cpu.as_slice::<T>()?,
            _ => bail!("col2im: expected a CPU tensor"),
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("col2im: expected contiguous columns")
        };
        if end - start != n * kh * kw * p {
            bail!("col2im: {} column values for {n} planes", end - start)
        }
        let src = &src[start..end];
        planes
            .par_chunks_mut(h * w)
            .enumerate()
            .for_each(|(bc, plane)| {
                let chunk = &src[bc * kh * kw * p..(bc + 1) * kh * kw * p];
                for i in 0..kh {
                    for j in 0..kw {
                        let row = &chunk[(i * kw + j) * p..(i * kw + j + 1) * p];
                        let (lo, hi) = self.valid_columns(j);
                        for (r, oy) in rows.clone().enumerate() {
                            let iy = (oy * stride + i) as isize - pad as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            let line = &mut plane[iy as usize * w..(iy as usize + 1) * w];
                            let from = &row[r * ow..(r + 1) * ow];
                            if stride == 1 {
                                let to = lo + j - pad;
                                for (d, v) in line[to..to + hi - lo].iter_mut().zip(&from[lo..hi]) {
                                    *d += *v;
                                }
                            } else {
                                for (ox, v) in from.iter().enumerate().take(hi).skip(lo) {
                                    line[ox * stride + j - pad] += *v;
                                }
                            }
                        }
                    }
                }
            });
        Ok(())
    }

    /// [`input_grad_cpu`] in `T`, at most `max_values` column values at once:
    /// per batch item and band of output rows, that band's columns
    /// `Wᵀ · g[:, band]` (every input channel), scattered onto the input. Bands
    /// run one after the other, since neighbouring bands' windows overlap.
    fn input_grad<T: WithDType>(
        &self,
        grad: &Tensor,
        weight: &Tensor,
        max_values: usize,
    ) -> Result<Tensor> {
        let (b, ci, h, w) = self.dims;
        let (kh, kw) = self.kernel;
        let (oh, ow) = self.out;
        let (kk, p) = (kh * kw, oh * ow);
        let co = grad.dim(1)?;
        // `[ci·kk, co]`: the kernel matrix read transposed in place (copying
        // the kernel every step would cost more than the product).
        let wt = weight
            .to_dtype(grad.dtype())?
            .contiguous()?
            .reshape((co, ci * kk))?
            .t()?;
        let g = grad.contiguous()?.reshape((b, co, p))?;
        let mut out = vec![T::zero(); b * ci * h * w];
        for bi in 0..b {
            let gb = g.get(bi)?;
            for rows in self.bands(max_values) {
                let g_band = gb.narrow(1, rows.start * ow, rows.len() * ow)?;
                let cols = super::matmul::matmul(&wt, &g_band)?.contiguous()?;
                let planes = &mut out[bi * ci * h * w..(bi + 1) * ci * h * w];
                self.col2im_into(&cols, planes, rows)?;
            }
        }
        Tensor::from_vec(out, (b, ci, h, w), grad.device())
    }
}

/// Output pixels per thread from which [`Im2Col::forward_tasks_f32`] gives
/// each thread its own products. Below, each thread's product would be thin
/// and every thread would pack the whole kernel again (SD1.5's 1280-channel
/// convs at 8×8: 59 MB each) — one product shared by the threads is faster.
const MIN_TASK_COLUMNS: usize = 2048;

/// Column values per pass of the CPU conv, forward (im2col) and input
/// gradient ([`input_grad_cpu`]): 2^22 (16 MiB in f32). All the columns at
/// once are `kh·kw` times the input's size — 141 MB for SD1.5's 960-channel
/// up-path convolutions at 512 px, 1.2 GB for the VAE's first level at 512 px.
const COL_CHUNK_VALUES: usize = 1 << 22;

/// The input gradient on the CPU: `cols = Wᵀ · g` (the kernel as stored,
/// read transposed by the matrix product — no flipped copy), then col2im, the
/// adjoint of the forward's im2col, scattering each column back onto the
/// input pixels it came from. One parallel task per `(batch, channel)` plane,
/// any stride and padding (candle's CPU `conv_transpose2d`, used for stride 2
/// otherwise, is a naive loop). The columns are computed and scattered a band
/// of output rows at a time, at most [`COL_CHUNK_VALUES`] values.
fn input_grad_cpu(
    grad: &Tensor,
    weight: &Tensor,
    (h, w): (usize, usize),
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (b, co, oh, ow) = grad.dims4()?;
    let (wco, ci, kh, kw) = weight.dims4()?;
    if wco != co {
        bail!(
            "frozen-conv2d: gradient {:?} does not fit kernel {:?}",
            grad.dims(),
            weight.dims()
        )
    }
    if (kh, kw, stride) == (3, 3, 1)
        && padding <= 2
        && grad.dtype() == DType::F32
        && super::winograd::worthwhile(h, w)
    {
        // Stride 1: the input gradient is the conv of the gradient with the
        // flipped, in/out-swapped kernel and padding `2 − padding`.
        let kernel = super::with_f32_slice(&weight.to_dtype(DType::F32)?.contiguous()?, |k| {
            super::winograd::Kernel3x3::flipped_transposed(k, co, ci)
        })?;
        let dx = super::with_f32_slice(&grad.contiguous()?, |g| {
            super::winograd::conv(g, (b, co, oh, ow), &kernel, 2 - padding, COL_CHUNK_VALUES)
        })?;
        return Tensor::from_vec(dx, (b, ci, h, w), grad.device());
    }
    let geometry = Im2Col {
        dims: (b, ci, h, w),
        kernel: (kh, kw),
        stride,
        padding,
        out: (oh, ow),
    };
    match grad.dtype() {
        DType::F64 => geometry.input_grad::<f64>(grad, weight, COL_CHUNK_VALUES),
        _ => geometry.input_grad::<f32>(grad, weight, COL_CHUNK_VALUES),
    }
}

/// `[out, in, kh, kw]` → `[in, out, kh, kw]` flipped in height and width, in
/// `dtype`: the kernel whose stride-1 correlation is the transposed
/// convolution (off the CPU f32/f64 path, which uses col2im instead).
fn flipped_kernel(weight: &Tensor, dtype: DType) -> Result<Tensor> {
    weight
        .to_dtype(dtype)?
        .transpose(0, 1)?
        .contiguous()?
        .flip(&[2, 3])
}

impl Module for FrozenConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        FrozenConv2d::forward(self, x)
    }
}

/// The gradient of `conv2d(x, weight, padding, stride)` with respect to `x`, for
/// an input of spatial size `hw` (also used by the LoRA conv's `down`).
pub(crate) fn input_grad(
    grad: &Tensor,
    weight: &Tensor,
    (h, w): (usize, usize),
    (kh, kw): (usize, usize),
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    if grad.device().is_cpu() && matches!(grad.dtype(), DType::F32 | DType::F64) {
        return input_grad_cpu(grad, weight, (h, w), stride, padding);
    }
    if stride == 1 && kh == kw && padding < kh {
        // Correlation with the flipped, in/out-transposed kernel is the transposed
        // convolution for stride 1, and runs on the fast conv2d path.
        // (`flip` is an index-select, which candle's CPU backend only runs on
        // contiguous tensors.)
        let flipped = flipped_kernel(weight, grad.dtype())?;
        return conv2d_plain(grad, &flipped, kh - 1 - padding, 1);
    }
    // Rows (columns) past the last window get no gradient; the output padding
    // restores them. candle takes a single output padding for both axes, so use
    // the larger one and cut the other axis back to size.
    let (gh, gw) = (grad.dim(2)?, grad.dim(3)?);
    let covered = |g: usize, k: usize| (g - 1) * stride + k;
    let (ch, cw) = (covered(gh, kh), covered(gw, kw));
    if ch < 2 * padding || cw < 2 * padding {
        bail!("frozen-conv2d: padding {padding} larger than the kernel coverage")
    }
    let (rh, rw) = (
        h.saturating_sub(ch - 2 * padding),
        w.saturating_sub(cw - 2 * padding),
    );
    let weight = weight.to_dtype(grad.dtype())?;
    let dx = grad.conv_transpose2d(&weight, padding, rh.max(rw), stride, 1)?;
    if dx.dim(2)? == h && dx.dim(3)? == w {
        Ok(dx)
    } else {
        dx.narrow(2, 0, h)?.narrow(3, 0, w)?.contiguous()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::Im2Col;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// The row bands of the CPU conv give the same output as candle's
    /// conv2d, and of its input gradient the same as one pass over all
    /// rows (the finite-difference tests in `tests/ops/conv.rs` check the
    /// single pass), for stride 1 and 2, with and without padding.
    #[test]
    fn row_bands_equal_one_pass() {
        let dev = Device::Cpu;
        for (stride, padding) in [(1, 1), (2, 1), (1, 0)] {
            let (b, ci, co, h, w, k) = (2, 7, 5, 9, 8, 3);
            let (oh, ow) = (
                (h + 2 * padding - k) / stride + 1,
                (w + 2 * padding - k) / stride + 1,
            );
            let grad = Tensor::randn(0f64, 1.0, (b, co, oh, ow), &dev).unwrap();
            let weight = Tensor::randn(0f64, 1.0, (co, ci, k, k), &dev).unwrap();
            let geometry = Im2Col {
                dims: (b, ci, h, w),
                kernel: (k, k),
                stride,
                padding,
                out: (oh, ow),
            };
            // The forward, grouped, against candle's conv2d.
            let x = Tensor::randn(0f64, 1.0, (b, ci, h, w), &dev).unwrap();
            let reference = x.conv2d(&weight, padding, stride, 1, 1).unwrap();
            let whole = geometry
                .input_grad::<f64>(&grad, &weight, usize::MAX)
                .unwrap();
            for max_values in [usize::MAX, 1, k * k * ci * ow * 2, k * k * ci * ow * 3 + 1] {
                let y = geometry.forward::<f64>(&x, &weight, max_values).unwrap();
                let diff = max_abs_diff(&y, &reference);
                assert!(
                    diff < 1e-12,
                    "forward, stride {stride}, {max_values} values: {diff}"
                );
                let grouped = geometry
                    .input_grad::<f64>(&grad, &weight, max_values)
                    .unwrap();
                let diff = max_abs_diff(&grouped, &whole);
                assert!(
                    diff < 1e-12,
                    "input gradient, stride {stride}, {max_values} values: {diff}"
                );
            }
        }
    }

    /// Winograd F(2×2, 3×3) in f32 against the direct conv in f64: the
    /// forward and the input gradient (the flipped, transposed kernel), every
    /// padding it takes, odd and even sizes, one band and many.
    #[test]
    fn winograd_equals_direct_conv() {
        use super::super::winograd::{Kernel3x3, conv};
        use candle_core::DType;
        let dev = Device::Cpu;
        let values = |t: &Tensor| -> Vec<f32> {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        for padding in [0, 1, 2] {
            for (h, w) in [(9, 8), (6, 7), (3, 3)] {
                let (b, ci, co) = (2, 7, 5);
                let (oh, ow) = (h + 2 * padding - 2, w + 2 * padding - 2);
                let x = Tensor::randn(0f64, 1.0, (b, ci, h, w), &dev).unwrap();
                let weight = Tensor::randn(0f64, 1.0, (co, ci, 3, 3), &dev).unwrap();
                let grad = Tensor::randn(0f64, 1.0, (b, co, oh, ow), &dev).unwrap();
                let reference = x.conv2d(&weight, padding, 1, 1, 1).unwrap();
                let geometry = Im2Col {
                    dims: (b, ci, h, w),
                    kernel: (3, 3),
                    stride: 1,
                    padding,
                    out: (oh, ow),
                };
                let dx_reference = geometry
                    .input_grad::<f64>(&grad, &weight, usize::MAX)
                    .unwrap();
                let k = values(&weight);
                let forward = Kernel3x3::new(&k, co, ci).unwrap();
                let backward = Kernel3x3::flipped_transposed(&k, co, ci).unwrap();
                for max_values in [usize::MAX, 1, 16 * 7 * 5] {
                    let y =
                        conv(&values(&x), (b, ci, h, w), &forward, padding, max_values).unwrap();
                    let y = Tensor::from_vec(y, (b, co, oh, ow), &dev).unwrap();
                    let diff = max_abs_diff(&y.to_dtype(DType::F64).unwrap(), &reference);
                    assert!(diff < 1e-4, "forward, padding {padding}, {h}×{w}: {diff}");
                    let dx = conv(
                        &values(&grad),
                        (b, co, oh, ow),
                        &backward,
                        2 - padding,
                        max_values,
                    )
                    .unwrap();
                    let dx = Tensor::from_vec(dx, (b, ci, h, w), &dev).unwrap();
                    let diff = max_abs_diff(&dx.to_dtype(DType::F64).unwrap(), &dx_reference);
                    assert!(
                        diff < 1e-4,
                        "input gradient, padding {padding}, {h}×{w}: {diff}"
                    );
                }
            }
        }
    }

    /// The f32 forward in per-thread tasks (what the CPU runs with several
    /// threads) against the f64 single pass, with one task per band and with
    /// more bands than threads, stride 1 and 2.
    #[test]
    fn f32_tasks_equal_one_pass() {
        use candle_core::DType;
        let dev = Device::Cpu;
        for (stride, padding) in [(1, 1), (2, 1), (1, 0)] {
            let (b, ci, co, h, w, k) = (2, 6, 4, 11, 9, 3);
            let (oh, ow) = (
                (h + 2 * padding - k) / stride + 1,
                (w + 2 * padding - k) / stride + 1,
            );
            let x = Tensor::randn(0f64, 1.0, (b, ci, h, w), &dev).unwrap();
            let weight = Tensor::randn(0f64, 1.0, (co, ci, k, k), &dev).unwrap();
            let reference = x.conv2d(&weight, padding, stride, 1, 1).unwrap();
            let geometry = Im2Col {
                dims: (b, ci, h, w),
                kernel: (k, k),
                stride,
                padding,
                out: (oh, ow),
            };
            let (x32, w32) = (
                x.to_dtype(DType::F32).unwrap(),
                weight
                    .to_dtype(DType::F32)
                    .unwrap()
                    .reshape((co, ci * k * k))
                    .unwrap(),
            );
            for (max_values, threads) in [(usize::MAX, 2), (1, 2), (k * k * ci * ow * 2, 3)] {
                let y = geometry
                    .forward_tasks_f32(&x32, &w32, max_values, threads)
                    .unwrap();
                let diff = max_abs_diff(&y.to_dtype(DType::F64).unwrap(), &reference);
                assert!(diff < 1e-4, "stride {stride}, {max_values} values: {diff}");
            }
        }
    }
}
