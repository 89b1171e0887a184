//! The DDPM noise schedule used for training: betas from the model's
//! `scheduler_config.json`, ᾱ_t, noising, prediction targets and SNR weights.
//!
//! Values are computed in f64 (diffusers computes them in f32; the two agree
//! to ~1e-7 relative, far below anything training can see).

pub use crate::load::Prediction;
use serde::Deserialize;

/// The fields of a diffusers `scheduler_config.json` that define the schedule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ScheduleConfig {
    /// Number of diffusion steps the model was trained with.
    pub num_train_timesteps: usize,
    /// First beta.
    pub beta_start: f64,
    /// Last beta.
    pub beta_end: f64,
    /// `scaled_linear` (SD), `linear` or `squaredcos_cap_v2`.
    pub beta_schedule: String,
    /// Explicit betas, overriding the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// Rescale so the last step has zero SNR (Lin et al. 2023).
    pub rescale_betas_zero_snr: bool,
    /// What the model predicts.
    pub prediction_type: Prediction,
}

impl Default for ScheduleConfig {
    /// Stable Diffusion's schedule: 1000 steps, scaled-linear 0.00085 → 0.012, ε.
    fn default() -> Self {
        ScheduleConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            trained_betas: None,
            rescale_betas_zero_snr: false,
            prediction_type: Prediction::Epsilon,
        }
    }
}

/// A schedule that cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("scheduler config: {0}")]
pub struct ScheduleError(String);

/// ᾱ_t for every training timestep, and what follows from it.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    /// ᾱ_t = Π (1 − β_s), s ≤ t.
    pub alphas_cumprod: Vec<f64>,
    /// What the model predicts.
    pub prediction: Prediction,
}

impl NoiseSchedule {
    /// Builds the schedule described by `cfg`.
    pub fn new(cfg: &ScheduleConfig) -> Result<Self, ScheduleError> {
        let n = cfg.num_train_timesteps;
        if n < 2 {
            return Err(ScheduleError(format!(
                "num_train_timesteps = {n}; it must be at least 2 (SD uses 1000)"
            )));
        }
        let mut betas: Vec<f64> = match (&cfg.trained_betas, cfg.beta_schedule.as_str()) {
            (Some(b), _) => {
                if b.len() != n {
                    return Err(ScheduleError(format!(
                        "trained_betas has {} values but num_train_timesteps = {n}",
                        b.len()
                    )));
                }
                b.clone()
            }
            (None, "linear") => linspace(cfg.beta_start, cfg.beta_end, n),
            (None, "scaled_linear") => linspace(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            (None, "squaredcos_cap_v2") => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
                    })
                    .collect()
            }
            (None, other) => {
                return Err(ScheduleError(format!(
                    "beta_schedule = {other:?} is not supported; use \"scaled_linear\", \"linear\" or \"squaredcos_cap_v2\""
                )));
            }
        };
        if betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(ScheduleError("every beta must be in [0, 1)".into()));
        }
        if cfg.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        Ok(NoiseSchedule {
            alphas_cumprod,
            prediction: cfg.prediction_type,
        })
    }

    /// The same schedule rescaled to zero terminal SNR (Lin et al. 2023,
    /// diffusers' `rescale_betas_zero_snr`; kohya's `--zero_terminal_snr`):
    /// √ᾱ shifted and scaled so that the first step keeps its value and the
    /// last reaches 0. A schedule already at zero terminal SNR is returned
    /// unchanged.
    pub fn with_zero_terminal_snr(&self) -> Self {
        if self.alphas_cumprod.last().is_some_and(|&a| a == 0.0) {
            return self.clone();
        }
        let mut prev = 1.0;
        let betas: Vec<f64> = self
            .alphas_cumprod
            .iter()
            .map(|&a| {
                let b = 1.0 - a / prev;
                prev = a;
                b
            })
            .collect();
        let mut acc = 1.0;
        let alphas_cumprod = rescale_zero_terminal_snr(&betas)
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        NoiseSchedule {
            alphas_cumprod,
            prediction: self.prediction,
        }
    }

    /// Number of training timesteps.
    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Whether the schedule has no steps (never true for a built schedule).
    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// (√ᾱ_t, √(1−ᾱ_t)): the weights of x₀ and ε in x_t.
    pub fn coefficients(&self, t: usize) -> (f64, f64) {
        let a = self.alphas_cumprod[t.min(self.len() - 1)];
        (a.sqrt(), (1.0 - a).sqrt())
    }

    /// Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t).
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t.min(self.len() - 1)];
        a / (1.0 - a)
    }

    /// Min-SNR-γ loss weight (Hang et al. 2023): min(SNR, γ)/SNR for ε
    /// prediction, min(SNR, γ)/(SNR + 1) for v prediction.
    pub fn min_snr_weight(&self, t: usize, gamma: f64) -> f64 {
        let snr = self.snr(t);
        match self.prediction {
            Prediction::Epsilon if snr > 0.0 => snr.min(gamma) / snr,
            Prediction::Epsilon => 1.0,
            Prediction::V => snr.min(gamma) / (snr + 1.0),
        }
    }
}

fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| a + (b - a) * i as f64 / (n - 1) as f64)
        .collect()
}

/// Shifts and scales √ᾱ so that the last step has exactly zero signal while
/// the first keeps its value (Lin et al., "Common Diffusion Noise Schedules
/// and Sample Steps are Flawed", algorithm 1).
fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0;
    let mut sqrt_ab: Vec<f64> = betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc.sqrt()
        })
        .collect();
    let (first, last) = (sqrt_ab[0], sqrt_ab[sqrt_ab.len() - 1]);
    for v in &mut sqrt_ab {
        *v = (*v - last) * first / (first - last);
    }
    let ab: Vec<f64> = sqrt_ab.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(ab.len());
    out.push(1.0 - ab[0]);
    for i in 1..ab.len() {
        out.push(1.0 - ab[i] / ab[i - 1]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_terminal_snr_of_a_built_schedule_equals_the_config_option() {
        let plain = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
        let direct = NoiseSchedule::new(&ScheduleConfig {
            rescale_betas_zero_snr: true,
            ..ScheduleConfig::default()
        })
        .unwrap();
        let later = plain.with_zero_terminal_snr();
        for (a, b) in later.alphas_cumprod.iter().zip(&direct.alphas_cumprod) {
            assert!((a - b).abs() <= 1e-12, "{a} vs {b}");
        }
        assert_eq!(later.alphas_cumprod[999], 0.0);
        assert_eq!(later.with_zero_terminal_snr(), later);
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 2e-6 * b.abs().max(1e-6)
    }

    /// Reference values printed by diffusers' DDPMScheduler (f32).
    #[test]
    fn alphas_cumprod_match_diffusers() {
        let idx = [0, 1, 10, 100, 500, 999];
        let cases: [(&str, bool, [f64; 6]); 3] = [
            (
                "scaled_linear",
                false,
                [
                    0.9991499781608582,
                    0.9982960224151611,
                    0.9904313087463379,
                    0.894223153591156,
                    0.27633246779441833,
                    0.00466009508818388,
                ],
            ),
            (
                "linear",
                false,
                [
                    0.9991499781608582,
                    0.9982895255088806,
                    0.9900811314582825,
                    0.8673442006111145,
                    0.16077162325382233,
                    0.0015789627796038985,
                ],
            ),
            (
                "squaredcos_cap_v2",
                false,
                [
                    0.9999586939811707,
                    0.9999125599861145,
                    0.9992788434028625,
                    0.9715756177902222,
                    0.4922850430011749,
                    2.4287349909002387e-09,
                ],
            ),
        ];
        for (name, zsnr, want) in cases {
            let s = NoiseSchedule::new(&ScheduleConfig {
                beta_schedule: name.into(),
                rescale_betas_zero_snr: zsnr,
                ..Default::default()
            })
            .unwrap();
            for (i, w) in idx.iter().zip(want) {
                let got = s.alphas_cumprod[*i];
                // The cosine tail is tiny; compare it absolutely.
                assert!(
                    close(got, w) || (w < 1e-6 && (got - w).abs() < 1e-8),
                    "{name}[{i}] = {got}, want {w}"
                );
            }
        }
        let z = NoiseSchedule::new(&ScheduleConfig {
            rescale_betas_zero_snr: true,
            ..Default::default()
        })
        .unwrap();
        for (i, w) in [
            (0, 0.9991499781608582),
            (1, 0.9982334971427917),
            (100, 0.8867608904838562),
            (500, 0.24101854860782623),
        ] {
            assert!(
                close(z.alphas_cumprod[i], w),
                "zsnr[{i}] = {}",
                z.alphas_cumprod[i]
            );
        }
        assert!(z.alphas_cumprod[999].abs() < 1e-12);
    }

    #[test]
    fn snr_weights() {
        let eps = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
        // Early steps have high SNR → weight γ/SNR < 1; late steps → 1.
        assert!(eps.min_snr_weight(0, 5.0) < 0.01);
        assert_eq!(eps.min_snr_weight(999, 5.0), 1.0);
        let v = NoiseSchedule::new(&ScheduleConfig {
            prediction_type: Prediction::V,
            ..Default::default()
        })
        .unwrap();
        let t = 999;
        assert!(close(v.min_snr_weight(t, 5.0), v.snr(t) / (v.snr(t) + 1.0)));
        let (a, b) = eps.coefficients(500);
        assert!(close(a * a + b * b, 1.0));
    }

    #[test]
    fn config_from_json_and_bad_values() {
        let cfg: ScheduleConfig = serde_json::from_str(
            r#"{"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "skip_prk_steps": true}"#,
        )
        .unwrap();
        assert_eq!(cfg.prediction_type, Prediction::V);
        assert_eq!(cfg.num_train_timesteps, 1000);
        let bad = ScheduleConfig {
            beta_schedule: "sigmoid".into(),
            ..Default::default()
        };
        assert!(
            NoiseSchedule::new(&bad)
                .unwrap_err()
                .to_string()
                .contains("sigmoid")
        );
    }
}
