//! The benchmark's FLOP counter (`ops::flops`) counts known layers exactly,
//! only while switched on.
//!
//! One test function on purpose: the counter is process-wide, so tests that
//! count in parallel in one binary would see each other's FLOPs.

use candle_core::{DType, Device, Tensor};
use sd_lora_model::ops::flops::{self, FlopCounts};
use sd_lora_model::ops::{FrozenConv2d, FrozenLinear, attention, attention_chunked};

#[test]
fn counts_linear_conv_and_attention_exactly_and_only_when_on() {
    let dev = Device::Cpu;

    // Off by default: nothing is counted.
    let lin = FrozenLinear::new(
        Tensor::zeros((5, 3), DType::F32, &dev).unwrap(),
        Some(Tensor::zeros(5, DType::F32, &dev).unwrap()),
    )
    .unwrap();
    let x = Tensor::zeros((2, 7, 3), DType::F32, &dev).unwrap();
    lin.forward(&x).unwrap();
    assert_eq!(flops::take(), 0);

    // Linear [14, 3] × [3, 5]: 2·14·5·3 = 420.
    flops::start();
    lin.forward(&x).unwrap();
    assert_eq!(
        flops::take_counts(),
        FlopCounts {
            linear: 420,
            conv: 0,
            attention: 0
        }
    );

    // Conv 3×3, 4 → 6 channels, stride 2, padding 1 on [2, 4, 9, 8]: output
    // [2, 6, 5, 4]; 2·2·5·4·6·4·3·3 = 17 280.
    let conv = FrozenConv2d::new(
        Tensor::zeros((6, 4, 3, 3), DType::F32, &dev).unwrap(),
        None,
        2,
        1,
    )
    .unwrap();
    let x = Tensor::zeros((2, 4, 9, 8), DType::F32, &dev).unwrap();
    flops::start();
    let y = conv.forward(&x).unwrap();
    assert_eq!(y.dims(), &[2, 6, 5, 4]);
    assert_eq!(
        flops::take_counts(),
        FlopCounts {
            linear: 0,
            conv: 17_280,
            attention: 0
        }
    );

    // Attention q [2, 3, 10, 8], k [2, 3, 12, 8], v [2, 3, 12, 4]:
    // 2·6·10·12·(8 + 4) = 17 280, plain or chunked.
    let q = Tensor::zeros((2, 3, 10, 8), DType::F32, &dev).unwrap();
    let k = Tensor::zeros((2, 3, 12, 8), DType::F32, &dev).unwrap();
    let v = Tensor::zeros((2, 3, 12, 4), DType::F32, &dev).unwrap();
    flops::start();
    attention(&q, &k, &v, 0.5).unwrap();
    let plain = flops::take_counts();
    assert_eq!(plain.attention, 17_280);
    assert_eq!(plain.total(), 17_280);
    flops::start();
    attention_chunked(&q, &k, &v, 0.5, 4).unwrap();
    assert_eq!(flops::take(), 17_280);

    // Counts add up over several ops and `take` resets them.
    flops::start();
    lin.forward(&Tensor::zeros((1, 3), DType::F32, &dev).unwrap())
        .unwrap();
    lin.forward(&Tensor::zeros((1, 3), DType::F32, &dev).unwrap())
        .unwrap();
    assert_eq!(flops::take(), 60);
    assert!(!flops::is_on());
    assert_eq!(flops::take(), 0);
}
