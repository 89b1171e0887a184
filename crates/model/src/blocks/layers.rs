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

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops::{self, FrozenConv2d, FrozenLinear};

/// Loads `weight: [out, in]` (and `bias: [out]` when `bias`) under `vb`.
pub fn linear(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<FrozenLinear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    FrozenLinear::new(weight, bias)
}

/// Loads a square-kernel conv with bias: `weight: [out, in, k, k]`, `bias: [out]`.
pub fn conv2d(
    vb: &VarBuilder,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<FrozenConv2d> {
    let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
    let bias = vb.get(out_channels, "bias")?;
    FrozenConv2d::new(weight, Some(bias), stride, padding)
}

/// Runs `conv` on `x`, applying the conv dtype rule of this module: on the CPU,
/// f16/bf16 convs are computed in f32 and the result converted back.
pub fn conv2d_forward(conv: &FrozenConv2d, x: &Tensor) -> Result<Tensor> {
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
