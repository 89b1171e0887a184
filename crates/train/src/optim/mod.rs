//! Optimizers with parameter groups, gradient accumulation and clipping.
//!
//! Five optimizers share one interface, [`Optimizer`]:
//!
//! - [`AdamW`] (`adamw`, the default): PyTorch's `torch.optim.AdamW`, with a
//!   fused in-place CPU kernel.
//! - [`AdamW8bit`] (`adamw8bit`): AdamW whose two moments are stored as 8-bit
//!   codes of bitsandbytes' dynamic quantisation map, one absolute maximum per
//!   block of 256 values — about 2 bytes of state per parameter instead of 8.
//! - [`Prodigy`] (`prodigy`): Adam that estimates its own step size `d`
//!   (Mishchenko & Defazio; the `prodigyopt` package): the learning rate is a
//!   multiplier of `d`, usually 1.
//! - [`Adafactor`] (`adafactor`): factored second moments (a row and a column
//!   vector per matrix), with a fixed learning rate or the relative step
//!   (`transformers.optimization.Adafactor`).
//! - [`Lion`] (`lion`): the sign of an interpolated momentum (Chen et al.;
//!   `lion-pytorch`), one moment, usually 3–10× smaller learning rates.
//!
//! The four besides AdamW compute on the host in f32: LoRA parameters are a
//! few million values, so a step costs milliseconds even when the model runs
//! on a GPU (the parameters and gradients are copied over and back). Every
//! optimizer leaves a parameter without a gradient untouched, saves its state
//! as named tensors, and resumes bit for bit.

use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod adafactor;
mod adamw;
mod adamw8bit;
mod host;
mod lion;
mod prodigy;
pub mod quant8;

pub use adafactor::{Adafactor, AdafactorConfig};
pub use adamw::{AdamW, AdamWConfig};
pub(crate) use adamw::{Hyper, ParamState};
pub use adamw8bit::AdamW8bit;
pub use lion::{Lion, LionConfig};
pub use prodigy::{Prodigy, ProdigyConfig};

use crate::adamw_cpu as fused;

/// Which optimizer trains the LoRA (`train.optimizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// AdamW (PyTorch's): 8 bytes of state per trained parameter.
    #[default]
    Adamw,
    /// AdamW with both moments block-wise quantised to 8 bits (bitsandbytes'
    /// dynamic map, blocks of 256): about 2 bytes of state per parameter;
    /// tensors under 4096 values keep f32 moments, as bitsandbytes does.
    Adamw8bit,
    /// Prodigy: finds its own step size; set the learning rates to 1.0 (the
    /// same for every trained part). 16 bytes of state per parameter.
    Prodigy,
    /// Adafactor: factored second moments (a few bytes per row and column),
    /// fixed learning rate, or relative step with
    /// `train.adafactor_relative_step`.
    Adafactor,
    /// Lion: sign updates from one momentum (4 bytes per parameter); use a
    /// learning rate 3–10× smaller than AdamW's.
    Lion,
}

impl OptimizerKind {
    /// The name people write in prose: `AdamW`, `AdamW8bit`, `Prodigy`, …
    pub fn display_name(self) -> &'static str {
        match self {
            OptimizerKind::Adamw => "AdamW",
            OptimizerKind::Adamw8bit => "AdamW8bit",
            OptimizerKind::Prodigy => "Prodigy",
            OptimizerKind::Adafactor => "Adafactor",
            OptimizerKind::Lion => "Lion",
        }
    }

    /// The name as written in configs and metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            OptimizerKind::Adamw => "adamw",
            OptimizerKind::Adamw8bit => "adamw8bit",
            OptimizerKind::Prodigy => "prodigy",
            OptimizerKind::Adafactor => "adafactor",
            OptimizerKind::Lion => "lion",
        }
    }
}

/// An optimizer and its hyper-parameters, ready to build over parameter groups.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerSpec {
    /// [`AdamW`].
    AdamW(AdamWConfig),
    /// [`AdamW8bit`] (same hyper-parameters as AdamW).
    AdamW8bit(AdamWConfig),
    /// [`Prodigy`].
    Prodigy(ProdigyConfig),
    /// [`Adafactor`].
    Adafactor(AdafactorConfig),
    /// [`Lion`].
    Lion(LionConfig),
}

impl OptimizerSpec {
    /// Builds the optimizer over `groups` (see each optimizer's `new` for the
    /// checks made).
    pub fn build(&self, groups: Vec<ParamGroup>) -> Result<Box<dyn Optimizer>> {
        Ok(match *self {
            OptimizerSpec::AdamW(c) => Box::new(AdamW::new(groups, c)?),
            OptimizerSpec::AdamW8bit(c) => Box::new(AdamW8bit::new(groups, c)?),
            OptimizerSpec::Prodigy(c) => Box::new(Prodigy::new(groups, c)?),
            OptimizerSpec::Adafactor(c) => Box::new(Adafactor::new(groups, c)?),
            OptimizerSpec::Lion(c) => Box::new(Lion::new(groups, c)?),
        })
    }

    /// Bytes of optimizer state for one parameter tensor of shape `dims` (for
    /// memory estimates before anything is built).
    pub fn state_bytes(&self, dims: &[usize]) -> u64 {
        let n: usize = dims.iter().product();
        let n = n as u64;
        match self {
            OptimizerSpec::AdamW(_) => 8 * n,
            OptimizerSpec::AdamW8bit(_) => adamw8bit::state_bytes(n),
            // exp_avg, exp_avg_sq, s and the initial values p0.
            OptimizerSpec::Prodigy(c) => 4 * n * if c.beta1 > 0.0 { 4 } else { 3 },
            OptimizerSpec::Adafactor(c) => adafactor::state_bytes(c, dims),
            OptimizerSpec::Lion(_) => 4 * n,
        }
    }
}

/// What the training loop needs of an optimizer.
pub trait Optimizer: std::fmt::Debug {
    /// One update on the gradients multiplied by `grad_scale` (the clipping
    /// coefficient of [`clip_coefficient`]). `grads[g][i]` is the gradient of
    /// `groups()[g].vars[i]`; None leaves that parameter (and its state) as it
    /// is. `lr_factor` multiplies every group's base learning rate.
    ///
    /// Gradients are not checked for NaN/inf here: check [`grad_norm`] first
    /// and skip the step if it is not finite, or the state is poisoned.
    fn step_scaled(
        &mut self,
        grads: &[Vec<Option<Tensor>>],
        lr_factor: f64,
        grad_scale: f64,
    ) -> Result<()>;

    /// [`step_scaled`](Self::step_scaled) without clipping.
    fn step(&mut self, grads: &[Vec<Option<Tensor>>], lr_factor: f64) -> Result<()> {
        self.step_scaled(grads, lr_factor, 1.0)
    }

    /// The parameter groups, with their base learning rates.
    fn groups(&self) -> &[ParamGroup];

    /// Named tensors that [`load_state_tensors`](Self::load_state_tensors)
    /// restores exactly; keys start with the group name and the parameter's
    /// index (`unet.3.exp_avg`), optimizer-wide values with `optimizer.`.
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>>;

    /// Restores what [`state_tensors`](Self::state_tensors) saved, for an
    /// optimizer of the same kind over the same groups. A missing key or a
    /// shape mismatch is an error naming the key, and leaves the optimizer
    /// unchanged.
    fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()>;

    /// The factor the learning rate is multiplied by inside the optimizer
    /// (Prodigy's `d`; 1 for the others), for logs: the effective step size
    /// is `lr × factor`.
    fn lr_multiplier(&self) -> f64 {
        1.0
    }
}

/// Key of value `what` of parameter `i` of group `group` in saved state.
pub(crate) fn state_key(group: &str, i: usize, what: &str) -> String {
    format!("{group}.{i}.{what}")
}

/// Checks what every optimizer requires of its groups: unique names, each Var
/// once, float Vars, finite non-negative learning rates and weight decays.
/// `who` names the optimizer in the messages.
pub(crate) fn check_groups(who: &str, groups: &[ParamGroup]) -> Result<()> {
    let mut names = HashSet::new();
    let mut ids = HashSet::new();
    for group in groups {
        if !names.insert(group.name.as_str()) {
            candle_core::bail!("{who}: parameter group name {:?} is used twice", group.name);
        }
        if !group.lr.is_finite() || group.lr < 0.0 {
            candle_core::bail!(
                "{who}: learning rate of group {:?} must be finite and ≥ 0, got {}",
                group.name,
                group.lr
            );
        }
        if !group.weight_decay.is_finite() || group.weight_decay < 0.0 {
            candle_core::bail!(
                "{who}: weight decay of group {:?} must be finite and ≥ 0, got {}",
                group.name,
                group.weight_decay
            );
        }
        for (i, var) in group.vars.iter().enumerate() {
            if !ids.insert(var.id()) {
                candle_core::bail!(
                    "{who}: parameter {i} of group {:?} is listed twice; each Var may appear once",
                    group.name
                );
            }
            if !var.dtype().is_float() {
                candle_core::bail!(
                    "{who}: parameter {i} of group {:?} has dtype {:?}; only float parameters can be trained",
                    group.name,
                    var.dtype()
                );
            }
        }
    }
    Ok(())
}

/// Checks that `grads` has one entry per Var of each group, each of its Var's
/// shape.
pub(crate) fn check_grads_layout(
    who: &str,
    groups: &[ParamGroup],
    grads: &[Vec<Option<Tensor>>],
) -> Result<()> {
    if grads.len() != groups.len() {
        candle_core::bail!(
            "{who}: got gradients for {} parameter groups, the optimizer has {}",
            grads.len(),
            groups.len()
        );
    }
    for (group, g) in groups.iter().zip(grads) {
        if g.len() != group.vars.len() {
            candle_core::bail!(
                "{who}: parameter group {:?} has {} parameters but {} gradient slots were given",
                group.name,
                group.vars.len(),
                g.len()
            );
        }
        for (i, (var, grad)) in group.vars.iter().zip(g).enumerate() {
            if let Some(grad) = grad
                && grad.dims() != var.dims()
            {
                candle_core::bail!(
                    "{who}: gradient of parameter {i} of group {:?} has shape {:?}, the parameter {:?}",
                    group.name,
                    grad.dims(),
                    var.dims()
                );
            }
        }
    }
    Ok(())
}

/// A set of parameters sharing a learning rate and weight decay.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// Name used in error messages and state keys (e.g. `unet`, `text_encoder`);
    /// unique within an optimizer.
    pub name: String,
    /// The trained parameters.
    pub vars: Vec<Var>,
    /// Base learning rate (multiplied by the schedule's factor at each step).
    pub lr: f64,
    /// Decoupled weight decay coefficient (0 = none).
    pub weight_decay: f64,
}

/// The multiplier that brings the global gradient norm `norm` down to
/// `max_norm` (PyTorch's `clip_grad_norm_`: `max_norm / (norm + 1e-6)`), or 1
/// when it is already below, clipping is off (`max_norm ≤ 0`) or the norm is
/// not finite.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm.is_finite() {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}

/// Gradient accumulation over micro-batches for a list of groups of Vars:
/// [`add`](Self::add) sums each Var's gradient (cast to f32),
/// [`take`](Self::take) returns the sums divided by the number of adds (so the
/// result is the gradient of the mean micro-batch loss) and resets.
#[derive(Debug)]
pub struct GradAccumulator {
    vars: Vec<Vec<Var>>,
    sums: Vec<Vec<Option<Tensor>>>,
    count: usize,
}

impl GradAccumulator {
    /// An empty accumulator for the Vars of `groups`, in their order.
    pub fn new(groups: &[ParamGroup]) -> Self {
        GradAccumulator {
            vars: groups.iter().map(|g| g.vars.clone()).collect(),
            sums: groups.iter().map(|g| vec![None; g.vars.len()]).collect(),
            count: 0,
        }
    }

    /// Adds one micro-batch's gradients. A Var absent from `grads` counts as a
    /// zero gradient for this micro-batch.
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        for (vars, sums) in self.vars.iter().zip(&mut self.sums) {
            for (var, sum) in vars.iter().zip(sums.iter_mut()) {
                let Some(g) = grads.get(var.as_tensor()) else {
                    continue;
                };
                let g = g.to_dtype(DType::F32)?;
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    // Detach the first one, so the sum holds no graph.
                    None => g.detach(),
                });
            }
        }
        self.count += 1;
        Ok(())
    }

    /// Number of micro-batches added since the last [`take`](Self::take).
    pub fn count(&self) -> usize {
        self.count
    }

    /// The mean gradients (`[g][i]` for `groups[g].vars[i]`; None where no
    /// micro-batch gave one), and resets the accumulator.
    pub fn take(&mut self) -> Vec<Vec<Option<Tensor>>> {
        let n = self.count.max(1) as f64;
        self.count = 0;
        self.sums
            .iter_mut()
            .map(|sums| {
                sums.iter_mut()
                    .map(|s| {
                        s.take().map(|s| {
                            if n == 1.0 {
                                s
                            } else {
                                // Division by a scalar only fails on a device error,
                                // which the next op would report anyway; keep the sum
                                // rather than lose the gradient.
                                (&s / n).unwrap_or(s)
                            }
                        })
                    })
                    .collect()
            })
            .collect()
    }
}

/// Global L2 norm over all gradients (f64). NaN or infinite if any gradient
/// element is non-finite, so this doubles as the all-finite check.
pub fn grad_norm(grads: &[Vec<Option<Tensor>>]) -> Result<f64> {
    let mut sum = 0.0f64;
    for g in grads.iter().flatten().flatten() {
        if let Some(s) = fused::sum_squares(g) {
            sum += s;
            continue;
        }
        // Square and sum in f32 on the device (f64 is missing on some
        // backends); accumulate the per-tensor sums in f64.
        let s = g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        sum += s as f64;
    }
    Ok(sum.sqrt())
}

/// Scales the gradients in place so that their global norm is at most
/// `max_norm`, and returns the norm before clipping. Like PyTorch's
/// `clip_grad_norm_`, the scale is `max_norm / (norm + 1e-6)`. Gradients are
/// left alone when the norm is not finite (the caller should skip the step) or
/// when `max_norm ≤ 0` (clipping off).
pub fn clip_grad_norm(grads: &mut [Vec<Option<Tensor>>], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    let coef = clip_coefficient(norm, max_norm);
    if coef < 1.0 {
        for t in grads.iter_mut().flatten().flatten() {
            *t = (&*t * coef)?;
        }
    }
    Ok(norm)
}
