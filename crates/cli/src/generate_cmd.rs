//! `sd-lora generate`: text-to-image with a model and any number of LoRAs,
//! writing PNGs with A1111 `parameters` metadata.
//!
//! Every argument is checked before the model is loaded, so a typo costs
//! nothing. Images are numbered `00000-SEED.png`, `00001-SEED.png`, … after
//! the highest number already in the output folder: nothing is overwritten.

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sd_lora_model::builtin;
use sd_lora_model::load::ModelSource;
use sd_lora_model::lora::attach::{attach, merge};
use sd_lora_model::lora::targets::model_targets;
use sd_lora_model::pipeline::StableDiffusion;
use sd_lora_model::sampling::SamplerKind;
use sd_lora_model::vae::VaeParts;
use sd_lora_train::generate::{
    GenerateRequest, file_stem, generate, model_label, sampler_config_for,
};
use sd_lora_train::png_meta::{self, LoraInfo};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// Arguments of `sd-lora generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The base model: a .safetensors checkpoint (SD1.x, SD2.x, SDXL), a diffusers folder, or
    /// a built-in tiny model (builtin:tiny, builtin:tiny-sdxl).
    #[arg(long, value_name = "PATH")]
    pub model: String,
    /// The prompt (A1111 syntax: `(word:1.2)`, any length).
    #[arg(long, value_name = "TEXT")]
    pub prompt: String,
    /// The negative prompt.
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub negative_prompt: String,
    /// A LoRA file with an optional scale (default 1); repeat for several.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    pub loras: Vec<String>,
    /// ddim, euler, euler_a, dpmpp_2m or dpmpp_2m_karras.
    #[arg(long, value_name = "NAME", default_value = "euler_a")]
    pub sampler: String,
    /// Sampler steps.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 = no guidance).
    #[arg(long, value_name = "X", default_value_t = 7.0)]
    pub cfg: f64,
    /// Seed of the first image (the next ones use seed+1, seed+2, …); random when not given.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Image width (a multiple of 8); default: the model's native size.
    #[arg(long, value_name = "W")]
    pub width: Option<u32>,
    /// Image height (a multiple of 8); default: the model's native size.
    #[arg(long, value_name = "H")]
    pub height: Option<u32>,
    /// Number of images.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub num_images: usize,
    /// CLIP skip as A1111 counts it (1 = last layer, 2 = the one before).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub clip_skip: usize,
    /// Merge the LoRAs into the weights (faster; always done for several LoRAs).
    #[arg(long)]
    pub merge: bool,
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, value_name = "DEVICE", default_value = "cpu")]
    pub device: String,
    /// Folder the PNGs are written to (created if missing).
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
}

/// A `--lora FILE[:SCALE]` argument.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LoraArg {
    pub path: PathBuf,
    /// Kept as typed (f64) so the PNG metadata shows `0.8`, not `0.800000011920929`.
    pub scale: f64,
}

/// Splits `FILE[:SCALE]`. A suffix after the last `:` that holds a path
/// separator (or an empty file part, as in `C:`) belongs to the file name.
pub(crate) fn parse_lora_arg(arg: &str) -> anyhow::Result<LoraArg> {
    let (file, scale) = match arg.rsplit_once(':') {
        Some((file, scale)) if !file.is_empty() && !scale.contains(['/', '\\']) => {
            let value: f64 = scale.trim().parse().map_err(|_| {
                anyhow::anyhow!(
                    "--lora {arg}: scale {scale:?} is not a number; write FILE or FILE:SCALE, e.g. my_lora.safetensors:0.8"
                )
            })?;
            if !value.is_finite() {
                bail!("--lora {arg}: scale {scale:?} must be a finite number");
            }
            (file, value)
        }
        _ => (arg, 1.0),
    };
    let path = PathBuf::from(file);
    if !path.is_file() {
        bail!("--lora {arg}: no such file {}", path.display());
    }
    Ok(LoraArg { path, scale })
}

/// Creates `dir` and checks that a file can be written in it.
fn check_output(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("--output {}: cannot create the folder", dir.display()))?;
    let probe = dir.join(format!(".sd-lora-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("--output {}: the folder is not writable", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The number after the highest `NNNNN-…` file in `dir` (0 when none).
fn next_index(dir: &Path) -> anyhow::Result<usize> {
    let mut next = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        let digits: String = name.chars().take_while(char::is_ascii_digit).collect();
        if !digits.is_empty()
            && name[digits.len()..].starts_with('-')
            && let Ok(n) = digits.parse::<usize>()
        {
            next = next.max(n + 1);
        }
    }
    Ok(next)
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    // Kept below 2^32 like A1111's seeds, so they can be typed back into any UI.
    h.finish() & 0xFFFF_FFFF
}

/// Drops every adapter while keeping the weights it was merged into, so the
/// next LoRA can be attached on top of it.
fn bake_adapters(sd: &mut StableDiffusion) {
    sd.unet.visit_layers_mut(&mut |_, mut layer| {
        layer.lora_mut().take();
    });
    let (_, mut text_encoders) = sd.lora_parts_mut(true);
    for (_, te) in text_encoders.iter_mut() {
        te.visit_layers_mut(&mut |_, mut layer| {
            layer.lora_mut().take();
        });
    }
}

fn load_model(
    model: &str,
    device: &Device,
) -> anyhow::Result<(StableDiffusion, Option<ModelSource>)> {
    if builtin::is_builtin(model) {
        let mut sd = builtin::load(model, DType::F32, device)?;
        sd.vae.release_encoder();
        return Ok((sd, None));
    }
    let source = ModelSource::open(model)?;
    let sd = StableDiffusion::load_parts(&source, DType::F32, device, VaeParts::DECODER)?;
    Ok((sd, Some(source)))
}

/// Runs `sd-lora generate`.
pub fn run(args: &GenerateArgs) -> anyhow::Result<u8> {
    // Everything the user typed is checked before the model is loaded.
    // Sizes must also be multiples of the model's VAE factor, checked once the
    // model is open (8 for every released model).
    for (name, v) in [("width", args.width), ("height", args.height)] {
        if v == Some(0) {
            bail!("--{name} 0: must be a positive multiple of 8");
        }
    }
    let sampler: SamplerKind = args.sampler.parse().map_err(|_| {
        anyhow::anyhow!(
            "--sampler {}: unknown sampler; use one of {}",
            args.sampler,
            SamplerKind::NAMES.join(", ")
        )
    })?;
    if args.steps == 0 {
        bail!("--steps 0: at least 1 step is needed");
    }
    if !args.cfg.is_finite() {
        bail!("--cfg {}: must be a finite number", args.cfg);
    }
    if args.num_images == 0 {
        bail!("--num-images 0: at least 1 image is needed");
    }
    if args.clip_skip == 0 {
        bail!("--clip-skip 0: use 1 for the last layer (A1111's numbering)");
    }
    let loras = args
        .loras
        .iter()
        .map(|a| parse_lora_arg(a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let model_path = Path::new(&args.model);
    if !builtin::is_builtin(&args.model) && !model_path.exists() {
        bail!("--model {}: no such file or folder", args.model);
    }
    let device = sd_lora_train::trainer::device_from_name(&args.device)
        .map_err(|e| anyhow::anyhow!("--device: {e:#}"))?;

    let (mut sd, source) = load_model(&args.model, &device)?;
    let native = sd.native_resolution();
    let (width, height) = (args.width.unwrap_or(native), args.height.unwrap_or(native));
    let factor = sd.vae_scale_factor() as u32;
    for (name, v) in [("width", width), ("height", height)] {
        if v % factor != 0 {
            bail!(
                "--{name} {v}: must be a multiple of {factor} (the model's VAE downsampling \
                 factor)"
            );
        }
    }
    let (unet, text_encoders) = sd.lora_parts();
    let targets = model_targets(unet, text_encoders);
    let mut lora_infos = Vec::new();
    let merged = args.merge || loras.len() > 1;
    for lora in &loras {
        let shown = lora.path.display();
        let file = crate::lora_fit::read_fitting(
            &lora.path,
            &targets,
            &format!("--lora {shown}"),
            &args.model,
        )?;
        let (unet, text_encoders) = sd.lora_parts_mut(true);
        attach(unet, text_encoders, &file.weights, lora.scale as f32)
            .with_context(|| format!("--lora {shown}"))?;
        if merged {
            let (unet, text_encoders) = sd.lora_parts_mut(true);
            merge(unet, text_encoders, lora.scale as f32)
                .with_context(|| format!("--lora {shown}: merging"))?;
            bake_adapters(&mut sd);
        }
        lora_infos.push(LoraInfo {
            name: file_stem(&lora.path),
            scale: lora.scale,
            hash: png_meta::lora_short_hash(&lora.path)?,
        });
    }

    // The output folder is made only once every input has been accepted.
    check_output(&args.output)?;
    let label = model_label(&args.model)?;

    let sampler_cfg = sampler_config_for(&sd, source.as_ref())?;
    let seed = match args.seed {
        Some(s) => s,
        None => {
            let s = random_seed();
            eprintln!("seed: {s}");
            s
        }
    };
    let mut index = next_index(&args.output)?;
    for i in 0..args.num_images {
        let req = GenerateRequest {
            prompt: args.prompt.clone(),
            negative_prompt: args.negative_prompt.clone(),
            sampler,
            steps: args.steps,
            cfg_scale: args.cfg,
            seed: seed.wrapping_add(i as u64),
            width,
            height,
            clip_skip: args.clip_skip,
        };
        let bar = progress_bar(args.steps as u64, i, args.num_images);
        let image = generate(&sd, &sampler_cfg, &req, &mut |step, _| {
            bar.set_position(step as u64)
        })?;
        bar.finish_and_clear();
        let params = req.params(&label, lora_infos.clone());
        let path = loop {
            let p = args.output.join(format!("{index:05}-{}.png", req.seed));
            index += 1;
            if !p.exists() {
                break p;
            }
        };
        png_meta::write_png(&path, &image, &params)?;
        crate::emit(&format!("{}\n", path.display()))?;
    }
    Ok(0)
}

/// A bar over the steps of one image on a terminal; hidden otherwise.
fn progress_bar(steps: u64, image: usize, images: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    if std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps {elapsed}")
        {
            bar.set_style(style);
        }
        bar.set_message(format!("image {}/{images}", image + 1));
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_arguments_split_at_the_last_colon() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.safetensors");
        std::fs::write(&file, b"x").unwrap();
        let f = file.display().to_string();
        assert_eq!(parse_lora_arg(&f).unwrap().scale, 1.0);
        assert_eq!(parse_lora_arg(&format!("{f}:0.5")).unwrap().scale, 0.5);
        let e = parse_lora_arg(&format!("{f}:abc")).unwrap_err().to_string();
        assert!(e.contains("\"abc\" is not a number"), "{e}");
        assert!(parse_lora_arg("missing.safetensors").is_err());
    }

    #[test]
    fn numbering_continues_after_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(next_index(dir.path()).unwrap(), 0);
        std::fs::write(dir.path().join("00004-12.png"), b"").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"").unwrap();
        assert_eq!(next_index(dir.path()).unwrap(), 5);
    }
}
