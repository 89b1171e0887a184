//! The UNet's down, mid and up blocks: diffusers' `CrossAttnDownBlock2D` /
//! `DownBlock2D`, `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D` / `UpBlock2D`.
//!
//! The cross-attention and plain variants share one struct each (a plain block has
//! no `attentions`). Every block's `forward` takes its inputs and returns its
//! outputs explicitly — the down blocks return their skip tensors, the up blocks
//! take theirs — so a caller can run (and recompute, for gradient checkpointing)
//! the UNet one block at a time.
//!
//! # Gradient checkpointing
//!
//! With `gradient_checkpointing` on (set for the whole UNet by
//! [`super::UNet2DConditionModel::set_gradient_checkpointing`]), every ResNet
//! and every transformer of a block runs as one checkpointed segment
//! ([`crate::ops::checkpoint`]) — the granularity of diffusers'
//! `enable_gradient_checkpointing` — and so does every upsampler. The up
//! path's concatenations run inside the ResNet segments that consume them, so
//! only the segments' inputs and outputs are kept. Downsamplers and the
//! embeddings run as usual (their outputs are kept anyway, as skips or inputs).

use candle_core::{Result, Tensor, bail};
use candle_nn::VarBuilder;

use super::config::{BlockKind, UNetConfig};
use crate::blocks::{
    Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Transformer2DConfig, Transformer2DModel,
    Upsample2D,
};
use crate::ops::checkpoint;

/// The transformer settings of one level.
fn transformer_config(cfg: &UNetConfig, level: usize, channels: usize) -> Transformer2DConfig {
    let heads = cfg.num_attention_heads[level];
    Transformer2DConfig {
        in_channels: channels,
        heads,
        head_dim: channels / heads,
        num_layers: cfg.transformer_layers_per_block[level],
        cross_attention_dim: cfg.cross_attention_dim[level],
        norm_num_groups: cfg.norm_num_groups,
        use_linear_projection: cfg.use_linear_projection,
    }
}

fn resnet_config(cfg: &UNetConfig, in_channels: usize, out_channels: usize) -> ResnetBlock2DConfig {
    ResnetBlock2DConfig {
        in_channels,
        out_channels,
        temb_channels: Some(cfg.time_embed_dim),
        groups: cfg.norm_num_groups,
        eps: cfg.norm_eps,
        output_scale_factor: 1.0,
    }
}

/// `resnet(x, temb)` — `resnet(cat(x, skip), temb)` on the up path — as a
/// checkpointed segment when `ckpt`. The concatenation runs inside the
/// segment, so with checkpointing its output (the largest tensor of an up-path
/// ResNet) is not kept: `x` and `skip` are kept anyway as other segments'
/// outputs.
fn run_resnet(
    resnet: &ResnetBlock2D,
    x: &Tensor,
    skip: Option<&Tensor>,
    temb: &Tensor,
    ckpt: bool,
) -> Result<Tensor> {
    let inputs = match skip {
        Some(skip) => vec![x, skip, temb],
        None => vec![x, temb],
    };
    if !ckpt {
        let inputs: Vec<Tensor> = inputs.into_iter().cloned().collect();
        return resnet_on(resnet, &inputs);
    }
    let params = crate::lora::visit::lora_params(resnet);
    // The backward re-runs the block, so it keeps a (cheap: shared tensors)
    // clone of it.
    let block = resnet.clone();
    checkpoint::checkpoint("checkpoint-resnet", &inputs, &params, move |a| {
        resnet_on(&block, a)
    })
}

/// `resnet` on `[x, temb]` or `[x, skip, temb]` (concatenated on channels).
fn resnet_on(resnet: &ResnetBlock2D, inputs: &[Tensor]) -> Result<Tensor> {
    match inputs {
        [x, temb] => resnet.forward(x, Some(temb)),
        [x, skip, temb] => resnet.forward(&Tensor::cat(&[x, skip], 1)?, Some(temb)),
        _ => bail!("UNet ResNet: {} inputs, expected 2 or 3", inputs.len()),
    }
}

/// `attention(x, context)`, as a checkpointed segment when `ckpt`.
fn run_attention(
    attention: &Transformer2DModel,
    x: &Tensor,
    context: &Tensor,
    ckpt: bool,
) -> Result<Tensor> {
    if !ckpt {
        return attention.forward(x, context);
    }
    let params = crate::lora::visit::lora_params(attention);
    let block = attention.clone();
    checkpoint::checkpoint("checkpoint-transformer", &[x, context], &params, move |a| {
        block.forward(&a[0], &a[1])
    })
}

/// `upsampler(x)`, as a checkpointed segment when `ckpt`: the nearest-neighbour
/// resize (four times `x`'s size) is then not kept for the convolution.
fn run_upsampler(
    upsampler: &Upsample2D,
    x: &Tensor,
    size: Option<(usize, usize)>,
    ckpt: bool,
) -> Result<Tensor> {
    if !ckpt {
        return upsampler.forward(x, size);
    }
    let params = crate::lora::visit::lora_params(upsampler);
    let block = upsampler.clone();
    checkpoint::checkpoint("checkpoint-upsampler", &[x], &params, move |a| {
        block.forward(&a[0], size)
    })
}

/// Runs `resnet` (on `cat(x, skip)` when there is a skip tensor) then, when
/// there is one, `attention`.
fn resnet_attention(
    resnet: &ResnetBlock2D,
    attention: Option<&Transformer2DModel>,
    x: &Tensor,
    skip: Option<&Tensor>,
    temb: &Tensor,
    context: &Tensor,
    ckpt: bool,
) -> Result<Tensor> {
    let h = run_resnet(resnet, x, skip, temb, ckpt)?;
    match attention {
        Some(attn) => run_attention(attn, &h, context, ckpt),
        None => Ok(h),
    }
}

/// A down block: `layers_per_block` ResNets (each followed by a transformer in a
/// cross-attention block), then a stride-2 downsampler except on the last level.
#[derive(Debug, Clone)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    /// Empty for a `DownBlock2D`.
    pub attentions: Vec<Transformer2DModel>,
    /// Key `downsamplers.0`; empty on the last level.
    pub downsamplers: Vec<Downsample2D>,
    /// Run each ResNet and transformer as a checkpointed segment.
    pub gradient_checkpointing: bool,
}

impl DownBlock {
    /// Builds level `level` of `cfg` (`vb` is `down_blocks.{level}`).
    pub fn new(vb: VarBuilder, cfg: &UNetConfig, level: usize) -> Result<Self> {
        let out = cfg.block_out_channels[level];
        let input = if level == 0 {
            cfg.block_out_channels[0]
        } else {
            cfg.block_out_channels[level - 1]
        };
        let layers = cfg.layers_per_block[level];
        let resnets = (0..layers)
            .map(|j| {
                let cin = if j == 0 { input } else { out };
                ResnetBlock2D::new(vb.pp("resnets").pp(j), &resnet_config(cfg, cin, out))
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = match cfg.down_block_types[level] {
            BlockKind::CrossAttn => (0..layers)
                .map(|j| {
                    Transformer2DModel::new(
                        vb.pp("attentions").pp(j),
                        &transformer_config(cfg, level, out),
                    )
                })
                .collect::<Result<Vec<_>>>()?,
            BlockKind::Plain => Vec::new(),
        };
        let downsamplers = if level + 1 < cfg.block_out_channels.len() {
            vec![Downsample2D::new(
                vb.pp("downsamplers.0"),
                out,
                out,
                cfg.downsample_padding,
            )?]
        } else {
            Vec::new()
        };
        Ok(Self {
            resnets,
            attentions,
            downsamplers,
            gradient_checkpointing: false,
        })
    }

    /// `x: [b, c_in, h, w]` → (output, skip tensors in order: one per ResNet,
    /// plus the downsampled output when the block downsamples).
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + self.downsamplers.len());
        for (j, resnet) in self.resnets.iter().enumerate() {
            h = resnet_attention(
                resnet,
                self.attentions.get(j),
                &h,
                None,
                temb,
                context,
                self.gradient_checkpointing,
            )?;
            skips.push(h.clone());
        }
        for down in &self.downsamplers {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }
}

/// `UNetMidBlock2DCrossAttn`: ResNet, then (transformer, ResNet) per layer.
#[derive(Debug, Clone)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    /// Run each ResNet and transformer as a checkpointed segment.
    pub gradient_checkpointing: bool,
}

impl MidBlock {
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let last = cfg.block_out_channels.len() - 1;
        let c = cfg.block_out_channels[last];
        let mut rcfg = resnet_config(cfg, c, c);
        rcfg.output_scale_factor = cfg.mid_block_scale_factor;
        let resnets = (0..2)
            .map(|j| ResnetBlock2D::new(vb.pp("resnets").pp(j), &rcfg))
            .collect::<Result<Vec<_>>>()?;
        let attentions = vec![Transformer2DModel::new(
            vb.pp("attentions.0"),
            &transformer_config(cfg, last, c),
        )?];
        Ok(Self {
            resnets,
            attentions,
            gradient_checkpointing: false,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let Some((first, rest)) = self.resnets.split_first() else {
            bail!("UNet mid block has no ResNets")
        };
        let ckpt = self.gradient_checkpointing;
        let mut h = run_resnet(first, x, None, temb, ckpt)?;
        for (attn, resnet) in self.attentions.iter().zip(rest) {
            h = run_attention(attn, &h, context, ckpt)?;
            h = run_resnet(resnet, &h, None, temb, ckpt)?;
        }
        Ok(h)
    }
}

/// An up block: `layers_per_block + 1` ResNets, each taking the previous output
/// concatenated (on channels) with one skip tensor, each followed by a transformer
/// in a cross-attention block; then a ×2 upsampler except on the last level.
#[derive(Debug, Clone)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    /// Empty for an `UpBlock2D`.
    pub attentions: Vec<Transformer2DModel>,
    /// Key `upsamplers.0`; empty on the last level.
    pub upsamplers: Vec<Upsample2D>,
    /// Run each ResNet and transformer as a checkpointed segment.
    pub gradient_checkpointing: bool,
}

impl UpBlock {
    /// Builds up block `i` of `cfg` (`vb` is `up_blocks.{i}`; it works at the
    /// resolution of down level `levels − 1 − i`).
    pub fn new(vb: VarBuilder, cfg: &UNetConfig, i: usize) -> Result<Self> {
        let levels = cfg.block_out_channels.len();
        let level = levels - 1 - i;
        let out = cfg.block_out_channels[level];
        let prev_out = cfg.block_out_channels[(level + 1).min(levels - 1)];
        // Channels of the down level below this one: the last skip of this block
        // comes from there (the input of that down block).
        let input = cfg.block_out_channels[level.saturating_sub(1)];
        let layers = cfg.layers_per_block[level] + 1;
        let resnets = (0..layers)
            .map(|j| {
                let skip = if j + 1 == layers { input } else { out };
                let cin = if j == 0 { prev_out } else { out };
                ResnetBlock2D::new(vb.pp("resnets").pp(j), &resnet_config(cfg, cin + skip, out))
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = match cfg.up_block_types[i] {
            BlockKind::CrossAttn => (0..layers)
                .map(|j| {
                    Transformer2DModel::new(
                        vb.pp("attentions").pp(j),
                        &transformer_config(cfg, level, out),
                    )
                })
                .collect::<Result<Vec<_>>>()?,
            BlockKind::Plain => Vec::new(),
        };
        let upsamplers = if i + 1 < levels {
            vec![Upsample2D::new(vb.pp("upsamplers.0"), out, out)?]
        } else {
            Vec::new()
        };
        Ok(Self {
            resnets,
            attentions,
            upsamplers,
            gradient_checkpointing: false,
        })
    }

    /// `x`: the previous block's output; `skips`: this block's skip tensors in
    /// the order the down blocks produced them (the last one is used first);
    /// `upsample_size`: the spatial size to upsample to (that of the next skip
    /// tensor), `None` for ×2.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        if skips.len() != self.resnets.len() {
            bail!(
                "UNet up block got {} skip tensors for {} ResNets",
                skips.len(),
                self.resnets.len()
            )
        }
        let mut h = x.clone();
        for (j, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            h = resnet_attention(
                resnet,
                self.attentions.get(j),
                &h,
                Some(skip),
                temb,
                context,
                self.gradient_checkpointing,
            )?;
        }
        for up in &self.upsamplers {
            h = run_upsampler(up, &h, upsample_size, self.gradient_checkpointing)?;
        }
        Ok(h)
    }
}

crate::lora::visit::impl_visit_layers!(DownBlock {
    resnets => "resnets",
    attentions => "attentions",
    downsamplers => "downsamplers",
});
crate::lora::visit::impl_visit_layers!(MidBlock {
    resnets => "resnets",
    attentions => "attentions",
});
crate::lora::visit::impl_visit_layers!(UpBlock {
    resnets => "resnets",
    attentions => "attentions",
    upsamplers => "upsamplers",
});
