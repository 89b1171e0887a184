//! The VAE's `UNetMidBlock2D`: ResNet, self-attention, ResNet (no time embedding).

use candle_core::{Result, Tensor, bail};
use candle_nn::VarBuilder;

use crate::blocks::{ResnetBlock2D, ResnetBlock2DConfig, SpatialSelfAttention};

/// The GroupNorm epsilon of every norm in diffusers' VAE encoder and decoder.
pub const VAE_NORM_EPS: f64 = 1e-6;

/// `resnets.0`, `attentions.0`, `resnets.1`.
#[derive(Debug, Clone)]
pub struct VaeMidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    /// Empty when `mid_block_add_attention` is false.
    pub attentions: Vec<SpatialSelfAttention>,
}

impl VaeMidBlock {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        groups: usize,
        add_attention: bool,
    ) -> Result<Self> {
        let rcfg = ResnetBlock2DConfig {
            in_channels: channels,
            out_channels: channels,
            temb_channels: None,
            groups,
            eps: VAE_NORM_EPS,
            output_scale_factor: 1.0,
        };
        let resnets = (0..2)
            .map(|j| ResnetBlock2D::new(vb.pp("resnets").pp(j), &rcfg))
            .collect::<Result<Vec<_>>>()?;
        let attentions = if add_attention {
            // diffusers: attention_head_dim = channels, i.e. a single head.
            vec![SpatialSelfAttention::new(
                vb.pp("attentions.0"),
                channels,
                1,
                groups,
                VAE_NORM_EPS,
            )?]
        } else {
            Vec::new()
        };
        Ok(Self {
            resnets,
            attentions,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some((first, rest)) = self.resnets.split_first() else {
            bail!("VAE mid block has no ResNets")
        };
        let mut h = first.forward(x, None)?;
        for (j, resnet) in rest.iter().enumerate() {
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h)?;
            }
            h = resnet.forward(&h, None)?;
        }
        Ok(h)
    }
}
