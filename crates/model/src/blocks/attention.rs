//! Multi-head attention (`Attention` in diffusers, with the default processor)
//! and the GEGLU feed-forward of the transformer blocks.
//!
//! Field names follow the checkpoint keys with `.` → `_` where diffusers keys
//! contain a list index: `to_out.0` is the field `to_out_0`, `net.0.proj` is
//! `net_0.proj`, `net.2` is `net_2` (these are also the kohya LoRA module names).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::linear;
use crate::ops::{self, FrozenLinear};

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
    /// Queries per chunk of [`ops::multi_head_attention`]; `None` sizes the
    /// chunks so that at most [`ops::attention::MAX_CHUNK_SCORES`] score values
    /// exist at once.
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
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = ops::multi_head_attention(&q, &k, &v, self.heads, scale, self.chunk)?;
        self.to_out_0.forward(&out)
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

    /// `net_2(geglu(net_0.proj(x)))`. When `net.2` has no active LoRA adapter,
    /// the GEGLU and `net.2` are one graph node on the projection: the GEGLU's
    /// output (half the projection's size) is not kept for the backward, which
    /// takes `net.2`'s input gradient from its weight and applies the GEGLU
    /// derivative to the projection.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.net_0.proj.forward(x)?;
        let lora = self.net_2.lora.as_ref().is_some_and(|l| !l.is_merged());
        if lora || !p.track_op() || !ops::checkpoint::is_grad_enabled() {
            return self.net_2.forward(&ops::geglu(&p)?);
        }
        let pd = p.detach();
        let y = ops::checkpoint::no_grad(|| self.net_2.forward(&ops::geglu(&pd)?))?;
        drop(pd);
        let w = self.net_2.weight.detach();
        ops::with_grad1("geglu-linear", &p, y, move |a| {
            let [p] = a.inputs;
            let (n, k) = w.dims2()?;
            let m = a.grad.elem_count() / n;
            let mut dims = p.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = k;
            }
            let dh = ops::matmul::matmul(&a.grad.reshape((m, n))?, &w)?.reshape(dims)?;
            Ok([Some(ops::activation::geglu_backward(p, &dh)?)])
        })
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
