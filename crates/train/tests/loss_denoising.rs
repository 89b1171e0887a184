//! Noise, timesteps, noised batches and the weighted denoising loss.

use candle_core::{DType, Device, Tensor, Var};
use sd_lora_data::rng::Rng;
use sd_lora_model::schedule::{NoiseSchedule, Prediction, ScheduleConfig};
use sd_lora_train::loss::{
    HuberSchedule, LossOptions, LossType, NoiseOptions, make_noisy_batch, masked_weighted_loss,
    sample_weights, weighted_loss,
};
use sd_lora_train::noise::{randn, sample_timesteps, sample_timesteps_in, upsample_bilinear};

fn schedule(prediction: Prediction) -> NoiseSchedule {
    NoiseSchedule::new(&ScheduleConfig {
        prediction_type: prediction,
        ..Default::default()
    })
    .unwrap()
}

fn vec_f32(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn randn_is_standard_normal_and_deterministic() {
    let n = 200_000;
    let x = vec_f32(&randn(&[n], &mut Rng::new(7), &Device::Cpu).unwrap());
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    let within_1 = x.iter().filter(|v| v.abs() < 1.0).count() as f64 / n as f64;
    let kurt = x.iter().map(|&v| (v as f64 - mean).powi(4)).sum::<f64>() / n as f64 / var.powi(2);
    eprintln!(
        "randn: mean {mean:.5}, std {:.5}, P(|x|<1) {within_1:.5}, kurtosis {kurt:.4}",
        var.sqrt()
    );
    assert!(mean.abs() < 0.01);
    assert!((var.sqrt() - 1.0).abs() < 0.01);
    assert!((within_1 - 0.682_689).abs() < 0.005);
    assert!((kurt - 3.0).abs() < 0.05);
    assert!(x.iter().all(|v| v.is_finite()));

    // Same seed → same values, whatever the shape; odd lengths are prefixes.
    let a = randn(&[2, 3, 4], &mut Rng::new(1), &Device::Cpu).unwrap();
    let b = randn(&[24], &mut Rng::new(1), &Device::Cpu).unwrap();
    assert_eq!(a.dims(), &[2, 3, 4]);
    assert_eq!(a.dtype(), DType::F32);
    assert_eq!(vec_f32(&a), vec_f32(&b));
    let c = vec_f32(&randn(&[5], &mut Rng::new(1), &Device::Cpu).unwrap());
    assert_eq!(c, vec_f32(&b)[..5]);
    let d = vec_f32(&randn(&[24], &mut Rng::new(2), &Device::Cpu).unwrap());
    assert_ne!(d, vec_f32(&b));
}

#[test]
fn timesteps_are_uniform_in_range_and_deterministic() {
    let t = sample_timesteps(100_000, 1000, &mut Rng::new(3));
    assert!(t.iter().all(|&t| t < 1000));
    assert_eq!(*t.iter().min().unwrap(), 0);
    assert_eq!(*t.iter().max().unwrap(), 999);
    let mean = t.iter().sum::<usize>() as f64 / t.len() as f64;
    eprintln!("timesteps: mean {mean:.2} (uniform: 499.5)");
    assert!((mean - 499.5).abs() < 3.0);
    assert_eq!(
        sample_timesteps(10, 1000, &mut Rng::new(3)),
        t[..10].to_vec()
    );
}

/// Latents `[2, 2, 2, 2]` with distinct values.
fn latents() -> Tensor {
    let v: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) * 0.25).collect();
    Tensor::from_vec(v, (2, 2, 2, 2), &Device::Cpu).unwrap()
}

/// Replays the documented draw order: ε, offset noise (if any), timesteps.
fn replay(seed: u64, offset: f64) -> (Vec<f32>, Option<Vec<f32>>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let eps = vec_f32(&randn(&[2, 2, 2, 2], &mut rng, &Device::Cpu).unwrap());
    let off =
        (offset != 0.0).then(|| vec_f32(&randn(&[2, 2, 1, 1], &mut rng, &Device::Cpu).unwrap()));
    let t = sample_timesteps(2, 1000, &mut rng);
    (eps, off, t)
}

fn check_noisy_batch(prediction: Prediction, offset: f64) -> f64 {
    let sched = schedule(prediction);
    let x0 = vec_f32(&latents());
    let seed = 11;
    let nb = make_noisy_batch(
        &sched,
        &latents(),
        &NoiseOptions::with_offset(offset),
        &mut Rng::new(seed),
    )
    .unwrap();
    let (eps, off, t) = replay(seed, offset);
    assert_eq!(nb.timesteps, t);
    assert_ne!(t[0], t[1], "the test wants two different timesteps");
    assert_eq!(nb.noisy.dims(), &[2, 2, 2, 2]);
    assert_eq!(nb.target.dims(), &[2, 2, 2, 2]);
    let (noisy, target) = (vec_f32(&nb.noisy), vec_f32(&nb.target));
    let mut max_err = 0f64;
    for i in 0..16 {
        let (b, c) = (i / 8, (i / 4) % 2);
        let ab = sched.alphas_cumprod[t[b]];
        let (sa, sb) = (ab.sqrt(), (1.0 - ab).sqrt());
        let e = eps[i] as f64 + off.as_ref().map_or(0.0, |o| offset * o[b * 2 + c] as f64);
        let x = x0[i] as f64;
        let want_noisy = sa * x + sb * e;
        let want_target = match prediction {
            Prediction::Epsilon => e,
            Prediction::V => sa * e - sb * x,
        };
        max_err = max_err
            .max((noisy[i] as f64 - want_noisy).abs())
            .max((target[i] as f64 - want_target).abs());
    }
    assert!(
        max_err < 2e-6,
        "{prediction:?} offset {offset}: max error {max_err}"
    );
    max_err
}

#[test]
fn noisy_batch_matches_hand_computation() {
    let e1 = check_noisy_batch(Prediction::Epsilon, 0.0);
    let e2 = check_noisy_batch(Prediction::Epsilon, 0.1);
    let e3 = check_noisy_batch(Prediction::V, 0.0);
    let e4 = check_noisy_batch(Prediction::V, 0.05);
    eprintln!(
        "make_noisy_batch max abs errors: eps {e1:e}, eps+offset {e2:e}, v {e3:e}, v+offset {e4:e}"
    );
}

#[test]
fn noise_offset_is_constant_per_channel() {
    // With zero latents and ε replaced by its offset-free draw, the difference
    // between offset and no-offset targets is offset·N(0,1) per (b, c).
    let sched = schedule(Prediction::Epsilon);
    let z = Tensor::zeros((2, 2, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let a = make_noisy_batch(
        &sched,
        &z,
        &NoiseOptions::with_offset(0.0),
        &mut Rng::new(5),
    )
    .unwrap();
    let b = make_noisy_batch(
        &sched,
        &z,
        &NoiseOptions::with_offset(0.5),
        &mut Rng::new(5),
    )
    .unwrap();
    let d = vec_f32(&(b.target - a.target).unwrap());
    for blk in d.chunks(4) {
        assert!(blk.iter().all(|v| (v - blk[0]).abs() < 1e-6), "{blk:?}");
        assert!(blk[0] != 0.0);
    }
}

/// `pred`, `target` `[2, 3, 2, 2]` with distinct values.
fn pred_target(dtype: DType) -> (Tensor, Tensor) {
    let p: Vec<f64> = (0..24).map(|i| ((i * 7) % 11) as f64 * 0.1 - 0.4).collect();
    let t: Vec<f64> = (0..24)
        .map(|i| ((i * 5) % 13) as f64 * 0.08 - 0.5)
        .collect();
    let mk = |v: Vec<f64>| {
        Tensor::from_vec(v, (2, 3, 2, 2), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    (mk(p), mk(t))
}

fn hand_loss(
    pred: &Tensor,
    target: &Tensor,
    t: &[usize],
    lw: &[f32],
    sched: &NoiseSchedule,
    gamma: Option<f64>,
) -> f64 {
    let p: Vec<f64> = pred
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let q: Vec<f64> = target
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let per = p.len() / t.len();
    let mut total = 0.0;
    for b in 0..t.len() {
        let mse = (0..per)
            .map(|k| (p[b * per + k] - q[b * per + k]).powi(2))
            .sum::<f64>()
            / per as f64;
        let ab = sched.alphas_cumprod[t[b]];
        let snr = ab / (1.0 - ab);
        let w = match (gamma, sched.prediction) {
            (None, _) => 1.0,
            (Some(g), Prediction::Epsilon) => snr.min(g) / snr,
            (Some(g), Prediction::V) => snr.min(g) / (snr + 1.0),
        };
        total += lw[b] as f64 * w * mse;
    }
    total / t.len() as f64
}

#[test]
fn weighted_loss_matches_hand_computation() {
    let (pred, target) = pred_target(DType::F32);
    // t = 10 has SNR ≫ 5 (weight < 1), t = 700 has SNR < 5 (weight 1 for ε).
    let ts = [10, 700];
    let lw = [1.0f32, 0.5];
    let mut max_rel = 0f64;
    for prediction in [Prediction::Epsilon, Prediction::V] {
        let sched = schedule(prediction);
        for gamma in [None, Some(5.0)] {
            let got = weighted_loss(&pred, &target, &ts, &lw, &sched, &LossOptions::mse(gamma))
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let want = hand_loss(&pred, &target, &ts, &lw, &sched, gamma);
            let rel = (got - want).abs() / want;
            max_rel = max_rel.max(rel);
            assert!(
                rel < 1e-6,
                "{prediction:?} gamma {gamma:?}: {got} vs {want}"
            );
        }
    }
    eprintln!("weighted_loss vs hand computation: max rel error {max_rel:e}");
    // min-SNR actually changes the value at t = 10.
    let sched = schedule(Prediction::Epsilon);
    assert!(sched.snr(10) > 5.0 && sched.snr(700) < 5.0);
    let plain = weighted_loss(&pred, &target, &ts, &lw, &sched, &LossOptions::mse(None)).unwrap();
    let snr = weighted_loss(
        &pred,
        &target,
        &ts,
        &lw,
        &sched,
        &LossOptions::mse(Some(5.0)),
    )
    .unwrap();
    assert!(snr.to_scalar::<f32>().unwrap() < plain.to_scalar::<f32>().unwrap());
}

#[test]
fn weighted_loss_gradient_matches_finite_differences() {
    let sched = schedule(Prediction::Epsilon);
    let (pred, target) = pred_target(DType::F64);
    let ts = [10, 700];
    let lw = [1.0f32, 0.5];
    let gamma = Some(5.0);
    let var = Var::from_tensor(&pred).unwrap();
    let loss = weighted_loss(
        var.as_tensor(),
        &target,
        &ts,
        &lw,
        &sched,
        &LossOptions::mse(gamma),
    )
    .unwrap();
    let grads = loss.backward().unwrap();
    let g: Vec<f64> = grads
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();

    let p: Vec<f64> = pred.flatten_all().unwrap().to_vec1().unwrap();
    let f = |p: &[f64]| -> f64 {
        let t = Tensor::from_vec(p.to_vec(), (2, 3, 2, 2), &Device::Cpu).unwrap();
        weighted_loss(&t, &target, &ts, &lw, &sched, &LossOptions::mse(gamma))
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let h = 1e-6;
    let mut max_err = 0f64;
    for k in 0..p.len() {
        let (mut up, mut dn) = (p.clone(), p.clone());
        up[k] += h;
        dn[k] -= h;
        let fd = (f(&up) - f(&dn)) / (2.0 * h);
        max_err = max_err.max((fd - g[k]).abs());
    }
    let gmax = g.iter().fold(0f64, |m, v| m.max(v.abs()));
    eprintln!(
        "d loss / d pred: max |analytic − finite difference| {max_err:e} (max |grad| {gmax:e})"
    );
    assert!(max_err < 1e-8 * gmax.max(1.0), "{max_err}");
    assert!(gmax > 1e-3);
}

#[test]
fn weighted_loss_rejects_mismatched_inputs() {
    let sched = schedule(Prediction::Epsilon);
    let (pred, target) = pred_target(DType::F32);
    let err = weighted_loss(
        &pred,
        &target,
        &[1],
        &[1.0, 1.0],
        &sched,
        &LossOptions::mse(None),
    )
    .unwrap_err();
    assert!(err.to_string().contains("1 timesteps"), "{err}");
    let t2 = target.narrow(1, 0, 2).unwrap();
    let err = weighted_loss(
        &pred,
        &t2,
        &[1, 2],
        &[1.0, 1.0],
        &sched,
        &LossOptions::mse(None),
    )
    .unwrap_err();
    assert!(err.to_string().contains("[2, 2, 2, 2]"), "{err}");
}

/// kohya's loss options, computed by hand in f64 from sd-scripts' formulas
/// (`conditional_loss`, `get_huber_threshold_if_needed`,
/// `apply_debiased_estimation`).
fn kohya_loss(
    pred: &[f64],
    target: &[f64],
    per: usize,
    ts: &[usize],
    lw: &[f32],
    sched: &NoiseSchedule,
    opts: &LossOptions,
) -> f64 {
    let n = sched.len() as f64;
    let mut total = 0.0;
    for (i, &t) in ts.iter().enumerate() {
        let a = sched.alphas_cumprod[t];
        let c = match opts.huber_schedule {
            HuberSchedule::Constant => opts.huber_c * opts.huber_scale,
            HuberSchedule::Exponential => {
                (-(-opts.huber_c.ln() / n) * t as f64).exp() * opts.huber_scale
            }
            HuberSchedule::Snr => {
                let sigma = ((1.0 - a) / a).sqrt();
                (1.0 - opts.huber_c) / (1.0 + sigma).powi(2) + opts.huber_c
            }
        };
        let mut l = 0.0;
        for k in i * per..(i + 1) * per {
            let d = pred[k] - target[k];
            l += match opts.loss_type {
                LossType::L2 => d * d,
                LossType::L1 => d.abs(),
                LossType::Huber => 2.0 * c * ((d * d + c * c).sqrt() - c),
                LossType::SmoothL1 => 2.0 * ((d * d + c * c).sqrt() - c),
            };
        }
        l /= per as f64;
        l *= f64::from(lw[i]);
        if let Some(g) = opts.min_snr_gamma {
            l *= sched.min_snr_weight(t, g);
        }
        if opts.debiased_estimation {
            let snr = (a / (1.0 - a)).min(1000.0);
            l *= match sched.prediction {
                Prediction::Epsilon => 1.0 / snr.sqrt(),
                Prediction::V => 1.0 / (snr + 1.0),
            };
        }
        total += l;
    }
    total / ts.len() as f64
}

fn loss_variants() -> Vec<LossOptions> {
    let mut out = Vec::new();
    for loss_type in [
        LossType::L2,
        LossType::L1,
        LossType::Huber,
        LossType::SmoothL1,
    ] {
        for huber_schedule in [
            HuberSchedule::Snr,
            HuberSchedule::Exponential,
            HuberSchedule::Constant,
        ] {
            for (debiased_estimation, min_snr_gamma) in [(false, None), (true, Some(5.0))] {
                out.push(LossOptions {
                    min_snr_gamma,
                    debiased_estimation,
                    loss_type,
                    huber_schedule,
                    huber_c: 0.3,
                    huber_scale: 1.7,
                    unmasked_weight: 0.0,
                });
            }
        }
    }
    out
}

#[test]
fn loss_types_schedules_and_debiased_weights_match_kohya() {
    let (pred, target) = pred_target(DType::F64);
    let p: Vec<f64> = pred.flatten_all().unwrap().to_vec1().unwrap();
    let q: Vec<f64> = target.flatten_all().unwrap().to_vec1().unwrap();
    let ts = [3, 999];
    let lw = [1.0f32, 0.5];
    let mut max_rel = 0f64;
    for prediction in [Prediction::Epsilon, Prediction::V] {
        let sched = schedule(prediction);
        for opts in loss_variants() {
            let got = weighted_loss(&pred, &target, &ts, &lw, &sched, &opts)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let want = kohya_loss(&p, &q, 12, &ts, &lw, &sched, &opts);
            let rel = (got - want).abs() / want.abs();
            // The weights and thresholds pass through f32.
            assert!(rel < 1e-6, "{prediction:?} {opts:?}: {got} vs {want}");
            max_rel = max_rel.max(rel);
        }
    }
    eprintln!("loss options vs kohya's formulas: max rel error {max_rel:e}");
    // The thresholds themselves: snr goes from ≈1 (t = 0) down to ≈ c.
    let sched = schedule(Prediction::Epsilon);
    let opts = LossOptions {
        loss_type: LossType::Huber,
        ..LossOptions::mse(None)
    };
    let c = opts.huber_thresholds(&[0, 999], &sched).unwrap();
    assert!(c[0] > 0.85 && (c[1] - 0.1).abs() < 0.01, "{c:?}");
    assert!(
        LossOptions::mse(None)
            .huber_thresholds(&[0], &sched)
            .is_none()
    );
    // Debiased estimation caps the SNR at 1000 (t = 0).
    let w = sample_weights(
        &[0],
        &[1.0],
        &sched,
        &LossOptions {
            debiased_estimation: true,
            ..LossOptions::mse(None)
        },
    );
    assert!((w[0] - 1.0 / 1000f64.sqrt()).abs() < 1e-12, "{w:?}");
}

/// sqrt and abs in the Huber and L1 losses carry their gradients.
#[test]
fn huber_and_l1_gradients_match_finite_differences() {
    let sched = schedule(Prediction::V);
    let (pred, target) = pred_target(DType::F64);
    let ts = [10, 700];
    let lw = [1.0f32, 0.5];
    for loss_type in [LossType::Huber, LossType::SmoothL1, LossType::L1] {
        let opts = LossOptions {
            loss_type,
            debiased_estimation: true,
            ..LossOptions::mse(Some(5.0))
        };
        let var = Var::from_tensor(&pred).unwrap();
        let loss = weighted_loss(var.as_tensor(), &target, &ts, &lw, &sched, &opts).unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let p: Vec<f64> = pred.flatten_all().unwrap().to_vec1().unwrap();
        let f = |p: &[f64]| -> f64 {
            let t = Tensor::from_vec(p.to_vec(), (2, 3, 2, 2), &Device::Cpu).unwrap();
            weighted_loss(&t, &target, &ts, &lw, &sched, &opts)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let h = 1e-6;
        for k in 0..p.len() {
            let (mut up, mut dn) = (p.clone(), p.clone());
            up[k] += h;
            dn[k] -= h;
            let fd = (f(&up) - f(&dn)) / (2.0 * h);
            assert!(
                (fd - g[k]).abs() <= 1e-6 * fd.abs().max(1e-3),
                "{loss_type:?} element {k}: backward {} vs finite difference {fd}",
                g[k]
            );
            assert!(g[k] != 0.0, "{loss_type:?}: element {k} got no gradient");
        }
    }
}

#[test]
fn timestep_range_is_respected_and_covered() {
    let t = sample_timesteps_in(20_000, 200, 300, &mut Rng::new(9));
    assert!(t.iter().all(|&x| (200..300).contains(&x)));
    assert_eq!(t.iter().min(), Some(&200));
    assert_eq!(t.iter().max(), Some(&299));
    // The full range draws exactly as sample_timesteps.
    assert_eq!(
        sample_timesteps_in(50, 0, 1000, &mut Rng::new(4)),
        sample_timesteps(50, 1000, &mut Rng::new(4))
    );
    // make_noisy_batch honours the range and refuses an empty one.
    let sched = schedule(Prediction::Epsilon);
    let z = Tensor::zeros((4, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let opts = NoiseOptions {
        min_timestep: 900,
        max_timestep: Some(910),
        ..NoiseOptions::default()
    };
    let nb = make_noisy_batch(&sched, &z, &opts, &mut Rng::new(1)).unwrap();
    assert!(nb.timesteps.iter().all(|&t| (900..910).contains(&t)));
    let bad = NoiseOptions {
        min_timestep: 500,
        max_timestep: Some(500),
        ..NoiseOptions::default()
    };
    let err = make_noisy_batch(&sched, &z, &bad, &mut Rng::new(1)).unwrap_err();
    assert!(err.to_string().contains("min_timestep"), "{err}");
}

/// PyTorch 2.15: `nn.Upsample(size=(5, 7), mode="bilinear")` of
/// `[[0.5, -1, 2], [3, 0.25, -0.75]]`.
#[test]
fn bilinear_upsampling_matches_pytorch() {
    let x = [0.5f32, -1.0, 2.0, 3.0, 0.25, -0.75];
    let want = [
        0.5, 0.2857143, -0.3571429, -1.0, 0.2857144, 1.5714288, 2.0, 0.75, 0.5178572, -0.1785714,
        -0.875, 0.2392858, 1.3535714, 1.7249999, 1.75, 1.4464287, 0.5357143, -0.375, 0.0535715,
        0.4821429, 0.625, 2.75, 2.375, 1.25, 0.125, -0.1321429, -0.3892858, -0.4750001, 3.0,
        2.607_143, 1.4285715, 0.25, -0.1785714, -0.6071429, -0.75,
    ];
    let got = upsample_bilinear(&x, 1, (2, 3), (5, 7));
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() < 1e-6, "{i}: {a} vs {b}");
    }
    assert_eq!(upsample_bilinear(&[1.5], 1, (1, 1), (2, 3)), vec![1.5; 6]);
}

#[test]
fn multires_noise_and_input_perturbation() {
    let sched = schedule(Prediction::Epsilon);
    let dims = (2, 4, 16, 16);
    let z = randn(&[2, 4, 16, 16], &mut Rng::new(3), &Device::Cpu).unwrap();
    let plain = make_noisy_batch(&sched, &z, &NoiseOptions::default(), &mut Rng::new(8)).unwrap();
    let multires = NoiseOptions {
        multires_iterations: 6,
        multires_discount: 0.3,
        ..NoiseOptions::default()
    };
    let a = make_noisy_batch(&sched, &z, &multires, &mut Rng::new(8)).unwrap();
    let b = make_noisy_batch(&sched, &z, &multires, &mut Rng::new(8)).unwrap();
    // Deterministic, unit variance, not plain noise; ε is still the target.
    assert_eq!(vec_f32(&a.target), vec_f32(&b.target));
    let eps = vec_f32(&a.target);
    let n = eps.len() as f64;
    let mean = eps.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = eps
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    assert!((var - 1.0).abs() < 1e-5, "variance {var}");
    assert_ne!(eps, vec_f32(&plain.target));
    // Low frequencies carry more of it: the per-channel means vary more
    // than plain noise's (whose are ≈ 1/16 of a standard deviation).
    let channel_means = |v: &[f32]| -> f64 {
        v.chunks(256)
            .map(|c| (c.iter().map(|&x| f64::from(x)).sum::<f64>() / 256.0).powi(2))
            .sum::<f64>()
            / (v.len() / 256) as f64
    };
    assert!(channel_means(&eps) > 2.0 * channel_means(&vec_f32(&plain.target)));

    // Input perturbation: the target is the unperturbed ε; the input moves
    // by √(1−ᾱ_t)·γ·ε'.
    let ip = NoiseOptions {
        ip_noise_gamma: 0.1,
        ..NoiseOptions::default()
    };
    let c = make_noisy_batch(&sched, &z, &ip, &mut Rng::new(8)).unwrap();
    assert_eq!(vec_f32(&c.target), vec_f32(&plain.target));
    assert_eq!(c.timesteps, plain.timesteps);
    let diff: Vec<f32> = vec_f32(&c.noisy)
        .iter()
        .zip(vec_f32(&plain.noisy))
        .map(|(x, y)| x - y)
        .collect();
    let per = dims.1 * dims.2 * dims.3;
    for (i, &t) in c.timesteps.iter().enumerate() {
        let s = sched.coefficients(t).1 * 0.1;
        let rms = (diff[i * per..(i + 1) * per]
            .iter()
            .map(|&d| f64::from(d).powi(2))
            .sum::<f64>()
            / per as f64)
            .sqrt();
        assert!((rms / s - 1.0).abs() < 0.1, "sample {i}: {rms} vs {s}");
    }
}

/// A loss mask weighs each element by `u + (1 − u)·mask` before the mean
/// over the sample; where the mask is 0 and `u` = 0 the prediction gets no
/// gradient; a mask of ones changes nothing.
#[test]
fn masked_loss_weighs_elements_and_stops_gradients_outside_the_mask() {
    let sched = schedule(Prediction::Epsilon);
    let (pred, target) = pred_target(DType::F32);
    let ts = [10, 700];
    let lw = [1.0f32, 0.5];
    // [2, 1, 2, 2]: sample 0 trains only its first row, sample 1 everything.
    let mask = Tensor::from_vec(
        vec![1.0f32, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0],
        (2, 1, 2, 2),
        &Device::Cpu,
    )
    .unwrap();
    let ones = Tensor::ones((2, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let opts = |u: f64| LossOptions {
        unmasked_weight: u,
        ..LossOptions::mse(None)
    };
    let value = |m: Option<&Tensor>, u: f64| {
        masked_weighted_loss(&pred, &target, &ts, &lw, &sched, &opts(u), m)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let plain = value(None, 0.0);
    assert_eq!(value(Some(&ones), 0.0), plain);
    assert_eq!(value(Some(&mask), 1.0), plain);
    // By hand: mean over each sample's 12 elements of mask·(p − t)², weighted, averaged.
    let p = vec_f32(&pred);
    let t = vec_f32(&target);
    let m = vec_f32(&mask);
    for u in [0.0, 0.1] {
        let mut total = 0.0;
        for b in 0..2 {
            let mut sum = 0.0;
            for c in 0..3 {
                for hw in 0..4 {
                    let i = b * 12 + c * 4 + hw;
                    let w = u + (1.0 - u) * f64::from(m[b * 4 + hw]);
                    sum += w * f64::from(p[i] - t[i]).powi(2);
                }
            }
            total += f64::from(lw[b]) * sum / 12.0;
        }
        let want = total / 2.0;
        let got = value(Some(&mask), u);
        assert!((got - want).abs() < 1e-6 * want, "u = {u}: {got} vs {want}");
    }
    // Gradient: zero exactly where the mask is 0 (u = 0), non-zero elsewhere.
    let var = Var::from_tensor(&pred).unwrap();
    let loss = masked_weighted_loss(
        var.as_tensor(),
        &target,
        &ts,
        &lw,
        &sched,
        &opts(0.0),
        Some(&mask),
    )
    .unwrap();
    let grads = loss.backward().unwrap();
    let g = vec_f32(grads.get(var.as_tensor()).unwrap());
    for c in 0..3 {
        for hw in 0..4 {
            let (i, masked_out) = (c * 4 + hw, hw >= 2);
            assert_eq!(g[i] == 0.0, masked_out, "element {i}: gradient {}", g[i]);
        }
    }
}
