//! Adafactor (Shazeer & Stern 2018), as `transformers.optimization.Adafactor`
//! computes it — the implementation kohya and OneTrainer use.
//!
//! For a tensor of two or more dimensions the second moment is factored over
//! its last two: a running mean of `g² + ε₁` per row and per column, whose
//! outer product (normalised by the rows' mean) stands in for the full
//! matrix. (A conv LoRA's `[r, in, 3, 3]` down weight is thus factored over its
//! 3×3 kernel, as in `transformers`.) One-dimensional tensors keep the full
//! second moment. Each step:
//!
//! ```text
//! ρ   = lr · (max(ε₂, RMS(p)) if scale_parameter else 1)
//!       lr = min(10⁻², 1/√t) (or min(10⁻⁶·t, 1/√t) with warmup_init)
//!            with relative_step, else the configured learning rate
//! β₂ₜ = 1 − t^decay_rate
//! u   = g / √v̂            (v̂ the factored second moment)
//! u  ← u / max(1, RMS(u)/clip_threshold) · ρ
//! m  ← β₁m + (1−β₁)u, u = m   (only with beta1)
//! p  ← p − wd·ρ·p − u
//! ```
//!
//! With `relative_step` the configured learning rates and the schedule are
//! not used, as in `transformers`.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use super::host::{StateIn, StateOut, load_each, save_each, update_each};
use super::{Optimizer, ParamGroup, check_grads_layout, check_groups, state_key};

/// Adafactor's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdafactorConfig {
    /// Step size `min(1e-2, 1/√t)` instead of the learning rate.
    pub relative_step: bool,
    /// Multiply the step size by the parameter's RMS (at least `eps2`).
    pub scale_parameter: bool,
    /// With `relative_step`: grow the step size as `1e-6·t` at first.
    pub warmup_init: bool,
    /// First-moment decay; None = no first moment (Adafactor's default).
    pub beta1: Option<f64>,
    /// Updates whose RMS exceeds this are scaled down to it.
    pub clip_threshold: f64,
    /// Exponent of the second moment's decay `1 − t^decay_rate`.
    pub decay_rate: f64,
    /// Added to the squared gradient.
    pub eps1: f64,
    /// Lower bound of the parameter scale.
    pub eps2: f64,
}

impl Default for AdafactorConfig {
    /// Fixed learning rate, no parameter scaling (what kohya recommends for
    /// LoRA: `scale_parameter=False relative_step=False warmup_init=False`),
    /// and `transformers`' other defaults.
    fn default() -> Self {
        AdafactorConfig {
            relative_step: false,
            scale_parameter: false,
            warmup_init: false,
            beta1: None,
            clip_threshold: 1.0,
            decay_rate: -0.8,
            eps1: 1e-30,
            eps2: 1e-3,
        }
    }
}

/// Bytes of Adafactor state for a tensor of shape `dims`.
pub(crate) fn state_bytes(c: &AdafactorConfig, dims: &[usize]) -> u64 {
    let n: usize = dims.iter().product();
    let second = match factors(dims) {
        Some((b, r, cols)) => b * (r + cols),
        None => n,
    };
    let first = if c.beta1.is_some() { n } else { 0 };
    4 * (second + first) as u64
}

/// `(batch, rows, cols)` of a tensor factored over its last two dimensions,
/// None for tensors of fewer than two.
fn factors(dims: &[usize]) -> Option<(usize, usize, usize)> {
    match dims {
        [lead @ .., r, c] => Some((lead.iter().product(), *r, *c)),
        _ => None,
    }
}

/// One parameter's state.
#[derive(Debug, Clone)]
struct ParamState {
    step: u64,
    /// Factored: per-row and per-column means of `g² + ε₁`.
    row: Vec<f32>,
    col: Vec<f32>,
    /// Unfactored: the full second moment.
    full: Vec<f32>,
    /// First moment (with `beta1`).
    exp_avg: Vec<f32>,
}

/// Adafactor over parameter groups.
#[derive(Debug)]
pub struct Adafactor {
    groups: Vec<ParamGroup>,
    cfg: AdafactorConfig,
    /// `state[g][i]` belongs to `groups[g].vars[i]`.
    state: Vec<Vec<ParamState>>,
}

fn rms(x: &[f32]) -> f64 {
    let s: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    (s / x.len().max(1) as f64).sqrt()
}

impl Adafactor {
    /// Adafactor over `groups` with empty state. Errors on the checks every
    /// optimizer makes and on out-of-range hyper-parameters.
    pub fn new(groups: Vec<ParamGroup>, cfg: AdafactorConfig) -> Result<Self> {
        if cfg.warmup_init && !cfg.relative_step {
            candle_core::bail!("Adafactor: warmup_init needs relative_step");
        }
        if let Some(b) = cfg.beta1
            && !(b.is_finite() && (0.0..1.0).contains(&b))
        {
            candle_core::bail!("Adafactor: beta1 must be in [0, 1), got {b}");
        }
        if !(cfg.clip_threshold.is_finite() && cfg.clip_threshold > 0.0) {
            candle_core::bail!(
                "Adafactor: clip_threshold must be > 0, got {}",
                cfg.clip_threshold
            );
        }
        if !(cfg.decay_rate.is_finite() && cfg.decay_rate < 0.0) {
            candle_core::bail!(
                "Adafactor: decay_rate must be < 0 (−0.8 is usual), got {}",
                cfg.decay_rate
            );
        }
        check_groups("Adafactor", &groups)?;
        let state = groups
            .iter()
            .map(|g| g.vars.iter().map(|v| Self::fresh(&cfg, v.dims())).collect())
            .collect();
        Ok(Adafactor { groups, cfg, state })
    }

    fn fresh(cfg: &AdafactorConfig, dims: &[usize]) -> ParamState {
        let n: usize = dims.iter().product();
        let (row, col, full) = match factors(dims) {
            Some((b, r, c)) => (vec![0.0; b * r], vec![0.0; b * c], Vec::new()),
            None => (Vec::new(), Vec::new(), vec![0.0; n]),
        };
        ParamState {
            step: 0,
            row,
            col,
            full,
            exp_avg: if cfg.beta1.is_some() {
                vec![0.0; n]
            } else {
                Vec::new()
            },
        }
    }
}

/// The update direction `g / √v̂` of a factored tensor, updating the row and
/// column means with `(g² + ε₁)` at decay `beta2t`.
fn factored_update(
    (b, r, c): (usize, usize, usize),
    g: &[f32],
    st: &mut ParamState,
    eps1: f32,
    beta2t: f32,
    one_minus: f32,
) -> Vec<f32> {
    let sq = |x: f32| x * x + eps1;
    for bi in 0..b {
        let m = &g[bi * r * c..(bi + 1) * r * c];
        for ri in 0..r {
            let mean = m[ri * c..(ri + 1) * c]
                .iter()
                .map(|&x| f64::from(sq(x)))
                .sum::<f64>()
                / c as f64;
            let v = &mut st.row[bi * r + ri];
            *v = *v * beta2t + mean as f32 * one_minus;
        }
        for ci in 0..c {
            let mean = (0..r).map(|ri| f64::from(sq(m[ri * c + ci]))).sum::<f64>() / r as f64;
            let v = &mut st.col[bi * c + ci];
            *v = *v * beta2t + mean as f32 * one_minus;
        }
    }
    let mut u = vec![0.0f32; g.len()];
    for bi in 0..b {
        let rows = &st.row[bi * r..(bi + 1) * r];
        let row_mean = (rows.iter().map(|&x| f64::from(x)).sum::<f64>() / r as f64) as f32;
        for (ri, &row) in rows.iter().enumerate() {
            let rf = 1.0 / (row / row_mean).sqrt();
            for ci in 0..c {
                let cf = 1.0 / st.col[bi * c + ci].sqrt();
                let k = bi * r * c + ri * c + ci;
                u[k] = rf * cf * g[k];
            }
        }
    }
    u
}

impl Optimizer for Adafactor {
    fn step_scaled(
        &mut self,
        grads: &[Vec<Option<Tensor>>],
        lr_factor: f64,
        grad_scale: f64,
    ) -> Result<()> {
        check_grads_layout("Adafactor", &self.groups, grads)?;
        let cfg = self.cfg;
        update_each(
            &self.groups,
            &mut self.state,
            grads,
            grad_scale,
            |group, var, st, g, p| {
                st.step += 1;
                let t = st.step as f64;
                let base = if cfg.relative_step {
                    let min_step = if cfg.warmup_init { 1e-6 * t } else { 1e-2 };
                    min_step.min(1.0 / t.sqrt())
                } else {
                    group.lr * lr_factor
                };
                let lr = if cfg.scale_parameter {
                    cfg.eps2.max(rms(p)) * base
                } else {
                    base
                };
                let beta2t = 1.0 - t.powf(cfg.decay_rate);
                let (b2, omb2) = (beta2t as f32, (1.0 - beta2t) as f32);
                let eps1 = cfg.eps1 as f32;
                let mut u = match factors(var.dims()) {
                    Some(f) => factored_update(f, g, st, eps1, b2, omb2),
                    None => {
                        for (v, &x) in st.full.iter_mut().zip(g) {
                            *v = *v * b2 + (x * x + eps1) * omb2;
                        }
                        st.full.iter().zip(g).map(|(&v, &x)| x / v.sqrt()).collect()
                    }
                };
                let clip = (rms(&u) / cfg.clip_threshold).max(1.0) as f32;
                let lr32 = lr as f32;
                u.iter_mut().for_each(|x| *x = *x / clip * lr32);
                if let Some(b1) = cfg.beta1 {
                    let (b1, omb1) = (b1 as f32, (1.0 - b1) as f32);
                    for (m, x) in st.exp_avg.iter_mut().zip(u.iter_mut()) {
                        *m = *m * b1 + *x * omb1;
                        *x = *m;
                    }
                }
                let decay = (-group.weight_decay * lr) as f32;
                for (p, x) in p.iter_mut().zip(&u) {
                    if decay != 0.0 {
                        *p += *p * decay;
                    }
                    *p -= *x;
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
        let first_moment = self.cfg.beta1.is_some();
        save_each(
            &mut out,
            &self.groups,
            &self.state,
            |out, name, i, var, st| {
                out.count(state_key(name, i, "step"), st.step)?;
                match factors(var.dims()) {
                    Some((b, r, c)) => {
                        out.f32(name, i, "exp_avg_sq_row", &st.row, (b, r))?;
                        out.f32(name, i, "exp_avg_sq_col", &st.col, (b, c))?;
                    }
                    None => out.f32(name, i, "exp_avg_sq", &st.full, var.shape())?,
                }
                if first_moment {
                    out.f32(name, i, "exp_avg", &st.exp_avg, var.shape())?;
                }
                Ok(())
            },
        )?;
        Ok(out.0)
    }

    fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        let input = StateIn {
            who: "Adafactor",
            t,
        };
        let cfg = self.cfg;
        self.state = load_each(&self.groups, |name, i, var| {
            let mut st = Self::fresh(&cfg, var.dims());
            st.step = input.count(&state_key(name, i, "step"))?;
            match factors(var.dims()) {
                Some((b, r, c)) => {
                    st.row = input.f32(name, i, "exp_avg_sq_row", b * r)?;
                    st.col = input.f32(name, i, "exp_avg_sq_col", b * c)?;
                }
                None => st.full = input.f32(name, i, "exp_avg_sq", var.elem_count())?,
            }
            if cfg.beta1.is_some() {
                st.exp_avg = input.f32(name, i, "exp_avg", var.elem_count())?;
            }
            Ok(st)
        })?;
        Ok(())
    }
}
