//! Preview images during training: the config's `output.sample_prompts`,
//! rendered with the LoRA being trained every `output.sample_every` steps and
//! at the end, into `OUTPUT/samples/` as `NAME-stepNNNNNN-PP.png` (one per
//! prompt, with A1111 `parameters` metadata) plus `NAME-stepNNNNNN-grid.png`.
//!
//! Every step renders the same prompts from the same seeds, so a series of
//! grids shows only what training changed.

use crate::config::{TrainConfig, parse_sampler};
use crate::generate::{GenerateRequest, ModelLabel, generate};
use crate::png_meta::{self, LoraInfo};
use anyhow::{Context, Result};
use image::RgbImage;
use sd_lora_model::pipeline::StableDiffusion;
use sd_lora_model::sampling::SamplerConfig;
use std::path::PathBuf;

/// The sub-folder of the output folder that holds the previews.
pub const SAMPLES_DIR: &str = "samples";

/// The preview requests of a config, defaults resolved: prompt `i` uses seed
/// `output.sample_seed + i` unless it sets one, and the training resolution
/// unless it sets a size.
pub fn preview_requests(cfg: &TrainConfig) -> Result<Vec<GenerateRequest>> {
    let o = &cfg.output;
    let default_sampler = parse_sampler("output.sample_sampler", &o.sample_sampler)?;
    o.sample_prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let sampler = match &p.sampler {
                Some(s) => parse_sampler(&format!("output.sample_prompts[{i}].sampler"), s)?,
                None => default_sampler,
            };
            Ok(GenerateRequest {
                prompt: p.prompt.clone(),
                negative_prompt: p
                    .negative_prompt
                    .clone()
                    .unwrap_or_else(|| o.sample_negative_prompt.clone()),
                sampler,
                steps: p.steps.unwrap_or(o.sample_steps),
                cfg_scale: p.cfg.unwrap_or(o.sample_cfg),
                seed: p.seed.unwrap_or(o.sample_seed.wrapping_add(i as u64)),
                width: p.width.unwrap_or(cfg.dataset.resolution),
                height: p.height.unwrap_or(cfg.dataset.resolution),
                clip_skip: cfg.model.clip_skip,
            })
        })
        .collect()
}

/// Whether previews are due after `step` of `total` steps: every
/// `sample_every` steps and after the last one.
pub fn previews_due(cfg: &TrainConfig, step: usize, total: usize) -> bool {
    let every = cfg.output.sample_every;
    !cfg.output.sample_prompts.is_empty()
        && (step == total || (every > 0 && step.is_multiple_of(every)))
}

/// Renders previews for one config.
pub struct Previews {
    requests: Vec<GenerateRequest>,
    sampler: SamplerConfig,
    model: ModelLabel,
    dir: PathBuf,
    name: String,
}

impl Previews {
    /// The previews of `cfg`, `None` when it has no sample prompts.
    pub fn new(cfg: &TrainConfig, sampler: SamplerConfig) -> Result<Option<Previews>> {
        let requests = preview_requests(cfg)?;
        if requests.is_empty() {
            return Ok(None);
        }
        Ok(Some(Previews {
            requests,
            sampler,
            model: crate::generate::model_label(&cfg.model.path)?,
            dir: cfg.output.dir.join(SAMPLES_DIR),
            name: cfg.output.name.clone(),
        }))
    }

    /// Number of images per step (without the grid).
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    /// Whether there is nothing to render.
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Renders every prompt with `sd` as it is now (the LoRA attached at
    /// multiplier 1, dropout off — the caller's job) and writes the PNGs and
    /// the grid; returns the files written. `stop()` is asked between prompts:
    /// `true` ends the rendering early (the grid is then not written).
    pub fn render(
        &self,
        sd: &StableDiffusion,
        step: usize,
        on_image: &mut dyn FnMut(usize, usize),
        stop: &dyn Fn() -> bool,
    ) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create the folder {}", self.dir.display()))?;
        let lora = LoraInfo {
            name: self.name.clone(),
            scale: 1.0,
            hash: String::new(),
        };
        let mut files = Vec::new();
        let mut images: Vec<RgbImage> = Vec::new();
        let mut first_params = None;
        for (i, req) in self.requests.iter().enumerate() {
            if stop() {
                return Ok(files);
            }
            on_image(i, self.requests.len());
            let image = generate(sd, &self.sampler, req, &mut |_, _| {})
                .with_context(|| format!("rendering preview prompt {:?}", req.prompt))?;
            let mut params = req.params(&self.model, vec![lora.clone()]);
            params
                .extra
                .push(("Training step".to_string(), step.to_string()));
            let text = params.to_a1111_string();
            let path = self.image_path(step, Some(i));
            png_meta::write_png_with_parameters(&path, &image, &text)?;
            files.push(path);
            first_params.get_or_insert(text);
            images.push(image);
        }
        let cols = (images.len() as f64).sqrt().ceil() as usize;
        let grid = png_meta::grid(&images, cols);
        let path = self.image_path(step, None);
        // A1111 writes a grid with the parameters of its first image.
        png_meta::write_png_with_parameters(&path, &grid, first_params.as_deref().unwrap_or(""))?;
        files.push(path);
        Ok(files)
    }

    /// `NAME-stepNNNNNN-PP.png`, or `NAME-stepNNNNNN-grid.png` for `None`.
    fn image_path(&self, step: usize, prompt: Option<usize>) -> PathBuf {
        let tail = prompt.map_or_else(|| "grid".to_string(), |i| format!("{i:02}"));
        self.dir
            .join(format!("{}-step{step:06}-{tail}.png", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SamplePrompt;

    fn config(prompts: Vec<SamplePrompt>, every: usize) -> TrainConfig {
        let mut cfg = TrainConfig::default();
        cfg.dataset.resolution = 64;
        cfg.output.sample_prompts = prompts;
        cfg.output.sample_every = every;
        cfg
    }

    #[test]
    fn defaults_and_overrides_resolve() {
        let cfg = config(
            vec![
                SamplePrompt {
                    prompt: "a".into(),
                    ..Default::default()
                },
                SamplePrompt {
                    prompt: "b".into(),
                    seed: Some(9),
                    steps: Some(3),
                    cfg: Some(1.0),
                    width: Some(32),
                    sampler: Some("DDIM".into()),
                    negative_prompt: Some("blurry".into()),
                    ..Default::default()
                },
            ],
            10,
        );
        let r = preview_requests(&cfg).unwrap();
        assert_eq!(r[0].seed, 1234);
        assert_eq!((r[0].width, r[0].height, r[0].steps), (64, 64, 20));
        assert_eq!(r[0].sampler.name(), "euler_a");
        assert_eq!((r[1].seed, r[1].steps, r[1].cfg_scale), (9, 3, 1.0));
        assert_eq!((r[1].width, r[1].height), (32, 64));
        assert_eq!(r[1].sampler.name(), "ddim");
        assert_eq!(r[1].negative_prompt, "blurry");
    }

    #[test]
    fn due_every_n_steps_and_at_the_end() {
        let p = vec![SamplePrompt {
            prompt: "a".into(),
            ..Default::default()
        }];
        let cfg = config(p.clone(), 4);
        let due: Vec<usize> = (1..=10).filter(|&s| previews_due(&cfg, s, 10)).collect();
        assert_eq!(due, vec![4, 8, 10]);
        let cfg = config(p, 0);
        let due: Vec<usize> = (1..=10).filter(|&s| previews_due(&cfg, s, 10)).collect();
        assert_eq!(due, vec![10]);
        let cfg = config(Vec::new(), 4);
        assert!(!(1..=10).any(|s| previews_due(&cfg, s, 10)));
    }
}
