//! The VAE encoder: `conv_in`, `DownEncoderBlock2D`s, mid block, `conv_norm_out`,
//! SiLU, `conv_out` (to `2 · latent_channels`: mean and log-variance).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::config::VaeConfig;
use super::mid_block::{VAE_NORM_EPS, VaeMidBlock};
use crate::blocks::layers::{GroupNorm, conv2d, conv2d_forward};
use crate::blocks::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig};
use crate::ops::{self, FrozenConv2d};

/// `DownEncoderBlock2D`: ResNets, then (except on the last level) a stride-2 conv
/// on a bottom/right zero-padded input.
#[derive(Debug, Clone)]
pub struct DownEncoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    /// Key `downsamplers.0`; empty on the last level.
    pub downsamplers: Vec<Downsample2D>,
}

impl DownEncoderBlock2D {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&h, None)?;
        }
        for down in &self.downsamplers {
            h = down.forward(&h)?;
        }
        Ok(h)
    }
}

/// The encoder; field names are the keys under `encoder.`.
#[derive(Debug, Clone)]
pub struct Encoder {
    pub conv_in: FrozenConv2d,
    pub down_blocks: Vec<DownEncoderBlock2D>,
    pub mid_block: VaeMidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: FrozenConv2d,
}

impl Encoder {
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let levels = boc.len();
        let mut down_blocks = Vec::with_capacity(levels);
        for (i, &out) in boc.iter().enumerate() {
            let vb_i = vb.pp("down_blocks").pp(i);
            let input = if i == 0 { boc[0] } else { boc[i - 1] };
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let rcfg = ResnetBlock2DConfig {
                        in_channels: if j == 0 { input } else { out },
                        out_channels: out,
                        temb_channels: None,
                        groups,
                        eps: VAE_NORM_EPS,
                        output_scale_factor: 1.0,
                    };
                    ResnetBlock2D::new(vb_i.pp("resnets").pp(j), &rcfg)
                })
                .collect::<Result<Vec<_>>>()?;
            let downsamplers = if i + 1 < levels {
                vec![Downsample2D::new(vb_i.pp("downsamplers.0"), out, out, 0)?]
            } else {
                Vec::new()
            };
            down_blocks.push(DownEncoderBlock2D {
                resnets,
                downsamplers,
            });
        }
        let last = boc[levels - 1];
        Ok(Self {
            conv_in: conv2d(&vb.pp("conv_in"), cfg.in_channels, boc[0], 3, 1, 1)?,
            down_blocks,
            mid_block: VaeMidBlock::new(
                vb.pp("mid_block"),
                last,
                groups,
                cfg.mid_block_add_attention,
            )?,
            conv_norm_out: GroupNorm::new(&vb.pp("conv_norm_out"), groups, last, VAE_NORM_EPS)?,
            conv_out: conv2d(&vb.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    /// `x: [b, in_channels, H, W]` → `[b, 2·latent_channels, H/f, W/f]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = conv2d_forward(&self.conv_in, x)?;
        for block in &self.down_blocks {
            h = block.forward(&h)?;
        }
        h = self.mid_block.forward(&h)?;
        let h = ops::silu(&self.conv_norm_out.forward(&h)?)?;
        conv2d_forward(&self.conv_out, &h)
    }
}
