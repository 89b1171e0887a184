use candle_core::{DType, Var};
use sd_lora_model::ops::FrozenConv2d;

use crate::common::{Rng, assert_grads_ok, check_grads, grad_entries, max_abs_diff};

/// Input gradient of a conv against finite differences, for input `[1, 2, h, w]`
/// and kernel `[3, 2, k, k]`.
fn check_conv(seed: u64, (h, w): (usize, usize), k: usize, stride: usize, padding: usize) {
    let mut rng = Rng::new(seed);
    let x = rng.tensor(&[2, 2, h, w], DType::F64);
    let kernel = rng.tensor(&[3, 2, k, k], DType::F64);
    let bias = rng.tensor(&[3], DType::F64);
    let check = check_grads(
        |xs| {
            FrozenConv2d::new(xs[1].clone(), Some(xs[2].clone()), stride, padding)?.forward(&xs[0])
        },
        &[x, kernel, bias],
        &[true, false, false],
        &mut rng,
    );
    let name = format!("conv {h}x{w} k{k} s{stride} p{padding}");
    assert_grads_ok(&name, &check, 1e-6);
}

#[test]
fn stride_1_gradients_match_finite_differences() {
    check_conv(10, (5, 5), 3, 1, 1);
    check_conv(11, (4, 6), 3, 1, 0);
    check_conv(12, (4, 5), 1, 1, 0);
    // Padding larger than k − 1 takes the transposed-conv path.
    check_conv(13, (3, 3), 1, 1, 1);
}

#[test]
fn stride_2_gradients_match_finite_differences() {
    // Odd and even sizes need different output paddings; 7x8 needs both at once.
    check_conv(20, (7, 7), 3, 2, 1);
    check_conv(21, (8, 8), 3, 2, 1);
    check_conv(22, (7, 8), 3, 2, 1);
    check_conv(23, (8, 7), 3, 2, 0);
    check_conv(24, (6, 6), 1, 2, 0);
}

#[test]
fn forward_and_input_gradient_match_candle_conv2d() {
    let mut rng = Rng::new(30);
    for (stride, padding, size) in [(1, 1, 9), (2, 1, 9), (2, 1, 8), (1, 0, 6)] {
        let x = Var::from_tensor(&rng.tensor(&[2, 4, size, size], DType::F32)).unwrap();
        let kernel = rng.tensor(&[5, 4, 3, 3], DType::F32);
        let bias = rng.tensor(&[5], DType::F32);
        let conv = FrozenConv2d::new(kernel.clone(), Some(bias.clone()), stride, padding).unwrap();
        let y = conv.forward(x.as_tensor()).unwrap();
        let y_ref = x
            .as_tensor()
            .conv2d(&kernel, padding, stride, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, 5, 1, 1)).unwrap())
            .unwrap();
        assert!(
            max_abs_diff(&y, &y_ref) < 1e-5,
            "forward s{stride} p{padding}"
        );

        let u = rng.tensor(y.dims(), DType::F32);
        let g = (y * &u).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (y_ref * &u).unwrap().sum_all().unwrap().backward().unwrap();
        let (dx, dx_ref) = (
            g.get(x.as_tensor()).unwrap(),
            g_ref.get(x.as_tensor()).unwrap(),
        );
        assert!(
            max_abs_diff(dx, dx_ref) < 1e-4,
            "input grad s{stride} p{padding}"
        );
    }
}

#[test]
fn no_gradient_is_stored_for_the_kernel_even_when_it_is_a_var() {
    let mut rng = Rng::new(40);
    let x = Var::from_tensor(&rng.tensor(&[1, 2, 5, 5], DType::F32)).unwrap();
    let kernel = Var::from_tensor(&rng.tensor(&[3, 2, 3, 3], DType::F32)).unwrap();
    let bias = Var::from_tensor(&rng.tensor(&[3], DType::F32)).unwrap();
    let conv = FrozenConv2d::new(
        kernel.as_tensor().clone(),
        Some(bias.as_tensor().clone()),
        1,
        1,
    )
    .unwrap();
    let grads = conv
        .forward(x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    assert!(grads.get(kernel.as_tensor()).is_none());
    assert_eq!(grad_entries(&grads), 1);
}

/// Pins a candle bug this layer avoids: candle's conv2d backward derives the
/// transposed conv's output padding from the height alone, so a stride-2 conv on
/// an input whose height and width differ in parity has no usable backward.
#[test]
fn candle_conv2d_backward_fails_for_mixed_parity_stride_2() {
    let mut rng = Rng::new(41);
    let x = Var::from_tensor(&rng.tensor(&[1, 2, 7, 8], DType::F32)).unwrap();
    let kernel = rng.tensor(&[3, 2, 3, 3], DType::F32);
    let y = x.as_tensor().conv2d(&kernel, 1, 2, 1, 1).unwrap();
    assert!(y.sum_all().unwrap().backward().is_err());

    let conv = FrozenConv2d::new(kernel, None, 2, 1).unwrap();
    let y = conv.forward(x.as_tensor()).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(grads.get(x.as_tensor()).unwrap().dims(), &[1, 2, 7, 8]);
}
