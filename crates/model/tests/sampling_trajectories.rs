//! With the same initial latent and text embedding, our DDIM, Euler and
//! DPM++ 2M trajectories on the tiny fixture UNets equal diffusers' after
//! every step: sd1_tiny (ε-prediction, also DPM++ 2M Karras) and sd2_tiny
//! (v-prediction). Reference: tests/fixtures/sampling/trajectories.safetensors,
//! written by tools/make_sampler_fixtures.py.

#[path = "support/device.rs"]
mod device;
use device::test_device;

use candle_core::{DType, Tensor};
use sd_lora_model::load::ModelSource;
use sd_lora_model::pipeline::StableDiffusion;
use sd_lora_model::sampling::{
    NormalRng, Sampler, SamplerConfig, SamplerKind, sample_with_progress,
};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
}

fn check(model: &str, kinds: &[SamplerKind]) {
    let dev = test_device();
    let root = fixtures();
    let sd = StableDiffusion::load(
        &ModelSource::open(root.join(model)).unwrap(),
        DType::F32,
        &dev,
    )
    .unwrap();
    let cfg = SamplerConfig::from_json_str(
        &std::fs::read_to_string(root.join(model).join("scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    let reference =
        candle_core::safetensors::load(root.join("sampling/trajectories.safetensors"), &dev)
            .unwrap();
    let latent = &reference["initial_latent"];
    let emb = &reference[&format!("{model}.text_embedding")];
    for &kind in kinds {
        let mut sampler = Sampler::new(kind, &cfg, 4).unwrap();
        let mut worst = 0.0f32;
        let mut steps = 0;
        sample_with_progress(
            &mut sampler,
            latent,
            |x, t| {
                let ts = Tensor::new(&[t as f32], &dev)?;
                sd.unet.forward(x, &ts, emb)
            },
            &mut NormalRng::new(0),
            |i, x| {
                let want = &reference[&format!("{model}.{}.step{i}", kind.name())];
                let e = rel_err(x, want);
                assert!(e < 1e-4, "{model} {kind} step {i}: relative error {e}");
                worst = worst.max(e);
                steps += 1;
            },
        )
        .unwrap();
        assert_eq!(steps, 4);
        eprintln!("{model} {kind}: worst relative error over 4 steps {worst:.2e}");
    }
}

#[test]
fn sd1_epsilon_trajectories_match_diffusers() {
    check(
        "sd1_tiny",
        &[
            SamplerKind::Ddim,
            SamplerKind::Euler,
            SamplerKind::DpmPp2m,
            SamplerKind::DpmPp2mKarras,
        ],
    );
}

#[test]
fn sd2_v_prediction_trajectories_match_diffusers() {
    check(
        "sd2_tiny",
        &[SamplerKind::Ddim, SamplerKind::Euler, SamplerKind::DpmPp2m],
    );
}
