//! The validation set: images the run never trains on, evaluated every few
//! steps at fixed timesteps with fixed noise, so its loss falls only when the
//! LoRA generalises (kohya's `validation_split` / `validate_every_n_steps`).
//!
//! Held-out images come from `train.validation_split` (a fraction of the
//! instance images, chosen by the seed) and/or `train.validation_dir` (a
//! folder scanned with the dataset's options). Their latents are encoded
//! before the caching pass releases the VAE encoder, and their captions
//! before the text encoder goes; with a trained text encoder the captions are
//! encoded again at each evaluation, through the LoRA.

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use sd_lora_data::rng::Rng;
use sd_lora_data::{Dataset, SubsetConfig, SubsetKind};
use sd_lora_model::conditioning::{SizeCond, TextConditioning};
use sd_lora_model::ops::checkpoint;
use sd_lora_model::pipeline::StableDiffusion;
use sd_lora_model::schedule::Prediction;

use crate::config::TrainConfig;

/// Timesteps of the fixed-noise evaluations: every validation image, and
/// [`crate::trainer::fixed_noise_loss`].
pub const VALIDATION_TIMESTEPS: [usize; 5] = [100, 300, 500, 700, 900];

/// Stream tags: which images are held out, and each image's crop and noise.
const SPLIT_STREAM: u64 = 0x7661_6C5F_7370;
const EVAL_STREAM: u64 = 0x7661_6C5F_6576;

/// The training images and the validation images of a run.
#[derive(Debug, Clone)]
pub struct Split {
    /// What the run trains on.
    pub train: Dataset,
    /// What it is evaluated on (None without validation).
    pub validation: Option<Dataset>,
    /// Instance images held out of training by `validation_split`.
    pub held_out: usize,
}

/// Splits `ds` as `cfg.train.validation_split` / `validation_dir` ask. The
/// held-out images are the same for the same seed and images; at least one
/// image is held out and at least one instance image stays for training.
pub fn split(cfg: &TrainConfig, ds: &Dataset) -> Result<Split> {
    let t = &cfg.train;
    let mut train = ds.clone();
    let mut validation: Option<Dataset> = None;
    let mut held_out = 0;
    if t.validation_split > 0.0 {
        let instance: Vec<usize> = ds
            .images
            .iter()
            .enumerate()
            .filter(|(_, e)| ds.subsets[e.subset].kind == SubsetKind::Instance)
            .map(|(i, _)| i)
            .collect();
        if instance.len() < 2 {
            bail!(
                "train.validation_split = {}: the dataset has {} instance image(s); holding some out \
                 needs at least 2 (or give train.validation_dir instead)",
                t.validation_split,
                instance.len()
            );
        }
        let n = ((instance.len() as f64 * t.validation_split).round() as usize)
            .clamp(1, instance.len() - 1);
        let mut order = instance;
        Rng::derive(&[t.seed, SPLIT_STREAM]).shuffle(&mut order);
        let mut out: Vec<usize> = order[..n].to_vec();
        out.sort_unstable();
        let mut val = ds.clone();
        val.images = out.iter().map(|&i| ds.images[i].clone()).collect();
        train.images = ds
            .images
            .iter()
            .enumerate()
            .filter(|(i, _)| out.binary_search(i).is_err())
            .map(|(_, e)| e.clone())
            .collect();
        held_out = n;
        validation = Some(val);
    }
    if let Some(dir) = &t.validation_dir {
        let mut dcfg = cfg.dataset.clone();
        let mut subset = SubsetConfig::new(dir.clone(), SubsetKind::Instance);
        // Images without a caption file take the instance prompt, as in
        // training.
        subset.caption = cfg
            .dataset
            .subsets
            .iter()
            .find(|s| s.kind == SubsetKind::Instance)
            .and_then(|s| s.caption.clone());
        dcfg.subsets = vec![subset];
        let scanned = Dataset::scan(&dcfg)
            .with_context(|| format!("train.validation_dir {}", dir.display()))?;
        if scanned.images.is_empty() {
            bail!(
                "train.validation_dir {}: no usable images (put PNG/JPEG/WebP images with their .txt \
                 captions there, or leave the option out)",
                dir.display()
            );
        }
        validation = Some(match validation {
            None => scanned,
            Some(mut v) => {
                // Images of the folder refer to its own subset, appended.
                let base = v.subsets.len();
                v.subsets.extend(scanned.subsets);
                v.images.extend(scanned.images.into_iter().map(|mut e| {
                    e.subset += base;
                    e
                }));
                v
            }
        });
    }
    Ok(Split {
        train,
        validation,
        held_out,
    })
}

/// The summed denoising MSE of `sd` on one image's `latents` (`[c, h, w]`)
/// at each of `timesteps`, with noise drawn from `rng` in that order: the
/// plain objective against the model's own target (ε or v), no weights.
pub(crate) fn denoising_mse(
    sd: &StableDiffusion,
    latents: &Tensor,
    text: &TextConditioning,
    size: &SizeCond,
    timesteps: &[usize],
    rng: &mut Rng,
    device: &Device,
) -> Result<f64> {
    let mut total = 0.0;
    for &t in timesteps {
        let t = t.min(sd.schedule.len() - 1);
        let eps = crate::noise::randn(latents.dims(), rng, device)?;
        let (a, b) = sd.schedule.coefficients(t);
        let noisy = ((latents * a)? + (&eps * b)?)?;
        let target = match sd.schedule.prediction {
            Prediction::Epsilon => eps,
            Prediction::V => ((&eps * a)? - (latents * b)?)?,
        };
        let tt = Tensor::from_vec(vec![t as f32], 1, device)?;
        let pred = sd.predict(&noisy.unsqueeze(0)?, &tt, text, std::slice::from_ref(size))?;
        let mse = (pred.to_dtype(DType::F32)?.squeeze(0)? - &target)?
            .sqr()?
            .mean_all()?
            .to_scalar::<f32>()?;
        total += f64::from(mse);
    }
    Ok(total)
}

/// One validation image, ready to evaluate.
#[derive(Debug)]
struct Item {
    latents: Tensor,
    caption: String,
    /// Its conditioning, when the text encoder is frozen.
    text: Option<TextConditioning>,
    size: SizeCond,
}

/// The validation images encoded, and how to evaluate a model on them.
#[derive(Debug)]
pub struct ValidationSet {
    items: Vec<Item>,
}

impl ValidationSet {
    /// Encodes every image of `ds` (one fixed crop each) with the VAE, and
    /// its caption unless `text_trained`. Call before the encoders are
    /// released.
    pub fn encode(
        cfg: &TrainConfig,
        ds: &Dataset,
        sd: &StableDiffusion,
        device: &Device,
        text_trained: bool,
        size_cond: &dyn Fn(&Dataset, &sd_lora_data::Sample) -> SizeCond,
    ) -> Result<Self> {
        checkpoint::no_grad(|| {
            let scaling = sd.vae_config.scaling_factor;
            let mut items = Vec::with_capacity(ds.images.len());
            for i in 0..ds.images.len() {
                let mut rng = Rng::derive(&[cfg.train.seed, EVAL_STREAM, i as u64]);
                let sample = ds
                    .load_sample(i, &mut rng)
                    .map_err(|p| anyhow::anyhow!("validation image {p}"))?;
                let latents = crate::latents::encode_latents(&sd.vae, scaling, &sample, device)?;
                let text = if text_trained {
                    None
                } else {
                    Some(crate::latents::encode_caption(
                        sd,
                        &sample.caption,
                        cfg.model.clip_skip,
                    )?)
                };
                items.push(Item {
                    latents,
                    caption: sample.caption.clone(),
                    text,
                    size: size_cond(ds, &sample),
                });
            }
            Ok(ValidationSet { items })
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The mean denoising MSE of `sd` (with its LoRA) over every image at
    /// [`VALIDATION_TIMESTEPS`], with noise fixed per image and timestep:
    /// the same draws at every evaluation, so values are comparable along the
    /// run.
    pub fn loss(&self, cfg: &TrainConfig, sd: &StableDiffusion, device: &Device) -> Result<f64> {
        checkpoint::no_grad(|| {
            let dtype = cfg.model.dtype.to_dtype();
            let mut total = 0.0;
            let mut count = 0usize;
            for (i, item) in self.items.iter().enumerate() {
                let text = match &item.text {
                    Some(t) => t.clone(),
                    None => crate::latents::encode_caption(sd, &item.caption, cfg.model.clip_skip)?,
                }
                .to_dtype(dtype)?;
                let mut rng = Rng::derive(&[cfg.train.seed, EVAL_STREAM, i as u64, 1]);
                total += denoising_mse(
                    sd,
                    &item.latents,
                    &text,
                    &item.size,
                    &VALIDATION_TIMESTEPS,
                    &mut rng,
                    device,
                )?;
                count += VALIDATION_TIMESTEPS.len();
            }
            if count == 0 {
                bail!("the validation set has no images");
            }
            Ok(total / count as f64)
        })
    }
}
