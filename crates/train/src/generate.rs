//! Text-to-image generation with a loaded [`StableDiffusion`]: prompt encoding,
//! seeded initial noise, classifier-free guidance, a sampler from
//! `sd_lora_model::sampling`, and VAE decoding to an [`RgbImage`].
//!
//! The `sd-lora generate` command, training previews and class-image
//! generation all go through [`generate`], so that one seed gives one image
//! wherever it is rendered.

use crate::png_meta::{GenerationParams, LoraInfo};
use anyhow::{Context, bail};
use candle_core::{DType, Tensor};
use image::RgbImage;
use sd_lora_model::conditioning::{SizeCond, TextConditioning};
use sd_lora_model::load::ModelSource;
use sd_lora_model::pipeline::StableDiffusion;
use sd_lora_model::prompt::encode_prompt_pair;
use sd_lora_model::sampling::{
    NormalRng, Sampler, SamplerConfig, SamplerKind, sample_with_progress,
};
use std::path::Path;

/// What to generate: one image.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The prompt (A1111 syntax: `(word:1.2)`, any length).
    pub prompt: String,
    /// The negative prompt (empty for none).
    pub negative_prompt: String,
    pub sampler: SamplerKind,
    /// Number of sampler steps (≥ 1).
    pub steps: usize,
    /// Classifier-free guidance scale; 1 runs the conditional pass only.
    pub cfg_scale: f64,
    /// Seeds the initial noise and, for ancestral samplers, each step's noise.
    pub seed: u64,
    /// Image width in pixels (a multiple of the VAE factor, 8 for every released model).
    pub width: u32,
    /// Image height in pixels (a multiple of the VAE factor).
    pub height: u32,
    /// CLIP skip as A1111 counts it (1 = last layer).
    pub clip_skip: usize,
}

impl GenerateRequest {
    /// The image's A1111 `parameters`, for `model` (see [`model_label`]) and
    /// the LoRAs applied.
    pub fn params(&self, model: &ModelLabel, loras: Vec<LoraInfo>) -> GenerationParams {
        GenerationParams {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps as u32,
            sampler: self.sampler.a1111_name().to_string(),
            cfg_scale: self.cfg_scale,
            seed: self.seed,
            width: self.width,
            height: self.height,
            model_name: model.name.clone(),
            model_hash: model.hash.clone(),
            clip_skip: (self.clip_skip > 1).then_some(self.clip_skip),
            loras,
            extra: Vec::new(),
        }
    }
}

/// How a model appears in image metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelLabel {
    /// The file or folder stem (or the built-in model's name).
    pub name: Option<String>,
    /// A1111's short hash, for single-file checkpoints.
    pub hash: Option<String>,
}

/// The label of the model at `path` (a file, a folder or `builtin:…`).
/// Hashing a multi-gigabyte checkpoint reads it once (seconds).
pub fn model_label(path: &str) -> anyhow::Result<ModelLabel> {
    if sd_lora_model::builtin::is_builtin(path) {
        return Ok(ModelLabel {
            name: Some(path.to_string()),
            hash: None,
        });
    }
    let p = Path::new(path);
    Ok(ModelLabel {
        name: Some(file_stem(p)),
        hash: if p.is_file() {
            Some(crate::png_meta::model_short_hash(p)?)
        } else {
            None
        },
    })
}

/// A file's name without extension (the whole name when it has none), as UIs
/// name models and LoRAs.
pub fn file_stem(path: &Path) -> String {
    path.file_stem().or_else(|| path.file_name()).map_or_else(
        || path.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    )
}

/// Checks the request before any work: sizes multiples of 8 and at least 8,
/// at least one step, a finite guidance scale.
pub fn validate(req: &GenerateRequest, vae_factor: u32) -> anyhow::Result<()> {
    let f = vae_factor.max(1);
    for (name, v) in [("width", req.width), ("height", req.height)] {
        if v < f || v % f != 0 {
            bail!(
                "--{name} {v}: must be a multiple of {f} (and at least {f}), the model's VAE \
                 downsampling factor"
            );
        }
    }
    if req.steps == 0 {
        bail!("--steps 0: at least 1 step is needed");
    }
    if !req.cfg_scale.is_finite() {
        bail!(
            "--cfg {}: the guidance scale must be a finite number",
            req.cfg_scale
        );
    }
    Ok(())
}

/// The sampler configuration of a model: the folder's
/// `scheduler/scheduler_config.json` when `source` has one, else Stable
/// Diffusion's usual scheduler on the model's noise schedule. A scheduler
/// config that cannot be used is an error naming the file, not a silent
/// fallback (images would quietly differ from other UIs').
pub fn sampler_config_for(
    sd: &StableDiffusion,
    source: Option<&ModelSource>,
) -> anyhow::Result<SamplerConfig> {
    match source.and_then(ModelSource::scheduler_config) {
        Some(json) => SamplerConfig::from_json(json).map_err(|e| {
            anyhow::anyhow!(
                "scheduler/scheduler_config.json of the model cannot be used for sampling: {e}; fix or remove the file"
            )
        }),
        None => Ok(SamplerConfig::sd_default(sd.schedule.clone())),
    }
}

/// Generates one image; `on_step(step, total)` is called after each sampler
/// step (`step` counts from 1).
pub fn generate(
    sd: &StableDiffusion,
    sampler_cfg: &SamplerConfig,
    req: &GenerateRequest,
    on_step: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<RgbImage> {
    // Sampling never needs gradients: with LoRA parameters detached, no
    // graph is recorded (trainable adapters during previews included).
    sd_lora_model::ops::checkpoint::no_grad(|| generate_inner(sd, sampler_cfg, req, on_step))
}

fn generate_inner(
    sd: &StableDiffusion,
    sampler_cfg: &SamplerConfig,
    req: &GenerateRequest,
    on_step: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<RgbImage> {
    let factor = sd.vae_scale_factor();
    validate(req, factor as u32)?;
    let device = sd.device().clone();
    let unet_dtype = sd.unet.dtype();
    let (cond, uncond) = encode_prompt_pair(sd, &req.prompt, &req.negative_prompt, req.clip_skip)
        .context("encoding the prompt")?;
    let guided = req.cfg_scale != 1.0;
    // Unconditional first, as diffusers stacks them.
    let text = if guided {
        TextConditioning::cat(&[uncond, cond])?
    } else {
        cond
    }
    .to_dtype(unet_dtype)?;
    let batch = text.batch()?;
    // SDXL: generated at its own size, uncropped.
    let sizes = vec![SizeCond::uncropped(req.height, req.width); batch];

    let channels = sd.unet_config.in_channels;
    let (h, w) = (req.height as usize / factor, req.width as usize / factor);
    let mut rng = NormalRng::new(req.seed);
    let noise = rng.randn((1, channels, h, w), &device)?;
    let mut sampler = Sampler::new(req.sampler, sampler_cfg, req.steps)?;
    let total = sampler.num_steps();
    let cfg = req.cfg_scale;

    let model = |x: &Tensor, t: f64| -> candle_core::Result<Tensor> {
        let input = if guided {
            Tensor::cat(&[x, x], 0)?
        } else {
            x.clone()
        };
        let timesteps = Tensor::full(t as f32, batch, &device)?;
        let out = sd
            .predict(&input, &timesteps, &text, &sizes)?
            .to_dtype(DType::F32)?;
        if guided {
            let uncond = out.narrow(0, 0, 1)?;
            let cond = out.narrow(0, 1, 1)?;
            let diff = ((cond - &uncond)? * cfg)?;
            uncond + diff
        } else {
            Ok(out)
        }
    };
    let latents = sample_with_progress(&mut sampler, &noise, model, &mut rng, |i, _| {
        on_step(i + 1, total)
    })?;

    let z = sd.vae.unscale_latents(&latents)?;
    let decoded = sd.vae.decode(&z)?.to_dtype(DType::F32)?;
    to_rgb_image(&decoded.squeeze(0)?)
}

/// `[3, h, w]` in about `[-1, 1]` → 8-bit RGB.
fn to_rgb_image(x: &Tensor) -> anyhow::Result<RgbImage> {
    let (c, h, w) = x.dims3()?;
    if c != 3 {
        bail!("the VAE decoded {c} channels; an RGB image needs 3");
    }
    let bytes: Vec<u8> = ((x.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
        .round()?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, bytes)
        .context("the decoded image has the wrong number of pixels")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn request(cfg_scale: f64) -> GenerateRequest {
        GenerateRequest {
            prompt: "a photo of a robot".into(),
            negative_prompt: "blurry".into(),
            sampler: SamplerKind::Euler,
            steps: 2,
            cfg_scale,
            seed: 7,
            width: 32,
            height: 32,
            clip_skip: 1,
        }
    }

    #[test]
    fn guidance_changes_the_image_and_steps_are_reported() {
        let sd = sd_lora_model::builtin::tiny_sd1(DType::F32, &Device::Cpu).unwrap();
        let cfg = sampler_config_for(&sd, None).unwrap();
        let mut steps = Vec::new();
        let a = generate(&sd, &cfg, &request(1.0), &mut |i, n| steps.push((i, n))).unwrap();
        assert_eq!(steps, vec![(1, 2), (2, 2)]);
        let b = generate(&sd, &cfg, &request(7.0), &mut |_, _| {}).unwrap();
        assert_eq!((a.width(), a.height()), (32, 32));
        assert_ne!(
            a.as_raw(),
            b.as_raw(),
            "cfg 1 and cfg 7 gave the same image"
        );
        let again = generate(&sd, &cfg, &request(1.0), &mut |_, _| {}).unwrap();
        assert_eq!(
            a.as_raw(),
            again.as_raw(),
            "the same seed gave different images"
        );
    }

    #[test]
    fn bad_requests_are_refused() {
        let mut r = request(7.0);
        r.width = 500;
        assert!(
            validate(&r, 8)
                .unwrap_err()
                .to_string()
                .contains("--width 500")
        );
        let mut r = request(7.0);
        r.steps = 0;
        assert!(validate(&r, 8).is_err());
        assert!(validate(&request(f64::NAN), 8).is_err());
        // A VAE with fewer levels takes sizes in steps of its own factor.
        let mut r = request(7.0);
        r.width = 36;
        assert!(validate(&r, 4).is_ok());
        assert!(validate(&r, 8).is_err());
    }
}
