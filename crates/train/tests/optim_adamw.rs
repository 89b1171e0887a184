//! AdamW against PyTorch, state save/load, gradient accumulation and clipping.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use sd_lora_train::optim::{
    AdamW, AdamWConfig, GradAccumulator, ParamGroup, clip_grad_norm, grad_norm,
};

const SHAPES: [&[usize]; 3] = [&[2, 3], &[4], &[3]];
/// (step, parameter) pairs that get no gradient.
const MISSING: [(usize, usize); 3] = [(0, 2), (2, 2), (3, 1)];
const FACTORS: [f64; 6] = [1.0, 0.5, 0.8, 1.0, 0.3, 1.0];

fn init(pi: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|k| {
            let sign = if k % 2 == 0 { 1.0 } else { -1.0 };
            (0.1 * (k + 1) as f64 * sign + 0.05 * pi as f64) as f32
        })
        .collect()
}

fn grad(step: usize, pi: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|k| {
            let x = 0.7 * (k + 1) as f64 + 1.3 * step as f64 + 0.5 * pi as f64;
            (x.sin() * (1.0 + pi as f64)) as f32
        })
        .collect()
}

fn make_vars() -> Vec<Var> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n = s.iter().product();
            Var::from_tensor(&Tensor::from_vec(init(i, n), *s, &Device::Cpu).unwrap()).unwrap()
        })
        .collect()
}

/// Two groups as in the PyTorch script: unet = [p0, p1] (lr 1e-2, wd 0.1),
/// te = [p2] (lr 5e-3, no decay).
fn make_opt(vars: &[Var]) -> AdamW {
    AdamW::new(
        vec![
            ParamGroup {
                name: "unet".into(),
                vars: vec![vars[0].clone(), vars[1].clone()],
                lr: 1e-2,
                weight_decay: 0.1,
            },
            ParamGroup {
                name: "te".into(),
                vars: vec![vars[2].clone()],
                lr: 5e-3,
                weight_decay: 0.0,
            },
        ],
        AdamWConfig::default(),
    )
    .unwrap()
}

fn grads_at(step: usize) -> Vec<Vec<Option<Tensor>>> {
    let g = |pi: usize| -> Option<Tensor> {
        if MISSING.contains(&(step, pi)) {
            return None;
        }
        let s = SHAPES[pi];
        let n = s.iter().product();
        Some(Tensor::from_vec(grad(step, pi, n), s, &Device::Cpu).unwrap())
    };
    vec![vec![g(0), g(1)], vec![g(2)]]
}

fn values(v: &Var) -> Vec<f32> {
    v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
}

/// Printed by this script with torch 2.15.0 (CPU, f32):
/// ```python
/// import math, torch
/// def init(pi, n): return [0.1*(k+1)*(-1)**k + 0.05*pi for k in range(n)]
/// def grad(step, pi, n): return [math.sin(0.7*(k+1) + 1.3*step + 0.5*pi) * (1.0 + pi) for k in range(n)]
/// shapes = [[2,3],[4],[3]]
/// ps = [torch.tensor(init(i, math.prod(s)), dtype=torch.float32).reshape(s).requires_grad_() for i,s in enumerate(shapes)]
/// opt = torch.optim.AdamW([{"params":[ps[0],ps[1]], "lr":1e-2, "weight_decay":0.1},
///                          {"params":[ps[2]], "lr":5e-3, "weight_decay":0.0}], betas=(0.9,0.999), eps=1e-8)
/// base = [1e-2, 5e-3]; factors = [1.0, 0.5, 0.8, 1.0, 0.3, 1.0]; missing = {(0,2),(2,2),(3,1)}
/// for step, f in enumerate(factors):
///     for g, b in zip(opt.param_groups, base): g["lr"] = b*f
///     for i,p in enumerate(ps):
///         p.grad = None if (step,i) in missing else torch.tensor(grad(step,i,p.numel()),dtype=torch.float32).reshape(p.shape)
///     opt.step()
/// for i,p in enumerate(ps): print(p.detach().flatten().tolist(), int(opt.state[p]["step"]))
/// ```
const TORCH_FINAL: [&[f32]; 3] = [
    &[
        0.077_768_87,
        -0.216_022_83,
        0.288_939_54,
        -0.399_073_57,
        0.520_414_1,
        -0.577_633_5,
    ],
    &[0.125_332_94, -0.166_121_91, 0.343_060_1, -0.324_274_3],
    &[0.197_871_69, -0.097_148_23, 0.401_732_1],
];
/// PyTorch's per-parameter `state["step"]` after the six steps.
const TORCH_STEPS: [i64; 3] = [6, 5, 4];

#[test]
fn adamw_matches_pytorch_with_groups_decay_and_missing_grads() {
    let vars = make_vars();
    let mut opt = make_opt(&vars);
    for (step, f) in FACTORS.iter().enumerate() {
        opt.step(&grads_at(step), *f).unwrap();
    }
    let mut max_err = 0f32;
    for (v, want) in vars.iter().zip(TORCH_FINAL) {
        for (a, b) in values(v).iter().zip(want) {
            max_err = max_err.max((a - b).abs());
        }
    }
    eprintln!("AdamW vs torch.optim.AdamW: max abs error {max_err:e}");
    assert!(max_err < 1e-6, "max abs error {max_err}");

    let state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
    for (key, want) in [("unet.0.step", 0), ("unet.1.step", 1), ("te.0.step", 2)] {
        let got = state[key].to_vec1::<i64>().unwrap();
        assert_eq!(got, vec![TORCH_STEPS[want]], "{key}");
    }
}

/// Hand-computed first step: Adam's first update is lr·sign(g) (up to eps),
/// after decay; a parameter with no gradient is untouched (no decay either).
#[test]
fn first_step_by_hand() {
    let vars = make_vars();
    let mut opt = make_opt(&vars);
    let before: Vec<Vec<f32>> = vars.iter().map(values).collect();
    opt.step(&grads_at(0), 1.0).unwrap();
    let g0 = grad(0, 0, 6);
    for (k, (p, g)) in before[0].iter().zip(&g0).enumerate() {
        let (p, g) = (*p as f64, *g as f64);
        // m̂ = g, v̂ = g², update = lr · g / (|g| + eps).
        let want = p * (1.0 - 1e-2 * 0.1) - 1e-2 * g / (g.abs() + 1e-8);
        let got = values(&vars[0])[k] as f64;
        assert!((got - want).abs() < 3e-7, "p0[{k}]: {got} vs {want}");
    }
    assert_eq!(values(&vars[2]), before[2]);
}

#[test]
fn state_round_trip_equals_uninterrupted_run() {
    // Uninterrupted.
    let vars = make_vars();
    let mut opt = make_opt(&vars);
    for (step, f) in FACTORS.iter().enumerate() {
        opt.step(&grads_at(step), *f).unwrap();
    }
    let want: Vec<Vec<f32>> = vars.iter().map(values).collect();

    // Three steps, save state and parameters through a safetensors file.
    let vars_a = make_vars();
    let mut opt_a = make_opt(&vars_a);
    for (step, f) in FACTORS.iter().enumerate().take(3) {
        opt_a.step(&grads_at(step), *f).unwrap();
    }
    let mut saved: HashMap<String, Tensor> = opt_a.state_tensors().unwrap().into_iter().collect();
    for (i, v) in vars_a.iter().enumerate() {
        saved.insert(format!("param.{i}"), v.as_tensor().clone());
    }
    let path = std::env::temp_dir().join(format!(
        "sd_lora_optim_state_{}.safetensors",
        std::process::id()
    ));
    candle_core::safetensors::save(&saved, &path).unwrap();
    let loaded = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    std::fs::remove_file(&path).unwrap();

    // Fresh optimizer over fresh Vars holding the saved values, then the rest.
    let vars_b: Vec<Var> = (0..3)
        .map(|i| Var::from_tensor(&loaded[&format!("param.{i}")]).unwrap())
        .collect();
    let mut opt_b = make_opt(&vars_b);
    opt_b.load_state_tensors(&loaded).unwrap();
    for (step, f) in FACTORS.iter().enumerate().skip(3) {
        opt_b.step(&grads_at(step), *f).unwrap();
    }
    let got: Vec<Vec<f32>> = vars_b.iter().map(values).collect();
    assert_eq!(got, want, "resumed run must be bit-identical");
}

#[test]
fn load_state_errors_name_the_key() {
    let vars = make_vars();
    let mut opt = make_opt(&vars);
    let mut state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
    state.remove("te.0.exp_avg_sq");
    let err = opt.load_state_tensors(&state).unwrap_err().to_string();
    assert!(err.contains("te.0.exp_avg_sq"), "{err}");

    let mut state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
    state.insert(
        "unet.1.exp_avg".into(),
        Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = opt.load_state_tensors(&state).unwrap_err().to_string();
    assert!(
        err.contains("unet.1.exp_avg") && err.contains("[5]"),
        "{err}"
    );
}

#[test]
fn constructor_and_step_reject_bad_input() {
    let vars = make_vars();
    let dup = AdamW::new(
        vec![ParamGroup {
            name: "unet".into(),
            vars: vec![vars[0].clone(), vars[0].clone()],
            lr: 1e-3,
            weight_decay: 0.0,
        }],
        AdamWConfig::default(),
    );
    assert!(dup.unwrap_err().to_string().contains("listed twice"));

    let mut opt = make_opt(&vars);
    let err = opt.step(&[vec![None, None]], 1.0).unwrap_err().to_string();
    assert!(
        err.contains("2 parameter groups") || err.contains("1 parameter groups"),
        "{err}"
    );
    let err = opt
        .step(&[vec![None], vec![None]], 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"unet\""), "{err}");
    let bad = Some(Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap());
    let err = opt
        .step(&[vec![bad, None], vec![None]], 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[7]"), "{err}");
}

#[test]
fn accumulation_is_the_mean_of_micro_batch_grads() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 0.5], &dev).unwrap()).unwrap();
    let y = Var::from_tensor(&Tensor::new(&[3.0f32, 4.0], &dev).unwrap()).unwrap();
    let z = Var::from_tensor(&Tensor::new(&[1.0f32], &dev).unwrap()).unwrap();
    let groups = vec![
        ParamGroup {
            name: "a".into(),
            vars: vec![x.clone(), y.clone()],
            lr: 1.0,
            weight_decay: 0.0,
        },
        ParamGroup {
            name: "b".into(),
            vars: vec![z.clone()],
            lr: 1.0,
            weight_decay: 0.0,
        },
    ];
    let mut acc = GradAccumulator::new(&groups);
    // Micro-batch k: L = Σ a_k·x + c_k·Σ x² (+ Σ y² only for k = 1), so
    // dL/dx = a_k + 2 c_k x and dL/dy = 2y once.
    let a = [[1.0f32, 2.0, 3.0], [-1.0, 0.0, 4.0], [0.5, 0.5, 0.5]];
    let c = [0.0f32, 1.0, 2.0];
    for k in 0..3 {
        let ak = Tensor::new(&a[k], &dev).unwrap();
        let mut loss = ((x.as_tensor() * &ak).unwrap().sum_all().unwrap()
            + (x.as_tensor().sqr().unwrap().sum_all().unwrap() * c[k] as f64).unwrap())
        .unwrap();
        if k == 1 {
            loss = (loss + y.as_tensor().sqr().unwrap().sum_all().unwrap()).unwrap();
        }
        acc.add(&loss.backward().unwrap()).unwrap();
    }
    assert_eq!(acc.count(), 3);
    let g = acc.take();
    let gx: Vec<f32> = g[0][0].as_ref().unwrap().to_vec1().unwrap();
    let xv = [1.0f32, -2.0, 0.5];
    for i in 0..3 {
        let want: f32 = (0..3).map(|k| a[k][i] + 2.0 * c[k] * xv[i]).sum::<f32>() / 3.0;
        assert!((gx[i] - want).abs() < 1e-6, "x[{i}]: {} vs {want}", gx[i]);
    }
    let gy: Vec<f32> = g[0][1].as_ref().unwrap().to_vec1().unwrap();
    assert_eq!(gy, vec![2.0 * 3.0 / 3.0, 2.0 * 4.0 / 3.0]);
    assert!(g[1][0].is_none(), "z never got a gradient");
    // Reset.
    assert_eq!(acc.count(), 0);
    assert!(acc.take().iter().flatten().all(Option::is_none));
}

#[test]
fn grad_norm_and_clipping() {
    let dev = Device::Cpu;
    let t = |v: &[f32]| Some(Tensor::new(v, &dev).unwrap());
    let mut grads = vec![vec![t(&[3.0, 4.0]), None], vec![t(&[12.0])]];
    assert!((grad_norm(&grads).unwrap() - 13.0).abs() < 1e-9);

    // Above the limit: no change.
    let before = clip_grad_norm(&mut grads, 20.0).unwrap();
    assert!((before - 13.0).abs() < 1e-9);
    assert_eq!(
        grads[1][0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
        vec![12.0]
    );

    // Below: scaled by max_norm / (norm + 1e-6), as PyTorch's clip_grad_norm_.
    let before = clip_grad_norm(&mut grads, 6.5).unwrap();
    assert!((before - 13.0).abs() < 1e-9);
    let after = grad_norm(&grads).unwrap();
    eprintln!("clipped norm {after} (max 6.5)");
    assert!((after - 6.5).abs() < 1e-5, "{after}");
    let g0: Vec<f32> = grads[0][0].as_ref().unwrap().to_vec1().unwrap();
    let coef = 6.5 / (13.0 + 1e-6);
    assert!((g0[0] as f64 - 3.0 * coef).abs() < 1e-6 && (g0[1] as f64 - 4.0 * coef).abs() < 1e-6);

    // Off.
    let mut g = grads.clone();
    clip_grad_norm(&mut g, 0.0).unwrap();
    assert_eq!(grad_norm(&g).unwrap(), after);

    // Non-finite: reported, gradients left alone.
    let mut bad = vec![vec![t(&[1.0, f32::NAN])], vec![t(&[2.0])]];
    assert!(clip_grad_norm(&mut bad, 1.0).unwrap().is_nan());
    assert_eq!(
        bad[1][0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
        vec![2.0]
    );
    let inf = vec![vec![t(&[f32::INFINITY])]];
    assert!(grad_norm(&inf).unwrap().is_infinite());
    assert_eq!(grad_norm(&[vec![None]]).unwrap(), 0.0);
}
