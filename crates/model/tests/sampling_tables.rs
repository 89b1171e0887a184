//! Sampler tables and behaviour: timesteps, sigmas and initial noise scale
//! equal diffusers' (tests/fixtures/sampling/tables.json), v-prediction steps
//! are consistent, Euler ancestral is reproducible for a seed, and bad
//! arguments are refused with messages that say what to do.

use candle_core::{Device, Tensor};
use sd_lora_model::sampling::{NormalRng, Sampler, SamplerConfig, SamplerKind, Spacing};
use sd_lora_model::schedule::{NoiseSchedule, Prediction, ScheduleConfig};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn config(model: &str) -> SamplerConfig {
    let p = fixtures()
        .join(model)
        .join("scheduler/scheduler_config.json");
    SamplerConfig::from_json_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "got {got:?}, want {want:?}");
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(1e-3))
        .fold(0.0, f64::max)
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn tables_match_diffusers() {
    let text = std::fs::read_to_string(fixtures().join("sampling/tables.json")).unwrap();
    let tables: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut worst = 0.0f64;
    for model in ["sd1_tiny", "sd2_tiny"] {
        let cfg = config(model);
        for kind in SamplerKind::ALL {
            for n in [5, 20] {
                let key = format!("{model}/{}/{n}", kind.name());
                let want = &tables[&key];
                let s = Sampler::new(kind, &cfg, n).unwrap();
                let e = rel_err(s.timesteps(), &floats(&want["timesteps"]));
                assert!(e < 1e-5, "{key} timesteps {:?} (err {e})", s.timesteps());
                worst = worst.max(e);
                if let Some(sig) = want.get("sigmas") {
                    let e = rel_err(s.sigmas(), &floats(sig));
                    assert!(e < 1e-5, "{key} sigmas {:?} (err {e})", s.sigmas());
                    worst = worst.max(e);
                }
                let w = want["init_noise_sigma"].as_f64().unwrap();
                let e = (s.init_noise_sigma() - w).abs() / w;
                assert!(e < 1e-5, "{key} init_noise_sigma {}", s.init_noise_sigma());
                worst = worst.max(e);
            }
        }
    }
    eprintln!("worst table relative error: {worst:.2e}");
}

#[test]
fn other_spacings_are_sane() {
    for spacing in [Spacing::Linspace, Spacing::Trailing] {
        let mut cfg = config("sd1_tiny");
        cfg.timestep_spacing = spacing;
        for kind in SamplerKind::ALL {
            let s = Sampler::new(kind, &cfg, 10).unwrap();
            let t = s.timesteps();
            assert_eq!(t.len(), 10);
            assert!(
                t.windows(2).all(|w| w[0] >= w[1]),
                "{kind} {spacing:?} {t:?}"
            );
            assert!(t.iter().all(|&x| (0.0..1000.0).contains(&x)), "{t:?}");
        }
    }
    // Known values: trailing DDIM with 4 steps is 999, 749, 499, 249.
    let mut cfg = config("sd1_tiny");
    cfg.timestep_spacing = Spacing::Trailing;
    let s = Sampler::new(SamplerKind::Ddim, &cfg, 4).unwrap();
    assert_eq!(s.timesteps(), &[999.0, 749.0, 499.0, 249.0]);
}

/// A model that knows x₀ (here 0.5 everywhere) and predicts it exactly
/// must lead every deterministic sampler to x₀, for ε and v prediction.
#[test]
fn perfect_model_reaches_x0() {
    let dev = Device::Cpu;
    for model in ["sd1_tiny", "sd2_tiny"] {
        let mut cfg = config(model);
        // So that DDIM's last step lands on x₀ rather than on ᾱ₀'s noise level.
        cfg.set_alpha_to_one = true;
        let pred = cfg.prediction();
        assert_eq!(
            pred,
            if model == "sd2_tiny" {
                Prediction::V
            } else {
                Prediction::Epsilon
            }
        );
        let ac = cfg.schedule.alphas_cumprod.clone();
        for kind in SamplerKind::ALL {
            let mut s = Sampler::new(kind, &cfg, 8).unwrap();
            let x0 = Tensor::full(0.5f32, (1, 4, 8, 8), &dev).unwrap();
            let noise = NormalRng::new(3).randn((1, 4, 8, 8), &dev).unwrap();
            let mut rng = NormalRng::new(1);
            let sigmas = s.sigmas().to_vec();
            let is_k = !sigmas.is_empty();
            let mut step = 0usize;
            let out = sd_lora_model::sampling::sample(
                &mut s,
                &noise,
                |input, t| {
                    // Every sampler's model input is √ᾱ x₀ + √(1−ᾱ) ε, with
                    // ᾱ = 1/(σ²+1) for the sigma-based ones.
                    let a = if is_k {
                        let sg = sigmas[step];
                        1.0 / (sg * sg + 1.0)
                    } else {
                        ac[t as usize]
                    };
                    let x = input.clone();
                    step += 1;
                    let e = ((&x - (&x0 * a.sqrt())?)? / (1.0 - a).sqrt())?;
                    match pred {
                        Prediction::Epsilon => Ok(e),
                        Prediction::V => (e * a.sqrt())? - (&x0 * (1.0 - a).sqrt())?,
                    }
                },
                &mut rng,
            )
            .unwrap();
            let err = (out - &x0)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < 1e-3, "{model} {kind}: |x − x₀| = {err}");
        }
    }
}

#[test]
fn euler_ancestral_is_deterministic_for_a_seed() {
    let dev = Device::Cpu;
    let cfg = config("sd1_tiny");
    let run = |seed: u64| {
        let mut s = Sampler::new(SamplerKind::EulerAncestral, &cfg, 6).unwrap();
        let noise = NormalRng::new(7).randn((1, 4, 8, 8), &dev).unwrap();
        let mut rng = NormalRng::new(seed);
        sd_lora_model::sampling::sample(&mut s, &noise, |x, _| x.affine(0.1, 0.0), &mut rng)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(run(42), run(42));
    assert_ne!(run(42), run(43));
}

#[test]
fn normal_rng_is_standard_normal() {
    let mut r = NormalRng::new(0);
    let v: Vec<f64> = (0..20000).map(|_| r.next_normal()).collect();
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / v.len() as f64;
    assert!(mean.abs() < 0.03, "mean {mean}");
    assert!((var - 1.0).abs() < 0.05, "variance {var}");
}

#[test]
fn names_parse_both_ways() {
    for kind in SamplerKind::ALL {
        assert_eq!(kind.name().parse::<SamplerKind>().unwrap(), kind);
        assert_eq!(kind.a1111_name().parse::<SamplerKind>().unwrap(), kind);
    }
    assert_eq!("Euler a".parse::<SamplerKind>().unwrap().name(), "euler_a");
    assert_eq!(SamplerKind::DpmPp2mKarras.a1111_name(), "DPM++ 2M Karras");
}

#[test]
fn bad_inputs_are_refused() {
    let err = "plms".parse::<SamplerKind>().unwrap_err().to_string();
    assert!(err.contains("plms") && err.contains("euler_a"), "{err}");
    let cfg = config("sd1_tiny");
    let err = Sampler::new(SamplerKind::Euler, &cfg, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("0 sampling steps"), "{err}");
    assert!(Sampler::new(SamplerKind::Ddim, &cfg, 1001).is_err());
    let err = SamplerConfig::from_json_str(r#"{"timestep_spacing": "weird"}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("weird"), "{err}");
    let mut s = Sampler::new(SamplerKind::Ddim, &cfg, 2).unwrap();
    let x = Tensor::zeros((1, 4, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(s.step(&x, 2, &x, &mut NormalRng::new(0)).is_err());
    let y = Tensor::zeros((1, 4, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(s.step(&y, 0, &x, &mut NormalRng::new(0)).is_err());
    let err = SamplerConfig::from_file("/nonexistent/scheduler_config.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/scheduler_config.json"), "{err}");
    assert_eq!(
        cfg.timesteps(SamplerKind::Ddim, 5).unwrap(),
        [801.0, 601.0, 401.0, 201.0, 1.0]
    );
    assert_eq!(cfg.sigmas(SamplerKind::Euler, 5).unwrap().len(), 6);
    assert!(cfg.sigmas(SamplerKind::Ddim, 5).unwrap().is_empty());
    // Defaults for single-file checkpoints.
    let sd = SamplerConfig::sd_default(NoiseSchedule::new(&ScheduleConfig::default()).unwrap());
    assert_eq!(
        Sampler::new(SamplerKind::Ddim, &sd, 5).unwrap().timesteps(),
        &[801.0, 601.0, 401.0, 201.0, 1.0]
    );
}
