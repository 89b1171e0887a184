use candle_core::{DType, Module, Tensor, Var};
use sd_lora_model::ops::FrozenLinear;

use crate::common::{Rng, assert_grads_ok, check_grads, grad_entries, max_abs_diff};

#[test]
fn input_gradient_matches_finite_differences_for_rank_3_input() {
    let mut rng = Rng::new(1);
    let x = rng.tensor(&[2, 3, 5], DType::F64);
    let w = rng.tensor(&[4, 5], DType::F64);
    let b = rng.tensor(&[4], DType::F64);
    let check = check_grads(
        |xs| FrozenLinear::new(xs[1].clone(), Some(xs[2].clone()))?.forward(&xs[0]),
        &[x, w, b],
        &[true, false, false],
        &mut rng,
    );
    assert_grads_ok("linear", &check, 1e-6);
}

#[test]
fn forward_matches_candle_linear_and_input_gradient_matches_candle_matmul() {
    let mut rng = Rng::new(2);
    let x = Var::from_tensor(&rng.tensor(&[2, 7, 16], DType::F32)).unwrap();
    let w = rng.tensor(&[12, 16], DType::F32);
    let b = rng.tensor(&[12], DType::F32);
    let ours = FrozenLinear::new(w.clone(), Some(b.clone())).unwrap();
    let reference = candle_nn::Linear::new(w.clone(), Some(b.clone()));
    let y = ours.forward(x.as_tensor()).unwrap();
    let y_ref = reference.forward(x.as_tensor()).unwrap();
    assert!(max_abs_diff(&y, &y_ref) < 1e-5);

    let u = rng.tensor(&[2, 7, 12], DType::F32);
    let g = (y * &u).unwrap().sum_all().unwrap().backward().unwrap();
    let g_ref = (y_ref * &u).unwrap().sum_all().unwrap().backward().unwrap();
    let (dx, dx_ref) = (
        g.get(x.as_tensor()).unwrap(),
        g_ref.get(x.as_tensor()).unwrap(),
    );
    assert!(max_abs_diff(dx, dx_ref) < 1e-5);
}

#[test]
fn no_gradient_is_stored_for_the_weight_even_when_it_is_a_var() {
    let mut rng = Rng::new(3);
    let x = Var::from_tensor(&rng.tensor(&[6, 8], DType::F32)).unwrap();
    let w = Var::from_tensor(&rng.tensor(&[3, 8], DType::F32)).unwrap();
    let b = Var::from_tensor(&rng.tensor(&[3], DType::F32)).unwrap();
    let layer = FrozenLinear::new(w.as_tensor().clone(), Some(b.as_tensor().clone())).unwrap();
    let grads = layer
        .forward(x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    assert!(grads.get(w.as_tensor()).is_none());
    assert!(grads.get(b.as_tensor()).is_none());
    assert_eq!(grad_entries(&grads), 1);
}

/// Pins the candle behaviour this layer exists for: a plain matmul with a constant
/// weight stores a weight gradient (under the id of `w.t()`).
#[test]
fn plain_candle_matmul_stores_a_gradient_for_a_constant_weight() {
    let mut rng = Rng::new(4);
    let x = Var::from_tensor(&rng.tensor(&[6, 8], DType::F32)).unwrap();
    let w = rng.tensor(&[3, 8], DType::F32);
    let y = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&w).is_none());
    assert_eq!(grad_entries(&grads), 2);
}

#[test]
fn non_contiguous_input_and_no_bias() {
    let mut rng = Rng::new(5);
    let x = rng.tensor(&[5, 3], DType::F64);
    let w = rng.tensor(&[4, 3], DType::F64);
    let check = check_grads(
        |xs| FrozenLinear::new(xs[1].clone(), None)?.forward(&xs[0].t()?),
        &[x.t().unwrap().contiguous().unwrap(), w],
        &[true, false],
        &mut rng,
    );
    assert_grads_ok("linear (transposed input)", &check, 1e-6);
}

#[test]
fn rejects_wrong_input_width() {
    let mut rng = Rng::new(6);
    let layer = FrozenLinear::new(rng.tensor(&[4, 3], DType::F32), None).unwrap();
    let x = Tensor::zeros((2, 5), DType::F32, &candle_core::Device::Cpu).unwrap();
    assert!(layer.forward(&x).is_err());
}
