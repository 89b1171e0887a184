//! The training loop: one function, [`train`], whose step reads top to
//! bottom — latents and text embeddings in, noise and timesteps drawn, UNet
//! prediction, weighted denoising loss, backward, accumulate, clip, optimizer —
//! with checkpoints, logs and a resumable state around it.
//!
//! Every random draw is derived from `(seed, step, micro-batch)` and the
//! data order from `(seed, epoch, batch)`, so a run is bit-reproducible on
//! CPU and resuming needs only the step, the LoRA and the optimizer moments.

use crate::config::TrainConfig;
use crate::generate::sampler_config_for;
use crate::latents::{LatentCache, TextEmbeddingCache};
use crate::loss::{NoiseOptions, make_noisy_batch, masked_weighted_loss};
use crate::lr::LrSchedule;
use crate::masks::MaskCache;
use crate::optim::{
    GradAccumulator, Optimizer, OptimizerKind, ParamGroup, clip_coefficient, grad_norm,
};
use crate::previews::{Previews, previews_due};
use crate::state::{self, StateInfo};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use sd_lora_data::rng::Rng;
use sd_lora_data::{Dataset, SubsetKind};
use sd_lora_model::conditioning::{SizeCond, TextConditioning};
use sd_lora_model::load::{ModelSource, Prediction};
use sd_lora_model::lora::attach::{TrainOptions, TrainableLora, create_trainable};
use sd_lora_model::lora::format::{
    BaseModelVersion, DatasetDirInfo, Metadata, SaveDtype, write_kohya_named, write_peft,
};
use sd_lora_model::lora::lycoris::NetworkType;
use sd_lora_model::lora::targets::model_targets;
use sd_lora_model::lora::{LoraComponent, LoraWeights};
use sd_lora_model::ops::checkpoint;
use sd_lora_model::ops::op_count::{self, OpCount};
use sd_lora_model::pipeline::StableDiffusion;
use sd_lora_model::schedule::NoiseSchedule;
use sd_lora_model::vae::VaeParts;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Stream tag of the per-step noise and timesteps.
const NOISE_STREAM: u64 = 0x006E_6F69_7365;

/// What one optimizer step did, for progress display and logs.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Steps completed (1-based).
    pub step: usize,
    /// Steps planned.
    pub total: usize,
    /// Mean loss over the step's micro-batches (NaN when skipped).
    pub loss: f64,
    /// Learning rate of the UNet group at this step.
    pub lr: f64,
    /// Wall time of the step.
    pub seconds: f64,
    /// The step was skipped for a non-finite loss or gradient.
    pub skipped: bool,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tensor ops the step ran (forward, backward, optimizer; see
    /// [`sd_lora_model::ops::op_count`]).
    pub ops: OpCount,
    /// Nodes of the first micro-batch's autograd graph (outside checkpointed
    /// blocks, whose inner graphs are rebuilt in the backward).
    pub graph_nodes: usize,
    /// The validation loss evaluated after this step, if one was.
    pub val_loss: Option<f64>,
}

/// Receives progress from [`train`].
pub trait TrainProgress {
    /// A preparation pass before the first step (`what`: "caching latents",
    /// "caching text embeddings") has done `done` of `total` items; called
    /// with 0 first and with `total` last.
    fn prepare(&mut self, what: &str, done: usize, total: usize) {
        let _ = (what, done, total);
    }
    /// The model is loaded and the LoRA attached. Latents and captions are
    /// cached before (the UNet is built after them), between the `prepare`
    /// calls.
    fn loaded(&mut self) {}
    /// Training starts at `start` of `total` steps.
    fn begin(&mut self, total: usize, start: usize);
    /// A step finished.
    fn step(&mut self, report: &StepReport);
    /// A message worth showing (checkpoint written, skipped step, ...).
    fn note(&mut self, message: &str);
    /// Preview images were written after step `step`: `files` are the
    /// images, `grid` the grid of them when one was made. Called after the
    /// matching [`TrainProgress::note`], for displays that show them.
    fn previews(&mut self, step: usize, files: &[PathBuf], grid: Option<&Path>) {
        let _ = (step, files, grid);
    }
    /// Training ended (normally or not).
    fn end(&mut self);
    /// Asked after every step: `true` stops the run there, saving a
    /// checkpoint and the state, as Ctrl-C does.
    fn should_stop(&self) -> bool {
        false
    }
}

/// What a finished (or interrupted) run produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Optimizer steps completed.
    pub steps: usize,
    /// Loss of the last completed step.
    pub final_loss: Option<f64>,
    /// The LoRA file written last.
    pub lora_file: PathBuf,
    /// Every file written.
    pub files: Vec<PathBuf>,
    /// Stopped early by Ctrl-C (a checkpoint and state were saved).
    pub interrupted: bool,
    /// Steps skipped for non-finite values.
    pub skipped_steps: usize,
    /// Seconds per step, one per step run in this process.
    pub step_seconds: Vec<f64>,
    /// Elements of the trained LoRA tensors.
    pub lora_parameters: usize,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs a Ctrl-C handler (once): the first Ctrl-C stops training after
/// the current step and saves a checkpoint; a second one quits at once.
pub fn install_interrupt_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                eprintln!("\ninterrupted again: quitting without saving");
                std::process::exit(130);
            }
            eprintln!(
                "\nstopping after this step and saving a checkpoint, or after this image while caching latents (Ctrl-C again to quit without saving)"
            );
        });
    });
}

/// Whether Ctrl-C was pressed (after [`install_interrupt_handler`]).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The compute device named by the config.
pub fn device_from_name(name: &str) -> Result<Device> {
    use crate::config::DeviceSpec;
    match DeviceSpec::parse(name) {
        Some(DeviceSpec::Cpu) => Ok(Device::Cpu),
        Some(DeviceSpec::Cuda(ordinal)) => Device::new_cuda(ordinal).map_err(|e| {
            anyhow::anyhow!(
                "model.device = {name:?}: CUDA is not available ({e}); this build runs on the CPU — use device = \"cpu\", or build sd-lora with CUDA support"
            )
        }),
        Some(DeviceSpec::Metal) => Device::new_metal(0).map_err(|e| {
            anyhow::anyhow!(
                "model.device = \"metal\": Metal is not available ({e}); use device = \"cpu\""
            )
        }),
        None => bail!("model.device = {name:?}: allowed values are cpu, cuda, cuda:N, metal"),
    }
}

/// Loads the model named by the config (a path, or a built-in `builtin:…`).
pub fn load_model(cfg: &TrainConfig, device: &Device) -> Result<StableDiffusion> {
    Ok(load_model_and_source(cfg, device)?.0)
}

/// [`load_model`], also returning the opened source (`None` for a built-in
/// model), which holds the model's scheduler config for sampling.
pub fn load_model_and_source(
    cfg: &TrainConfig,
    device: &Device,
) -> Result<(StableDiffusion, Option<ModelSource>)> {
    load_model_parts(cfg, device, VaeParts::ALL)
}

/// [`load_model_and_source`] with only the VAE halves in `vae` (the others
/// are not read from the files, or are dropped from the built-in model).
pub fn load_model_parts(
    cfg: &TrainConfig,
    device: &Device,
    vae: VaeParts,
) -> Result<(StableDiffusion, Option<ModelSource>)> {
    load_model_inner(cfg, device, vae, true)
}

/// [`load_model_parts`] with a file model's UNet left as a placeholder until
/// [`StableDiffusion::load_unet`] (a built-in model is built whole: it is tiny).
fn load_model_unet_later(
    cfg: &TrainConfig,
    device: &Device,
    vae: VaeParts,
) -> Result<(StableDiffusion, Option<ModelSource>)> {
    load_model_inner(cfg, device, vae, false)
}

fn load_model_inner(
    cfg: &TrainConfig,
    device: &Device,
    vae: VaeParts,
    unet_now: bool,
) -> Result<(StableDiffusion, Option<ModelSource>)> {
    let dtype = cfg.model.dtype.to_dtype();
    if cfg.model.is_builtin() {
        let mut sd = sd_lora_model::builtin::load(cfg.model.path.trim(), dtype, device)?;
        if cfg.model.load_options().fp8_unet {
            sd_lora_model::storage::unet_to_fp8(&mut sd.unet)?;
        }
        if !vae.encoder {
            sd.vae.release_encoder();
        }
        if !vae.decoder {
            sd.vae.release_decoder();
        }
        return Ok((sd, None));
    }
    let source = ModelSource::open_with(&cfg.model.path, cfg.model.load_options())?;
    let sd = if unet_now {
        StableDiffusion::load_parts(&source, dtype, device, vae)?
    } else {
        StableDiffusion::load_parts_unet_later(&source, dtype, device, vae)?
    };
    Ok((sd, Some(source)))
}

/// The name under which a LoRA parameter is saved in the training state.
fn state_name(component: LoraComponent, path: &str, half: &str) -> String {
    let c = match component {
        LoraComponent::Unet => "unet",
        LoraComponent::TextEncoder => "text_encoder",
        LoraComponent::TextEncoder2 => "text_encoder_2",
    };
    format!("{c}:{path}.{half}")
}

fn lora_weights(lora: &TrainableLora) -> Result<LoraWeights> {
    let mut w = LoraWeights::default();
    for m in &lora.modules {
        w.insert((m.target.component, m.target.path.clone()), m.snapshot()?);
    }
    Ok(w)
}

/// Options that must not change between a run and its resume.
fn fingerprint(cfg: &TrainConfig) -> String {
    let mut key = serde_json::json!({
        "model": cfg.model.path,
        "network": serde_json::to_value(&cfg.network).unwrap_or_default(),
        "seed": cfg.train.seed,
        "batch_size": cfg.train.batch_size,
        "gradient_accumulation": cfg.train.gradient_accumulation,
        "dataset": serde_json::to_value(&cfg.dataset).unwrap_or_default(),
    });
    // Another optimizer's state cannot be continued. AdamW adds nothing, so
    // states saved before the optimizer was an option still resume.
    if cfg.train.optimizer != OptimizerKind::Adamw
        && let serde_json::Value::Object(map) = &mut key
    {
        map.insert("optimizer".into(), cfg.train.optimizer.as_str().into());
    }
    key.to_string()
}

/// Now, in Unix seconds — or `SOURCE_DATE_EPOCH` when set (the
/// reproducible-builds convention), so two runs can give byte-identical
/// files, timestamps included.
fn unix_now() -> f64 {
    if let Some(t) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        return t;
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Optimizer steps per epoch: one step takes `gradient_accumulation`
/// batches of instance images (each paired with a class batch when the
/// dataset has class images). At least 1.
pub fn steps_per_epoch(cfg: &TrainConfig, ds: &Dataset) -> usize {
    let has_class = ds.batches_per_epoch_of(Some(SubsetKind::Class), cfg.train.batch_size) > 0;
    let kind = has_class.then_some(SubsetKind::Instance);
    let batches = ds.batches_per_epoch_of(kind, cfg.train.batch_size);
    batches
        .div_ceil(cfg.train.gradient_accumulation.max(1))
        .max(1)
}

/// kohya-style metadata for a LoRA file written at `step`.
fn metadata(
    cfg: &TrainConfig,
    ds: &Dataset,
    sd: &StableDiffusion,
    weights: &LoraWeights,
    step: usize,
    started_at: f64,
    finished: bool,
) -> Metadata {
    let base_model = Some(BaseModelVersion::of_model(sd.architecture, sd.prediction));
    let mut dataset_dirs = BTreeMap::new();
    let mut tag_frequency: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for (i, s) in ds.subsets.iter().enumerate() {
        let name = s
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("subset_{i}"));
        dataset_dirs.insert(
            name.clone(),
            DatasetDirInfo {
                n_repeats: u64::from(s.repeats),
                img_count: s.images as u64,
            },
        );
        let freq = tag_frequency.entry(name).or_default();
        for e in ds.images.iter().filter(|e| e.subset == i) {
            for tag in e
                .caption
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
            {
                *freq.entry(tag.to_string()).or_default() += 1;
            }
        }
    }
    let per_epoch = steps_per_epoch(cfg, ds);
    let epochs = |steps: usize| steps.div_ceil(per_epoch) as u64;
    let mut md = Metadata {
        output_name: Some(cfg.output.name.clone()),
        base_model,
        resolution: Some((cfg.dataset.resolution, cfg.dataset.resolution)),
        steps: Some(step as u64),
        epoch: Some(epochs(step)),
        num_epochs: Some(epochs(cfg.train.steps)),
        learning_rate: Some(cfg.train.unet_lr),
        unet_lr: Some(cfg.train.unet_lr),
        text_encoder_lr: cfg
            .network
            .train_text_encoder
            .then_some(cfg.train.text_encoder_lr),
        seed: Some(cfg.train.seed),
        num_train_images: Some(ds.images.len() as u64),
        dataset_dirs,
        tag_frequency,
        training_started_at: Some(started_at),
        training_finished_at: finished.then(unix_now),
        extra: [("ss_optimizer".to_string(), optimizer_metadata(cfg))].into(),
        ..Default::default()
    }
    .with_network_of(weights);
    if cfg.network.network_type == NetworkType::Lokr && cfg.network.lokr_factor != -1 {
        md.network_args
            .insert("factor".into(), cfg.network.lokr_factor.to_string());
    }
    md
}

/// `ss_optimizer` as kohya writes it: the reference implementation's class
/// path, with the arguments that differ from its defaults.
fn optimizer_metadata(cfg: &TrainConfig) -> String {
    let t = &cfg.train;
    let mut args: Vec<String> = Vec::new();
    let class = match t.optimizer {
        OptimizerKind::Adamw => "torch.optim.adamw.AdamW",
        OptimizerKind::Adamw8bit => "bitsandbytes.optim.adamw.AdamW8bit",
        OptimizerKind::Prodigy => {
            for (k, v, default) in [
                ("d_coef", t.prodigy_d_coef, 1.0),
                ("d0", t.prodigy_d0, 1e-6),
            ] {
                if v != default {
                    args.push(format!("{k}={v}"));
                }
            }
            if t.prodigy_use_bias_correction {
                args.push("use_bias_correction=True".into());
            }
            if t.prodigy_safeguard_warmup {
                args.push("safeguard_warmup=True".into());
            }
            if let Some(g) = t.prodigy_growth_rate {
                args.push(format!("growth_rate={g}"));
            }
            if t.prodigy_slice_p != 1 {
                args.push(format!("slice_p={}", t.prodigy_slice_p));
            }
            "prodigyopt.prodigy.Prodigy"
        }
        OptimizerKind::Adafactor => {
            let py = |b: bool| if b { "True" } else { "False" };
            args.push(format!("relative_step={}", py(t.adafactor_relative_step)));
            args.push(format!(
                "scale_parameter={}",
                py(t.adafactor_scale_parameter)
            ));
            args.push(format!("warmup_init={}", py(t.adafactor_warmup_init)));
            "transformers.optimization.Adafactor"
        }
        OptimizerKind::Lion => "lion_pytorch.lion_pytorch.Lion",
    };
    if args.is_empty() {
        class.to_string()
    } else {
        format!("{class}({})", args.join(","))
    }
}

fn save_lora(
    cfg: &TrainConfig,
    sd: &StableDiffusion,
    path: &Path,
    weights: &LoraWeights,
    meta: &Metadata,
) -> Result<()> {
    let dtype: SaveDtype = cfg.output.save_dtype.to_save_dtype();
    match cfg.output.save_format.is_peft() {
        false => write_kohya_named(path, weights, meta, dtype, &sd.kohya_naming())?,
        true => write_peft(path, weights, meta, dtype)?,
    }
    Ok(())
}

/// Trains a LoRA as configured. `resume`: an output folder of an earlier run
/// of the same config, whose newest state is continued.
pub fn train(
    cfg: &TrainConfig,
    ds: &Dataset,
    resume: Option<&Path>,
    progress: &mut dyn TrainProgress,
) -> Result<TrainOutcome> {
    let device = device_from_name(&cfg.model.device)?;
    // Held-out images never reach the training batches.
    let split = crate::validation::split(cfg, ds)?;
    let ds = &split.train;
    let out_dir = cfg.output.dir.clone();
    std::fs::create_dir_all(out_dir.join("logs"))
        .with_context(|| format!("cannot create the output folder {}", out_dir.display()))?;

    // Model and LoRA. The VAE decoder is needed only to render previews.
    let has_previews = !cfg.output.sample_prompts.is_empty();
    let vae_parts = VaeParts {
        encoder: true,
        decoder: has_previews,
    };
    // The UNet is built after the latents and captions are cached (below), so
    // it never shares memory with the VAE's working memory or the encoders.
    let (mut sd, source) = load_model_unet_later(cfg, &device, vae_parts)?;
    let previews = Previews::new(cfg, sampler_config_for(&sd, source.as_ref())?)?;
    // A tokenizer that produces ids the text encoder cannot embed would fail
    // at the first prompt; say why now, before any work.
    if sd.tokenizer.vocab_size() > sd.text_encoder_config.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but the text encoder only {}; the model's tokenizer does not belong to its text encoder",
            cfg.model.path,
            sd.tokenizer.vocab_size(),
            sd.text_encoder_config.vocab_size
        );
    }
    for n in &sd.notes {
        progress.note(n);
    }
    // The schedule the loss trains on: zero terminal SNR rescales it; the
    // previews keep sampling with the model's own.
    let train_schedule = if cfg.train.zero_terminal_snr {
        if sd.schedule.prediction == Prediction::Epsilon {
            progress.note(
                "train.zero_terminal_snr with an ε-prediction model: the last timestep's input is pure \
                 noise; zero terminal SNR is meant for v-prediction (set model.prediction = \"v\" for a \
                 v model)",
            );
        }
        sd.schedule.with_zero_terminal_snr()
    } else {
        sd.schedule.clone()
    };
    let noise_opts = cfg.train.noise_options();
    if let Some(max) = noise_opts.max_timestep
        && max > train_schedule.len()
    {
        bail!(
            "train.max_timestep = {max}, but {} has {} timesteps; leave it out or use at most {}",
            cfg.model.path,
            train_schedule.len(),
            train_schedule.len()
        );
    }
    let total = cfg.train.steps;
    let accum = cfg.train.gradient_accumulation.max(1);
    let batch_size = cfg.train.batch_size.max(1);
    // With class images, every step pairs an instance batch with a class batch.
    let batches_class = ds.batches_per_epoch_of(Some(SubsetKind::Class), batch_size);
    let instance_kind = (batches_class > 0).then_some(SubsetKind::Instance);
    let batches_instance = ds.batches_per_epoch_of(instance_kind, batch_size);
    if batches_instance == 0 {
        bail!("the dataset has class images but no instance images to learn from");
    }
    let mut plans: PlanMemo = BTreeMap::new();
    let mut masks = MaskCache::new(ds);
    let model_id = format!("{}:{:?}", cfg.model.path, cfg.model.dtype);
    let disk_dir = cfg
        .train
        .latent_cache_dir
        .clone()
        .filter(|_| cfg.train.cache_latents.is_disk())
        .or_else(|| {
            cfg.train
                .cache_latents
                .is_disk()
                .then(|| out_dir.join("latent_cache"))
        });
    let mut latents_cache = LatentCache::new(disk_dir, &model_id);
    let mut text_cache = TextEmbeddingCache::new();
    let scaling = sd.vae_config.scaling_factor;
    // The validation images are encoded while the encoders are still here.
    let validation = match &split.validation {
        Some(v) => {
            let set = crate::validation::ValidationSet::encode(
                cfg,
                v,
                &sd,
                &device,
                cfg.network.train_text_encoder,
                &size_cond,
            )?;
            progress.note(&format!(
                "validation: {} image(s){}, evaluated {}",
                set.len(),
                if split.held_out > 0 {
                    format!(" ({} held out of training)", split.held_out)
                } else {
                    String::new()
                },
                match cfg.train.validate_every_n_steps {
                    0 => "at every checkpoint and at the end".to_string(),
                    n => format!("every {n} steps"),
                }
            ));
            Some(set)
        }
        None => None,
    };
    // Every latent and caption conditioning before the first step, then the
    // encoders that made them are dropped (see prepare.rs).
    let prepared = crate::prepare::prepare(
        cfg,
        ds,
        &mut sd,
        &device,
        &mut latents_cache,
        &mut text_cache,
        previews.is_some(),
        progress,
        &|| INTERRUPTED.load(Ordering::SeqCst),
    )?;
    if prepared.latents > 0 {
        progress.note(&format!(
            "{} latent(s) cached ({} from the disk cache){}",
            prepared.latents,
            prepared.latents_from_disk,
            if prepared.vae_encoder_released {
                "; VAE encoder released"
            } else {
                ""
            }
        ));
    }
    if prepared.captions > 0 {
        progress.note(&format!(
            "{} caption(s) encoded{}",
            prepared.captions,
            if prepared.text_encoder_released {
                "; text encoder released"
            } else {
                "; text encoder kept for the preview prompts"
            }
        ));
    }
    for w in latents_cache.warnings() {
        progress.note(w);
    }
    if sd.unet_pending
        && let Some(source) = &source
    {
        sd.load_unet(source, cfg.model.dtype.to_dtype(), &device)?;
    }
    drop(source);
    sd.unet
        .set_gradient_checkpointing(cfg.train.gradient_checkpointing);
    let targets = {
        let (unet, text_encoders) = sd.lora_parts();
        model_targets(unet, text_encoders)
    };
    let (spec, block_notes) = cfg.network.target_spec_for(&targets)?;
    for n in &block_notes {
        progress.note(n);
    }
    let train_te = cfg.network.train_text_encoder;
    let (unet, text_encoders) = sd.lora_parts_mut(train_te);
    let lora = create_trainable(
        unet,
        text_encoders,
        &spec,
        &TrainOptions {
            seed: cfg.train.seed,
            dropout: cfg.network.dropout,
            network: cfg.network.network_type,
            dora_axis: cfg.network.dora_axis,
            lokr_factor: cfg.network.lokr_factor,
        },
    )?;
    // One parameter group per model part, each with its learning rate; with
    // block learning-rate weights, one UNet group per distinct weight.
    let mut vars: BTreeMap<LoraComponent, Vec<Var>> = BTreeMap::new();
    let mut unet_by_weight: Vec<(f64, Vec<Var>)> = Vec::new();
    for m in &lora.modules {
        let dst = if m.target.component == LoraComponent::Unet {
            let w = spec.lr_weight(&m.target);
            let at = match unet_by_weight.iter().position(|(x, _)| *x == w) {
                Some(i) => i,
                None => {
                    unet_by_weight.push((w, Vec::new()));
                    unet_by_weight.len() - 1
                }
            };
            &mut unet_by_weight[at].1
        } else {
            vars.entry(m.target.component).or_default()
        };
        dst.extend(m.params.vars());
    }
    if unet_by_weight.is_empty() {
        unet_by_weight.push((1.0, Vec::new()));
    }
    let mut groups: Vec<ParamGroup> = unet_by_weight
        .into_iter()
        .map(|(w, vars)| ParamGroup {
            name: if w == 1.0 {
                "unet".into()
            } else {
                format!("unet×{w}")
            },
            vars,
            lr: cfg.train.unet_lr * w,
            weight_decay: cfg.train.weight_decay,
        })
        .collect();
    if train_te {
        groups.push(ParamGroup {
            name: "text_encoder".into(),
            vars: vars.remove(&LoraComponent::TextEncoder).unwrap_or_default(),
            lr: cfg.train.text_encoder_lr,
            weight_decay: cfg.train.weight_decay,
        });
        if let Some(te2) = vars.remove(&LoraComponent::TextEncoder2) {
            groups.push(ParamGroup {
                name: "text_encoder_2".into(),
                vars: te2,
                lr: cfg
                    .train
                    .text_encoder_2_lr
                    .unwrap_or(cfg.train.text_encoder_lr),
                weight_decay: cfg.train.weight_decay,
            });
        }
    }
    let mut opt = cfg.train.optimizer_spec().build(groups.clone())?;
    let mut acc = GradAccumulator::new(&groups);
    progress.loaded();
    let schedule_lr = LrSchedule {
        kind: cfg.train.lr_scheduler,
        warmup_steps: cfg.train.warmup_steps,
        total_steps: cfg.train.steps,
        num_cycles: cfg.train.lr_cycles,
    };

    // Resume.
    let fp = fingerprint(cfg);
    let mut start_step = 0;
    let mut skipped_steps = 0;
    let mut consecutive_nonfinite = 0;
    let mut started_at = unix_now();
    if let Some(from) = resume {
        let from_state = from.join("state");
        let saved = state::load(&from_state, &device)?;
        if saved.info.fingerprint != fp {
            bail!(
                "{}: the run was started with different model, network, dataset, seed, batch or optimizer options; resume it with the config it was started with",
                from.display()
            );
        }
        for m in &lora.modules {
            for (half, var) in m.params.named_vars() {
                let name = state_name(m.target.component, &m.target.path, &half);
                let t = saved
                    .lora
                    .get(&name)
                    .with_context(|| format!("{}: the saved state lacks {name}", from.display()))?;
                var.set(&t.to_dtype(var.dtype())?)?;
            }
        }
        opt.load_state_tensors(&saved.optimizer)?;
        start_step = saved.info.step;
        skipped_steps = saved.info.skipped_steps;
        consecutive_nonfinite = saved.info.consecutive_nonfinite;
        started_at = saved.info.started_at;
        progress.note(&format!("resuming from step {start_step}"));
    }

    let mut loss_log =
        crate::outputs::LossLog::open(&out_dir.join("logs").join("loss.csv"), start_step)?;
    let mut files: Vec<PathBuf> = Vec::new();
    let mut step_seconds = Vec::new();
    let mut final_loss = None;
    let mut interrupted = false;
    lora.dropout.set_training(true);

    progress.begin(total, start_step);
    let mut step = start_step;
    while step < total {
        let t0 = Instant::now();
        let ops0 = OpCount::now();
        let mut graph_nodes = 0;
        lora.dropout.set_step(step as u64);
        let mut losses = Vec::with_capacity(accum);
        for micro in 0..accum {
            // The g-th batch of the whole run (and, with prior preservation,
            // the g-th class batch too), in seeded epoch orders.
            let g = (step * accum + micro) as u64;
            let mut ctx = MicroCtx {
                cfg,
                ds,
                sd: &sd,
                device: &device,
                latents_cache: &mut latents_cache,
                text_cache: &mut text_cache,
                plans: &mut plans,
                scaling,
                train_te,
                latents_cached: prepared.vae_encoder_released,
                masks: &mut masks,
                schedule: &train_schedule,
                noise: &noise_opts,
                step,
                micro,
            };
            let mut loss = ctx.loss(instance_kind, g, batches_instance)?;
            if batches_class > 0 {
                // diffusers' formula: instance loss + prior_loss_weight · class
                // loss, each a mean over its own batch (the class samples carry
                // the prior weight as their loss weight).
                loss = (loss + ctx.loss(Some(SubsetKind::Class), g, batches_class)?)?;
            }
            if micro == 0 {
                graph_nodes = op_count::graph_nodes(&loss);
            }
            let value = f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            losses.push(value);
            if value.is_finite() {
                // Also collects the LoRA gradients of checkpointed blocks.
                acc.add(&checkpoint::backward(&loss)?)?;
            }
        }
        let loss = losses.iter().sum::<f64>() / losses.len() as f64;
        let grads = acc.take();
        let norm = grad_norm(&grads)?;
        let lr_factor = schedule_lr.factor(step);
        let skipped = !(loss.is_finite() && norm.is_finite());
        if skipped {
            skipped_steps += 1;
            consecutive_nonfinite += 1;
            progress.note(&format!(
                "step {}: non-finite {} — step skipped ({consecutive_nonfinite} in a row)",
                step + 1,
                if loss.is_finite() { "gradient" } else { "loss" }
            ));
            if consecutive_nonfinite > cfg.train.max_nonfinite_steps {
                bail!(
                    "stopping: {consecutive_nonfinite} steps in a row had a non-finite (NaN or infinite) loss or gradient; lower the learning rate, use dtype = \"f32\", or raise train.max_nonfinite_steps"
                );
            }
        } else {
            consecutive_nonfinite = 0;
            // Clipping scales the gradients inside the update (the norm is
            // already known; no second pass, no scaled copies).
            let coef = clip_coefficient(norm, cfg.train.max_grad_norm);
            opt.step_scaled(&grads, lr_factor, coef)?;
            final_loss = Some(loss);
        }
        step += 1;
        let ops = ops0.since();
        let seconds = t0.elapsed().as_secs_f64();
        step_seconds.push(seconds);
        // Prodigy's effective step size is its d times the learning rate.
        let lr = cfg.train.unet_lr * lr_factor * opt.lr_multiplier();
        let val_loss = match &validation {
            Some(v) if validation_due(cfg, step, total) => {
                lora.dropout.set_training(false);
                let l = v.loss(cfg, &sd, &device);
                lora.dropout.set_training(true);
                let l = l?;
                progress.note(&format!("step {step}: validation loss {l:.4}"));
                Some(l)
            }
            _ => None,
        };
        loss_log.append(&crate::outputs::LossRow {
            step,
            loss,
            lr,
            seconds,
            val_loss,
        })?;
        progress.step(&StepReport {
            step,
            total,
            loss,
            lr,
            seconds,
            skipped,
            grad_norm: norm,
            ops,
            graph_nodes,
            val_loss,
        });

        interrupted = INTERRUPTED.load(Ordering::SeqCst) || progress.should_stop();
        let periodic =
            cfg.output.save_every > 0 && step % cfg.output.save_every == 0 && step < total;
        if periodic || interrupted {
            let path = out_dir.join(format!("{}-step{:06}.safetensors", cfg.output.name, step));
            let counters = (step, skipped_steps, consecutive_nonfinite);
            checkpoint(
                cfg, ds, &sd, &lora, &*opt, &path, counters, started_at, &fp, false,
            )?;
            files.push(path.clone());
            progress.note(&format!("saved {} and the training state", path.display()));
        }
        if interrupted {
            break;
        }
        if let Some(p) = &previews
            && previews_due(cfg, step, total)
        {
            // Previews must not cost the run: a failure is reported and
            // training goes on.
            lora.dropout.set_training(false);
            let rendered = p.render(
                &sd,
                step,
                &mut |i, n| progress.note(&format!("step {step}: rendering preview {}/{n}", i + 1)),
                &|| INTERRUPTED.load(Ordering::SeqCst),
            );
            lora.dropout.set_training(true);
            match rendered {
                Ok(written) => {
                    // The grids stand for the previews in the list of outputs.
                    let grid = written.last().filter(|_| written.len() > p.len());
                    if let Some(grid) = grid {
                        progress.note(&format!(
                            "step {step}: {} previews, grid {}",
                            p.len(),
                            grid.display()
                        ));
                        files.push(grid.clone());
                    }
                    let images = &written[..written.len().min(p.len())];
                    progress.previews(step, images, grid.map(PathBuf::as_path));
                }
                Err(e) => progress.note(&format!(
                    "step {step}: previews failed ({e:#}); training goes on"
                )),
            }
        }
    }
    lora.dropout.set_training(false);

    let final_path = out_dir.join(format!("{}.safetensors", cfg.output.name));
    if !interrupted {
        let counters = (step, skipped_steps, consecutive_nonfinite);
        checkpoint(
            cfg,
            ds,
            &sd,
            &lora,
            &*opt,
            &final_path,
            counters,
            started_at,
            &fp,
            true,
        )?;
        files.push(final_path.clone());
    }
    progress.end();
    let lora_file = if interrupted {
        files.last().cloned().unwrap_or(final_path)
    } else {
        final_path
    };
    Ok(TrainOutcome {
        steps: step,
        final_loss,
        lora_file,
        files,
        interrupted,
        skipped_steps,
        step_seconds,
        lora_parameters: lora
            .modules
            .iter()
            .flat_map(|m| m.params.vars())
            .map(|v| v.elem_count())
            .sum(),
    })
}

/// Epoch orders already computed, by (kind, epoch).
type PlanMemo = BTreeMap<(Option<SubsetKind>, u64), Vec<sd_lora_data::BatchPlan>>;

/// What one micro-batch's loss needs.
struct MicroCtx<'a> {
    cfg: &'a TrainConfig,
    ds: &'a Dataset,
    sd: &'a StableDiffusion,
    device: &'a Device,
    latents_cache: &'a mut LatentCache,
    text_cache: &'a mut TextEmbeddingCache,
    plans: &'a mut PlanMemo,
    scaling: f64,
    train_te: bool,
    /// Every latent the run draws is in `latents_cache` (see prepare.rs).
    latents_cached: bool,
    /// Loss masks seen so far.
    masks: &'a mut MaskCache,
    /// The noise schedule of the loss.
    schedule: &'a NoiseSchedule,
    noise: &'a NoiseOptions,
    step: usize,
    micro: usize,
}

impl MicroCtx<'_> {
    /// The weighted denoising loss of the `g`-th batch of `kind`.
    fn loss(&mut self, kind: Option<SubsetKind>, g: u64, per_epoch: usize) -> Result<Tensor> {
        let (cfg, ds, sd, device) = (self.cfg, self.ds, self.sd, self.device);
        let batch_size = cfg.train.batch_size.max(1);
        let (epoch, index) = (g / per_epoch as u64, (g % per_epoch as u64) as usize);
        let plans = self
            .plans
            .entry((kind, epoch))
            .or_insert_with(|| ds.epoch_batches_of(kind, epoch, batch_size, cfg.train.seed));
        // With every latent cached up front no image is decoded again: the
        // batch is drawn (crops, flips, captions) without its pixels.
        let samples = if self.latents_cached {
            ds.draw_batch(&plans[index], cfg.train.seed, epoch, index as u64)
        } else {
            ds.load_batch(&plans[index], cfg.train.seed, epoch, index as u64)
                .map_err(|p| anyhow::anyhow!("{p}"))?
        };

        // Latents (frozen VAE) and text conditioning.
        let mut lat = Vec::with_capacity(samples.len());
        for s in &samples {
            let path = &ds.images[s.image].path;
            lat.push(if cfg.train.cache_latents.is_cached() {
                self.latents_cache
                    .get_or_encode(&sd.vae, self.scaling, s, path, device)?
            } else {
                crate::latents::encode_image_latents(&sd.vae, self.scaling, s, path, device)?
            });
        }
        let latents = Tensor::stack(&lat, 0)?;
        let text = if self.train_te {
            let captions: Vec<&str> = samples.iter().map(|s| s.caption.as_str()).collect();
            sd.encode_captions(&captions, cfg.model.clip_skip)?
        } else {
            let mut embs = Vec::with_capacity(samples.len());
            for s in &samples {
                embs.push(
                    self.text_cache
                        .get_or_encode(sd, &s.caption, cfg.model.clip_skip)?,
                );
            }
            TextConditioning::cat(&embs)?
        };
        let sizes: Vec<SizeCond> = samples.iter().map(|s| size_cond(ds, s)).collect();

        // Noise and timesteps, drawn from this step's own stream.
        let kind_tag = match kind {
            Some(SubsetKind::Class) => 2,
            _ => 1,
        };
        let mut rng = Rng::derive(&[
            cfg.train.seed,
            NOISE_STREAM,
            self.step as u64,
            self.micro as u64,
            kind_tag,
        ]);
        let nb = make_noisy_batch(self.schedule, &latents, self.noise, &mut rng)?;
        let t: Vec<f32> = nb.timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_vec(t, nb.timesteps.len(), device)?;
        let dtype = cfg.model.dtype.to_dtype();
        let pred = sd.predict(&nb.noisy, &t, &text.to_dtype(dtype)?, &sizes)?;
        let weights: Vec<f32> = samples.iter().map(|s| s.loss_weight).collect();
        let (lh, lw) = (latents.dim(2)?, latents.dim(3)?);
        let mask = self.masks.batch_mask(ds, &samples, (lh, lw), device)?;
        Ok(masked_weighted_loss(
            &pred.to_dtype(DType::F32)?,
            &nb.target,
            &nb.timesteps,
            &weights,
            self.schedule,
            &cfg.train.loss_options(),
            mask.as_ref(),
        )?)
    }
}

/// SDXL's size conditioning of a sample, as kohya computes it: the image's
/// own size, the crop's top-left corner in the resized image (measured in the
/// mirrored image when the sample is flipped), and the bucket.
fn size_cond(ds: &Dataset, s: &sd_lora_data::Sample) -> SizeCond {
    let entry = &ds.images[s.image];
    let c = &s.crop;
    let left = if s.flipped {
        c.resized[0].saturating_sub(c.offset[0] + c.size[0])
    } else {
        c.offset[0]
    };
    SizeCond {
        original: [entry.height, entry.width],
        crop_top_left: [c.offset[1], left],
        target: [c.size[1], c.size[0]],
    }
}

/// Whether the validation set is evaluated after `step` (1-based): every
/// `validate_every_n_steps`, or at each checkpoint, and always at the end.
fn validation_due(cfg: &TrainConfig, step: usize, total: usize) -> bool {
    let every = match cfg.train.validate_every_n_steps {
        0 => cfg.output.save_every,
        n => n,
    };
    step == total || (every > 0 && step.is_multiple_of(every))
}

/// Writes the LoRA file `path` (metadata as of `counters.0` steps) and the
/// resumable state beside it. `counters`: (step, skipped, non-finite in a row).
#[allow(clippy::too_many_arguments)]
fn checkpoint(
    cfg: &TrainConfig,
    ds: &Dataset,
    sd: &StableDiffusion,
    lora: &TrainableLora,
    opt: &dyn Optimizer,
    path: &Path,
    counters: (usize, usize, usize),
    started_at: f64,
    fingerprint: &str,
    finished: bool,
) -> Result<()> {
    let (step, skipped, in_a_row) = counters;
    let weights = lora_weights(lora)?;
    let meta = metadata(cfg, ds, sd, &weights, step, started_at, finished);
    save_lora(cfg, sd, path, &weights, &meta)?;
    let state_dir = cfg.output.dir.join("state");
    save_state(
        &state_dir,
        lora,
        opt,
        step,
        skipped,
        in_a_row,
        started_at,
        fingerprint,
    )
}

#[allow(clippy::too_many_arguments)]
fn save_state(
    dir: &Path,
    lora: &TrainableLora,
    opt: &dyn Optimizer,
    step: usize,
    skipped_steps: usize,
    consecutive_nonfinite: usize,
    started_at: f64,
    fingerprint: &str,
) -> Result<()> {
    let mut tensors = Vec::new();
    for m in &lora.modules {
        for (half, var) in m.params.named_vars() {
            tensors.push((
                state_name(m.target.component, &m.target.path, &half),
                var.as_tensor().clone(),
            ));
        }
    }
    let info = StateInfo {
        version: 1,
        step,
        skipped_steps,
        consecutive_nonfinite,
        started_at,
        fingerprint: fingerprint.to_string(),
    };
    state::save(dir, &info, &tensors, &opt.state_tensors()?)?;
    Ok(())
}
/// Stream tag of the evaluation noise.
const EVAL_STREAM: u64 = 0x6576_616C;

/// The plain denoising loss (MSE against the model's target) of `sd` on
/// every training image at fixed timesteps with fixed noise — the same
/// draws every call, so two models (e.g. before and after training) can be
/// compared directly. A LoRA attached to `sd` is included.
pub fn fixed_noise_loss(cfg: &TrainConfig, ds: &Dataset, sd: &StableDiffusion) -> Result<f64> {
    // An evaluation: no graph is recorded through the LoRA parameters.
    checkpoint::no_grad(|| fixed_noise_loss_inner(cfg, ds, sd))
}

fn fixed_noise_loss_inner(cfg: &TrainConfig, ds: &Dataset, sd: &StableDiffusion) -> Result<f64> {
    let device = device_from_name(&cfg.model.device)?;
    let dtype = cfg.model.dtype.to_dtype();
    let scaling = sd.vae_config.scaling_factor;
    let mut total = 0.0;
    let mut count = 0usize;
    for i in 0..ds.images.len() {
        let mut rng = Rng::derive(&[EVAL_STREAM, i as u64]);
        let sample = ds
            .load_sample(i, &mut rng)
            .map_err(|p| anyhow::anyhow!("{p}"))?;
        let latents = crate::latents::encode_latents(&sd.vae, scaling, &sample, &device)?;
        let text = crate::latents::encode_caption(sd, &sample.caption, cfg.model.clip_skip)?
            .to_dtype(dtype)?;
        total += crate::validation::denoising_mse(
            sd,
            &latents,
            &text,
            &size_cond(ds, &sample),
            &crate::validation::VALIDATION_TIMESTEPS,
            &mut rng,
            &device,
        )?;
        count += crate::validation::VALIDATION_TIMESTEPS.len();
    }
    if count == 0 {
        bail!("no images to evaluate");
    }
    Ok(total / count as f64)
}
