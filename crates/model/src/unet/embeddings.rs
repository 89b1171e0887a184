//! Time embeddings: diffusers' sinusoidal `get_timestep_embedding` and the
//! `TimestepEmbedding` MLP (`linear_1`, SiLU, `linear_2`).

use candle_core::{DType, Result, Tensor, bail};
use candle_nn::VarBuilder;

use crate::blocks::layers::linear;
use crate::lora::adapted::LoraLinear;
use crate::ops::{self};

/// The period of the lowest frequency, as in diffusers.
const MAX_PERIOD: f32 = 10_000.0;

/// Sinusoidal embedding of `timesteps: [n]` (any float dtype) → `[n, dim]` in f32,
/// exactly as diffusers' `get_timestep_embedding` with `scale = 1`:
/// `freq_i = exp(-ln(10000) · i / (dim/2 − freq_shift))`, `[sin(t·f), cos(t·f)]`,
/// halves swapped when `flip_sin_to_cos`, a zero column appended for odd `dim`.
///
/// The frequencies are computed in f32 with the same operation order as PyTorch, so
/// the arguments of sin/cos (up to ~1000 rad) agree to the last bit or so.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let n = timesteps.dims1()?;
    let half = dim / 2;
    if half == 0 {
        bail!("timestep embedding width {dim} is too small")
    }
    let denom = half as f32 - freq_shift as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((-MAX_PERIOD.ln() * i as f32) / denom).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let args = timesteps
        .to_dtype(DType::F32)?
        .reshape((n, 1))?
        .broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if !dim.is_multiple_of(2) {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// diffusers' `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    pub linear_1: LoraLinear,
    pub linear_2: LoraLinear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(&vb.pp("linear_1"), in_dim, out_dim, true)?,
            linear_2: linear(&vb.pp("linear_2"), out_dim, out_dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&ops::silu(&self.linear_1.forward(x)?)?)
    }
}

crate::lora::visit::impl_visit_layers!(TimestepEmbedding {
    linear_1 => "linear_1",
    linear_2 => "linear_2",
});
