//! The model-family seam: what a family (SD1, SD2, SDXL) gives the shared
//! training step, sampler loop and LoRA machinery.
//!
//! Everything family-specific that the rest of the program needs is here, as
//! methods of [`StableDiffusion`]:
//!
//! * **text → conditioning** ([`StableDiffusion::encode_id_rows`],
//!   [`StableDiffusion::encode_captions`]): SD1/SD2 read one text encoder
//!   (with clip skip and its final LayerNorm); SDXL reads the penultimate
//!   hidden states of both encoders without the final LayerNorm, side by side
//!   (768 + 1280 = 2048 wide), plus the second encoder's projected pooled
//!   output ([`TextConditioning::pooled`]).
//! * **added conditioning** ([`StableDiffusion::added_cond`]): SDXL's
//!   `add_time_ids` — original size, crop top-left and target size of each
//!   sample ([`SizeCond`]) — with the pooled embedding; nothing for SD1/SD2.
//! * **the noise prediction** ([`StableDiffusion::predict`]): the UNet with
//!   both.
//! * **VAE geometry** ([`StableDiffusion::vae_scale_factor`], the VAE's own
//!   scale/shift in [`crate::vae::AutoencoderKL::scale_latents`]) and the
//!   **native resolution** ([`StableDiffusion::native_resolution`]).
//! * **LoRA names** ([`StableDiffusion::kohya_naming`]): the family's
//!   naming table, which lives with the file formats
//!   ([`crate::lora::format::KohyaNaming`]).

use candle_core::{DType, Device, Result, Tensor, bail};

use crate::clip::MAX_LENGTH;
use crate::clip::text_encoder::eos_positions;
use crate::load::Architecture;
use crate::lora::encoders::{TextEncodersMut, TextEncodersRef};
use crate::lora::format::KohyaNaming;
use crate::lora::targets::model_targets;
use crate::pipeline::StableDiffusion;
use crate::unet::{AddedCond, UNet2DConditionModel};

/// What the text side gives the UNet for a batch.
#[derive(Debug, Clone)]
pub struct TextConditioning {
    /// The cross-attention context, `[batch, tokens, width]`.
    pub context: Tensor,
    /// SDXL: the second encoder's projected pooled output, `[batch, width]`.
    pub pooled: Option<Tensor>,
}

impl TextConditioning {
    /// Stacks one-prompt conditionings (`[1, tokens, width]` each) into a
    /// batch, in order.
    pub fn cat(items: &[TextConditioning]) -> Result<Self> {
        if items.is_empty() {
            bail!("no text conditionings to batch")
        }
        let contexts: Vec<&Tensor> = items.iter().map(|c| &c.context).collect();
        let pooled = match items
            .iter()
            .map(|c| c.pooled.as_ref())
            .collect::<Option<Vec<_>>>()
        {
            Some(p) => Some(Tensor::cat(&p, 0)?),
            None if items.iter().all(|c| c.pooled.is_none()) => None,
            None => bail!("some text conditionings have a pooled embedding and some do not"),
        };
        Ok(Self {
            context: Tensor::cat(&contexts, 0)?,
            pooled,
        })
    }

    /// Both tensors converted to `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            context: self.context.to_dtype(dtype)?,
            pooled: self
                .pooled
                .as_ref()
                .map(|p| p.to_dtype(dtype))
                .transpose()?,
        })
    }

    /// The batch size.
    pub fn batch(&self) -> Result<usize> {
        self.context.dim(0)
    }
}

/// SDXL's size conditioning of one sample (`add_time_ids`), in pixels, each
/// pair `(height, width)` or `(top, left)`: what kohya and diffusers' SDXL
/// scripts pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeCond {
    /// The image's size before resizing.
    pub original: [u32; 2],
    /// Top-left corner of the crop in the resized image.
    pub crop_top_left: [u32; 2],
    /// The size trained on or generated (the bucket).
    pub target: [u32; 2],
}

impl SizeCond {
    /// An uncropped image generated or trained at `height × width` (what
    /// generation uses: original = target, no crop).
    pub fn uncropped(height: u32, width: u32) -> Self {
        Self {
            original: [height, width],
            crop_top_left: [0, 0],
            target: [height, width],
        }
    }

    /// The six ids in SDXL's order.
    pub fn ids(&self) -> [f32; 6] {
        [
            self.original[0] as f32,
            self.original[1] as f32,
            self.crop_top_left[0] as f32,
            self.crop_top_left[1] as f32,
            self.target[0] as f32,
            self.target[1] as f32,
        ]
    }
}

/// The ids of SDXL's second tokenizer for a row of the first's: the same
/// tokens (both use CLIP's vocabulary), padded with the second's pad token
/// after the end token at `end`.
fn repad(ids: &[u32], end: usize, pad: u32) -> Vec<u32> {
    ids.iter()
        .enumerate()
        .map(|(i, &id)| if i > end { pad } else { id })
        .collect()
}

impl StableDiffusion {
    /// The UNet and the text encoders (both of SDXL's) for the LoRA functions
    /// of [`crate::lora::attach`]; `with_text = false` leaves the encoders out
    /// (a UNet-only LoRA).
    pub fn lora_parts_mut(
        &mut self,
        with_text: bool,
    ) -> (&mut UNet2DConditionModel, TextEncodersMut<'_>) {
        let encoders = if with_text {
            TextEncodersMut {
                first: Some(&mut self.text_encoder),
                second: self.text_encoder_2.as_mut().map(|s| &mut s.model),
            }
        } else {
            TextEncodersMut::default()
        };
        (&mut self.unet, encoders)
    }

    /// Shared-reference version of [`Self::lora_parts_mut`] (with the text
    /// encoders).
    pub fn lora_parts(&self) -> (&UNet2DConditionModel, TextEncodersRef<'_>) {
        (
            &self.unet,
            TextEncodersRef {
                first: Some(&self.text_encoder),
                second: self.text_encoder_2.as_ref().map(|s| &s.model),
            },
        )
    }

    /// How this family names LoRA modules in kohya files (SDXL: sgm paths
    /// of this UNet's layout).
    pub fn kohya_naming(&self) -> KohyaNaming {
        let (unet, text_encoders) = self.lora_parts();
        KohyaNaming::from_targets(&model_targets(unet, text_encoders))
    }

    /// Whether the model needs [`TextConditioning::pooled`] and size ids
    /// (SDXL).
    pub fn has_added_cond(&self) -> bool {
        self.unet.add_embedding.is_some()
    }

    /// The device the model's text encoder lives on.
    pub fn device(&self) -> &Device {
        self.unet.conv_in.base.weight.device()
    }

    /// The factor between image and latent sides (8 for every released SD VAE:
    /// one ×2 per VAE level after the first).
    pub fn vae_scale_factor(&self) -> usize {
        1 << self.vae_config.block_out_channels.len().saturating_sub(1)
    }

    /// The side the model was trained at: the UNet's `sample_size` × the VAE
    /// factor (512 for SD1, 768 for SD2-v, 1024 for SDXL), else the family's.
    pub fn native_resolution(&self) -> u32 {
        match self.unet_config.sample_size {
            Some(s) => (s * self.vae_scale_factor()) as u32,
            None => match self.architecture {
                Architecture::Sdxl => 1024,
                _ => 512,
            },
        }
    }

    /// The conditioning of rows of token ids laid out by the first tokenizer
    /// (`ids: [n, 77]`, padded as it pads); SDXL's second encoder gets the same
    /// rows padded its own way. `clip_skip`: 1 = the family's default layer
    /// (SD1/SD2: the last; SDXL: the penultimate). Context `[n, 77, width]`.
    pub fn encode_id_rows(&self, ids: &[Vec<u32>], clip_skip: usize) -> Result<TextConditioning> {
        let device = self.text_encoder.embeddings.token_embedding.weight.device();
        let n = ids.len();
        let rows = |rows: Vec<u32>| Tensor::from_vec(rows, (n, MAX_LENGTH), device);
        if ids.iter().any(|r| r.len() != MAX_LENGTH) {
            bail!("token id rows must have {MAX_LENGTH} ids each")
        }
        let first = rows(ids.concat())?;
        let Some(second) = &self.text_encoder_2 else {
            return Ok(TextConditioning {
                context: self
                    .text_encoder
                    .forward_with_clip_skip(&first, clip_skip)?,
                pooled: None,
            });
        };
        // The end token as the first encoder finds it (its config's rule).
        let ends = eos_positions(&first, self.text_encoder_config.eos_token_id)?;
        let pad = second.tokenizer.pad_id(second.pad_style);
        let ids_2 = rows(
            ids.iter()
                .zip(&ends)
                .flat_map(|(r, &end)| repad(r, end, pad))
                .collect(),
        )?;
        let (h1, _) = self.text_encoder.forward_sdxl(&first, clip_skip, false)?;
        let (h2, pooled) = second.model.forward_sdxl(&ids_2, clip_skip, true)?;
        let h1 = h1.to_dtype(h2.dtype())?;
        Ok(TextConditioning {
            context: Tensor::cat(&[&h1, &h2], 2)?,
            pooled,
        })
    }

    /// The conditioning of captions as training uses them (each truncated to
    /// 75 tokens and padded to 77; no prompt-weight syntax): context
    /// `[n, 77, width]`.
    pub fn encode_captions(&self, captions: &[&str], clip_skip: usize) -> Result<TextConditioning> {
        let ids: Vec<Vec<u32>> = captions
            .iter()
            .map(|c| self.tokenizer.encode_padded(c, MAX_LENGTH, self.pad_style))
            .collect();
        self.encode_id_rows(&ids, clip_skip)
    }

    /// SDXL's added conditioning for a batch (`None` for SD1/SD2): the pooled
    /// embeddings and one [`SizeCond`] per sample.
    pub fn added_cond(
        &self,
        text: &TextConditioning,
        sizes: &[SizeCond],
    ) -> Result<Option<AddedCond>> {
        if !self.has_added_cond() {
            return Ok(None);
        }
        let Some(pooled) = &text.pooled else {
            bail!("SDXL needs the pooled text embedding, and this conditioning has none")
        };
        let b = pooled.dim(0)?;
        if sizes.len() != b {
            bail!("{} size conditionings for a batch of {b}", sizes.len())
        }
        let ids: Vec<f32> = sizes.iter().flat_map(SizeCond::ids).collect();
        Ok(Some(AddedCond {
            text_embeds: pooled.clone(),
            time_ids: Tensor::from_vec(ids, (b, 6), pooled.device())?,
        }))
    }

    /// The UNet's prediction for `noisy: [b, c, h, w]` at `timesteps: [b]`
    /// (or one for all) given the text conditioning (batch `b`) and, for
    /// SDXL, one [`SizeCond`] per sample; inputs are converted to the UNet's
    /// dtype.
    pub fn predict(
        &self,
        noisy: &Tensor,
        timesteps: &Tensor,
        text: &TextConditioning,
        sizes: &[SizeCond],
    ) -> Result<Tensor> {
        if self.unet_pending {
            candle_core::bail!("the UNet's weights are not loaded yet (load_unet)");
        }
        let added = self.added_cond(text, sizes)?;
        self.unet
            .forward_with_cond(noisy, timesteps, &text.context, added.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_tokenizer_pads_after_the_first_end_token() {
        assert_eq!(repad(&[1, 5, 9, 9, 9], 2, 0), vec![1, 5, 9, 0, 0]);
        assert_eq!(repad(&[1, 5, 6], 2, 0), vec![1, 5, 6]);
    }

    #[test]
    fn size_ids_are_in_sdxl_order() {
        let s = SizeCond {
            original: [1, 2],
            crop_top_left: [3, 4],
            target: [5, 6],
        };
        assert_eq!(s.ids(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(
            SizeCond::uncropped(7, 8).ids(),
            [7.0, 8.0, 0.0, 0.0, 7.0, 8.0]
        );
    }
}
