//! Class images for prior preservation: when a class subset asks for
//! `num_class_images` and its folder holds fewer, the missing ones are
//! generated with the base model (no LoRA) from the subset's class prompt,
//! before training, and saved into the folder as `class-NNNN.png` — never
//! over an existing file. A second run counts them and generates nothing.
//!
//! Each image's seed is derived from (train seed, subset, image number), so
//! the same config generates the same images, and raising
//! `num_class_images` later only adds new ones.

use crate::config::{TrainConfig, parse_sampler};
use crate::generate::{GenerateRequest, ModelLabel, generate};
use crate::png_meta;
use anyhow::{Result, bail};
use sd_lora_data::folder::{FileRole, file_role, parse_kohya_folder_name};
use sd_lora_data::rng::Rng;
use sd_lora_data::{Layout, SubsetKind};
use sd_lora_model::pipeline::StableDiffusion;
use sd_lora_model::sampling::SamplerConfig;
use std::path::{Path, PathBuf};

/// Stream tag of the class-image seeds.
const CLASS_STREAM: u64 = 0x0063_6C61_7373;

/// What one class subset needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassImagePlan {
    /// Index into `dataset.subsets`.
    pub subset: usize,
    /// The class folder (created if missing).
    pub folder: PathBuf,
    /// The class prompt the images are generated from.
    pub prompt: String,
    /// Images already in the folder.
    pub existing: usize,
    /// `num_class_images`.
    pub wanted: usize,
}

impl ClassImagePlan {
    /// Images to generate.
    pub fn missing(&self) -> usize {
        self.wanted.saturating_sub(self.existing)
    }
}

/// The class subsets that ask for `num_class_images`, with what their
/// folders hold. Reads folder listings only (no decoding), so it is cheap
/// enough for `--dry-run`.
pub fn plan_class_images(cfg: &TrainConfig) -> Result<Vec<ClassImagePlan>> {
    let mut plans = Vec::new();
    for (i, s) in cfg.dataset.subsets.iter().enumerate() {
        let Some(wanted) = s.num_class_images else {
            continue;
        };
        let key = format!("dataset.subsets[{i}]");
        if s.kind != SubsetKind::Class {
            bail!(
                "`{key}.num_class_images`: only class subsets (kind = \"class\") get generated images"
            );
        }
        let folder = s.path.clone();
        if folder.exists() && !folder.is_dir() {
            bail!(
                "`{key}.path` = {}: not a folder; class images are saved into a folder",
                folder.display()
            );
        }
        let kohya_root = s.layout == Layout::Kohya
            || (s.layout == Layout::Auto && has_kohya_subfolders(&folder));
        if kohya_root {
            bail!(
                "`{key}.num_class_images`: {} is a kohya root (N_caption sub-folders); give the class image folder itself as `{key}.path`",
                folder.display()
            );
        }
        let prompt = s
            .caption
            .clone()
            .filter(|c| !c.trim().is_empty())
            .or_else(|| {
                folder
                    .file_name()
                    .and_then(|n| parse_kohya_folder_name(&n.to_string_lossy()))
                    .map(|k| k.caption)
            });
        let Some(prompt) = prompt else {
            bail!(
                "`{key}.caption`: generating class images needs the class prompt, e.g. caption = \"a photo of a dog\" (or --class-prompt)"
            );
        };
        plans.push(ClassImagePlan {
            subset: i,
            existing: count_images(&folder, &s.caption_extension)?,
            folder,
            prompt,
            wanted,
        });
    }
    Ok(plans)
}

fn has_kohya_subfolders(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        e.path().is_dir() && parse_kohya_folder_name(&e.file_name().to_string_lossy()).is_some()
    })
}

/// Image files directly in `dir` (0 when it does not exist yet).
fn count_images(dir: &Path, caption_extension: &str) -> Result<usize> {
    if !dir.exists() {
        return Ok(0);
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot read the class folder {}: {e}", dir.display()))?;
    Ok(entries
        .flatten()
        .filter(|e| {
            e.path().is_file() && file_role(&e.path(), caption_extension) == FileRole::Image
        })
        .count())
}

/// The generation request of class image `n` (0-based, counting the images
/// already in the folder) of `plan`.
pub fn class_request(
    cfg: &TrainConfig,
    plan: &ClassImagePlan,
    n: usize,
) -> Result<GenerateRequest> {
    let o = &cfg.output;
    let mut rng = Rng::derive(&[cfg.train.seed, CLASS_STREAM, plan.subset as u64, n as u64]);
    Ok(GenerateRequest {
        prompt: plan.prompt.clone(),
        negative_prompt: o.sample_negative_prompt.clone(),
        sampler: parse_sampler("output.sample_sampler", &o.sample_sampler)?,
        steps: o.sample_steps,
        cfg_scale: o.sample_cfg,
        // Below 2^32, like A1111's seeds, so they can be typed into any UI.
        seed: rng.next_u64() >> 32,
        width: cfg.dataset.resolution,
        height: cfg.dataset.resolution,
        clip_skip: cfg.model.clip_skip,
    })
}

/// The next free `class-NNNN.png` in `dir`, numbering after the highest one
/// there.
fn next_free(dir: &Path, from: &mut usize) -> PathBuf {
    loop {
        let p = dir.join(format!("class-{:04}.png", *from));
        *from += 1;
        if !p.exists() {
            return p;
        }
    }
}

/// The first number after every `class-NNNN.*` file in `dir`.
fn first_number(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let digits = name.strip_prefix("class-")?.split('.').next()?.to_string();
            digits.parse::<usize>().ok()
        })
        .map(|n| n + 1)
        .max()
        .unwrap_or(0)
}

/// Generates the missing images of `plan` with `sd` (the base model, no
/// LoRA) and returns the files written. `on_image(done, total)` is called
/// before each image and `on_step(step, steps)` after each sampler step;
/// `stop()` is asked between images (the images written so far stay).
#[allow(clippy::too_many_arguments)]
pub fn generate_class_images(
    cfg: &TrainConfig,
    plan: &ClassImagePlan,
    sd: &StableDiffusion,
    sampler: &SamplerConfig,
    model: &ModelLabel,
    on_image: &mut dyn FnMut(usize, usize),
    on_step: &mut dyn FnMut(usize, usize),
    stop: &dyn Fn() -> bool,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&plan.folder).map_err(|e| {
        anyhow::anyhow!(
            "cannot create the class folder {}: {e}",
            plan.folder.display()
        )
    })?;
    let missing = plan.missing();
    let mut number = first_number(&plan.folder);
    let mut files = Vec::with_capacity(missing);
    for i in 0..missing {
        if stop() {
            break;
        }
        on_image(i, missing);
        let req = class_request(cfg, plan, plan.existing + i)?;
        let image = generate(sd, sampler, &req, on_step)?;
        let path = next_free(&plan.folder, &mut number);
        png_meta::write_png(&path, &image, &req.params(model, Vec::new()))?;
        files.push(path);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_lora_data::SubsetConfig;

    fn config(dir: &Path, n: Option<usize>, caption: Option<&str>) -> TrainConfig {
        let mut cfg = TrainConfig::default();
        let mut s = SubsetConfig::new(dir, SubsetKind::Class);
        s.num_class_images = n;
        s.caption = caption.map(str::to_string);
        cfg.dataset.subsets = vec![SubsetConfig::new("unused", SubsetKind::Instance), s];
        cfg
    }

    #[test]
    fn plans_count_images_and_need_a_prompt() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dogs");
        let cfg = config(&dir, Some(3), Some("a photo of a dog"));
        let plans = plan_class_images(&cfg).unwrap();
        assert_eq!(plans.len(), 1);
        assert_eq!((plans[0].existing, plans[0].missing()), (0, 3));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["a.png", "b.JPG", "a.txt", ".c.png"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        let plans = plan_class_images(&cfg).unwrap();
        assert_eq!((plans[0].existing, plans[0].missing()), (2, 1));

        let e = plan_class_images(&config(&dir, Some(3), None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("dataset.subsets[1].caption"), "{e}");
        // A kohya-named folder gives its caption.
        let k = tmp.path().join("1_a dog");
        let plans = plan_class_images(&config(&k, Some(1), None)).unwrap();
        assert_eq!(plans[0].prompt, "a dog");
        assert!(
            plan_class_images(&config(&dir, None, None))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn numbering_never_overwrites() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        assert_eq!(first_number(dir), 0);
        std::fs::write(dir.join("class-0004.png"), b"x").unwrap();
        std::fs::write(dir.join("class-x.png"), b"x").unwrap();
        let mut n = first_number(dir);
        assert_eq!(n, 5);
        std::fs::write(dir.join("class-0005.png"), b"x").unwrap();
        assert_eq!(next_free(dir, &mut n), dir.join("class-0006.png"));
    }

    #[test]
    fn seeds_differ_per_image_and_repeat_per_config() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), Some(2), Some("a dog"));
        let plan = &plan_class_images(&cfg).unwrap()[0];
        let a = class_request(&cfg, plan, 0).unwrap();
        let b = class_request(&cfg, plan, 1).unwrap();
        assert_ne!(a.seed, b.seed);
        assert_eq!(a, class_request(&cfg, plan, 0).unwrap());
        assert!(a.seed < 1 << 32);
        assert_eq!((a.width, a.prompt.as_str()), (512, "a dog"));
    }
}
