//! AdamW, PyTorch's.
//!
//! candle-nn's `AdamW` is not used because it has no parameter groups (the UNet
//! and text-encoder LoRA train with different learning rates), and because its
//! step count advances for every Var even when that Var got no gradient, which
//! scales the first real update of such a Var wrongly. This one follows
//! PyTorch's `torch.optim.AdamW` exactly: decoupled weight decay
//! (`p ← p·(1 − lr·wd)`), bias correction with a per-parameter step count that
//! advances only when the parameter has a gradient, and a parameter without a
//! gradient is left untouched (no decay either).
//!
//! Optimizer state (first and second moments) is kept in f32 whatever the
//! parameter's dtype, and can be saved and restored for resuming a run.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor, Var};

use super::{Optimizer, ParamGroup, check_grads_layout, check_groups, state_key};
use crate::adamw_cpu as fused;

/// Adam's hyper-parameters shared by all groups.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the denominator for numerical stability.
    pub eps: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults: 0.9, 0.999, 1e-8.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// Per-parameter state.
#[derive(Debug, Clone)]
pub(crate) struct ParamState {
    /// First moment (f32, the parameter's shape).
    pub(crate) exp_avg: Tensor,
    /// Second moment (f32, the parameter's shape).
    pub(crate) exp_avg_sq: Tensor,
    /// Number of updates this parameter has received.
    step: u64,
}

/// AdamW (decoupled weight decay, bias correction per parameter: a parameter's
/// step count only advances when it receives a gradient). State f32.
#[derive(Debug)]
pub struct AdamW {
    groups: Vec<ParamGroup>,
    cfg: AdamWConfig,
    /// `state[g][i]` belongs to `groups[g].vars[i]`.
    state: Vec<Vec<ParamState>>,
}

impl AdamW {
    /// An optimizer over `groups`, with zero moments.
    ///
    /// Errors if a group name repeats, a Var is listed twice (it would be
    /// stepped twice), a Var is not a float tensor, or a hyper-parameter is out
    /// of range.
    pub fn new(groups: Vec<ParamGroup>, cfg: AdamWConfig) -> Result<Self> {
        if !(0.0..1.0).contains(&cfg.beta1) || !(0.0..1.0).contains(&cfg.beta2) {
            candle_core::bail!(
                "AdamW: betas must be in [0, 1), got beta1 = {}, beta2 = {}",
                cfg.beta1,
                cfg.beta2
            );
        }
        if cfg.eps.is_nan() || cfg.eps < 0.0 {
            candle_core::bail!("AdamW: eps must be ≥ 0, got {}", cfg.eps);
        }
        check_groups("AdamW", &groups)?;
        let mut state = Vec::with_capacity(groups.len());
        for group in &groups {
            let mut gstate = Vec::with_capacity(group.vars.len());
            for var in &group.vars {
                // Two storages: the CPU step updates each moment in place.
                let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
                gstate.push(ParamState {
                    exp_avg: zeros()?,
                    exp_avg_sq: zeros()?,
                    step: 0,
                });
            }
            state.push(gstate);
        }
        Ok(AdamW { groups, cfg, state })
    }

    /// One update. `grads[g][i]` is the gradient of `groups[g].vars[i]` (None =
    /// no gradient this step: that parameter is left as it is and its step
    /// count does not advance). `lr_factor` multiplies every group's base lr.
    ///
    /// Gradients are not checked for NaN/inf here: check [`grad_norm`] (or the
    /// value [`clip_grad_norm`] returns) first and skip the step if it is not
    /// finite, or the moments are poisoned for good.
    pub fn step(&mut self, grads: &[Vec<Option<Tensor>>], lr_factor: f64) -> Result<()> {
        self.step_scaled(grads, lr_factor, 1.0)
    }

    /// [`step`](Self::step) on the gradients multiplied by `grad_scale` (the
    /// clipping coefficient of [`clip_coefficient`]), without writing the
    /// scaled gradients anywhere.
    ///
    /// On the CPU, an f32 parameter is updated by three in-place passes (first
    /// moment, second moment, parameter) instead of fifteen tensor ops; the
    /// arithmetic is the same, operation for operation, so both paths give the
    /// same bits (tested).
    pub fn step_scaled(
        &mut self,
        grads: &[Vec<Option<Tensor>>],
        lr_factor: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.step_impl(grads, lr_factor, grad_scale, true)
    }

    /// The update, through the fused CPU kernel where it applies when `fused`.
    pub(crate) fn step_impl(
        &mut self,
        grads: &[Vec<Option<Tensor>>],
        lr_factor: f64,
        grad_scale: f64,
        fused: bool,
    ) -> Result<()> {
        check_grads_layout("AdamW", &self.groups, grads)?;
        let cfg = self.cfg;
        for ((group, gstate), ggrads) in self.groups.iter().zip(&mut self.state).zip(grads) {
            let lr = group.lr * lr_factor;
            for ((var, st), grad) in group.vars.iter().zip(gstate).zip(ggrads) {
                let Some(grad) = grad else { continue };
                st.step += 1;
                let hyper = Hyper::new(cfg, lr, group.weight_decay, st.step, grad_scale);
                if !(fused && fused::update(var, st, grad, &hyper)?) {
                    generic_update(var, st, grad, &hyper)?;
                }
            }
        }
        Ok(())
    }

    /// The parameter groups, with their base learning rates.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// The optimizer's hyper-parameters.
    pub fn config(&self) -> AdamWConfig {
        self.cfg
    }

    /// Named tensors for resume: for parameter `i` of group `G`,
    /// `G.i.exp_avg` and `G.i.exp_avg_sq` (f32, the parameter's shape) and
    /// `G.i.step` (a one-element I64 tensor on the CPU).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (group, gstate) in self.groups.iter().zip(&self.state) {
            for (i, st) in gstate.iter().enumerate() {
                // Copies: the CPU step updates the moments in place.
                out.push((state_key(&group.name, i, "exp_avg"), st.exp_avg.copy()?));
                out.push((
                    state_key(&group.name, i, "exp_avg_sq"),
                    st.exp_avg_sq.copy()?,
                ));
                let step = Tensor::from_vec(vec![st.step as i64], 1, &candle_core::Device::Cpu)?;
                out.push((state_key(&group.name, i, "step"), step));
            }
        }
        Ok(out)
    }

    /// Restores what [`AdamW::state_tensors`] saved, for an optimizer built over
    /// the same groups. Keys not belonging to this optimizer are ignored; a
    /// missing key or a shape mismatch is an error naming the key, and leaves
    /// the optimizer unchanged.
    pub fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: &str| -> Result<&Tensor> {
            t.get(key).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "optimizer state: tensor {key:?} is missing; the checkpoint was saved with different \
                     parameter groups or LoRA settings — resume with the same config, or start a new run"
                ))
            })
        };
        let mut new_state = Vec::with_capacity(self.state.len());
        for group in &self.groups {
            let mut ng = Vec::with_capacity(group.vars.len());
            for (i, var) in group.vars.iter().enumerate() {
                let moment = |what: &str| -> Result<Tensor> {
                    let key = state_key(&group.name, i, what);
                    let m = get(&key)?;
                    if m.dims() != var.dims() {
                        candle_core::bail!(
                            "optimizer state: tensor {key:?} has shape {:?} but the parameter has {:?}; \
                             the checkpoint belongs to a different LoRA configuration",
                            m.dims(),
                            var.dims()
                        );
                    }
                    // A storage of its own: the CPU step updates moments in place.
                    m.to_dtype(DType::F32)?.to_device(var.device())?.copy()
                };
                let exp_avg = moment("exp_avg")?;
                let exp_avg_sq = moment("exp_avg_sq")?;
                let key = state_key(&group.name, i, "step");
                let step = get(&key)?
                    .flatten_all()?
                    .to_dtype(DType::I64)?
                    .to_vec1::<i64>()?;
                let step = match step.as_slice() {
                    [s] if *s >= 0 => *s as u64,
                    _ => candle_core::bail!(
                        "optimizer state: tensor {key:?} must hold one non-negative step count, got {step:?}"
                    ),
                };
                ng.push(ParamState {
                    exp_avg,
                    exp_avg_sq,
                    step,
                });
            }
            new_state.push(ng);
        }
        self.state = new_state;
        Ok(())
    }
}

impl Optimizer for AdamW {
    fn step_scaled(
        &mut self,
        grads: &[Vec<Option<Tensor>>],
        lr_factor: f64,
        grad_scale: f64,
    ) -> Result<()> {
        AdamW::step_scaled(self, grads, lr_factor, grad_scale)
    }

    fn groups(&self) -> &[ParamGroup] {
        AdamW::groups(self)
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        AdamW::state_tensors(self)
    }

    fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        AdamW::load_state_tensors(self, t)
    }
}

/// The scalars of one parameter's update, each in the f32 form the tensor ops
/// apply it in (candle multiplies by an f64 scalar cast to f32; `x / s` is
/// `x · (1/s)`), so that the fused kernel reproduces the generic path bit for
/// bit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hyper {
    /// `grad_scale` (1 = no clipping).
    pub grad_scale: f32,
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `1 / √(1 − β₂ᵗ)`.
    pub inv_sqrt_bias2: f32,
    pub eps: f32,
    /// `lr / (1 − β₁ᵗ)`.
    pub step_size: f32,
    /// `1 − lr·wd`, `None` without weight decay.
    pub decay: Option<f32>,
}

impl Hyper {
    fn new(cfg: AdamWConfig, lr: f64, weight_decay: f64, step: u64, grad_scale: f64) -> Self {
        let t = step.min(i32::MAX as u64) as i32;
        let bias1 = 1.0 - cfg.beta1.powi(t);
        let bias2 = 1.0 - cfg.beta2.powi(t);
        Hyper {
            grad_scale: grad_scale as f32,
            beta1: cfg.beta1 as f32,
            one_minus_beta1: (1.0 - cfg.beta1) as f32,
            beta2: cfg.beta2 as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            inv_sqrt_bias2: (1.0 / bias2.sqrt()) as f32,
            eps: cfg.eps as f32,
            step_size: (lr / bias1) as f32,
            decay: (weight_decay != 0.0).then_some((1.0 - lr * weight_decay) as f32),
        }
    }
}

/// One parameter's update with tensor ops (any device and dtype). PyTorch's
/// AdamW: `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
/// `p ← p·(1 − lr·wd) − lr/(1−β₁ᵗ) · m / (√v / √(1−β₂ᵗ) + ε)`.
fn generic_update(var: &Var, st: &mut ParamState, grad: &Tensor, h: &Hyper) -> Result<()> {
    let f = |x: f32| f64::from(x);
    let mut grad = grad.to_dtype(DType::F32)?;
    if h.grad_scale != 1.0 {
        grad = (grad * f(h.grad_scale))?;
    }
    st.exp_avg = ((&st.exp_avg * f(h.beta1))? + (&grad * f(h.one_minus_beta1))?)?;
    st.exp_avg_sq = ((&st.exp_avg_sq * f(h.beta2))? + (grad.sqr()? * f(h.one_minus_beta2))?)?;
    let denom = ((st.exp_avg_sq.sqrt()? * f(h.inv_sqrt_bias2))? + f(h.eps))?;
    let update = ((&st.exp_avg / denom)? * f(h.step_size))?;
    let p = var.as_tensor().to_dtype(DType::F32)?;
    let p = match h.decay {
        Some(decay) => (p * f(decay))?,
        None => p,
    };
    let p = (p - update)?;
    var.set(&p.to_dtype(var.dtype())?)?;
    sd_lora_model::ops::op_count::add_in_place(1);
    Ok(())
}
