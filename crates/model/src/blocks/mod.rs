//! Building blocks shared by the UNet and the VAE, each with diffusers' module
//! structure and key names: [`ResnetBlock2D`], [`Downsample2D`], [`Upsample2D`],
//! [`Transformer2DModel`] with its [`BasicTransformerBlock`]s ([`Attention`],
//! GEGLU [`FeedForward`]), and the VAE mid-block's [`SpatialSelfAttention`].
//!
//! Everything is built from [`crate::ops`] (frozen Linear/Conv2d, norms, attention
//! with a correct backward), and every layer is a public field, so the LoRA layer
//! code can find `to_q`, `proj_in`, `conv1`, … by their key paths and wrap them.
//! [`layers`] states the dtype rules (CPU half-precision convs run in f32;
//! attention scores are f32 whenever storage is f16/bf16).

pub mod attention;
pub mod layers;
pub mod resnet;
pub mod sampling;
pub mod spatial_attention;
pub mod transformer;

pub use attention::{Attention, FeedForward, GegluProj};
pub use layers::{GroupNorm, LayerNorm, conv2d_forward};
pub use resnet::{ResnetBlock2D, ResnetBlock2DConfig};
pub use sampling::{Downsample2D, Upsample2D};
pub use spatial_attention::SpatialSelfAttention;
pub use transformer::{BasicTransformerBlock, Projection, Transformer2DConfig, Transformer2DModel};
