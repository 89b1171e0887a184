use candle_core::{DType, Module, Tensor, Var};
use sd_lora_model::ops::{group_norm, layer_norm};

use crate::common::{Rng, assert_grads_ok, check_grads, f32_against_f64, max_abs_diff};

#[test]
fn layer_norm_gradients_match_finite_differences() {
    let mut rng = Rng::new(60);
    // A non-zero mean makes the mean-subtraction part of the backward matter.
    let x = (rng.tensor(&[2, 3, 8], DType::F64) + 0.7).unwrap();
    let gamma = rng.tensor(&[8], DType::F64);
    let beta = rng.tensor(&[8], DType::F64);
    let inputs = [x, gamma, beta];
    let f = |xs: &[candle_core::Tensor]| layer_norm(&xs[0], &xs[1], &xs[2], 1e-5);
    let all = check_grads(f, &inputs, &[true, true, true], &mut rng);
    assert_grads_ok("layer_norm (x, gamma, beta)", &all, 1e-6);
    let frozen = check_grads(f, &inputs, &[true, false, false], &mut rng);
    assert_grads_ok("layer_norm (frozen gamma, beta)", &frozen, 1e-6);
    let affine_only = check_grads(f, &inputs, &[false, true, true], &mut rng);
    assert_grads_ok("layer_norm (frozen x)", &affine_only, 1e-6);
}

#[test]
fn layer_norm_forward_matches_candle_layer_norm() {
    let mut rng = Rng::new(61);
    let x = rng.tensor(&[2, 5, 32], DType::F32);
    let gamma = rng.tensor(&[32], DType::F32);
    let beta = rng.tensor(&[32], DType::F32);
    let y = layer_norm(&x, &gamma, &beta, 1e-5).unwrap();
    let reference = candle_nn::LayerNorm::new(gamma, beta, 1e-5);
    let y_ref = reference.forward(&x).unwrap();
    assert!(max_abs_diff(&y, &y_ref) < 1e-5);
}

/// Pins the candle behaviour this op exists for: candle-nn's LayerNorm drops the
/// gradient for contiguous inputs.
#[test]
fn candle_layer_norm_drops_the_gradient() {
    let mut rng = Rng::new(62);
    let x = Var::from_tensor(&rng.tensor(&[3, 8], DType::F32)).unwrap();
    let reference = candle_nn::LayerNorm::new(
        rng.tensor(&[8], DType::F32),
        rng.tensor(&[8], DType::F32),
        1e-5,
    );
    let y = reference.forward(x.as_tensor()).unwrap();
    let u = rng.tensor(&[3, 8], DType::F32);
    let grads = (y * &u).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(x.as_tensor()).is_none());
}

#[test]
fn group_norm_gradients_match_finite_differences() {
    let mut rng = Rng::new(63);
    let x = (rng.tensor(&[2, 6, 3, 3], DType::F64) - 0.4).unwrap();
    let gamma = rng.tensor(&[6], DType::F64);
    let beta = rng.tensor(&[6], DType::F64);
    let inputs = [x, gamma, beta];
    let f = |xs: &[candle_core::Tensor]| group_norm(&xs[0], 3, &xs[1], &xs[2], 1e-6);
    let frozen = check_grads(f, &inputs, &[true, false, false], &mut rng);
    assert_grads_ok("group_norm (frozen gamma, beta)", &frozen, 1e-6);
    let all = check_grads(f, &inputs, &[true, true, true], &mut rng);
    assert_grads_ok("group_norm (x, gamma, beta)", &all, 1e-6);

    // Rank-3 input [batch, channels, length], one channel per group.
    let x = rng.tensor(&[2, 4, 5], DType::F64);
    let inputs = [
        x,
        rng.tensor(&[4], DType::F64),
        rng.tensor(&[4], DType::F64),
    ];
    let f = |xs: &[candle_core::Tensor]| group_norm(&xs[0], 4, &xs[1], &xs[2], 1e-5);
    let rank3 = check_grads(f, &inputs, &[true, false, false], &mut rng);
    assert_grads_ok("group_norm (rank 3)", &rank3, 1e-6);
}

#[test]
fn group_norm_forward_and_gradient_match_candle_group_norm() {
    let mut rng = Rng::new(64);
    let x = Var::from_tensor(&rng.tensor(&[2, 8, 5, 5], DType::F32)).unwrap();
    let gamma = rng.tensor(&[8], DType::F32);
    let beta = rng.tensor(&[8], DType::F32);
    let y = group_norm(x.as_tensor(), 4, &gamma, &beta, 1e-5).unwrap();
    // candle-nn's GroupNorm is built from differentiable primitives.
    let reference = candle_nn::GroupNorm::new(gamma, beta, 8, 4, 1e-5).unwrap();
    let y_ref = reference.forward(x.as_tensor()).unwrap();
    assert!(max_abs_diff(&y, &y_ref) < 1e-5);

    let u = rng.tensor(&[2, 8, 5, 5], DType::F32);
    let g = (y * &u).unwrap().sum_all().unwrap().backward().unwrap();
    let g_ref = (y_ref * &u).unwrap().sum_all().unwrap().backward().unwrap();
    let (dx, dx_ref) = (
        g.get(x.as_tensor()).unwrap(),
        g_ref.get(x.as_tensor()).unwrap(),
    );
    assert!(max_abs_diff(dx, dx_ref) < 1e-5);
}

#[test]
fn group_norm_rejects_indivisible_channels() {
    let mut rng = Rng::new(65);
    let x = rng.tensor(&[1, 6, 2, 2], DType::F32);
    let (g, b) = (rng.tensor(&[6], DType::F32), rng.tensor(&[6], DType::F32));
    assert!(group_norm(&x, 4, &g, &b, 1e-5).is_err());
}

/// The f32 CPU kernel (frozen γ, β: one pass forward, one backward) against
/// the generic path in f64, on rows that do not fill the kernel's tasks evenly.
#[test]
fn layer_norm_f32_kernel_matches_the_f64_path() {
    let mut rng = Rng::new(93);
    let x = rng
        .tensor(&[3, 41, 37], DType::F64)
        .affine(3.0, 0.5)
        .unwrap();
    let gamma = rng.tensor(&[37], DType::F64);
    let beta = rng.tensor(&[37], DType::F64);
    let u = rng.tensor(&[3, 41, 37], DType::F64);
    let f = |x: &Tensor, d: DType| layer_norm(x, &gamma.to_dtype(d)?, &beta.to_dtype(d)?, 1e-5);
    let (forward, backward) = f32_against_f64(f, &x, &u);
    assert!(forward < 1e-6, "forward {forward}");
    assert!(backward < 1e-5, "backward {backward}");
    // A trainable γ takes the generic path and gets its gradient.
    let gv = Var::from_tensor(&gamma.to_dtype(DType::F32).unwrap()).unwrap();
    let y = layer_norm(
        &x.to_dtype(DType::F32).unwrap(),
        gv.as_tensor(),
        &beta.to_dtype(DType::F32).unwrap(),
        1e-5,
    )
    .unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(gv.as_tensor()).is_some());
}

/// GroupNorm's f32 CPU kernels (frozen γ, β) against the generic f64 path.
#[test]
fn group_norm_f32_kernel_matches_the_f64_path() {
    let mut rng = Rng::new(95);
    let x = rng
        .tensor(&[2, 6, 5, 3], DType::F64)
        .affine(2.0, -0.4)
        .unwrap();
    let gamma = rng.tensor(&[6], DType::F64);
    let beta = rng.tensor(&[6], DType::F64);
    let u = rng.tensor(&[2, 6, 5, 3], DType::F64);
    let f = |x: &Tensor, d: DType| group_norm(x, 3, &gamma.to_dtype(d)?, &beta.to_dtype(d)?, 1e-5);
    let (forward, backward) = f32_against_f64(f, &x, &u);
    assert!(forward < 1e-6, "forward {forward}");
    assert!(backward < 1e-5, "backward {backward}");
}
