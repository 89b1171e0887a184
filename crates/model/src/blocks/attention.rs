//! Multi-head attention (`Attention` in diffusers, with the default processor)
//! and the GEGLU feed-forward of the transformer blocks.
//!
//! Field names follow the checkpoint keys with `.` → `_` where diffusers keys
//! contain a list index: `to_out.0` is the field `to_out_0`, `net.0.proj` is
//! `net_0.proj`, `net.2` is `net_2` (these are also the kohya LoRA module names).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::linear;
use crate::lora::adapted::LoraLinear;
use crate::ops::{self};

/// Self- or cross-attention: `to_q`, `to_k`, `to_v` (no bias in the UNet) and the
/// output projection `to_out.0` (with bias).
#[derive(Debug, Clone)]
pub struct Attention {
    pub to_q: LoraLinear,
    pub to_k: LoraLinear,
    pub to_v: LoraLinear,
    /// Key `to_out.0`.
    pub to_out_0: LoraLinear,
    pub heads: usize,
    pub head_dim: usize,
    /// Queries per chunk of [`ops::multi_head_attention`]'s generic path; `None`
    /// sizes the chunks so that at most [`ops::attention::MAX_CHUNK_SCORES`]
    /// score values exist at once. The CPU f32 kernel sizes its own blocks.
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
    pub proj: LoraLinear,
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
    pub net_2: LoraLinear,
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
    ///
    /// Inside a checkpointed segment's recomputation
    /// ([`ops::checkpoint::is_recomputing`]) and without LoRA on either layer,
    /// the whole feed-forward is one node that keeps only `x`
    /// ([`Self::forward_recomputing`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if ops::checkpoint::is_recomputing() && !self.has_lora() {
            return self.forward_recomputing(x);
        }
        let p = self.net_0.proj.forward(x)?;
        if self.net_2.active_lora().is_some()
            || !p.track_op()
            || !ops::checkpoint::is_grad_enabled()
        {
            return self.net_2.forward(&ops::geglu(&p)?);
        }
        let pd = p.detach();
        let y = ops::checkpoint::no_grad(|| self.net_2.forward(&ops::geglu(&pd)?))?;
        drop(pd);
        let w = self.net_2.base.weight.detach();
        ops::with_grad1("geglu-linear", &p, y, move |a| {
            Ok([Some(projection_grad(a.inputs[0], a.grad, &w)?)])
        })
    }

    /// Whether either layer carries an active (unmerged) LoRA adapter.
    fn has_lora(&self) -> bool {
        self.net_0.proj.active_lora().is_some() || self.net_2.active_lora().is_some()
    }

    /// The feed-forward of frozen layers as one graph node that keeps only `x`:
    /// the forward and the backward both run over chunks of at most
    /// [`FF_CHUNK_VALUES`] projection values, and the backward recomputes each
    /// chunk's projection (one more `net.0.proj` product) instead of keeping
    /// the projection, eight times `x`'s size, from the forward. Any LoRA
    /// adapter on the layers is ignored: [`Self::forward`] only takes this path
    /// without one.
    pub fn forward_recomputing(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&dim, lead)) = dims.split_last() else {
            candle_core::bail!("feed-forward: input is a scalar")
        };
        let rows = lead.iter().product::<usize>();
        let width = self.net_0.proj.base.out_features()?;
        let chunk = (FF_CHUNK_VALUES / width.max(1)).clamp(1, rows.max(1));
        // The frozen layers only: this path runs without LoRA (see above).
        let (proj, out) = (self.net_0.proj.base.clone(), self.net_2.base.clone());
        let xd = x.detach().reshape((rows, dim))?;
        let y = by_row_chunks(rows, chunk, |start, n| {
            out.forward(&ops::geglu(&proj.forward(&xd.narrow(0, start, n)?)?)?)
        })?;
        drop(xd);
        let mut out_dims = lead.to_vec();
        out_dims.push(y.dim(1)?);
        let y = y.reshape(out_dims)?;
        let (w1, w2) = (proj.weight.detach(), out.weight.detach());
        ops::with_grad1("feed-forward-recompute", x, y, move |a| {
            let x = a.inputs[0].reshape((rows, dim))?;
            let g = a.grad.reshape((rows, w2.dim(0)?))?;
            let dx = by_row_chunks(rows, chunk, |start, n| {
                let p = proj.forward(&x.narrow(0, start, n)?)?;
                let dp = projection_grad(&p, &g.narrow(0, start, n)?, &w2)?;
                ops::matmul::matmul(&dp, &w1.to_dtype(dp.dtype())?)
            })?;
            Ok([Some(dx.reshape(dims.as_slice())?)])
        })
    }
}

/// The gradient of the projection `p: (..., 2·inner)` of a feed-forward from
/// the gradient `grad: (..., dim)` of its output `net_2(geglu(p))`, where `w`
/// is `net.2`'s frozen weight `[dim, inner]`: through `net.2`, then GEGLU.
fn projection_grad(p: &Tensor, grad: &Tensor, w: &Tensor) -> Result<Tensor> {
    // The frozen weight in the gradient's dtype (it may be stored in fp8).
    let w = &w.to_dtype(grad.dtype())?;
    let (n, k) = w.dims2()?;
    let m = grad.elem_count() / n.max(1);
    let mut dims = p.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = k;
    }
    let dh = ops::matmul::matmul(&grad.reshape((m, n))?, w)?.reshape(dims)?;
    ops::activation::geglu_backward(p, &dh)
}

/// Projection values (rows × `2·inner`) per chunk of
/// [`FeedForward::forward_recomputing`]: 4 MiB in f32 (the backward holds the
/// chunk's projection, its gradient and half-size temporaries; 409 rows of
/// SD1.5's widest projection, still a full-speed matrix product).
pub const FF_CHUNK_VALUES: usize = 1 << 20;

/// `f(start, n)` over consecutive chunks of at most `chunk` of `rows` rows,
/// written into one `[rows, …]` result as they come (no list of pieces to
/// concatenate, which would hold the result twice).
fn by_row_chunks(
    rows: usize,
    chunk: usize,
    mut f: impl FnMut(usize, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let first = f(0, chunk.min(rows))?;
    if chunk >= rows {
        return Ok(first);
    }
    let mut dims = first.dims().to_vec();
    dims[0] = rows;
    let out = Tensor::zeros(dims, first.dtype(), first.device())?;
    out.slice_set(&first.contiguous()?, 0, 0)?;
    drop(first);
    for (start, n) in ops::attention::chunks(rows, chunk).skip(1) {
        out.slice_set(&f(start, n)?.contiguous()?, 0, start)?;
    }
    Ok(out)
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
