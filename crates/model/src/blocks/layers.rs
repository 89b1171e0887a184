//! Loading the basic layers (Linear, Conv2d, GroupNorm, LayerNorm) from a
//! `VarBuilder`, and running them with the dtype rules of this crate.
//!
//! The layers are the frozen ops of [`crate::ops`]; this module only knows where
//! their weights live (`NAME.weight`, `NAME.bias`) and what shape to expect, so a
//! missing or mis-shaped tensor is reported with its full key path.
//!
//! # The conv dtype rule
//!
//! candle's CPU backend has no bf16 conv2d (and its f16 conv is slow), so on the
//! CPU a convolution over f16/bf16 storage is computed in f32: the input and the
//! weight are converted, the conv runs in f32 and the result is converted back to
//! the storage dtype (see [`conv2d_forward`]). On CUDA the conv runs in the storage
//! dtype. Everything else (matmuls, norms, attention) follows the rules of
//! [`crate::ops`]: norms compute their statistics in f32, and the attention here
//! always computes its scores and softmax in f32 when storage is f16/bf16.

use candle_core::{DType, Device, Result, Tensor, bail};
use candle_nn::VarBuilder;

use crate::ops::{self, ConvLayer, FrozenConv2d, FrozenLinear};

/// Loads `weight: [out, in]` (and `bias: [out]` when `bias`) under `vb`, as a
/// [`FrozenLinear`] or a layer built from one (a LoRA slot around it).
pub fn linear<L: From<FrozenLinear>>(
    vb: &VarBuilder,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
) -> Result<L> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    FrozenLinear::new(weight, bias).map(L::from)
}

/// Loads a square-kernel conv with bias: `weight: [out, in, k, k]`, `bias: [out]`,
/// as a [`FrozenConv2d`] or a layer built from one (a LoRA slot around it).
pub fn conv2d<C: From<FrozenConv2d>>(
    vb: &VarBuilder,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<C> {
    let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
    let bias = vb.get(out_channels, "bias")?;
    FrozenConv2d::new(weight, Some(bias), stride, padding).map(C::from)
}

/// Runs `conv` on `x`, applying the conv dtype rule of this module: on the CPU,
/// f16/bf16 convs are computed in f32 and the result converted back.
pub fn conv2d_forward(conv: &impl ConvLayer, x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let on_cpu = matches!(x.device(), Device::Cpu);
    if on_cpu && matches!(dtype, DType::F16 | DType::BF16) {
        // CPU half precision is a storage format here, not a compute format
        // (DESIGN.md §3): the conv runs in f32, the frozen kernel converted
        // for the call only (and again in the backward — no f32 copy of the
        // kernel waits in the graph). The LoRA term is f32 anyway.
        return conv.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dtype);
    }
    conv.forward(x)
}

/// A GroupNorm with affine parameters (`weight`, `bias`), as `torch.nn.GroupNorm`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub num_groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    /// Loads `weight: [channels]` and `bias: [channels]` under `vb`.
    pub fn new(vb: &VarBuilder, num_groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if num_groups == 0 || !channels.is_multiple_of(num_groups) {
            candle_core::bail!(
                "{}: {channels} channels cannot be split into {num_groups} groups \
                 (check norm_num_groups in the config)",
                vb.prefix()
            )
        }
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            num_groups,
            eps,
        })
    }

    /// Normalises `x: [b, c, ...]` over groups of channels.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::group_norm(x, self.num_groups, &self.weight, &self.bias, self.eps)
    }
}

/// A LayerNorm over the last dimension with affine parameters.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// Loads `weight: [dim]` and `bias: [dim]` under `vb`.
    pub fn new(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    /// Normalises `x` over its last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// `conv(silu(norm(x))) + add` — both halves of a ResNet block (`add` = the time
/// embedding, then the residual) and the UNet's output head — as one graph node
/// on (`x`, `add`).
///
/// Built from separate ops, training would keep the norm's output, the SiLU's
/// output and the conv's output for the backward — three tensors the size of `x`
/// that a frozen conv does not need. This node keeps only `x` (and `add`): the
/// backward recomputes the normalised values from `x` (two cheap passes), takes
/// the conv's input gradient from its kernel and applies the SiLU and GroupNorm
/// derivatives, in f32 for half-precision inputs.
///
/// The forward runs the unfused ops on detached inputs, so the output is
/// bit-identical to them. With an active LoRA adapter on `conv` (whose `down`
/// needs the conv's input), the unfused ops run instead. `add` must have the
/// rank of the output and broadcast to it.
pub fn norm_silu_conv(
    norm: &GroupNorm,
    conv: &impl ConvLayer,
    x: &Tensor,
    add: Option<&Tensor>,
) -> Result<Tensor> {
    // conv(a) + add; records no graph when `a` and `add` have none.
    let conv_add = |a: &Tensor, add: Option<&Tensor>| -> Result<Tensor> {
        let h = conv2d_forward(conv, a)?;
        match add {
            Some(add) => h.broadcast_add(add),
            None => Ok(h),
        }
    };
    let tracked = x.track_op() || add.is_some_and(Tensor::track_op);
    if !tracked || conv.is_adapted() || !ops::checkpoint::is_grad_enabled() {
        return conv_add(&ops::silu(&norm.forward(x)?)?, add);
    }
    let (b, c, h, w) = x.dims4()?;
    let add_dims = add.map(|a| a.dims().to_vec());
    if add_dims.as_ref().is_some_and(|d| d.len() != 4) {
        bail!("norm_silu_conv: `add` {add_dims:?} is not rank 4")
    }
    let (xd, addd) = (x.detach(), add.map(Tensor::detach));
    // On the CPU in f32, GroupNorm + SiLU is one kernel pass whose group
    // statistics serve the backward too.
    let fast = ops::norm::group_norm_cpu_f32(
        &xd,
        norm.num_groups,
        &norm.weight,
        &norm.bias,
        norm.eps,
        true,
    );
    let (act, stats) = match fast {
        Some((act, stats)) => (act, Some(stats)),
        None => (
            ops::checkpoint::no_grad(|| ops::silu(&norm.forward(&xd)?))?,
            None,
        ),
    };
    let y = ops::checkpoint::no_grad(|| conv_add(&act, addd.as_ref()))?;
    drop((act, xd, addd));

    let frozen = conv.frozen();
    let weight = frozen.weight.detach();
    let (_, _, kh, kw) = weight.dims4()?;
    let (stride, padding) = (frozen.stride, frozen.padding);
    let (groups, eps) = (norm.num_groups, norm.eps);
    let (gamma, beta) = (norm.weight.detach(), norm.bias.detach());
    let grouped = (b * groups, c / groups * h * w);
    let channels = (b, c, h * w);
    let dx = move |x: &Tensor, g: &Tensor| -> Result<Tensor> {
        let cdt = ops::norm::compute_dtype(x.dtype());
        // The gradient of the SiLU's output, through the frozen conv.
        let da = ops::conv::input_grad(
            &g.to_dtype(cdt)?,
            &weight,
            (h, w),
            (kh, kw),
            stride,
            padding,
        )?;
        if let Some(stats) = &stats
            && let Some(dx) =
                ops::norm::group_norm_backward_cpu_f32(x, stats, groups, &gamma, &beta, &da, true)
        {
            return dx;
        }
        let xc = x.to_dtype(cdt)?.reshape(grouped)?;
        let (mean, rstd) = ops::norm::stats(&xc, eps)?;
        let xhat = xc.broadcast_sub(&mean)?.broadcast_mul(&rstd)?;
        drop(xc);
        let gamma = gamma.to_dtype(cdt)?.reshape((1, c, 1))?;
        let beta = beta.to_dtype(cdt)?.reshape((1, c, 1))?;
        let pre = xhat
            .reshape(channels)?
            .broadcast_mul(&gamma)?
            .broadcast_add(&beta)?;
        // silu'(p) = σ(p)·(1 + p·(1 − σ(p))).
        let sig = candle_nn::ops::sigmoid(&pre)?;
        let dact = ((&pre * (1.0 - &sig)?)? + 1.0)?.mul(&sig)?;
        drop((pre, sig));
        let dxhat = da
            .reshape(channels)?
            .mul(&dact)?
            .broadcast_mul(&gamma)?
            .reshape(grouped)?;
        ops::norm::normalise_backward(&dxhat, &xhat, &rstd)?.reshape((b, c, h, w))
    };
    match add_dims {
        None => ops::with_grad1("norm-silu-conv", x, y, move |a| {
            Ok([Some(dx(a.inputs[0], a.grad)?)])
        }),
        Some(add_dims) => {
            let inputs = [x, add.unwrap_or(x)];
            ops::with_grad2("norm-silu-conv-add", inputs, y, move |a| {
                let [need_x, need_add] = a.needs_grad;
                let dx = if need_x {
                    Some(dx(a.inputs[0], a.grad)?)
                } else {
                    None
                };
                let dadd = if need_add {
                    Some(sum_to(a.grad, &add_dims)?)
                } else {
                    None
                };
                Ok([dx, dadd])
            })
        }
    }
}

/// `g` summed over the dimensions where `dims` (same rank) has size 1 and `g`
/// does not: the gradient of a broadcast operand.
fn sum_to(g: &Tensor, dims: &[usize]) -> Result<Tensor> {
    let mut g = g.clone();
    for (i, &d) in dims.iter().enumerate() {
        if d == 1 && g.dim(i)? != 1 {
            g = g.sum_keepdim(i)?;
        }
    }
    Ok(g)
}
