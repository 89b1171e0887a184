//! Chunked attention keeps only q, k and v for its backward: a stack of
//! attention layers then holds no `heads × t × t` probability matrix per
//! layer, so what training keeps grows with the layers' inputs, not with their
//! score matrices, and the transient peak is one chunk's scores. Measured with
//! a counting allocator (bytes, no timing).

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{live, peak, reset_peak};

use candle_core::{Device, Tensor, Var};
use sd_lora_model::ops::{attention, attention_chunked};

const LAYERS: usize = 6;
const HEADS: usize = 2;
const TOKENS: usize = 1024;
const DIM: usize = 16;
const CHUNK: usize = 128;

/// Live bytes kept by the forward graph, the peak over forward + backward,
/// and the input gradient, for `LAYERS` stacked self-attentions.
fn run(chunked: bool) -> (i64, i64, Vec<f32>) {
    let x =
        Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, HEADS, TOKENS, DIM), &Device::Cpu).unwrap())
            .unwrap();
    // The same input for both runs.
    let x0: Vec<f32> = (0..HEADS * TOKENS * DIM)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    x.set(&Tensor::from_vec(x0, (1, HEADS, TOKENS, DIM), &Device::Cpu).unwrap())
        .unwrap();
    let scale = 1.0 / (DIM as f64).sqrt();
    let before = live();
    reset_peak();
    let mut h = x.as_tensor().clone();
    for _ in 0..LAYERS {
        h = if chunked {
            attention_chunked(&h, &h, &h, scale, CHUNK).unwrap()
        } else {
            attention(&h, &h, &h, scale).unwrap()
        };
    }
    let loss = h.sqr().unwrap().sum_all().unwrap();
    let kept = live() - before;
    let grads = loss.backward().unwrap();
    let g = grads
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let top = peak() - before;
    (kept, top, g)
}

#[test]
fn chunked_attention_keeps_no_score_matrices_and_gives_the_same_gradient() {
    let (kept_plain, peak_plain, g_plain) = run(false);
    let (kept_chunked, peak_chunked, g_chunked) = run(true);
    let scores = (HEADS * TOKENS * TOKENS * 4) as i64;
    let io = (HEADS * TOKENS * DIM * 4) as i64;
    eprintln!(
        "kept: plain {kept_plain} B, chunked {kept_chunked} B; peak: plain {peak_plain} B, chunked {peak_chunked} B; one score matrix {scores} B"
    );
    // Plain attention keeps at least one probability matrix per layer.
    assert!(
        kept_plain >= LAYERS as i64 * scores,
        "plain attention kept {kept_plain} B, less than {LAYERS} score matrices"
    );
    // Chunked keeps a few q/k/v/output-sized tensors per layer, no scores.
    assert!(
        kept_chunked <= LAYERS as i64 * 8 * io,
        "chunked attention kept {kept_chunked} B, more than 8 inputs per layer"
    );
    // Its peak is bounded by chunks, not layers: well below one full score
    // matrix per layer.
    assert!(
        peak_chunked < scores,
        "chunked peak {peak_chunked} B is not below one full score matrix ({scores} B)"
    );
    assert!(peak_plain > LAYERS as i64 * scores);
    let scale = g_plain.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = g_plain
        .iter()
        .zip(&g_chunked)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    // Six stacked f32 softmaxes over 1024 tokens, summed in another order.
    assert!(
        worst <= 1e-4 * scale,
        "gradients differ by {worst} (scale {scale})"
    );
}
