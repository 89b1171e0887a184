//! The VAE decoder: `conv_in`, mid block, `UpDecoderBlock2D`s, `conv_norm_out`,
//! SiLU, `conv_out`.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::config::VaeConfig;
use super::mid_block::{VAE_NORM_EPS, VaeMidBlock};
use crate::blocks::layers::{GroupNorm, conv2d, conv2d_forward};
use crate::blocks::{ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};
use crate::ops::{self, FrozenConv2d};

/// `UpDecoderBlock2D`: `layers_per_block + 1` ResNets, then (except on the last
/// level) a ×2 nearest upsampler with a conv.
#[derive(Debug, Clone)]
pub struct UpDecoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    /// Key `upsamplers.0`; empty on the last level.
    pub upsamplers: Vec<Upsample2D>,
}

impl UpDecoderBlock2D {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&h, None)?;
        }
        for up in &self.upsamplers {
            h = up.forward(&h, None)?;
        }
        Ok(h)
    }
}

/// The decoder; field names are the keys under `decoder.`.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub conv_in: FrozenConv2d,
    pub mid_block: VaeMidBlock,
    pub up_blocks: Vec<UpDecoderBlock2D>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: FrozenConv2d,
}

impl Decoder {
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let groups = cfg.norm_num_groups;
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let levels = reversed.len();
        let mut up_blocks = Vec::with_capacity(levels);
        for (i, &out) in reversed.iter().enumerate() {
            let vb_i = vb.pp("up_blocks").pp(i);
            let input = if i == 0 { reversed[0] } else { reversed[i - 1] };
            let resnets = (0..cfg.layers_per_block + 1)
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
            let upsamplers = if i + 1 < levels {
                vec![Upsample2D::new(vb_i.pp("upsamplers.0"), out, out)?]
            } else {
                Vec::new()
            };
            up_blocks.push(UpDecoderBlock2D {
                resnets,
                upsamplers,
            });
        }
        let c0 = cfg.block_out_channels[0];
        Ok(Self {
            conv_in: conv2d(&vb.pp("conv_in"), cfg.latent_channels, reversed[0], 3, 1, 1)?,
            mid_block: VaeMidBlock::new(
                vb.pp("mid_block"),
                reversed[0],
                groups,
                cfg.mid_block_add_attention,
            )?,
            up_blocks,
            conv_norm_out: GroupNorm::new(&vb.pp("conv_norm_out"), groups, c0, VAE_NORM_EPS)?,
            conv_out: conv2d(&vb.pp("conv_out"), c0, cfg.out_channels, 3, 1, 1)?,
        })
    }

    /// `z: [b, latent_channels, h, w]` → `[b, out_channels, h·f, w·f]`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = conv2d_forward(&self.conv_in, z)?;
        h = self.mid_block.forward(&h)?;
        for block in &self.up_blocks {
            h = block.forward(&h)?;
        }
        let h = ops::silu(&self.conv_norm_out.forward(&h)?)?;
        conv2d_forward(&self.conv_out, &h)
    }
}
