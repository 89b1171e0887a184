//! Gradient checkpointing of the UNet (`ops::checkpoint`,
//! `UNet2DConditionModel::set_gradient_checkpointing`) on a tiny random UNet with
//! LoRA on every layer of the conv preset (plus the time embedding), LoRA dropout
//! on, and a trainable context (the text-encoder-LoRA case):
//!
//! - loss, every LoRA gradient and the context gradient equal those without
//!   checkpointing, and every LoRA tensor gets a non-zero gradient either way;
//! - a plain `loss.backward()` on a checkpointed graph misses the segments'
//!   LoRA gradients (why `checkpoint::backward` exists);
//! - f64 finite differences through checkpointed segments;
//! - the memory effect: bytes the graph keeps alive after the forward, and the
//!   peak during the backward, counted by a counting global allocator.
//!
//! The tests of this file run one at a time (a lock), so the allocator counts
//! only the test being run.

use std::sync::{Mutex, MutexGuard};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use sd_lora_model::lora::attach::{TrainOptions, TrainableLora, create_trainable};
use sd_lora_model::lora::targets::{Preset, TargetSpec};
use sd_lora_model::ops::checkpoint;
use sd_lora_model::unet::UNet2DConditionModel;

// ---------------------------------------------------------------- allocator

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{live, peak, reset_peak};

/// Runs the tests of this file one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------- tiny UNet

#[path = "support/random_unet.rs"]
mod random_unet;
use random_unet::{Recorder, config, max_abs, randn, rel_err};

fn build(dtype: DType) -> UNet2DConditionModel {
    let cfg = config();
    let recorder = Recorder::default();
    let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F64, Device::Cpu);
    UNet2DConditionModel::new(vb, &cfg).unwrap();
    let weights = recorder.0.lock().unwrap().clone();
    let vb = VarBuilder::from_tensors(weights, dtype, &Device::Cpu);
    UNet2DConditionModel::new(vb, &cfg).unwrap()
}

/// LoRA on every layer of the conv preset (transformers, ResNets, samplers)
/// plus the time embedding (so the ResNet segments must return a gradient for
/// `temb` too), with dropout 0.25 in training mode and random non-zero `up`s
/// (with `up = 0` the `down`s would get no gradient).
fn attach_lora(unet: &mut UNet2DConditionModel) -> TrainableLora {
    attach_preset(unet, Preset::Conv, &["time_embedding.linear_1"])
}

/// LoRA on `preset` plus `include`, set up as [`attach_lora`] describes.
fn attach_preset(
    unet: &mut UNet2DConditionModel,
    preset: Preset,
    include: &[&str],
) -> TrainableLora {
    let spec = TargetSpec {
        preset,
        text_encoder: false,
        include: include.iter().map(|s| s.to_string()).collect(),
        ..TargetSpec::default()
    };
    let options = TrainOptions {
        seed: 11,
        dropout: 0.25,
        ..TrainOptions::default()
    };
    let lora = create_trainable(unet, None, &spec, &options).unwrap();
    for (i, m) in lora.modules.iter().enumerate() {
        let up = randn(
            1000 + i as u64,
            m.up().unwrap().shape().clone(),
            0.0,
            0.3,
            m.up().unwrap().dtype(),
        );
        m.up().unwrap().set(&up).unwrap();
    }
    lora.dropout.set_training(true);
    lora.dropout.set_step(3);
    lora
}

/// The inputs: a 16×24 latent (so the mid block works at 8×12, not 1×1), two
/// timesteps, a trainable context, and a target.
struct Batch {
    sample: Tensor,
    timesteps: Tensor,
    context: Var,
    target: Tensor,
}

fn batch(dtype: DType) -> Batch {
    Batch {
        sample: randn(1, (2, 4, 16, 24), 0.0, 1.0, dtype),
        timesteps: Tensor::new(&[10f32, 700.], &Device::Cpu).unwrap(),
        context: Var::from_tensor(&randn(2, (2, 5, 12), 0.0, 1.0, dtype)).unwrap(),
        target: randn(3, (2, 4, 16, 24), 0.0, 1.0, dtype),
    }
}

fn loss(unet: &UNet2DConditionModel, b: &Batch) -> Tensor {
    let out = unet
        .forward(&b.sample, &b.timesteps, b.context.as_tensor())
        .unwrap();
    (out - &b.target)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// The gradients of `vars` in `grads`; panics naming a variable without one.
fn var_grads(grads: &GradStore, vars: &[Var], what: &str) -> Vec<Tensor> {
    vars.iter()
        .enumerate()
        .map(|(i, v)| {
            grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{what}: LoRA variable {i} has no gradient"))
                .clone()
        })
        .collect()
}

// ---------------------------------------------------------------- tests

#[test]
fn checkpointed_gradients_equal_plain_ones() {
    let _serial = serial();
    let mut unet = build(DType::F32);
    let lora = attach_lora(&mut unet);
    compare_plain_and_checkpointed(&mut unet, &lora, DType::F32, 2e-6);
}

/// LoRA on the attention projections only, the default preset: the ResNet
/// and upsampler segments have no parameters, and the transformers'
/// recomputation takes the feed-forward that keeps only its input, whose
/// backward sums in another order than the usual one — so f64, where that
/// order costs ~1e-15, not f32's ~1e-6.
#[test]
fn checkpointed_gradients_equal_plain_ones_with_attention_lora() {
    let _serial = serial();
    let mut unet = build(DType::F64);
    let lora = attach_preset(&mut unet, Preset::Attention, &[]);
    compare_plain_and_checkpointed(&mut unet, &lora, DType::F64, 1e-12);
}

/// Same loss bit for bit, same LoRA and context gradients (to `tol`
/// relative), every LoRA tensor non-zero, with checkpointing off and on.
fn compare_plain_and_checkpointed(
    unet: &mut UNet2DConditionModel,
    lora: &TrainableLora,
    dtype: DType,
    tol: f64,
) {
    let vars = lora.vars();
    let b = batch(dtype);
    assert!(!unet.gradient_checkpointing());

    let loss_plain = loss(unet, &b);
    let grads_plain = checkpoint::backward(&loss_plain).unwrap();

    unet.set_gradient_checkpointing(true);
    assert!(unet.gradient_checkpointing());
    let loss_ckpt = loss(unet, &b);
    let grads_ckpt = checkpoint::backward(&loss_ckpt).unwrap();

    // The checkpointed forward runs the same ops on the same values.
    let (l0, l1) = (scalar(&loss_plain), scalar(&loss_ckpt));
    println!("loss plain {l0:.9} checkpointed {l1:.9}");
    assert_eq!(l0.to_bits(), l1.to_bits(), "loss differs: {l0} vs {l1}");

    let g0 = var_grads(&grads_plain, &vars, "plain");
    let g1 = var_grads(&grads_ckpt, &vars, "checkpointed");
    assert_eq!(g0.len(), vars.len());
    assert_eq!(g1.len(), g0.len(), "number of LoRA gradients");
    let mut worst = 0f64;
    let mut identical = 0;
    for (i, (a, c)) in g0.iter().zip(&g1).enumerate() {
        let name = &lora.modules[i / 2].target.path;
        assert!(
            max_abs(a) > 0.0,
            "{name}: zero gradient without checkpointing"
        );
        assert!(max_abs(c) > 0.0, "{name}: zero gradient with checkpointing");
        let e = rel_err(c, a);
        if e == 0.0 {
            identical += 1;
        }
        assert!(
            e <= tol,
            "{name} ({}): relative difference {e:e}",
            ["down", "up"][i % 2]
        );
        worst = worst.max(e);
    }
    let dc0 = grads_plain
        .get(b.context.as_tensor())
        .expect("context gradient (plain)");
    let dc1 = grads_ckpt
        .get(b.context.as_tensor())
        .expect("context gradient (checkpointed)");
    assert!(max_abs(dc0) > 0.0);
    let ec = rel_err(dc1, dc0);
    println!(
        "{} LoRA tensors ({} modules): {identical} bit-identical, worst relative difference {worst:.2e}; \
         context gradient {ec:.2e}",
        vars.len(),
        lora.len()
    );
    assert!(ec <= tol, "context gradient: relative difference {ec:e}");

    // Dropout really is on (so the recomputation had to replay the masks).
    lora.dropout.set_training(false);
    let l_eval = scalar(&loss(unet, &b));
    assert!(
        (l_eval - l0).abs() > 1e-6 * l0.abs(),
        "dropout had no effect"
    );
}

#[test]
fn plain_backward_misses_the_segments_lora_gradients() {
    let _serial = serial();
    let mut unet = build(DType::F32);
    let lora = attach_lora(&mut unet);
    unet.set_gradient_checkpointing(true);
    let b = batch(DType::F32);
    let grads = loss(&unet, &b).backward().unwrap();
    let inside = lora
        .modules
        .iter()
        .find(|m| m.target.path == "mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
        .expect("mid-block to_q has a LoRA");
    let outside = lora
        .modules
        .iter()
        .find(|m| m.target.path == "down_blocks.0.downsamplers.0.conv")
        .expect("the downsampler has a LoRA");
    // Inside a segment: only through the side store, which a plain backward
    // does not read. Outside (a sampler): candle's own gradient.
    assert!(grads.get(inside.up().unwrap().as_tensor()).is_none());
    assert!(grads.get(outside.up().unwrap().as_tensor()).is_some());
    // The stale side-store entries of that backward do not leak into the next
    // `checkpoint::backward`: its gradients equal those of a fresh run.
    let g1 = checkpoint::backward(&loss(&unet, &b)).unwrap();
    let g2 = checkpoint::backward(&loss(&unet, &b)).unwrap();
    let (a, c) = (
        g1.get(inside.up().unwrap().as_tensor()).unwrap(),
        g2.get(inside.up().unwrap().as_tensor()).unwrap(),
    );
    assert_eq!(rel_err(a, c), 0.0);
}

#[test]
fn checkpointed_gradients_match_finite_differences_f64() {
    let _serial = serial();
    let mut unet = build(DType::F64);
    let lora = attach_lora(&mut unet);
    unet.set_gradient_checkpointing(true);
    let b = batch(DType::F64);
    let grads = checkpoint::backward(&loss(&unet, &b)).unwrap();
    // A conv LoRA in a ResNet segment (down and up), an attention LoRA in the
    // mid-block transformer segment, and the time embedding (outside the
    // segments; its gradient arrives through the segments' `temb` inputs).
    let picks = [
        ("down_blocks.1.resnets.0.conv1", true, 5usize),
        ("up_blocks.1.resnets.2.conv_shortcut", false, 3),
        (
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
            true,
            7,
        ),
        (
            "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
            false,
            2,
        ),
        ("time_embedding.linear_1", true, 4),
    ];
    let h = 1e-5;
    for (path, down, index) in picks {
        let m = lora
            .modules
            .iter()
            .find(|m| m.target.path == path)
            .unwrap_or_else(|| panic!("no LoRA on {path}"));
        let var = if down {
            &m.down().unwrap()
        } else {
            &m.up().unwrap()
        };
        let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
        let analytic = analytic.get(index).unwrap().to_scalar::<f64>().unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let at = |delta: f64| {
            let mut v = base.clone();
            v[index] += delta;
            var.set(&Tensor::from_vec(v, var.shape().clone(), &Device::Cpu).unwrap())
                .unwrap();
            scalar(&loss(&unet, &b))
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        at(0.0);
        let err = (analytic - numeric).abs() / numeric.abs().max(1e-12);
        println!(
            "{path} {}[{index}]: analytic {analytic:.9e} numeric {numeric:.9e} rel {err:.1e}",
            if down { "down" } else { "up" }
        );
        assert!(analytic.abs() > 1e-9, "{path}: zero gradient");
        assert!(
            err < 1e-5,
            "{path}: analytic {analytic} vs numeric {numeric}"
        );
    }
}

/// Bytes kept alive by the graph after the forward, and the peak over the
/// forward and backward, above what the model and inputs hold.
fn memory(unet: &UNet2DConditionModel, b: &Batch) -> (i64, i64) {
    let before = live();
    reset_peak();
    let l = loss(unet, b);
    let kept = live() - before;
    let grads = checkpoint::backward(&l).unwrap();
    let peak = peak() - before;
    drop(grads);
    drop(l);
    (kept, peak)
}

#[test]
fn checkpointing_frees_the_activations() {
    let _serial = serial();
    let mut unet = build(DType::F32);
    let _lora = attach_lora(&mut unet);
    let b = batch(DType::F32);
    // Warm up once (one-time allocations of thread pools and caches).
    let _ = memory(&unet, &b);
    let (kept_plain, peak_plain) = memory(&unet, &b);
    unet.set_gradient_checkpointing(true);
    let (kept_ckpt, peak_ckpt) = memory(&unet, &b);
    println!(
        "kept after forward: plain {kept_plain} B, checkpointed {kept_ckpt} B ({:.2}×); \
         peak: plain {peak_plain} B, checkpointed {peak_ckpt} B ({:.2}×)",
        kept_ckpt as f64 / kept_plain as f64,
        peak_ckpt as f64 / peak_plain as f64
    );
    assert!(
        (kept_ckpt as f64) < 0.5 * kept_plain as f64,
        "checkpointing keeps {kept_ckpt} B after the forward, plain {kept_plain} B"
    );
    assert!(
        (peak_ckpt as f64) < 0.8 * peak_plain as f64,
        "checkpointing peaks at {peak_ckpt} B, plain {peak_plain} B"
    );
}

#[test]
fn no_grad_forward_records_no_graph_and_gives_the_same_output() {
    let _serial = serial();
    let mut unet = build(DType::F32);
    let _lora = attach_lora(&mut unet);
    let b = batch(DType::F32);
    let sample = &b.sample;
    let context = b.context.as_tensor().detach();
    let tracked = unet.forward(sample, &b.timesteps, &context).unwrap();
    // The LoRA variables make a plain forward record a graph …
    assert!(tracked.track_op());
    for ckpt in [false, true] {
        unet.set_gradient_checkpointing(ckpt);
        let out = checkpoint::no_grad(|| unet.forward(sample, &b.timesteps, &context)).unwrap();
        // … which the no-grad switch avoids, with the same values.
        assert!(
            !out.track_op(),
            "checkpointing {ckpt}: the output has a graph"
        );
        assert_eq!(rel_err(&out, &tracked), 0.0, "checkpointing {ckpt}");
    }
    assert!(checkpoint::is_grad_enabled());
}

/// A segment none of whose inputs is tracked still gives its parameters their
/// gradient (the op is anchored on the first parameter); untracked inputs are
/// kept as constants; a segment with four tracked inputs is refused by name.
#[test]
fn segments_anchor_on_a_parameter_and_take_at_most_three_tracked_inputs() {
    let _serial = serial();
    let dev = Device::Cpu;
    let w = Var::from_tensor(&Tensor::new(&[2f64, -1.0, 0.5], &dev).unwrap()).unwrap();
    let x = Tensor::new(&[1f64, 2.0, 3.0], &dev).unwrap();
    let wc = w.clone();
    let y = checkpoint::checkpoint("anchored", &[&x], std::slice::from_ref(&w), move |a| {
        (&a[0] * checkpoint::param(&wc))?.sqr()
    })
    .unwrap();
    let grads = checkpoint::backward(&y.sum_all().unwrap()).unwrap();
    // d/dw Σ (x·w)² = 2·x²·w.
    let g = grads.get(w.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(g, vec![4.0, -8.0, 9.0]);

    let vars: Vec<Var> = (0..4)
        .map(|i| Var::from_tensor(&Tensor::new(&[i as f64], &dev).unwrap()).unwrap())
        .collect();
    let inputs: Vec<&Tensor> = vars.iter().map(Var::as_tensor).collect();
    let err = checkpoint::checkpoint("four-inputs", &inputs, &[], |a| Ok(a[0].clone()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("four-inputs") && err.contains("at most 3"),
        "{err}"
    );
}
