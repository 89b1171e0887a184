//! kohya dataset configs read as they are: subsets and dataset options
//! translated with kohya's precedence (subset > dataset > general), our own
//! keys winning over the kohya file's, unsupported kohya keys listed, unknown
//! ones and datasets we cannot train refused.

use std::path::Path;

use sd_lora_data::{CropMode, Layout, SubsetKind};
use sd_lora_train::config::TrainConfig;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const KOHYA: &str = r#"
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1
color_aug = true
caption_prefix = "masterpiece, "

[[datasets]]
resolution = [512, 512]
batch_size = 4
enable_bucket = true
min_bucket_reso = 320
max_bucket_reso = 960
bucket_reso_steps = 32

  [[datasets.subsets]]
  image_dir = "dog"
  class_tokens = "ohwx dog"
  num_repeats = 10
  flip_aug = true
  keep_tokens = 2

  [[datasets.subsets]]
  image_dir = "reg"
  class_tokens = "dog"
  is_reg = true
  random_crop = true
  caption_extension = ".caption"
"#;

#[test]
fn a_kohya_config_becomes_our_dataset_with_kohyas_precedence() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("dog")).unwrap();
    std::fs::create_dir(tmp.path().join("reg")).unwrap();
    let file = write(tmp.path(), "kohya.toml", KOHYA);
    // Given as the config itself…
    let cfg = TrainConfig::load(Some(&file), &[]).unwrap();
    let d = &cfg.dataset;
    assert_eq!(d.resolution, 512);
    assert!(d.bucketing);
    assert_eq!(
        (d.min_bucket_side, d.max_bucket_side, d.bucket_step),
        (Some(320), Some(960), 32)
    );
    assert_eq!(cfg.train.batch_size, 4);
    assert_eq!(d.subsets.len(), 2);
    let (dog, reg) = (&d.subsets[0], &d.subsets[1]);
    // Folders that do not exist where the run starts are taken beside the kohya file.
    assert_eq!(dog.path, tmp.path().join("dog"));
    assert_eq!(dog.kind, SubsetKind::Instance);
    assert_eq!(dog.layout, Layout::Images);
    assert_eq!(dog.repeats, Some(10));
    assert_eq!(dog.caption.as_deref(), Some("ohwx dog"));
    assert!(dog.shuffle_caption && dog.flip);
    assert_eq!(dog.keep_tokens, 2, "the subset's value wins over [general]");
    assert_eq!(dog.caption_extension, ".txt");
    assert_eq!(reg.kind, SubsetKind::Class);
    assert_eq!(reg.repeats, Some(1), "kohya's default num_repeats");
    assert_eq!(reg.keep_tokens, 1, "from [general]");
    assert_eq!(reg.caption_extension, ".caption");
    assert!(!reg.flip);
    assert_eq!(d.crop, CropMode::Random);
    let notes = cfg.notes.join("\n");
    for key in [
        "color_aug",
        "caption_prefix",
        "random_crop is on for some subsets",
    ] {
        assert!(notes.contains(key), "{key} not in {notes}");
    }
    // The resolved config no longer needs the kohya file.
    assert!(d.kohya_config.is_none());

    // …or named from our config (`dataset.kohya_config`, relative to it), where our keys win.
    let ours = write(
        tmp.path(),
        "ours.toml",
        "[dataset]\nkohya_config = \"kohya.toml\"\nresolution = 768\n[train]\nsteps = 10\n",
    );
    let cfg = TrainConfig::load(Some(&ours), &["train.batch_size=1".into()]).unwrap();
    assert_eq!(cfg.dataset.resolution, 768);
    assert_eq!(cfg.train.batch_size, 1);
    assert_eq!(cfg.train.steps, 10);
    assert_eq!(cfg.dataset.subsets.len(), 2);
    assert!(cfg.given.contains("dataset.min_bucket_side"));

    // Without enable_bucket, kohya does not bucket.
    let plain = write(
        tmp.path(),
        "plain.toml",
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"dog\"\n",
    );
    let cfg = TrainConfig::load(Some(&plain), &[]).unwrap();
    assert!(!cfg.dataset.bucketing);
    assert!(cfg.notes.is_empty());
}

#[test]
fn what_cannot_be_trained_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    for (text, needle) in [
        (
            "[[datasets]]\nresolution = 512\ntypo = 1\n[[datasets.subsets]]\nimage_dir = \"a\"\n",
            "datasets[0].typo",
        ),
        (
            "[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"a\"\nmetadata_file = \"m.json\"\n",
            "fine-tuning datasets",
        ),
        (
            "[[datasets]]\nresolution = [512, 768]\n[[datasets.subsets]]\nimage_dir = \"a\"\n",
            "square resolution",
        ),
        (
            "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = \"a\"\n\
             [[datasets]]\nresolution = 768\n[[datasets.subsets]]\nimage_dir = \"b\"\n",
            "one dataset per run",
        ),
        (
            "[[datasets]]\n[[datasets.subsets]]\nclass_tokens = \"x\"\n",
            "needs image_dir",
        ),
        ("[general]\nshuffle_caption = true\n", "no [[datasets]]"),
        (
            "[[datasets]]\nresolution = 512\n",
            "at least one [[datasets.subsets]]",
        ),
    ] {
        let file = write(tmp.path(), "k.toml", text);
        let e = TrainConfig::load(Some(&file), &[]).unwrap_err().to_string();
        assert!(e.contains(needle), "{text}: {e}");
        assert!(e.contains("k.toml"), "{e}");
    }
    // Two sources of subsets.
    let file = write(
        tmp.path(),
        "k.toml",
        "[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"a\"\n",
    );
    let set = format!("dataset.kohya_config=\"{}\"", file.display());
    let e = TrainConfig::load(None, &[set, "dataset.subsets[0].path=\"b\"".into()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("subsets come from the kohya dataset config"),
        "{e}"
    );
    // A missing kohya file is named once.
    let e = TrainConfig::load(None, &["dataset.kohya_config=\"nope.toml\"".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.toml"), "{e}");
}
