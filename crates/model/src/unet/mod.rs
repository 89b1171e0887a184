//! `UNet2DConditionModel` (SD1, SD2 and SDXL layouts), loaded from diffusers
//! key names, with a per-sample timestep tensor.
//!
//! ```text
//! emb  = time_embedding(sinusoid(t))  (+ add_embedding(text_embeds, time_ids) for SDXL)
//! h    = conv_in(sample)                                     skips = [h]
//! h    = down_blocks[i](h, emb, ctx)  for each level         skips += block skips
//! h    = mid_block(h, emb, ctx)
//! h    = up_blocks[i](h, last skips, emb, ctx)  for each level
//! out  = conv_out(silu(conv_norm_out(h)))
//! ```
//!
//! [`UNet2DConditionModel::forward`] runs all of it; the steps are public
//! ([`UNet2DConditionModel::embed_time`], [`UNet2DConditionModel::forward_conv_in`],
//! the blocks' own `forward`s, [`UNet2DConditionModel::upsample_size`],
//! [`UNet2DConditionModel::forward_conv_out`]) so that a trainer can run the
//! network block by block. Gradient checkpointing at diffusers' granularity is
//! built in: [`UNet2DConditionModel::set_gradient_checkpointing`] (then take
//! gradients with [`crate::ops::checkpoint::backward`]).
//!
//! Dtypes: the model computes in the dtype of its weights (the `VarBuilder`'s);
//! inputs are converted to it. The timestep sinusoid is computed in f32 and then
//! converted, as in diffusers. See [`crate::blocks::layers`] for the CPU
//! half-precision conv rule.

pub mod blocks;
pub mod config;
pub mod embeddings;

use candle_core::{DType, Result, Tensor, bail};
use candle_nn::VarBuilder;

pub use blocks::{DownBlock, MidBlock, UpBlock};
pub use config::{BlockKind, UNetConfig};
pub use embeddings::{TimestepEmbedding, timestep_embedding};

use crate::blocks::layers::{GroupNorm, conv2d, conv2d_forward, norm_silu_conv};
use crate::lora::adapted::LoraConv2d;

/// SDXL's added conditioning (`addition_embed_type = "text_time"`).
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// Pooled output of the second text encoder, `[b, 1280]` in SDXL.
    pub text_embeds: Tensor,
    /// `[b, 6]`: original size (h, w), crop top-left (y, x), target size (h, w).
    pub time_ids: Tensor,
}

/// The UNet. Field names are the diffusers keys.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    pub conv_in: LoraConv2d,
    pub time_embedding: TimestepEmbedding,
    /// SDXL only: embeds `[text_embeds, sinusoid(time_ids)]`.
    pub add_embedding: Option<TimestepEmbedding>,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: LoraConv2d,
}

impl UNet2DConditionModel {
    /// Builds the UNet from weights under `vb` (the root of `unet/`'s safetensors)
    /// in `vb`'s dtype. A missing or mis-shaped tensor is an error naming its key.
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let c0 = cfg.block_out_channels[0];
        let levels = cfg.block_out_channels.len();
        let add_embedding = cfg
            .addition_embed
            .as_ref()
            .map(|a| {
                TimestepEmbedding::new(
                    vb.pp("add_embedding"),
                    a.projection_class_embeddings_input_dim,
                    cfg.time_embed_dim,
                )
            })
            .transpose()?;
        let down_blocks = (0..levels)
            .map(|i| DownBlock::new(vb.pp("down_blocks").pp(i), cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let up_blocks = (0..levels)
            .map(|i| UpBlock::new(vb.pp("up_blocks").pp(i), cfg, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: cfg.clone(),
            conv_in: conv2d(&vb.pp("conv_in"), cfg.in_channels, c0, 3, 1, 1)?,
            time_embedding: TimestepEmbedding::new(
                vb.pp("time_embedding"),
                c0,
                cfg.time_embed_dim,
            )?,
            add_embedding,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), cfg)?,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                &vb.pp("conv_norm_out"),
                cfg.norm_num_groups,
                c0,
                cfg.norm_eps,
            )?,
            conv_out: conv2d(&vb.pp("conv_out"), c0, cfg.out_channels, 3, 1, 1)?,
        })
    }

    /// The dtype the model computes in (that of its weights).
    pub fn dtype(&self) -> DType {
        // A norm's: the Linear/Conv weights may be stored in fp8 and computed
        // in this dtype.
        self.conv_norm_out.weight.dtype()
    }

    /// Sets the attention chunk size (queries per chunk; `None` sizes chunks
    /// so that at most [`crate::ops::attention::MAX_CHUNK_SCORES`] score values
    /// exist at once) of every transformer in the UNet.
    pub fn set_attention_chunk(&mut self, chunk: Option<usize>) {
        let down = self
            .down_blocks
            .iter_mut()
            .flat_map(|b| b.attentions.iter_mut());
        let mid = self.mid_block.attentions.iter_mut();
        let up = self
            .up_blocks
            .iter_mut()
            .flat_map(|b| b.attentions.iter_mut());
        for t in down.chain(mid).chain(up) {
            t.set_attention_chunk(chunk);
        }
    }

    /// Turns gradient checkpointing on or off for every down, mid and up block:
    /// each ResNet and each transformer then runs as a checkpointed segment
    /// (activations recomputed in the backward, as diffusers'
    /// `enable_gradient_checkpointing`). With it on, gradients must be taken with
    /// [`crate::ops::checkpoint::backward`] instead of `loss.backward()`, or the
    /// LoRA parameters inside the segments get none.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        for b in &mut self.down_blocks {
            b.gradient_checkpointing = on;
        }
        self.mid_block.gradient_checkpointing = on;
        for b in &mut self.up_blocks {
            b.gradient_checkpointing = on;
        }
    }

    /// Whether gradient checkpointing is on (see
    /// [`Self::set_gradient_checkpointing`]).
    pub fn gradient_checkpointing(&self) -> bool {
        self.mid_block.gradient_checkpointing
    }

    /// The time embedding `[b, time_embed_dim]` for `timesteps: [b]` (one per
    /// sample; a single timestep `[1]` or `[]` is repeated to `batch`), plus the
    /// SDXL added embedding when the model has one (then `added` is required).
    pub fn embed_time(
        &self,
        timesteps: &Tensor,
        batch: usize,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let t = match timesteps.dims() {
            [] | [1] => timesteps.reshape(1)?.repeat(batch)?,
            [n] if *n == batch => timesteps.clone(),
            other => bail!(
                "UNet timesteps have shape {other:?}; expected [{batch}] (one per sample) or [1]"
            ),
        };
        let cfg = &self.config;
        let dtype = self.dtype();
        let t_emb = timestep_embedding(
            &t,
            cfg.block_out_channels[0],
            cfg.flip_sin_to_cos,
            cfg.freq_shift,
        )?
        .to_dtype(dtype)?;
        let emb = self.time_embedding.forward(&t_emb)?;
        match (&self.add_embedding, &cfg.addition_embed, added) {
            (None, _, _) => Ok(emb),
            (Some(add_embedding), Some(acfg), Some(added)) => {
                let (b, n) = added.time_ids.dims2()?;
                if b != batch {
                    bail!("SDXL time_ids have batch {b}, expected {batch}")
                }
                let time_embeds = timestep_embedding(
                    &added.time_ids.flatten_all()?,
                    acfg.addition_time_embed_dim,
                    cfg.flip_sin_to_cos,
                    cfg.freq_shift,
                )?
                .reshape((b, n * acfg.addition_time_embed_dim))?
                .to_dtype(dtype)?;
                let text = added.text_embeds.to_dtype(dtype)?;
                let add = Tensor::cat(&[&text, &time_embeds], 1)?;
                emb + add_embedding.forward(&add)?
            }
            (Some(_), _, None) => bail!(
                "this UNet has addition_embed_type = \"text_time\" (SDXL): pass the pooled \
                 text embeddings and time ids (AddedCond)"
            ),
            (Some(_), None, Some(_)) => {
                bail!("UNet has an add_embedding but no addition_embed config")
            }
        }
    }

    /// `conv_in`, after converting `sample` to the model dtype (and mapping it to
    /// `2·x − 1` when `center_input_sample`).
    pub fn forward_conv_in(&self, sample: &Tensor) -> Result<Tensor> {
        let mut x = sample.to_dtype(self.dtype())?;
        if self.config.center_input_sample {
            x = ((x * 2.0)? - 1.0)?;
        }
        conv2d_forward(&self.conv_in, &x)
    }

    /// The size up block `i` must upsample to, given the skip tensors still
    /// unused after it has taken its own: that of the next skip (`None` for the
    /// last block). Equals ×2 whenever the input size divides by 2^(levels−1).
    pub fn upsample_size(
        &self,
        i: usize,
        remaining_skips: &[Tensor],
    ) -> Result<Option<(usize, usize)>> {
        if i + 1 == self.up_blocks.len() {
            return Ok(None);
        }
        match remaining_skips.last() {
            Some(s) => Ok(Some((s.dim(2)?, s.dim(3)?))),
            None => bail!("UNet up block {i}: no skip tensor left for the next block"),
        }
    }

    /// `conv_out(silu(conv_norm_out(h)))`.
    pub fn forward_conv_out(&self, h: &Tensor) -> Result<Tensor> {
        norm_silu_conv(&self.conv_norm_out, &self.conv_out, h, None)
    }

    /// The noise (or v) prediction for `sample: [b, c, h, w]` at `timesteps: [b]`
    /// (f32, one per sample) given `encoder_hidden_states: [b, seq, dim]`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with_cond(sample, timesteps, encoder_hidden_states, None)
    }

    /// [`Self::forward`] with SDXL's added conditioning.
    pub fn forward_with_cond(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let (b, _, _, _) = sample.dims4()?;
        let (cb, _, _) = encoder_hidden_states.dims3()?;
        if cb != b {
            bail!("encoder_hidden_states have batch {cb} but the sample has batch {b}")
        }
        let context = encoder_hidden_states.to_dtype(self.dtype())?;
        let emb = self.embed_time(timesteps, b, added)?;
        let mut h = self.forward_conv_in(sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&h, &emb, &context)?;
            skips.extend(block_skips);
            h = out;
        }
        h = self.mid_block.forward(&h, &emb, &context)?;
        for (i, block) in self.up_blocks.iter().enumerate() {
            let n = block.resnets.len();
            if skips.len() < n {
                bail!(
                    "UNet up block {i} needs {n} skip tensors, {} left",
                    skips.len()
                )
            }
            let own = skips.split_off(skips.len() - n);
            let size = self.upsample_size(i, &skips)?;
            h = block.forward(&h, &own, &emb, &context, size)?;
        }
        self.forward_conv_out(&h)
    }
}

crate::lora::visit::impl_visit_layers!(UNet2DConditionModel {
    conv_in => "conv_in",
    time_embedding => "time_embedding",
    add_embedding => "add_embedding",
    down_blocks => "down_blocks",
    mid_block => "mid_block",
    up_blocks => "up_blocks",
    conv_out => "conv_out",
});

impl UNet2DConditionModel {
    /// Calls `f(path, layer)` for every Linear/Conv2d layer, `path` being its
    /// diffusers key minus `.weight` (`down_blocks.0.attentions.0.proj_in`, …).
    pub fn visit_layers(&self, f: &mut dyn FnMut(&str, crate::lora::visit::LayerRef<'_>)) {
        crate::lora::visit::VisitLayers::visit_layers_at(self, "", f)
    }

    /// The mutable version of [`Self::visit_layers`] (to attach LoRA adapters).
    pub fn visit_layers_mut(&mut self, f: &mut dyn FnMut(&str, crate::lora::visit::LayerMut<'_>)) {
        crate::lora::visit::VisitLayers::visit_layers_mut_at(self, "", f)
    }
}
