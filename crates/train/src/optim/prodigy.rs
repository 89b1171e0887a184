//! Prodigy (Mishchenko & Defazio 2023, "Prodigy: An Expeditiously Adaptive
//! Parameter-Free Learner"), step for step as the `prodigyopt` package
//! (version 1.1) computes it with decoupled weight decay.
//!
//! Adam whose step size is `d · lr`, where `d` starts at `d0` and grows to an
//! estimate of the distance to the solution:
//!
//! ```text
//! dlr  = d · lr · (√(1−β₂ᵏ⁺¹)/(1−β₁ᵏ⁺¹) with bias correction, else 1)
//! num ← β₃·num + Σ (d/d0)·dlr·⟨g, p0 − p⟩          (p0: each tensor's first values)
//! m   ← β₁m + d(1−β₁)g,   v ← β₂v + d²(1−β₂)g²
//! s   ← β₃s + (d/d0)·dlr·g   (d/d0·d with safeguard_warmup)
//! d̂   = d_coef · num / Σ|s|;  d ← min(max(d_max, d̂), d·growth_rate)
//! p  ← p − wd·dlr·p − dlr · m / (√v + d·ε)
//! ```
//!
//! `d` is one number for all groups, so every group must have the same
//! learning rate (or 0), as `prodigyopt` requires. The statistics `s` and `p0`
//! can be kept for every `slice_p`-th value only (`prodigyopt`'s memory
//! saver); a tensor that starts all zero (a LoRA `up`) keeps no `p0`.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use super::host::{StateIn, StateOut, grad_values, load_each, param_values, save_each, set_param};
use super::{Optimizer, ParamGroup, check_grads_layout, check_groups, state_key};

/// Prodigy's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProdigyConfig {
    /// Decay of the first moment (0 = none).
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Decay of the step-size statistics; None = `√beta2`.
    pub beta3: Option<f64>,
    /// Added to the denominator (times `d`).
    pub eps: f64,
    /// Initial estimate of `d`.
    pub d0: f64,
    /// Multiplier of the estimate: the knob to turn (0.5–2).
    pub d_coef: f64,
    /// Largest factor `d` may grow by per step; None = unbounded.
    pub growth_rate: Option<f64>,
    /// Adam's bias correction in the step size.
    pub use_bias_correction: bool,
    /// Leave the learning rate out of the denominator's statistics (for
    /// runs with warm-up).
    pub safeguard_warmup: bool,
    /// Keep the statistics for every `slice_p`-th value (1 = all).
    pub slice_p: usize,
}

impl Default for ProdigyConfig {
    /// `prodigyopt`'s defaults.
    fn default() -> Self {
        ProdigyConfig {
            beta1: 0.9,
            beta2: 0.999,
            beta3: None,
            eps: 1e-8,
            d0: 1e-6,
            d_coef: 1.0,
            growth_rate: None,
            use_bias_correction: false,
            safeguard_warmup: false,
            slice_p: 1,
        }
    }
}

/// One parameter's state; empty until its first gradient.
#[derive(Debug, Clone, Default)]
struct ParamState {
    initialised: bool,
    step: u64,
    s: Vec<f32>,
    /// The parameter's first values (every `slice_p`-th); None when they were
    /// all zero.
    p0: Option<Vec<f32>>,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
}

/// Prodigy over parameter groups.
#[derive(Debug)]
pub struct Prodigy {
    groups: Vec<ParamGroup>,
    cfg: ProdigyConfig,
    state: Vec<Vec<ParamState>>,
    d: f64,
    d_max: f64,
    d_numerator: f64,
    /// Steps taken (the `k` of the bias correction).
    k: u64,
}

/// Key of an optimizer-wide value.
fn global_key(what: &str) -> String {
    format!("optimizer.prodigy.{what}")
}

impl Prodigy {
    /// Prodigy over `groups`, `d = d0`. Errors on the checks every optimizer
    /// makes, on out-of-range hyper-parameters, and when two groups have
    /// different non-zero learning rates.
    pub fn new(groups: Vec<ParamGroup>, cfg: ProdigyConfig) -> Result<Self> {
        for (k, b) in [("beta1", cfg.beta1), ("beta2", cfg.beta2)] {
            if !(b.is_finite() && (0.0..1.0).contains(&b)) {
                candle_core::bail!("Prodigy: {k} must be in [0, 1), got {b}");
            }
        }
        if let Some(b) = cfg.beta3
            && !(b.is_finite() && (0.0..1.0).contains(&b))
        {
            candle_core::bail!("Prodigy: beta3 must be in [0, 1), got {b}");
        }
        for (k, x) in [("eps", cfg.eps), ("d0", cfg.d0), ("d_coef", cfg.d_coef)] {
            if !(x.is_finite() && x > 0.0) {
                candle_core::bail!("Prodigy: {k} must be > 0, got {x}");
            }
        }
        if let Some(g) = cfg.growth_rate
            && (g.is_nan() || g < 1.0)
        {
            candle_core::bail!("Prodigy: growth_rate must be ≥ 1, got {g}");
        }
        if cfg.slice_p == 0 {
            candle_core::bail!("Prodigy: slice_p must be at least 1");
        }
        check_groups("Prodigy", &groups)?;
        let lrs: Vec<&ParamGroup> = groups.iter().filter(|g| g.lr != 0.0).collect();
        if let Some(first) = lrs.first()
            && let Some(other) = lrs.iter().find(|g| g.lr != first.lr)
        {
            candle_core::bail!(
                "Prodigy: every trained part needs the same learning rate (it multiplies one step size \
                 d), but {} has {} and {} has {}; set them equal (1.0 is usual)",
                first.name,
                first.lr,
                other.name,
                other.lr
            );
        }
        let state = groups
            .iter()
            .map(|g| vec![ParamState::default(); g.vars.len()])
            .collect();
        Ok(Prodigy {
            groups,
            cfg,
            state,
            d: cfg.d0,
            d_max: cfg.d0,
            d_numerator: 0.0,
            k: 0,
        })
    }
}

/// A parameter's gradient and values on the host, between the two passes.
type HostValues = (Vec<f32>, Vec<f32>);

/// Every `slice_p`-th value.
fn sliced(x: &[f32], slice_p: usize) -> impl Iterator<Item = &f32> {
    x.iter().step_by(slice_p)
}

impl Optimizer for Prodigy {
    fn step_scaled(
        &mut self,
        grads: &[Vec<Option<Tensor>>],
        lr_factor: f64,
        grad_scale: f64,
    ) -> Result<()> {
        check_grads_layout("Prodigy", &self.groups, grads)?;
        let c = self.cfg;
        let beta3 = c.beta3.unwrap_or_else(|| c.beta2.sqrt());
        let lr = self
            .groups
            .iter()
            .map(|g| g.lr * lr_factor)
            .fold(0.0, f64::max);
        let bias_correction = if c.use_bias_correction {
            let k1 = (self.k + 1).min(i32::MAX as u64) as i32;
            (1.0 - c.beta2.powi(k1)).sqrt() / (1.0 - c.beta1.powi(k1))
        } else {
            1.0
        };
        let d = self.d;
        let dlr = d * lr * bias_correction;
        let d_numerator = self.d_numerator * beta3;
        let mut delta_numerator = 0.0f64;
        let mut d_denom = 0.0f64;

        // Pass 1: moments and the statistics of d.
        let mut host: Vec<Vec<Option<HostValues>>> = Vec::new();
        for ((group, gstate), ggrads) in self.groups.iter().zip(&mut self.state).zip(grads) {
            let group_lr = group.lr * lr_factor;
            let mut hg = Vec::with_capacity(group.vars.len());
            for ((var, st), grad) in group.vars.iter().zip(gstate.iter_mut()).zip(ggrads) {
                let Some(grad) = grad else {
                    hg.push(None);
                    continue;
                };
                let g = grad_values(grad, grad_scale)?;
                let p = param_values(var)?;
                if !st.initialised {
                    let n_sliced = p.len().div_ceil(c.slice_p);
                    st.initialised = true;
                    st.s = vec![0.0; n_sliced];
                    st.p0 = p
                        .iter()
                        .any(|&x| x != 0.0)
                        .then(|| sliced(&p, c.slice_p).copied().collect());
                    st.exp_avg = if c.beta1 > 0.0 {
                        vec![0.0; p.len()]
                    } else {
                        Vec::new()
                    };
                    st.exp_avg_sq = vec![0.0; p.len()];
                }
                if group_lr > 0.0 {
                    let dot: f64 = match &st.p0 {
                        Some(p0) => sliced(&g, c.slice_p)
                            .zip(p0)
                            .zip(sliced(&p, c.slice_p))
                            .map(|((&g, &p0), &p)| f64::from(g) * f64::from(p0 - p))
                            .sum(),
                        None => sliced(&g, c.slice_p)
                            .zip(sliced(&p, c.slice_p))
                            .map(|(&g, &p)| f64::from(g) * f64::from(-p))
                            .sum(),
                    };
                    delta_numerator += (d / c.d0) * dlr * dot;
                    if c.beta1 > 0.0 {
                        let (b1, a) = (c.beta1 as f32, (d * (1.0 - c.beta1)) as f32);
                        for (m, &x) in st.exp_avg.iter_mut().zip(&g) {
                            *m = *m * b1 + x * a;
                        }
                    }
                    let (b2, a) = (c.beta2 as f32, (d * d * (1.0 - c.beta2)) as f32);
                    for (v, &x) in st.exp_avg_sq.iter_mut().zip(&g) {
                        *v = *v * b2 + x * x * a;
                    }
                    let a = if c.safeguard_warmup {
                        (d / c.d0) * d
                    } else {
                        (d / c.d0) * dlr
                    } as f32;
                    let b3 = beta3 as f32;
                    for (s, &x) in st.s.iter_mut().zip(sliced(&g, c.slice_p)) {
                        *s = *s * b3 + x * a;
                    }
                    d_denom += st.s.iter().map(|&s| f64::from(s.abs())).sum::<f64>();
                }
                hg.push(Some((g, p)));
            }
            host.push(hg);
        }
        // No progress possible (no gradient, or all zero): nothing changes,
        // as in prodigyopt.
        if d_denom == 0.0 {
            return Ok(());
        }
        let global_numerator = d_numerator + delta_numerator;
        let mut d = d;
        if lr > 0.0 {
            let d_hat = c.d_coef * global_numerator / d_denom;
            if d == c.d0 {
                d = d.max(d_hat);
            }
            self.d_max = self.d_max.max(d_hat);
            d = self.d_max.min(d * c.growth_rate.unwrap_or(f64::INFINITY));
        }
        self.d = d;
        self.d_numerator = global_numerator;

        // Pass 2: the update.
        for ((group, gstate), hg) in self.groups.iter().zip(&mut self.state).zip(host) {
            let decay = (-group.weight_decay * dlr) as f32;
            for ((var, st), h) in group.vars.iter().zip(gstate.iter_mut()).zip(hg) {
                let Some((g, mut p)) = h else { continue };
                st.step += 1;
                let de = (d * c.eps) as f32;
                if c.beta1 > 0.0 {
                    let step = (-dlr) as f32;
                    for ((p, &m), &v) in p.iter_mut().zip(&st.exp_avg).zip(&st.exp_avg_sq) {
                        if decay != 0.0 {
                            *p += *p * decay;
                        }
                        *p += step * (m / (v.sqrt() + de));
                    }
                } else {
                    let step = (-dlr * d) as f32;
                    for ((p, &x), &v) in p.iter_mut().zip(&g).zip(&st.exp_avg_sq) {
                        if decay != 0.0 {
                            *p += *p * decay;
                        }
                        *p += step * (x / (v.sqrt() + de));
                    }
                }
                set_param(var, p)?;
            }
        }
        self.k += 1;
        Ok(())
    }

    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    fn lr_multiplier(&self) -> f64 {
        self.d
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = StateOut::default();
        out.scalar(global_key("d"), self.d)?;
        out.scalar(global_key("d_max"), self.d_max)?;
        out.scalar(global_key("d_numerator"), self.d_numerator)?;
        out.count(global_key("k"), self.k)?;
        save_each(
            &mut out,
            &self.groups,
            &self.state,
            |out, name, i, var, st| {
                out.count(state_key(name, i, "initialised"), st.initialised.into())?;
                if !st.initialised {
                    return Ok(());
                }
                out.count(state_key(name, i, "step"), st.step)?;
                out.f32(name, i, "s", &st.s, st.s.len())?;
                if let Some(p0) = &st.p0 {
                    out.f32(name, i, "p0", p0, p0.len())?;
                }
                if !st.exp_avg.is_empty() {
                    out.f32(name, i, "exp_avg", &st.exp_avg, var.shape())?;
                }
                out.f32(name, i, "exp_avg_sq", &st.exp_avg_sq, var.shape())
            },
        )?;
        Ok(out.0)
    }

    fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        let input = StateIn { who: "Prodigy", t };
        let d = input.scalar(&global_key("d"))?;
        let d_max = input.scalar(&global_key("d_max"))?;
        let d_numerator = input.scalar(&global_key("d_numerator"))?;
        let k = input.count(&global_key("k"))?;
        let (slice_p, first_moment) = (self.cfg.slice_p, self.cfg.beta1 > 0.0);
        let state = load_each(&self.groups, |name, i, var| {
            let mut st = ParamState::default();
            if input.count(&state_key(name, i, "initialised"))? == 1 {
                let n = var.elem_count();
                st.initialised = true;
                st.step = input.count(&state_key(name, i, "step"))?;
                st.s = input.f32(name, i, "s", n.div_ceil(slice_p))?;
                st.p0 = if input.has(name, i, "p0") {
                    Some(input.f32(name, i, "p0", n.div_ceil(slice_p))?)
                } else {
                    None
                };
                if first_moment {
                    st.exp_avg = input.f32(name, i, "exp_avg", n)?;
                }
                st.exp_avg_sq = input.f32(name, i, "exp_avg_sq", n)?;
            }
            Ok(st)
        })?;
        self.state = state;
        self.d = d;
        self.d_max = d_max;
        self.d_numerator = d_numerator;
        self.k = k;
        Ok(())
    }
}
