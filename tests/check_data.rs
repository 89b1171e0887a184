//! End-to-end tests of `sd-lora check-data`, run against the built binary.

use serde_json::Value;
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

fn png(path: &Path, w: u32, h: u32) {
    image::RgbImage::from_pixel(w, h, image::Rgb([200, 10, 10]))
        .save(path)
        .unwrap();
}

#[test]
fn quickstart_config_checks_clean() {
    let o = sd_lora(&["check-data", "--config", "configs/quickstart.toml"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(
        out.contains("1 subset, 8 images, 80 samples per epoch"),
        "{out}"
    );
    assert!(out.contains("Problems: none"), "{out}");
}

#[test]
fn every_example_config_parses() {
    for entry in fs::read_dir(repo_root().join("configs")).unwrap() {
        let p = entry.unwrap().path();
        let o = sd_lora(&["check-data", "--config", p.to_str().unwrap(), "--json"]);
        let (_, err) = text(&o);
        // Placeholder paths do not exist, but no config may have a bad key.
        assert!(!err.contains("unknown"), "{}: {err}", p.display());
        assert!(!err.contains("invalid"), "{}: {err}", p.display());
    }
}

#[test]
fn json_report_has_the_documented_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("train");
    let sub = root.join("5_sks cat");
    fs::create_dir_all(&sub).unwrap();
    png(&sub.join("a.png"), 300, 200);
    fs::write(sub.join("a.txt"), "sks cat, sofa").unwrap();
    png(&sub.join("b.png"), 200, 300);
    fs::write(sub.join("broken.png"), b"").unwrap();
    let class = tmp.path().join("class");
    fs::create_dir_all(&class).unwrap();
    png(&class.join("c.png"), 256, 256);

    let o = sd_lora(&[
        "check-data",
        root.to_str().unwrap(),
        "--class-data",
        class.to_str().unwrap(),
        "--class-prompt",
        "a photo of a cat",
        "--resolution",
        "256",
        "--set",
        "dataset.min_bucket_side=128",
        "--json",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let subsets = v["subsets"].as_array().unwrap();
    assert_eq!(subsets.len(), 2);
    assert_eq!(subsets[0]["kind"], "instance");
    assert_eq!(subsets[0]["repeats"], 5);
    assert_eq!(subsets[0]["images"], 2);
    assert!(subsets[0]["path"].as_str().unwrap().ends_with("5_sks cat"));
    assert_eq!(subsets[1]["kind"], "class");
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 3);
    let a = &images[0];
    assert_eq!(
        (a["width"].as_u64(), a["height"].as_u64()),
        (Some(300), Some(200))
    );
    assert_eq!(a["caption"], "sks cat, sofa");
    assert_eq!(a["caption_source"], "file");
    assert_eq!(a["subset"], 0);
    assert_eq!(a["bucket"], serde_json::json!([320, 192]));
    assert_eq!(images[1]["caption_source"], "folder");
    assert_eq!(images[2]["caption"], "a photo of a cat");
    assert_eq!(images[2]["caption_source"], "prompt");
    let problems = v["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0]["severity"], "error");
    assert!(
        problems[0]["path"]
            .as_str()
            .unwrap()
            .ends_with("broken.png")
    );
    assert!(problems[0]["message"].as_str().unwrap().contains("empty"));

    // Problems do not fail the run, but --strict does.
    let o = sd_lora(&["check-data", root.to_str().unwrap(), "--strict"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("--strict"));
}

#[test]
fn missing_empty_and_file_paths_exit_1_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let o = sd_lora(&["check-data", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).1.contains("no such file or folder"),
        "{:?}",
        text(&o)
    );

    let o = sd_lora(&["check-data", tmp.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let (out, err) = text(&o);
    assert!(err.contains("no usable images"), "{out}\n{err}");

    let f = tmp.path().join("x.png");
    png(&f, 64, 64);
    let o = sd_lora(&["check-data", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("not a folder"));
}

#[test]
fn bad_config_keys_and_values_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.toml");
    let run = |body: &str| {
        fs::write(&cfg, body).unwrap();
        let o = sd_lora(&["check-data", "--config", cfg.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{body}");
        text(&o).1
    };
    let e = run("[dataset]\nresolutoin = 512\n");
    assert!(e.contains("resolutoin") && e.contains("c.toml"), "{e}");
    let e = run("[dataset]\nresolution = \"big\"\n");
    assert!(
        e.contains("`dataset.resolution`") && e.contains("\"big\""),
        "{e}"
    );
    let e = run("[datset]\n");
    assert!(e.contains("unknown config section `datset`"), "{e}");
    let e = run("[dataset]\n[[dataset.subsets]]\npath = \"x\"\ncaption_dropout_rate = 2.0\n");
    assert!(
        e.contains("dataset.subsets[0].caption_dropout_rate") && e.contains("between 0 and 1"),
        "{e}"
    );
    let e = run("[dataset\n");
    assert!(e.contains("not valid TOML"), "{e}");
    let o = sd_lora(&["check-data", "--config", "/nonexistent/x.toml"]);
    assert!(text(&o).1.contains("cannot read config file"));
    let o = sd_lora(&[
        "check-data",
        "assets/example_dataset",
        "--set",
        "dataset.crop=middle",
    ]);
    let e = text(&o).1;
    assert!(e.contains("middle") && e.contains("center"), "{e}");
}

#[test]
fn config_paths_are_relative_to_the_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("data").join("1_ohwx");
    fs::create_dir_all(&imgs).unwrap();
    png(&imgs.join("a.png"), 64, 64);
    let cfgdir = tmp.path().join("cfg");
    fs::create_dir_all(&cfgdir).unwrap();
    fs::write(
        cfgdir.join("c.toml"),
        "[dataset]\nresolution = 64\nmin_bucket_side = 64\n[[dataset.subsets]]\npath = \"../data\"\n",
    )
    .unwrap();
    let o = sd_lora(&[
        "check-data",
        "--config",
        cfgdir.join("c.toml").to_str().unwrap(),
        "--json",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["summary"]["images"], 1);
}

#[test]
fn help_lists_check_data() {
    let o = sd_lora(&["--help"]);
    assert!(text(&o).0.contains("check-data"));
    let o = sd_lora(&["check-data", "--help"]);
    let out = text(&o).0;
    for flag in [
        "--config",
        "--json",
        "--strict",
        "--set",
        "--class-data",
        "--instance-prompt",
    ] {
        assert!(out.contains(flag), "{flag} missing from help");
    }
}
