//! The built-in tiny model is *trainable*: a UNet LoRA (kohya preset, rank 4)
//! fitted with 20 Adam steps on two images lowers the fixed-noise
//! denoising loss well below its start. This is what makes `builtin:tiny` a
//! meaningful quickstart and test model.

use candle_core::{DType, Device, Tensor, Var};
use sd_lora_model::builtin::tiny_sd1;
use sd_lora_model::clip::MAX_LENGTH;
use sd_lora_model::lora::attach::{TrainOptions, create_trainable};
use sd_lora_model::lora::targets::TargetSpec;

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 + 1e-12
    };
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let (a, b) = (next(), next());
            ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn a_unet_lora_lowers_the_denoising_loss() {
    let dev = Device::Cpu;
    let mut sd = tiny_sd1(DType::F32, &dev).unwrap();
    // Two "images": smooth patterns, encoded to latents (mean × scaling).
    let mut px = Vec::new();
    for b in 0..2 {
        for c in 0..3 {
            for y in 0..64 {
                for x in 0..64 {
                    let f = 0.05 + 0.05 * b as f32;
                    px.push(((x as f32 * f + c as f32) * (y as f32 * f * 0.7 + 1.0)).sin());
                }
            }
        }
    }
    let px = Tensor::from_vec(px, (2, 3, 64, 64), &dev).unwrap();
    let latents = sd
        .vae
        .scale_latents(&sd.vae.encode(&px).unwrap().mean)
        .unwrap();
    let ids: Vec<u32> = ["a photo of ohwx dog", "a photo of ohwx cat"]
        .iter()
        .flat_map(|p| sd.tokenizer.encode_padded(p, MAX_LENGTH, sd.pad_style))
        .collect();
    let ids = Tensor::from_vec(ids, (2, MAX_LENGTH), &dev).unwrap();
    let cond = sd.text_encoder.forward_with_clip_skip(&ids, 1).unwrap();

    // Fixed noise and timesteps: the loss is a deterministic function of the LoRA.
    let steps: Vec<usize> = vec![150, 400, 650, 900];
    let noise = randn(7, &[4, 4, 8, 8]);
    let lat4 = Tensor::cat(&[&latents, &latents], 0).unwrap();
    let cond4 = Tensor::cat(&[&cond, &cond], 0).unwrap();
    let (mut a, mut s) = (Vec::new(), Vec::new());
    for &t in &steps {
        let (sa, sb) = sd.schedule.coefficients(t);
        a.push(sa as f32);
        s.push(sb as f32);
    }
    let a = Tensor::from_vec(a, (4, 1, 1, 1), &dev).unwrap();
    let s = Tensor::from_vec(s, (4, 1, 1, 1), &dev).unwrap();
    let noisy = (lat4.broadcast_mul(&a).unwrap() + noise.broadcast_mul(&s).unwrap()).unwrap();
    let t = Tensor::from_vec(steps.iter().map(|&t| t as f32).collect::<Vec<_>>(), 4, &dev).unwrap();

    let lora = create_trainable(
        &mut sd.unet,
        None,
        &TargetSpec::default(),
        &TrainOptions::default(),
    )
    .unwrap();
    let vars: Vec<Var> = lora.vars();
    let loss_of = |sd: &sd_lora_model::pipeline::StableDiffusion| {
        let pred = sd.unet.forward(&noisy, &t, &cond4).unwrap();
        (pred - &noise).unwrap().sqr().unwrap().mean_all().unwrap()
    };
    let first = loss_of(&sd).to_scalar::<f32>().unwrap();
    // Plain Adam, lr 1e-2.
    let (lr, b1, b2, eps) = (1e-2f64, 0.9f64, 0.999f64, 1e-8f64);
    let mut m: Vec<Tensor> = vars.iter().map(|v| v.zeros_like().unwrap()).collect();
    let mut v2: Vec<Tensor> = m.clone();
    let mut last = first;
    for step in 1..=20 {
        let loss = loss_of(&sd);
        last = loss.to_scalar::<f32>().unwrap();
        let grads = loss.backward().unwrap();
        for (i, var) in vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            m[i] = ((&m[i] * b1).unwrap() + (g * (1.0 - b1)).unwrap()).unwrap();
            v2[i] = ((&v2[i] * b2).unwrap() + (g.sqr().unwrap() * (1.0 - b2)).unwrap()).unwrap();
            let mh = (&m[i] / (1.0 - b1.powi(step))).unwrap();
            let vh = (&v2[i] / (1.0 - b2.powi(step))).unwrap();
            let upd = (mh / (vh.sqrt().unwrap() + eps).unwrap()).unwrap();
            var.set(&(var.as_tensor() - (upd * lr).unwrap()).unwrap())
                .unwrap();
        }
    }
    let end = loss_of(&sd).to_scalar::<f32>().unwrap();
    println!("denoising loss: start {first:.4}, after 20 steps {end:.4} (last step {last:.4})");
    assert!(
        end < 0.8 * first,
        "loss {first} -> {end}: less than 20 % lower"
    );
}
