//! # LoRA: low-rank adapters on the frozen layers
//!
//! A LoRA module adapts one frozen Linear or Conv2d layer:
//! `y = W x + multiplier · (alpha / rank) · up(down(dropout(x)))`, with `down`
//! kaiming-uniform and `up` zero at initialisation, so training starts exactly
//! at the base model. LoRA tensors are always f32, whatever the base dtype
//! (only an f64 base, used by finite-difference tests, gets f64 ones).
//!
//! This module holds the types shared by the layers, the target selection and
//! the file formats: [`LoraComponent`], [`LayerKind`], [`TargetInfo`],
//! [`LoraModule`] and [`LoraWeights`].
//!
//! - [`adapted`]: [`adapted::LoraLinear`] / [`adapted::LoraConv2d`], the frozen
//!   layers of [`crate::ops`] with a LoRA slot, as the models hold them;
//! - [`layer`]: the [`layer::LoraAdapter`] held in that slot, its forward
//!   (f32 whatever the base dtype), dropout and merge arithmetic;
//! - [`visit`]: walking every Linear/Conv2d of the UNet and the text encoder with
//!   its module path (the checkpoint key minus `.weight`);
//! - [`targets`]: which layers get a LoRA (presets, patterns, rank/alpha per group);
//! - [`attach`]: creating trainable adapters, attaching loaded weights,
//!   extracting, removing, merging and unmerging.

use std::collections::BTreeMap;

pub mod adapted;
pub mod attach;
pub mod blocks;
pub mod encoders;
pub mod extract;
pub mod layer;
pub(crate) mod linear_cpu;
pub mod merge;
pub mod resize;
pub mod svd;
pub mod targets;
pub mod visit;

/// Which model part a LoRA module adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraComponent {
    /// The UNet2DConditionModel.
    Unet,
    /// The (first) text encoder: SD1/SD2's only one, SDXL's CLIP-L.
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP-bigG; `text_encoder_2` in diffusers).
    #[serde(rename = "text_encoder_2")]
    TextEncoder2,
}

impl LoraComponent {
    /// The checkpoint component holding this part's layers.
    pub fn model_component(self) -> crate::load::Component {
        use crate::load::Component;
        match self {
            LoraComponent::Unet => Component::Unet,
            LoraComponent::TextEncoder => Component::TextEncoder,
            LoraComponent::TextEncoder2 => Component::TextEncoder2,
        }
    }

    /// The LoRA part of a checkpoint component (`None` for the VAE, which
    /// LoRAs never adapt).
    pub fn of_model(c: crate::load::Component) -> Option<Self> {
        use crate::load::Component;
        match c {
            Component::Unet => Some(LoraComponent::Unet),
            Component::TextEncoder => Some(LoraComponent::TextEncoder),
            Component::TextEncoder2 => Some(LoraComponent::TextEncoder2),
            Component::Vae => None,
        }
    }
}

/// The shape of the layer a LoRA module adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum LayerKind {
    /// A Linear layer (`[out, in]` weight).
    Linear,
    /// A 2-D convolution (`[out, in, kh, kw]` weight).
    Conv2d {
        /// Kernel size `[kh, kw]`.
        kernel: [usize; 2],
        /// Stride (same in both directions).
        stride: usize,
        /// Zero padding (same on all sides).
        padding: usize,
    },
}

/// One adaptable layer of a model: where it is and its shape.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TargetInfo {
    /// The model part holding the layer.
    pub component: LoraComponent,
    /// diffusers/transformers module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`
    /// (UNet) or `text_model.encoder.layers.0.self_attn.q_proj` (text encoder) — exactly the weight key minus `.weight`.
    pub path: String,
    /// Linear or Conv2d, with the conv geometry.
    pub kind: LayerKind,
    /// Input features (input channels for a conv).
    pub in_features: usize,
    /// Output features (output channels for a conv).
    pub out_features: usize,
}

/// The weights of one LoRA module. Shapes: Linear: down [rank, in], up [out, rank];
/// Conv2d: down [rank, in, kh, kw], up [out, rank, 1, 1]. Stored as f32.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// The down projection (`lora_down` / PEFT `lora_A`).
    pub down: candle_core::Tensor,
    /// The up projection (`lora_up` / PEFT `lora_B`).
    pub up: candle_core::Tensor,
    /// The alpha of the module: the LoRA path is scaled by `alpha / rank`.
    pub alpha: f32,
}

impl LoraModule {
    /// The rank: `down.dims()[0]` (0 for a malformed, dimensionless `down`).
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }

    /// The scale applied to the LoRA path: `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank() as f32
    }
}

/// A whole LoRA: modules keyed by (component, diffusers module path).
#[derive(Debug, Clone, Default)]
pub struct LoraWeights {
    /// The modules, ordered by component then path.
    pub modules: BTreeMap<(LoraComponent, String), LoraModule>,
}
pub mod format;
