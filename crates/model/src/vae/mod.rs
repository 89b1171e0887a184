//! The VAE, diffusers' `AutoencoderKL`: images in `[-1, 1]` to latent
//! distributions and latents back to images.
//!
//! ```text
//! encode: moments = quant_conv(encoder(x))  → mean, logvar (split on channels)
//! decode: decoder(post_quant_conv(z))
//! ```
//!
//! Key paths are diffusers' (`encoder.down_blocks.N.resnets.M…`,
//! `encoder.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`,
//! `quant_conv`, `post_quant_conv`, `decoder…`); the old attention names
//! `query/key/value/proj_attn` load too. The latents the UNet sees are
//! [`AutoencoderKL::scale_latents`] of a sample (`(z − shift) · scaling_factor`).

pub mod config;
pub mod decoder;
pub mod encoder;
pub mod mid_block;

use candle_core::{DType, Result, Tensor, bail};
use candle_nn::VarBuilder;

pub use config::VaeConfig;
pub use decoder::Decoder;
pub use encoder::Encoder;

use crate::blocks::layers::{conv2d, conv2d_forward};
use crate::ops::FrozenConv2d;

/// The latent distribution returned by [`AutoencoderKL::encode`]
/// (diffusers' `DiagonalGaussianDistribution`, log-variance clamped to
/// `[-30, 20]`).
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub logvar: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// Splits `moments: [b, 2·c, h, w]` into mean and log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c2 = moments.dim(1)?;
        if !c2.is_multiple_of(2) {
            bail!("VAE moments have {c2} channels, expected an even number (mean and logvar)")
        }
        let c = c2 / 2;
        let mean = moments.narrow(1, 0, c)?;
        let logvar = moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        let std = (&logvar * 0.5)?.exp()?;
        Ok(Self { mean, logvar, std })
    }

    /// `mean + std · noise`, `noise` ~ N(0, 1) of the shape of `mean`.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (&self.std * noise.to_dtype(self.std.dtype())?)?
    }

    /// The mode of the distribution (its mean).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }
}

/// Which halves of the VAE to build (see [`AutoencoderKL::with_parts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeParts {
    /// The encoder (images → latents: training, latent caching).
    pub encoder: bool,
    /// The decoder (latents → images: generation, previews).
    pub decoder: bool,
}

impl VaeParts {
    /// Both halves.
    pub const ALL: VaeParts = VaeParts {
        encoder: true,
        decoder: true,
    };
    /// The decoder alone: generation never encodes an image.
    pub const DECODER: VaeParts = VaeParts {
        encoder: false,
        decoder: true,
    };
}

/// The autoencoder. Field names are the diffusers keys.
///
/// Either half may be absent: training needs only the encoder (and only until
/// every latent is cached), generation only the decoder, so neither is built
/// or kept where it is not used.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    pub config: VaeConfig,
    /// `None` when not built or released ([`Self::release_encoder`]).
    pub encoder: Option<Encoder>,
    /// `None` when not built or released ([`Self::release_decoder`]).
    pub decoder: Option<Decoder>,
    /// The dtype of the weights, also when a half is absent.
    dtype: DType,
    /// Absent when `use_quant_conv` is false.
    pub quant_conv: Option<FrozenConv2d>,
    /// Absent when `use_post_quant_conv` is false.
    pub post_quant_conv: Option<FrozenConv2d>,
}

impl AutoencoderKL {
    /// Builds the VAE from weights under `vb` (the root of `vae/`'s safetensors)
    /// in `vb`'s dtype.
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        Self::with_parts(vb, cfg, VaeParts::ALL)
    }

    /// [`Self::new`] building only the halves in `parts`: the weights of the
    /// others are never read.
    pub fn with_parts(vb: VarBuilder, cfg: &VaeConfig, parts: VaeParts) -> Result<Self> {
        let latent = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(conv2d(
                &vb.pp("quant_conv"),
                2 * latent,
                2 * latent,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv2d(&vb.pp("post_quant_conv"), latent, latent, 1, 1, 0)?)
        } else {
            None
        };
        let encoder = match parts.encoder {
            true => Some(Encoder::new(vb.pp("encoder"), cfg)?),
            false => None,
        };
        let decoder = match parts.decoder {
            true => Some(Decoder::new(vb.pp("decoder"), cfg)?),
            false => None,
        };
        Ok(Self {
            config: cfg.clone(),
            encoder,
            decoder,
            dtype: vb.dtype(),
            quant_conv,
            post_quant_conv,
        })
    }

    /// The dtype the VAE computes in (that of its weights).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Drops the encoder's weights (once every latent is cached); a later
    /// [`Self::encode`] is an error.
    pub fn release_encoder(&mut self) {
        self.encoder = None;
    }

    /// Drops the decoder's weights; a later [`Self::decode`] is an error.
    pub fn release_decoder(&mut self) {
        self.decoder = None;
    }

    /// `x: [b, in_channels, H, W]` in `[-1, 1]` → the latent distribution.
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let Some(encoder) = &self.encoder else {
            bail!("the VAE encoder is not loaded (it was released once every latent was cached)")
        };
        let h = encoder.forward(&x.to_dtype(self.dtype())?)?;
        let moments = match &self.quant_conv {
            Some(conv) => conv2d_forward(conv, &h)?,
            None => h,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// `z: [b, latent_channels, h, w]` (unscaled) → image in about `[-1, 1]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = z.to_dtype(self.dtype())?;
        let z = match &self.post_quant_conv {
            Some(conv) => conv2d_forward(conv, &z)?,
            None => z,
        };
        let Some(decoder) = &self.decoder else {
            bail!("the VAE decoder is not loaded (it is not needed for training without previews)")
        };
        decoder.forward(&z)
    }

    /// Latents as the UNet is trained on them: `(z − shift_factor) · scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        (z - shift)? * self.config.scaling_factor
    }

    /// The inverse of [`Self::scale_latents`]: `z / scaling_factor + shift_factor`.
    pub fn unscale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        (latents / self.config.scaling_factor)? + shift
    }
}
