//! The training config: defaults validate, every bad value is named by its
//! key with the allowed values, paths in a file are relative to the file,
//! and `--set` overrides win over the file.

use sd_lora_train::config::{
    ConfigError, HuberSchedule, LatentCacheMode, LossType, LrScheduleKind, OptimizerKind,
    PredictionChoice, SaveFormatChoice, StorageDtype, TrainConfig,
};
use std::path::{Path, PathBuf};

/// A fresh folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("sd-lora-cfg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const MINIMAL: &str = "[[dataset.subsets]]\npath = \"imgs\"\n";

fn load_text(tag: &str, body: &str, sets: &[&str]) -> Result<TrainConfig, ConfigError> {
    let dir = TempDir::new(tag);
    let file = dir.0.join("c.toml");
    std::fs::write(&file, body).unwrap();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    TrainConfig::load(Some(&file), &sets)
}

fn err(tag: &str, body: &str, sets: &[&str]) -> String {
    match load_text(tag, body, sets) {
        Ok(_) => panic!("{tag}: accepted\n{body}\n{sets:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults_are_valid_and_suit_sd15() {
    let cfg = load_text("defaults", MINIMAL, &[]).unwrap();
    assert_eq!(cfg.model.path, "builtin:tiny");
    assert_eq!(cfg.model.dtype, StorageDtype::F32);
    assert_eq!(cfg.model.prediction, PredictionChoice::Auto);
    assert_eq!(cfg.network.preset, "kohya");
    assert_eq!((cfg.network.rank, cfg.network.alpha), (16, 8.0));
    assert_eq!(cfg.train.steps, 1000);
    assert_eq!(cfg.train.unet_lr, 1e-4);
    assert_eq!(cfg.train.lr_scheduler, LrScheduleKind::Constant);
    assert_eq!(cfg.train.cache_latents, LatentCacheMode::Memory);
    assert_eq!(cfg.output.save_format, SaveFormatChoice::Kohya);
    // The resolved config prints as TOML and reads back identically.
    let text = cfg.to_toml().unwrap();
    for section in ["[model]", "[network]", "[train]", "[dataset]", "[output]"] {
        assert!(text.contains(section), "{text}");
    }
    let back = TrainConfig::from_document(text.parse().unwrap(), "round trip").unwrap();
    assert_eq!(back, cfg);
}

#[test]
fn unknown_keys_and_bad_enum_values_name_the_key_and_allowed_values() {
    let e = err(
        "enum",
        &format!("{MINIMAL}[train]\nlr_scheduler = \"cosin\"\n"),
        &[],
    );
    assert!(e.contains("train.lr_scheduler"), "{e}");
    for allowed in ["constant", "linear", "cosine", "cosine_with_restarts"] {
        assert!(e.contains(allowed), "{e}");
    }
    let e = err(
        "unknown-key",
        &format!("{MINIMAL}[network]\nrnak = 4\n"),
        &[],
    );
    assert!(
        e.contains("rnak") && e.contains("rank") && e.contains("c.toml"),
        "{e}"
    );
    let e = err("unknown-section", &format!("{MINIMAL}[netwrok]\n"), &[]);
    assert!(
        e.contains("unknown config section `netwrok`") && e.contains("network"),
        "{e}"
    );
    let e = err("type", MINIMAL, &["train.steps=\"many\""]);
    assert!(e.contains("`train.steps`") && e.contains("many"), "{e}");
    let e = err("dtype", MINIMAL, &["model.dtype=fp16"]);
    assert!(e.contains("model.dtype") && e.contains("bf16"), "{e}");
    let e = err("format", MINIMAL, &["output.save_format=diffusers"]);
    assert!(
        e.contains("output.save_format") && e.contains("peft"),
        "{e}"
    );
}

#[test]
fn out_of_range_values_name_the_key() {
    let cases: &[(&str, &str, &str)] = &[
        ("network.rank=0", "network.rank", "at least 1"),
        ("network.alpha=0", "network.alpha", "> 0"),
        (
            "network.text_encoder_rank=0",
            "network.text_encoder_rank",
            "at least 1",
        ),
        ("network.conv_alpha=-1", "network.conv_alpha", "> 0"),
        (
            "network.preset=\"lycoris\"",
            "network.preset",
            "kohya, attention, conv",
        ),
        ("network.dropout=1.0", "network.dropout", "[0, 1)"),
        ("model.device=\"gpu\"", "model.device", "cpu, cuda, cuda:N"),
        ("model.device=\"cuda:x\"", "model.device", "metal"),
        ("model.path=\"builtin:huge\"", "model.path", "builtin:tiny"),
        ("model.clip_skip=0", "model.clip_skip", "at least 1"),
        ("train.unet_lr=0", "train.unet_lr", "> 0"),
        ("train.unet_lr=nan", "train.unet_lr", "finite"),
        (
            "train.text_encoder_lr=-1e-4",
            "train.text_encoder_lr",
            "> 0",
        ),
        ("train.steps=0", "train.steps", "at least 1"),
        ("train.batch_size=0", "train.batch_size", "at least 1"),
        (
            "train.gradient_accumulation=0",
            "train.gradient_accumulation",
            "at least 1",
        ),
        ("train.adam_beta1=1.0", "train.adam_beta1", "[0, 1)"),
        ("train.adam_eps=0", "train.adam_eps", "> 0"),
        ("train.max_grad_norm=-1", "train.max_grad_norm", "≥ 0"),
        ("train.min_snr_gamma=0", "train.min_snr_gamma", "> 0"),
        (
            "train.noise_offset=2",
            "train.noise_offset",
            "between 0 and 1",
        ),
        ("train.weight_decay=inf", "train.weight_decay", "finite"),
        ("output.name=\"a/b\"", "output.name", "plain file name"),
        (
            "output.name=\"x.safetensors\"",
            "output.name",
            "without folder or extension",
        ),
        (
            "dataset.resolution=500",
            "dataset.resolution",
            "multiple of 8",
        ),
    ];
    for (i, (set, key, reason)) in cases.iter().enumerate() {
        let e = load_text(&format!("range{i}"), MINIMAL, &[set]).unwrap_err();
        assert_eq!(e.key(), Some(*key), "{set}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(reason), "{set}: {msg}");
    }
    // Valid device spellings.
    for d in ["cpu", "cuda", "cuda:1", "metal"] {
        load_text("devices", MINIMAL, &[&format!("model.device=\"{d}\"")]).unwrap();
    }
}

#[test]
fn paths_in_the_file_are_relative_to_it_and_overrides_to_the_working_dir() {
    let dir = TempDir::new("paths");
    let sub = dir.0.join("cfg");
    std::fs::create_dir_all(&sub).unwrap();
    let file = sub.join("c.toml");
    std::fs::write(
        &file,
        "[model]\npath = \"../models/sd15.safetensors\"\n[output]\ndir = \"out\"\n\
         [train]\nlatent_cache_dir = \"cache\"\n[[dataset.subsets]]\npath = \"../data\"\n\
         [[dataset.subsets]]\npath = \"/abs/class\"\nkind = \"class\"\n",
    )
    .unwrap();
    let cfg = TrainConfig::load(Some(&file), &[]).unwrap();
    assert_eq!(
        Path::new(&cfg.model.path),
        dir.0.join("models/sd15.safetensors")
    );
    assert_eq!(cfg.output.dir, sub.join("out"));
    assert_eq!(cfg.train.latent_cache_dir, Some(sub.join("cache")));
    assert_eq!(cfg.dataset.subsets[0].path, dir.0.join("data"));
    assert_eq!(cfg.dataset.subsets[1].path, Path::new("/abs/class"));

    // --set values are relative to where the user typed them, and win.
    let cfg = TrainConfig::load(
        Some(&file),
        &[
            "output.dir=elsewhere".to_string(),
            "dataset.subsets[0].path=\"mine\"".to_string(),
            "network.rank=4".to_string(),
        ],
    )
    .unwrap();
    assert_eq!(cfg.output.dir, Path::new("elsewhere"));
    assert_eq!(cfg.dataset.subsets[0].path, Path::new("mine"));
    assert_eq!(cfg.network.rank, 4);

    // builtin: is never joined to the folder.
    std::fs::write(
        &file,
        format!("[model]\npath = \"builtin:tiny\"\n{MINIMAL}"),
    )
    .unwrap();
    assert_eq!(
        TrainConfig::load(Some(&file), &[]).unwrap().model.path,
        "builtin:tiny"
    );
}

#[test]
fn without_a_file_everything_comes_from_sets() {
    let cfg = TrainConfig::load(
        None,
        &[
            "dataset.subsets[0].path=x".into(),
            "train.lr_scheduler=cosine".into(),
        ],
    )
    .unwrap();
    assert_eq!(cfg.train.lr_scheduler, LrScheduleKind::Cosine);
    let e = TrainConfig::load(None, &[]).unwrap_err();
    assert_eq!(e.key(), Some("dataset.subsets"));
    let e = TrainConfig::load(Some(Path::new("/nonexistent/c.toml")), &[]).unwrap_err();
    assert!(e.to_string().contains("cannot read config file"), "{e}");
    assert!(err("syntax", "[model\n", &[]).contains("not valid TOML"));
    assert!(err("set", MINIMAL, &["noequals"]).contains("KEY=VALUE"));
}

#[test]
fn network_section_maps_onto_the_target_spec() {
    let cfg = load_text(
        "spec",
        MINIMAL,
        &[
            "network.preset=conv",
            "network.rank=8",
            "network.alpha=4",
            "network.conv_rank=2",
            "network.train_text_encoder=true",
            "network.text_encoder_alpha=1",
        ],
    )
    .unwrap();
    let spec = cfg.network.target_spec();
    assert_eq!(spec.preset, sd_lora_model::lora::targets::Preset::Conv);
    assert!(spec.unet && spec.text_encoder);
    assert_eq!((spec.unet_linear.rank, spec.unet_linear.alpha), (8, 4.0));
    assert_eq!((spec.unet_conv.rank, spec.unet_conv.alpha), (2, 4.0));
    assert_eq!(
        (spec.text_encoder_rank.rank, spec.text_encoder_rank.alpha),
        (8, 1.0)
    );
}

#[test]
fn optimizer_options_are_checked_and_explained() {
    // Unknown names (kohya's capitalised ones too) list the valid ones.
    for bad in ["sgd", "AdamW8bit"] {
        let e = err(
            "opt-name",
            MINIMAL,
            &[&format!("train.optimizer=\"{bad}\"")],
        );
        assert!(
            e.contains("`adamw`, `adamw8bit`, `prodigy`, `adafactor`, `lion`"),
            "{e}"
        );
    }
    let cfg = load_text("opt-ok", MINIMAL, &["train.optimizer=\"adamw8bit\""]).unwrap();
    assert_eq!(cfg.train.optimizer, OptimizerKind::Adamw8bit);
    // Prodigy's single step size needs one learning rate for every part.
    let e = err(
        "opt-prodigy-lrs",
        MINIMAL,
        &[
            "train.optimizer=\"prodigy\"",
            "train.unet_lr=1.0",
            "network.train_text_encoder=true",
        ],
    );
    assert!(
        e.contains("train.text_encoder_lr") && e.contains("1.0 is usual"),
        "{e}"
    );
    let ok = load_text(
        "opt-prodigy-ok",
        MINIMAL,
        &[
            "train.optimizer=\"prodigy\"",
            "train.unet_lr=1.0",
            "train.text_encoder_lr=1.0",
            "network.train_text_encoder=true",
        ],
    )
    .unwrap();
    assert!(ok.warnings().is_empty(), "{:?}", ok.warnings());
    // A Prodigy run left at AdamW's learning rate is allowed, with a warning.
    let low = load_text("opt-prodigy-low", MINIMAL, &["train.optimizer=\"prodigy\""]).unwrap();
    assert!(
        low.warnings().iter().any(|w| w.contains("usually 1.0")),
        "{:?}",
        low.warnings()
    );
    for (set, key) in [
        ("train.lion_beta2=1.0", "train.lion_beta2"),
        ("train.prodigy_d_coef=0", "train.prodigy_d_coef"),
        ("train.prodigy_growth_rate=0.5", "train.prodigy_growth_rate"),
        ("train.prodigy_slice_p=0", "train.prodigy_slice_p"),
        (
            "train.adafactor_decay_rate=0.8",
            "train.adafactor_decay_rate",
        ),
        (
            "train.adafactor_warmup_init=true",
            "train.adafactor_warmup_init",
        ),
    ] {
        let e = err("opt-range", MINIMAL, &[set]);
        assert!(e.contains(key), "{set}: {e}");
    }
}

#[test]
fn noise_and_loss_options_are_checked() {
    let e = err("loss-type", MINIMAL, &["train.loss_type=\"mae\""]);
    assert!(e.contains("`l2`, `l1`, `huber`, `smooth_l1`"), "{e}");
    let e = err(
        "huber-schedule",
        MINIMAL,
        &["train.huber_schedule=\"linear\""],
    );
    assert!(e.contains("`snr`, `exponential`, `constant`"), "{e}");
    for (sets, key) in [
        (
            &["train.multires_noise_discount=1.5"][..],
            "train.multires_noise_discount",
        ),
        (
            &["train.multires_noise_iterations=100"][..],
            "train.multires_noise_iterations",
        ),
        (&["train.ip_noise_gamma=-0.1"][..], "train.ip_noise_gamma"),
        (
            &["train.min_timestep=500", "train.max_timestep=400"][..],
            "train.max_timestep",
        ),
        (&["train.huber_c=0"][..], "train.huber_c"),
        (&["train.huber_scale=-1"][..], "train.huber_scale"),
    ] {
        let e = err("noise-range", MINIMAL, sets);
        assert!(e.contains(key), "{sets:?}: {e}");
    }
    let ok = load_text(
        "noise-ok",
        MINIMAL,
        &[
            "train.loss_type=\"smooth_l1\"",
            "train.huber_schedule=\"exponential\"",
            "train.min_timestep=100",
            "train.max_timestep=900",
            "train.zero_terminal_snr=true",
        ],
    )
    .unwrap();
    assert_eq!(ok.train.loss_type, LossType::SmoothL1);
    assert_eq!(ok.train.huber_schedule, HuberSchedule::Exponential);
}

/// A bad value is attributed to where it was written: the file, or the
/// command line (`--set` and the quick flags); block weights say what they
/// accept.
#[test]
fn bad_values_name_their_origin() {
    let from_file = err(
        "origin-file",
        &format!("{MINIMAL}[train]\noptimizer = \"adam\"\n"),
        &[],
    );
    assert!(
        from_file.contains("in ") && from_file.contains("c.toml"),
        "{from_file}"
    );
    let from_set = err("origin-set", MINIMAL, &["train.optimizer=\"adam\""]);
    assert!(from_set.contains("in the command line"), "{from_set}");
    assert!(from_set.contains("adamw8bit"), "{from_set}");
    let blocks = err("origin-blocks", MINIMAL, &["network.down_lr_weight=true"]);
    assert!(
        blocks.contains("a list of numbers") && blocks.contains("cosine"),
        "{blocks}"
    );
    let cfg = load_text(
        "blocks-ok",
        MINIMAL,
        &[
            "network.mid_lr_weight=0.5",
            "network.up_lr_weight=\"sine+0.1\"",
        ],
    )
    .unwrap();
    assert_eq!(
        cfg.network.mid_lr_weight,
        Some(sd_lora_train::config::BlockWeightsValue::One(0.5))
    );
}
