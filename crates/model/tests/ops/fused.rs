use candle_core::{DType, Tensor, Var};
use sd_lora_model::blocks::attention::{FeedForward, GegluProj};
use sd_lora_model::blocks::layers::{GroupNorm, conv2d_forward, norm_silu_conv};
use sd_lora_model::ops::{self, FrozenConv2d, FrozenLinear};

use crate::common::{Rng, assert_grads_ok, check_grads, max_abs_diff, rel_diff};

fn norm(rng: &mut Rng, c: usize, groups: usize, dtype: DType) -> GroupNorm {
    GroupNorm {
        weight: rng.tensor(&[c], dtype).affine(0.2, 1.0).unwrap(),
        bias: (rng.tensor(&[c], dtype) * 0.2).unwrap(),
        num_groups: groups,
        eps: 1e-5,
    }
}

fn conv(rng: &mut Rng, cin: usize, cout: usize, k: usize, dtype: DType) -> FrozenConv2d {
    let w = (rng.tensor(&[cout, cin, k, k], dtype) * 0.3).unwrap();
    let b = rng.tensor(&[cout], dtype);
    FrozenConv2d::new(w, Some(b), 1, k / 2).unwrap()
}

/// The same computation from separate ops.
fn unfused(n: &GroupNorm, c: &FrozenConv2d, x: &Tensor, add: Option<&Tensor>) -> Tensor {
    let h = conv2d_forward(c, &ops::silu(&n.forward(x).unwrap()).unwrap()).unwrap();
    match add {
        Some(a) => h.broadcast_add(a).unwrap(),
        None => h,
    }
}

#[test]
fn norm_silu_conv_gradients_match_finite_differences() {
    let mut rng = Rng::new(90);
    let n = norm(&mut rng, 4, 2, DType::F64);
    let x = rng.tensor(&[2, 4, 5, 6], DType::F64);
    for k in [3, 1] {
        let c = conv(&mut rng, 4, 3, k, DType::F64);
        let f = |xs: &[Tensor]| norm_silu_conv(&n, &c, &xs[0], None);
        let check = check_grads(f, std::slice::from_ref(&x), &[true], &mut rng);
        assert_grads_ok("norm_silu_conv", &check, 1e-6);
        // A broadcast add (a time embedding) and a full one (a residual).
        for add_shape in [[2, 3, 1, 1], [2, 3, 5, 6]] {
            let add = rng.tensor(&add_shape, DType::F64);
            let inputs = [x.clone(), add];
            let f = |xs: &[Tensor]| norm_silu_conv(&n, &c, &xs[0], Some(&xs[1]));
            for wrt in [[true, true], [false, true], [true, false]] {
                let check = check_grads(f, &inputs, &wrt, &mut rng);
                assert_grads_ok(
                    &format!("norm_silu_conv + {add_shape:?} {wrt:?}"),
                    &check,
                    1e-6,
                );
            }
        }
    }
}

#[test]
fn norm_silu_conv_equals_the_separate_ops() {
    let mut rng = Rng::new(91);
    let n = norm(&mut rng, 8, 4, DType::F32);
    let c = conv(&mut rng, 8, 6, 3, DType::F32);
    let x = Var::from_tensor(&rng.tensor(&[1, 8, 7, 9], DType::F32)).unwrap();
    let t = Var::from_tensor(&rng.tensor(&[1, 6, 1, 1], DType::F32)).unwrap();
    let u = rng.tensor(&[1, 6, 7, 9], DType::F32);
    let fused = norm_silu_conv(&n, &c, x.as_tensor(), Some(t.as_tensor())).unwrap();
    let plain = unfused(&n, &c, x.as_tensor(), Some(t.as_tensor()));
    // The forward runs the same ops: bit-identical.
    assert_eq!(max_abs_diff(&fused, &plain), 0.0);
    let gf = (fused * &u).unwrap().sum_all().unwrap().backward().unwrap();
    let gp = (plain * &u).unwrap().sum_all().unwrap().backward().unwrap();
    for v in [&x, &t] {
        let (a, b) = (
            gf.get(v.as_tensor()).unwrap(),
            gp.get(v.as_tensor()).unwrap(),
        );
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(max_abs_diff(a, b) <= 1e-5 * scale, "{:?}", v.dims());
    }
    // Untracked inputs: no graph, same values.
    let y = norm_silu_conv(&n, &c, &x.as_tensor().detach(), None).unwrap();
    assert!(!y.track_op());
    assert_eq!(max_abs_diff(&y, &unfused(&n, &c, x.as_tensor(), None)), 0.0);
}

fn feed_forward(rng: &mut Rng, dim: usize, inner: usize, dtype: DType) -> FeedForward {
    let lin = |rng: &mut Rng, o: usize, i: usize| {
        let w = (rng.tensor(&[o, i], dtype) * 0.4).unwrap();
        FrozenLinear::new(w, Some(rng.tensor(&[o], dtype)))
            .unwrap()
            .into()
    };
    FeedForward {
        net_0: GegluProj {
            proj: lin(rng, 2 * inner, dim),
        },
        net_2: lin(rng, dim, inner),
    }
}

#[test]
fn feed_forward_gradients_match_finite_differences_and_the_separate_ops() {
    let mut rng = Rng::new(92);
    let ff = feed_forward(&mut rng, 4, 6, DType::F64);
    let x = rng.tensor(&[2, 3, 4], DType::F64);
    let f = |xs: &[Tensor]| ff.forward(&xs[0]);
    let check = check_grads(f, std::slice::from_ref(&x), &[true], &mut rng);
    assert_grads_ok("feed-forward (GEGLU + net.2 fused)", &check, 1e-6);

    // The same values and gradient as the ops one by one.
    let xv = Var::from_tensor(&x).unwrap();
    let u = rng.tensor(&[2, 3, 4], DType::F64);
    let fused = ff.forward(xv.as_tensor()).unwrap();
    let plain = ff
        .net_2
        .forward(&ops::geglu(&ff.net_0.proj.forward(xv.as_tensor()).unwrap()).unwrap())
        .unwrap();
    assert_eq!(max_abs_diff(&fused, &plain), 0.0);
    let gf = (fused * &u).unwrap().sum_all().unwrap().backward().unwrap();
    let gp = (plain * &u).unwrap().sum_all().unwrap().backward().unwrap();
    let (a, b) = (
        gf.get(xv.as_tensor()).unwrap(),
        gp.get(xv.as_tensor()).unwrap(),
    );
    assert!(max_abs_diff(a, b) < 1e-12);
}

/// The feed-forward that keeps only its input (used inside checkpointed
/// recomputations): finite differences on a small input, and on an input of
/// several chunks (more than `FF_CHUNK_VALUES` projection values) the same
/// output and gradient as the usual feed-forward.
#[test]
fn recomputing_feed_forward_matches_finite_differences_and_the_usual_one() {
    use sd_lora_model::blocks::attention::FF_CHUNK_VALUES;
    let mut rng = Rng::new(93);
    let ff = feed_forward(&mut rng, 4, 6, DType::F64);
    let x = rng.tensor(&[2, 3, 4], DType::F64);
    let f = |xs: &[Tensor]| ff.forward_recomputing(&xs[0]);
    let check = check_grads(f, std::slice::from_ref(&x), &[true], &mut rng);
    assert_grads_ok("feed-forward (recomputing)", &check, 1e-6);

    // 2·inner = 12 projection values per row: 2.5 chunks' worth of rows.
    let rows = FF_CHUNK_VALUES / 12 * 5 / 2;
    let x = rng.tensor(&[1, rows, 4], DType::F64);
    let u = rng.tensor(&[1, rows, 4], DType::F64);
    let xv = Var::from_tensor(&x).unwrap();
    let lean = ff.forward_recomputing(xv.as_tensor()).unwrap();
    let usual = ff.forward(xv.as_tensor()).unwrap();
    assert!(max_abs_diff(&lean, &usual) < 1e-12);
    let gl = (lean * &u).unwrap().sum_all().unwrap().backward().unwrap();
    let gu = (usual * &u).unwrap().sum_all().unwrap().backward().unwrap();
    let (a, b) = (
        gl.get(xv.as_tensor()).unwrap(),
        gu.get(xv.as_tensor()).unwrap(),
    );
    assert!(max_abs_diff(a, b) < 1e-10, "{}", max_abs_diff(a, b));
}

/// On the CPU in f32, GroupNorm + SiLU and its backward are one-pass kernels;
/// f64 takes the generic tensor-op path. Both must agree.
#[test]
fn norm_silu_conv_f32_kernels_match_the_f64_path() {
    let mut rng = Rng::new(94);
    let n64 = norm(&mut rng, 6, 3, DType::F64);
    let c64 = conv(&mut rng, 6, 4, 3, DType::F64);
    let x64 = rng
        .tensor(&[2, 6, 5, 7], DType::F64)
        .affine(2.0, 0.3)
        .unwrap();
    let add64 = rng.tensor(&[2, 4, 5, 7], DType::F64);
    let u = rng.tensor(&[2, 4, 5, 7], DType::F64);
    let to = |t: &Tensor, d: DType| t.to_dtype(d).unwrap();
    let run = |d: DType| {
        let n = GroupNorm {
            weight: to(&n64.weight, d),
            bias: to(&n64.bias, d),
            num_groups: 3,
            eps: 1e-5,
        };
        let c = FrozenConv2d::new(
            to(&c64.weight, d),
            c64.bias.as_ref().map(|b| to(b, d)),
            1,
            1,
        )
        .unwrap();
        let (x, add) = (
            Var::from_tensor(&to(&x64, d)).unwrap(),
            Var::from_tensor(&to(&add64, d)).unwrap(),
        );
        let y = norm_silu_conv(&n, &c, x.as_tensor(), Some(add.as_tensor())).unwrap();
        let g = (&y * to(&u, d))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = |v: &Var| to(g.get(v.as_tensor()).unwrap(), DType::F64);
        (to(&y, DType::F64), grad(&x), grad(&add))
    };
    let (y64, dx64, da64) = run(DType::F64);
    let (y32, dx32, da32) = run(DType::F32);
    assert!(
        rel_diff(&y32, &y64) < 1e-5,
        "forward {}",
        rel_diff(&y32, &y64)
    );
    assert!(
        rel_diff(&dx32, &dx64) < 1e-5,
        "dx {}",
        rel_diff(&dx32, &dx64)
    );
    assert!(
        rel_diff(&da32, &da64) < 1e-6,
        "dadd {}",
        rel_diff(&da32, &da64)
    );
}
