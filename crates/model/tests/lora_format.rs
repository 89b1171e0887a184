//! LoRA file formats: names, kohya/PEFT writing and reading, metadata, hashes, conversion,
//! validation against the fixture models, and malformed files.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sd_lora_model::load::safetensors_file::SafetensorsFile;
use sd_lora_model::lora::format::serialize::{RawTensor, serialize};
use sd_lora_model::lora::format::{
    self, BaseModelVersion, KohyaNameMap, LoraFamily, LoraFormat, LoraFormatError, LoraSummary,
    Metadata, SaveDtype, WriteFormat, kohya_name, parse_kohya_name, read_lora, read_lora_for_model,
    validate, write_kohya, write_peft,
};
use sd_lora_model::lora::{LayerKind, LoraComponent, LoraModule, LoraWeights, TargetInfo};
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A fresh, empty scratch folder for one test, removed when the returned guard drops.
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("sd-lora-format-{name}-"))
        .tempdir()
        .unwrap()
}

/// Deterministic pseudo-random values (xorshift), in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn tensor(&mut self, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.f32()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

/// The adaptable layers of a fixture component, from its weight keys (2-D/4-D `*.weight`,
/// embeddings excluded): independent of the model code.
fn fixture_targets(model: &str) -> Vec<TargetInfo> {
    let mut out = Vec::new();
    for (component, file) in [
        (
            LoraComponent::Unet,
            "unet/diffusion_pytorch_model.safetensors",
        ),
        (LoraComponent::TextEncoder, "text_encoder/model.safetensors"),
    ] {
        let st = SafetensorsFile::open(&fixtures().join(model).join(file)).unwrap();
        for (key, info) in st.tensors() {
            let Some(path) = key.strip_suffix(".weight") else {
                continue;
            };
            if path.contains("embedding") && component == LoraComponent::TextEncoder {
                continue;
            }
            let kind = match info.shape.len() {
                2 => LayerKind::Linear,
                4 => LayerKind::Conv2d {
                    kernel: [info.shape[2], info.shape[3]],
                    stride: 1,
                    padding: info.shape[2] / 2,
                },
                _ => continue,
            };
            out.push(TargetInfo {
                component,
                path: path.to_string(),
                kind,
                in_features: info.shape[1],
                out_features: info.shape[0],
            });
        }
    }
    out
}

/// A random LoRA on `targets` with `rank` and `alpha`.
fn random_lora(targets: &[TargetInfo], rank: usize, alpha: f32, seed: u64) -> LoraWeights {
    let mut rng = Rng(seed | 1);
    let mut w = LoraWeights::default();
    for t in targets {
        let (down, up) = match t.kind {
            LayerKind::Linear => (
                rng.tensor(&[rank, t.in_features]),
                rng.tensor(&[t.out_features, rank]),
            ),
            LayerKind::Conv2d { kernel, .. } => (
                rng.tensor(&[rank, t.in_features, kernel[0], kernel[1]]),
                rng.tensor(&[t.out_features, rank, 1, 1]),
            ),
        };
        w.modules.insert(
            (t.component, t.path.clone()),
            LoraModule::new(down, up, alpha),
        );
    }
    w
}

fn default_targets(model: &str) -> Vec<TargetInfo> {
    fixture_targets(model)
        .into_iter()
        .filter(|t| {
            t.path.contains("transformer_blocks")
                || t.path.ends_with("proj_in")
                || t.path.ends_with("proj_out")
                || t.path.contains("self_attn")
                || t.path.contains("mlp")
        })
        .collect()
}

fn metadata() -> Metadata {
    let mut md = Metadata {
        output_name: Some("my_dog".into()),
        network_module: Some("networks.lora".into()),
        network_dim: Some(4),
        network_alpha: Some(2.0),
        base_model: Some(BaseModelVersion::SdV1),
        resolution: Some((512, 512)),
        steps: Some(1000),
        epoch: Some(10),
        learning_rate: Some(1e-4),
        unet_lr: Some(1e-4),
        text_encoder_lr: Some(5e-5),
        seed: Some(42),
        training_started_at: Some(1764340000.25),
        training_finished_at: Some(1764343600.5),
        date: Some("2026-11-28T14:00:00".into()),
        ..Default::default()
    };
    md.network_args.insert("conv_dim".into(), "4".into());
    md.network_args.insert("conv_alpha".into(), "1".into());
    md.dataset_dirs.insert(
        "10_ohwx dog".into(),
        format::DatasetDirInfo {
            n_repeats: 10,
            img_count: 12,
        },
    );
    md.tag_frequency.insert(
        "10_ohwx dog".into(),
        BTreeMap::from([("ohwx dog".to_string(), 12), ("beach".to_string(), 3)]),
    );
    md
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    values(t).into_iter().map(f32::to_bits).collect()
}

fn rounded(t: &Tensor, dtype: DType) -> Vec<u32> {
    bits(&t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap())
}

/// The raw header JSON of a safetensors file.
fn header(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + n]).unwrap()
}

#[test]
fn grammar_reverses_every_fixture_module_path() {
    let mut checked = 0;
    for model in ["sd1_tiny", "sd2_tiny"] {
        for (component, file) in [
            (
                LoraComponent::Unet,
                "unet/diffusion_pytorch_model.safetensors",
            ),
            (LoraComponent::TextEncoder, "text_encoder/model.safetensors"),
        ] {
            let st = SafetensorsFile::open(&fixtures().join(model).join(file)).unwrap();
            for (key, info) in st.tensors() {
                let Some(path) = key.strip_suffix(".weight") else {
                    continue;
                };
                if !matches!(info.shape.len(), 2 | 4) {
                    continue;
                }
                let name = kohya_name(component, path);
                assert_eq!(
                    parse_kohya_name(&name),
                    Ok((component, path.to_string())),
                    "{name}"
                );
                checked += 1;
            }
        }
        // The exact map built from the targets agrees with the grammar.
        let targets = fixture_targets(model);
        let map = KohyaNameMap::from_targets(&targets);
        assert_eq!(map.len(), targets.len());
        for t in &targets {
            let name = kohya_name(t.component, &t.path);
            assert_eq!(map.lookup(&name), Some((t.component, t.path.as_str())));
        }
    }
    assert!(checked > 500, "only {checked} paths checked");
}

#[test]
fn kohya_f32_round_trip_is_bit_identical() {
    let scratch_dir = scratch("f32");
    let dir = scratch_dir.path();
    let targets = fixture_targets("sd1_tiny"); // every layer, convs included (LoCon)
    let lora = random_lora(&targets, 4, 2.0, 7);
    let path = dir.join("lora.safetensors");
    write_kohya(&path, &lora, &metadata(), SaveDtype::F32).unwrap();
    let file = read_lora(&path).unwrap();
    assert_eq!(file.format, LoraFormat::Kohya);
    assert_eq!(file.dtype, DType::F32);
    assert_eq!(file.weights.modules.len(), lora.modules.len());
    for (key, m) in &lora.modules {
        let r = &file.weights.modules[key];
        assert_eq!(r.down.dims(), m.down.dims(), "{key:?}");
        assert_eq!(bits(&r.down), bits(&m.down), "{key:?}");
        assert_eq!(bits(&r.up), bits(&m.up), "{key:?}");
        assert_eq!(r.alpha, m.alpha);
    }
    assert_eq!(file.file_size, std::fs::metadata(&path).unwrap().len());
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(dir).unwrap().count(), 1);
}

#[test]
fn kohya_f16_and_bf16_round_trips_equal_the_rounded_values() {
    let scratch_dir = scratch("f16");
    let dir = scratch_dir.path();
    let targets = default_targets("sd1_tiny");
    let lora = random_lora(&targets, 4, 3.0, 11);
    for (save, dtype) in [(SaveDtype::F16, DType::F16), (SaveDtype::BF16, DType::BF16)] {
        let path = dir.join(format!("lora_{save:?}.safetensors"));
        write_kohya(&path, &lora, &metadata(), save).unwrap();
        let file = read_lora(&path).unwrap();
        assert_eq!(file.dtype, dtype);
        for (key, m) in &lora.modules {
            let r = &file.weights.modules[key];
            assert_eq!(bits(&r.down), rounded(&m.down, dtype), "{key:?}");
            assert_eq!(bits(&r.up), rounded(&m.up, dtype), "{key:?}");
            assert_eq!(r.alpha, 3.0);
        }
        // The alpha is a 0-dim tensor in the save dtype, as kohya writes it.
        let h = header(&path);
        let name = kohya_name(LoraComponent::Unet, &targets[0].path);
        let alpha = &h[format!("{name}.alpha")];
        assert_eq!(alpha["dtype"], save.safetensors_name());
        assert_eq!(alpha["shape"], serde_json::json!([]));
        assert_eq!(
            h[format!("{name}.lora_down.weight")]["dtype"],
            save.safetensors_name()
        );
    }
}

#[test]
fn metadata_is_all_strings_with_kohya_and_modelspec_keys() {
    let scratch_dir = scratch("meta");
    let dir = scratch_dir.path();
    let lora = random_lora(&default_targets("sd1_tiny"), 4, 2.0, 3);
    let path = dir.join("lora.safetensors");
    write_kohya(&path, &lora, &metadata(), SaveDtype::F16).unwrap();
    let h = header(&path);
    let md = h["__metadata__"].as_object().unwrap();
    assert!(md.values().all(|v| v.is_string()), "{md:?}");
    let get = |k: &str| {
        md.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("{k}"))
    };
    assert_eq!(get("ss_network_module"), "networks.lora");
    assert_eq!(get("ss_network_dim"), "4");
    assert_eq!(get("ss_network_alpha"), "2.0");
    assert_eq!(
        get("ss_network_args"),
        r#"{"conv_alpha": "1", "conv_dim": "4"}"#
    );
    assert_eq!(get("ss_base_model_version"), "sd_v1");
    assert_eq!(get("ss_resolution"), "(512, 512)");
    assert_eq!(get("ss_steps"), "1000");
    assert_eq!(get("ss_epoch"), "10");
    assert_eq!(get("ss_learning_rate"), "0.0001");
    assert_eq!(get("ss_text_encoder_lr"), "5e-05");
    assert_eq!(get("ss_seed"), "42");
    assert_eq!(get("ss_training_started_at"), "1764340000.25");
    assert_eq!(
        get("ss_dataset_dirs"),
        r#"{"10_ohwx dog": {"n_repeats": 10, "img_count": 12}}"#
    );
    assert_eq!(
        get("ss_tag_frequency"),
        r#"{"10_ohwx dog": {"beach": 3, "ohwx dog": 12}}"#
    );
    assert_eq!(get("ss_output_name"), "my_dog");
    assert_eq!(get("modelspec.sai_model_spec"), "1.0.1");
    assert_eq!(get("modelspec.architecture"), "stable-diffusion-v1/lora");
    assert_eq!(get("modelspec.implementation"), "diffusers");
    assert_eq!(get("modelspec.title"), "my_dog");
    assert_eq!(get("modelspec.resolution"), "512x512");
    assert_eq!(get("modelspec.prediction_type"), "epsilon");
    assert_eq!(get("modelspec.date"), "2026-11-28T14:00:00");
    assert_eq!(get("sshs_model_hash").len(), 64);
    assert_eq!(get("sshs_legacy_hash").len(), 8);

    // Typed metadata comes back from the map, and the map survives from_map → to_map.
    let file = read_lora(&path).unwrap();
    let back = Metadata::from_map(&file.metadata);
    assert_eq!(back.network_args, metadata().network_args);
    assert_eq!(back.tag_frequency, metadata().tag_frequency);
    assert_eq!(back.base_model, Some(BaseModelVersion::SdV1));
    assert_eq!(back.learning_rate, Some(1e-4));
    let again = back.to_map();
    for (k, v) in &file.metadata {
        assert_eq!(again.get(k), Some(v), "{k}");
    }
    // A foreign map (numbers written differently, unknown keys) survives too.
    let foreign: BTreeMap<String, String> = [
        ("ss_network_alpha", "8"),
        ("ss_learning_rate", "1e-4"),
        ("ss_tag_frequency", "{\"a\":{\"b\":1}}"),
        ("ss_resolution", "512,768"),
        ("my_key", "x"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let again = Metadata::from_map(&foreign).to_map();
    for (k, v) in &foreign {
        assert_eq!(again.get(k), Some(v), "{k}");
    }

    // The network fields from the weights: Linear rank/alpha, and conv ones as kohya's args.
    let mut weights = random_lora(&fixture_targets("sd1_tiny"), 4, 2.0, 1);
    for m in weights
        .modules
        .values_mut()
        .filter(|m| m.down.dims().len() == 4)
    {
        m.alpha = 1.0;
    }
    let md = Metadata::default().with_network_of(&weights).to_map();
    assert_eq!(md["ss_network_module"], "networks.lora");
    assert_eq!(
        (
            md["ss_network_dim"].as_str(),
            md["ss_network_alpha"].as_str()
        ),
        ("4", "2.0")
    );
    assert_eq!(
        md["ss_network_args"],
        r#"{"conv_alpha": "1.0", "conv_dim": "4"}"#
    );

    // sd_v2_v gives the v-prediction architecture.
    let md = Metadata {
        base_model: Some(BaseModelVersion::SdV2V),
        ..Default::default()
    }
    .to_map();
    assert_eq!(
        md["modelspec.architecture"],
        "stable-diffusion-v2-768-v/lora"
    );
    assert_eq!(md["modelspec.resolution"], "768x768");
    assert_eq!(md["modelspec.prediction_type"], "v");
    assert_eq!(md["ss_v2"], "True");
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn hashes_are_deterministic_and_match_an_independent_computation() {
    let scratch_dir = scratch("hash");
    let dir = scratch_dir.path();
    // Big enough (> 1.06 MiB) that the legacy hash window lies inside the data.
    let targets = fixture_targets("sd1_tiny");
    let lora = random_lora(&targets, 16, 8.0, 5);
    let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
    write_kohya(&a, &lora, &metadata(), SaveDtype::F32).unwrap();
    write_kohya(&b, &lora, &metadata(), SaveDtype::F32).unwrap();
    let bytes = std::fs::read(&a).unwrap();
    assert!(bytes.len() > 0x110000, "{} bytes", bytes.len());
    assert_eq!(bytes, std::fs::read(&b).unwrap(), "same LoRA, same bytes");

    let file = read_lora(&a).unwrap();
    // Independent: model hash = sha256 of everything after the header of the file itself.
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(
        file.metadata["sshs_model_hash"],
        sha256_hex(&bytes[8 + n..])
    );
    // Independent: legacy hash from the `safetensors` library's own serialisation with only
    // the ss_* metadata (as kohya's precalculate_safetensors_hashes does).
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ss: HashMap<String, String> = file
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let reference = safetensors::serialize(st.tensors(), Some(ss)).unwrap();
    assert_eq!(
        file.metadata["sshs_legacy_hash"],
        sha256_hex(&reference[0x100000..0x110000])[..8]
    );
    let m = u64::from_le_bytes(reference[..8].try_into().unwrap()) as usize;
    assert_eq!(
        file.metadata["sshs_model_hash"],
        sha256_hex(&reference[8 + m..])
    );

    // Changing a non-ss key (the title) changes neither hash; changing an ss key may change only
    // the legacy one (the header length moves the window).
    let c = dir.join("c.safetensors");
    let mut md = metadata();
    md.title = Some("another title".into());
    write_kohya(&c, &lora, &md, SaveDtype::F32).unwrap();
    let other = read_lora(&c).unwrap().metadata;
    assert_eq!(other["sshs_model_hash"], file.metadata["sshs_model_hash"]);
    assert_eq!(other["sshs_legacy_hash"], file.metadata["sshs_legacy_hash"]);
}

/// `scale · up · down` of a module, as f32 values (convs flattened to matrices).
fn product(m: &LoraModule) -> Vec<f32> {
    let rank = m.rank();
    let down = m.down.reshape((rank, ())).unwrap();
    let up = m.up.reshape(((), rank)).unwrap();
    values(&(up.matmul(&down).unwrap() * f64::from(m.scale())).unwrap())
}

#[test]
fn kohya_to_peft_to_kohya_keeps_the_product() {
    let scratch_dir = scratch("convert");
    let dir = scratch_dir.path();
    let targets = fixture_targets("sd1_tiny");
    // alpha/rank = 1/4 is a power of two: folding is exact; 2/3 is not: within f32 rounding.
    for (rank, alpha, exact) in [(4usize, 1.0f32, true), (3, 2.0, false)] {
        let lora = random_lora(&targets, rank, alpha, 13);
        let kohya = dir.join(format!("k{rank}.safetensors"));
        let peft = dir.join(format!("p{rank}.safetensors"));
        let back = dir.join(format!("b{rank}.safetensors"));
        write_kohya(&kohya, &lora, &metadata(), SaveDtype::F32).unwrap();
        let report = format::convert(&kohya, &peft, WriteFormat::Peft).unwrap();
        assert_eq!(report.from, LoraFormat::Kohya);
        assert_eq!(report.modules, lora.modules.len());
        assert_eq!(report.dtype, SaveDtype::F32);
        let h = header(&peft);
        let path = &targets[0].path;
        assert!(h.get(format!("unet.{path}.lora_A.weight")).is_some());
        assert!(h.get(format!("unet.{path}.lora_B.weight")).is_some());
        let te = targets
            .iter()
            .find(|t| t.component == LoraComponent::TextEncoder)
            .unwrap();
        assert!(
            h.get(format!("text_encoder.{}.lora_A.weight", te.path))
                .is_some()
        );
        assert_eq!(h["__metadata__"]["ss_network_alpha"], "4");

        let p = read_lora(&peft).unwrap();
        assert_eq!(p.format, LoraFormat::Peft);
        format::convert(&peft, &back, WriteFormat::Kohya).unwrap();
        let k = read_lora(&back).unwrap();
        assert_eq!(k.format, LoraFormat::Kohya);
        let mut worst = 0f32;
        for (key, m) in &lora.modules {
            for r in [&p.weights.modules[key], &k.weights.modules[key]] {
                assert_eq!(r.alpha, rank as f32, "alpha recovered as rank");
                assert_eq!(bits(&r.down), bits(&m.down));
                let (want, got) = (product(m), product(r));
                if exact {
                    assert_eq!(want, got, "{key:?}");
                }
                // Error relative to the product's largest entry (entries near 0 cancel).
                let scale = want.iter().fold(0f32, |a, w| a.max(w.abs()));
                for (w, g) in want.iter().zip(&got) {
                    worst = worst.max((w - g).abs() / scale);
                }
            }
        }
        // Folding rounds `up · alpha / rank` to f32 once: a few ulps.
        assert!(worst < 1e-6, "relative error {worst}");
        eprintln!("rank {rank} alpha {alpha}: worst relative product error {worst:e}");
    }
}

#[test]
fn write_peft_folds_alpha_into_up() {
    let scratch_dir = scratch("peft");
    let dir = scratch_dir.path();
    let targets = default_targets("sd2_tiny");
    let lora = random_lora(&targets, 8, 4.0, 17);
    let path = dir.join("peft.safetensors");
    write_peft(&path, &lora, &metadata(), SaveDtype::F32).unwrap();
    let file = read_lora(&path).unwrap();
    for (key, m) in &lora.modules {
        let r = &file.weights.modules[key];
        assert_eq!(r.alpha, 8.0);
        assert_eq!(bits(&r.up), bits(&(&m.up * 0.5).unwrap()));
    }
}

#[test]
fn reads_old_diffusers_formats() {
    let scratch_dir = scratch("diffusers");
    let dir = scratch_dir.path();
    let mut rng = Rng(99);
    let attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1";
    let raw = |name: &str, shape: &[usize], rng: &mut Rng| RawTensor {
        name: name.to_string(),
        dtype: "F32",
        shape: shape.to_vec(),
        bytes: values(&rng.tensor(shape))
            .into_iter()
            .flat_map(f32::to_le_bytes)
            .collect(),
    };
    let tensors = vec![
        raw(
            &format!("unet.{attn}.to_q.lora.down.weight"),
            &[2, 8],
            &mut rng,
        ),
        raw(
            &format!("unet.{attn}.to_q.lora.up.weight"),
            &[8, 2],
            &mut rng,
        ),
        raw(
            &format!("{attn}.processor.to_out_lora.down.weight"),
            &[2, 8],
            &mut rng,
        ),
        raw(
            &format!("{attn}.processor.to_out_lora.up.weight"),
            &[8, 2],
            &mut rng,
        ),
        raw(
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight",
            &[2, 32],
            &mut rng,
        ),
        raw(
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight",
            &[32, 2],
            &mut rng,
        ),
    ];
    let path = dir.join("old.safetensors");
    std::fs::write(&path, serialize(&tensors, None)).unwrap();
    let file = read_lora(&path).unwrap();
    assert_eq!(file.format, LoraFormat::Diffusers);
    let keys: Vec<(LoraComponent, String)> = file.weights.modules.keys().cloned().collect();
    assert_eq!(
        keys,
        vec![
            (LoraComponent::Unet, format!("{attn}.to_out.0")),
            (LoraComponent::Unet, format!("{attn}.to_q")),
            (
                LoraComponent::TextEncoder,
                "text_model.encoder.layers.0.self_attn.q_proj".to_string()
            ),
        ]
    );
    assert!(file.weights.modules.values().all(|m| m.alpha == 2.0));
    // It fits the SD1 fixture (8-channel attention in the first block, 32-wide text encoder).
    let targets = fixture_targets("sd1_tiny");
    validate(&file.weights, &targets).unwrap();
    // And the summary says what it is.
    let s = LoraSummary::from_file(&file);
    assert_eq!(s.format, LoraFormat::Diffusers);
    assert_eq!(s.modules[&LoraComponent::Unet], 2);
    assert_eq!(s.ranks, vec![2]);
    assert_eq!(s.dtype, "F32");
}

#[test]
fn validation_lists_every_offending_module() {
    let targets = fixture_targets("sd1_tiny");
    let mut lora = random_lora(&default_targets("sd1_tiny"), 4, 4.0, 21);
    assert_eq!(validate(&lora, &targets), Ok(()));
    let mut rng = Rng(5);
    let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".to_string();
    let k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k".to_string();
    let v = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v".to_string();
    let absent = "down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q".to_string();
    // Wrong in_features, inconsistent rank, a path the model lacks.
    lora.modules
        .get_mut(&(LoraComponent::Unet, q.clone()))
        .unwrap()
        .down = rng.tensor(&[4, 40]);
    lora.modules
        .get_mut(&(LoraComponent::Unet, k.clone()))
        .unwrap()
        .up = rng.tensor(&[8, 5]);
    let conv = LoraModule {
        down: rng.tensor(&[4, 8, 3, 3]),
        up: rng.tensor(&[8, 4, 1, 1]),
        alpha: 1.0,
        dora_scale: None,
    };
    lora.modules
        .insert((LoraComponent::Unet, absent.clone()), conv.clone());
    // A conv LoRA on a Linear layer.
    lora.modules.insert((LoraComponent::Unet, v.clone()), conv);
    let errs = validate(&lora, &targets).unwrap_err();
    let keys: Vec<&str> = errs.iter().map(|m| m.path.as_str()).collect();
    // Every offending module, in (component, path) order.
    assert_eq!(keys, vec![&k, &q, &v, &absent]);
    let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert!(
        text[0].contains("up is [8, 5], the layer needs [8, 4]"),
        "{}",
        text[0]
    );
    assert!(
        text[1].contains("down is [4, 40], the layer needs [4, 8]"),
        "{}",
        text[1]
    );
    assert!(text[1].starts_with(&format!("`{}`", kohya_name(LoraComponent::Unet, &q))));
    assert!(text[2].contains("Linear 8→8"), "{}", text[2]);
    assert!(
        text[3].contains("the model has no UNet layer"),
        "{}",
        text[3]
    );
}

#[test]
fn read_for_model_refuses_modules_the_model_lacks() {
    let scratch_dir = scratch("for_model");
    let dir = scratch_dir.path();
    // An SD1 LoRA on the full SD1 fixture, checked against a model without the text encoder.
    let targets = default_targets("sd1_tiny");
    let lora = random_lora(&targets, 2, 1.0, 8);
    let path = dir.join("lora.safetensors");
    write_kohya(&path, &lora, &Metadata::default(), SaveDtype::F16).unwrap();
    let file = read_lora_for_model(&path, &targets).unwrap();
    assert_eq!(file.weights.modules.len(), lora.modules.len());
    let unet_only: Vec<TargetInfo> = targets
        .iter()
        .filter(|t| t.component == LoraComponent::Unet)
        .cloned()
        .collect();
    let te_modules = targets.len() - unet_only.len();
    match read_lora_for_model(&path, &unet_only) {
        Err(LoraFormatError::UnknownModules { names, target, .. }) => {
            assert_eq!(names.len(), te_modules);
            assert!(names.iter().all(|n| n.starts_with("lora_te_")));
            assert_eq!(target, "the model");
        }
        other => panic!("{other:?}"),
    }
}

/// Writes a kohya-style file with the given tensors (F32) and metadata.
fn write_raw(path: &Path, tensors: &[(&str, &[usize])], md: Option<&BTreeMap<String, String>>) {
    let raw: Vec<RawTensor> = tensors
        .iter()
        .map(|(name, shape)| RawTensor {
            name: name.to_string(),
            dtype: "F32",
            shape: shape.to_vec(),
            bytes: vec![0x3c; 4 * shape.iter().product::<usize>()],
        })
        .collect();
    std::fs::write(path, serialize(&raw, md)).unwrap();
}

fn err(path: &Path) -> String {
    match read_lora(path) {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => e.to_string(),
    }
}

const Q: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";

#[test]
fn unknown_and_sdxl_names_are_errors_listing_them() {
    let scratch_dir = scratch("names");
    let dir = scratch_dir.path();
    let p = dir.join("unknown.safetensors");
    write_raw(
        &p,
        &[
            (&format!("{Q}.lora_down.weight"), &[2, 8]),
            (&format!("{Q}.lora_up.weight"), &[8, 2]),
            ("lora_unet_foo_bar.lora_down.weight", &[2, 8]),
            ("lora_unet_foo_bar.lora_up.weight", &[8, 2]),
            ("lora_unet_down_blocks_0_attn9.lora_down.weight", &[2, 8]),
            ("lora_unet_down_blocks_0_attn9.lora_up.weight", &[8, 2]),
        ],
        None,
    );
    let e = err(&p);
    assert!(
        e.contains("2 LoRA module(s) match no module of an SD1/SD2/SDXL model")
            && e.contains("lora_unet_foo_bar")
            && e.contains("lora_unet_down_blocks_0_attn9"),
        "{e}"
    );
    let p = dir.join("sdxl.safetensors");
    let name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q";
    write_raw(
        &p,
        &[
            (&format!("{name}.lora_down.weight"), &[2, 8]),
            (&format!("{name}.lora_up.weight"), &[8, 2]),
            (
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                &[2, 8],
            ),
            (
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
                &[8, 2],
            ),
        ],
        None,
    );
    // SDXL names are read by their own grammar (SDXL base's layout).
    let file = read_lora(&p).unwrap();
    assert_eq!(file.family, LoraFamily::Sdxl);
    let paths: Vec<(LoraComponent, &str)> = file
        .weights
        .modules
        .keys()
        .map(|(c, p)| (*c, p.as_str()))
        .collect();
    assert_eq!(
        paths,
        [
            (
                LoraComponent::Unet,
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
            ),
            (
                LoraComponent::TextEncoder,
                "text_model.encoder.layers.0.mlp.fc1"
            ),
        ]
    );
    // A file mixing SD1/SD2 and SDXL names is no LoRA of either.
    let p = dir.join("mixed.safetensors");
    write_raw(
        &p,
        &[
            (&format!("{name}.lora_down.weight"), &[2, 8]),
            (&format!("{name}.lora_up.weight"), &[8, 2]),
            (&format!("{Q}.lora_down.weight"), &[2, 8]),
            (&format!("{Q}.lora_up.weight"), &[8, 2]),
        ],
        None,
    );
    let e = err(&p);
    assert!(
        e.contains("mixes SD1/SD2 and SDXL module names") && e.contains(name),
        "{e}"
    );
}

#[test]
fn inconsistent_modules_are_errors_listing_them() {
    let scratch_dir = scratch("modules");
    let dir = scratch_dir.path();
    let k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k";
    let v = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v";
    let p = dir.join("bad.safetensors");
    write_raw(
        &p,
        &[
            (&format!("{Q}.lora_down.weight"), &[2, 8]),
            (&format!("{k}.lora_down.weight"), &[2, 8]),
            (&format!("{k}.lora_up.weight"), &[8, 3]),
            (&format!("{v}.lora_down.weight"), &[2, 8]),
            (&format!("{v}.lora_up.weight"), &[8, 2, 1, 1]),
        ],
        None,
    );
    let e = err(&p);
    assert!(e.contains("3 LoRA module problem(s)"), "{e}");
    assert!(e.contains(&format!("module `{Q}` has no up weight")), "{e}");
    assert!(e.contains(&format!("module `{k}`: rank mismatch")), "{e}");
    assert!(
        e.contains(&format!("module `{v}`: down [2, 8] and up [8, 2, 1, 1]")),
        "{e}"
    );
}

#[test]
fn files_that_are_not_loras_are_named_as_such() {
    let scratch_dir = scratch("not_lora");
    let dir = scratch_dir.path();
    let e = err(&fixtures().join("sd1_tiny/unet/diffusion_pytorch_model.safetensors"));
    assert!(
        e.contains("not a LoRA file") && e.contains("a model's weights"),
        "{e}"
    );
    let p = dir.join("empty.safetensors");
    write_raw(&p, &[], None);
    assert!(err(&p).contains("holds no tensors"));
    let p = dir.join("loha.safetensors");
    write_raw(
        &p,
        &[
            (&format!("{Q}.lora_down.weight"), &[2, 8]),
            (&format!("{Q}.lora_up.weight"), &[8, 2]),
            (&format!("{Q}.hada_w1_a"), &[8, 2]),
        ],
        None,
    );
    let e = err(&p);
    assert!(
        e.contains("mixes LyCORIS tensors") && e.contains("hada_w1_a"),
        "{e}"
    );
    // LyCORIS' Tucker-factored convs are refused by name.
    let p = dir.join("loha_tucker.safetensors");
    write_raw(
        &p,
        &[
            (&format!("{Q}.hada_w1_a"), &[2, 8]),
            (&format!("{Q}.hada_w1_b"), &[2, 8]),
            (&format!("{Q}.hada_w2_a"), &[2, 8]),
            (&format!("{Q}.hada_w2_b"), &[2, 8]),
            (&format!("{Q}.hada_t1"), &[2, 2, 3, 3]),
        ],
        None,
    );
    let e = err(&p);
    assert!(e.contains("Tucker") && e.contains("hada_t1"), "{e}");
    // A LoHa module missing a tensor is named with what it has.
    let p = dir.join("loha_half.safetensors");
    write_raw(
        &p,
        &[
            (&format!("{Q}.hada_w1_a"), &[8, 2]),
            (&format!("{Q}.hada_w1_b"), &[2, 8]),
        ],
        None,
    );
    let e = err(&p);
    assert!(
        e.contains("needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b"),
        "{e}"
    );
    let p = dir.join("mixed.safetensors");
    write_raw(
        &p,
        &[
            (&format!("{Q}.lora_down.weight"), &[2, 8]),
            (&format!("{Q}.lora_up.weight"), &[8, 2]),
            ("unet.conv_in.lora_A.weight", &[2, 8]),
            ("unet.conv_in.lora_B.weight", &[8, 2]),
        ],
        None,
    );
    assert!(err(&p).contains("mixes LoRA key conventions (kohya, peft)"));
}

/// A valid small kohya file's bytes, and its header split out.
fn valid_bytes() -> Vec<u8> {
    let mut rng = Rng(3);
    let mut lora = LoraWeights::default();
    lora.modules.insert(
        (
            LoraComponent::Unet,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".into(),
        ),
        LoraModule {
            down: rng.tensor(&[2, 8]),
            up: rng.tensor(&[8, 2]),
            alpha: 1.0,
            dora_scale: None,
        },
    );
    let scratch_dir = scratch("valid");
    let dir = scratch_dir.path();
    let p = dir.join("v.safetensors");
    write_kohya(&p, &lora, &metadata(), SaveDtype::F32).unwrap();
    std::fs::read(&p).unwrap()
}

/// `bytes` with its header replaced by `edit(header)`.
fn with_header(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut h);
    let json = serde_json::to_vec(&h).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.extend(&bytes[8 + n..]);
    out
}

#[test]
fn malformed_files_give_clear_errors() {
    let scratch_dir = scratch("malformed");
    let dir = scratch_dir.path();
    let good = valid_bytes();
    let down = format!("{Q}.lora_down.weight");
    let up = format!("{Q}.lora_up.weight");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "the file is empty"),
        (
            "short",
            vec![1, 2, 3],
            "fewer than the 8-byte header length",
        ),
        (
            "huge_header_len",
            [&u64::MAX.to_le_bytes()[..], &good[8..]].concat(),
            "larger than the 100 MB limit",
        ),
        (
            "header_past_end",
            [&1000u64.to_le_bytes()[..], &good[8..100]].concat(),
            "runs past the end of the file",
        ),
        (
            "invalid_json",
            {
                let mut b = good.clone();
                b[8] = b'[';
                b[9] = b'}';
                b
            },
            "the header is not valid JSON",
        ),
        (
            "truncated",
            good[..good.len() - 10].to_vec(),
            "the file is truncated",
        ),
        (
            "offsets_out_of_range",
            with_header(&good, |h| {
                h[&down]["data_offsets"] = serde_json::json!([100000, 100064]);
            }),
            "the file is truncated",
        ),
        (
            "overlapping",
            with_header(&good, |h| {
                let o = h[&up]["data_offsets"].clone();
                h[&down]["data_offsets"] = o;
            }),
            "overlap",
        ),
        (
            "shape_dtype_mismatch",
            with_header(&good, |h| h[&down]["shape"] = serde_json::json!([3, 8])),
            "needs 96",
        ),
        (
            "dtype_mismatch",
            with_header(&good, |h| h[&down]["dtype"] = serde_json::json!("F16")),
            "span 64 bytes but shape [2, 8] of F16 needs 32",
        ),
        (
            "unknown_dtype",
            with_header(&good, |h| h[&down]["dtype"] = serde_json::json!("F12")),
            "unknown dtype `F12`",
        ),
        (
            "int_dtype",
            with_header(&good, |h| {
                h[&down]["dtype"] = serde_json::json!("I32");
            }),
            "not a float type",
        ),
        (
            "non_string_metadata",
            with_header(&good, |h| {
                h["__metadata__"]["ss_network_dim"] = serde_json::json!(4);
            }),
            "metadata values must be strings, but 1 is not: ss_network_dim",
        ),
        (
            "metadata_not_object",
            with_header(&good, |h| h["__metadata__"] = serde_json::json!([1])),
            "`__metadata__` must be an object of strings",
        ),
        (
            "not_an_object",
            {
                let json = b"[1, 2]  ";
                [&(json.len() as u64).to_le_bytes()[..], json].concat()
            },
            "the header is not a JSON object",
        ),
        (
            "pickle",
            [&b"PK\x03\x04"[..], &[0u8; 64][..]].concat(),
            "refusing to load",
        ),
    ];
    for (name, bytes, want) in cases {
        let p = dir.join(format!("{name}.safetensors"));
        std::fs::write(&p, &bytes).unwrap();
        match read_lora(&p) {
            Ok(_) => panic!("{name}: accepted"),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains(want), "{name}: `{e}` lacks `{want}`");
                assert!(
                    e.contains(&p.display().to_string()),
                    "{name}: `{e}` names no file"
                );
            }
        }
    }
}

/// The reference LoRA written by Python (tools/make_lora_fixtures.py) in kohya and PEFT form.
#[test]
fn reads_the_reference_kohya_and_peft_files() {
    let dir = fixtures().join("lora");
    let kohya = read_lora(&dir.join("sd1_lora_kohya.safetensors")).unwrap();
    let peft = read_lora(&dir.join("sd1_lora_peft.safetensors")).unwrap();
    assert_eq!(kohya.format, LoraFormat::Kohya);
    assert_eq!(peft.format, LoraFormat::Peft);
    for file in [&kohya, &peft] {
        let s = LoraSummary::from_file(file);
        // The counts diffusers' load_lora_weights attaches (tests/fixtures/lora/README.md).
        assert_eq!(s.modules[&LoraComponent::Unet], 192);
        assert_eq!(s.modules[&LoraComponent::TextEncoder], 18);
        assert_eq!((s.conv_modules, s.ranks.clone()), (32, vec![4]));
        assert_eq!(s.dtype, "F32");
        validate(&file.weights, &fixture_targets("sd1_tiny")).unwrap();
    }
    assert_eq!(LoraSummary::from_file(&kohya).scales, vec![0.5]);
    assert_eq!(LoraSummary::from_file(&peft).alphas, vec![4.0]);
    // Our PEFT conversion of the kohya file equals the reference PEFT file, bit for bit.
    let scratch_dir = scratch("reference");
    let out = scratch_dir.path();
    let ours = out.join("peft.safetensors");
    format::convert(
        &dir.join("sd1_lora_kohya.safetensors"),
        &ours,
        WriteFormat::Peft,
    )
    .unwrap();
    let ours = read_lora(&ours).unwrap();
    assert_eq!(ours.weights.modules.len(), peft.weights.modules.len());
    for (key, m) in &peft.weights.modules {
        let o = &ours.weights.modules[key];
        assert_eq!(bits(&o.down), bits(&m.down), "{key:?}");
        assert_eq!(bits(&o.up), bits(&m.up), "{key:?}");
        assert_eq!(o.alpha, m.alpha);
    }
}
