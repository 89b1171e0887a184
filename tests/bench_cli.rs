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
    let e = refused(&["--precision", "fp8"]);
    assert!(
        e.contains("\"fp8\"") && e.contains("f32, f16 or bf16"),
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
