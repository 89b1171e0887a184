//! End-to-end tests of `sd-lora generate` on the built-in tiny model (64×64,
//! 4 steps, so each image takes well under a second).

use sd_lora_train::png_meta::read_png_params;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sd_lora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sd-lora"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .output()
        .unwrap()
}

/// Generates one 64×64 image of `prompt` with `seed` (plus `extra` flags) into
/// `out`; returns the written path.
fn generate(out: &Path, seed: &str, extra: &[&str]) -> PathBuf {
    let o = out.to_str().unwrap();
    let mut args = vec![
        "generate",
        "--model",
        "builtin:tiny",
        "--prompt",
        "a drawing of ohwx robot",
        "--negative-prompt",
        "blurry",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "4",
        "--seed",
        seed,
        "--output",
        o,
    ];
    args.extend_from_slice(extra);
    let r = sd_lora(&args);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "generate failed: {stderr}");
    let stdout = String::from_utf8(r.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "expected one written path, got {stdout:?}");
    PathBuf::from(lines[0])
}

fn pixels(path: &Path) -> image::RgbImage {
    image::open(path).unwrap().to_rgb8()
}

#[test]
fn writes_a_png_with_parameters_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let first = generate(dir.path(), "1234", &["--sampler", "euler"]);
    assert_eq!(first.file_name().unwrap(), "00000-1234.png");
    let img = pixels(&first);
    assert_eq!((img.width(), img.height()), (64, 64));
    let params = read_png_params(&first)
        .unwrap()
        .expect("a parameters chunk");
    assert_eq!(params.prompt, "a drawing of ohwx robot");
    assert_eq!(params.negative_prompt, "blurry");
    assert_eq!(params.seed, 1234);
    assert_eq!(params.steps, 4);
    assert_eq!(params.sampler, "Euler");
    assert_eq!((params.width, params.height), (64, 64));
    assert_eq!(params.cfg_scale, 7.0);

    // Never overwrites: the same seed goes to the next number, with the same pixels.
    let second = generate(dir.path(), "1234", &["--sampler", "euler"]);
    assert_eq!(second.file_name().unwrap(), "00001-1234.png");
    assert_eq!(img.as_raw(), pixels(&second).as_raw());

    let other = generate(dir.path(), "1235", &["--sampler", "euler"]);
    assert_ne!(img.as_raw(), pixels(&other).as_raw());
}

#[test]
fn a_lora_from_training_changes_the_image_and_a_foreign_lora_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let train_out = dir.path().join("train");
    let r = sd_lora(&[
        "train",
        "--config",
        "configs/quickstart.toml",
        "--steps",
        "2",
        "--output",
        train_out.to_str().unwrap(),
    ]);
    assert!(
        r.status.success(),
        "train failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let lora = train_out.join("quickstart.safetensors");
    assert!(lora.is_file());

    let images = dir.path().join("images");
    let plain = generate(&images, "7", &[]);
    let spec = format!("{}:0.8", lora.display());
    let with_lora = generate(&images, "7", &["--lora", &spec]);
    assert_ne!(
        pixels(&plain).as_raw(),
        pixels(&with_lora).as_raw(),
        "the LoRA did not change the image"
    );
    let params = read_png_params(&with_lora).unwrap().unwrap();
    assert_eq!(params.loras.len(), 1);
    assert_eq!(params.loras[0].name, "quickstart");
    assert_eq!(params.loras[0].scale, 0.8);
    assert_eq!(params.loras[0].hash.len(), 12);
    assert_eq!(params.sampler, "Euler a");

    // Merged gives (nearly) the same image as unmerged.
    let merged = generate(&images, "7", &["--lora", &spec, "--merge"]);
    let (a, b) = (pixels(&with_lora), pixels(&merged));
    let max_diff = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap();
    assert!(max_diff <= 2, "merged and unmerged differ by {max_diff}");

    // Several LoRAs stack: the same LoRA twice at 0.4 is the LoRA at 0.8.
    let half = format!("{}:0.4", lora.display());
    let twice = generate(&images, "7", &["--lora", &half, "--lora", &half]);
    let c = pixels(&twice);
    let max_diff = a
        .as_raw()
        .iter()
        .zip(c.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap();
    assert!(
        max_diff <= 2,
        "two LoRAs at 0.4 differ from one at 0.8 by {max_diff}"
    );
    assert_eq!(read_png_params(&twice).unwrap().unwrap().loras.len(), 2);

    // A LoRA trained for another model (sd1_tiny's layout) does not fit.
    let foreign = dir.path().join("foreign");
    let r = sd_lora(&[
        "generate",
        "--model",
        "builtin:tiny",
        "--prompt",
        "x",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "1",
        "--lora",
        "tests/fixtures/lora/sd1_lora_kohya.safetensors",
        "--output",
        foreign.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains("sd1_lora_kohya.safetensors"), "{stderr}");
    assert!(
        stderr.contains("lora_"),
        "the error should list keys: {stderr}"
    );
    assert_eq!(std::fs::read_dir(&foreign).map_or(0, |d| d.count()), 0);
}

#[test]
fn bad_arguments_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["--width", "500"], "--width 500: must be a multiple of 8"),
        (&["--sampler", "foo"], "euler_a"),
        (&["--lora", "missing.safetensors"], "missing.safetensors"),
        (&["--lora", "x.safetensors:abc"], "\"abc\" is not a number"),
        (&["--steps", "0"], "--steps 0"),
    ];
    for (extra, expected) in cases {
        let mut args = vec![
            "generate",
            "--model",
            "builtin:tiny",
            "--prompt",
            "x",
            "--output",
            o,
        ];
        args.extend_from_slice(extra);
        let r = sd_lora(&args);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
        assert!(r.stdout.is_empty(), "{extra:?}");
        assert!(!out.exists(), "{extra:?} created the output folder");
    }
}

/// SDXL through the CLI as a user runs it: the SDXL quickstart trains (both
/// text encoders), `generate` renders at the model's native size with the LoRA,
/// `convert` and `inspect` read the SDXL file, and a LoRA of the other family
/// is refused by name in both directions.
#[test]
fn sdxl_quickstart_lora_generates_converts_and_other_families_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let train_out = dir.path().join("train");
    let r = sd_lora(&[
        "train",
        "--config",
        "configs/quickstart-sdxl.toml",
        "--steps",
        "2",
        "--output",
        train_out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "train failed: {stderr}");
    assert!(
        stderr.contains("dataset.resolution = 64 (the model's native resolution"),
        "{stderr}"
    );
    let lora = train_out.join("quickstart-sdxl.safetensors");

    let images = dir.path().join("images");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            "builtin:tiny-sdxl",
            "--prompt",
            "ohwx robot",
            "--steps",
            "3",
            "--seed",
            "5",
            "--output",
            images.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let r = sd_lora(&args);
        assert!(
            r.status.success(),
            "generate failed: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        PathBuf::from(String::from_utf8(r.stdout).unwrap().trim())
    };
    let plain = run(&[]);
    let spec = format!("{}:1.0", lora.display());
    let with_lora = run(&["--lora", &spec]);
    let (a, b) = (pixels(&plain), pixels(&with_lora));
    assert_eq!(
        (a.width(), a.height()),
        (64, 64),
        "native size of the model"
    );
    assert_ne!(
        a.as_raw(),
        b.as_raw(),
        "the SDXL LoRA did not change the image"
    );
    let params = read_png_params(&with_lora).unwrap().unwrap();
    assert_eq!(params.loras[0].name, "quickstart-sdxl");

    // PEFT and back: the same modules, and the file still applies.
    let peft = dir.path().join("peft.safetensors");
    let r = sd_lora(&[
        "convert",
        lora.to_str().unwrap(),
        peft.to_str().unwrap(),
        "--to",
        "peft",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let r = sd_lora(&[
        "inspect",
        peft.to_str().unwrap(),
        "--model",
        "builtin:tiny-sdxl",
        "--json",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["family"], "sdxl");
    assert_eq!(v["format"], "peft");
    assert_eq!(v["modules"]["text_encoder"], 12);
    assert_eq!(v["modules"]["text_encoder_2"], 12);

    // An SDXL LoRA on an SD1 model, and an SD1 LoRA on an SDXL model.
    for (model, file) in [
        ("builtin:tiny", lora.to_str().unwrap()),
        (
            "builtin:tiny-sdxl",
            "tests/fixtures/lora/sd1_lora_kohya.safetensors",
        ),
    ] {
        let r = sd_lora(&[
            "generate",
            "--model",
            model,
            "--prompt",
            "x",
            "--steps",
            "1",
            "--lora",
            file,
            "--output",
            dir.path().join("refused").to_str().unwrap(),
        ]);
        assert_eq!(r.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(stderr.contains("LoRA and the model is"), "{stderr}");
    }
    assert!(!dir.path().join("refused").exists());
}
