//! The text encoders LoRA may adapt, as one argument: SD1/SD2's one, or
//! SDXL's two (`text_encoder`, `text_encoder_2`).
//!
//! Every function of [`super::attach`] and [`super::targets`] takes the UNet
//! and `impl Into<TextEncoders…>`, so SD1/SD2 callers keep passing
//! `Some(&mut sd.text_encoder)` (or `None`), and SDXL callers pass both
//! encoders ([`crate::pipeline::StableDiffusion::lora_parts_mut`]).

use super::LoraComponent;
use crate::clip::ClipTextTransformer;

/// Shared references to the text encoders whose layers LoRA sees.
#[derive(Debug, Clone, Copy, Default)]
pub struct TextEncodersRef<'a> {
    /// `text_encoder` (SD1/SD2's only one, SDXL's CLIP-L).
    pub first: Option<&'a ClipTextTransformer>,
    /// SDXL's `text_encoder_2`.
    pub second: Option<&'a ClipTextTransformer>,
}

/// Mutable references to the text encoders whose layers LoRA adapts.
#[derive(Debug, Default)]
pub struct TextEncodersMut<'a> {
    /// `text_encoder` (SD1/SD2's only one, SDXL's CLIP-L).
    pub first: Option<&'a mut ClipTextTransformer>,
    /// SDXL's `text_encoder_2`.
    pub second: Option<&'a mut ClipTextTransformer>,
}

impl<'a> From<Option<&'a ClipTextTransformer>> for TextEncodersRef<'a> {
    fn from(first: Option<&'a ClipTextTransformer>) -> Self {
        Self {
            first,
            second: None,
        }
    }
}

impl<'a> From<Option<&'a mut ClipTextTransformer>> for TextEncodersMut<'a> {
    fn from(first: Option<&'a mut ClipTextTransformer>) -> Self {
        Self {
            first,
            second: None,
        }
    }
}

impl<'a> TextEncodersRef<'a> {
    /// The encoders present, each with its component.
    pub fn iter(&self) -> impl Iterator<Item = (LoraComponent, &'a ClipTextTransformer)> {
        [
            (LoraComponent::TextEncoder, self.first),
            (LoraComponent::TextEncoder2, self.second),
        ]
        .into_iter()
        .filter_map(|(c, te)| te.map(|te| (c, te)))
    }

    /// Whether the encoder of `component` was given.
    pub fn has(&self, component: LoraComponent) -> bool {
        self.iter().any(|(c, _)| c == component)
    }
}

impl<'a> TextEncodersMut<'a> {
    /// A shared view for as long as `self` is borrowed.
    pub fn as_ref(&self) -> TextEncodersRef<'_> {
        TextEncodersRef {
            first: self.first.as_deref(),
            second: self.second.as_deref(),
        }
    }

    /// The encoders present, each with its component.
    pub fn iter_mut(
        &mut self,
    ) -> impl Iterator<Item = (LoraComponent, &mut ClipTextTransformer)> + '_ {
        [
            (LoraComponent::TextEncoder, self.first.as_deref_mut()),
            (LoraComponent::TextEncoder2, self.second.as_deref_mut()),
        ]
        .into_iter()
        .filter_map(|(c, te)| te.map(|te| (c, te)))
    }
}
