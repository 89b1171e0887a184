//! fp8 storage of the UNet's Linear/Conv2d weights (`model.dtype = "fp8"`):
//! the weights really are one-byte e4m3, the output stays close to the bf16
//! model's (fp8 rounding only), a LoRA on it still gets a gradient in every
//! module, and a model file is converted as it loads.

use candle_core::{DType, Device, Tensor};
use sd_lora_model::builtin::tiny_sdxl;
use sd_lora_model::conditioning::{SizeCond, TextConditioning};
use sd_lora_model::load::{AttentionHeads, LoadOptions, ModelSource};
use sd_lora_model::lora::attach::{TrainOptions, create_trainable};
use sd_lora_model::lora::targets::TargetSpec;
use sd_lora_model::pipeline::StableDiffusion;
use sd_lora_model::storage::{FP8, unet_to_fp8};

#[path = "support/fixtures.rs"]
mod support;
use support::{fixtures, rel_err, tiny_options};

fn inputs(sd: &StableDiffusion) -> (Tensor, Tensor, TextConditioning, Vec<SizeCond>) {
    let text = sd.encode_captions(&["ohwx robot"], 1).unwrap();
    inputs_with(text)
}

fn inputs_with(text: TextConditioning) -> (Tensor, Tensor, TextConditioning, Vec<SizeCond>) {
    let dev = Device::Cpu;
    // A fixed, smooth latent (the comparison must not depend on a random draw).
    let noisy = (Tensor::arange(0f32, 256.0, &dev).unwrap() * 0.37)
        .unwrap()
        .sin()
        .unwrap()
        .reshape((1, 4, 8, 8))
        .unwrap();
    let t = Tensor::new(&[500f32], &dev).unwrap();
    let size = SizeCond {
        original: [64, 64],
        crop_top_left: [0, 0],
        target: [64, 64],
    };
    (noisy, t, text, vec![size])
}

fn fp8_share(sd: &StableDiffusion) -> (usize, usize) {
    let (mut fp8, mut all) = (0, 0);
    sd.unet.visit_layers(&mut |_, layer| {
        all += 1;
        fp8 += usize::from(layer.weight().dtype() == FP8);
    });
    (fp8, all)
}

#[test]
fn fp8_unet_stays_close_to_bf16_and_its_lora_learns() {
    let dev = Device::Cpu;
    let reference = tiny_sdxl(DType::BF16, &dev).unwrap();
    let mut sd = tiny_sdxl(DType::BF16, &dev).unwrap();
    unet_to_fp8(&mut sd.unet).unwrap();
    let (fp8, all) = fp8_share(&sd);
    assert_eq!(fp8, all, "every Linear/Conv2d weight is fp8");
    assert_eq!(sd.unet.dtype(), DType::BF16, "the computation stays bf16");

    let (noisy, t, text, sizes) = inputs(&reference);
    let want = reference.predict(&noisy, &t, &text, &sizes).unwrap();
    let got = sd.predict(&noisy, &t, &text, &sizes).unwrap();
    let err = rel_err(&got, &want);
    eprintln!("fp8 vs bf16 UNet output: relative error {err:.4}");
    // e4m3 keeps 3 mantissa bits (≤ 6.25 % per weight); the output averages it out.
    assert!(err > 0.0 && err < 0.2, "relative error {err}");

    // A LoRA on the fp8 UNet: every module's `up` gets a gradient.
    let (unet, encoders) = sd.lora_parts_mut(false);
    let spec = TargetSpec {
        text_encoder: false,
        ..TargetSpec::default()
    };
    let lora = create_trainable(unet, encoders, &spec, &TrainOptions::default()).unwrap();
    let loss = sd
        .predict(&noisy, &t, &text, &sizes)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    for m in &lora.modules {
        let g = grads
            .get(m.up().unwrap().as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {}", m.target.path));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "zero gradient for {}", m.target.path);
    }
}

#[test]
fn a_model_file_loads_its_unet_in_fp8() {
    let options = LoadOptions {
        fp8_unet: true,
        text_encoder_2_heads: Some(4),
        ..tiny_options(AttentionHeads::PerLevel(vec![2, 4, 4]), None)
    };
    let source = ModelSource::open_with(fixtures().join("sdxl_tiny"), options).unwrap();
    let sd = StableDiffusion::load(&source, DType::BF16, &Device::Cpu).unwrap();
    let (fp8, all) = fp8_share(&sd);
    assert_eq!(fp8, all);
    // Only the UNet: the text encoders and the VAE keep the compute dtype.
    sd.text_encoder.visit_layers(&mut |path, layer| {
        assert_eq!(layer.weight().dtype(), DType::BF16, "{path}");
    });
    // The fixture's vocabulary has 1,000 tokens: a fixed id row, not the CLIP tokenizer.
    let ids: Vec<u32> = (0..77u32).map(|i| (i * 7 + 3) % 1000).collect();
    let (noisy, t, text, sizes) = inputs_with(sd.encode_id_rows(&[ids], 1).unwrap());
    let out = sd.predict(&noisy, &t, &text, &sizes).unwrap();
    let values: Vec<f32> = out
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
}
