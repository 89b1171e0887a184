//! Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"),
//! as `lion-pytorch` and kohya's `Lion` compute it:
//!
//! ```text
//! p ← p·(1 − lr·wd)
//! p ← p − lr · sign(β₁m + (1−β₁)g)
//! m ← β₂m + (1−β₂)g
//! ```
//!
//! One moment (f32) per parameter; the update of every element has size `lr`,
//! which is why Lion wants a learning rate 3–10× smaller than AdamW's.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use super::host::{StateIn, StateOut, load_each, save_each, update_each};
use super::{Optimizer, ParamGroup, check_grads_layout, check_groups};

/// Lion's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LionConfig {
    /// Interpolation between momentum and gradient for the update's sign.
    pub beta1: f64,
    /// Decay of the momentum.
    pub beta2: f64,
}

impl Default for LionConfig {
    /// The paper's and `lion-pytorch`'s defaults: 0.9, 0.99.
    fn default() -> Self {
        LionConfig {
            beta1: 0.9,
            beta2: 0.99,
        }
    }
}

/// Lion over parameter groups; state: one f32 momentum per parameter.
#[derive(Debug)]
pub struct Lion {
    groups: Vec<ParamGroup>,
    cfg: LionConfig,
    /// `exp_avg[g][i]` belongs to `groups[g].vars[i]`.
    exp_avg: Vec<Vec<Vec<f32>>>,
}

/// PyTorch's `sign`: 0 stays 0 (Rust's `signum` would give ±1).
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

impl Lion {
    /// Lion over `groups` with zero momenta. Errors on the checks every
    /// optimizer makes and on betas outside [0, 1).
    pub fn new(groups: Vec<ParamGroup>, cfg: LionConfig) -> Result<Self> {
        for (k, b) in [("beta1", cfg.beta1), ("beta2", cfg.beta2)] {
            if !(b.is_finite() && (0.0..1.0).contains(&b)) {
                candle_core::bail!("Lion: {k} must be in [0, 1), got {b}");
            }
        }
        check_groups("Lion", &groups)?;
        let exp_avg = groups
            .iter()
            .map(|g| g.vars.iter().map(|v| vec![0.0; v.elem_count()]).collect())
            .collect();
        Ok(Lion {
            groups,
            cfg,
            exp_avg,
        })
    }
}

impl Optimizer for Lion {
    fn step_scaled(
        &mut self,
        grads: &[Vec<Option<Tensor>>],
        lr_factor: f64,
        grad_scale: f64,
    ) -> Result<()> {
        check_grads_layout("Lion", &self.groups, grads)?;
        let (b1, b2) = (self.cfg.beta1 as f32, self.cfg.beta2 as f32);
        // 1 − β in f64 then cast, as PyTorch passes `alpha = 1 - beta`.
        let (c1, c2) = ((1.0 - self.cfg.beta1) as f32, (1.0 - self.cfg.beta2) as f32);
        update_each(
            &self.groups,
            &mut self.exp_avg,
            grads,
            grad_scale,
            |group, _, m, g, p| {
                let lr = group.lr * lr_factor;
                let decay = (1.0 - lr * group.weight_decay) as f32;
                let lr = lr as f32;
                for ((p, m), g) in p.iter_mut().zip(m.iter_mut()).zip(g) {
                    let update = sign(*m * b1 + *g * c1);
                    *p = *p * decay - lr * update;
                    *m = *m * b2 + *g * c2;
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
            &self.exp_avg,
            |out, name, i, var, m| out.f32(name, i, "exp_avg", m, var.shape()),
        )?;
        Ok(out.0)
    }

    fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        let input = StateIn { who: "Lion", t };
        self.exp_avg = load_each(&self.groups, |name, i, var| {
            input.f32(name, i, "exp_avg", var.elem_count())
        })?;
        Ok(())
    }
}
