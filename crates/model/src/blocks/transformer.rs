//! `Transformer2DModel` (continuous input) and its `BasicTransformerBlock`s, as
//! used by the cross-attention blocks of the UNet.
//!
//! ```text
//! Transformer2DModel:  x ─ norm ─ proj_in ─ transformer_blocks… ─ proj_out ─ + x
//! BasicTransformerBlock:
//!     h = h + attn1(norm1(h))                          self-attention
//!     h = h + attn2(norm2(h), encoder_hidden_states)   cross-attention
//!     h = h + ff(norm3(h))                             GEGLU feed-forward
//! ```
//!
//! `proj_in`/`proj_out` are 1×1 convs in SD1 and Linear layers in SD2/SDXL
//! (`use_linear_projection`); [`Projection`] holds either.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{Attention, FeedForward};
use super::layers::{GroupNorm, LayerNorm, conv2d, conv2d_forward, linear};
use crate::lora::adapted::{LoraConv2d, LoraLinear};

/// The LayerNorm epsilon of diffusers' `BasicTransformerBlock` (`norm_eps`).
const LAYER_NORM_EPS: f64 = 1e-5;
/// The GroupNorm epsilon of diffusers' `Transformer2DModel`.
const GROUP_NORM_EPS: f64 = 1e-6;

/// One transformer layer: self-attention, cross-attention, feed-forward.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        context_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(&vb.pp("norm1"), dim, LAYER_NORM_EPS)?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, head_dim, false)?,
            norm2: LayerNorm::new(&vb.pp("norm2"), dim, LAYER_NORM_EPS)?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                Some(context_dim),
                heads,
                head_dim,
                false,
            )?,
            norm3: LayerNorm::new(&vb.pp("norm3"), dim, LAYER_NORM_EPS)?,
            ff: FeedForward::new(vb.pp("ff"), dim, 4 * dim)?,
        })
    }

    /// `x: [b, t, dim]`, `context: [b, s, context_dim]` → `[b, t, dim]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// `proj_in`/`proj_out`: a Linear (on `[b, h·w, c]`) or a 1×1 conv (on `[b, c, h, w]`).
#[derive(Debug, Clone)]
pub enum Projection {
    Linear(LoraLinear),
    Conv(LoraConv2d),
}

impl Projection {
    fn new(vb: &VarBuilder, in_dim: usize, out_dim: usize, use_linear: bool) -> Result<Self> {
        Ok(if use_linear {
            Self::Linear(linear(vb, in_dim, out_dim, true)?)
        } else {
            Self::Conv(conv2d(vb, in_dim, out_dim, 1, 1, 0)?)
        })
    }
}

/// The settings of one [`Transformer2DModel`].
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DConfig {
    pub in_channels: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Number of `transformer_blocks` (SDXL: `transformer_layers_per_block`).
    pub num_layers: usize,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub use_linear_projection: bool,
}

/// A spatial transformer: GroupNorm, `proj_in`, transformer blocks, `proj_out`,
/// plus the residual.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, cfg: &Transformer2DConfig) -> Result<Self> {
        let inner = cfg.heads * cfg.head_dim;
        let c = cfg.in_channels;
        let blocks = vb.pp("transformer_blocks");
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    blocks.pp(i),
                    inner,
                    cfg.heads,
                    cfg.head_dim,
                    cfg.cross_attention_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(&vb.pp("norm"), cfg.norm_num_groups, c, GROUP_NORM_EPS)?,
            proj_in: Projection::new(&vb.pp("proj_in"), c, inner, cfg.use_linear_projection)?,
            transformer_blocks,
            proj_out: Projection::new(&vb.pp("proj_out"), inner, c, cfg.use_linear_projection)?,
        })
    }

    /// Sets the attention chunk size of every attention layer (see
    /// [`Attention::chunk`]).
    pub fn set_attention_chunk(&mut self, chunk: Option<usize>) {
        for block in &mut self.transformer_blocks {
            block.attn1.chunk = chunk;
            block.attn2.chunk = chunk;
        }
    }

    /// `x: [b, c, h, w]`, `context: [b, s, cross_attention_dim]` → `[b, c, h, w]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        // To tokens [b, h·w, inner]; the conv projection runs before the reshape,
        // the linear one after it, as in diffusers.
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => {
                let y = conv2d_forward(conv, &normed)?;
                let inner = y.dim(1)?;
                y.permute((0, 2, 3, 1))?.reshape((b, h * w, inner))?
            }
            Projection::Linear(lin) => {
                let t = normed.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?;
                lin.forward(&t)?
            }
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let inner = tokens.dim(2)?;
        let out = match &self.proj_out {
            Projection::Conv(conv) => {
                let y = tokens
                    .reshape((b, h, w, inner))?
                    .permute((0, 3, 1, 2))?
                    .contiguous()?;
                conv2d_forward(conv, &y)?
            }
            Projection::Linear(lin) => lin
                .forward(&tokens)?
                .reshape((b, h, w, c))?
                .permute((0, 3, 1, 2))?
                .contiguous()?,
        };
        out + x
    }
}

crate::lora::visit::impl_visit_layers!(BasicTransformerBlock {
    attn1 => "attn1",
    attn2 => "attn2",
    ff => "ff",
});
crate::lora::visit::impl_visit_layers!(Transformer2DModel {
    proj_in => "proj_in",
    transformer_blocks => "transformer_blocks",
    proj_out => "proj_out",
});

/// Either projection is the layer at the projection's own path.
impl crate::lora::visit::VisitLayers for Projection {
    fn visit_layers_at(
        &self,
        path: &str,
        f: &mut dyn FnMut(&str, crate::lora::visit::LayerRef<'_>),
    ) {
        match self {
            Projection::Linear(l) => l.visit_layers_at(path, f),
            Projection::Conv(c) => c.visit_layers_at(path, f),
        }
    }
    fn visit_layers_mut_at(
        &mut self,
        path: &str,
        f: &mut dyn FnMut(&str, crate::lora::visit::LayerMut<'_>),
    ) {
        match self {
            Projection::Linear(l) => l.visit_layers_mut_at(path, f),
            Projection::Conv(c) => c.visit_layers_mut_at(path, f),
        }
    }
}
