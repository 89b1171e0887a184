//! Merging LoRAs into checkpoints and into one LoRA, and extracting a LoRA
//! from two checkpoints: merged weight − base = Σ weight·scale·up·down on
//! every adapted layer of SD1 (folder), SD2 and SDXL (single files with
//! packed q/k/v), everything else byte for byte; extract of a merge
//! recovers the update.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sd_lora_model::load::ModelSource;
use sd_lora_model::lora::extract::{ExtractOptions, extract, extraction_targets};
use sd_lora_model::lora::format::{
    BaseModelVersion, KohyaNaming, LoraFamily, Metadata, SaveDtype, read_lora, read_lora_for_model,
    write_kohya_named,
};
use sd_lora_model::lora::merge::{WeightedLora, merge_into_model, merge_loras, stored_targets};
use sd_lora_model::lora::targets::{Preset, in_preset};
use sd_lora_model::lora::{LayerKind, LoraComponent, LoraModule, LoraWeights, TargetInfo};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32
}

fn random(shape: &[usize], seed: &mut u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| lcg(seed) * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A random LoRA of rank `rank` on the layers of `preset`, written as a
/// kohya file named for the model, and read back.
fn random_lora(
    dir: &Path,
    name: &str,
    source: &ModelSource,
    preset: Preset,
    rank: usize,
    seed: u64,
) -> sd_lora_model::lora::format::LoraFile {
    let targets = stored_targets(source).unwrap();
    let mut seed = seed;
    let mut w = LoraWeights::default();
    for t in targets.iter().filter(|t| in_preset(preset, t)) {
        let (down, up) = match t.kind {
            LayerKind::Linear => (vec![rank, t.in_features], vec![t.out_features, rank]),
            LayerKind::Conv2d { kernel, .. } => (
                vec![rank, t.in_features, kernel[0], kernel[1]],
                vec![t.out_features, rank, 1, 1],
            ),
        };
        w.modules.insert(
            (t.component, t.path.clone()),
            LoraModule {
                down: random(&down, &mut seed, 0.5),
                up: random(&up, &mut seed, 0.5),
                alpha: rank as f32 / 2.0,
                dora_scale: None,
            },
        );
    }
    let meta = Metadata {
        base_model: Some(BaseModelVersion::of_model(
            source.architecture(),
            source.prediction(),
        )),
        ..Metadata::default()
    };
    let path = dir.join(name);
    write_kohya_named(
        &path,
        &w,
        &meta.with_network_of(&w),
        SaveDtype::F32,
        &KohyaNaming::from_targets(&targets),
    )
    .unwrap();
    read_lora_for_model(&path, &targets).unwrap()
}

/// Σ weight·scale·up·down of the modules adapting (component, path), flat.
fn expected_delta(loras: &[WeightedLora], key: &(LoraComponent, String)) -> Option<Tensor> {
    let mut acc: Option<Tensor> = None;
    for l in loras {
        let Some(m) = l.file.weights.modules.get(key) else {
            continue;
        };
        let r = m.rank();
        let up =
            m.up.to_dtype(DType::F64)
                .unwrap()
                .reshape((m.up.dims()[0], r))
                .unwrap();
        let down = m
            .down
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_from(1)
            .unwrap();
        let d = (up.matmul(&down).unwrap() * f64::from(l.weight * m.scale()))
            .unwrap()
            .flatten_all()
            .unwrap();
        acc = Some(match acc {
            None => d,
            Some(a) => (a + d).unwrap(),
        });
    }
    acc
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn load(source: &ModelSource, t: &TargetInfo) -> Tensor {
    source
        .weights(t.component.model_component())
        .unwrap()
        .load(
            &format!("{}.weight", t.path),
            &Device::Cpu,
            Some(DType::F64),
        )
        .unwrap()
        .flatten_all()
        .unwrap()
}

/// Checks merged − base against the LoRAs on every layer: the updated ones
/// within f32 rounding of the weights, the others exactly equal. Returns how
/// many layers changed.
fn check_merge(base: &ModelSource, merged: &ModelSource, loras: &[WeightedLora]) -> usize {
    let mut changed = 0;
    for t in stored_targets(base).unwrap() {
        let b = load(base, &t);
        let m = load(merged, &t);
        let diff = (&m - &b).unwrap();
        match expected_delta(loras, &(t.component, t.path.clone())) {
            Some(want) => {
                changed += 1;
                // f32 storage: the merged weight is rounded to 2⁻²⁴ of its size.
                let tol = 1e-6 * (max_abs(&b) + max_abs(&want)) + 1e-7;
                let err = max_abs(&(diff - &want).unwrap());
                assert!(
                    err <= tol,
                    "{:?} {}: merged − base differs from Σ scale·up·down by {err} (tol {tol})",
                    t.component,
                    t.path
                );
                assert!(max_abs(&want) > 1e-3, "{}: a vanishing update", t.path);
            }
            None => assert_eq!(max_abs(&diff), 0.0, "{:?} {} changed", t.component, t.path),
        }
    }
    changed
}

#[test]
fn merge_into_single_files_sd2_and_sdxl_with_packed_qkv() {
    for (name, te_components) in [
        ("sd2_tiny.safetensors", vec![LoraComponent::TextEncoder]),
        (
            "sdxl_tiny.safetensors",
            vec![LoraComponent::TextEncoder, LoraComponent::TextEncoder2],
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let base_path = fixtures().join(name);
        let base = ModelSource::open(&base_path).unwrap();
        let loras = vec![
            WeightedLora {
                file: random_lora(tmp.path(), "a.safetensors", &base, Preset::Kohya, 4, 1),
                weight: 0.7,
            },
            WeightedLora {
                file: random_lora(tmp.path(), "b.safetensors", &base, Preset::Conv, 2, 2),
                weight: -0.3,
            },
        ];
        for c in &te_components {
            assert!(
                loras[0].file.weights.modules.keys().any(|(k, _)| k == c),
                "{name}: the LoRA has {c:?} modules"
            );
        }
        let out = tmp.path().join("merged.safetensors");
        let report = merge_into_model(&base, &loras, &out).unwrap();
        let merged = ModelSource::open(&out).unwrap();
        let changed = check_merge(&base, &merged, &loras);
        assert_eq!(changed, report.layers, "{name}");
        // For tools/check_merge_in_diffusers.py: keep the files when asked.
        if let Some(keep) = std::env::var_os("SD_LORA_KEEP_MERGE_FILES") {
            let keep = Path::new(&keep).join(name.trim_end_matches(".safetensors"));
            std::fs::create_dir_all(&keep).unwrap();
            for f in ["a.safetensors", "b.safetensors", "merged.safetensors"] {
                std::fs::copy(tmp.path().join(f), keep.join(f)).unwrap();
            }
        }
        // Same header (keys, dtypes, shapes, metadata): same length, same bytes up to the data.
        let (a, b) = (
            std::fs::read(&base_path).unwrap(),
            std::fs::read(&out).unwrap(),
        );
        assert_eq!(a.len(), b.len());
        let header = 8 + u64::from_le_bytes(a[..8].try_into().unwrap()) as usize;
        assert_eq!(a[..header], b[..header], "{name}: header changed");
        // The VAE is untouched, byte for byte (a region of the data section).
        let vae = base.weights(sd_lora_model::load::Component::Vae).unwrap();
        for (_, e) in vae.entries().take(5) {
            let key = e.source_key();
            let st =
                sd_lora_model::load::safetensors_file::SafetensorsFile::open(&base_path).unwrap();
            let info = st.get(key).unwrap();
            assert_eq!(a[info.start..info.end], b[info.start..info.end], "{key}");
        }
    }
}

/// Most checkpoints users have are F16: the merged weights are stored in
/// F16 again (rounded to nearest), the rest of the file untouched.
#[test]
fn merge_into_an_f16_single_file_stays_f16() {
    use sd_lora_model::load::safetensors_file::SafetensorsFile;
    use sd_lora_model::lora::format::serialize::{RawTensor, serialize};
    let tmp = tempfile::tempdir().unwrap();
    // An F16 copy of the SD1 fixture checkpoint.
    let src = SafetensorsFile::open(&fixtures().join("sd1_tiny.safetensors")).unwrap();
    let bytes = std::fs::read(fixtures().join("sd1_tiny.safetensors")).unwrap();
    let tensors: Vec<RawTensor> = src
        .tensors()
        .iter()
        .map(|(name, info)| {
            let data = &bytes[info.start..info.end];
            let f16: Vec<u8> = if info.dtype == "F32" {
                data.chunks_exact(4)
                    .flat_map(|c| {
                        let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        half::f16::from_f32(v).to_le_bytes()
                    })
                    .collect()
            } else {
                data.to_vec()
            };
            RawTensor {
                name: name.clone(),
                dtype: if info.dtype == "F32" { "F16" } else { "I64" },
                shape: info.shape.clone(),
                bytes: f16,
            }
        })
        .collect();
    assert!(
        src.tensors()
            .values()
            .all(|t| t.dtype == "F32" || t.dtype == "I64")
    );
    let base_path = tmp.path().join("f16.safetensors");
    std::fs::write(&base_path, serialize(&tensors, Some(src.metadata()))).unwrap();
    let base = ModelSource::open(&base_path).unwrap();
    let loras = vec![WeightedLora {
        file: random_lora(tmp.path(), "a.safetensors", &base, Preset::Kohya, 4, 7),
        weight: 0.9,
    }];
    let out = tmp.path().join("merged.safetensors");
    merge_into_model(&base, &loras, &out).unwrap();
    let merged = ModelSource::open(&out).unwrap();
    let mut changed = 0;
    for t in stored_targets(&base).unwrap() {
        let c = t.component.model_component();
        assert_eq!(
            merged
                .weights(c)
                .unwrap()
                .get(&format!("{}.weight", t.path))
                .unwrap()
                .dtype(),
            "F16"
        );
        let (b, m) = (load(&base, &t), load(&merged, &t));
        let diff = (&m - &b).unwrap();
        match expected_delta(&loras, &(t.component, t.path.clone())) {
            Some(want) => {
                changed += 1;
                // Half an F16 ulp of the largest merged value, and a little.
                let tol = 2f64.powi(-11) * max_abs(&m) + 1e-6;
                let err = max_abs(&(diff - &want).unwrap());
                assert!(err <= tol, "{}: {err} > {tol}", t.path);
            }
            None => assert_eq!(max_abs(&diff), 0.0, "{}", t.path),
        }
    }
    assert!(changed > 100);
}

#[test]
fn merge_into_a_diffusers_folder_keeps_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let base = ModelSource::open(fixtures().join("sd1_tiny")).unwrap();
    let loras = vec![WeightedLora {
        file: read_lora_for_model(
            &fixtures().join("lora/sd1_lora_kohya.safetensors"),
            &stored_targets(&base).unwrap(),
        )
        .unwrap(),
        weight: 0.8,
    }];
    let out = tmp.path().join("merged");
    merge_into_model(&base, &loras, &out).unwrap();
    for f in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "text_encoder/config.json",
        "vae/config.json",
    ] {
        assert_eq!(
            std::fs::read(fixtures().join("sd1_tiny").join(f)).unwrap(),
            std::fs::read(out.join(f)).unwrap(),
            "{f}"
        );
    }
    let merged = ModelSource::open(&out).unwrap();
    assert_eq!(check_merge(&base, &merged, &loras), 210);
    // No temporary folder is left beside the output.
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
}

/// Extracting from (base, base + LoRA) at the LoRA's rank gives back the
/// LoRA's update on every layer, and nothing for identical layers.
#[test]
fn extract_of_a_merge_recovers_the_update() {
    let tmp = tempfile::tempdir().unwrap();
    let base = ModelSource::open(fixtures().join("sd2_tiny.safetensors")).unwrap();
    let lora = vec![WeightedLora {
        file: random_lora(tmp.path(), "a.safetensors", &base, Preset::Conv, 3, 5),
        weight: 1.0,
    }];
    let out = tmp.path().join("merged.safetensors");
    merge_into_model(&base, &lora, &out).unwrap();
    let tuned = ModelSource::open(&out).unwrap();
    let options = ExtractOptions {
        rank: 3,
        conv_rank: Some(3),
        min_diff: 0.01,
    };
    let mut calls = 0;
    let (w, report) = extract(&base, &tuned, options, &mut |_, _, _| calls += 1).unwrap();
    let targets = extraction_targets(&base, true).unwrap();
    assert_eq!(calls, targets.len() + 1);
    assert_eq!(w.modules.len(), lora[0].file.weights.modules.len());
    assert_eq!(report.unchanged, targets.len() - w.modules.len());
    let extracted = vec![WeightedLora {
        file: sd_lora_model::lora::format::LoraFile {
            path: out.clone(),
            format: sd_lora_model::lora::format::LoraFormat::Kohya,
            family: LoraFamily::Sd,
            weights: w,
            metadata: Default::default(),
            dtype: DType::F32,
            file_size: 0,
        },
        weight: 1.0,
    }];
    let mut worst: f64 = 0.0;
    for key in lora[0].file.weights.modules.keys() {
        let want = expected_delta(&lora, key).unwrap();
        let got = expected_delta(&extracted, key).unwrap();
        let rel = max_abs(&(got - &want).unwrap()) / max_abs(&want);
        worst = worst.max(rel);
    }
    // f32 storage of base + ΔW rounds ΔW to ~1e-7 of the weights.
    assert!(worst < 1e-4, "worst relative error {worst}");
    for m in &report.modules {
        assert!(m.fro_kept > 0.9999, "{}: {}", m.path, m.fro_kept);
    }
    // Below the update's rank, the error is what SVD leaves: still most of the norm.
    let options = ExtractOptions {
        rank: 1,
        conv_rank: None,
        min_diff: 0.01,
    };
    let (_, small) = extract(&base, &tuned, options, &mut |_, _, _| {}).unwrap();
    assert!(
        small
            .modules
            .iter()
            .all(|m| m.fro_kept < 1.0 && m.rank == 1)
    );
    // Two identical checkpoints: nothing to extract.
    let (none, r) = extract(&base, &base, options, &mut |_, _, _| {}).unwrap();
    assert!(none.modules.is_empty());
    assert!(r.unchanged > 0);
}

/// A text encoder changed by less than `min_diff` is left out whole.
#[test]
fn extract_leaves_out_an_untrained_text_encoder() {
    let tmp = tempfile::tempdir().unwrap();
    let base = ModelSource::open(fixtures().join("sd1_tiny.safetensors")).unwrap();
    let mut file = random_lora(tmp.path(), "a.safetensors", &base, Preset::Kohya, 2, 9);
    for ((c, _), m) in file.weights.modules.iter_mut() {
        if *c == LoraComponent::TextEncoder {
            m.up = (&m.up * 1e-4).unwrap();
        }
    }
    let lora = vec![WeightedLora { file, weight: 1.0 }];
    let out = tmp.path().join("merged.safetensors");
    merge_into_model(&base, &lora, &out).unwrap();
    let tuned = ModelSource::open(&out).unwrap();
    let options = ExtractOptions {
        rank: 2,
        conv_rank: None,
        min_diff: 0.01,
    };
    let (w, report) = extract(&base, &tuned, options, &mut |_, _, _| {}).unwrap();
    assert_eq!(report.skipped_text_encoders.len(), 1);
    assert!(w.modules.keys().all(|(c, _)| *c == LoraComponent::Unet));
    let keep_all = ExtractOptions {
        min_diff: 0.0,
        ..options
    };
    let (w, _) = extract(&base, &tuned, keep_all, &mut |_, _, _| {}).unwrap();
    assert!(
        w.modules
            .keys()
            .any(|(c, _)| *c == LoraComponent::TextEncoder)
    );
    // Different architectures are refused.
    let xl = ModelSource::open(fixtures().join("sdxl_tiny.safetensors")).unwrap();
    let e = extract(&base, &xl, options, &mut |_, _, _| {}).unwrap_err();
    assert!(e.to_string().contains("same architecture"), "{e}");
}

/// LoRAs merged into one: concatenation is exact; `rank` cuts to the best
/// approximation; another family is refused.
#[test]
fn merge_loras_concatenates_exactly_and_refuses_other_families() {
    let tmp = tempfile::tempdir().unwrap();
    let base = ModelSource::open(fixtures().join("sd1_tiny.safetensors")).unwrap();
    let a = random_lora(tmp.path(), "a.safetensors", &base, Preset::Kohya, 4, 3);
    let b = random_lora(tmp.path(), "b.safetensors", &base, Preset::Conv, 2, 4);
    let loras = vec![
        WeightedLora {
            file: a,
            weight: 0.6,
        },
        WeightedLora {
            file: b,
            weight: 1.5,
        },
    ];
    let (w, stats) = merge_loras(&loras, None).unwrap();
    let merged = vec![WeightedLora {
        file: sd_lora_model::lora::format::LoraFile {
            weights: w.clone(),
            ..loras[0].file.clone()
        },
        weight: 1.0,
    }];
    let alphas: std::collections::BTreeSet<u32> =
        w.modules.values().map(|m| m.alpha.to_bits()).collect();
    assert_eq!(alphas.len(), 1, "one alpha for every module");
    for key in w.modules.keys() {
        let want = expected_delta(&loras, key).unwrap();
        let got = expected_delta(&merged, key).unwrap();
        let rel = max_abs(&(got - &want).unwrap()) / max_abs(&want);
        assert!(rel < 1e-5, "{key:?}: {rel}");
        let s = &stats[key];
        assert_eq!(s.rank, s.concatenated_rank);
        assert!(s.concatenated_rank == 6 || s.concatenated_rank == 2);
    }
    let (cut, stats) = merge_loras(&loras, Some(3)).unwrap();
    assert!(cut.modules.values().all(|m| m.rank() <= 3));
    assert!(
        stats
            .values()
            .all(|s| s.fro_kept <= 1.0 && s.fro_kept > 0.5)
    );

    let xl = read_lora(&fixtures().join("lora/sd1_lora_kohya.safetensors")).unwrap();
    let mut other = xl.clone();
    other.family = LoraFamily::Sdxl;
    let e = merge_loras(
        &[
            WeightedLora {
                file: xl,
                weight: 1.0,
            },
            WeightedLora {
                file: other,
                weight: 1.0,
            },
        ],
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("different model families"), "{e}");
}
