use candle_core::{DType, Device, Tensor, Var};
use sd_lora_model::ops::{attention, attention_chunked, attention_with_bias, multi_head_attention};

use crate::common::{Rng, assert_grads_ok, check_grads, grad_entries, max_abs_diff};

/// `softmax(q·kᵀ·scale)·v` with candle's fused (backward-less) softmax, for forwards.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
    let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    candle_nn::ops::softmax_last_dim(&s)
        .unwrap()
        .matmul(v)
        .unwrap()
}

fn qkv(rng: &mut Rng, lead: &[usize], tq: usize, tk: usize, dtype: DType) -> [Tensor; 3] {
    let shape = |t: usize, d: usize| [lead, &[t, d]].concat();
    [
        rng.tensor(&shape(tq, 4), dtype),
        rng.tensor(&shape(tk, 4), dtype),
        rng.tensor(&shape(tk, 3), dtype),
    ]
}

#[test]
fn gradients_match_finite_differences_rank_3_and_4() {
    let mut rng = Rng::new(80);
    let all = [true, true, true];
    let inputs = qkv(&mut rng, &[2], 5, 6, DType::F64);
    let check = check_grads(
        |xs| attention(&xs[0], &xs[1], &xs[2], 0.5),
        &inputs,
        &all,
        &mut rng,
    );
    assert_grads_ok("attention [bh, t, d]", &check, 1e-6);

    let inputs = qkv(&mut rng, &[1, 2], 4, 3, DType::F64);
    let check = check_grads(
        |xs| attention(&xs[0], &xs[1], &xs[2], 0.5),
        &inputs,
        &all,
        &mut rng,
    );
    assert_grads_ok("attention [b, h, t, d]", &check, 1e-6);
}

#[test]
fn self_attention_on_one_shared_input_accumulates_all_three_gradients() {
    let mut rng = Rng::new(84);
    let x = rng.tensor(&[2, 5, 4], DType::F64);
    let f = |xs: &[Tensor]| attention(&xs[0], &xs[0], &xs[0], 0.5);
    let check = check_grads(f, std::slice::from_ref(&x), &[true], &mut rng);
    assert_grads_ok("attention(x, x, x)", &check, 1e-6);
    let f = |xs: &[Tensor]| attention_chunked(&xs[0], &xs[0], &xs[0], 0.5, 2);
    let check = check_grads(f, &[x], &[true], &mut rng);
    assert_grads_ok("attention_chunked(x, x, x)", &check, 1e-6);
}

#[test]
fn causal_bias_gradients_match_finite_differences() {
    let mut rng = Rng::new(81);
    let inputs = qkv(&mut rng, &[2], 5, 5, DType::F64);
    let mask: Vec<f64> = (0..25)
        .map(|i| {
            if i % 5 > i / 5 {
                f64::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (5, 5), &Device::Cpu).unwrap();
    let check = check_grads(
        |xs| attention_with_bias(&xs[0], &xs[1], &xs[2], 0.5, Some(&mask)),
        &inputs,
        &[true, true, true],
        &mut rng,
    );
    assert_grads_ok("attention with causal bias", &check, 1e-6);
}

#[test]
fn chunked_gradients_match_finite_differences() {
    let mut rng = Rng::new(82);
    let inputs = qkv(&mut rng, &[2], 5, 6, DType::F64);
    // Chunks of 2 over 5 queries: the last chunk is short.
    let f = |xs: &[Tensor]| attention_chunked(&xs[0], &xs[1], &xs[2], 0.5, 2);
    let check = check_grads(f, &inputs, &[true, true, true], &mut rng);
    assert_grads_ok("attention_chunked", &check, 1e-6);
    let check = check_grads(f, &inputs, &[false, true, false], &mut rng);
    assert_grads_ok("attention_chunked (k only)", &check, 1e-6);

    let inputs = qkv(&mut rng, &[1, 2], 4, 3, DType::F64);
    let f = |xs: &[Tensor]| attention_chunked(&xs[0], &xs[1], &xs[2], 0.5, 3);
    let check = check_grads(f, &inputs, &[true, true, true], &mut rng);
    assert_grads_ok("attention_chunked [b, h, t, d]", &check, 1e-6);
}

#[test]
fn forwards_match_reference_and_chunked_gradients_match_unchunked() {
    let mut rng = Rng::new(83);
    let [q, k, v] = qkv(&mut rng, &[3], 17, 11, DType::F32);
    let scale = 0.5;
    let y_ref = reference(&q, &k, &v, scale);
    let (qv, kv, vv) = (
        Var::from_tensor(&q).unwrap(),
        Var::from_tensor(&k).unwrap(),
        Var::from_tensor(&v).unwrap(),
    );
    let (qt, kt, vt) = (qv.as_tensor(), kv.as_tensor(), vv.as_tensor());
    let y = attention(qt, kt, vt, scale).unwrap();
    let y_chunked = attention_chunked(qt, kt, vt, scale, 4).unwrap();
    assert!(max_abs_diff(&y, &y_ref) < 1e-5);
    assert!(max_abs_diff(&y_chunked, &y_ref) < 1e-5);

    let u = rng.tensor(y.dims(), DType::F32);
    let g = (y * &u).unwrap().sum_all().unwrap().backward().unwrap();
    let g_chunked = (y_chunked * &u)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for t in [qt, kt, vt] {
        let d = max_abs_diff(g.get(t).unwrap(), g_chunked.get(t).unwrap());
        assert!(d < 1e-5, "chunked gradient differs by {d}");
    }
    assert_eq!(
        grad_entries(&g_chunked),
        3 + 1,
        "q, k, v and the constant u"
    );
}

/// `[b, t, heads·d]` → `[b·heads, t, d]`, the layout of the single-head ops.
fn heads_first(x: &Tensor, heads: usize) -> Tensor {
    let (b, t, c) = x.dims3().unwrap();
    x.reshape((b, t, heads, c / heads))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b * heads, t, c / heads))
        .unwrap()
}

#[test]
fn multi_head_attention_equals_attention_per_head() {
    let mut rng = Rng::new(85);
    let heads = 3;
    // Cross-attention: 7 queries, 5 keys, head widths 4 (q, k) and 2 (v).
    let q = rng.tensor(&[2, 7, 12], DType::F32);
    let k = rng.tensor(&[2, 5, 12], DType::F32);
    let v = rng.tensor(&[2, 5, 6], DType::F32);
    let want = attention(
        &heads_first(&q, heads),
        &heads_first(&k, heads),
        &heads_first(&v, heads),
        0.5,
    )
    .unwrap()
    .reshape((2, heads, 7, 2))
    .unwrap()
    .transpose(1, 2)
    .unwrap()
    .reshape((2, 7, 6))
    .unwrap();
    for chunk in [None, Some(1), Some(3), Some(100)] {
        let y = multi_head_attention(&q, &k, &v, heads, 0.5, chunk).unwrap();
        assert_eq!(y.dims(), &[2, 7, 6]);
        assert!(max_abs_diff(&y, &want) < 1e-6, "chunk {chunk:?}");
    }
    // Shapes that do not split into the heads are an error, not a panic.
    assert!(multi_head_attention(&q, &k, &v, 5, 0.5, None).is_err());
    assert!(multi_head_attention(&q, &k, &v, heads, 0.5, Some(0)).is_err());
}

#[test]
fn multi_head_attention_gradients_match_finite_differences() {
    let mut rng = Rng::new(86);
    let inputs = [
        rng.tensor(&[2, 5, 6], DType::F64),
        rng.tensor(&[2, 4, 6], DType::F64),
        rng.tensor(&[2, 4, 4], DType::F64),
    ];
    for chunk in [None, Some(2)] {
        let f = |xs: &[Tensor]| multi_head_attention(&xs[0], &xs[1], &xs[2], 2, 0.5, chunk);
        let check = check_grads(f, &inputs, &[true, true, true], &mut rng);
        assert_grads_ok("multi_head_attention", &check, 1e-6);
        let check = check_grads(f, &inputs, &[false, true, false], &mut rng);
        assert_grads_ok("multi_head_attention (k only)", &check, 1e-6);
    }
    // Self-attention on one input: the three gradients add up.
    let x = rng.tensor(&[1, 6, 4], DType::F64);
    let f = |xs: &[Tensor]| multi_head_attention(&xs[0], &xs[0], &xs[0], 2, 0.5, Some(4));
    let check = check_grads(f, &[x], &[true], &mut rng);
    assert_grads_ok("multi_head_attention(x, x, x)", &check, 1e-6);
}

#[test]
fn multi_head_attention_keeps_half_precision_inputs_and_gradients_half() {
    let mut rng = Rng::new(87);
    let q = rng.tensor(&[1, 6, 8], DType::F32);
    let want = multi_head_attention(&q, &q, &q, 2, 0.5, None).unwrap();
    let var = Var::from_tensor(&q.to_dtype(DType::F16).unwrap()).unwrap();
    let y = multi_head_attention(
        var.as_tensor(),
        var.as_tensor(),
        var.as_tensor(),
        2,
        0.5,
        None,
    )
    .unwrap();
    assert_eq!(y.dtype(), DType::F16);
    assert!(max_abs_diff(&y.to_dtype(DType::F32).unwrap(), &want) < 5e-3);
    let grads = y
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(grads.get(var.as_tensor()).unwrap().dtype(), DType::F16);
}
