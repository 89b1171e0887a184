//! `sd-lora train`: train a LoRA from a config file and/or quick flags.
//!
//! Everything that can be wrong with the inputs is checked before any work
//! starts, in the order a user would fix it: the config (unknown keys,
//! invalid values), the model (exists, opens), the output folder (writable),
//! the resume folder, and the dataset (at least one usable image). `--dry-run`
//! stops there and prints what would be done: the resolved config, the
//! dataset, the number of steps and epochs, and a memory estimate.

use crate::check_data::plural;
use anyhow::{Context, Result, bail};
use candle_core::DType;
use clap::Args;
use sd_lora_data::Dataset;
use sd_lora_data::report::Report;
use sd_lora_model::load::{Architecture, Component, ModelSource};
use sd_lora_model::lora::lycoris::{NetworkType, fresh_shapes};
use sd_lora_model::lora::targets::{TargetSpec, stored_layer};
use sd_lora_model::lora::{LayerKind, LoraComponent, TargetInfo};
use sd_lora_model::unet::{BlockKind, UNetConfig};
use sd_lora_train::config::TrainConfig;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// Arguments of `train`. Each quick flag is a `--set` override of one config
/// key (applied before the explicit `--set`s, so those win).
#[derive(Debug, Default, Args)]
pub struct TrainArgs {
    /// The training config (TOML; see docs/config.md), or a kohya dataset
    /// config (`[[datasets]]`, read as `--dataset-config`). Without it, the
    /// quick flags and `--set`s are the whole config.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Base model: a diffusers folder, a `.safetensors` checkpoint (SD1.x, SD2.x, SDXL) or a
    /// built-in tiny model, `builtin:tiny` / `builtin:tiny-sdxl` (`model.path`).
    #[arg(long, value_name = "PATH")]
    pub model: Option<String>,
    /// Folder of training images (`dataset.subsets[0].path`, an instance subset).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// A kohya sd-scripts dataset config to train on, unchanged
    /// (`dataset.kohya_config`).
    #[arg(long, value_name = "FILE", conflicts_with = "data")]
    pub dataset_config: Option<PathBuf>,
    /// Caption of the training images without a caption file, e.g. "a photo of ohwx dog" (`dataset.subsets[0].caption`).
    #[arg(long, value_name = "TEXT")]
    pub instance_prompt: Option<String>,
    /// Folder of class (prior-preservation) images (`dataset.subsets[1].path`, a class subset).
    #[arg(long, value_name = "DIR")]
    pub class_data: Option<PathBuf>,
    /// Caption of the class images, e.g. "a photo of a dog" (`dataset.subsets[1].caption`).
    #[arg(long, value_name = "TEXT", requires = "class_data")]
    pub class_prompt: Option<String>,
    /// Generate class images with the base model until the class folder
    /// holds this many (`dataset.subsets[1].num_class_images`).
    #[arg(long, value_name = "N", requires = "class_data")]
    pub num_class_images: Option<usize>,
    /// A preview prompt rendered during training (repeatable; `output.sample_prompts`).
    #[arg(long = "sample-prompt", value_name = "TEXT")]
    pub sample_prompts: Vec<String>,
    /// Render the preview prompts every N steps (`output.sample_every`).
    #[arg(long, value_name = "N")]
    pub sample_every: Option<usize>,
    /// Output folder (`output.dir`).
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Name of the LoRA file, without extension (`output.name`).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// LoRA rank (`network.rank`).
    #[arg(long, value_name = "N")]
    pub rank: Option<usize>,
    /// LoRA alpha (`network.alpha`).
    #[arg(long, value_name = "X")]
    pub alpha: Option<f32>,
    /// lora, dora, loha or lokr (`network.type`).
    #[arg(long, value_name = "TYPE")]
    pub network_type: Option<String>,
    /// UNet learning rate (`train.unet_lr`).
    #[arg(long, value_name = "X")]
    pub lr: Option<f64>,
    /// Number of optimizer steps (`train.steps`).
    #[arg(long, value_name = "N")]
    pub steps: Option<usize>,
    /// adamw, adamw8bit, prodigy, adafactor or lion (`train.optimizer`).
    #[arg(long, value_name = "NAME")]
    pub optimizer: Option<String>,
    /// Training resolution (`dataset.resolution`).
    #[arg(long, value_name = "N")]
    pub resolution: Option<u32>,
    /// Samples per batch (`train.batch_size`).
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Random seed (`train.seed`).
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Also train the text encoder (`network.train_text_encoder = true`).
    #[arg(long)]
    pub train_text_encoder: bool,
    /// Recompute UNet blocks in the backward pass to save memory (`train.gradient_checkpointing = true`).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Saved key layout: kohya or peft (`output.save_format`).
    #[arg(long, value_name = "FORMAT")]
    pub save_format: Option<String>,
    /// cpu, cuda, cuda:N or metal (`model.device`).
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
    /// Set any config key, e.g. `--set train.lr_scheduler=cosine` (repeatable; see docs/config.md).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Check everything and print the resolved config, the dataset, the
    /// schedule and a memory estimate, without training.
    #[arg(long)]
    pub dry_run: bool,
    /// Continue the run saved in this output folder (its newest state).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Write progress as JSON lines on stdout (for `sd-lora ui`, which runs
    /// training as a child process); log lines still go to stderr.
    #[arg(long, hide = true)]
    pub events: bool,
}

/// A TOML string literal.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

impl TrainArgs {
    /// The quick flags as `--set` overrides, followed by the user's `--set`s.
    pub fn overrides(&self) -> Vec<String> {
        let mut sets = Vec::new();
        let path = |p: &Path| toml_str(&p.to_string_lossy());
        if let Some(m) = &self.model {
            sets.push(format!("model.path={}", toml_str(m)));
        }
        if let Some(k) = &self.dataset_config {
            sets.push(format!("dataset.kohya_config={}", path(k)));
        }
        if let Some(d) = &self.data {
            sets.push(format!("dataset.subsets[0].path={}", path(d)));
            sets.push("dataset.subsets[0].kind=\"instance\"".to_string());
        }
        if let Some(t) = &self.instance_prompt {
            sets.push(format!("dataset.subsets[0].caption={}", toml_str(t)));
        }
        if let Some(c) = &self.class_data {
            sets.push(format!("dataset.subsets[1].path={}", path(c)));
            sets.push("dataset.subsets[1].kind=\"class\"".to_string());
        }
        if let Some(t) = &self.class_prompt {
            sets.push(format!("dataset.subsets[1].caption={}", toml_str(t)));
        }
        if let Some(n) = self.num_class_images {
            sets.push(format!("dataset.subsets[1].num_class_images={n}"));
        }
        if !self.sample_prompts.is_empty() {
            let list: Vec<String> = self.sample_prompts.iter().map(|p| toml_str(p)).collect();
            sets.push(format!("output.sample_prompts=[{}]", list.join(", ")));
        }
        if let Some(n) = self.sample_every {
            sets.push(format!("output.sample_every={n}"));
        }
        if let Some(o) = &self.output {
            sets.push(format!("output.dir={}", path(o)));
        }
        if let Some(n) = &self.name {
            sets.push(format!("output.name={}", toml_str(n)));
        }
        if let Some(r) = self.rank {
            sets.push(format!("network.rank={r}"));
        }
        if let Some(a) = self.alpha {
            sets.push(format!("network.alpha={}", toml::Value::Float(a as f64)));
        }
        if let Some(lr) = self.lr {
            sets.push(format!("train.unet_lr={}", toml::Value::Float(lr)));
        }
        if let Some(s) = self.steps {
            sets.push(format!("train.steps={s}"));
        }
        if let Some(r) = self.resolution {
            sets.push(format!("dataset.resolution={r}"));
        }
        if let Some(b) = self.batch_size {
            sets.push(format!("train.batch_size={b}"));
        }
        if let Some(s) = self.seed {
            sets.push(format!("train.seed={s}"));
        }
        if self.train_text_encoder {
            sets.push("network.train_text_encoder=true".to_string());
        }
        if self.gradient_checkpointing {
            sets.push("train.gradient_checkpointing=true".to_string());
        }
        if let Some(o) = &self.optimizer {
            sets.push(format!("train.optimizer={}", toml_str(o)));
        }
        if let Some(t) = &self.network_type {
            sets.push(format!("network.type={}", toml_str(t)));
        }
        if let Some(f) = &self.save_format {
            sets.push(format!("output.save_format={}", toml_str(f)));
        }
        if let Some(d) = &self.device {
            sets.push(format!("model.device={}", toml_str(d)));
        }
        sets.extend(self.sets.iter().cloned());
        sets
    }
}

/// Runs the command; returns the process exit code.
pub fn run(args: &TrainArgs) -> Result<u8> {
    let mut cfg = TrainConfig::load(args.config.as_deref(), &args.overrides())?;
    for note in &cfg.notes {
        eprintln!("note: {note}");
    }
    for (flag, p) in [("--data", &args.data), ("--class-data", &args.class_data)] {
        // A class folder that is to be filled with generated images may not
        // exist yet.
        let generated = flag == "--class-data" && args.num_class_images.is_some();
        if let Some(p) = p
            && !p.is_dir()
            && (!generated || p.exists())
        {
            bail!(
                "{flag} {}: {}",
                p.display(),
                if p.exists() {
                    "not a folder; give the folder that holds the images"
                } else {
                    "no such folder"
                }
            );
        }
    }
    let model = model_facts(&cfg)?;
    // Block settings depend on the family: check them against the model's
    // layers before any work (the run prints their notes when it starts).
    cfg.network.target_spec_for(&model.layers)?;
    if let Some(note) = cfg.apply_model_defaults(model.native_resolution()) {
        eprintln!("{note}");
        cfg.validate()?;
    }
    check_output_dir(&cfg.output.dir, args.dry_run)?;
    if let Some(r) = &args.resume
        && !r.is_dir()
    {
        bail!(
            "--resume {}: no such folder; give the output folder of the run to continue",
            r.display()
        );
    }
    // Class images are generated before the scan, which then finds them.
    let class_plans = sd_lora_train::class_images::plan_class_images(&cfg)?;
    if !args.dry_run {
        sd_lora_train::trainer::install_interrupt_handler();
        if !generate_class_images(&cfg, &class_plans)? {
            return Ok(130);
        }
    }
    let ds = Dataset::scan(&cfg.dataset)?;
    let report = Report::new(&ds);
    if !ds.has_images() {
        let mut msg = String::from("no usable images found in the dataset; ");
        if report.problems.is_empty() {
            msg.push_str("put PNG/JPEG/WebP images in the folder (or N_caption sub-folders)");
        } else {
            msg.push_str("problems:");
            for p in &report.problems {
                let _ = write!(msg, "\n  {}: {}", p.path.display(), p.message);
            }
            msg.push_str("\n(run `sd-lora check-data` with the same options for the full report)");
        }
        bail!(msg);
    }

    for w in cfg.warnings().into_iter().chain(identifier_warnings(&ds)) {
        eprintln!("warning: {w}");
    }
    if args.dry_run {
        let mut text = dry_run_report(&cfg, &ds, &report, &model)?;
        for p in class_plans.iter().filter(|p| p.missing() > 0) {
            let _ = writeln!(
                text,
                "class images: {} has {} of {}; training would first generate {} from \"{}\"",
                p.folder.display(),
                p.existing,
                p.wanted,
                p.missing(),
                p.prompt
            );
        }
        crate::emit(&text)?;
        return Ok(0);
    }
    start_training(&cfg, &ds, args.resume.as_deref(), args.events)
}

/// Generates the class images the plans lack, with the base model (no
/// LoRA), showing a bar over images and sampler steps. `Ok(false)` when
/// Ctrl-C stopped it (the images written so far stay).
fn generate_class_images(
    cfg: &TrainConfig,
    plans: &[sd_lora_train::class_images::ClassImagePlan],
) -> Result<bool> {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    use sd_lora_train::{class_images, generate, trainer};
    let todo: Vec<_> = plans.iter().filter(|p| p.missing() > 0).collect();
    if todo.is_empty() {
        return Ok(true);
    }
    let device = trainer::device_from_name(&cfg.model.device)?;
    let decoder = sd_lora_model::vae::VaeParts::DECODER;
    let (sd, source) = trainer::load_model_parts(cfg, &device, decoder)?;
    let sampler = generate::sampler_config_for(&sd, source.as_ref())?;
    let label = generate::model_label(&cfg.model.path)?;
    for plan in todo {
        eprintln!(
            "generating {} into {} from \"{}\" ({} already there)",
            plural(plan.missing(), "class image", "class images"),
            plan.folder.display(),
            plan.prompt,
            plan.existing
        );
        let steps = cfg.output.sample_steps as u64;
        let bar = ProgressBar::new(plan.missing() as u64 * steps);
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            if let Ok(style) =
                ProgressStyle::with_template("{msg} [{wide_bar}] {elapsed_precise} ETA {eta}")
            {
                bar.set_style(style);
            }
        } else {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        let missing = plan.missing();
        let image = std::cell::Cell::new(0usize);
        let files = class_images::generate_class_images(
            cfg,
            plan,
            &sd,
            &sampler,
            &label,
            &mut |i, n| {
                image.set(i);
                bar.set_message(format!("class image {}/{n}", i + 1));
            },
            &mut |step, _| bar.set_position(image.get() as u64 * steps + step as u64),
            &trainer::interrupted,
        )?;
        bar.finish_and_clear();
        if files.len() < missing {
            eprintln!(
                "stopped: {} of {missing} class images written; run again to generate the rest",
                files.len()
            );
            return Ok(false);
        }
        eprintln!(
            "wrote {}",
            plural(files.len(), "class image", "class images")
        );
    }
    Ok(true)
}

/// Rare-token advice for the identifier of every instance subset's prompt
/// (its `caption`, or the caption part of its `N_caption` folder name).
fn identifier_warnings(ds: &Dataset) -> Vec<String> {
    // The embedded tokenizer is CLIP's BPE vocabulary, which SD1 and SD2 share.
    let Ok(tokenizer) = sd_lora_model::clip::ClipTokenizer::embedded() else {
        return Vec::new();
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for s in &ds.subsets {
        let Some(prompt) = s.fallback_caption.as_deref() else {
            continue;
        };
        if s.kind != sd_lora_data::SubsetKind::Instance || !seen.insert(prompt.to_string()) {
            continue;
        }
        for a in sd_lora_train::rare_token::check_identifier(&tokenizer, prompt) {
            let mut w = format!("identifier {:?} in \"{prompt}\": {}", a.word, a.problem);
            if !a.suggestions.is_empty() {
                let _ = write!(
                    w,
                    "; rare single tokens to use instead: {}",
                    a.suggestions.join(", ")
                );
            }
            out.push(w);
        }
    }
    out
}

/// Runs the training loop with a progress display, then writes the plot and
/// the summary. Exit code 130 when stopped by Ctrl-C (after saving).
fn start_training(
    cfg: &TrainConfig,
    ds: &Dataset,
    resume: Option<&Path>,
    events: bool,
) -> Result<u8> {
    sd_lora_train::trainer::install_interrupt_handler();
    let mut progress: Box<dyn sd_lora_train::trainer::TrainProgress> = if events {
        Box::new(sd_lora_train::events::JsonEvents::stdout(10))
    } else {
        Box::new(sd_lora_train::progress::ProgressReporter::new(10))
    };
    let outcome = sd_lora_train::trainer::train(cfg, ds, resume, progress.as_mut())?;
    finish_outputs(
        cfg,
        &outcome.files,
        outcome.steps,
        outcome.final_loss,
        &outcome.step_seconds,
        outcome.skipped_steps,
        outcome.interrupted,
    )?;
    if events {
        let done = serde_json::json!({
            "type": "done",
            "lora_file": outcome.lora_file,
            "interrupted": outcome.interrupted,
            "steps": outcome.steps,
        });
        crate::emit(&format!("{done}\n"))?;
    }
    Ok(if outcome.interrupted { 130 } else { 0 })
}

/// Writes `loss.png` (from `logs/loss.csv`) and `train_summary.json` into
/// the output folder after a run, and prints where everything is.
pub fn finish_outputs(
    cfg: &TrainConfig,
    files: &[PathBuf],
    steps: usize,
    final_loss: Option<f64>,
    step_seconds: &[f64],
    skipped_steps: usize,
    interrupted: bool,
) -> Result<()> {
    use sd_lora_train::outputs;
    let dir = &cfg.output.dir;
    let csv = dir.join("logs").join("loss.csv");
    let mut all = files.to_vec();
    let mut final_validation_loss = None;
    if csv.exists() {
        let rows = outputs::read_loss_csv(&csv)?;
        final_validation_loss = rows.iter().rev().find_map(|r| r.val_loss);
        let png = dir.join("loss.png");
        outputs::plot_loss_png(&rows, &png)?;
        all.push(csv);
        all.push(png);
    }
    let summary_path = dir.join("train_summary.json");
    all.push(summary_path.clone());
    let summary = outputs::TrainSummary {
        steps,
        median_seconds_per_step: outputs::median(step_seconds),
        peak_memory_bytes: outputs::peak_rss_bytes(),
        final_loss,
        final_validation_loss,
        skipped_steps,
        interrupted,
        files: all.clone(),
    };
    summary.write(&summary_path)?;
    eprintln!(
        "{} after {steps} steps{}; files:",
        if interrupted { "stopped" } else { "done" },
        final_loss
            .map(|l| format!(", final loss {l:.4}"))
            .unwrap_or_default()
    );
    for f in &all {
        eprintln!("  {}", f.display());
    }
    if interrupted {
        eprintln!(
            "continue with: sd-lora train <same options> --resume {}",
            dir.display()
        );
    }
    Ok(())
}

/// Fails unless `dir` is (or can be created as) a writable folder. A dry run
/// creates nothing: it checks the nearest existing ancestor instead.
fn check_output_dir(dir: &Path, dry_run: bool) -> Result<()> {
    let what = || format!("output.dir = {}", dir.display());
    if dir.exists() && !dir.is_dir() {
        bail!(
            "{}: exists and is not a folder; choose another output folder",
            what()
        );
    }
    // The nearest existing ancestor must be a folder (not a file).
    let mut anc = Some(dir);
    while let Some(a) = anc {
        if a.as_os_str().is_empty() {
            break;
        }
        if a.exists() {
            if !a.is_dir() {
                bail!(
                    "{}: cannot create it, {} is a file; choose another output folder",
                    what(),
                    a.display()
                );
            }
            if !dry_run {
                break;
            }
            let ro = std::fs::metadata(a).map(|m| m.permissions().readonly());
            if matches!(ro, Ok(true)) {
                bail!(
                    "{}: {} is read-only; choose another output folder",
                    what(),
                    a.display()
                );
            }
            return Ok(());
        }
        anc = a.parent();
    }
    if dry_run {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "{}: cannot create the folder; choose another output folder",
            what()
        )
    })?;
    let probe = dir.join(format!(".sd-lora-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| {
        format!(
            "{}: the folder is not writable; choose another output folder",
            what()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// What the dry run needs to know about the model, from file headers only.
pub struct ModelFacts {
    /// Parameter elements per component.
    pub params: Vec<(Component, u64)>,
    /// Every weight matrix / kernel: component, module path, shape.
    pub layers: Vec<TargetInfo>,
    /// The UNet's config, for the activation estimate.
    pub unet: Option<UNetConfig>,
    /// Pixels per latent pixel along a side (8 for SD).
    pub vae_factor: usize,
    /// Parameter elements of the VAE decoder (`decoder.*`, `post_quant_conv.*`),
    /// which training loads only for previews.
    pub vae_decoder_params: u64,
    /// Channels of the VAE's first level (its widest activations while encoding).
    pub vae_channels: usize,
    /// SD1, SD2 or SDXL.
    pub architecture: Architecture,
}

impl ModelFacts {
    /// The resolution the model was trained at: its UNet's `sample_size` ×
    /// the VAE factor (SD1.5 64 × 8 = 512, SDXL 128 × 8 = 1024); 0 if unknown.
    pub fn native_resolution(&self) -> u32 {
        self.unet
            .as_ref()
            .and_then(|u| u.sample_size)
            .map_or(0, |s| (s * self.vae_factor) as u32)
    }
}

/// Whether a VAE key belongs to the decoder half.
fn is_vae_decoder_key(key: &str) -> bool {
    key.starts_with("decoder.") || key.starts_with("post_quant_conv.")
}

/// Opens the model (headers only, or the built-in definition) so a missing
/// or broken model stops the run before the dataset is even scanned.
pub(crate) fn model_facts(cfg: &TrainConfig) -> Result<ModelFacts> {
    let mut facts = ModelFacts {
        params: Vec::new(),
        layers: Vec::new(),
        unet: None,
        vae_factor: 8,
        vae_decoder_params: 0,
        vae_channels: 128,
        architecture: Architecture::Sd1,
    };
    if cfg.model.is_builtin() {
        let builtin = sd_lora_model::builtin::BuiltinModel::from_path(cfg.model.path.trim())?;
        facts.architecture = builtin.architecture();
        let w = builtin
            .weights(sd_lora_model::builtin::TINY_SEED)
            .context("cannot build the built-in model")?;
        for (c, n, _) in w.parameter_counts() {
            facts.params.push((c, n));
        }
        for c in Component::ALL {
            let Some(lc) = LoraComponent::of_model(c) else {
                continue;
            };
            for (key, t) in w.component(c).into_iter().flatten() {
                facts.layers.extend(stored_layer(lc, key, t.dims()));
            }
        }
        facts.vae_decoder_params = w
            .component(Component::Vae)
            .into_iter()
            .flatten()
            .filter(|(k, _)| is_vae_decoder_key(k))
            .map(|(_, t)| t.elem_count() as u64)
            .sum();
        facts.unet = builtin.unet_config().ok();
        if let Ok(v) = builtin.vae_config() {
            facts.vae_factor = 1 << v.block_out_channels.len().saturating_sub(1);
            facts.vae_channels = v.block_out_channels.first().copied().unwrap_or(128);
        }
        return Ok(facts);
    }
    let path = Path::new(&cfg.model.path);
    if !path.exists() {
        bail!(
            "model.path = {}: no such file or folder; give a diffusers folder, a .safetensors checkpoint, or a built-in model (builtin:tiny, builtin:tiny-sdxl)",
            path.display()
        );
    }
    let source = ModelSource::open_with(path, cfg.model.load_options())
        .with_context(|| format!("model.path = {}: cannot open the model", path.display()))?;
    facts.architecture = source.architecture();
    for c in source.components() {
        let w = source.weights(c)?;
        facts.params.push((c, w.parameter_count()));
        if c == Component::Vae {
            facts.vae_decoder_params = w
                .entries()
                .filter(|(k, _)| is_vae_decoder_key(k))
                .map(|(_, e)| e.numel() as u64)
                .sum();
        }
        let Some(lc) = LoraComponent::of_model(c) else {
            continue;
        };
        for (key, e) in w.entries() {
            facts.layers.extend(stored_layer(lc, key, e.shape()));
        }
    }
    facts.unet = source
        .config(Component::Unet)
        .ok()
        .and_then(|v| UNetConfig::from_json_str(&v.to_string()).ok());
    if let Some(levels) = source
        .config(Component::Vae)
        .ok()
        .and_then(|v| v.get("block_out_channels")?.as_array().cloned())
    {
        facts.vae_factor = 1 << levels.len().saturating_sub(1);
        if let Some(c) = levels.first().and_then(|c| c.as_u64()) {
            facts.vae_channels = c as usize;
        }
    }
    Ok(facts)
}

/// The memory estimate of the dry run, in bytes per part.
pub struct MemoryEstimate {
    /// Weights built when the run starts: every part it uses but the UNet,
    /// which is built once latents and captions are cached.
    pub loaded: u64,
    /// The latent-caching phase: the weights still held (the text encoders
    /// are released first when their outputs are cached; the UNet is built
    /// after caching) plus the VAE's working memory while it encodes.
    pub caching: u64,
    /// Weights kept while training: the encoders are released once their
    /// outputs are cached (see `sd_lora_train::prepare`).
    pub frozen: u64,
    pub lora_params: u64,
    pub lora_state: u64,
    pub activations: u64,
    /// Bytes per VAE weight (SDXL's VAE stays f32 under an f16 model).
    pub vae_bytes: u64,
}

/// Resident memory of the process before any model is built (code, the
/// thread pool, allocator arenas), measured on Linux.
const PROCESS_BASELINE: u64 = 60 << 20;

impl MemoryEstimate {
    /// The peak: loading, the latent-caching phase or the training phase,
    /// whichever is largest.
    pub fn total(&self) -> u64 {
        PROCESS_BASELINE
            + self
                .loaded
                .max(self.caching)
                .max(self.frozen + self.lora_state + self.activations)
    }
}

/// See docs/training.md ("Memory estimate") for the formula.
fn estimate_memory(
    cfg: &TrainConfig,
    ds: &Dataset,
    m: &ModelFacts,
    spec: &TargetSpec,
) -> MemoryEstimate {
    use sd_lora_train::prepare::{fixed_captions, latents_up_front};
    let wbytes = cfg.model.dtype.size_in_bytes() as u64;
    // SDXL's VAE stays f32 under an f16 model (model.vae_dtype = "auto").
    let vae_bytes = match cfg.model.vae_dtype.to_dtype() {
        Some(d) => d.size_in_bytes() as u64,
        None if m.architecture == Architecture::Sdxl
            && cfg.model.dtype.to_dtype() == DType::F16 =>
        {
            4
        }
        None => wbytes,
    };
    let params = |c: Component| m.params.iter().find(|(p, _)| *p == c).map_or(0, |p| p.1);
    let previews = !cfg.output.sample_prompts.is_empty();
    let decoder = m.vae_decoder_params;
    let encoder = params(Component::Vae).saturating_sub(decoder);
    let text = params(Component::TextEncoder) + params(Component::TextEncoder2);
    let latents_cached = latents_up_front(cfg);
    let text_released = !previews && fixed_captions(cfg, ds).is_some();
    // A model file's UNet is built after the caching (a built-in one, tiny,
    // with the rest).
    let unet_first = if cfg.model.is_builtin() {
        params(Component::Unet)
    } else {
        0
    };
    // fp8: the UNet's Linear/Conv weights (nearly all of it) one byte each.
    let ubytes = cfg.model.dtype.unet_weight_bytes() as u64;
    let loaded = unet_first * ubytes
        + text * wbytes
        + (encoder + if previews { decoder } else { 0 }) * vae_bytes;
    let frozen = params(Component::Unet) * ubytes
        + (if text_released { 0 } else { text }) * wbytes
        + (if latents_cached { 0 } else { encoder } + if previews { decoder } else { 0 })
            * vae_bytes;
    // Encoding one image keeps about five tensors of the VAE's first level
    // alive at once (a ResNet's input, its two halves, the residual, an
    // im2col band): measured for SD1.5 (docs/performance.md).
    let side = u64::from(cfg.dataset.resolution);
    let caching = if latents_cached {
        unet_first * ubytes
            + (if text_released { 0 } else { text }) * wbytes
            + (encoder + if previews { decoder } else { 0 }) * vae_bytes
            + 5 * m.vae_channels as u64 * side * side * vae_bytes
    } else {
        0
    };
    // Each LoRA tensor: f32 weight and gradient (+ the accumulated gradient),
    // and the optimizer's state for its shape.
    let opt_spec = cfg.train.optimizer_spec();
    let per_param = if cfg.train.gradient_accumulation > 1 {
        12
    } else {
        8
    };
    let (mut lora_params, mut lora_state) = (0u64, 0u64);
    // DoRA, LoHa and LoKr build each adapted layer's whole update in its
    // forward and again in its backward, one layer at a time (nothing of it
    // is kept between the two): a few f32 copies of the largest adapted
    // weight at once (DoRA: the weight, the update and its gradient, its
    // normalised form).
    let update_values = match cfg.network.network_type {
        NetworkType::Lora => 0,
        NetworkType::Dora => 5,
        NetworkType::Loha => 4,
        NetworkType::Lokr => 4,
    };
    let mut update_bytes = 0u64;
    for t in m.layers.iter().filter(|t| spec.selects(t)) {
        let rank = spec.params(t).rank;
        let kernel = match t.kind {
            LayerKind::Conv2d { kernel, .. } => Some(kernel),
            LayerKind::Linear => None,
        };
        let shapes = fresh_shapes(
            cfg.network.network_type,
            t.out_features,
            t.in_features,
            kernel,
            rank,
            cfg.network.lokr_factor,
        );
        for (_, dims) in shapes {
            let n = dims.iter().product::<usize>() as u64;
            lora_params += n;
            lora_state += n * per_param + opt_spec.state_bytes(&dims);
        }
        let k = kernel.map(|[h, w]| h * w).unwrap_or(1) as u64;
        update_bytes =
            update_bytes.max(update_values * 4 * (t.out_features * t.in_features) as u64 * k);
    }
    lora_state += update_bytes;
    let activations = m
        .unet
        .as_ref()
        .map(|u| {
            let side = (cfg.dataset.resolution as u64 / m.vae_factor.max(1) as u64).max(1);
            let px = side * side;
            let b = cfg.train.batch_size as u64;
            let abytes = wbytes;
            // Values held per channel-pixel of each UNet level at the peak of
            // the backward, measured for SD1.5 (docs/performance.md): what
            // the forward keeps plus the backward's working memory. Levels
            // with transformer blocks hold far more than plain ones, and in
            // proportion to their depth (SD1.5 has one block per transformer,
            // SDXL two and ten): the ResNets' share (`plain`) once, the rest
            // per block. Attention keeps no probability matrices.
            let (with_attn, plain) = if cfg.train.gradient_checkpointing {
                (36, 3)
            } else {
                (240, 20)
            };
            let values: u64 = u
                .block_out_channels
                .iter()
                .enumerate()
                .map(|(l, c)| {
                    let has_attn = u
                        .down_block_types
                        .get(l)
                        .is_some_and(|k| *k == BlockKind::CrossAttn);
                    let depth = u.transformer_layers_per_block.get(l).copied().unwrap_or(1) as u64;
                    let per = if has_attn {
                        plain + (with_attn - plain) * depth
                    } else {
                        plain
                    };
                    per * *c as u64 * (px >> (2 * l))
                })
                .sum();
            b * values * abytes
        })
        .unwrap_or(0);
    MemoryEstimate {
        vae_bytes,
        loaded,
        caching,
        frozen,
        lora_params,
        lora_state,
        activations,
    }
}

fn gib(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// The `--dry-run` report.
fn dry_run_report(cfg: &TrainConfig, ds: &Dataset, r: &Report, m: &ModelFacts) -> Result<String> {
    let mut o = String::new();
    let _ = writeln!(o, "# Resolved config\n");
    o.push_str(&cfg.to_toml().context("cannot print the config as TOML")?);

    let _ = writeln!(o, "\n# Dataset\n");
    let _ = writeln!(
        o,
        "{}, {}, {} per epoch; resolution {}",
        plural(r.subsets.len(), "subset", "subsets"),
        plural(r.summary.images, "image", "images"),
        plural(r.summary.samples_per_epoch, "sample", "samples"),
        ds.config.resolution
    );
    for (i, s) in r.subsets.iter().enumerate() {
        let _ = writeln!(
            o,
            "  [{i}] {} ({}): {} × {}, loss weight {}{}",
            s.path.display(),
            s.kind,
            plural(s.images, "image", "images"),
            plural(s.repeats as usize, "repeat", "repeats"),
            s.loss_weight,
            s.fallback_caption
                .as_ref()
                .map(|c| format!(", caption \"{c}\""))
                .unwrap_or_default()
        );
    }
    let buckets: Vec<String> = r
        .buckets
        .iter()
        .map(|b| format!("{}×{}: {}", b.bucket[0], b.bucket[1], b.images))
        .collect();
    let _ = writeln!(o, "  buckets: {}", buckets.join(", "));
    let _ = writeln!(
        o,
        "  problems: {} errors, {} warnings{}",
        r.summary.errors,
        r.summary.warnings,
        if r.problems.is_empty() {
            String::new()
        } else {
            " (see `sd-lora check-data`)".to_string()
        }
    );
    let split = sd_lora_train::validation::split(cfg, ds)?;
    if let Some(v) = &split.validation {
        let _ = writeln!(
            o,
            "  validation: {} image(s){}, not trained on; evaluated {}",
            v.images.len(),
            if split.held_out > 0 {
                format!(
                    " ({} of the instance images held out by train.validation_split)",
                    split.held_out
                )
            } else {
                String::new()
            },
            match cfg.train.validate_every_n_steps {
                0 => "at every checkpoint and at the end".to_string(),
                n => format!("every {n} steps"),
            }
        );
    }
    // The schedule counts what the run trains on.
    let ds = &split.train;

    let t = &cfg.train;
    let has_class =
        ds.batches_per_epoch_of(Some(sd_lora_data::SubsetKind::Class), t.batch_size) > 0;
    let batches = ds
        .batches_per_epoch_of(
            has_class.then_some(sd_lora_data::SubsetKind::Instance),
            t.batch_size,
        )
        .max(1);
    let steps_per_epoch = sd_lora_train::trainer::steps_per_epoch(cfg, ds);
    let epochs = t.steps.div_ceil(steps_per_epoch);
    let _ = writeln!(o, "\n# Schedule\n");
    let _ = writeln!(
        o,
        "{} steps × batch {} × accumulation {} = {} samples",
        t.steps,
        t.batch_size,
        t.gradient_accumulation,
        t.steps * t.batch_size * t.gradient_accumulation
    );
    let _ = writeln!(
        o,
        "{batches} {}batches per epoch → {steps_per_epoch} steps per epoch → {epochs} epochs",
        if has_class { "instance " } else { "" }
    );
    if has_class {
        let _ = writeln!(
            o,
            "prior preservation: every instance batch is paired with a class batch (loss = instance + prior_loss_weight · class)"
        );
    }
    let _ = writeln!(
        o,
        "lr: UNet {:e}{}, {} schedule, {} warm-up steps",
        t.unet_lr,
        if cfg.network.train_text_encoder {
            format!(", text encoder {:e}", t.text_encoder_lr)
        } else {
            String::new()
        },
        serde_json::to_value(t.lr_scheduler)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        t.warmup_steps
    );
    let save = if cfg.output.save_every > 0 {
        format!(", a checkpoint every {} steps", cfg.output.save_every)
    } else {
        String::new()
    };
    let _ = writeln!(
        o,
        "output: {}{save}",
        cfg.output
            .dir
            .join(format!("{}.safetensors", cfg.output.name))
            .display()
    );

    let (spec, block_notes) = cfg.network.target_spec_for(&m.layers)?;
    for n in &block_notes {
        let _ = writeln!(o, "note: {n}");
    }
    let selected = m.layers.iter().filter(|t| spec.selects(t)).count();
    let est = estimate_memory(cfg, ds, m, &spec);
    let _ = writeln!(o, "\n# Memory estimate (peak, rough)\n");
    let _ = writeln!(
        o,
        "frozen weights ({}): {}",
        toml::Value::try_from(cfg.model.dtype)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        m.params
            .iter()
            .map(|(c, n)| {
                let bytes = match c {
                    Component::Vae => est.vae_bytes,
                    Component::Unet => cfg.model.dtype.unet_weight_bytes() as u64,
                    _ => cfg.model.dtype.size_in_bytes() as u64,
                };
                let note = if bytes != cfg.model.dtype.size_in_bytes() as u64 {
                    format!(
                        " (in {})",
                        match bytes {
                            4 => "f32",
                            1 => "fp8",
                            _ => "16 bits",
                        }
                    )
                } else {
                    String::new()
                };
                format!("{c} {}{note}", gib(n * bytes))
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        o,
        "{}: {} layers, {} parameters; with gradients and {} state{}: {}",
        cfg.network.network_type.display_name(),
        selected,
        est.lora_params,
        t.optimizer.display_name(),
        if cfg.network.network_type == NetworkType::Lora {
            ""
        } else {
            " and the update being built"
        },
        gib(est.lora_state)
    );
    if m.unet.is_some() {
        let _ = writeln!(
            o,
            "activations (batch {}): {}",
            t.batch_size,
            gib(est.activations)
        );
    } else {
        let _ = writeln!(
            o,
            "activations: not estimated (the UNet config could not be read); add them to the total"
        );
    }
    let _ = writeln!(
        o,
        "loading: {} of weights{}",
        gib(est.loaded),
        if cfg.model.is_builtin() {
            ""
        } else {
            " (all but the UNet)"
        }
    );
    if est.caching > 0 {
        let _ = writeln!(
            o,
            "caching latents: {} (the VAE and its working memory; the text encoders are \
             released first when their outputs are cached, the UNet is built afterwards)",
            gib(est.caching)
        );
    }
    let _ = writeln!(
        o,
        "while training: {} of weights kept (encoders released once their outputs are cached)",
        gib(est.frozen)
    );
    let _ = writeln!(
        o,
        "total: about {} (the largest of the phases)",
        gib(est.total())
    );
    Ok(o)
}
