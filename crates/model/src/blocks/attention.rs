//! Multi-head attention (`Attention` in diffusers, with the default processor)
//! and the GEGLU feed-forward of the transformer blocks.
//!
//! Field names follow the checkpoint keys with `.` → `_` where diffusers keys
//! contain a list index: `to_out.0` is the field `to_out_0`, `net.0.proj` is
//! `net_0.proj`, `net.2` is `net_2` (these are also the kohya LoRA module names).

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::linear;
use crate::ops::{self, FrozenLinear};

/// Scaled dot-product attention over `[b, heads, t, d]` tensors.
///
/// The scores and the softmax are computed in f32 when storage is f16/bf16,
/// whatever `upcast_attention` says: half-precision softmax over long sequences
/// loses too much for training, and it is what diffusers' `upcast_softmax` does for
/// the VAE. `chunk`, when set, runs [`ops::attention_chunked`] with that many
/// queries at a time (same result, less memory). When it is not set, large
/// attentions are chunked anyway, so that no score matrix of more than
/// [`AUTO_CHUNK_ELEMENTS`] values exists at once: the chunked op keeps only
/// q, k and v for its backward (recomputing the scores chunk by chunk), so
/// training memory no longer holds a `heads × t × t` probability matrix for
/// every attention layer of the model (5.4 GB in f32 for SD1.5 at 512 px).
pub fn scaled_dot_product(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    chunk: Option<usize>,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let upcast = matches!(dtype, DType::F16 | DType::BF16);
    let (q, k, v) = if upcast {
        (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?,
        )
    } else {
        (q.clone(), k.clone(), v.clone())
    };
    let out = match chunk.or_else(|| auto_chunk(q.dims(), k.dims())) {
        Some(chunk) => ops::attention_chunked(&q, &k, &v, scale, chunk)?,
        None => ops::attention(&q, &k, &v, scale)?,
    };
    if upcast { out.to_dtype(dtype) } else { Ok(out) }
}

/// Score-matrix size (values) above which attention is chunked when no
/// chunk size is set: 2^24 values, 64 MiB in f32.
pub const AUTO_CHUNK_ELEMENTS: usize = 1 << 24;

/// The automatic chunk size (queries per chunk) for `q: [.., tq, d]` and
/// `k: [.., tk, d]`, or `None` when the whole score matrix is small enough.
pub fn auto_chunk(q: &[usize], k: &[usize]) -> Option<usize> {
    let (Some(&tk), Some(tq)) = (k.iter().rev().nth(1), q.iter().rev().nth(1)) else {
        return None;
    };
    let lead: usize = q.iter().rev().skip(2).product();
    let scores = lead * tq * tk;
    (scores > AUTO_CHUNK_ELEMENTS).then(|| (AUTO_CHUNK_ELEMENTS / (lead * tk).max(1)).max(1))
}

/// `[b, t, heads·d]` → `[b, heads, t, d]` (contiguous).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    x.reshape((b, t, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[b, heads, t, d]` → `[b, t, heads·d]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, heads, t, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, t, heads * d))
}

/// Self- or cross-attention: `to_q`, `to_k`, `to_v` (no bias in the UNet) and the
/// output projection `to_out.0` (with bias).
#[derive(Debug, Clone)]
pub struct Attention {
    pub to_q: FrozenLinear,
    pub to_k: FrozenLinear,
    pub to_v: FrozenLinear,
    /// Key `to_out.0`.
    pub to_out_0: FrozenLinear,
    pub heads: usize,
    pub head_dim: usize,
    /// Queries per chunk for memory-saving attention; `None` chunks
    /// automatically when the score matrix is large (see [`auto_chunk`]).
    pub chunk: Option<usize>,
}

impl Attention {
    /// `query_dim` is the width of the hidden states, `context_dim` that of the
    /// encoder hidden states for cross-attention (`None` for self-attention).
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let context_dim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: linear(&vb.pp("to_q"), query_dim, inner, qkv_bias)?,
            to_k: linear(&vb.pp("to_k"), context_dim, inner, qkv_bias)?,
            to_v: linear(&vb.pp("to_v"), context_dim, inner, qkv_bias)?,
            to_out_0: linear(&vb.pp("to_out.0"), inner, query_dim, true)?,
            heads,
            head_dim,
            chunk: None,
        })
    }

    /// `x: [b, t, query_dim]`, `context: [b, s, context_dim]` (or `None` for
    /// self-attention) → `[b, t, query_dim]`.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = split_heads(&self.to_q.forward(x)?, self.heads)?;
        let k = split_heads(&self.to_k.forward(context)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(context)?, self.heads)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = scaled_dot_product(&q, &k, &v, scale, self.chunk)?;
        self.to_out_0.forward(&merge_heads(&out)?)
    }
}

/// GEGLU input projection of the feed-forward (key `ff.net.0`): `proj` maps to
/// twice the inner width, then `h · gelu(gate)`.
#[derive(Debug, Clone)]
pub struct GegluProj {
    pub proj: FrozenLinear,
}

impl GegluProj {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::geglu(&self.proj.forward(x)?)
    }
}

/// diffusers' `FeedForward` with `activation_fn = "geglu"`: keys `net.0.proj`
/// and `net.2` (`net.1` is dropout).
#[derive(Debug, Clone)]
pub struct FeedForward {
    /// Key `net.0`.
    pub net_0: GegluProj,
    /// Key `net.2`.
    pub net_2: FrozenLinear,
}

impl FeedForward {
    /// `dim → inner (×2 for the gate) → dim`; diffusers uses `inner = 4·dim`.
    pub fn new(vb: VarBuilder, dim: usize, inner: usize) -> Result<Self> {
        Ok(Self {
            net_0: GegluProj {
                proj: linear(&vb.pp("net.0.proj"), dim, 2 * inner, true)?,
            },
            net_2: linear(&vb.pp("net.2"), inner, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.net_2.forward(&self.net_0.forward(x)?)
    }
}

crate::lora::visit::impl_visit_layers!(Attention {
    to_q => "to_q",
    to_k => "to_k",
    to_v => "to_v",
    to_out_0 => "to_out.0",
});
crate::lora::visit::impl_visit_layers!(GegluProj { proj => "proj" });
crate::lora::visit::impl_visit_layers!(FeedForward {
    net_0 => "net.0",
    net_2 => "net.2",
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_attentions_are_chunked_automatically() {
        // SD1.5 at 512 px, level 0 self-attention: 8 heads, 4096 tokens.
        assert_eq!(auto_chunk(&[1, 8, 4096, 40], &[1, 8, 4096, 40]), Some(512));
        // Cross-attention to 77 tokens stays whole.
        assert_eq!(auto_chunk(&[1, 8, 4096, 40], &[1, 8, 77, 40]), None);
        // Small models stay whole.
        assert_eq!(auto_chunk(&[2, 2, 96, 8], &[2, 2, 96, 8]), None);
        // Never below one query per chunk.
        assert_eq!(auto_chunk(&[1, 1, 4, 8], &[1, 1, 1 << 25, 8]), Some(1));
    }
}
