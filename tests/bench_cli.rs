//! `sd-lora bench` refuses bad arguments with one clear line and a non-zero
//! exit, before building anything (the full SD1.5 model is never built here:
//! it would take minutes; the benchmark itself is tested on a tiny UNet in
//! `sd_lora_train::bench`).

use std::process::{Command, Output};

fn sd_lora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sd-lora"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .output()
        .unwrap()
}

/// Runs `bench` with `args`, expects failure, returns stderr.
fn refused(args: &[&str]) -> String {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    let out = sd_lora(&all);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} should fail: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
    // Refused before building: no progress line was printed.
    assert!(!stderr.contains("building"), "{stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one line expected: {stderr}"
    );
    stderr
}

#[test]
fn bad_resolution_is_refused() {
    for r in ["100", "56", "0"] {
        let e = refused(&["--resolution", r, "--json"]);
        assert!(e.contains("multiple of 8") && e.contains(r), "{e}");
    }
}

#[test]
fn unknown_precision_is_refused() {
    let e = refused(&["--precision", "fp4"]);
    assert!(
        e.contains("\"fp4\"") && e.contains("f32, f16 or bf16"),
        "{e}"
    );
    // fp8 storage belongs to the train path: said so.
    let e = refused(&["--precision", "fp8"]);
    assert!(
        e.contains("--train") && e.contains("f32, f16 or bf16"),
        "{e}"
    );
}

#[test]
fn bad_device_and_zero_steps_are_refused() {
    let e = refused(&["--device", "tpu"]);
    assert!(e.contains("cpu, cuda or cuda:N"), "{e}");
    let e = refused(&["--steps", "0"]);
    assert!(e.contains("steps"), "{e}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_in_a_cpu_build_is_refused() {
    for d in ["cuda", "cuda:1"] {
        let e = refused(&["--device", d]);
        assert!(
            e.contains("built without CUDA") && e.contains("--features cuda"),
            "{e}"
        );
    }
}

/// `bench --train` runs the `train` command itself: on the built-in tiny
/// model and the example dataset it reports loading, the latent and caption
/// caching passes before the first step, the timed steps and peak memory.
#[test]
fn train_mode_runs_the_training_path() {
    let out = sd_lora(&[
        "bench",
        "--train",
        "--model",
        "builtin:tiny",
        "--data",
        "assets/example_dataset",
        "--resolution",
        "64",
        "--set",
        "dataset.min_bucket_side=64",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["impl"], "sd-lora");
    assert_eq!(r["mode"], "train");
    assert_eq!(r["resolution"], 64);
    assert_eq!(r["preset"], "kohya");
    let images = r["images"].as_u64().unwrap();
    assert!(images >= 8, "{r}");
    // Every image encoded before the first step, then the encoders released.
    assert_eq!(r["latents"].as_u64(), Some(images), "{r}");
    assert!(stderr.contains("VAE encoder released"), "{stderr}");
    assert!(stderr.contains("text encoder released"), "{stderr}");
    assert_eq!(r["step_s"].as_array().unwrap().len(), 2);
    assert!(r["median_step_s"].as_f64().unwrap() > 0.0);
    assert!(r["load_s"].as_f64().unwrap() > 0.0);
    assert!(r["lora_params"].as_u64().unwrap() > 0);
    let load_peak = r["load_peak_rss_bytes"].as_u64().unwrap();
    assert!(r["peak_rss_bytes"].as_u64().unwrap() >= load_peak);
}

#[test]
fn vae_mode_times_one_encode_and_decode() {
    let out = sd_lora(&[
        "bench",
        "--vae",
        "--model",
        "tests/fixtures/sd1_tiny",
        "--resolution",
        "64",
        "--repeat",
        "2",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["mode"], "vae");
    assert_eq!(r["encode_s"].as_array().unwrap().len(), 2);
    assert_eq!(r["decode_s"].as_array().unwrap().len(), 2);
}

#[test]
fn train_and_vae_modes_refuse_bad_input() {
    let e = refused(&["--vae"]);
    assert!(e.contains("--vae needs --model"), "{e}");
    let e = refused(&["--vae", "--model", "Cargo.toml"]);
    assert!(e.contains("Cargo.toml"), "{e}");
    let e = refused(&["--model", "tests/fixtures/sd1_tiny"]);
    assert!(
        e.contains("--model belongs to `sd-lora bench --train`"),
        "{e}"
    );
    let e = refused(&[
        "--train",
        "--model",
        "tests/fixtures/sd1_tiny",
        "--data",
        "no/such/dir",
    ]);
    assert!(
        e.contains("no/such/dir") && e.contains("no such folder"),
        "{e}"
    );
    let e = refused(&[
        "--train",
        "--model",
        "no/such/model",
        "--data",
        "assets/example_dataset",
    ]);
    assert!(
        e.contains("no/such/model") && e.contains("no such file or folder"),
        "{e}"
    );
    let e = refused(&[
        "--train",
        "--model",
        "README.md",
        "--data",
        "assets/example_dataset",
    ]);
    assert!(
        e.contains("README.md") && e.contains("diffusers folder"),
        "{e}"
    );
    let e = refused(&["--train", "--set", "train.no_such_key=1"]);
    assert!(e.contains("no_such_key"), "{e}");
}
