//! End-to-end tests of `sd-lora inspect MODEL` on the tiny fixture models.

use serde_json::Value;
use std::process::{Command, Output};

fn sd_lora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sd-lora"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .output()
        .expect("run sd-lora")
}

fn json(args: &[&str]) -> Value {
    let o = sd_lora(args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn params(v: &Value) -> Vec<(String, u64)> {
    v["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["component"].as_str().unwrap().to_string(),
                c["parameters"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn folder_and_single_file_report_the_same_exact_counts() {
    let folder = json(&["inspect", "tests/fixtures/sd1_tiny", "--json"]);
    let single = json(&["inspect", "tests/fixtures/sd1_tiny.safetensors", "--json"]);
    assert_eq!(folder["architecture"], "sd1");
    assert_eq!(single["architecture"], "sd1");
    assert_eq!(folder["prediction"], "epsilon");
    assert_eq!(folder["prediction_source"], "scheduler_config");
    assert_eq!(single["prediction_source"], "assumed_default");
    // Exact counts, from the reference models (tests/fixtures/README.md).
    let want = vec![
        ("unet".to_string(), 217_772),
        ("vae".to_string(), 43_711),
        ("text_encoder".to_string(), 60_160),
    ];
    assert_eq!(params(&folder), want);
    assert_eq!(params(&single), want);
    assert_eq!(folder["total_parameters"], 321_643);
}

#[test]
fn sd2_is_detected_with_v_prediction() {
    let folder = json(&["inspect", "tests/fixtures/sd2_tiny", "--json"]);
    assert_eq!(folder["architecture"], "sd2");
    assert_eq!(folder["prediction"], "v_prediction");
    let single = json(&[
        "inspect",
        "tests/fixtures/sd2_tiny.safetensors",
        "--prediction",
        "v",
        "--json",
    ]);
    assert_eq!(single["architecture"], "sd2");
    assert_eq!(single["prediction"], "v_prediction");
    assert_eq!(single["prediction_source"], "option");
    assert_eq!(params(&folder), params(&single));
}

#[test]
fn human_report_and_bad_inputs() {
    let o = sd_lora(&["inspect", "tests/fixtures/sd1_tiny"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("architecture  sd1") && out.contains("217,772"),
        "{out}"
    );
    for (path, needle) in [
        ("model.ckpt", "pickle"),
        ("model.pt", "pickle"),
        ("/nonexistent/model.safetensors", "no such file"),
        ("tests/fixtures", "model_index.json"),
        (
            "README.md",
            "expected a diffusers folder or a .safetensors file",
        ),
    ] {
        let o = sd_lora(&["inspect", path]);
        assert_eq!(o.status.code(), Some(1), "{path}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{path}: {err}");
        assert!(!err.contains("panicked"), "{path}: {err}");
    }
}

#[test]
fn built_in_models_are_described_and_unknown_ones_listed() {
    let v = json(&["inspect", "builtin:tiny-sdxl", "--json"]);
    assert_eq!(v["architecture"], "sdxl");
    assert_eq!(v["format"], "built_in");
    let names: Vec<String> = params(&v).into_iter().map(|(c, _)| c).collect();
    assert_eq!(names, ["unet", "vae", "text_encoder", "text_encoder_2"]);
    let v = json(&["inspect", "builtin:tiny", "--json"]);
    assert_eq!(v["architecture"], "sd1");
    assert_eq!(params(&v).len(), 3);
    let o = sd_lora(&["inspect", "builtin:huge"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("builtin:tiny, builtin:tiny-sdxl"),
        "the error should list the built-in models: {err}"
    );
}
