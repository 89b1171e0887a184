//! Tiny UNets with seeded random weights, built in code: shapes, per-sample
//! timesteps, forward + backward, a finite-difference check of the gradient
//! through cross-attention, SDXL's added conditioning, odd latent sizes, key
//! paths, and half-precision storage on the CPU.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use sd_lora_model::unet::{AddedCond, UNet2DConditionModel, UNetConfig};

#[path = "support/random_unet.rs"]
mod random_unet;
use random_unet::{Recorder, max_abs, randn, rel_err};

/// Seeded random weights for `cfg`, keyed by the diffusers key paths.
fn random_weights(cfg: &UNetConfig) -> HashMap<String, Tensor> {
    let recorder = Recorder::default();
    let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F64, Device::Cpu);
    UNet2DConditionModel::new(vb, cfg).unwrap();
    recorder.0.lock().unwrap().clone()
}

fn build(
    cfg: &UNetConfig,
    weights: &HashMap<String, Tensor>,
    dtype: DType,
) -> UNet2DConditionModel {
    let vb = VarBuilder::from_tensors(weights.clone(), dtype, &Device::Cpu);
    UNet2DConditionModel::new(vb, cfg).unwrap()
}

/// SD1-like topology, tiny: 2 levels, conv projections, one head count.
fn tiny_sd1() -> UNetConfig {
    UNetConfig::from_json_str(
        r#"{
            "block_out_channels": [8, 16],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 1,
            "attention_head_dim": 2,
            "cross_attention_dim": 12,
            "norm_num_groups": 4,
            "sample_size": 8
        }"#,
    )
    .unwrap()
}

#[test]
fn batch_of_two_with_different_timesteps() {
    let cfg = tiny_sd1();
    let weights = random_weights(&cfg);
    let unet = build(&cfg, &weights, DType::F32);
    let x = randn(1, (2, 4, 8, 8), 0.0, 1.0, DType::F32);
    let ctx = randn(2, (2, 5, 12), 0.0, 1.0, DType::F32);
    let t = Tensor::new(&[10f32, 700.], &Device::Cpu).unwrap();
    let out = unet.forward(&x, &t, &ctx).unwrap();
    assert_eq!(out.dims(), &[2, 4, 8, 8]);

    // Sample 0 alone at t = 10 gives the same output as within the batch.
    let alone = unet
        .forward(
            &x.narrow(0, 0, 1).unwrap(),
            &Tensor::new(&[10f32], &Device::Cpu).unwrap(),
            &ctx.narrow(0, 0, 1).unwrap(),
        )
        .unwrap();
    let err = rel_err(&out.narrow(0, 0, 1).unwrap(), &alone);
    println!("batch vs alone: {err:.2e}");
    assert!(err < 1e-5, "sample 0 in a batch vs alone: {err}");

    // And each sample really gets its own timestep: t = [700, 700] changes sample 0
    // but not sample 1.
    let t2 = Tensor::new(&[700f32, 700.], &Device::Cpu).unwrap();
    let out2 = unet.forward(&x, &t2, &ctx).unwrap();
    let d0 = rel_err(
        &out2.narrow(0, 0, 1).unwrap(),
        &out.narrow(0, 0, 1).unwrap(),
    );
    let d1 = rel_err(
        &out2.narrow(0, 1, 1).unwrap(),
        &out.narrow(0, 1, 1).unwrap(),
    );
    assert!(d0 > 1e-3, "sample 0 ignores its timestep ({d0})");
    assert!(
        d1 < 1e-6,
        "sample 1 changed with sample 0's timestep ({d1})"
    );

    // A single timestep is broadcast over the batch; a wrong count is an error.
    let t1 = Tensor::new(&[700f32], &Device::Cpu).unwrap();
    let out1 = unet.forward(&x, &t1, &ctx).unwrap();
    assert!(rel_err(&out1, &out2) < 1e-6);
    let t3 = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
    let err = unet.forward(&x, &t3, &ctx).unwrap_err().to_string();
    assert!(err.contains("timesteps"), "{err}");
}

#[test]
fn backward_reaches_sample_and_encoder_hidden_states() {
    let cfg = tiny_sd1();
    let weights = random_weights(&cfg);
    let unet = build(&cfg, &weights, DType::F32);
    let x = Var::from_tensor(&randn(3, (2, 4, 8, 8), 0.0, 1.0, DType::F32)).unwrap();
    let ctx = Var::from_tensor(&randn(4, (2, 5, 12), 0.0, 1.0, DType::F32)).unwrap();
    let t = Tensor::new(&[10f32, 700.], &Device::Cpu).unwrap();
    let out = unet.forward(&x, &t, &ctx).unwrap();
    let loss = out.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in [("sample", &x), ("encoder_hidden_states", &ctx)] {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.dims(), var.dims());
        let g64 = g
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(
            g64.iter().all(|v| v.is_finite()),
            "{name}: non-finite gradient"
        );
        let nonzero = g64.iter().filter(|v| **v != 0.0).count();
        assert!(
            nonzero > g64.len() / 2,
            "{name}: only {nonzero}/{} non-zero",
            g64.len()
        );
    }
}

/// d(loss)/d(encoder_hidden_states) and d(loss)/d(sample) against central
/// differences in f64: proves that no gradient path is cut, in particular through
/// `to_q`/`to_k` and the softmax of the cross-attention.
#[test]
fn finite_differences_through_cross_attention() {
    let cfg = UNetConfig::from_json_str(
        r#"{
            "block_out_channels": [4, 4],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 1,
            "attention_head_dim": 2,
            "cross_attention_dim": 6,
            "norm_num_groups": 2
        }"#,
    )
    .unwrap();
    let weights = random_weights(&cfg);
    let unet = build(&cfg, &weights, DType::F64);
    let x = randn(5, (1, 4, 4, 4), 0.0, 1.0, DType::F64);
    let ctx = randn(6, (1, 3, 6), 0.0, 1.0, DType::F64);
    let cot = randn(7, (1, 4, 4, 4), 0.0, 1.0, DType::F64);
    let t = Tensor::new(&[321f32], &Device::Cpu).unwrap();
    let loss = |x: &Tensor, ctx: &Tensor| -> Tensor {
        (unet.forward(x, &t, ctx).unwrap() * &cot)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let xv = Var::from_tensor(&x).unwrap();
    let cv = Var::from_tensor(&ctx).unwrap();
    let grads = loss(&xv, &cv).backward().unwrap();
    let analytic_ctx = grads
        .get(&cv)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let analytic_x = grads
        .get(&xv)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();

    let h = 1e-5;
    let numeric = |base: &Tensor, i: usize, f: &dyn Fn(&Tensor) -> Tensor| -> f64 {
        let mut v = base.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let orig = v[i];
        v[i] = orig + h;
        let plus = f(&Tensor::from_vec(v.clone(), base.shape(), &Device::Cpu).unwrap());
        v[i] = orig - h;
        let minus = f(&Tensor::from_vec(v, base.shape(), &Device::Cpu).unwrap());
        let d = (plus - minus).unwrap().to_scalar::<f64>().unwrap();
        d / (2.0 * h)
    };
    let mut worst: f64 = 0.0;
    for &i in &[0usize, 5, 11, 17] {
        let n = numeric(&ctx, i, &|c| loss(&x, c));
        let a = analytic_ctx[i];
        assert!(
            a.abs() > 1e-8,
            "d/dcontext[{i}] is zero: gradient path cut?"
        );
        let e = (n - a).abs() / a.abs().max(1e-3);
        worst = worst.max(e);
        assert!(e < 1e-6, "d/dcontext[{i}]: analytic {a}, numeric {n}");
    }
    for &i in &[0usize, 21, 63] {
        let n = numeric(&x, i, &|s| loss(s, &ctx));
        let a = analytic_x[i];
        let e = (n - a).abs() / a.abs().max(1e-3);
        worst = worst.max(e);
        assert!(e < 1e-6, "d/dsample[{i}]: analytic {a}, numeric {n}");
    }
    println!("finite differences: worst relative error {worst:.2e}");
}

#[test]
fn key_paths_mirror_diffusers() {
    let weights = random_weights(&tiny_sd1());
    for key in [
        "conv_in.weight",
        "time_embedding.linear_1.weight",
        "time_embedding.linear_2.bias",
        "down_blocks.0.resnets.0.time_emb_proj.weight",
        "down_blocks.0.attentions.0.proj_in.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.bias",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight",
        "down_blocks.0.downsamplers.0.conv.weight",
        "mid_block.resnets.1.conv2.weight",
        "mid_block.attentions.0.norm.weight",
        "up_blocks.0.resnets.1.conv_shortcut.weight",
        "up_blocks.0.upsamplers.0.conv.weight",
        "up_blocks.1.attentions.1.proj_out.weight",
        "conv_norm_out.weight",
        "conv_out.bias",
    ] {
        assert!(weights.contains_key(key), "missing {key}");
    }
    assert_eq!(
        weights["down_blocks.0.attentions.0.proj_in.weight"].dims(),
        &[8, 8, 1, 1]
    );
    assert!(!weights.contains_key("down_blocks.1.attentions.0.norm.weight"));
    assert!(!weights.contains_key("down_blocks.1.downsamplers.0.conv.weight"));
}

/// SDXL's layout: a plain first level, deeper transformer stacks, linear
/// projections and the text/time added embedding.
#[test]
fn sdxl_like_added_conditioning() {
    let cfg = UNetConfig::from_json_str(
        r#"{
            "block_out_channels": [8, 16],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 1,
            "transformer_layers_per_block": [1, 2],
            "attention_head_dim": [2, 4],
            "cross_attention_dim": 12,
            "norm_num_groups": 4,
            "use_linear_projection": true,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 4,
            "projection_class_embeddings_input_dim": 34
        }"#,
    )
    .unwrap();
    let weights = random_weights(&cfg);
    assert_eq!(weights["add_embedding.linear_1.weight"].dims(), &[32, 34]);
    assert!(
        weights.contains_key("down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight")
    );
    assert!(weights.contains_key("mid_block.attentions.0.transformer_blocks.1.ff.net.2.weight"));
    assert_eq!(
        weights["down_blocks.1.attentions.0.proj_in.weight"].dims(),
        &[16, 16]
    );
    let unet = build(&cfg, &weights, DType::F32);
    let x = randn(8, (2, 4, 8, 8), 0.0, 1.0, DType::F32);
    let ctx = randn(9, (2, 5, 12), 0.0, 1.0, DType::F32);
    let t = Tensor::new(&[10f32, 700.], &Device::Cpu).unwrap();
    let text_embeds = randn(10, (2, 10), 0.0, 1.0, DType::F32);
    let time_ids = Tensor::new(
        &[[64f32, 64., 0., 0., 64., 64.], [64., 48., 8., 0., 64., 64.]],
        &Device::Cpu,
    )
    .unwrap();
    let added = AddedCond {
        text_embeds: text_embeds.clone(),
        time_ids,
    };
    let out = unet.forward_with_cond(&x, &t, &ctx, Some(&added)).unwrap();
    assert_eq!(out.dims(), &[2, 4, 8, 8]);
    let other = AddedCond {
        text_embeds,
        time_ids: Tensor::new(&[[32f32, 32., 0., 0., 64., 64.]; 2], &Device::Cpu).unwrap(),
    };
    let out2 = unet.forward_with_cond(&x, &t, &ctx, Some(&other)).unwrap();
    assert!(rel_err(&out2, &out) > 1e-4, "time_ids have no effect");
    let err = unet.forward(&x, &t, &ctx).unwrap_err().to_string();
    assert!(err.contains("text_time"), "{err}");
}

/// Latent sizes that do not divide by 2^(levels−1) upsample to the skip sizes,
/// as diffusers' `forward_upsample_size`.
#[test]
fn odd_latent_size() {
    let cfg = UNetConfig::from_json_str(
        r#"{
            "block_out_channels": [8, 8, 8],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 1,
            "attention_head_dim": 2,
            "cross_attention_dim": 12,
            "norm_num_groups": 4
        }"#,
    )
    .unwrap();
    let unet = build(&cfg, &random_weights(&cfg), DType::F32);
    let x = Var::from_tensor(&randn(11, (1, 4, 6, 5), 0.0, 1.0, DType::F32)).unwrap();
    let ctx = randn(12, (1, 5, 12), 0.0, 1.0, DType::F32);
    let t = Tensor::new(&[500f32], &Device::Cpu).unwrap();
    let out = unet.forward(&x, &t, &ctx).unwrap();
    assert_eq!(out.dims(), &[1, 4, 6, 5]);
    let grads = out.sum_all().unwrap().backward().unwrap();
    assert_eq!(grads.get(&x).unwrap().dims(), &[1, 4, 6, 5]);
}

/// f16 and bf16 storage run forward and backward on the CPU (convs computed in
/// f32 there) and stay close to the f32 result.
#[test]
fn half_precision_storage_on_cpu() {
    let cfg = tiny_sd1();
    let weights = random_weights(&cfg);
    let x32 = randn(13, (2, 4, 8, 8), 0.0, 1.0, DType::F32);
    let ctx32 = randn(14, (2, 5, 12), 0.0, 1.0, DType::F32);
    let t = Tensor::new(&[10f32, 700.], &Device::Cpu).unwrap();
    let reference = build(&cfg, &weights, DType::F32)
        .forward(&x32, &t, &ctx32)
        .unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let unet = build(&cfg, &weights, dtype);
        let ctx = Var::from_tensor(&ctx32.to_dtype(dtype).unwrap()).unwrap();
        let out = unet
            .forward(&x32.to_dtype(dtype).unwrap(), &t, &ctx)
            .unwrap();
        assert_eq!(out.dtype(), dtype);
        let err = rel_err(&out, &reference);
        println!("{dtype:?}: relative error vs f32 {err:.2e}");
        assert!(err < 5e-2, "{dtype:?}: relative error vs f32 {err}");
        let grads = out
            .to_dtype(DType::F32)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = grads.get(&ctx).unwrap();
        assert_eq!(g.dtype(), dtype);
        assert!(max_abs(g) > 0.0 && max_abs(g).is_finite());
    }
}

/// Chunked attention gives the same output and input gradients as plain
/// attention.
#[test]
fn chunked_attention_matches_plain() {
    let cfg = tiny_sd1();
    let weights = random_weights(&cfg);
    let plain = build(&cfg, &weights, DType::F32);
    let mut chunked = plain.clone();
    chunked.set_attention_chunk(Some(5));
    let x = randn(15, (2, 4, 8, 8), 0.0, 1.0, DType::F32);
    let ctx = randn(16, (2, 5, 12), 0.0, 1.0, DType::F32);
    let t = Tensor::new(&[10f32, 700.], &Device::Cpu).unwrap();
    let run = |unet: &UNet2DConditionModel| {
        let c = Var::from_tensor(&ctx).unwrap();
        let out = unet.forward(&x, &t, &c).unwrap();
        let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        (out, grads.get(&c).unwrap().clone())
    };
    let (out_a, g_a) = run(&plain);
    let (out_b, g_b) = run(&chunked);
    assert!(rel_err(&out_b, &out_a) < 1e-6);
    assert!(rel_err(&g_b, &g_a) < 1e-5);
}

/// The public steps (`embed_time`, `forward_conv_in`, each block's `forward`,
/// `upsample_size`, `forward_conv_out`) compose to `forward`: what a block-by-block
/// (gradient-checkpointing) caller relies on.
#[test]
fn public_steps_compose_to_forward() {
    let cfg = tiny_sd1();
    let unet = build(&cfg, &random_weights(&cfg), DType::F32);
    let x = randn(17, (2, 4, 8, 8), 0.0, 1.0, DType::F32);
    let ctx = randn(18, (2, 5, 12), 0.0, 1.0, DType::F32);
    let t = Tensor::new(&[10f32, 700.], &Device::Cpu).unwrap();
    let expected = unet.forward(&x, &t, &ctx).unwrap();

    let emb = unet.embed_time(&t, 2, None).unwrap();
    let mut h = unet.forward_conv_in(&x).unwrap();
    let mut skips = vec![h.clone()];
    for block in &unet.down_blocks {
        let (out, s) = block.forward(&h, &emb, &ctx).unwrap();
        skips.extend(s);
        h = out;
    }
    h = unet.mid_block.forward(&h, &emb, &ctx).unwrap();
    for (i, block) in unet.up_blocks.iter().enumerate() {
        let own = skips.split_off(skips.len() - block.resnets.len());
        let size = unet.upsample_size(i, &skips).unwrap();
        h = block.forward(&h, &own, &emb, &ctx, size).unwrap();
    }
    assert!(skips.is_empty());
    let out = unet.forward_conv_out(&h).unwrap();
    assert_eq!(rel_err(&out, &expected), 0.0);
}
