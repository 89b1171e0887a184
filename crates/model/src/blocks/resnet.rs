//! `ResnetBlock2D` as in diffusers (`time_embedding_norm = "default"`, SiLU,
//! `output_scale_factor = 1` unless told otherwise).
//!
//! ```text
//! h = conv1(silu(norm1(x)))
//! h = h + time_emb_proj(silu(temb))[:, :, None, None]     (UNet only)
//! h = conv2(silu(norm2(h)))
//! out = (conv_shortcut(x) or x + h) / output_scale_factor
//! ```

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{GroupNorm, conv2d, conv2d_forward, linear, norm_silu_conv};
use crate::lora::adapted::{LoraConv2d, LoraLinear};
use crate::ops::{self};

/// The settings of one [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetBlock2DConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Channels of the time embedding; `None` in the VAE (no `time_emb_proj`).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

/// A ResNet block; field names are the checkpoint keys.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: LoraConv2d,
    pub time_emb_proj: Option<LoraLinear>,
    pub norm2: GroupNorm,
    pub conv2: LoraConv2d,
    /// 1×1 conv on the residual path, present when the channel count changes.
    pub conv_shortcut: Option<LoraConv2d>,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, cfg: &ResnetBlock2DConfig) -> Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let conv_shortcut = if cin != cout {
            Some(conv2d(&vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
        } else {
            None
        };
        let time_emb_proj = cfg
            .temb_channels
            .map(|t| linear(&vb.pp("time_emb_proj"), t, cout, true))
            .transpose()?;
        Ok(Self {
            norm1: GroupNorm::new(&vb.pp("norm1"), cfg.groups, cin, cfg.eps)?,
            conv1: conv2d(&vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::new(&vb.pp("norm2"), cfg.groups, cout, cfg.eps)?,
            conv2: conv2d(&vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `x: [b, in, h, w]`, `temb: [b, temb_channels]` (ignored when the block has
    /// no `time_emb_proj`) → `[b, out, h, w]`.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let t = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(
                proj.forward(&ops::silu(temb)?)?
                    .unsqueeze(2)?
                    .unsqueeze(3)?,
            ),
            _ => None,
        };
        // h = conv1(silu(norm1(x))) + t; out = conv2(silu(norm2(h))) + residual,
        // each half one graph node that keeps only its inputs.
        let h = norm_silu_conv(&self.norm1, &self.conv1, x, t.as_ref())?;
        let residual = match &self.conv_shortcut {
            Some(conv) => conv2d_forward(conv, x)?,
            None => x.clone(),
        };
        let out = norm_silu_conv(&self.norm2, &self.conv2, &h, Some(&residual))?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

crate::lora::visit::impl_visit_layers!(ResnetBlock2D {
    conv1 => "conv1",
    time_emb_proj => "time_emb_proj",
    conv2 => "conv2",
    conv_shortcut => "conv_shortcut",
});
