//! The self-attention of the VAE's mid-block: diffusers' `Attention` with a
//! `group_norm`, biased projections and a residual connection, over the pixels of
//! a `[b, c, h, w]` feature map (one head of width `c` in every AutoencoderKL).
//!
//! Older diffusers VAE files name the projections `query`, `key`, `value` and
//! `proj_attn` (the deprecated `AttentionBlock`); both spellings load, and some
//! conversions store them as 1×1 conv weights `[c, c, 1, 1]`, which load too.

use candle_core::{Result, Tensor, bail};
use candle_nn::VarBuilder;

use super::layers::GroupNorm;
use crate::ops::{self, FrozenLinear};

/// Self-attention over the pixels of a feature map, with its own GroupNorm.
#[derive(Debug, Clone)]
pub struct SpatialSelfAttention {
    pub group_norm: GroupNorm,
    pub to_q: FrozenLinear,
    pub to_k: FrozenLinear,
    pub to_v: FrozenLinear,
    /// Key `to_out.0` (`proj_attn` in old files).
    pub to_out_0: FrozenLinear,
    pub heads: usize,
    pub rescale_output_factor: f64,
}

/// Loads a `[c, c]` projection stored as a Linear or a 1×1 conv weight.
fn projection(vb: &VarBuilder, channels: usize) -> Result<FrozenLinear> {
    let weight = vb.get_unchecked("weight")?;
    let weight = match weight.dims() {
        [o, i] if *o == channels && *i == channels => weight,
        [o, i, 1, 1] if *o == channels && *i == channels => weight.reshape((channels, channels))?,
        other => bail!(
            "{}.weight has shape {other:?}, expected [{channels}, {channels}] \
             (or [{channels}, {channels}, 1, 1])",
            vb.prefix()
        ),
    };
    let weight = weight.to_dtype(vb.dtype())?;
    FrozenLinear::new(weight, Some(vb.get(channels, "bias")?))
}

impl SpatialSelfAttention {
    /// `heads` is `channels / attention_head_dim` (1 in AutoencoderKL).
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        if heads == 0 || !channels.is_multiple_of(heads) {
            bail!(
                "{}: {channels} channels cannot be split into {heads} heads",
                vb.prefix()
            )
        }
        let old_names = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let names = if old_names {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        Ok(Self {
            group_norm: GroupNorm::new(&vb.pp("group_norm"), groups, channels, eps)?,
            to_q: projection(&vb.pp(names[0]), channels)?,
            to_k: projection(&vb.pp(names[1]), channels)?,
            to_v: projection(&vb.pp(names[2]), channels)?,
            to_out_0: projection(&vb.pp(names[3]), channels)?,
            heads,
            rescale_output_factor: 1.0,
        })
    }

    /// `x: [b, c, h, w]` → `[b, c, h, w]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let scale = 1.0 / ((c / self.heads) as f64).sqrt();
        let out = ops::multi_head_attention(&q, &k, &v, self.heads, scale, None)?;
        let out = self
            .to_out_0
            .forward(&out)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        let out = (out + x)?;
        if self.rescale_output_factor == 1.0 {
            Ok(out)
        } else {
            out / self.rescale_output_factor
        }
    }
}
