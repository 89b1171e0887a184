//! SDXL against diffusers + transformers on the tiny SDXL fixture
//! (`tools/make_sdxl_fixtures.py`; sizes deliberately not SDXL's): the
//! diffusers folder and the sgm single file both load, agree on every
//! converted tensor and parameter count, and reproduce the reference — both
//! text encoders, `encode_prompt`'s context and pooled embedding, the UNet with
//! `add_time_ids` (outputs and input gradients), the VAE with its 0.13025
//! scale.

use candle_core::{DType, Device, Tensor, Var};
use sd_lora_model::conditioning::SizeCond;
use sd_lora_model::load::{Architecture, AttentionHeads, Component, LoadOptions, ModelSource};
use sd_lora_model::pipeline::StableDiffusion;
use std::collections::HashMap;
use std::path::Path;

#[path = "support/fixtures.rs"]
mod support;
use support::{fixtures, rel_err, tiny_options};

/// What the tiny SDXL fixture chose that its single file's weights cannot
/// show: the common tiny settings, the UNet's heads per level and the second
/// text encoder's heads.
fn tiny_sdxl_options() -> LoadOptions {
    LoadOptions {
        text_encoder_2_heads: Some(4),
        ..tiny_options(AttentionHeads::PerLevel(vec![2, 4, 4]), None)
    }
}

fn reference() -> HashMap<String, Tensor> {
    let p = fixtures().join("reference/sdxl_tiny.safetensors");
    candle_core::safetensors::load(&p, &Device::Cpu).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; regenerate with tools/make_sdxl_fixtures.py",
            p.display()
        )
    })
}

fn load(path: &Path) -> StableDiffusion {
    let source = ModelSource::open_with(path, tiny_sdxl_options()).unwrap();
    assert_eq!(
        source.architecture(),
        Architecture::Sdxl,
        "{}",
        path.display()
    );
    StableDiffusion::load(&source, DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(r: &HashMap<String, Tensor>, key: &str) -> Tensor {
    r[key].to_dtype(DType::U32).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<u32>().unwrap()
}

/// Size conditioning rows of a `[b, 6]` reference tensor.
fn sizes(t: &Tensor) -> Vec<SizeCond> {
    t.to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| SizeCond {
            original: [r[0] as u32, r[1] as u32],
            crop_top_left: [r[2] as u32, r[3] as u32],
            target: [r[4] as u32, r[5] as u32],
        })
        .collect()
}

fn check(sd: &StableDiffusion, r: &HashMap<String, Tensor>, what: &str) {
    // Both encoders, every hidden state.
    let second = sd.text_encoder_2.as_ref().expect("SDXL has text_encoder_2");
    for (name, model) in [
        ("text_encoder", &sd.text_encoder),
        ("text_encoder_2", &second.model),
    ] {
        let out = model
            .forward(&ids(r, &format!("{name}.input_ids")))
            .unwrap();
        for (i, h) in out.hidden_states.iter().enumerate() {
            let e = rel_err(h, &r[&format!("{name}.hidden_states.{i}")]);
            assert!(e < 1e-4, "{what}: {name} hidden state {i}: {e}");
        }
        let e = rel_err(
            &out.last_hidden_state,
            &r[&format!("{name}.last_hidden_state")],
        );
        assert!(e < 1e-4, "{what}: {name} last hidden state: {e}");
    }
    let out2 = second
        .model
        .forward(&ids(r, "text_encoder_2.input_ids"))
        .unwrap();
    let e = rel_err(
        out2.text_embeds.as_ref().unwrap(),
        &r["text_encoder_2.text_embeds"],
    );
    assert!(e < 1e-4, "{what}: text_embeds {e}");

    // encode_prompt: the second encoder's ids are the first's, repadded with `!`.
    let cond = sd
        .encode_id_rows(&rows(&ids(r, "text_encoder.input_ids")), 1)
        .unwrap();
    let e = rel_err(&cond.context, &r["prompt_embeds"]);
    assert!(e < 1e-4, "{what}: prompt_embeds {e}");
    let e = rel_err(cond.pooled.as_ref().unwrap(), &r["pooled_prompt_embeds"]);
    assert!(e < 1e-4, "{what}: pooled_prompt_embeds {e}");

    // UNet with add_time_ids, square and non-square.
    for prefix in ["unet", "unet_hw"] {
        let text = sd_lora_model::conditioning::TextConditioning {
            context: r[&format!("{prefix}.encoder_hidden_states")].clone(),
            pooled: Some(r[&format!("{prefix}.text_embeds")].clone()),
        };
        let t = r[&format!("{prefix}.timesteps")]
            .to_dtype(DType::F32)
            .unwrap();
        let out = sd
            .predict(
                &r[&format!("{prefix}.sample")],
                &t,
                &text,
                &sizes(&r[&format!("{prefix}.time_ids")]),
            )
            .unwrap();
        let e = rel_err(&out, &r[&format!("{prefix}.out")]);
        assert!(e < 1e-4, "{what}: {prefix} output {e}");
    }

    // VAE.
    let mean = sd.vae.encode(&r["vae.encode.image"]).unwrap().mean;
    let e = rel_err(&mean, &r["vae.encode.mean"]);
    assert!(e < 1e-4, "{what}: VAE mean {e}");
    let decoded = sd.vae.decode(&r["vae.decode.latent"]).unwrap();
    let e = rel_err(&decoded, &r["vae.decode.sample"]);
    assert!(e < 1e-4, "{what}: VAE decode {e}");
    assert_eq!(sd.vae_config.scaling_factor, 0.13025, "{what}");
}

#[test]
fn sdxl_folder_and_single_file_reproduce_the_reference() {
    let r = reference();
    check(&load(&fixtures().join("sdxl_tiny")), &r, "folder");
    check(
        &load(&fixtures().join("sdxl_tiny.safetensors")),
        &r,
        "single file",
    );
}

#[test]
fn sdxl_unet_gradients_match_the_reference() {
    let r = reference();
    let sd = load(&fixtures().join("sdxl_tiny"));
    let sample = Var::from_tensor(&r["unet.sample"]).unwrap();
    let context = Var::from_tensor(&r["unet.encoder_hidden_states"]).unwrap();
    let pooled = Var::from_tensor(&r["unet.text_embeds"]).unwrap();
    let text = sd_lora_model::conditioning::TextConditioning {
        context: context.as_tensor().clone(),
        pooled: Some(pooled.as_tensor().clone()),
    };
    let t = r["unet.timesteps"].to_dtype(DType::F32).unwrap();
    let out = sd
        .predict(&sample, &t, &text, &sizes(&r["unet.time_ids"]))
        .unwrap();
    let loss = (&out * &r["unet.grad.cotangent"])
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    for (var, key) in [
        (&sample, "unet.grad.sample"),
        (&context, "unet.grad.encoder_hidden_states"),
        (&pooled, "unet.grad.text_embeds"),
    ] {
        let e = rel_err(grads.get(var).unwrap(), &r[key]);
        assert!(e < 1e-4, "{key}: {e}");
    }
}

#[test]
fn sdxl_inspect_counts_match_diffusers_for_folder_and_single_file() {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("reference/sdxl_tiny.json")).unwrap(),
    )
    .unwrap();
    let expected = &json["parameter_counts"];
    for path in ["sdxl_tiny", "sdxl_tiny.safetensors"] {
        let info = ModelSource::open_with(fixtures().join(path), tiny_sdxl_options())
            .unwrap()
            .inspect();
        assert_eq!(info.architecture, Architecture::Sdxl, "{path}");
        let count = |c: Component| {
            info.components
                .iter()
                .find(|i| i.component == c)
                .map(|i| i.parameters)
        };
        for (c, key) in [
            (Component::Unet, "unet"),
            (Component::TextEncoder, "text_encoder"),
            (Component::TextEncoder2, "text_encoder_2"),
            (Component::Vae, "vae"),
        ] {
            assert_eq!(count(c), expected[key].as_u64(), "{path}: {key}");
        }
    }
}

#[test]
fn sdxl_single_file_converts_to_the_folders_tensors() {
    let folder = ModelSource::open_with(fixtures().join("sdxl_tiny"), tiny_sdxl_options()).unwrap();
    let single = ModelSource::open_with(
        fixtures().join("sdxl_tiny.safetensors"),
        tiny_sdxl_options(),
    )
    .unwrap();
    for c in Component::ALL {
        let (a, b) = (folder.weights(c).unwrap(), single.weights(c).unwrap());
        let keys_a: Vec<&str> = a.keys().collect();
        let keys_b: Vec<&str> = b.keys().collect();
        assert_eq!(keys_a, keys_b, "{c}: converted key names differ");
        for k in keys_a {
            let (x, y) = (
                a.load(k, &Device::Cpu, None).unwrap(),
                b.load(k, &Device::Cpu, None).unwrap(),
            );
            assert_eq!(x.dims(), y.dims(), "{c} {k}");
            let diff = (x - y).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{c} {k}");
        }
    }
    // The inferred UNet config is the folder's where the weights decide it.
    let (uf, us) = (
        folder.config(Component::Unet).unwrap(),
        single.config(Component::Unet).unwrap(),
    );
    for key in [
        "addition_embed_type",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
        "cross_attention_dim",
        "transformer_layers_per_block",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "use_linear_projection",
    ] {
        assert_eq!(uf[key], us[key], "unet config `{key}`");
    }
    let (tf, ts) = (
        folder.config(Component::TextEncoder2).unwrap(),
        single.config(Component::TextEncoder2).unwrap(),
    );
    for key in [
        "hidden_act",
        "projection_dim",
        "num_hidden_layers",
        "hidden_size",
    ] {
        assert_eq!(tf[key], ts[key], "text_encoder_2 config `{key}`");
    }
    assert_eq!(
        single.config(Component::TextEncoder).unwrap()["hidden_act"],
        "quick_gelu"
    );
    assert_eq!(
        single.config(Component::Vae).unwrap()["scaling_factor"],
        0.13025
    );
}

#[test]
fn sdxl_lora_files_use_sgm_names_and_read_back_against_the_model() {
    use sd_lora_model::lora::LoraComponent;
    use sd_lora_model::lora::attach::{TrainOptions, create_trainable, extract};
    use sd_lora_model::lora::format::{
        KohyaNaming, Metadata, SaveDtype, read_lora_for_model, write_kohya_named,
    };
    use sd_lora_model::lora::targets::{Preset, TargetSpec, model_targets};

    let mut sd = load(&fixtures().join("sdxl_tiny"));
    let spec = TargetSpec {
        preset: Preset::Conv,
        ..TargetSpec::default()
    };
    let (unet, text_encoders) = sd.lora_parts_mut(true);
    let lora = create_trainable(unet, text_encoders, &spec, &TrainOptions::default()).unwrap();
    // Both text encoders are adapted.
    for c in [LoraComponent::TextEncoder, LoraComponent::TextEncoder2] {
        assert!(
            lora.modules.iter().any(|m| m.target.component == c),
            "{c:?}"
        );
    }
    for m in &lora.modules {
        // Non-zero `up`, so a wrong name would show as a wrong value.
        m.up()
            .unwrap()
            .set(&m.up().unwrap().as_tensor().ones_like().unwrap())
            .unwrap();
    }
    let (unet, text_encoders) = sd.lora_parts();
    let weights = extract(unet, text_encoders).unwrap();
    let targets = model_targets(unet, text_encoders);
    let naming = KohyaNaming::from_targets(&targets);
    assert!(matches!(naming, KohyaNaming::Sgm(_)), "{naming:?}");

    let dir = std::env::temp_dir().join(format!("sd-lora-sdxl-lora-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sdxl.safetensors");
    write_kohya_named(
        &path,
        &weights,
        &Metadata::default(),
        SaveDtype::F32,
        &naming,
    )
    .unwrap();
    let names: Vec<String> = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect();
    for expected in [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2.lora_up.weight",
        "lora_unet_output_blocks_2_2_conv.lora_down.weight",
        "lora_unet_input_blocks_3_0_op.alpha",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha",
        "lora_te2_text_model_encoder_layers_2_mlp_fc2.lora_up.weight",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not in the file"
        );
    }
    assert!(
        !names.iter().any(|n| n.contains("down_blocks")),
        "diffusers names leaked"
    );

    let back = read_lora_for_model(&path, &targets).unwrap();
    assert_eq!(back.weights.modules.len(), weights.modules.len());
    for (key, m) in &weights.modules {
        let b = &back.weights.modules[key];
        let diff = (&b.up - &m.up).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{key:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `model.config`: the fixture folder's configs replace what the single file's
/// shapes cannot show (heads, group counts), with no load option at all.
#[test]
fn a_config_folder_makes_a_single_file_loadable_without_options() {
    let single = fixtures().join("sdxl_tiny.safetensors");
    // Without it, the inferred heads (hidden / 64) do not fit the tiny widths.
    let plain = ModelSource::open(&single).unwrap();
    assert!(StableDiffusion::load(&plain, DType::F32, &Device::Cpu).is_err());
    let options = LoadOptions {
        config_dir: Some(fixtures().join("sdxl_tiny")),
        ..LoadOptions::default()
    };
    let source = ModelSource::open_with(&single, options).unwrap();
    assert!(
        source.notes().iter().any(|n| n.starts_with("configs of")),
        "{:?}",
        source.notes()
    );
    let sd = StableDiffusion::load(&source, DType::F32, &Device::Cpu).unwrap();
    check(&sd, &reference(), "single file + model.config");

    let bad = LoadOptions {
        config_dir: Some(fixtures().join("reference")),
        ..LoadOptions::default()
    };
    let e = ModelSource::open_with(&single, bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("without any COMPONENT/config.json"), "{e}");
}

/// `model.vae`: a VAE folder, or a VAE file with the original names (with or
/// without `first_stage_model.`), replaces the model's own VAE; the SDXL VAE
/// stays f32 under an f16 model unless told otherwise or fp16-safe.
#[test]
fn a_separate_vae_replaces_the_models_and_sdxl_vae_stays_f32_in_f16() {
    let tmp = tempfile::tempdir().unwrap();
    let single = fixtures().join("sdxl_tiny.safetensors");
    let all = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    let prefix = "first_stage_model.";
    let with_prefix: HashMap<String, Tensor> = all
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    let bare: HashMap<String, Tensor> = with_prefix
        .iter()
        .map(|(k, t)| (k[prefix.len()..].to_string(), t.clone()))
        .collect();
    let (prefixed_file, bare_file) = (
        tmp.path().join("p.safetensors"),
        tmp.path().join("b.safetensors"),
    );
    candle_core::safetensors::save(&with_prefix, &prefixed_file).unwrap();
    candle_core::safetensors::save(&bare, &bare_file).unwrap();

    let image = Tensor::randn(0f32, 1.0, (1, 3, 16, 16), &Device::Cpu).unwrap();
    let encode = |sd: &StableDiffusion| sd.vae.encode(&image).unwrap().mode().clone();
    let own = encode(&load(&single));
    let with_vae = |vae: &Path, dtype: DType, vae_dtype: Option<DType>| {
        let options = LoadOptions {
            vae: Some(vae.to_path_buf()),
            vae_dtype,
            ..tiny_sdxl_options()
        };
        let source = ModelSource::open_with(&single, options).unwrap();
        assert!(source.notes().iter().any(|n| n.starts_with("VAE from")));
        StableDiffusion::load(&source, dtype, &Device::Cpu).unwrap()
    };
    for vae in [
        &prefixed_file,
        &bare_file,
        &fixtures().join("sdxl_tiny/vae"),
    ] {
        let sd = with_vae(vae, DType::F32, None);
        assert!(rel_err(&encode(&sd), &own) < 1e-6, "{}", vae.display());
    }

    // f16 model: SDXL's VAE is kept in f32 ...
    assert_eq!(
        with_vae(&bare_file, DType::F16, None).vae.dtype(),
        DType::F32
    );
    // ... unless asked, or its config says it is fp16-safe.
    let forced = with_vae(&bare_file, DType::F16, Some(DType::F16));
    assert_eq!(forced.vae.dtype(), DType::F16);
    let safe = tmp.path().join("fp16_safe_vae");
    std::fs::create_dir_all(&safe).unwrap();
    let src = fixtures().join("sdxl_tiny/vae");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["force_upcast"] = serde_json::json!(false);
    std::fs::write(safe.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        safe.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    assert_eq!(with_vae(&safe, DType::F16, None).vae.dtype(), DType::F16);

    // Not a VAE: named as such, before any weight is read.
    let not_vae = fixtures().join("lora/sd1_lora_kohya.safetensors");
    let options = LoadOptions {
        vae: Some(not_vae),
        ..tiny_sdxl_options()
    };
    let e = ModelSource::open_with(&single, options)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no VAE in this file"), "{e}");
}
