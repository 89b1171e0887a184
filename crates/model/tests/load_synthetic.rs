//! Model loading on synthetic files written by the test itself: single-file LDM checkpoints
//! (SD1, SD2/OpenCLIP, SDXL) with a small but complete key set, diffusers folders (variants,
//! shards, text-encoder key forms, pickles), and malformed safetensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sd_lora_model::load::{
    Architecture, AttentionHeads, Component, LoadError, LoadOptions, ModelSource, Prediction,
    PredictionSource, SourceFormat,
};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A scratch directory, removed when the test ends.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("sd-lora-load-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// Tensors whose values are distinct (offset + 0, 1, 2, ...) so a misplaced slice shows.
fn write(path: &Path, keys: &[(String, Vec<usize>)]) {
    let mut offset = 0f32;
    let mut map = HashMap::new();
    for (k, shape) in keys {
        let n: usize = shape.iter().product();
        let t = Tensor::arange(offset, offset + n as f32, &Device::Cpu)
            .unwrap()
            .reshape(shape.as_slice())
            .unwrap();
        offset += n as f32;
        map.insert(k.clone(), t);
    }
    candle_core::safetensors::save(&map, path).unwrap();
}

fn k(prefix: &str, name: &str, shape: &[usize]) -> (String, Vec<usize>) {
    (format!("{prefix}{name}"), shape.to_vec())
}

fn resblock(out: &mut Vec<(String, Vec<usize>)>, p: &str, cin: usize, c: usize, temb: usize) {
    out.push(k(p, "in_layers.0.weight", &[cin]));
    out.push(k(p, "in_layers.0.bias", &[cin]));
    out.push(k(p, "in_layers.2.weight", &[c, cin, 3, 3]));
    out.push(k(p, "in_layers.2.bias", &[c]));
    out.push(k(p, "emb_layers.1.weight", &[c, temb]));
    out.push(k(p, "emb_layers.1.bias", &[c]));
    out.push(k(p, "out_layers.0.weight", &[c]));
    out.push(k(p, "out_layers.0.bias", &[c]));
    out.push(k(p, "out_layers.3.weight", &[c, c, 3, 3]));
    out.push(k(p, "out_layers.3.bias", &[c]));
    if cin != c {
        out.push(k(p, "skip_connection.weight", &[c, cin, 1, 1]));
        out.push(k(p, "skip_connection.bias", &[c]));
    }
}

fn transformer(out: &mut Vec<(String, Vec<usize>)>, p: &str, c: usize, ctx: usize, linear: bool) {
    let proj: Vec<usize> = if linear { vec![c, c] } else { vec![c, c, 1, 1] };
    out.push(k(p, "norm.weight", &[c]));
    out.push(k(p, "norm.bias", &[c]));
    out.push(k(p, "proj_in.weight", &proj));
    out.push(k(p, "proj_in.bias", &[c]));
    let b = format!("{p}transformer_blocks.0.");
    for n in ["norm1", "norm2", "norm3"] {
        out.push(k(&b, &format!("{n}.weight"), &[c]));
        out.push(k(&b, &format!("{n}.bias"), &[c]));
    }
    for (attn, kv) in [("attn1", c), ("attn2", ctx)] {
        out.push(k(&b, &format!("{attn}.to_q.weight"), &[c, c]));
        out.push(k(&b, &format!("{attn}.to_k.weight"), &[c, kv]));
        out.push(k(&b, &format!("{attn}.to_v.weight"), &[c, kv]));
        out.push(k(&b, &format!("{attn}.to_out.0.weight"), &[c, c]));
        out.push(k(&b, &format!("{attn}.to_out.0.bias"), &[c]));
    }
    out.push(k(&b, "ff.net.0.proj.weight", &[8 * c, c]));
    out.push(k(&b, "ff.net.0.proj.bias", &[8 * c]));
    out.push(k(&b, "ff.net.2.weight", &[c, 4 * c]));
    out.push(k(&b, "ff.net.2.bias", &[c]));
    out.push(k(p, "proj_out.weight", &proj));
    out.push(k(p, "proj_out.bias", &[c]));
}

/// An LDM UNet key set: `channels` per level, `lpb` ResBlocks per level, attention where
/// `attention[level]`, context width `ctx`.
fn ldm_unet(
    channels: &[usize],
    lpb: usize,
    attention: &[bool],
    ctx: usize,
    linear: bool,
) -> Vec<(String, Vec<usize>)> {
    let p = "model.diffusion_model.";
    let (c0, temb) = (channels[0], 4 * channels[0]);
    let mut out = vec![
        k(p, "time_embed.0.weight", &[temb, c0]),
        k(p, "time_embed.0.bias", &[temb]),
        k(p, "time_embed.2.weight", &[temb, temb]),
        k(p, "time_embed.2.bias", &[temb]),
        k(p, "input_blocks.0.0.weight", &[c0, 4, 3, 3]),
        k(p, "input_blocks.0.0.bias", &[c0]),
    ];
    let mut i = 1;
    let mut prev = c0;
    for (level, &c) in channels.iter().enumerate() {
        for _ in 0..lpb {
            resblock(&mut out, &format!("{p}input_blocks.{i}.0."), prev, c, temb);
            if attention[level] {
                transformer(&mut out, &format!("{p}input_blocks.{i}.1."), c, ctx, linear);
            }
            prev = c;
            i += 1;
        }
        if level + 1 < channels.len() {
            out.push(k(
                p,
                &format!("input_blocks.{i}.0.op.weight"),
                &[c, c, 3, 3],
            ));
            out.push(k(p, &format!("input_blocks.{i}.0.op.bias"), &[c]));
            i += 1;
        }
    }
    let cl = *channels.last().unwrap();
    resblock(&mut out, &format!("{p}middle_block.0."), cl, cl, temb);
    transformer(&mut out, &format!("{p}middle_block.1."), cl, ctx, linear);
    resblock(&mut out, &format!("{p}middle_block.2."), cl, cl, temb);
    let mut i = 0;
    for (up, level) in (0..channels.len()).rev().enumerate() {
        let c = channels[level];
        for r in 0..=lpb {
            resblock(
                &mut out,
                &format!("{p}output_blocks.{i}.0."),
                2 * c,
                c,
                temb,
            );
            let mut j = 1;
            if attention[level] {
                transformer(
                    &mut out,
                    &format!("{p}output_blocks.{i}.1."),
                    c,
                    ctx,
                    linear,
                );
                j = 2;
            }
            if r == lpb && up + 1 < channels.len() {
                out.push(k(
                    p,
                    &format!("output_blocks.{i}.{j}.conv.weight"),
                    &[c, c, 3, 3],
                ));
                out.push(k(p, &format!("output_blocks.{i}.{j}.conv.bias"), &[c]));
            }
            i += 1;
        }
    }
    out.push(k(p, "out.0.weight", &[c0]));
    out.push(k(p, "out.0.bias", &[c0]));
    out.push(k(p, "out.2.weight", &[4, c0, 3, 3]));
    out.push(k(p, "out.2.bias", &[4]));
    out
}

fn vae_resblock(out: &mut Vec<(String, Vec<usize>)>, p: &str, cin: usize, c: usize) {
    out.push(k(p, "norm1.weight", &[cin]));
    out.push(k(p, "norm1.bias", &[cin]));
    out.push(k(p, "conv1.weight", &[c, cin, 3, 3]));
    out.push(k(p, "conv1.bias", &[c]));
    out.push(k(p, "norm2.weight", &[c]));
    out.push(k(p, "norm2.bias", &[c]));
    out.push(k(p, "conv2.weight", &[c, c, 3, 3]));
    out.push(k(p, "conv2.bias", &[c]));
    if cin != c {
        out.push(k(p, "nin_shortcut.weight", &[c, cin, 1, 1]));
        out.push(k(p, "nin_shortcut.bias", &[c]));
    }
}

/// An LDM VAE key set (`first_stage_model.*`), latent channels 4.
fn ldm_vae(channels: &[usize], lpb: usize) -> Vec<(String, Vec<usize>)> {
    let p = "first_stage_model.";
    let (c0, cl, z) = (channels[0], *channels.last().unwrap(), 4);
    let mut out = vec![
        k(p, "encoder.conv_in.weight", &[c0, 3, 3, 3]),
        k(p, "encoder.conv_in.bias", &[c0]),
    ];
    let mut prev = c0;
    for (i, &c) in channels.iter().enumerate() {
        for j in 0..lpb {
            vae_resblock(
                &mut out,
                &format!("{p}encoder.down.{i}.block.{j}."),
                prev,
                c,
            );
            prev = c;
        }
        if i + 1 < channels.len() {
            out.push(k(
                p,
                &format!("encoder.down.{i}.downsample.conv.weight"),
                &[c, c, 3, 3],
            ));
            out.push(k(
                p,
                &format!("encoder.down.{i}.downsample.conv.bias"),
                &[c],
            ));
        }
    }
    for coder in ["encoder", "decoder"] {
        vae_resblock(&mut out, &format!("{p}{coder}.mid.block_1."), cl, cl);
        vae_resblock(&mut out, &format!("{p}{coder}.mid.block_2."), cl, cl);
        let a = format!("{p}{coder}.mid.attn_1.");
        out.push(k(&a, "norm.weight", &[cl]));
        out.push(k(&a, "norm.bias", &[cl]));
        for n in ["q", "k", "v", "proj_out"] {
            out.push(k(&a, &format!("{n}.weight"), &[cl, cl, 1, 1]));
            out.push(k(&a, &format!("{n}.bias"), &[cl]));
        }
        out.push(k(
            p,
            &format!("{coder}.norm_out.weight"),
            &[if coder == "encoder" { cl } else { c0 }],
        ));
        out.push(k(
            p,
            &format!("{coder}.norm_out.bias"),
            &[if coder == "encoder" { cl } else { c0 }],
        ));
    }
    out.push(k(p, "encoder.conv_out.weight", &[2 * z, cl, 3, 3]));
    out.push(k(p, "encoder.conv_out.bias", &[2 * z]));
    out.push(k(p, "quant_conv.weight", &[2 * z, 2 * z, 1, 1]));
    out.push(k(p, "quant_conv.bias", &[2 * z]));
    out.push(k(p, "post_quant_conv.weight", &[z, z, 1, 1]));
    out.push(k(p, "post_quant_conv.bias", &[z]));
    out.push(k(p, "decoder.conv_in.weight", &[cl, z, 3, 3]));
    out.push(k(p, "decoder.conv_in.bias", &[cl]));
    let mut prev = cl;
    for i in (0..channels.len()).rev() {
        let c = channels[i];
        for j in 0..=lpb {
            vae_resblock(&mut out, &format!("{p}decoder.up.{i}.block.{j}."), prev, c);
            prev = c;
        }
        if i > 0 {
            out.push(k(
                p,
                &format!("decoder.up.{i}.upsample.conv.weight"),
                &[c, c, 3, 3],
            ));
            out.push(k(p, &format!("decoder.up.{i}.upsample.conv.bias"), &[c]));
        }
    }
    out.push(k(p, "decoder.conv_out.weight", &[3, c0, 3, 3]));
    out.push(k(p, "decoder.conv_out.bias", &[3]));
    out
}

/// CLIP text model keys (transformers names, without any prefix before `text_model.`).
fn clip_text(hidden: usize, layers: usize, vocab: usize) -> Vec<(String, Vec<usize>)> {
    let mut out = vec![
        k(
            "",
            "text_model.embeddings.token_embedding.weight",
            &[vocab, hidden],
        ),
        k(
            "",
            "text_model.embeddings.position_embedding.weight",
            &[77, hidden],
        ),
        k("", "text_model.final_layer_norm.weight", &[hidden]),
        k("", "text_model.final_layer_norm.bias", &[hidden]),
    ];
    for n in 0..layers {
        let p = format!("text_model.encoder.layers.{n}.");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            out.push(k(
                &p,
                &format!("self_attn.{proj}.weight"),
                &[hidden, hidden],
            ));
            out.push(k(&p, &format!("self_attn.{proj}.bias"), &[hidden]));
        }
        for ln in ["layer_norm1", "layer_norm2"] {
            out.push(k(&p, &format!("{ln}.weight"), &[hidden]));
            out.push(k(&p, &format!("{ln}.bias"), &[hidden]));
        }
        out.push(k(&p, "mlp.fc1.weight", &[4 * hidden, hidden]));
        out.push(k(&p, "mlp.fc1.bias", &[4 * hidden]));
        out.push(k(&p, "mlp.fc2.weight", &[hidden, 4 * hidden]));
        out.push(k(&p, "mlp.fc2.bias", &[hidden]));
    }
    out
}

/// OpenCLIP text tower keys under `cond_stage_model.model.`.
fn open_clip_text(hidden: usize, layers: usize, vocab: usize) -> Vec<(String, Vec<usize>)> {
    let p = "cond_stage_model.model.";
    let mut out = vec![
        k(p, "token_embedding.weight", &[vocab, hidden]),
        k(p, "positional_embedding", &[77, hidden]),
        k(p, "ln_final.weight", &[hidden]),
        k(p, "ln_final.bias", &[hidden]),
        k(p, "text_projection", &[hidden, 2 * hidden]),
        k(p, "logit_scale", &[]),
    ];
    for n in 0..layers {
        let r = format!("{p}transformer.resblocks.{n}.");
        out.push(k(&r, "attn.in_proj_weight", &[3 * hidden, hidden]));
        out.push(k(&r, "attn.in_proj_bias", &[3 * hidden]));
        out.push(k(&r, "attn.out_proj.weight", &[hidden, hidden]));
        out.push(k(&r, "attn.out_proj.bias", &[hidden]));
        for ln in ["ln_1", "ln_2"] {
            out.push(k(&r, &format!("{ln}.weight"), &[hidden]));
            out.push(k(&r, &format!("{ln}.bias"), &[hidden]));
        }
        out.push(k(&r, "mlp.c_fc.weight", &[4 * hidden, hidden]));
        out.push(k(&r, "mlp.c_fc.bias", &[4 * hidden]));
        out.push(k(&r, "mlp.c_proj.weight", &[hidden, 4 * hidden]));
        out.push(k(&r, "mlp.c_proj.bias", &[hidden]));
    }
    out
}

fn numel(keys: &[(String, Vec<usize>)], prefix: &str) -> u64 {
    keys.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn groups_override() -> LoadOptions {
    let mut options = LoadOptions::default();
    for c in [Component::Unet, Component::Vae] {
        let mut m = serde_json::Map::new();
        m.insert("norm_num_groups".into(), json!(4));
        options.config_overrides.insert(c, m);
    }
    options
}

// ---------------------------------------------------------------------------------------------
// Single files
// ---------------------------------------------------------------------------------------------

#[test]
fn sd1_single_file_is_detected_renamed_and_its_config_inferred() {
    let dir = temp_dir("sd1");
    let path = dir.join("sd1.safetensors");
    let mut keys = ldm_unet(&[8, 16], 1, &[true, false], 12, false);
    keys.extend(ldm_vae(&[8, 16], 1));
    let text: Vec<_> = clip_text(64, 2, 50)
        .into_iter()
        .map(|(k, s)| (format!("cond_stage_model.transformer.{k}"), s))
        .collect();
    keys.extend(text);
    keys.push(k(
        "",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        &[1, 77],
    ));
    keys.push(k("", "alphas_cumprod", &[1000]));
    write(&path, &keys);

    // 8 and 16 channels cannot use SD's 32 groups: inference says so and names the option.
    let source = ModelSource::open(&path).unwrap();
    let err = source.config(Component::Unet).unwrap_err();
    assert!(matches!(err, LoadError::CannotInfer { .. }), "{err}");
    assert!(err.to_string().contains("norm_num_groups"), "{err}");

    let source = ModelSource::open_with(&path, groups_override()).unwrap();
    assert_eq!(source.format(), SourceFormat::SingleFile);
    assert_eq!(source.architecture(), Architecture::Sd1);
    assert_eq!(source.prediction(), Prediction::Epsilon);
    assert_eq!(source.prediction_source(), PredictionSource::AssumedDefault);
    assert_eq!(
        source.components(),
        [Component::Unet, Component::Vae, Component::TextEncoder]
    );

    let unet = source.component(Component::Unet).unwrap();
    let c = &unet.config;
    assert_eq!(c["block_out_channels"], json!([8, 16]));
    assert_eq!(c["layers_per_block"], json!(1));
    assert_eq!(
        c["down_block_types"],
        json!(["CrossAttnDownBlock2D", "DownBlock2D"])
    );
    assert_eq!(
        c["up_block_types"],
        json!(["UpBlock2D", "CrossAttnUpBlock2D"])
    );
    assert_eq!(c["cross_attention_dim"], json!(12));
    assert_eq!(c["use_linear_projection"], json!(false));
    assert_eq!(c["attention_head_dim"], json!(8));
    assert_eq!(c["in_channels"], json!(4));
    assert_eq!(c["out_channels"], json!(4));
    assert_eq!(c["norm_num_groups"], json!(4));
    assert_eq!(c["mid_block_type"], json!("UNetMidBlock2DCrossAttn"));
    assert_eq!(c["transformer_layers_per_block"], json!(1));
    // Every LDM UNet tensor converted, once, with no loss of parameters.
    assert_eq!(
        unet.weights.len(),
        numel_count(&keys, "model.diffusion_model.")
    );
    assert_eq!(
        unet.weights.parameter_count(),
        numel(&keys, "model.diffusion_model.")
    );
    for key in [
        "conv_in.weight",
        "down_blocks.0.resnets.0.norm1.weight",
        "down_blocks.0.attentions.0.proj_in.weight",
        "down_blocks.0.downsamplers.0.conv.weight",
        "down_blocks.1.resnets.0.conv_shortcut.weight",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "up_blocks.0.resnets.1.conv2.weight",
        "up_blocks.0.upsamplers.0.conv.weight",
        "up_blocks.1.attentions.1.proj_out.bias",
        "conv_norm_out.weight",
    ] {
        assert!(unet.weights.contains(key), "{key}");
    }

    let vae = source.component(Component::Vae).unwrap();
    assert_eq!(vae.config["block_out_channels"], json!([8, 16]));
    assert_eq!(vae.config["layers_per_block"], json!(1));
    assert_eq!(vae.config["latent_channels"], json!(4));
    assert_eq!(vae.config["in_channels"], json!(3));
    assert_eq!(vae.config["out_channels"], json!(3));
    assert_eq!(
        vae.weights.parameter_count(),
        numel(&keys, "first_stage_model.")
    );
    // 1x1 conv attention weights become Linear weights, same values.
    let q = vae
        .weights
        .load(
            "encoder.mid_block.attentions.0.to_q.weight",
            &Device::Cpu,
            None,
        )
        .unwrap();
    assert_eq!(q.dims(), [16, 16]);
    let file = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert_eq!(
        values(&q),
        values(&file["first_stage_model.encoder.mid.attn_1.q.weight"])
    );
    // Decoder levels reversed: LDM up.1 (16 channels) is diffusers up_blocks.0.
    assert_eq!(
        vae.weights
            .get("decoder.up_blocks.0.resnets.0.conv1.weight")
            .unwrap()
            .shape(),
        [16, 16, 3, 3]
    );
    assert_eq!(
        vae.weights
            .get("decoder.up_blocks.0.upsamplers.0.conv.weight")
            .unwrap()
            .source_key(),
        "first_stage_model.decoder.up.1.upsample.conv.weight"
    );

    let te = source.component(Component::TextEncoder).unwrap();
    assert_eq!(te.config["hidden_size"], json!(64));
    assert_eq!(te.config["num_attention_heads"], json!(1));
    assert_eq!(te.config["num_hidden_layers"], json!(2));
    assert_eq!(te.config["intermediate_size"], json!(256));
    assert_eq!(te.config["vocab_size"], json!(50));
    assert_eq!(te.config["hidden_act"], json!("quick_gelu"));
    assert!(!te.weights.contains("text_model.embeddings.position_ids"));
    assert_eq!(
        te.weights.parameter_count(),
        numel(&keys, "cond_stage_model.") - 77
    );

    let info = source.inspect();
    assert_eq!(info.architecture, Architecture::Sd1);
    assert_eq!(info.dtypes, ["F32"]);
    assert_eq!(
        info.total_parameters,
        numel(&keys, "model.")
            + numel(&keys, "first_stage_model.")
            + numel(&keys, "cond_stage_model.")
            - 77
    );
    let json = serde_json::to_value(&info).unwrap();
    assert_eq!(json["architecture"], json!("sd1"));
    assert_eq!(json["prediction"], json!("epsilon"));
    assert_eq!(json["prediction_source"], json!("assumed_default"));
    assert_eq!(json["components"][0]["component"], json!("unet"));

    // The VarBuilder view checks shapes and names both keys in the error.
    let vb = source
        .weights(Component::Unet)
        .unwrap()
        .clone()
        .into_var_builder(DType::F32, &Device::Cpu);
    assert_eq!(
        vb.get((8, 4, 3, 3), "conv_in.weight").unwrap().dims(),
        [8, 4, 3, 3]
    );
    let err = vb.get((8, 4), "conv_in.weight").unwrap_err().to_string();
    assert!(
        err.contains("model.diffusion_model.input_blocks.0.0.weight"),
        "{err}"
    );
    assert!(err.contains("[8, 4, 3, 3]"), "{err}");
}

fn numel_count(keys: &[(String, Vec<usize>)], prefix: &str) -> usize {
    keys.iter().filter(|(k, _)| k.starts_with(prefix)).count()
}

#[test]
fn sd2_single_file_splits_qkv_drops_the_last_layer_and_infers_heads_per_level() {
    let dir = temp_dir("sd2");
    let path = dir.join("sd2.safetensors");
    let mut keys = ldm_unet(&[64, 128], 2, &[true, true], 64, true);
    keys.extend(open_clip_text(64, 3, 40));
    write(&path, &keys);
    let options = LoadOptions {
        prediction: Some(Prediction::V),
        ..groups_override()
    };
    let source = ModelSource::open_with(&path, options).unwrap();
    assert_eq!(source.architecture(), Architecture::Sd2);
    assert_eq!(source.prediction(), Prediction::V);
    assert_eq!(source.prediction_source(), PredictionSource::Option);
    assert_eq!(
        source.components(),
        [Component::Unet, Component::TextEncoder]
    );

    let unet = source.config(Component::Unet).unwrap();
    assert_eq!(unet["attention_head_dim"], json!([1, 2]));
    assert_eq!(unet["use_linear_projection"], json!(true));
    assert_eq!(unet["layers_per_block"], json!(2));
    assert_eq!(unet["upcast_attention"], json!(true));
    assert_eq!(unet["sample_size"], json!(96));

    let te = source.component(Component::TextEncoder).unwrap();
    assert_eq!(te.config["num_hidden_layers"], json!(2));
    assert_eq!(te.config["hidden_act"], json!("gelu"));
    assert_eq!(te.config["projection_dim"], json!(128));
    assert!(!te.weights.keys().any(|k| k.contains("layers.2.")));
    assert!(!te.weights.contains("text_projection.weight"));
    let file = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let stacked =
        values(&file["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]);
    for (i, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
        let t = te
            .weights
            .load(
                &format!("text_model.encoder.layers.1.self_attn.{proj}.weight"),
                &Device::Cpu,
                None,
            )
            .unwrap();
        assert_eq!(t.dims(), [64, 64]);
        assert_eq!(values(&t), stacked[i * 64 * 64..(i + 1) * 64 * 64]);
        let b = te
            .weights
            .load(
                &format!("text_model.encoder.layers.1.self_attn.{proj}.bias"),
                &Device::Cpu,
                Some(DType::F16),
            )
            .unwrap();
        assert_eq!(b.dtype(), DType::F16);
    }
    // Parameters: the converted 2 layers + embeddings + final norm; not the dropped layer,
    // text_projection or logit_scale.
    let per_layer = numel(&keys, "cond_stage_model.model.transformer.resblocks.0.");
    assert_eq!(
        te.weights.parameter_count(),
        2 * per_layer + (40 * 64 + 77 * 64 + 2 * 64) as u64
    );
    assert!(source.notes().iter().any(|n| n.contains("penultimate")));

    // The SD2 head rule needs widths that are multiples of 64; a tiny UNet asks for heads.
    let small = dir.join("small.safetensors");
    let mut keys = ldm_unet(&[8, 16], 1, &[true, true], 64, true);
    keys.extend(open_clip_text(32, 2, 40));
    write(&small, &keys);
    let source = ModelSource::open_with(&small, groups_override()).unwrap();
    let err = source.config(Component::Unet).unwrap_err().to_string();
    assert!(err.contains("unet_attention_heads"), "{err}");
    let err = source
        .config(Component::TextEncoder)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("text_encoder_heads") && err.contains("32"),
        "{err}"
    );
    let options = LoadOptions {
        unet_attention_heads: Some(AttentionHeads::HeadDim(4)),
        text_encoder_heads: Some(4),
        ..groups_override()
    };
    let source = ModelSource::open_with(&small, options).unwrap();
    assert_eq!(
        source.config(Component::Unet).unwrap()["attention_head_dim"],
        json!([2, 4])
    );
    assert_eq!(
        source.config(Component::TextEncoder).unwrap()["num_attention_heads"],
        json!(4)
    );
}

#[test]
fn sdxl_single_file_is_recognised_counted_and_converted() {
    let dir = temp_dir("sdxl");
    let path = dir.join("sdxl.safetensors");
    let mut keys = ldm_unet(&[8, 16], 1, &[false, true], 24, true);
    keys.push(k(
        "",
        "model.diffusion_model.label_emb.0.0.weight",
        &[32, 16],
    ));
    keys.extend(
        clip_text(8, 1, 10)
            .into_iter()
            .map(|(k, s)| (format!("conditioner.embedders.0.transformer.{k}"), s)),
    );
    keys.push(k(
        "",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        &[1, 77],
    ));
    keys.extend(open_clip_text(16, 2, 10).into_iter().map(|(k, s)| {
        (
            k.replace("cond_stage_model.model.", "conditioner.embedders.1.model."),
            s,
        )
    }));
    write(&path, &keys);
    let source = ModelSource::open(&path).unwrap();
    assert_eq!(source.architecture(), Architecture::Sdxl);
    // OpenCLIP-bigG is converted whole: every layer, q/k/v split.
    let te2 = source.weights(Component::TextEncoder2).unwrap();
    assert!(te2.contains("text_model.encoder.layers.1.self_attn.q_proj.weight"));
    assert!(
        source
            .weights(Component::Unet)
            .unwrap()
            .contains("add_embedding.linear_1.weight")
    );
    let info = source.inspect();
    let counts: Vec<_> = info
        .components
        .iter()
        .map(|c| (c.component, c.parameters))
        .collect();
    let te2 = numel(&keys, "conditioner.embedders.1.") - 1; // minus logit_scale
    assert_eq!(
        counts,
        [
            (Component::Unet, numel(&keys, "model.diffusion_model.")),
            (
                Component::TextEncoder,
                numel(&keys, "conditioner.embedders.0.") - 77
            ),
            (Component::TextEncoder2, te2),
        ]
    );
}

#[test]
fn files_that_are_not_base_models_say_what_they_are() {
    let dir = temp_dir("notmodel");
    let lora = dir.join("lora.safetensors");
    write(
        &lora,
        &[k(
            "",
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
            &[4, 8],
        )],
    );
    let err = ModelSource::open(&lora).unwrap_err().to_string();
    assert!(
        err.contains("LoRA") && err.contains("lora.safetensors"),
        "{err}"
    );
    let part = dir.join("unet.safetensors");
    write(
        &part,
        &[k("", "down_blocks.0.resnets.0.conv1.weight", &[4, 4, 3, 3])],
    );
    let err = ModelSource::open(&part).unwrap_err().to_string();
    assert!(err.contains("diffusers"), "{err}");
    let other = dir.join("model.gguf");
    std::fs::write(&other, b"GGUF").unwrap();
    let err = ModelSource::open(&other).unwrap_err().to_string();
    assert!(err.contains(".safetensors"), "{err}");
    let missing = ModelSource::open(dir.join("nope.safetensors")).unwrap_err();
    assert!(matches!(missing, LoadError::NotFound { .. }), "{missing}");

    // Other model families are named, and what is supported is said.
    let sd3 = dir.join("sd3.safetensors");
    write(
        &sd3,
        &[k(
            "model.diffusion_model.",
            "joint_blocks.0.x_block.attn.qkv.weight",
            &[12, 4],
        )],
    );
    let flux = dir.join("flux.safetensors");
    write(
        &flux,
        &[
            k("", "double_blocks.0.img_attn.qkv.weight", &[12, 4]),
            k("", "single_blocks.0.linear1.weight", &[12, 4]),
        ],
    );
    for (file, name) in [(&sd3, "Stable Diffusion 3"), (&flux, "Flux")] {
        let err = ModelSource::open(file).unwrap_err().to_string();
        assert!(
            err.contains(name) && err.contains("SD1.x, SD2.x and SDXL"),
            "{err}"
        );
    }
    // An inpainting UNet (9 input channels) is refused before any weight is read.
    let inpaint = dir.join("inpaint.safetensors");
    let mut keys = ldm_unet(&[8, 16], 1, &[true, false], 12, false);
    for (key, shape) in &mut keys {
        if key.ends_with("input_blocks.0.0.weight") {
            shape[1] = 9;
        }
    }
    write(&inpaint, &keys);
    let err = ModelSource::open(&inpaint).unwrap_err().to_string();
    assert!(err.contains("inpainting UNet (9 input channels"), "{err}");
    // An SDXL refiner opens for `inspect`; asking for its weights (what
    // train and generate do first) names it and what is supported.
    let refiner = dir.join("refiner.safetensors");
    write(
        &refiner,
        &[
            k(
                "model.diffusion_model.",
                "input_blocks.0.0.weight",
                &[8, 4, 3, 3],
            ),
            k("conditioner.embedders.0.model.", "ln_final.weight", &[4]),
        ],
    );
    let src = ModelSource::open(&refiner).unwrap();
    let err = src
        .weights(sd_lora_model::load::Component::Unet)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("SDXL refiner") && err.contains("SD1.x, SD2.x and SDXL base"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Pickles and malformed files
// ---------------------------------------------------------------------------------------------

#[test]
fn pickles_are_refused_before_reading_with_advice() {
    // The files do not exist: the refusal cannot have read them.
    for name in [
        "model.ckpt",
        "model.pt",
        "model.pth",
        "pytorch_model.bin",
        "MODEL.CKPT",
    ] {
        let path = std::env::temp_dir().join("sd-lora-no-such-dir").join(name);
        let err = ModelSource::open(&path).unwrap_err();
        assert!(
            matches!(err, LoadError::PickleRefused { .. }),
            "{name}: {err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(name), "{msg}");
        assert!(msg.contains("execute arbitrary code"), "{msg}");
        assert!(msg.contains("safetensors"), "{msg}");
    }
    // A torch.save zip renamed to .safetensors is called a pickle, not "invalid header".
    let dir = temp_dir("pickle");
    let path = dir.join("renamed.safetensors");
    std::fs::write(&path, b"PK\x03\x04 zip archive of a torch pickle").unwrap();
    let err = ModelSource::open(&path).unwrap_err();
    assert!(matches!(err, LoadError::PickleRefused { .. }), "{err}");
    std::fs::write(&path, b"\x80\x02}q\x00(X\x05\x00\x00\x00state_dict").unwrap();
    let err = ModelSource::open(&path).unwrap_err();
    assert!(matches!(err, LoadError::PickleRefused { .. }), "{err}");
    // A genuine safetensors whose header length starts with byte 0x80 is not a pickle.
    let header = format!(
        "{{\"__metadata__\":{{\"pad\":\"{}\"}}}}",
        "x".repeat(128 - 27)
    );
    assert_eq!(header.len(), 128);
    let mut bytes = 128u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    std::fs::write(&path, bytes).unwrap();
    let err = ModelSource::open(&path).unwrap_err();
    assert!(matches!(err, LoadError::NotAModel { .. }), "{err}");
}

#[test]
fn malformed_safetensors_give_clear_errors() {
    let dir = temp_dir("malformed");
    let good = dir.join("good.safetensors");
    write(&good, &[k("", "model.diffusion_model.x", &[4, 4])]);
    let bytes = std::fs::read(&good).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;

    let header = |json: &str| {
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(json.as_bytes());
        b
    };
    let mut huge = (1u64 << 20).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    let mut past_limit = u64::MAX.to_le_bytes().to_vec();
    past_limit.extend_from_slice(b"{}");
    let mut bad_offsets = header(r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,8]}}"#);
    bad_offsets.extend_from_slice(&[0u8; 16]);
    let mut bad_dtype = header(r#"{"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,2]}}"#);
    bad_dtype.extend_from_slice(&[0u8; 2]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "empty"),
        ("short", vec![1, 2, 3], "fewer than the 8-byte"),
        ("huge_header", huge, "runs past the end"),
        ("past_limit", past_limit, "100 MB"),
        ("bad_json", header("{not json"), "not valid JSON"),
        ("not_object", header("[1, 2]"), "not a JSON object"),
        ("truncated", bytes[..bytes.len() - 10].to_vec(), "truncated"),
        (
            "truncated_header",
            bytes[..8 + header_len / 2].to_vec(),
            "runs past the end",
        ),
        ("bad_offsets", bad_offsets, "needs 16"),
        ("bad_dtype", bad_dtype, "unknown dtype"),
    ];
    for (name, content, expected) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        std::fs::write(&path, &content).unwrap();
        let err = ModelSource::open(&path).unwrap_err();
        assert!(matches!(err, LoadError::Malformed { .. }), "{name}: {err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("{name}.safetensors")),
            "{name}: {msg}"
        );
        assert!(msg.contains(expected), "{name}: {msg}");
    }
}

// ---------------------------------------------------------------------------------------------
// diffusers folders
// ---------------------------------------------------------------------------------------------

/// A minimal diffusers folder: UNet/VAE weights need not be real for loading tests.
fn folder(root: &Path, text_prefix: &str, scheduler: Option<&str>) {
    std::fs::create_dir_all(root).unwrap();
    std::fs::write(
        root.join("model_index.json"),
        json!({
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "safety_checker": [null, null],
        })
        .to_string(),
    )
    .unwrap();
    for (name, config, file, keys) in [
        (
            "unet",
            json!({"cross_attention_dim": 8}),
            "diffusion_pytorch_model.safetensors",
            vec![k("", "conv_in.weight", &[8, 4, 3, 3])],
        ),
        (
            "vae",
            json!({"latent_channels": 4}),
            "diffusion_pytorch_model.safetensors",
            vec![k("", "encoder.conv_in.weight", &[8, 3, 3, 3])],
        ),
        (
            "text_encoder",
            json!({"hidden_act": "quick_gelu", "hidden_size": 8}),
            "model.safetensors",
            clip_text(8, 1, 10)
                .into_iter()
                .map(|(k, s)| (k.replacen("text_model.", text_prefix, 1), s))
                .chain([(format!("{text_prefix}embeddings.position_ids"), vec![1, 77])])
                .collect(),
        ),
    ] {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        write(&dir.join(file), &keys);
    }
    std::fs::create_dir_all(root.join("tokenizer")).unwrap();
    if let Some(prediction) = scheduler {
        std::fs::create_dir_all(root.join("scheduler")).unwrap();
        std::fs::write(
            root.join("scheduler/scheduler_config.json"),
            json!({"prediction_type": prediction}).to_string(),
        )
        .unwrap();
    }
}

#[test]
fn text_encoder_keys_with_and_without_text_model_prefix_load_the_same() {
    let root = temp_dir("prefix");
    folder(&root.join("with"), "text_model.", Some("v_prediction"));
    folder(&root.join("without"), "", Some("v_prediction"));
    let a = ModelSource::open(root.join("with")).unwrap();
    let b = ModelSource::open(root.join("without/model_index.json")).unwrap();
    assert_eq!(a.format(), SourceFormat::DiffusersFolder);
    assert_eq!(a.prediction(), Prediction::V);
    assert_eq!(a.prediction_source(), PredictionSource::SchedulerConfig);
    assert!(a.tokenizer_dir(Component::TextEncoder).is_some());
    let (wa, wb) = (
        a.weights(Component::TextEncoder).unwrap(),
        b.weights(Component::TextEncoder).unwrap(),
    );
    assert_eq!(wa.keys().collect::<Vec<_>>(), wb.keys().collect::<Vec<_>>());
    assert!(wa.keys().all(|k| k.starts_with("text_model.")));
    assert!(!wa.contains("text_model.embeddings.position_ids"));
    for key in wa.keys() {
        let (x, y) = (
            wa.load(key, &Device::Cpu, None).unwrap(),
            wb.load(key, &Device::Cpu, None).unwrap(),
        );
        assert_eq!(values(&x), values(&y), "{key}");
    }
    assert_eq!(a.inspect().components, {
        let mut c = b.inspect().components;
        for (x, y) in c.iter_mut().zip(a.inspect().components) {
            x.files = y.files;
        }
        c
    });
    let err = a
        .component(Component::TextEncoder2)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("text_encoder_2") && err.contains("unet, vae, text_encoder"),
        "{err}"
    );
}

#[test]
fn variants_prefer_full_precision_unless_asked() {
    let root = temp_dir("variants");
    folder(&root, "text_model.", None);
    let unet = root.join("unet");
    let mut fp16 = HashMap::new();
    fp16.insert(
        "conv_in.weight".to_string(),
        Tensor::zeros((8, 4, 3, 3), DType::F16, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&fp16, unet.join("diffusion_pytorch_model.fp16.safetensors"))
        .unwrap();

    let full = ModelSource::open(&root).unwrap();
    assert_eq!(full.weights(Component::Unet).unwrap().dtypes(), ["F32"]);
    assert_eq!(full.prediction_source(), PredictionSource::AssumedDefault);
    let options = LoadOptions {
        variant: Some("fp16".into()),
        ..LoadOptions::default()
    };
    let half = ModelSource::open_with(&root, options).unwrap();
    assert_eq!(half.weights(Component::Unet).unwrap().dtypes(), ["F16"]);
    // The VAE has no fp16 file: full precision, with a note.
    assert_eq!(half.weights(Component::Vae).unwrap().dtypes(), ["F32"]);
    assert!(
        half.notes()
            .iter()
            .any(|n| n.contains("vae: no fp16 variant")),
        "{:?}",
        half.notes()
    );
    let info = half.inspect();
    assert_eq!(info.dtypes, ["F16", "F32"]);

    // Only the fp16 file: used, and said.
    std::fs::remove_file(unet.join("diffusion_pytorch_model.safetensors")).unwrap();
    let only = ModelSource::open(&root).unwrap();
    assert_eq!(only.weights(Component::Unet).unwrap().dtypes(), ["F16"]);
    assert!(
        only.notes()
            .iter()
            .any(|n| n.contains("using the fp16 variant"))
    );
}

#[test]
fn sharded_weights_are_joined_and_checked_against_the_index() {
    let root = temp_dir("shards");
    folder(&root, "text_model.", None);
    let unet = root.join("unet");
    std::fs::remove_file(unet.join("diffusion_pytorch_model.safetensors")).unwrap();
    write(
        &unet.join("diffusion_pytorch_model-00001-of-00002.safetensors"),
        &[k("", "a.weight", &[2, 3])],
    );
    write(
        &unet.join("diffusion_pytorch_model-00002-of-00002.safetensors"),
        &[k("", "b.weight", &[5])],
    );
    let index = json!({"metadata": {}, "weight_map": {
        "a.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
        "b.weight": "diffusion_pytorch_model-00002-of-00002.safetensors",
    }});
    std::fs::write(
        unet.join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let source = ModelSource::open(&root).unwrap();
    let w = source.weights(Component::Unet).unwrap();
    assert_eq!(w.keys().collect::<Vec<_>>(), ["a.weight", "b.weight"]);
    assert_eq!(w.parameter_count(), 11);
    assert_eq!(w.files().len(), 2);

    let index = json!({"weight_map": {
        "a.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
        "c.weight": "diffusion_pytorch_model-00002-of-00002.safetensors",
    }});
    std::fs::write(
        unet.join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let err = ModelSource::open(&root).unwrap_err().to_string();
    assert!(
        err.contains("c.weight") && err.contains("00002-of-00002"),
        "{err}"
    );
}

#[test]
fn folders_with_only_pickled_weights_are_refused_naming_the_file() {
    let root = temp_dir("binonly");
    folder(&root, "text_model.", None);
    let te = root.join("text_encoder");
    std::fs::remove_file(te.join("model.safetensors")).unwrap();
    std::fs::write(te.join("pytorch_model.bin"), b"\x80\x02 pickle").unwrap();
    let err = ModelSource::open(&root).unwrap_err();
    assert!(matches!(err, LoadError::PickleRefused { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("text_encoder") && msg.contains("pytorch_model.bin"),
        "{msg}"
    );
    assert!(msg.contains("execute arbitrary code"), "{msg}");

    std::fs::remove_file(te.join("pytorch_model.bin")).unwrap();
    let err = ModelSource::open(&root).unwrap_err();
    assert!(matches!(err, LoadError::MissingWeights { .. }), "{err}");

    std::fs::remove_file(te.join("config.json")).unwrap();
    let err = ModelSource::open(&root).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
    let err = ModelSource::open(root.join("unet"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("model_index.json"), "{err}");
}

#[test]
fn unknown_prediction_types_are_refused() {
    let root = temp_dir("sample");
    folder(&root, "text_model.", Some("sample"));
    let err = ModelSource::open(&root).unwrap_err().to_string();
    assert!(
        err.contains("scheduler_config.json") && err.contains("sample"),
        "{err}"
    );
}

#[test]
fn errors_and_sources_can_cross_threads() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<LoadError>();
    assert_send_sync::<ModelSource>();
    assert_send_sync::<sd_lora_model::load::ComponentWeights>();
}
