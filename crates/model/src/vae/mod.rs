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

/// The autoencoder. Field names are the diffusers keys.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    pub config: VaeConfig,
    pub encoder: Encoder,
    pub decoder: Decoder,
    /// Absent when `use_quant_conv` is false.
    pub quant_conv: Option<FrozenConv2d>,
    /// Absent when `use_post_quant_conv` is false.
    pub post_quant_conv: Option<FrozenConv2d>,
}

impl AutoencoderKL {
    /// Builds the VAE from weights under `vb` (the root of `vae/`'s safetensors)
    /// in `vb`'s dtype.
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
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
        Ok(Self {
            config: cfg.clone(),
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv,
            post_quant_conv,
        })
    }

    /// The dtype the VAE computes in (that of its weights).
    pub fn dtype(&self) -> DType {
        self.encoder.conv_in.weight.dtype()
    }

    /// `x: [b, in_channels, H, W]` in `[-1, 1]` → the latent distribution.
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let h = self.encoder.forward(&x.to_dtype(self.dtype())?)?;
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
        self.decoder.forward(&z)
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
