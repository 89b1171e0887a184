//! 2-D convolution over a frozen kernel.
//!
//! candle's `conv2d` backward always computes the kernel gradient as well (a
//! convolution as expensive as the forward) and stores it, even for a constant
//! kernel; for the input gradient it uses `conv_transpose2d`, which on CPU is a
//! naive loop, and it derives that op's output padding from the height alone, so
//! a stride-2 conv on an input whose height and width differ in parity fails in
//! the backward. [`FrozenConv2d`] computes only the input gradient:
//!
//! - stride 1, square kernel: `dx = conv2d(g, W′, padding k−1−p)` where `W′` is
//!   the kernel flipped in height and width with its in/out channels swapped — the
//!   same fast im2col path as the forward;
//! - otherwise (stride 2 for the downsamplers): `conv_transpose2d(g, W)` with the
//!   output padding that restores the input size.
//!
//! The forward runs candle's `conv2d` on detached tensors; the result is attached
//! to `x` with [`with_grad1`] (candle's conv
//! parameter structs cannot be built outside candle, so the storage-level conv is
//! out of reach, unlike the storage-level matmul in [`super::linear`]).
//!
//! A layer may carry a LoRA adapter in its `lora` slot (see [`crate::lora::layer`]):
//! its term is added to the frozen output with differentiable ops.

use candle_core::{DType, Module, Result, Storage, Tensor, WithDType, bail};

use super::custom_grad::with_grad1;
use crate::lora::layer::LoraAdapter;

/// `y = conv2d(x, W) + b` with a frozen kernel `W: [out, in, kh, kw]` and bias
/// `b: [out]`, on `x: [batch, in, h, w]`; one group, no dilation. Only `x`
/// receives a gradient (and the LoRA adapter's `down`/`up`, when there is one).
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
    /// An optional LoRA adapter whose term is added to the output (skipped while
    /// merged into `weight`).
    pub lora: Option<LoraAdapter>,
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
            lora: None,
        })
    }

    /// Applies the convolution to `x: [batch, in, h, w]`: the frozen base plus the
    /// LoRA term when an unmerged adapter is attached.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_base(x)?;
        match &self.lora {
            Some(lora) if !lora.is_merged() => y + lora.conv_delta(x, self.stride, self.padding)?,
            _ => Ok(y),
        }
    }

    /// The frozen convolution alone, ignoring any LoRA adapter.
    pub fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (out_channels, _, kh, kw) = self.weight.dims4()?;
        // The stored kernel, whatever its dtype; `x` may compute in another
        // one (f32 for a half-precision kernel on the CPU): the kernel is then
        // converted for this call only, and again in the backward, so no
        // converted copy lives in the graph between the two.
        let stored = self.weight.detach();
        let mut y = {
            let weight = stored.to_dtype(x.dtype())?;
            let y = x
                .detach()
                .conv2d(&weight, self.padding, self.stride, 1, 1)?;
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

/// `[out, in, kh, kw]` → `[in, out, kh, kw]` flipped in height and width, in
/// `dtype`: the kernel whose stride-1 correlation is the transposed
/// convolution. On the CPU one parallel pass over the kernel (candle's `flip`
/// is a single-threaded gather per axis, and took a third of a whole SD1.5
/// training step); elsewhere candle's ops.
pub(crate) fn flipped_kernel(weight: &Tensor, dtype: DType) -> Result<Tensor> {
    if weight.device().is_cpu() {
        let w = weight.to_dtype(dtype)?.contiguous()?;
        return match dtype {
            DType::F32 => flip_cpu::<f32>(&w),
            DType::F64 => flip_cpu::<f64>(&w),
            DType::F16 => flip_cpu::<half::f16>(&w),
            DType::BF16 => flip_cpu::<half::bf16>(&w),
            _ => w.transpose(0, 1)?.contiguous()?.flip(&[2, 3]),
        };
    }
    weight
        .to_dtype(dtype)?
        .transpose(0, 1)?
        .contiguous()?
        .flip(&[2, 3])
}

fn flip_cpu<T: WithDType>(w: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let (co, ci, kh, kw) = w.dims4()?;
    let k = kh * kw;
    let (storage, layout) = w.storage_and_layout();
    let src = match &*storage {
        Storage::Cpu(cpu) => cpu.as_slice::<T>()?,
        _ => bail!("flipped_kernel: expected a CPU tensor"),
    };
    let src = &src[layout.start_offset()..layout.start_offset() + co * ci * k];
    let mut out = vec![T::zero(); co * ci * k];
    // Output row `i` holds, for every output channel `o`, the reversed
    // spatial block of source `(o, i)`.
    out.par_chunks_mut(co * k).enumerate().for_each(|(i, row)| {
        for (o, block) in row.chunks_mut(k).enumerate() {
            let from = &src[(o * ci + i) * k..(o * ci + i + 1) * k];
            for (d, s) in block.iter_mut().zip(from.iter().rev()) {
                *d = *s;
            }
        }
    });
    drop(storage);
    Tensor::from_vec(out, (ci, co, kh, kw), w.device())
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
    if stride == 1 && kh == kw && padding < kh {
        // Correlation with the flipped, in/out-transposed kernel is the transposed
        // convolution for stride 1, and runs on the fast conv2d path.
        // (`flip` is an index-select, which candle's CPU backend only runs on
        // contiguous tensors.)
        let flipped = flipped_kernel(weight, grad.dtype())?;
        return grad.conv2d(&flipped, kh - 1 - padding, 1, 1, 1);
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
