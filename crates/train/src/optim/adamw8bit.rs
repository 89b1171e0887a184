//! AdamW with 8-bit block-wise state, as bitsandbytes' `AdamW8bit` (its CPU
//! path, which applies weight decay before the update like PyTorch's AdamW).
//!
//! Each step dequantises both moments of a tensor (first moment with the
//! signed dynamic map, second with the unsigned one, one absolute maximum per
//! 256 values), does AdamW's update in f32 and quantises them again. Tensors
//! under 4,096 values keep f32 moments (bitsandbytes' `min_8bit_size`: small
//! tensors gain little and suffer most from quantisation). State: 2 bytes per
//! value plus 8 bytes per block of 256, ≈ 2.03 bytes per parameter.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use super::adamw::AdamWConfig;
use super::host::{StateIn, StateOut, load_each, save_each, update_each};
use super::quant8::{self, Codebook};
use super::{Optimizer, ParamGroup, check_grads_layout, check_groups, state_key};

/// Tensors with fewer values keep f32 moments.
pub const MIN_8BIT_SIZE: usize = 4096;

/// Bytes of state for a tensor of `n` values.
pub(crate) fn state_bytes(n: u64) -> u64 {
    if n < MIN_8BIT_SIZE as u64 {
        8 * n
    } else {
        2 * n + 8 * quant8::blocks(n as usize) as u64
    }
}

/// The moments of one tensor.
#[derive(Debug, Clone)]
enum Moments {
    /// Small tensors: f32.
    Full { m: Vec<f32>, v: Vec<f32> },
    /// Codes and per-block maxima.
    Quantized {
        m: Vec<u8>,
        m_absmax: Vec<f32>,
        v: Vec<u8>,
        v_absmax: Vec<f32>,
    },
}

#[derive(Debug, Clone)]
struct ParamState {
    step: u64,
    moments: Moments,
}

/// AdamW with 8-bit moments over parameter groups.
#[derive(Debug)]
pub struct AdamW8bit {
    groups: Vec<ParamGroup>,
    cfg: AdamWConfig,
    state: Vec<Vec<ParamState>>,
    signed: Codebook,
    unsigned: Codebook,
}

impl AdamW8bit {
    /// AdamW8bit over `groups` with zero moments. Errors as [`super::AdamW::new`].
    pub fn new(groups: Vec<ParamGroup>, cfg: AdamWConfig) -> Result<Self> {
        for (k, b) in [("beta1", cfg.beta1), ("beta2", cfg.beta2)] {
            if !(b.is_finite() && (0.0..1.0).contains(&b)) {
                candle_core::bail!("AdamW8bit: {k} must be in [0, 1), got {b}");
            }
        }
        if cfg.eps.is_nan() || cfg.eps < 0.0 {
            candle_core::bail!("AdamW8bit: eps must be ≥ 0, got {}", cfg.eps);
        }
        check_groups("AdamW8bit", &groups)?;
        let state = groups
            .iter()
            .map(|g| g.vars.iter().map(|v| fresh(v.elem_count())).collect())
            .collect();
        Ok(AdamW8bit {
            groups,
            cfg,
            state,
            signed: Codebook::dynamic(true),
            unsigned: Codebook::dynamic(false),
        })
    }
}

fn fresh(n: usize) -> ParamState {
    let moments = if n < MIN_8BIT_SIZE {
        Moments::Full {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    } else {
        // Codes 0 with absmax 0 stand for zeros, as bitsandbytes starts.
        let b = quant8::blocks(n);
        Moments::Quantized {
            m: vec![0; n],
            m_absmax: vec![0.0; b],
            v: vec![0; n],
            v_absmax: vec![0.0; b],
        }
    };
    ParamState { step: 0, moments }
}

impl Optimizer for AdamW8bit {
    fn step_scaled(
        &mut self,
        grads: &[Vec<Option<Tensor>>],
        lr_factor: f64,
        grad_scale: f64,
    ) -> Result<()> {
        check_grads_layout("AdamW8bit", &self.groups, grads)?;
        let c = self.cfg;
        let (b1, omb1) = (c.beta1 as f32, (1.0 - c.beta1) as f32);
        let (b2, omb2) = (c.beta2 as f32, (1.0 - c.beta2) as f32);
        let (signed, unsigned) = (&self.signed, &self.unsigned);
        update_each(
            &self.groups,
            &mut self.state,
            grads,
            grad_scale,
            |group, _, st, g, p| {
                let lr = group.lr * lr_factor;
                let decay =
                    (group.weight_decay > 0.0).then_some((1.0 - lr * group.weight_decay) as f32);
                st.step += 1;
                let t = st.step.min(i32::MAX as u64) as i32;
                let c1 = 1.0 - c.beta1.powi(t);
                let c2 = (1.0 - c.beta2.powi(t)).sqrt();
                match &mut st.moments {
                    Moments::Full { m, v } => {
                        // bitsandbytes' 32-bit path: ε scaled by the correction.
                        let step_size = (-lr * c2 / c1) as f32;
                        let eps = (c.eps * c2) as f32;
                        for (((p, m), v), &x) in p.iter_mut().zip(m).zip(v).zip(g) {
                            *m = *m * b1 + x * omb1;
                            *v = *v * b2 + x * x * omb2;
                            if let Some(d) = decay {
                                *p *= d;
                            }
                            *p += *m / (v.sqrt() + eps) * step_size;
                        }
                    }
                    Moments::Quantized {
                        m,
                        m_absmax,
                        v,
                        v_absmax,
                    } => {
                        let n = p.len();
                        let mut mf = vec![0.0f32; n];
                        let mut vf = vec![0.0f32; n];
                        signed.dequantize(m, m_absmax, &mut mf);
                        unsigned.dequantize(v, v_absmax, &mut vf);
                        let (c2f, eps) = (c2 as f32, c.eps as f32);
                        let step_size = (-lr / c1) as f32;
                        for (((p, mv), vv), &x) in p.iter_mut().zip(&mut mf).zip(&mut vf).zip(g) {
                            *mv = *mv * b1 + x * omb1;
                            *vv = *vv * b2 + x * x * omb2;
                            let denom = vv.sqrt() / c2f + eps;
                            if let Some(d) = decay {
                                *p *= d;
                            }
                            *p += step_size * (*mv / denom);
                        }
                        signed.quantize(&mf, m, m_absmax);
                        unsigned.quantize(&vf, v, v_absmax);
                    }
                }
                Ok(())
            },
        )
    }

    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = StateOut::default();
        save_each(
            &mut out,
            &self.groups,
            &self.state,
            |out, name, i, var, st| {
                out.count(state_key(name, i, "step"), st.step)?;
                match &st.moments {
                    Moments::Full { m, v } => {
                        out.f32(name, i, "exp_avg", m, var.shape())?;
                        out.f32(name, i, "exp_avg_sq", v, var.shape())
                    }
                    Moments::Quantized {
                        m,
                        m_absmax,
                        v,
                        v_absmax,
                    } => {
                        out.u8(name, i, "exp_avg_q8", m)?;
                        out.f32(name, i, "exp_avg_absmax", m_absmax, m_absmax.len())?;
                        out.u8(name, i, "exp_avg_sq_q8", v)?;
                        out.f32(name, i, "exp_avg_sq_absmax", v_absmax, v_absmax.len())
                    }
                }
            },
        )?;
        Ok(out.0)
    }

    fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        let input = StateIn {
            who: "AdamW8bit",
            t,
        };
        self.state = load_each(&self.groups, |name, i, var| {
            let n = var.elem_count();
            let step = input.count(&state_key(name, i, "step"))?;
            let moments = if n < MIN_8BIT_SIZE {
                Moments::Full {
                    m: input.f32(name, i, "exp_avg", n)?,
                    v: input.f32(name, i, "exp_avg_sq", n)?,
                }
            } else {
                let b = quant8::blocks(n);
                Moments::Quantized {
                    m: input.u8(name, i, "exp_avg_q8", n)?,
                    m_absmax: input.f32(name, i, "exp_avg_absmax", b)?,
                    v: input.u8(name, i, "exp_avg_sq_q8", n)?,
                    v_absmax: input.f32(name, i, "exp_avg_sq_absmax", b)?,
                }
            };
            Ok(ParamState { step, moments })
        })?;
        Ok(())
    }
}
