//! Half-precision storage: every op runs forward and backward in f16 and bf16 and
//! stays close to its f32 result (bf16 conv excepted: candle's CPU backend has no
//! bf16 conv/matmul for it).

use candle_core::{DType, Result, Tensor, Var};
use sd_lora_model::ops::{
    FrozenConv2d, FrozenLinear, attention, attention_chunked, geglu, gelu, group_norm, layer_norm,
    quick_gelu, silu, softmax_last_dim,
};

use crate::common::{Rng, max_abs_diff};

type Op = fn(&Tensor, &[Tensor]) -> Result<Tensor>;

/// (name, op, runs on CPU in bf16)
fn ops() -> Vec<(&'static str, Op, bool)> {
    vec![
        (
            "linear",
            |x, p| FrozenLinear::new(p[0].clone(), Some(p[1].clone()))?.forward(x),
            true,
        ),
        ("softmax", |x, _| softmax_last_dim(x), true),
        ("layer_norm", |x, p| layer_norm(x, &p[2], &p[3], 1e-5), true),
        (
            "group_norm",
            |x, p| group_norm(x, 4, &p[4], &p[4], 1e-5),
            true,
        ),
        ("gelu", |x, _| gelu(x), true),
        ("quick_gelu", |x, _| quick_gelu(x), true),
        ("geglu", |x, _| geglu(x), true),
        ("silu", |x, _| silu(x), true),
        ("attention", |x, _| attention(x, x, x, 0.25), true),
        (
            "attention_chunked",
            |x, _| attention_chunked(x, x, x, 0.25, 3),
            true,
        ),
        (
            "conv",
            |x, p| FrozenConv2d::new(p[5].clone(), None, 2, 1)?.forward(&x.reshape((2, 2, 8, 8))?),
            false,
        ),
    ]
}

/// Output and input gradient of `op` with everything cast to `dtype`, back in f32.
fn run(op: Op, x: &Tensor, params: &[Tensor], u: &Tensor, dtype: DType) -> (Tensor, Tensor) {
    let x = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
    let params: Vec<Tensor> = params.iter().map(|p| p.to_dtype(dtype).unwrap()).collect();
    let y = op(x.as_tensor(), &params)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let grads = (&y * u).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = grads.get(x.as_tensor()).expect("input gradient");
    assert_eq!(dx.dtype(), dtype);
    (y, dx.to_dtype(DType::F32).unwrap())
}

#[test]
fn half_precision_forward_and_backward_track_f32() {
    let mut rng = Rng::new(90);
    let x = (rng.tensor(&[2, 8, 16], DType::F32) * 0.5).unwrap();
    let params = [
        (rng.tensor(&[4, 16], DType::F32) * 0.25).unwrap(),
        rng.tensor(&[4], DType::F32),
        rng.tensor(&[16], DType::F32),
        rng.tensor(&[16], DType::F32),
        rng.tensor(&[8], DType::F32),
        (rng.tensor(&[3, 2, 3, 3], DType::F32) * 0.25).unwrap(),
    ];
    for (name, op, bf16_on_cpu) in ops() {
        let y32 = op(&x, &params).unwrap();
        let u = rng.tensor(y32.dims(), DType::F32);
        let (y, dx) = run(op, &x, &params, &u, DType::F32);
        let scale = |t: &Tensor| max_abs_diff(t, &t.zeros_like().unwrap()).max(1.0);
        for dtype in [DType::F16, DType::BF16] {
            if dtype == DType::BF16 && !bf16_on_cpu {
                continue;
            }
            // Tolerances are a few units of the format's precision, relative to the
            // largest magnitude.
            let tol = if dtype == DType::F16 { 1e-2 } else { 6e-2 };
            let (yh, dxh) = run(op, &x, &params, &u, dtype);
            let (ey, edx) = (
                max_abs_diff(&y, &yh) / scale(&y),
                max_abs_diff(&dx, &dxh) / scale(&dx),
            );
            assert!(
                ey < tol && edx < tol,
                "{name} {dtype:?}: output {ey:e}, grad {edx:e}"
            );
        }
    }
}
