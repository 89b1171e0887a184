//! The training loop end to end on the built-in tiny model and the example
//! dataset: it learns, it resumes exactly, it reproduces, and what it writes
//! maps onto the model.

use candle_core::Device;
use common::example_dataset;
use sd_lora_data::{Dataset, SubsetKind};
use sd_lora_model::lora::LoraComponent;
use sd_lora_model::lora::attach::attach;
use sd_lora_train::config::TrainConfig;
use sd_lora_train::trainer::{StepReport, TrainProgress, fixed_noise_loss, load_model, train};
use std::path::Path;

mod common;

use common::{Quiet, bits, quiet, read_for_model};

/// A quickstart-like config writing to `out`, with extra `--set`s.
fn config(out: &Path, extra: &[String]) -> TrainConfig {
    let mut sets = common::tiny_run_sets(out);
    sets.extend(
        [
            "network.rank=8",
            "network.alpha=8.0",
            "train.batch_size=2",
            "train.unet_lr=1e-3",
            "train.text_encoder_lr=1e-3",
            "train.lr_scheduler=\"cosine\"",
            "train.warmup_steps=2",
            "output.save_dtype=\"f32\"",
            "output.name=\"t\"",
        ]
        .map(String::from),
    );
    sets.extend(extra.iter().cloned());
    TrainConfig::load(None, &sets).unwrap()
}

#[test]
fn a_short_run_lowers_the_fixed_noise_loss_by_a_fifth() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &["train.steps=120".into()]);
    let ds = Dataset::scan(&cfg.dataset).unwrap();
    let base = load_model(&cfg, &Device::Cpu).unwrap();
    let before = fixed_noise_loss(&cfg, &ds, &base).unwrap();

    let outcome = train(&cfg, &ds, None, &mut quiet()).unwrap();
    assert_eq!(outcome.steps, 120);
    assert!(!outcome.interrupted);

    let file = read_for_model(&cfg, &outcome.lora_file);
    let mut sd = load_model(&cfg, &Device::Cpu).unwrap();
    attach(&mut sd.unet, Some(&mut sd.text_encoder), &file.weights, 1.0).unwrap();
    let after = fixed_noise_loss(&cfg, &ds, &sd).unwrap();
    eprintln!("fixed-noise loss {before:.4} → {after:.4}");
    assert!(
        after <= 0.8 * before,
        "loss went from {before} to {after}: less than a 20% drop"
    );
    // kohya metadata says what was trained.
    assert_eq!(
        file.metadata.get("ss_steps").map(String::as_str),
        Some("120")
    );
    assert_eq!(
        file.metadata
            .get("ss_base_model_version")
            .map(String::as_str),
        Some("sd_v1")
    );
    assert_eq!(
        file.metadata.get("ss_network_dim").map(String::as_str),
        Some("8")
    );
}

/// Each optimizer, at its usual learning rate, lowers the fixed-noise loss
/// of the tiny model (AdamW: the test above), writes kohya's
/// `ss_optimizer`, and its state resumes (the run is continued for a few
/// steps from its last state).
#[test]
fn every_optimizer_lowers_the_loss_at_its_usual_learning_rate() {
    for (name, lr, class) in [
        ("adamw8bit", "1e-3", "bitsandbytes.optim.adamw.AdamW8bit"),
        ("prodigy", "1.0", "prodigyopt.prodigy.Prodigy"),
        ("adafactor", "1e-3", "transformers.optimization.Adafactor("),
        ("lion", "3e-4", "lion_pytorch.lion_pytorch.Lion"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(
            tmp.path(),
            &[
                "train.steps=120".into(),
                format!("train.optimizer=\"{name}\""),
                format!("train.unet_lr={lr}"),
                format!("train.text_encoder_lr={lr}"),
            ],
        );
        let ds = Dataset::scan(&cfg.dataset).unwrap();
        let base = load_model(&cfg, &Device::Cpu).unwrap();
        let before = fixed_noise_loss(&cfg, &ds, &base).unwrap();
        let outcome = train(&cfg, &ds, None, &mut quiet()).unwrap();
        let file = read_for_model(&cfg, &outcome.lora_file);
        let mut sd = load_model(&cfg, &Device::Cpu).unwrap();
        attach(&mut sd.unet, Some(&mut sd.text_encoder), &file.weights, 1.0).unwrap();
        let after = fixed_noise_loss(&cfg, &ds, &sd).unwrap();
        eprintln!("{name} (lr {lr}): fixed-noise loss {before:.4} → {after:.4}");
        assert!(
            after <= 0.85 * before,
            "{name}: loss went from {before} to {after}: less than a 15% drop"
        );
        let written = file
            .metadata
            .get("ss_optimizer")
            .cloned()
            .unwrap_or_default();
        assert!(
            written.starts_with(class),
            "{name}: ss_optimizer = {written:?}"
        );

        // Resuming continues with the saved optimizer state.
        let longer = config(
            tmp.path(),
            &[
                "train.steps=124".into(),
                format!("train.optimizer=\"{name}\""),
                format!("train.unet_lr={lr}"),
                format!("train.text_encoder_lr={lr}"),
            ],
        );
        let resumed = train(&longer, &ds, Some(tmp.path()), &mut quiet()).unwrap();
        assert_eq!(resumed.steps, 124, "{name}");
    }
}

/// Progress sink that keeps the notes.
#[derive(Default)]
struct Notes(Vec<String>);

impl TrainProgress for Notes {
    fn begin(&mut self, _: usize, _: usize) {}
    fn step(&mut self, r: &StepReport) {
        assert!(r.loss.is_finite(), "non-finite loss at step {}", r.step);
    }
    fn note(&mut self, n: &str) {
        self.0.push(n.to_string());
    }
    fn end(&mut self) {}
    fn should_stop(&self) -> bool {
        false
    }
}

/// kohya's noise and loss options together: the run learns, says that zero
/// terminal SNR is meant for v models, and a timestep range the schedule
/// does not have stops it before any work.
#[test]
fn noise_and_loss_options_train_together() {
    let tmp = tempfile::tempdir().unwrap();
    let options = [
        "train.loss_type=\"huber\"",
        "train.huber_schedule=\"snr\"",
        "train.multires_noise_iterations=6",
        "train.ip_noise_gamma=0.1",
        "train.ip_noise_gamma_random_strength=true",
        "train.min_timestep=50",
        "train.max_timestep=950",
        "train.debiased_estimation=true",
        "train.noise_offset=0.05",
    ];
    let mut sets: Vec<String> = options.iter().map(|s| s.to_string()).collect();
    sets.push("train.steps=120".into());
    let cfg = config(tmp.path(), &sets);
    let ds = Dataset::scan(&cfg.dataset).unwrap();
    let base = load_model(&cfg, &Device::Cpu).unwrap();
    let before = fixed_noise_loss(&cfg, &ds, &base).unwrap();
    let outcome = train(&cfg, &ds, None, &mut Notes::default()).unwrap();
    let file = read_for_model(&cfg, &outcome.lora_file);
    let mut sd = load_model(&cfg, &Device::Cpu).unwrap();
    attach(&mut sd.unet, Some(&mut sd.text_encoder), &file.weights, 1.0).unwrap();
    let after = fixed_noise_loss(&cfg, &ds, &sd).unwrap();
    eprintln!("all noise and loss options: fixed-noise loss {before:.4} → {after:.4}");
    assert!(after <= 0.9 * before, "{before} → {after}");

    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        &[
            "train.steps=2".into(),
            "train.zero_terminal_snr=true".into(),
        ],
    );
    let mut notes = Notes::default();
    train(&cfg, &ds, None, &mut notes).unwrap();
    assert!(
        notes.0.iter().any(|n| n.contains("zero_terminal_snr")),
        "{:?}",
        notes.0
    );

    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        &["train.steps=2".into(), "train.max_timestep=1001".into()],
    );
    let err = train(&cfg, &ds, None, &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("train.max_timestep") && err.contains("1000"),
        "{err}"
    );
    assert!(!tmp.path().join("state").exists());
}

/// A held-out fraction and a validation folder: the split is disjoint and
/// seeded, the run trains on the rest only, and `loss.csv` carries the
/// validation loss at the steps it was evaluated.
#[test]
fn validation_set_is_held_out_and_evaluated() {
    use sd_lora_train::outputs::read_loss_csv;
    use sd_lora_train::validation::split;

    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        &[
            "train.steps=10".into(),
            "train.validation_split=0.25".into(),
            "train.validate_every_n_steps=4".into(),
        ],
    );
    let ds = Dataset::scan(&cfg.dataset).unwrap();
    let s = split(&cfg, &ds).unwrap();
    let val = s.validation.as_ref().unwrap();
    assert_eq!(s.held_out, 2);
    assert_eq!(val.images.len(), 2);
    assert_eq!(s.train.images.len() + 2, ds.images.len());
    for v in &val.images {
        assert!(s.train.images.iter().all(|t| t.path != v.path));
    }
    // The seed picks the same images; another seed may pick others.
    let again = split(&cfg, &ds).unwrap();
    let paths = |d: &Dataset| d.images.iter().map(|e| e.path.clone()).collect::<Vec<_>>();
    assert_eq!(paths(again.validation.as_ref().unwrap()), paths(val));

    let outcome = train(&cfg, &ds, None, &mut quiet()).unwrap();
    let rows = read_loss_csv(&tmp.path().join("logs").join("loss.csv")).unwrap();
    let evaluated: Vec<usize> = rows
        .iter()
        .filter(|r| r.val_loss.is_some())
        .map(|r| r.step)
        .collect();
    assert_eq!(evaluated, vec![4, 8, 10]);
    assert!(rows.iter().filter_map(|r| r.val_loss).all(f64::is_finite));
    let file = read_for_model(&cfg, &outcome.lora_file);
    assert_eq!(
        file.metadata.get("ss_num_train_images").map(String::as_str),
        Some("6")
    );

    // A folder instead: every image of it, none taken from training.
    let folder = common::example_dataset().join("10_ohwx robot");
    let cfg = config(
        tmp.path(),
        &[
            "train.steps=2".into(),
            format!("train.validation_dir={:?}", folder.to_string_lossy()),
        ],
    );
    let s = split(&cfg, &ds).unwrap();
    assert_eq!(s.held_out, 0);
    assert_eq!(s.train.images.len(), ds.images.len());
    assert_eq!(s.validation.unwrap().images.len(), 8);
    // Too few images to hold one out, or an empty folder: stopped with a reason.
    let empty = tempfile::tempdir().unwrap();
    let cfg = config(
        tmp.path(),
        &[format!(
            "train.validation_dir={:?}",
            empty.path().to_string_lossy()
        )],
    );
    let err = split(&cfg, &ds).unwrap_err();
    assert!(
        format!("{err:#}").contains("train.validation_dir"),
        "{err:#}"
    );
}

#[test]
fn resume_equals_an_uninterrupted_run_and_seeds_reproduce() {
    let extra = [
        "train.steps=6".to_string(),
        "train.gradient_accumulation=2".into(),
        "network.train_text_encoder=true".into(),
    ];
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let cfg_a = config(a.path(), &extra);
    let ds = Dataset::scan(&cfg_a.dataset).unwrap();
    let full = train(&cfg_a, &ds, None, &mut quiet()).unwrap();

    // Stopped after 3 steps (as Ctrl-C would), then resumed to 6.
    let cfg_b = config(b.path(), &extra);
    let mut stopper = Quiet {
        stop_after: Some(3),
        last: 0,
    };
    let first = train(&cfg_b, &ds, None, &mut stopper).unwrap();
    assert!(first.interrupted);
    assert_eq!(first.steps, 3);
    assert!(first.lora_file.ends_with("t-step000003.safetensors"));
    let resumed = train(&cfg_b, &ds, Some(b.path()), &mut quiet()).unwrap();
    assert_eq!(resumed.steps, 6);

    // Same config and seed again, from scratch.
    let again = train(&config(c.path(), &extra), &ds, None, &mut quiet()).unwrap();

    let wa = read_for_model(&cfg_a, &full.lora_file).weights;
    let wb = read_for_model(&cfg_a, &resumed.lora_file).weights;
    let wc = read_for_model(&cfg_a, &again.lora_file).weights;
    assert_eq!(
        bits(&wa),
        bits(&wb),
        "resumed run differs from the uninterrupted one"
    );
    assert_eq!(bits(&wa), bits(&wc), "same seed gave a different LoRA");

    // The text-encoder LoRA moved away from its zero-initialised `up`.
    let te_up_norm: f32 = wa
        .modules
        .iter()
        .filter(|((c, _), _)| *c == LoraComponent::TextEncoder)
        .map(|(_, m)| {
            m.up.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum();
    assert!(te_up_norm > 0.0, "text-encoder LoRA did not change");
    assert!(wa.modules.keys().any(|(c, _)| *c == LoraComponent::Unet));
}

#[test]
fn prior_preservation_pairs_instance_and_class_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let class_dir = tmp.path().join("class");
    std::fs::create_dir_all(&class_dir).unwrap();
    let src = example_dataset().join("10_ohwx robot");
    for name in ["robot_00.png", "robot_01.png"] {
        std::fs::copy(src.join(name), class_dir.join(name)).unwrap();
    }
    let cfg = config(
        &tmp.path().join("out"),
        &[
            "train.steps=2".into(),
            format!("dataset.subsets[1].path={:?}", class_dir.to_string_lossy()),
            "dataset.subsets[1].kind=\"class\"".into(),
            "dataset.subsets[1].caption=\"a robot\"".into(),
            "dataset.prior_loss_weight=0.5".into(),
        ],
    );
    let ds = Dataset::scan(&cfg.dataset).unwrap();
    assert!(
        ds.subsets
            .iter()
            .any(|s| s.kind == SubsetKind::Class && s.images == 2)
    );
    let outcome = train(&cfg, &ds, None, &mut quiet()).unwrap();
    assert_eq!(outcome.steps, 2);
    assert!(outcome.final_loss.is_some_and(f64::is_finite));
}

#[test]
fn non_finite_steps_are_skipped_counted_and_stop_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    // An absurd learning rate blows the LoRA up after the first update.
    let cfg = config(
        tmp.path(),
        &[
            "train.steps=20".into(),
            "train.unet_lr=1e30".into(),
            "train.warmup_steps=0".into(),
            "train.lr_scheduler=\"constant\"".into(),
            "train.max_grad_norm=0.0".into(),
            "train.max_nonfinite_steps=2".into(),
        ],
    );
    let ds = Dataset::scan(&cfg.dataset).unwrap();
    struct Notes(Vec<String>, usize);
    impl TrainProgress for Notes {
        fn begin(&mut self, _: usize, _: usize) {}
        fn step(&mut self, r: &StepReport) {
            self.1 += usize::from(r.skipped);
        }
        fn note(&mut self, m: &str) {
            self.0.push(m.to_string());
        }
        fn end(&mut self) {}
    }
    let mut notes = Notes(Vec::new(), 0);
    let err = train(&cfg, &ds, None, &mut notes).unwrap_err().to_string();
    assert!(err.contains("non-finite"), "{err}");
    // Two skipped steps are tolerated; the third in a row stops the run.
    assert_eq!(notes.1, 2);
    let skips = notes
        .0
        .iter()
        .filter(|n| n.contains("step skipped"))
        .count();
    assert_eq!(skips, 3, "{:?}", notes.0);
}

#[test]
fn previews_are_rendered_on_schedule_and_leave_training_unchanged() {
    use sd_lora_train::png_meta::read_png_params;
    let ds_of = |cfg: &TrainConfig| Dataset::scan(&cfg.dataset).unwrap();
    let steps = "train.steps=3".to_string();
    let previews: Vec<String> = vec![
        "output.sample_prompts=[\"ohwx robot\", { prompt = \"ohwx robot, beach\", seed = 7, cfg = 1.0, width = 32 }]".into(),
        "output.sample_every=2".into(),
        "output.sample_steps=2".into(),
        steps.clone(),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let with = config(&tmp.path().join("with"), &previews);
    let without = config(&tmp.path().join("without"), &[steps]);
    let out = train(&with, &ds_of(&with), None, &mut quiet()).unwrap();
    let plain = train(&without, &ds_of(&without), None, &mut quiet()).unwrap();

    // Rendering switches dropout off and back on and draws from its own
    // noise streams, so the trained LoRA is bit-identical.
    let a = read_for_model(&with, &out.lora_file);
    let b = read_for_model(&without, &plain.lora_file);
    assert_eq!(bits(&a.weights), bits(&b.weights));

    let samples = with.output.dir.join("samples");
    let mut names: Vec<String> = std::fs::read_dir(&samples)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "t-step000002-00.png",
            "t-step000002-01.png",
            "t-step000002-grid.png",
            "t-step000003-00.png",
            "t-step000003-01.png",
            "t-step000003-grid.png",
        ]
    );
    assert!(!without.output.dir.join("samples").exists());
    // The grids are listed among the run's files.
    assert!(out.files.contains(&samples.join("t-step000003-grid.png")));

    let p = read_png_params(&samples.join("t-step000003-01.png"))
        .unwrap()
        .unwrap();
    assert_eq!(p.prompt, "ohwx robot, beach");
    assert_eq!((p.seed, p.cfg_scale, p.width, p.height), (7, 1.0, 32, 64));
    assert_eq!((p.steps, p.sampler.as_str()), (2, "Euler a"));
    assert_eq!(p.loras.len(), 1);
    assert_eq!(p.loras[0].name, "t");
    assert!(
        p.extra
            .contains(&("Training step".to_string(), "3".to_string()))
    );
    let p0 = read_png_params(&samples.join("t-step000002-00.png"))
        .unwrap()
        .unwrap();
    assert_eq!(p0.seed, 1234);
    let grid = image::open(samples.join("t-step000003-grid.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (128, 64));
    // Same seed at two steps: what differs is what training changed.
    let img = |s: &str| image::open(samples.join(s)).unwrap().to_rgb8().into_raw();
    assert_ne!(img("t-step000002-00.png"), img("t-step000003-00.png"));
}

#[test]
fn gradient_checkpointing_trains_the_same_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let sets = |dir: &str, on: bool| {
        config(
            &tmp.path().join(dir),
            &[
                "train.steps=2".to_string(),
                "network.train_text_encoder=true".to_string(),
                format!("train.gradient_checkpointing={on}"),
            ],
        )
    };
    let (on, off) = (sets("on", true), sets("off", false));
    let ds = Dataset::scan(&on.dataset).unwrap();
    let a = train(&on, &ds, None, &mut quiet()).unwrap();
    let b = train(&off, &ds, None, &mut quiet()).unwrap();
    let a = read_for_model(&on, &a.lora_file).weights;
    let b = read_for_model(&off, &b.lora_file).weights;
    assert_eq!(a.modules.len(), b.modules.len());
    let vals = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut worst = 0f32;
    for (key, ma) in &a.modules {
        let mb = &b.modules[key];
        // `up` starts at zero: it moved only if gradients reached the module.
        assert!(
            vals(&ma.up).iter().any(|v| *v != 0.0),
            "{key:?}: no gradient reached this module with checkpointing"
        );
        for (x, y) in [(&ma.down, &mb.down), (&ma.up, &mb.up)] {
            let (x, y) = (vals(x), vals(y));
            let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
            for (p, q) in x.iter().zip(&y) {
                worst = worst.max((p - q).abs() / scale);
            }
        }
    }
    // Recomputed blocks sum in the same order; AdamW's first steps divide by
    // tiny second moments, so allow a little more than the gradients' 1e-6.
    assert!(
        worst < 1e-3,
        "checkpointed and plain LoRAs differ by {worst}"
    );
}

/// Loss masks end to end: with every mask black (and no weight outside
/// masks) nothing is trained — zero loss, the LoRA's `up` stays zero; with
/// every mask white the run is bit for bit the unmasked run.
#[test]
fn loss_masks_train_only_the_masked_area() {
    let images = tempfile::tempdir().unwrap();
    let src = example_dataset().join("10_ohwx robot");
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, images.path().join(p.file_name().unwrap())).unwrap();
    }
    let with_masks = |value: u8| {
        for e in std::fs::read_dir(images.path()).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            if p.extension().is_some_and(|x| x == "png") && !name.ends_with("-masklabel") {
                let (w, h) = image::image_dimensions(&p).unwrap();
                image::GrayImage::from_pixel(w, h, image::Luma([value]))
                    .save(images.path().join(format!("{name}-masklabel.png")))
                    .unwrap();
            }
        }
    };
    let run = |tag: &str| {
        let out = tempfile::tempdir().unwrap();
        let cfg = config(
            out.path(),
            &[
                "train.steps=6".into(),
                format!(
                    "dataset.subsets[0].path={:?}",
                    images.path().to_string_lossy()
                ),
                "dataset.subsets[0].caption=\"ohwx robot\"".into(),
            ],
        );
        let ds = Dataset::scan(&cfg.dataset).unwrap();
        assert_eq!(ds.images.len(), 8, "{tag}: masks are not training images");
        let outcome = train(&cfg, &ds, None, &mut quiet()).unwrap();
        let file = read_for_model(&cfg, &outcome.lora_file);
        (
            outcome.final_loss.unwrap(),
            bits(&file.weights),
            file.weights,
        )
    };
    let (plain_loss, plain_bits, _) = run("no masks");
    with_masks(255);
    let (white_loss, white_bits, _) = run("white masks");
    assert_eq!(white_loss.to_bits(), plain_loss.to_bits());
    assert_eq!(white_bits, plain_bits, "a mask of ones changes nothing");
    with_masks(0);
    let (black_loss, _, weights) = run("black masks");
    assert_eq!(black_loss, 0.0);
    for ((_, path), m) in &weights.modules {
        let up_max =
            m.up.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
        assert_eq!(up_max, 0.0, "{path}: trained outside every mask");
    }
}

/// kohya's block settings: a learning-rate weight scales its blocks' rate
/// exactly (all weights ½ at lr 1e-3 is the run at lr 5e-4, bit for bit), a
/// weight or rank of 0 leaves blocks out, and `block_dims`/`block_alphas`
/// set each block's rank and alpha.
#[test]
fn block_weights_scale_learning_rates_and_set_ranks() {
    let run = |extra: &[String]| {
        let out = tempfile::tempdir().unwrap();
        let mut sets = vec!["train.steps=4".to_string(), "train.warmup_steps=0".into()];
        sets.extend(extra.iter().cloned());
        let cfg = config(out.path(), &sets);
        let ds = Dataset::scan(&cfg.dataset).unwrap();
        let outcome = train(&cfg, &ds, None, &mut quiet()).unwrap();
        read_for_model(&cfg, &outcome.lora_file).weights
    };
    let halves = |n: usize| format!("[{}]", vec!["0.5"; n].join(", "));
    let weighted = run(&[
        "train.unet_lr=1e-3".into(),
        format!("network.down_lr_weight={}", halves(12)),
        "network.mid_lr_weight=0.5".into(),
        format!("network.up_lr_weight={}", halves(12)),
    ]);
    let plain = run(&["train.unet_lr=5e-4".into()]);
    assert_eq!(bits(&weighted), bits(&plain));

    let mut dims = vec!["2"; 25];
    dims[12] = "0"; // MID
    let blocks = run(&[
        "network.down_lr_weight=\"zeros\"".into(),
        format!("network.block_dims=[{}]", dims.join(", ")),
        format!("network.block_alphas=[{}]", vec!["1.0"; 25].join(", ")),
    ]);
    assert!(!blocks.modules.is_empty());
    for ((c, path), m) in &blocks.modules {
        if *c != LoraComponent::Unet {
            continue;
        }
        assert!(path.starts_with("up_blocks."), "{path} should be left out");
        assert_eq!((m.rank(), m.alpha), (2, 1.0), "{path}");
    }
}

/// Every value of every tensor of a LoRA of any type, as bits.
fn all_bits(w: &sd_lora_model::lora::LoraWeights) -> Vec<(String, Vec<u32>)> {
    use candle_core::Tensor;
    use sd_lora_model::lora::ModuleWeights;
    let b = |t: &Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    };
    let mut out = Vec::new();
    for ((c, p), m) in w.all() {
        let tensors: Vec<(String, Tensor)> = match &m {
            ModuleWeights::LowRank(m) => {
                let mut v = vec![
                    ("down".to_string(), m.down.clone()),
                    ("up".into(), m.up.clone()),
                ];
                v.extend(m.dora_scale.clone().map(|s| ("dora_scale".to_string(), s)));
                v
            }
            ModuleWeights::Lycoris(m) => m
                .named_tensors()
                .into_iter()
                .map(|(n, t)| (n, t.clone()))
                .collect(),
        };
        for (n, t) in tensors {
            out.push((format!("{c:?}:{p}.{n}"), b(&t)));
        }
    }
    out
}

/// DoRA, LoHa and LoKr (on the LoCon preset, with the text encoder) learn,
/// are saved as their type, and resume bit for bit.
#[test]
fn every_network_type_learns_and_resumes_bit_exactly() {
    use sd_lora_model::lora::lycoris::NetworkType;
    for (network, rank) in [
        (NetworkType::Dora, 8),
        (NetworkType::Loha, 4),
        (NetworkType::Lokr, 4),
    ] {
        let sets = |steps: usize| -> Vec<String> {
            vec![
                format!("train.steps={steps}"),
                format!("network.type=\"{network}\""),
                format!("network.rank={rank}"),
                format!("network.alpha={rank}.0"),
                "network.preset=\"conv\"".into(),
                "network.train_text_encoder=true".into(),
            ]
        };
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), &sets(120));
        let ds = Dataset::scan(&cfg.dataset).unwrap();
        let base = load_model(&cfg, &Device::Cpu).unwrap();
        let before = fixed_noise_loss(&cfg, &ds, &base).unwrap();
        let outcome = train(&cfg, &ds, None, &mut quiet()).unwrap();
        let file = read_for_model(&cfg, &outcome.lora_file);
        assert_eq!(file.weights.network_type(), network);
        let mut sd = load_model(&cfg, &Device::Cpu).unwrap();
        attach(&mut sd.unet, Some(&mut sd.text_encoder), &file.weights, 1.0).unwrap();
        let after = fixed_noise_loss(&cfg, &ds, &sd).unwrap();
        eprintln!(
            "{network} rank {rank}: {} modules, {} parameters; fixed-noise loss {before:.4} → {after:.4}",
            file.weights.len(),
            outcome.lora_parameters
        );
        assert!(
            after <= 0.85 * before,
            "{network}: loss went from {before} to {after}: less than a 15% drop"
        );

        // Interrupted after 3 steps and resumed to 6 = 6 steps in one go.
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let full = train(&config(a.path(), &sets(6)), &ds, None, &mut quiet()).unwrap();
        let cfg_b = config(b.path(), &sets(6));
        let mut stopper = Quiet {
            stop_after: Some(3),
            last: 0,
        };
        assert!(train(&cfg_b, &ds, None, &mut stopper).unwrap().interrupted);
        let resumed = train(&cfg_b, &ds, Some(b.path()), &mut quiet()).unwrap();
        let wa = read_for_model(&cfg, &full.lora_file).weights;
        let wb = read_for_model(&cfg, &resumed.lora_file).weights;
        assert_eq!(all_bits(&wa), all_bits(&wb), "{network}: resume differs");
    }
}
