//! End-to-end tests of `sd-lora inspect` on LoRA files and `sd-lora convert`.

use serde_json::Value;
use std::process::{Command, Output};

fn sd_lora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sd-lora"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .output()
        .expect("run sd-lora")
}

fn ok_json(args: &[&str]) -> Value {
    let o = sd_lora(args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

const KOHYA: &str = "tests/fixtures/lora/sd1_lora_kohya.safetensors";
const PEFT: &str = "tests/fixtures/lora/sd1_lora_peft.safetensors";

#[test]
fn inspect_reports_a_lora_and_checks_it_against_its_model() {
    let v = ok_json(&[
        "inspect",
        KOHYA,
        "--model",
        "tests/fixtures/sd1_tiny",
        "--json",
    ]);
    assert_eq!(v["kind"], "lora");
    assert_eq!(v["format"], "kohya");
    assert_eq!(v["base_model_version"], "sd_v1");
    // The module counts diffusers attached for this file (tests/fixtures/lora/README.md).
    assert_eq!(v["modules"]["unet"], 192);
    assert_eq!(v["modules"]["text_encoder"], 18);
    assert_eq!(v["ranks"], serde_json::json!([4]));
    assert_eq!(v["alphas"], serde_json::json!([2.0]));
    assert_eq!(v["scales"], serde_json::json!([0.5]));
    assert_eq!(v["model_check"]["matched_modules"], 210);

    let v = ok_json(&["inspect", PEFT, "--json"]);
    assert_eq!(v["format"], "peft");
    assert_eq!(v["modules"]["unet"], 192);

    // A LoRA for another model is an error that lists the modules that do not fit.
    let o = sd_lora(&["inspect", KOHYA, "--model", "tests/fixtures/sd2_tiny"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("does not fit tests/fixtures/sd2_tiny")
            && err.contains("match no module of the model"),
        "{err}"
    );
    assert!(
        err.contains("lora_te_text_model_encoder_layers_2_self_attn_q_proj"),
        "{err}"
    );

    // --model is for LoRA files only.
    let o = sd_lora(&[
        "inspect",
        "tests/fixtures/sd1_tiny",
        "--model",
        "tests/fixtures/sd1_tiny",
    ]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn convert_round_trips_between_kohya_and_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let peft = tmp.path().join("peft.safetensors");
    let back = tmp.path().join("kohya.safetensors");
    let (p, b) = (peft.to_str().unwrap(), back.to_str().unwrap());
    let o = sd_lora(&["convert", KOHYA, p, "--to", "peft"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = ok_json(&["inspect", p, "--json"]);
    assert_eq!(v["format"], "peft");
    // PEFT has no alpha: the scale is folded into the weights, alpha = rank.
    assert_eq!(v["alphas"], serde_json::json!([4.0]));
    let o = sd_lora(&["convert", p, b, "--to", "kohya"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = ok_json(&["inspect", b, "--model", "tests/fixtures/sd1_tiny", "--json"]);
    assert_eq!(v["format"], "kohya");
    assert_eq!(v["scales"], serde_json::json!([1.0]));
    assert_eq!(v["model_check"]["matched_modules"], 210);

    // Refuses to overwrite, and to read what is not a LoRA.
    let o = sd_lora(&["convert", KOHYA, b, "--to", "peft"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    let out = tmp.path().join("x.safetensors");
    let o = sd_lora(&[
        "convert",
        "tests/fixtures/sd1_tiny.safetensors",
        out.to_str().unwrap(),
        "--to",
        "peft",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!out.exists());
    let o = sd_lora(&[
        "convert",
        "README.md",
        out.to_str().unwrap(),
        "--to",
        "peft",
    ]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn resize_writes_a_smaller_lora_and_refuses_what_it_should() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("r2.safetensors");
    let o = sd_lora(&["resize", KOHYA, out.to_str().unwrap(), "--rank", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("210 modules") && text.contains("rank 4 → 2") && text.contains("Frobenius"),
        "{text}"
    );
    let v = ok_json(&["inspect", out.to_str().unwrap(), "--json"]);
    assert_eq!(v["format"], "kohya");
    assert_eq!(v["ranks"], serde_json::json!([2]));
    // alpha/rank is kept: 2/4 → 1/2.
    assert_eq!(v["scales"], serde_json::json!([0.5]));

    // Dynamic rules, kohya's names, per-module lines with --verbose.
    let dynamic = tmp.path().join("d.safetensors");
    let o = sd_lora(&[
        "resize",
        PEFT,
        dynamic.to_str().unwrap(),
        "--dynamic",
        "sv_fro",
        "--param",
        "0.9",
        "--verbose",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.lines().count() > 200, "{text}");
    assert_eq!(
        ok_json(&["inspect", dynamic.to_str().unwrap(), "--json"])["format"],
        "peft"
    );

    for (args, needle) in [
        (
            vec!["resize", KOHYA, out.to_str().unwrap(), "--rank", "2"],
            "already exists",
        ),
        (
            vec!["resize", KOHYA, KOHYA, "--rank", "2", "--force"],
            "the output is the input",
        ),
        (vec!["resize", KOHYA, "x.safetensors"], "give --rank N"),
        (
            vec!["resize", KOHYA, "x.safetensors", "--rank", "0"],
            "at least 1",
        ),
        (
            vec![
                "resize",
                KOHYA,
                "x.safetensors",
                "--dynamic",
                "sv_ratio",
                "--param",
                "0.5",
            ],
            "ratio above 1",
        ),
        (
            vec!["resize", "README.md", "x.safetensors", "--rank", "2"],
            "README.md",
        ),
    ] {
        let o = sd_lora(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert!(
        !std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../x.safetensors")).exists()
    );
}

/// `merge` into a checkpoint and into one LoRA, `extract` back, and every
/// refusal before anything is written.
#[test]
fn merge_and_extract_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| tmp.path().join(name).to_string_lossy().into_owned();
    let run_ok = |args: &[&str]| {
        let o = sd_lora(args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    const BASE: &str = "tests/fixtures/sd1_tiny.safetensors";
    let merged = p("merged.safetensors");
    let kohya_08 = format!("{KOHYA}:0.8");
    let text = run_ok(&[
        "merge", "--model", BASE, "--lora", &kohya_08, "--output", &merged,
    ]);
    assert!(text.contains("into 210 layers"), "{text}");
    // The merged file is a checkpoint of the same model.
    let v = ok_json(&["inspect", &merged, "--json"]);
    assert_eq!(v["architecture"], "sd1");

    // Extract it back at the LoRA's rank: the same modules.
    let extracted = p("extracted.safetensors");
    let text = run_ok(&[
        "extract",
        "--base",
        BASE,
        "--tuned",
        &merged,
        "--rank",
        "4",
        "--output",
        &extracted,
        "--min-diff",
        "0",
    ]);
    assert!(text.contains("210 modules"), "{text}");
    let v = ok_json(&[
        "inspect",
        &extracted,
        "--model",
        "tests/fixtures/sd1_tiny",
        "--json",
    ]);
    assert_eq!(v["modules"]["unet"], 192);
    assert_eq!(v["modules"]["text_encoder"], 18);
    assert_eq!(v["ranks"], serde_json::json!([4]));

    // Two LoRAs into one, concatenated, in PEFT format.
    let both = p("both.safetensors");
    let peft_neg = format!("{PEFT}:-0.5");
    let text = run_ok(&[
        "merge", "--lora", KOHYA, "--lora", &peft_neg, "--output", &both, "--format", "peft",
    ]);
    assert!(
        text.contains("210 modules (210 in more than one file)"),
        "{text}"
    );
    let v = ok_json(&["inspect", &both, "--json"]);
    assert_eq!(v["format"], "peft");
    assert_eq!(v["ranks"], serde_json::json!([8]));

    let folder_out = p("folder.safetensors");
    let nested = format!("{}/nested.safetensors", "tests/fixtures/sd1_tiny");
    for (args, needle) in [
        (
            vec![
                "merge", "--model", BASE, "--lora", KOHYA, "--output", BASE, "--force",
            ],
            "the output is the input",
        ),
        (
            vec![
                "merge", "--model", BASE, "--lora", KOHYA, "--output", &merged,
            ],
            "already exists",
        ),
        (
            vec![
                "merge",
                "--model",
                "tests/fixtures/sdxl_tiny.safetensors",
                "--lora",
                KOHYA,
                "--output",
                &folder_out,
            ],
            "the model is SDXL",
        ),
        (
            vec![
                "merge",
                "--model",
                "tests/fixtures/sd1_tiny",
                "--lora",
                KOHYA,
                "--output",
                &folder_out,
            ],
            "give --output a folder name",
        ),
        (
            vec![
                "merge",
                "--model",
                "tests/fixtures/sd1_tiny",
                "--lora",
                KOHYA,
                "--output",
                &nested,
            ],
            "inside the input folder",
        ),
        (
            vec![
                "merge",
                "--model",
                BASE,
                "--lora",
                KOHYA,
                "--rank",
                "2",
                "--output",
                &folder_out,
            ],
            "--rank is for merging LoRAs",
        ),
        (
            vec!["merge", "--lora", "README.md", "--output", &folder_out],
            "README.md",
        ),
        (
            vec![
                "extract",
                "--base",
                BASE,
                "--tuned",
                "tests/fixtures/sd2_tiny.safetensors",
                "--rank",
                "4",
                "--output",
                &folder_out,
            ],
            "same architecture",
        ),
        (
            vec![
                "extract",
                "--base",
                BASE,
                "--tuned",
                BASE,
                "--rank",
                "4",
                "--output",
                &folder_out,
            ],
            "no difference to extract",
        ),
    ] {
        let o = sd_lora(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert!(!std::path::Path::new(&folder_out).exists());
}
