//! What the end-to-end training tests share: the example dataset, the
//! settings of a tiny run on it, a quiet progress sink and ways to read back
//! what a run wrote.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use sd_lora_model::lora::LoraWeights;
use sd_lora_model::lora::format::{LoraFile, read_lora_for_model};
use sd_lora_model::lora::targets::model_targets;
use sd_lora_train::config::TrainConfig;
use sd_lora_train::trainer::{StepReport, TrainProgress, load_model};
use std::path::{Path, PathBuf};

/// `assets/example_dataset`.
pub fn example_dataset() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/example_dataset")
}

/// `--set`s of a run of the built-in tiny model on the example dataset at
/// 64 px (buckets to match), without periodic checkpoints, writing to `out`.
pub fn tiny_run_sets(out: &Path) -> Vec<String> {
    vec![
        "model.path=\"builtin:tiny\"".into(),
        format!(
            "dataset.subsets[0].path={:?}",
            example_dataset().to_string_lossy()
        ),
        "dataset.resolution=64".into(),
        "dataset.bucket_step=32".into(),
        "dataset.min_bucket_side=32".into(),
        "dataset.max_bucket_side=128".into(),
        "dataset.min_image_side=32".into(),
        "output.save_every=0".into(),
        format!("output.dir={:?}", out.to_string_lossy()),
    ]
}

/// Progress sink that checks every loss is finite and can stop the run
/// after a given step.
pub struct Quiet {
    pub stop_after: Option<usize>,
    pub last: usize,
}

impl TrainProgress for Quiet {
    fn begin(&mut self, _: usize, _: usize) {}
    fn step(&mut self, r: &StepReport) {
        self.last = r.step;
        assert!(r.loss.is_finite(), "non-finite loss at step {}", r.step);
    }
    fn note(&mut self, _: &str) {}
    fn end(&mut self) {}
    fn should_stop(&self) -> bool {
        self.stop_after.is_some_and(|s| self.last >= s)
    }
}

/// A [`Quiet`] that never stops the run.
pub fn quiet() -> Quiet {
    Quiet {
        stop_after: None,
        last: 0,
    }
}

/// The LoRA file `path`, read against the model of `cfg`.
pub fn read_for_model(cfg: &TrainConfig, path: &Path) -> LoraFile {
    let sd = load_model(cfg, &Device::Cpu).unwrap();
    let (unet, encoders) = sd.lora_parts();
    read_lora_for_model(path, &model_targets(unet, encoders)).unwrap()
}

/// Every module's down, up and alpha as bits, for exact comparisons.
pub fn bits(w: &LoraWeights) -> Vec<(String, Vec<u32>, Vec<u32>, u32)> {
    let b = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect::<Vec<_>>()
    };
    w.modules
        .iter()
        .map(|((c, p), m)| {
            (
                format!("{c:?}:{p}"),
                b(&m.down),
                b(&m.up),
                m.alpha.to_bits(),
            )
        })
        .collect()
}
