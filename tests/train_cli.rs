//! End-to-end tests of `sd-lora train` that need no training: the dry run,
//! the quick flags, and every input error, which must be reported with the
//! key at fault before any work starts.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn sd_lora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sd-lora"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("run sd-lora")
}

fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs `train` expecting exit status 1 with nothing on stdout; returns stderr.
fn fails(args: &[&str]) -> String {
    let mut all = vec!["train"];
    all.extend_from_slice(args);
    let o = sd_lora(&all);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{args:?}\n{out}\n{err}");
    assert!(out.is_empty(), "work started: {out}");
    err
}

#[test]
fn quickstart_dry_run_prints_every_section_and_creates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    let o = sd_lora(&[
        "train",
        "--config",
        "configs/quickstart.toml",
        "--output",
        out_dir.to_str().unwrap(),
        "--dry-run",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    for needle in [
        "# Resolved config",
        "[model]",
        "path = \"builtin:tiny\"",
        "[network]",
        "[train]",
        "[dataset]",
        "[output]",
        "# Dataset",
        "8 images, 80 samples per epoch",
        "# Schedule",
        "steps per epoch",
        "epochs",
        "# Memory estimate",
        "frozen weights (f32)",
        "LoRA:",
        "AdamW",
        "activations",
        "total: about",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }
    // The resolved config is valid TOML that reads back.
    let toml_part = out
        .split("# Dataset")
        .next()
        .unwrap()
        .trim_start_matches("# Resolved config");
    let doc: toml::Table = toml_part.parse().unwrap();
    assert_eq!(doc["train"]["steps"].as_integer(), Some(200));
    assert!(
        !out_dir.exists(),
        "a dry run must not create the output folder"
    );
}

#[test]
fn quick_flags_are_overrides_and_set_wins() {
    let o = sd_lora(&[
        "train",
        "--config",
        "configs/quickstart.toml",
        "--rank",
        "4",
        "--alpha",
        "2",
        "--lr",
        "2e-4",
        "--steps",
        "10",
        "--batch-size",
        "1",
        "--seed",
        "7",
        "--resolution",
        "128",
        "--name",
        "robot",
        "--save-format",
        "peft",
        "--train-text-encoder",
        "--device",
        "cpu",
        "--set",
        "network.alpha=3",
        "--dry-run",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let doc: toml::Table = out
        .split("# Dataset")
        .next()
        .unwrap()
        .trim_start_matches("# Resolved config")
        .parse()
        .unwrap();
    assert_eq!(doc["network"]["rank"].as_integer(), Some(4));
    assert_eq!(doc["network"]["alpha"].as_float(), Some(3.0), "--set wins");
    assert_eq!(doc["network"]["train_text_encoder"].as_bool(), Some(true));
    assert_eq!(doc["train"]["unet_lr"].as_float(), Some(2e-4));
    assert_eq!(doc["train"]["steps"].as_integer(), Some(10));
    assert_eq!(doc["train"]["seed"].as_integer(), Some(7));
    assert_eq!(doc["dataset"]["resolution"].as_integer(), Some(128));
    assert_eq!(doc["output"]["name"].as_str(), Some("robot"));
    assert_eq!(doc["output"]["save_format"].as_str(), Some("peft"));
    // Without a config file: the data folder and prompt alone.
    let o = sd_lora(&[
        "train",
        "--data",
        "assets/example_dataset",
        "--instance-prompt",
        "ohwx robot",
        "--resolution",
        "64",
        "--set",
        "dataset.min_bucket_side=64",
        "--dry-run",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("8 images"), "{out}");
    assert!(
        !err.contains("warning: identifier"),
        "ohwx is a good identifier: {err}"
    );
    // A poor identifier is warned about (the run still goes on).
    let o = sd_lora(&[
        "train",
        "--config",
        "configs/quickstart.toml",
        "--instance-prompt",
        "a photo of zwx robot",
        "--dry-run",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(err.contains("warning: identifier \"zwx\""), "{err}");
}

#[test]
fn bad_config_values_name_the_key_before_any_work() {
    let e = fails(&[
        "--config",
        "configs/quickstart.toml",
        "--set",
        "train.lr_scheduler=cosin",
    ]);
    assert!(
        e.contains("train.lr_scheduler") && e.contains("cosine_with_restarts"),
        "{e}"
    );
    let e = fails(&["--config", "configs/quickstart.toml", "--rank", "0"]);
    assert!(
        e.contains("network.rank") && e.contains("at least 1"),
        "{e}"
    );
    let e = fails(&["--config", "configs/quickstart.toml", "--device", "gpu"]);
    assert!(e.contains("model.device") && e.contains("cuda:N"), "{e}");
    let e = fails(&[
        "--config",
        "configs/quickstart.toml",
        "--save-format",
        "diffusers",
    ]);
    assert!(
        e.contains("output.save_format") && e.contains("peft"),
        "{e}"
    );
    let e = fails(&["--config", "configs/quickstart.toml", "--lr", "0"]);
    assert!(e.contains("train.unet_lr"), "{e}");

    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");
    fs::write(&cfg, "[network]\nrnak = 4\n").unwrap();
    let e = fails(&["--config", cfg.to_str().unwrap()]);
    assert!(
        e.contains("rnak") && e.contains("bad.toml") && e.contains("rank"),
        "{e}"
    );
    fs::write(&cfg, "[trian]\nsteps = 4\n").unwrap();
    let e = fails(&["--config", cfg.to_str().unwrap()]);
    assert!(e.contains("unknown config section `trian`"), "{e}");
    // Not only in dry runs: a real run stops at the same point.
    let e = fails(&[
        "--config",
        "configs/quickstart.toml",
        "--set",
        "train.steps=0",
    ]);
    assert!(e.contains("train.steps"), "{e}");
}

#[test]
fn missing_model_empty_dataset_and_unwritable_output_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let base = ["--config", "configs/quickstart.toml"];
    let with = |extra: &[&str]| {
        let mut v: Vec<&str> = base.to_vec();
        v.extend_from_slice(extra);
        v.iter().map(|s| s.to_string()).collect::<Vec<String>>()
    };
    let run = |args: Vec<String>| fails(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let missing = tmp.path().join("no_such_model.safetensors");
    let e = run(with(&["--model", missing.to_str().unwrap(), "--dry-run"]));
    assert!(
        e.contains("model.path") && e.contains("no such file"),
        "{e}"
    );

    let empty = tmp.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    let e = run(with(&["--data", empty.to_str().unwrap(), "--dry-run"]));
    assert!(e.contains("no usable images"), "{e}");
    let e = run(with(&["--data", tmp.path().join("nope").to_str().unwrap()]));
    assert!(e.contains("--data") && e.contains("no such folder"), "{e}");

    let file = tmp.path().join("a_file");
    fs::write(&file, "x").unwrap();
    let under = file.join("out");
    for dry in [true, false] {
        let mut args = with(&["--output", under.to_str().unwrap()]);
        if dry {
            args.push("--dry-run".into());
        }
        let e = run(args);
        assert!(e.contains("output.dir") && e.contains("is a file"), "{e}");
    }
    let e = run(with(&["--output", file.to_str().unwrap()]));
    assert!(
        e.contains("output.dir") && e.contains("not a folder"),
        "{e}"
    );

    let e = run(with(&[
        "--resume",
        tmp.path().join("nope").to_str().unwrap(),
    ]));
    assert!(
        e.contains("--resume") && e.contains("no such folder"),
        "{e}"
    );
}

#[test]
fn every_example_config_is_a_valid_training_config() {
    for entry in fs::read_dir(repo_root().join("configs")).unwrap() {
        let p = entry.unwrap().path();
        let o = sd_lora(&["train", "--config", p.to_str().unwrap(), "--dry-run"]);
        let (out, err) = text(&o);
        // The SD1.5 examples carry placeholder paths: the model is the first
        // thing checked after the config, so that must be the only complaint.
        assert!(
            o.status.success() || (err.contains("model.path") && err.contains("/path/to")),
            "{}: {out}\n{err}",
            p.display()
        );
    }
}

#[test]
fn a_tokenizer_that_does_not_fit_the_text_encoder_stops_before_training() {
    // The tiny fixture's text encoder has 1000 tokens; its folder has no
    // tokenizer, so the embedded 49408-token CLIP vocabulary would be used.
    let out = tempfile::tempdir().unwrap();
    let err = fails(&[
        "--config",
        "configs/quickstart.toml",
        "--model",
        "tests/fixtures/sd1_tiny",
        "--steps",
        "1",
        "--output",
        out.path().to_str().unwrap(),
    ]);
    assert!(err.contains("does not belong to its text encoder"), "{err}");
    assert!(!out.path().join("quickstart.safetensors").exists());
}

#[test]
fn missing_class_images_are_generated_once_and_never_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let class_dir = tmp.path().join("robots");
    fs::create_dir_all(&class_dir).unwrap();
    // A user's own class image, numbered like ours: it must survive.
    let mine = image::RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]));
    mine.save(class_dir.join("class-0000.png")).unwrap();
    let mine_bytes = fs::read(class_dir.join("class-0000.png")).unwrap();
    let data = repo_root().join("assets/example_dataset");
    let (class, out) = (
        class_dir.to_string_lossy().into_owned(),
        tmp.path().join("out").to_string_lossy().into_owned(),
    );
    let run = |n: &str| {
        sd_lora(&[
            "train",
            "--model",
            "builtin:tiny",
            "--data",
            &data.to_string_lossy(),
            "--class-data",
            &class,
            "--class-prompt",
            "a robot",
            "--num-class-images",
            n,
            "--resolution",
            "64",
            "--steps",
            "2",
            "--output",
            &out,
            "--set",
            "dataset.min_image_side=32",
            "--set",
            "dataset.bucket_step=32",
            "--set",
            "dataset.min_bucket_side=32",
            "--set",
            "output.sample_steps=2",
        ])
    };
    let listing = || {
        let mut v: Vec<String> = fs::read_dir(&class_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };

    let o = run("3");
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("generating 2 class images") && err.contains("(1 already there)"),
        "{err}"
    );
    assert_eq!(
        listing(),
        ["class-0000.png", "class-0001.png", "class-0002.png"]
    );
    assert_eq!(
        fs::read(class_dir.join("class-0000.png")).unwrap(),
        mine_bytes
    );
    // Generated images carry the base model's generation parameters.
    let params = sd_lora_train::png_meta::read_png_params(&class_dir.join("class-0001.png"))
        .unwrap()
        .unwrap();
    assert_eq!(params.prompt, "a robot");
    assert!(params.loras.is_empty(), "class images use no LoRA");
    assert_eq!((params.width, params.height), (64, 64));

    // A second run finds them and generates nothing.
    let o = run("3");
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(!err.contains("generating"), "{err}");
    assert_eq!(listing().len(), 3);
}

/// A kohya dataset config trains as it is, given as the config or with
/// `--dataset-config`; its ignored keys are said; `--data` cannot be added.
#[test]
fn a_kohya_dataset_config_is_read_as_it_is() {
    for args in [
        vec![
            "train",
            "--config",
            "configs/kohya_dataset.toml",
            "--dry-run",
        ],
        vec![
            "train",
            "--dataset-config",
            "configs/kohya_dataset.toml",
            "--model",
            "builtin:tiny",
            "--dry-run",
        ],
    ] {
        let o = sd_lora(&args);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{args:?}: {out}\n{err}");
        assert!(err.contains("`color_aug` ignored"), "{err}");
        assert!(
            out.contains("8 images × 10 repeats") && out.contains("caption \"ohwx robot\""),
            "{out}"
        );
    }
    // clap refuses the pair (exit status 2) before anything is read.
    let o = sd_lora(&[
        "train",
        "--dataset-config",
        "configs/kohya_dataset.toml",
        "--data",
        "assets/example_dataset",
        "--dry-run",
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        out.is_empty() && err.contains("cannot be used with"),
        "{err}"
    );
}
