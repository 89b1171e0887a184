//! Noise, timesteps, noised batches and the weighted denoising loss.

use candle_core::{DType, Device, Tensor, Var};
use sd_lora_data::rng::Rng;
use sd_lora_model::schedule::{NoiseSchedule, Prediction, ScheduleConfig};
use sd_lora_train::loss::{make_noisy_batch, weighted_loss};
use sd_lora_train::noise::{randn, sample_timesteps};

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
    let nb = make_noisy_batch(&sched, &latents(), offset, &mut Rng::new(seed)).unwrap();
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
    let a = make_noisy_batch(&sched, &z, 0.0, &mut Rng::new(5)).unwrap();
    let b = make_noisy_batch(&sched, &z, 0.5, &mut Rng::new(5)).unwrap();
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
            let got = weighted_loss(&pred, &target, &ts, &lw, &sched, gamma)
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
    let plain = weighted_loss(&pred, &target, &ts, &lw, &sched, None).unwrap();
    let snr = weighted_loss(&pred, &target, &ts, &lw, &sched, Some(5.0)).unwrap();
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
    let loss = weighted_loss(var.as_tensor(), &target, &ts, &lw, &sched, gamma).unwrap();
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
        weighted_loss(&t, &target, &ts, &lw, &sched, gamma)
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
    let err = weighted_loss(&pred, &target, &[1], &[1.0, 1.0], &sched, None).unwrap_err();
    assert!(err.to_string().contains("1 timesteps"), "{err}");
    let t2 = target.narrow(1, 0, 2).unwrap();
    let err = weighted_loss(&pred, &t2, &[1, 2], &[1.0, 1.0], &sched, None).unwrap_err();
    assert!(err.to_string().contains("[2, 2, 2, 2]"), "{err}");
}
