//! `Downsample2D` (stride-2 conv) and `Upsample2D` (nearest ×2, then a 3×3 conv),
//! as diffusers builds them with `use_conv = True`.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{conv2d, conv2d_forward};
use crate::lora::adapted::LoraConv2d;
use crate::ops::with_grad1;

/// A stride-2 3×3 conv (`conv`). With `padding = 0` (the VAE encoder) the input is
/// first padded by one zero row/column at the bottom/right, as diffusers does.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    pub conv: LoraConv2d,
    pub padding: usize,
}

impl Downsample2D {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            conv: conv2d(&vb.pp("conv"), in_channels, out_channels, 3, 2, padding)?,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            // F.pad(x, (0, 1, 0, 1)): asymmetric, so it cannot be the conv's own padding.
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            conv2d_forward(&self.conv, &x)
        } else {
            conv2d_forward(&self.conv, x)
        }
    }
}

/// Nearest-neighbour ×2 upsampling followed by a 3×3 conv (`conv`).
#[derive(Debug, Clone)]
pub struct Upsample2D {
    pub conv: LoraConv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, in_channels: usize, out_channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv2d(&vb.pp("conv"), in_channels, out_channels, 3, 1, 1)?,
        })
    }

    /// Upsamples to `size` (the UNet passes the size of the next skip tensor,
    /// so odd latent sizes work as in diffusers) or, when `None`, by 2.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let x = upsample_nearest(x, th, tw)?;
        conv2d_forward(&self.conv, &x)
    }
}

/// Nearest-neighbour resize of `x: [b, c, h, w]` to `[b, c, th, tw]` with
/// PyTorch's `mode="nearest"` index rule (`src = floor(dst · in / out)`).
///
/// The exact ×2 case (always, for sizes divisible by the UNet's total factor) has a
/// hand-written backward — sum over each 2×2 cell — instead of candle's, which runs a
/// grouped conv per channel.
pub fn upsample_nearest(x: &Tensor, th: usize, tw: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if th == 2 * h && tw == 2 * w {
        let y = x.detach().upsample_nearest2d(th, tw)?;
        return with_grad1("upsample-nearest-2x", x, y, move |a| {
            let g = a.grad.reshape((b, c, h, 2, w, 2))?.sum((3, 5))?;
            Ok([Some(g)])
        });
    }
    // General sizes: two index_selects, whose backward (index_add) candle has.
    let indices = |out: usize, inp: usize| -> Result<Tensor> {
        let scale = inp as f32 / out as f32;
        let idx: Vec<u32> = (0..out)
            .map(|i| (((i as f32) * scale).floor() as usize).min(inp - 1) as u32)
            .collect();
        Tensor::new(idx, x.device())
    };
    x.index_select(&indices(th, h)?, 2)?
        .index_select(&indices(tw, w)?, 3)
}

crate::lora::visit::impl_visit_layers!(Downsample2D { conv => "conv" });
crate::lora::visit::impl_visit_layers!(Upsample2D { conv => "conv" });
