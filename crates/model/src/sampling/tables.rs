//! Timestep and sigma tables, as diffusers' `set_timesteps` builds them.
//!
//! Each diffusers scheduler spaces its timesteps a little differently (DDIM
//! and Euler divide the train steps by `n`, DPM-Solver by `n + 1`; Euler
//! keeps fractional `linspace` timesteps, the others round them), and images
//! only reproduce when these tables match exactly, so each rule is copied
//! as is.

use super::{SamplerConfig, Spacing};

/// k-diffusion sigma σ_t = √((1 − ᾱ_t)/ᾱ_t) for every training timestep.
///
/// ᾱ is rounded to f32 first, as diffusers and k-diffusion hold it: near
/// t = 0, 1 − ᾱ cancels and the f32 rounding moves σ_min by ~1e-5 relative,
/// which Karras sigmas carry into every step.
pub fn train_sigmas(config: &SamplerConfig) -> Vec<f64> {
    config
        .schedule
        .alphas_cumprod
        .iter()
        .map(|&a| {
            let a = a as f32 as f64;
            ((1.0 - a) / a).sqrt()
        })
        .collect()
}

/// DDIM / Euler spacing: `n` timesteps, largest first.
pub fn spaced_timesteps(config: &SamplerConfig, n: usize, round_linspace: bool) -> Vec<f64> {
    let train = config.num_train_timesteps() as f64;
    match config.timestep_spacing {
        Spacing::Linspace => {
            let mut t = linspace(0.0, train - 1.0, n);
            if round_linspace {
                t.iter_mut().for_each(|v| *v = round_half_even(*v));
            }
            t.reverse();
            t
        }
        Spacing::Leading => {
            let ratio = (config.num_train_timesteps() / n) as f64;
            (0..n)
                .rev()
                .map(|i| (i as f64 * ratio).round() + config.steps_offset as f64)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = train / n as f64;
            arange_down(train, ratio)
                .into_iter()
                .map(|v| round_half_even(v) - 1.0)
                .collect()
        }
    }
}

/// DPM-Solver spacing: `n + 1` points with the last dropped.
pub fn dpm_timesteps(config: &SamplerConfig, n: usize) -> Vec<f64> {
    let last = config.num_train_timesteps();
    match config.timestep_spacing {
        Spacing::Linspace => {
            let mut t: Vec<f64> = linspace(0.0, last as f64 - 1.0, n + 1)
                .into_iter()
                .map(round_half_even)
                .collect();
            t.reverse();
            t.truncate(n);
            t
        }
        Spacing::Leading => {
            let ratio = (last / (n + 1)) as f64;
            (1..=n)
                .rev()
                .map(|i| (i as f64 * ratio).round() + config.steps_offset as f64)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = last as f64 / n as f64;
            arange_down(last as f64, ratio)
                .into_iter()
                .map(|v| round_half_even(v) - 1.0)
                .collect()
        }
    }
}

/// σ at (possibly fractional) timesteps by linear interpolation (`np.interp`).
pub fn interp_sigmas(train: &[f64], timesteps: &[f64]) -> Vec<f64> {
    timesteps
        .iter()
        .map(|&t| {
            let t = t.clamp(0.0, (train.len() - 1) as f64);
            let lo = t.floor() as usize;
            let hi = (lo + 1).min(train.len() - 1);
            let w = t - lo as f64;
            train[lo] * (1.0 - w) + train[hi] * w
        })
        .collect()
}

/// Karras et al. (2022) ρ = 7 sigmas between the schedule's extremes.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// The fractional timestep whose σ is `sigma` (diffusers `_sigma_to_t`:
/// interpolation in log σ).
pub fn sigma_to_t(sigma: f64, train: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let logs: Vec<f64> = train.iter().map(|s| s.ln()).collect();
    let count = logs.iter().filter(|&&l| log_sigma - l >= 0.0).count();
    let lo = count.saturating_sub(1).min(logs.len() - 2);
    let hi = lo + 1;
    let w = ((logs[lo] - log_sigma) / (logs[lo] - logs[hi])).clamp(0.0, 1.0);
    (1.0 - w) * lo as f64 + w * hi as f64
}

fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![a];
    }
    (0..n)
        .map(|i| a + (b - a) * i as f64 / (n - 1) as f64)
        .collect()
}

/// `np.arange(start, 0, -step)`.
fn arange_down(start: f64, step: f64) -> Vec<f64> {
    let count = (start / step).ceil() as usize;
    (0..count).map(|i| start - i as f64 * step).collect()
}

/// numpy rounds halves to even.
fn round_half_even(v: f64) -> f64 {
    let r = v.round();
    if (v - v.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - v.signum()
    } else {
        r
    }
}
