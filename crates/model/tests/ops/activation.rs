use candle_core::{D, DType, Tensor, Var};
use sd_lora_model::ops::{geglu, gelu, quick_gelu, silu};

use crate::common::{Rng, assert_grads_ok, check_grads, f32_against_f64, max_abs_diff};

fn check_unary(name: &str, seed: u64, f: fn(&Tensor) -> candle_core::Result<Tensor>) {
    let mut rng = Rng::new(seed);
    let x = (rng.tensor(&[3, 8], DType::F64) * 2.0).unwrap();
    let check = check_grads(|xs| f(&xs[0]), &[x], &[true], &mut rng);
    assert_grads_ok(name, &check, 1e-6);
}

#[test]
fn gradients_match_finite_differences() {
    check_unary("gelu", 70, gelu);
    check_unary("quick_gelu", 71, quick_gelu);
    check_unary("silu (candle's backward)", 72, silu);
    let mut rng = Rng::new(73);
    let x = (rng.tensor(&[2, 3, 10], DType::F64) * 2.0).unwrap();
    let check = check_grads(|xs| geglu(&xs[0]), &[x], &[true], &mut rng);
    assert_grads_ok("geglu", &check, 1e-6);
}

/// Pins why `gelu` has its own backward: candle's `gelu_erf` gradient uses a
/// six-digit constant, so its error is far above finite-difference noise
/// (a few 1e-7, where the exact form gets ~1e-11).
#[test]
fn candle_gelu_erf_gradient_is_inexact() {
    let mut rng = Rng::new(74);
    let x = (rng.tensor(&[3, 8], DType::F64) * 2.0).unwrap();
    let check = check_grads(|xs| xs[0].gelu_erf(), &[x], &[true], &mut rng);
    println!(
        "candle gelu_erf: relative gradient errors {:?}",
        check.rel_errors
    );
    assert!(check.rel_errors[0] > 1e-8);
}

#[test]
fn forwards_match_candle_primitives() {
    let mut rng = Rng::new(75);
    let x = (rng.tensor(&[4, 16], DType::F32) * 3.0).unwrap();
    assert!(max_abs_diff(&gelu(&x).unwrap(), &x.gelu_erf().unwrap()) < 1e-5);

    let sig = candle_nn::ops::sigmoid(&(&x * 1.702).unwrap()).unwrap();
    let qg_ref = (&x * sig).unwrap();
    assert!(max_abs_diff(&quick_gelu(&x).unwrap(), &qg_ref) < 1e-5);

    let (h, gate) = (
        x.narrow(D::Minus1, 0, 8).unwrap(),
        x.narrow(D::Minus1, 8, 8).unwrap(),
    );
    let geglu_ref = (h * gate.gelu_erf().unwrap()).unwrap();
    assert!(max_abs_diff(&geglu(&x).unwrap(), &geglu_ref) < 1e-5);
}

#[test]
fn quick_gelu_gradient_matches_candle_primitives() {
    let mut rng = Rng::new(76);
    let x = Var::from_tensor(&rng.tensor(&[4, 16], DType::F32)).unwrap();
    let u = rng.tensor(&[4, 16], DType::F32);
    let y = quick_gelu(x.as_tensor()).unwrap();
    let sig = candle_nn::ops::sigmoid(&(x.as_tensor() * 1.702).unwrap()).unwrap();
    let y_ref = (x.as_tensor() * sig).unwrap();
    let g = (y * &u).unwrap().sum_all().unwrap().backward().unwrap();
    let g_ref = (y_ref * &u).unwrap().sum_all().unwrap().backward().unwrap();
    let (dx, dx_ref) = (
        g.get(x.as_tensor()).unwrap(),
        g_ref.get(x.as_tensor()).unwrap(),
    );
    assert!(max_abs_diff(dx, dx_ref) < 1e-5);
}

#[test]
fn geglu_rejects_odd_width() {
    let x = Tensor::zeros((2, 5), DType::F32, &candle_core::Device::Cpu).unwrap();
    assert!(geglu(&x).is_err());
}

/// The f32 CPU kernel of GEGLU (forward and backward in one pass each) against
/// the generic tensor-op path, which f64 inputs take.
#[test]
fn geglu_f32_kernel_matches_the_f64_path() {
    let mut rng = Rng::new(77);
    // 37 rows of width 2·24: rows do not divide the kernel's tasks evenly.
    let x = (rng.tensor(&[37, 48], DType::F64) * 2.0).unwrap();
    let u = rng.tensor(&[37, 24], DType::F64);
    let (forward, backward) = f32_against_f64(|x, _| geglu(x), &x, &u);
    assert!(forward < 1e-6, "forward {forward}");
    assert!(backward < 1e-6, "backward {backward}");
}
