use candle_core::{DType, Var};
use sd_lora_model::ops::softmax_last_dim;

use crate::common::{Rng, assert_grads_ok, check_grads, max_abs_diff};

#[test]
fn gradient_matches_finite_differences() {
    let mut rng = Rng::new(50);
    let x = (rng.tensor(&[3, 4, 6], DType::F64) * 2.0).unwrap();
    let check = check_grads(|xs| softmax_last_dim(&xs[0]), &[x], &[true], &mut rng);
    assert_grads_ok("softmax", &check, 1e-6);
}

#[test]
fn forward_matches_candle_and_gradient_matches_candle_primitive_softmax() {
    let mut rng = Rng::new(51);
    let x = Var::from_tensor(&rng.tensor(&[2, 5, 9], DType::F32)).unwrap();
    let y = softmax_last_dim(x.as_tensor()).unwrap();
    let y_ref = candle_nn::ops::softmax_last_dim(x.as_tensor()).unwrap();
    assert!(max_abs_diff(&y, &y_ref) < 1e-5);

    // candle_nn::ops::softmax is built from differentiable primitives.
    let y_prim = candle_nn::ops::softmax(x.as_tensor(), 2).unwrap();
    let u = rng.tensor(&[2, 5, 9], DType::F32);
    let g = (y * &u).unwrap().sum_all().unwrap().backward().unwrap();
    let g_ref = (y_prim * &u)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (dx, dx_ref) = (
        g.get(x.as_tensor()).unwrap(),
        g_ref.get(x.as_tensor()).unwrap(),
    );
    assert!(max_abs_diff(dx, dx_ref) < 1e-5);
}

/// Pins the candle behaviour this op exists for: the fused softmax has no backward
/// and the gradient through it is silently dropped.
#[test]
fn candle_fused_softmax_drops_the_gradient() {
    let mut rng = Rng::new(52);
    let x = Var::from_tensor(&rng.tensor(&[2, 4], DType::F32)).unwrap();
    let y = candle_nn::ops::softmax_last_dim(x.as_tensor()).unwrap();
    let u = rng.tensor(&[2, 4], DType::F32);
    let grads = (y * &u).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(x.as_tensor()).is_none());
}
