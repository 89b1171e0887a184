//! Learning-rate schedules: a multiplier of each parameter group's base
//! learning rate, as a function of the optimizer step.
//!
//! The formulas are those of diffusers' `get_scheduler` (which the diffusers
//! and kohya training scripts use), so a config ported from either trains with
//! the same learning rates. Like there, step `s` (0-based) is the factor used by
//! the `s`-th optimizer step, so with warm-up the very first step has factor 0.

use serde::{Deserialize, Serialize};

/// The shape of the learning-rate schedule after warm-up.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduleKind {
    /// The base learning rate throughout (after warm-up, if any; diffusers'
    /// `constant`, or `constant_with_warmup` when warm-up steps are set).
    #[default]
    Constant,
    /// Linear decay from the base learning rate to 0 at the last step.
    Linear,
    /// Half a cosine wave from the base learning rate to 0 at the last step.
    Cosine,
    /// `lr_cycles` cosine decays to 0, each restarting at the base learning rate.
    CosineWithRestarts,
}

/// A learning-rate schedule: a kind, linear warm-up, and the run's length.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Shape after warm-up.
    pub kind: LrScheduleKind,
    /// Steps of linear warm-up from 0 to the base learning rate.
    pub warmup_steps: usize,
    /// Total number of optimizer steps of the run (the decaying kinds reach 0 here).
    pub total_steps: usize,
    /// Number of hard restarts for [`LrScheduleKind::CosineWithRestarts`]; ignored otherwise.
    pub num_cycles: usize,
}

impl LrSchedule {
    /// Multiplier of the base learning rate for optimizer step `step` (0-based).
    pub fn factor(&self, step: usize) -> f64 {
        let (step_f, warmup) = (step as f64, self.warmup_steps as f64);
        if step < self.warmup_steps {
            // diffusers divides by max(1, warmup); warmup > step ≥ 0 here, so it is ≥ 1.
            return step_f / warmup;
        }
        // Fraction of the post-warm-up part done; the max(1, …) is diffusers' guard
        // against a run with no steps after warm-up.
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = (step_f - warmup) / decay_steps;
        match self.kind {
            LrScheduleKind::Constant => 1.0,
            LrScheduleKind::Linear => ((self.total_steps as f64 - step_f) / decay_steps).max(0.0),
            LrScheduleKind::Cosine => {
                // diffusers' default num_cycles = 0.5: half a wave, 1 → 0.
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
            LrScheduleKind::CosineWithRestarts => {
                if progress >= 1.0 {
                    return 0.0;
                }
                let cycles = self.num_cycles as f64;
                let phase = (cycles * progress) % 1.0;
                (0.5 * (1.0 + (std::f64::consts::PI * phase).cos())).max(0.0)
            }
        }
    }
}
