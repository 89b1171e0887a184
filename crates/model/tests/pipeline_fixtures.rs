//! Loader and components together: each fixture model opened as a diffusers
//! folder and as a single-file checkpoint, assembled into a
//! [`StableDiffusion`], reproduces the reference outputs of diffusers and
//! transformers (tests/fixtures/README.md) — so the weights each load path
//! produces are the ones the components need.

use candle_core::{DType, Device, Tensor};
use sd_lora_model::load::{AttentionHeads, ModelSource, Prediction};
use sd_lora_model::pipeline::StableDiffusion;
use std::collections::HashMap;

#[path = "support/fixtures.rs"]
mod support;
use support::{fixtures, rel_err, tiny_options};

fn reference(name: &str) -> HashMap<String, Tensor> {
    let p = fixtures()
        .join("reference")
        .join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; regenerate with tools/make_fixtures.py",
            p.display()
        )
    })
}

fn check(sd: &StableDiffusion, r: &HashMap<String, Tensor>, what: &str) {
    let ids = r["text_encoder.input_ids"].to_dtype(DType::U32).unwrap();
    let te = sd.text_encoder.forward(&ids).unwrap();
    let e = rel_err(&te.last_hidden_state, &r["text_encoder.last_hidden_state"]);
    assert!(e < 1e-4, "{what}: text encoder error {e}");

    let t = r["unet.timesteps"].to_dtype(DType::F32).unwrap();
    let out = sd
        .unet
        .forward(&r["unet.sample"], &t, &r["unet.encoder_hidden_states"])
        .unwrap();
    let e = rel_err(&out, &r["unet.out"]);
    assert!(e < 1e-4, "{what}: UNet error {e}");

    let enc = sd.vae.encode(&r["vae.encode.image"]).unwrap();
    let e = rel_err(&enc.mean, &r["vae.encode.mean"]);
    assert!(e < 1e-4, "{what}: VAE encode error {e}");
    let dec = sd.vae.decode(&r["vae.decode.latent"]).unwrap();
    let e = rel_err(&dec, &r["vae.decode.sample"]);
    assert!(e < 1e-4, "{what}: VAE decode error {e}");

    let want = r["scheduler.alphas_cumprod"].to_vec1::<f32>().unwrap();
    for (i, w) in want.iter().enumerate() {
        let got = sd.schedule.alphas_cumprod[i];
        assert!(
            (got - f64::from(*w)).abs() <= 1e-6 * f64::from(*w).max(1e-3),
            "{what}: alphas_cumprod[{i}]"
        );
    }
}

#[test]
fn sd1_folder_and_single_file_reproduce_the_reference() {
    let r = reference("sd1_tiny");
    let folder = ModelSource::open(fixtures().join("sd1_tiny")).unwrap();
    let sd = StableDiffusion::load(&folder, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(sd.prediction, Prediction::Epsilon);
    check(&sd, &r, "sd1 folder");
    // The tiny text encoder has 1000 tokens; the embedded tokenizer 49408.
    assert!(sd.notes.iter().any(|n| n.contains("49408")));

    let single = ModelSource::open_with(
        fixtures().join("sd1_tiny.safetensors"),
        tiny_options(AttentionHeads::Fixed(2), None),
    )
    .unwrap();
    let sd = StableDiffusion::load(&single, DType::F32, &Device::Cpu).unwrap();
    check(&sd, &r, "sd1 single file");
}

#[test]
fn sd2_folder_and_single_file_reproduce_the_reference() {
    let r = reference("sd2_tiny");
    let folder = ModelSource::open(fixtures().join("sd2_tiny")).unwrap();
    let sd = StableDiffusion::load(&folder, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(sd.prediction, Prediction::V);
    assert_eq!(sd.schedule.prediction, Prediction::V);
    check(&sd, &r, "sd2 folder");

    let single = ModelSource::open_with(
        fixtures().join("sd2_tiny.safetensors"),
        tiny_options(AttentionHeads::HeadDim(4), Some(Prediction::V)),
    )
    .unwrap();
    let sd = StableDiffusion::load(&single, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(sd.prediction, Prediction::V);
    check(&sd, &r, "sd2 single file");
}

#[test]
fn f16_storage_stays_within_half_precision_tolerance() {
    let r = reference("sd1_tiny");
    let folder = ModelSource::open(fixtures().join("sd1_tiny")).unwrap();
    let sd = StableDiffusion::load(&folder, DType::F16, &Device::Cpu).unwrap();
    let t = r["unet.timesteps"].to_dtype(DType::F32).unwrap();
    let out = sd
        .unet
        .forward(
            &r["unet.sample"].to_dtype(DType::F16).unwrap(),
            &t,
            &r["unet.encoder_hidden_states"]
                .to_dtype(DType::F16)
                .unwrap(),
        )
        .unwrap();
    let e = rel_err(&out, &r["unet.out"]);
    assert!(e < 2e-2, "f16 UNet error {e}");
}
