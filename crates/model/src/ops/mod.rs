//! Operations with a correct and economical backward pass, which the UNet, the
//! text encoders and the VAE are built from.
//!
//! # Why these exist
//!
//! candle 0.11 computes gradients through every primitive op, but several of the
//! fused ops that models use are applied without a backward, and the gradient
//! through them is silently zero rather than an error:
//!
//! - `candle_nn::ops::softmax_last_dim` (used by every attention in
//!   candle-transformers): `to_q`/`to_k` get no gradient;
//! - `candle_nn::LayerNorm::forward` on contiguous inputs (the fused
//!   `ops::layer_norm`), `RmsNorm`, rotary embeddings and `sdpa`: every path
//!   through a LayerNorm is cut — all of a text encoder;
//!
//! and others compute far more than training a LoRA needs:
//!
//! - a matmul or conv computes and stores a gradient for *both* operands, so a
//!   frozen base weight costs a full extra matmul/conv and a weight-sized buffer
//!   per layer and step (for `x.matmul(&w.t())` it is stored under the id of the
//!   temporary `w.t()`, so `grads.get(&w)` is `None` although the work was done);
//! - adding a constant (a frozen bias, a mask) leaves a zero-filled gradient the
//!   size of the output in the store;
//! - `candle_nn::ops::softmax` and `GroupNorm` are differentiable but built from
//!   many primitives, each keeping an intermediate for the backward.
//!
//! candle's `BackpropOp` cannot be built outside candle, so custom ops
//! (`CustomOp1/2/3` with a `bwd`) are the only way to choose a backward. The
//! [`custom_grad`] module turns that into one device-agnostic mechanism — compute
//! the forward with ordinary tensor ops on detached inputs, attach a backward
//! closure — and every other module uses it, except [`linear`], which runs the
//! matmul on the backend storages directly to avoid copying the output.
//!
//! # What training keeps
//!
//! Every graph node keeps its inputs until the backward, so the layers are cut
//! into nodes whose inputs are what a backward through frozen weights needs: a
//! LoRA Linear is one node (`lora::layer::LoraAdapter::apply_linear`),
//! attention is one node on the unsplit projections
//! ([`attention::multi_head_attention`], probabilities recomputed), and the
//! blocks fuse `conv(silu(norm(x))) + add` and GEGLU + `net.2`
//! ([`crate::blocks::layers::norm_silu_conv`], [`crate::blocks::attention::FeedForward`]).
//!
//! # Dtypes and devices
//!
//! All ops work on f32 and f64 (the tests check gradients in f64 against finite
//! differences) and run forward and backward on f16/bf16 storage too (norms compute
//! their statistics in f32; candle's CPU backend has no bf16 conv). They are
//! written in terms of candle tensor ops and backend traits, so the CUDA backend
//! runs them as well as the CPU one. On the CPU in f32 — training's case there —
//! LayerNorm, GroupNorm (+ SiLU) and GEGLU run one-pass parallel kernels each way
//! and [`matmul`] calls the `gemm` crate without candle's serial zero-fill; the
//! tests check each kernel against the generic path in f64.
//!
//! Testing tip: `GradStore` has no `len`; its `Debug` output names each key as
//! `TensorId(n)`, which is how the tests count entries.

pub mod activation;
pub mod attention;
mod attention_cpu;
pub mod checkpoint;
pub mod conv;
pub mod custom_grad;
pub mod flops;
pub mod linear;
pub mod matmul;
pub mod norm;
pub mod op_count;
pub mod softmax;
pub(crate) mod winograd;

pub use activation::{geglu, gelu, quick_gelu, silu};
pub use attention::{attention, attention_chunked, attention_with_bias, multi_head_attention};
pub use conv::{ConvLayer, FrozenConv2d};
pub use custom_grad::{BackwardArgs, add_frozen, with_grad1, with_grad2, with_grad3};
pub use linear::{FrozenLinear, LinearLayer};
pub use norm::{group_norm, layer_norm};
pub use softmax::softmax_last_dim;

use candle_core::{DType, Storage, Tensor};

/// Runs `f` on the data of `t` when it is a contiguous f32 CPU tensor.
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(cpu) => cpu.as_slice::<f32>().ok().map(|s| f(&s[start..end])),
        _ => None,
    }
}

/// Runs `f` on the f32 values of a contiguous CPU tensor.
pub(crate) fn with_f32_slice<R>(
    t: &candle_core::Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("expected a CPU tensor")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor")
    };
    f(&cpu.as_slice::<f32>()?[start..end])
}

/// A pointer into an output buffer that parallel tasks write, each its own
/// disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: only used by tasks that write disjoint ranges (see its uses).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so that closures capture the whole `SendPtr`).
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}
