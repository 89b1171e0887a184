//! LoRA parity with the Python reference (diffusers 0.42 + peft 0.21) on the sd1_tiny fixture,
//! using the random rank-4 / alpha-2 LoRA of `tests/fixtures/lora/` (see its README):
//!
//! - the kohya and the PEFT file read to the same LoRA (equal `scale · up · down` products);
//! - with either file attached, our text encoder and UNet outputs equal diffusers' with the
//!   file loaded (`load_lora_weights`), at multiplier 1 and 0.5;
//! - the gradient of a denoising loss through text encoder and UNet with respect to every LoRA
//!   `down` and `up` tensor equals PyTorch's (float64 reference), and none is zero: the test
//!   that proves no gradient path into a LoRA is cut;
//! - the kohya preset selects, and attaching attaches, exactly the modules diffusers attached
//!   (192 in the UNet, 18 in the text encoder);
//! - our writer's kohya/PEFT files of this LoRA read back bit-identical (f32) and give the same
//!   outputs (`SD_LORA_PARITY_OUT=DIR` keeps them for `tools/check_lora_in_diffusers.py`).
//!
//! Both down and up are random (a fresh LoRA has up = 0 and would pass any output test), and
//! alpha ≠ rank, so a missing module, a wrong alpha/rank scale or a wrong multiplier all fail.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

#[path = "support/device.rs"]
mod device;
use device::test_device;

use candle_core::{DType, Tensor};
use sd_lora_model::load::ModelSource;
use sd_lora_model::lora::attach::{
    TrainOptions, adapted_layers, attach, create_trainable, set_multiplier,
};
use sd_lora_model::lora::format::{
    BaseModelVersion, LoraFormat, Metadata, SaveDtype, kohya_name, read_lora, read_lora_for_model,
    write_kohya, write_peft,
};
use sd_lora_model::lora::targets::{RankAlpha, TargetSpec, model_targets, select};
use sd_lora_model::lora::{LoraComponent, LoraWeights};
use sd_lora_model::pipeline::StableDiffusion;

/// Modules diffusers attached when loading either fixture file (peft `LoraLayer`s in
/// `pipe.unet` / `pipe.text_encoder`), recorded in tests/fixtures/lora/README.md.
const DIFFUSERS_UNET_MODULES: usize = 192;
const DIFFUSERS_TE_MODULES: usize = 18;
const RANK: usize = 4;
const ALPHA: f32 = 2.0;

/// Outputs: same tolerance as the model parity tests (max error relative to max |reference|).
const OUTPUT_TOL: f64 = 1e-4;
/// Gradients (f32 here, float64 reference), per tensor relative to its max |reference|.
const GRAD_TOL: f64 = 1e-3;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn lora_file(name: &str) -> PathBuf {
    fixtures().join("lora").join(name)
}

const KOHYA: &str = "sd1_lora_kohya.safetensors";
const PEFT: &str = "sd1_lora_peft.safetensors";

fn load_model() -> StableDiffusion {
    let source = ModelSource::open(fixtures().join("sd1_tiny")).unwrap();
    StableDiffusion::load(&source, DType::F32, &test_device()).unwrap()
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(lora_file("sd1_lora_reference.safetensors"), &test_device())
        .unwrap()
}

fn get<'a>(r: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    r.get(key)
        .unwrap_or_else(|| panic!("reference tensor {key} missing"))
}

/// Max |a − b| / max |b|, in f64.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    // LoRA files are read on the CPU; the model may run on a GPU.
    let cpu = candle_core::Device::Cpu;
    let a = a.to_device(&cpu).unwrap().to_dtype(DType::F64).unwrap();
    let b = b.to_device(&cpu).unwrap().to_dtype(DType::F64).unwrap();
    let diff = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    if diff == 0.0 { 0.0 } else { diff / scale }
}

fn norm(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

fn count(keys: impl IntoIterator<Item = LoraComponent>) -> BTreeMap<LoraComponent, usize> {
    let mut out = BTreeMap::new();
    for c in keys {
        *out.entry(c).or_insert(0) += 1;
    }
    out
}

fn diffusers_counts() -> BTreeMap<LoraComponent, usize> {
    BTreeMap::from([
        (LoraComponent::Unet, DIFFUSERS_UNET_MODULES),
        (LoraComponent::TextEncoder, DIFFUSERS_TE_MODULES),
    ])
}

/// `scale · up · down` flattened to `[out, in·kh·kw]`, f64.
fn product(m: &sd_lora_model::lora::LoraModule) -> Tensor {
    let r = m.rank();
    let down = m.down.to_dtype(DType::F64).unwrap();
    let up = m.up.to_dtype(DType::F64).unwrap();
    let down = down.reshape((r, down.elem_count() / r)).unwrap();
    let up = up.reshape((up.elem_count() / r, r)).unwrap();
    (up.matmul(&down).unwrap() * m.scale() as f64).unwrap()
}

fn read(name: &str) -> LoraWeights {
    read_lora(&lora_file(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .weights
}

/// Reads `name` resolving its module names against the model's layers, as the CLI does.
fn read_for(name: &str, model: &StableDiffusion) -> LoraWeights {
    let targets = model_targets(&model.unet, Some(&model.text_encoder));
    read_lora_for_model(&lora_file(name), &targets)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .weights
}

#[test]
fn kohya_and_peft_files_read_to_the_same_lora() {
    let kohya = read_lora(&lora_file(KOHYA)).unwrap();
    let peft = read_lora(&lora_file(PEFT)).unwrap();
    assert_eq!(kohya.format, LoraFormat::Kohya);
    assert_eq!(peft.format, LoraFormat::Peft);
    let (k, p) = (&kohya.weights.modules, &peft.weights.modules);
    assert_eq!(
        k.keys().collect::<Vec<_>>(),
        p.keys().collect::<Vec<_>>(),
        "the two files name different modules"
    );
    assert_eq!(count(k.keys().map(|(c, _)| *c)), diffusers_counts());

    // The kohya tensors are the file's, bit for bit, with the file's alpha.
    let raw = candle_core::safetensors::load(lora_file(KOHYA), &test_device()).unwrap();
    let mut worst = 0.0f64;
    for ((c, path), km) in k {
        let name = kohya_name(*c, path);
        assert_eq!(km.rank(), RANK, "{name}");
        assert_eq!(km.alpha, ALPHA, "{name}: alpha");
        assert_eq!(
            rel_err(&km.down, &raw[&format!("{name}.lora_down.weight")]),
            0.0
        );
        assert_eq!(
            rel_err(&km.up, &raw[&format!("{name}.lora_up.weight")]),
            0.0
        );
        // PEFT has no alpha: the file folds alpha/rank into B, the reader gives alpha = rank.
        let pm = &p[&(*c, path.clone())];
        assert_eq!(pm.rank(), RANK, "{name} (peft)");
        assert_eq!(
            pm.scale(),
            1.0,
            "{name} (peft): alpha should be read as the rank"
        );
        worst = worst.max(rel_err(&product(pm), &product(km)));
    }
    println!("kohya vs peft: max rel err of scale·up·down over 210 modules: {worst:.1e}");
    assert!(worst < 1e-6, "scale·up·down differ by {worst:.2e}");
}

#[test]
fn kohya_preset_selects_the_modules_diffusers_attached() {
    let model = load_model();
    let all = model_targets(&model.unet, Some(&model.text_encoder));
    let selected: BTreeSet<(LoraComponent, String)> = select(&all, &TargetSpec::default())
        .into_iter()
        .map(|t| (t.component, t.path))
        .collect();
    let file: BTreeSet<(LoraComponent, String)> = read(KOHYA).modules.into_keys().collect();
    let missing: Vec<_> = file.difference(&selected).collect();
    let extra: Vec<_> = selected.difference(&file).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "kohya preset vs the reference LoRA: not selected {missing:?}, selected but not in the \
         reference {extra:?}"
    );
    assert_eq!(count(selected.iter().map(|(c, _)| *c)), diffusers_counts());
}

/// The outputs diffusers computes with the LoRA at `prefix` (`mult_1` / `mult_0_5`).
fn check_outputs(
    model: &StableDiffusion,
    r: &HashMap<String, Tensor>,
    prefix: &str,
    what: &str,
) -> f64 {
    let ids = get(r, "inputs.text_encoder.input_ids");
    let te = model.text_encoder.forward(ids).unwrap().last_hidden_state;
    let mut errs = vec![(
        "text_encoder.last_hidden_state",
        rel_err(
            &te,
            get(r, &format!("{prefix}.text_encoder.last_hidden_state")),
        ),
    )];
    for (key, label) in [("unet", "unet.out"), ("unet_hw", "unet_hw.out")] {
        let sample = get(r, &format!("inputs.{key}.sample"));
        let t = get(r, &format!("inputs.{key}.timesteps"))
            .to_dtype(DType::F32)
            .unwrap();
        let ehs = get(r, &format!("inputs.{key}.encoder_hidden_states"));
        let out = model.unet.forward(sample, &t, ehs).unwrap();
        errs.push((label, rel_err(&out, get(r, &format!("{prefix}.{label}")))));
    }
    let mut worst = 0.0f64;
    for (label, e) in errs {
        println!("{what}, {prefix}: {label}: max rel err {e:.2e}");
        assert!(
            e < OUTPUT_TOL,
            "{what}, {prefix}: {label} differs by {e:.2e}"
        );
        worst = worst.max(e);
    }
    worst
}

#[test]
fn outputs_match_diffusers_with_the_lora_loaded() {
    let r = reference();
    for name in [KOHYA, PEFT] {
        let mut model = load_model();
        let weights = read_for(name, &model);
        // Without the model, names are resolved by grammar: the same modules.
        let by_grammar: Vec<_> = read(name).modules.into_keys().collect();
        assert_eq!(
            weights.modules.keys().cloned().collect::<Vec<_>>(),
            by_grammar,
            "{name}"
        );
        let n = attach(
            &mut model.unet,
            Some(&mut model.text_encoder),
            &weights,
            1.0,
        )
        .unwrap();
        assert_eq!(n, DIFFUSERS_UNET_MODULES + DIFFUSERS_TE_MODULES, "{name}");
        let adapted = adapted_layers(&model.unet, Some(&model.text_encoder));
        assert_eq!(
            count(adapted.iter().map(|(c, _)| *c)),
            diffusers_counts(),
            "{name}"
        );
        check_outputs(&model, &r, "mult_1", name);
        let changed = set_multiplier(&mut model.unet, Some(&mut model.text_encoder), 0.5);
        assert_eq!(changed, n);
        check_outputs(&model, &r, "mult_0_5", name);
    }
}

#[test]
fn lora_gradients_match_pytorch() {
    let r = reference();
    let weights = read(KOHYA);
    let mut model = load_model();
    // The trainer's path: fresh trainable adapters on the kohya preset (rank 4, alpha 2)...
    let ra = RankAlpha {
        rank: RANK,
        alpha: ALPHA,
    };
    let spec = TargetSpec {
        unet_linear: ra,
        unet_conv: ra,
        text_encoder_rank: ra,
        ..TargetSpec::default()
    };
    let lora = create_trainable(
        &mut model.unet,
        Some(&mut model.text_encoder),
        &spec,
        &TrainOptions::default(),
    )
    .unwrap();
    assert_eq!(
        count(lora.modules.iter().map(|m| m.target.component)),
        diffusers_counts()
    );
    // ...set to the fixture's values.
    for m in &lora.modules {
        let key = (m.target.component, m.target.path.clone());
        let fixture = weights
            .modules
            .get(&key)
            .unwrap_or_else(|| panic!("{key:?} is not in the fixture LoRA"));
        m.down()
            .unwrap()
            .set(&fixture.down.to_device(&test_device()).unwrap())
            .unwrap();
        m.up()
            .unwrap()
            .set(&fixture.up.to_device(&test_device()).unwrap())
            .unwrap();
        assert_eq!(m.alpha, fixture.alpha);
    }

    // loss = mean((unet(sample, t, te(ids)) − target)²), as tools/make_lora_fixtures.py.
    let ids = get(&r, "inputs.text_encoder.input_ids");
    let hidden = model.text_encoder.forward(ids).unwrap().last_hidden_state;
    let sample = get(&r, "inputs.unet_hw.sample");
    let t = get(&r, "inputs.unet_hw.timesteps")
        .to_dtype(DType::F32)
        .unwrap();
    let out = model.unet.forward(sample, &t, &hidden).unwrap();
    let e_te = rel_err(&hidden, get(&r, "grad.text_encoder.last_hidden_state"));
    let e_out = rel_err(&out, get(&r, "grad.unet.out"));
    let loss = (&out - get(&r, "grad.target"))
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let e_loss = rel_err(&loss, get(&r, "grad.loss"));
    println!("forward in the loss: text encoder {e_te:.2e}, unet {e_out:.2e}, loss {e_loss:.2e}");
    assert!(e_te < OUTPUT_TOL && e_out < OUTPUT_TOL && e_loss < OUTPUT_TOL);

    let grads = loss.backward().unwrap();
    let mut worst = (0.0f64, String::new());
    let mut failures = Vec::new();
    let mut checked = 0;
    for m in &lora.modules {
        let name = kohya_name(m.target.component, &m.target.path);
        for (part, var) in [
            ("lora_down", &m.down().unwrap()),
            ("lora_up", &m.up().unwrap()),
        ] {
            let key = format!("{name}.{part}.weight");
            let reference = get(&r, &format!("grad.{key}"));
            let Some(g) = grads.get(var.as_tensor()) else {
                failures.push(format!("{key}: no gradient at all (the path is cut)"));
                continue;
            };
            let (n, n_ref) = (norm(g), norm(reference));
            // "None is zero": a cut path gives no gradient or rounding noise, not 0.1 % of it.
            if n.is_nan() || n <= 1e-3 * n_ref {
                failures.push(format!(
                    "{key}: gradient norm {n:.3e}, reference {n_ref:.3e}"
                ));
                continue;
            }
            let e = rel_err(g, reference);
            if e > GRAD_TOL {
                failures.push(format!("{key}: max rel err {e:.2e}"));
            }
            if e > worst.0 {
                worst = (e, key);
            }
            checked += 1;
        }
    }
    println!(
        "gradients: {checked} tensors checked, worst max rel err {:.2e} ({})",
        worst.0, worst.1
    );
    assert!(
        failures.is_empty(),
        "{} LoRA gradient(s) differ from PyTorch:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
    assert_eq!(checked, 2 * (DIFFUSERS_UNET_MODULES + DIFFUSERS_TE_MODULES));
    assert_eq!(lora.vars().len(), checked);
}

/// Our writer, on the reference LoRA: kohya f32 reads back bit-identical, PEFT f32 to the same
/// products (alpha/rank = 0.5 folded into up is exact), and both attach to give diffusers'
/// outputs. Set `SD_LORA_PARITY_OUT=DIR` to keep the files, e.g. to check them with
/// `tools/check_lora_in_diffusers.py DIR/written_kohya_f16.safetensors`.
#[test]
fn files_we_write_read_back_and_match_diffusers() {
    let r = reference();
    let weights = read(KOHYA);
    let keep = std::env::var_os("SD_LORA_PARITY_OUT").map(PathBuf::from);
    let dir = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("sd_lora_parity_{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir).unwrap();
    let metadata = Metadata {
        network_dim: Some(RANK),
        network_alpha: Some(ALPHA),
        base_model: Some(BaseModelVersion::SdV1),
        ..Metadata::default()
    };
    let written = [
        (
            "written_kohya_f32.safetensors",
            LoraFormat::Kohya,
            SaveDtype::F32,
        ),
        (
            "written_peft_f32.safetensors",
            LoraFormat::Peft,
            SaveDtype::F32,
        ),
        (
            "written_kohya_f16.safetensors",
            LoraFormat::Kohya,
            SaveDtype::F16,
        ),
    ];
    for (file, format, dtype) in written {
        let path = dir.join(file);
        match format {
            LoraFormat::Kohya => write_kohya(&path, &weights, &metadata, dtype).unwrap(),
            _ => write_peft(&path, &weights, &metadata, dtype).unwrap(),
        }
        let back = read_lora(&path).unwrap();
        assert_eq!(back.format, format, "{file}");
        assert_eq!(
            back.weights.modules.keys().collect::<Vec<_>>(),
            weights.modules.keys().collect::<Vec<_>>(),
            "{file}"
        );
        let mut worst = 0.0f64;
        for (key, m) in &weights.modules {
            let b = &back.weights.modules[key];
            if (format, dtype) == (LoraFormat::Kohya, SaveDtype::F32) {
                assert_eq!(rel_err(&b.down, &m.down), 0.0, "{file} {key:?} down");
                assert_eq!(rel_err(&b.up, &m.up), 0.0, "{file} {key:?} up");
                assert_eq!(b.alpha, m.alpha, "{file} {key:?} alpha");
            }
            worst = worst.max(rel_err(&product(b), &product(m)));
        }
        println!("{file}: scale·up·down max rel err vs the reference LoRA {worst:.1e}");
        let tol = if dtype == SaveDtype::F32 { 1e-6 } else { 2e-3 };
        assert!(worst < tol, "{file}: products differ by {worst:.2e}");
        if dtype == SaveDtype::F32 {
            let mut model = load_model();
            attach(
                &mut model.unet,
                Some(&mut model.text_encoder),
                &back.weights,
                1.0,
            )
            .unwrap();
            check_outputs(&model, &r, "mult_1", file);
        }
    }
    if keep.is_none() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
