//! Linear layer over a frozen weight.
//!
//! `x.matmul(&w.t())` in candle computes and stores a gradient for `w` even when
//! `w` is a constant (under the id of the temporary `w.t()`, where nothing will
//! ever read it): a full `[out, in]` matmul and buffer per layer per step, for
//! nothing. [`FrozenLinear`] runs the forward matmul as a custom op on `x` that
//! holds `w`, so the backward computes `dx = g·w` and nothing else.
//!
//! Layers that may carry a trainable addition (a LoRA adapter) are held by the
//! models as [`LinearLayer`]s: `ops` defines the trait, `crate::lora` implements it.

use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, D, DType, Layout, MetalStorage, Module, Result, Shape,
    Storage, Tensor, bail,
};

/// `y = x·Wᵀ + b` with frozen `W: [out, in]` and `b: [out]`; `x` may have any rank
/// `(..., in)`. Only `x` receives a gradient.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    /// `[out_features, in_features]`, as stored in checkpoints.
    pub weight: Tensor,
    /// `[out_features]`.
    pub bias: Option<Tensor>,
}

/// A Linear layer as a model holds it: a frozen product, possibly with a
/// trainable addition to its output (a LoRA adapter: `crate::lora` implements
/// this trait). Fusions that rely on the layer being frozen ask
/// [`is_adapted`](Self::is_adapted) first.
pub trait LinearLayer {
    /// The frozen layer.
    fn frozen(&self) -> &FrozenLinear;
    /// The layer's output: the frozen product plus any active addition.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// Whether a trainable addition takes part in the forward.
    fn is_adapted(&self) -> bool;
}

impl LinearLayer for FrozenLinear {
    fn frozen(&self) -> &FrozenLinear {
        self
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        FrozenLinear::forward(self, x)
    }
    fn is_adapted(&self) -> bool {
        false
    }
}

impl FrozenLinear {
    /// Wraps a weight and optional bias, checking their shapes.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, _) = weight.dims2()?;
        if let Some(b) = &bias
            && b.dims1()? != out_features
        {
            bail!(
                "linear bias has shape {:?}, expected [{out_features}]",
                b.dims()
            )
        }
        Ok(Self { weight, bias })
    }

    /// `in_features`.
    pub fn in_features(&self) -> Result<usize> {
        Ok(self.weight.dims2()?.1)
    }

    /// `out_features`.
    pub fn out_features(&self) -> Result<usize> {
        Ok(self.weight.dims2()?.0)
    }

    /// Applies the layer to `x: (..., in)`, giving `(..., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (out_features, in_features) = self.weight.dims2()?;
        if x.rank() == 0 || x.dim(D::Minus1)? != in_features {
            bail!(
                "linear: input shape {:?} does not end in in_features {in_features}",
                x.dims()
            )
        }
        if x.elem_count() == 0 || out_features == 0 {
            let mut dims = x.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = out_features;
            }
            return Tensor::zeros(dims, x.dtype(), x.device());
        }
        super::flops::add_linear(x.elem_count() / in_features, out_features, in_features);
        // The storage-level matmul reads `x` as one `[m, in]` matrix.
        let x = x.contiguous()?;
        x.apply_op1(LinearOp {
            weight: self.weight.detach(),
            bias: self.bias.as_ref().map(Tensor::detach),
        })
    }
}

impl Module for FrozenLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        FrozenLinear::forward(self, x)
    }
}

/// The custom op: forward `x·Wᵀ + b` on the backend storages, backward `g·W`.
/// The weight and bias are kept as stored; when that is another dtype than the
/// computation's (fp8 storage), they are converted for each call only, so no
/// converted copy lives in the graph between the forward and the backward.
struct LinearOp {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl LinearOp {
    /// The weight and bias in `dtype` (the stored tensors when they already are).
    fn parts(&self, dtype: DType) -> Result<(Tensor, Option<Tensor>)> {
        let bias = match &self.bias {
            Some(b) => Some(b.to_dtype(dtype)?),
            None => None,
        };
        Ok((self.weight.to_dtype(dtype)?, bias))
    }

    /// The forward on one backend: `x` and `w` are storages of the same backend.
    fn fwd<S: BackendStorage>(
        &self,
        x: &S,
        x_l: &Layout,
        w: &S,
        w_l: &Layout,
        b: Option<(&S, &Layout)>,
    ) -> Result<(S, Shape)> {
        let Some((start, _)) = x_l.contiguous_offsets() else {
            bail!("frozen-linear: input must be contiguous")
        };
        let dims = x_l.dims();
        let k = dims[dims.len() - 1];
        let m = x_l.shape().elem_count() / k;
        let (n, _) = w_l.shape().dims2()?;
        let x2 = Layout::contiguous_with_offset((m, k), start);
        // `w` is `[n, k]`; the transposed view is the `[k, n]` right-hand side.
        let wt = w_l.transpose(0, 1)?;
        let mut y = x.matmul(w, (1, m, n, k), &x2, &wt)?;
        if let Some((b, b_l)) = b {
            let y_l = Layout::contiguous((m, n));
            y = y.binary_impl::<Add>(b, &y_l, &b_l.broadcast_as((m, n))?)?;
        }
        let mut out = dims.to_vec();
        out[dims.len() - 1] = n;
        Ok((y, Shape::from(out)))
    }

    /// The f32 CPU forward through [`super::matmul::products_f32`] (no
    /// zero-fill of the output before the product writes it), with the bias
    /// added in parallel rows; `None` for other dtypes or layouts.
    fn cpu_fwd_f32(
        x: &CpuStorage,
        x_l: &Layout,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Option<(CpuStorage, Shape)>> {
        use rayon::prelude::*;
        let (CpuStorage::F32(xs), Some((start, _))) = (x, x_l.contiguous_offsets()) else {
            return Ok(None);
        };
        let (w, w_l) = weight.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(ws)), Some((w_start, _))) =
            (&*w, w_l.contiguous_offsets())
        else {
            return Ok(None);
        };
        let dims = x_l.dims();
        let k = dims[dims.len() - 1];
        let m = x_l.shape().elem_count() / k.max(1);
        let (n, _) = w_l.shape().dims2()?;
        // `w` is `[n, k]` row-major, read as the `[k, n]` right-hand side.
        let mut y = super::matmul::products_f32(
            (xs, start, (0, k, 1)),
            (ws, w_start, (0, 1, k)),
            (1, m, k, n),
        )?;
        drop(w);
        if let Some(bias) = bias {
            let b = bias.to_dtype(DType::F32)?.contiguous()?.to_vec1::<f32>()?;
            y.par_chunks_mut(n.max(1)).for_each(|row| {
                for (v, b) in row.iter_mut().zip(&b) {
                    *v += *b;
                }
            });
        }
        let mut out = dims.to_vec();
        out[dims.len() - 1] = n;
        Ok(Some((CpuStorage::F32(y), Shape::from(out))))
    }
}

/// Runs [`LinearOp::fwd`] on the `$variant` storages of the weight and bias, or
/// fails if they live on another device than the input.
macro_rules! backend_fwd {
    ($self:ident, $variant:ident, $x:ident, $x_l:ident) => {{
        let (weight, bias) = $self.parts($x.dtype())?;
        let (w, w_l) = weight.storage_and_layout();
        let Storage::$variant(w) = &*w else {
            bail!("frozen-linear: weight is on another device than the input")
        };
        match &bias {
            None => $self.fwd($x, $x_l, w, w_l, None),
            Some(bias) => {
                let (b, b_l) = bias.storage_and_layout();
                let Storage::$variant(b) = &*b else {
                    bail!("frozen-linear: bias is on another device than the input")
                };
                $self.fwd($x, $x_l, w, w_l, Some((b, b_l)))
            }
        }
    }};
}

impl CustomOp1 for LinearOp {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_l: &Layout) -> Result<(CpuStorage, Shape)> {
        if self.weight.dtype() == DType::F32
            && let Some(out) = Self::cpu_fwd_f32(x, x_l, &self.weight, self.bias.as_ref())?
        {
            return Ok(out);
        }
        backend_fwd!(self, Cpu, x, x_l)
    }

    fn cuda_fwd(&self, x: &CudaStorage, x_l: &Layout) -> Result<(CudaStorage, Shape)> {
        backend_fwd!(self, Cuda, x, x_l)
    }

    fn metal_fwd(&self, x: &MetalStorage, x_l: &Layout) -> Result<(MetalStorage, Shape)> {
        backend_fwd!(self, Metal, x, x_l)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, _) = self.weight.dims2()?;
        let m = grad.elem_count() / n;
        let weight = self.weight.to_dtype(grad.dtype())?;
        let dx = super::matmul::matmul(&grad.reshape((m, n))?, &weight)?;
        Ok(Some(dx.reshape(arg.shape())?))
    }
}
