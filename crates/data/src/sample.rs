//! Drawing training samples: the epoch order, batches within one bucket,
//! and loading one sample (resize, crop, flip, caption ops) as a CHW tensor
//! in [-1, 1].
//!
//! Everything random is derived from `(seed, epoch, batch, position)`, so a
//! run can be resumed at any batch and samples can be loaded in parallel
//! without changing a single bit.

use crate::bucket::{Bucket, CropGeometry, crop_geometry};
use crate::config::SubsetKind;
use crate::decode::{decode_image, decode_mask};
use crate::problem::Problem;
use crate::rng::Rng;
use crate::scan::{Dataset, MaskSource};
use image::imageops::{self, FilterType};
use image::{ImageBuffer, Pixel};
use rayon::prelude::*;
use std::collections::BTreeMap;

/// Stream tags, so the order and the per-sample streams never coincide.
const ORDER_STREAM: u64 = 0x006F_7264_6572;
const SAMPLE_STREAM: u64 = 0x7361_6D70_6C65;

/// One batch of an epoch: image indices (with repeats) that share a bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    /// The bucket all items train at.
    pub bucket: Bucket,
    /// Indices into [`Dataset::images`].
    pub items: Vec<usize>,
}

/// One training sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Index into [`Dataset::images`].
    pub image: usize,
    /// Pixels in [-1, 1], channel-major: `[3, height, width]` flattened;
    /// empty for a sample drawn without its image ([`Dataset::draw_batch`]).
    pub pixels: Vec<f32>,
    /// Width in pixels (the bucket width).
    pub width: u32,
    /// Height in pixels (the bucket height).
    pub height: u32,
    /// Caption after caption operations.
    pub caption: String,
    /// Instance or class sample.
    pub kind: SubsetKind,
    /// Weight of this sample's loss.
    pub loss_weight: f32,
    /// Where the crop came from, for latent caching.
    pub crop: CropGeometry,
    /// Whether the image was mirrored.
    pub flipped: bool,
}

impl Sample {
    /// Tensor shape `[channels, height, width]`.
    pub fn shape(&self) -> [usize; 3] {
        [3, self.height as usize, self.width as usize]
    }
}

impl Dataset {
    /// The batches of epoch `epoch` (0-based): every image `repeats` times,
    /// grouped by bucket, shuffled within each bucket, cut into batches of at
    /// most `batch_size`, and the batches shuffled. The last batch of a bucket
    /// may be smaller.
    pub fn epoch_batches(&self, epoch: u64, batch_size: usize, seed: u64) -> Vec<BatchPlan> {
        self.epoch_batches_of(None, epoch, batch_size, seed)
    }

    /// [`Dataset::epoch_batches`] over the images of one kind only (`None`:
    /// all). DreamBooth with prior preservation draws an instance batch and a
    /// class batch every step, each from its own epoch order.
    pub fn epoch_batches_of(
        &self,
        kind: Option<SubsetKind>,
        epoch: u64,
        batch_size: usize,
        seed: u64,
    ) -> Vec<BatchPlan> {
        let batch_size = batch_size.max(1);
        let stream = match kind {
            None => 0,
            Some(SubsetKind::Instance) => 1,
            Some(SubsetKind::Class) => 2,
        };
        let mut rng = if stream == 0 {
            Rng::derive(&[seed, ORDER_STREAM, epoch])
        } else {
            Rng::derive(&[seed, ORDER_STREAM, epoch, stream])
        };
        let mut by_bucket: BTreeMap<Bucket, Vec<usize>> = BTreeMap::new();
        for (i, e) in self.images.iter().enumerate() {
            let subset = &self.subsets[e.subset];
            if kind.is_some_and(|k| k != subset.kind) {
                continue;
            }
            let reps = subset.repeats as usize;
            by_bucket
                .entry(e.bucket)
                .or_default()
                .extend(std::iter::repeat_n(i, reps));
        }
        let mut batches = Vec::new();
        for (bucket, mut items) in by_bucket {
            rng.shuffle(&mut items);
            for chunk in items.chunks(batch_size) {
                batches.push(BatchPlan {
                    bucket,
                    items: chunk.to_vec(),
                });
            }
        }
        rng.shuffle(&mut batches);
        batches
    }

    /// Number of batches per epoch over the images of one kind (`None`: all).
    pub fn batches_per_epoch_of(&self, kind: Option<SubsetKind>, batch_size: usize) -> usize {
        let batch_size = batch_size.max(1);
        let mut per_bucket: BTreeMap<Bucket, usize> = BTreeMap::new();
        for e in &self.images {
            let subset = &self.subsets[e.subset];
            if kind.is_some_and(|k| k != subset.kind) {
                continue;
            }
            *per_bucket.entry(e.bucket).or_insert(0) += subset.repeats as usize;
        }
        per_bucket.values().map(|n| n.div_ceil(batch_size)).sum()
    }

    /// Iterates over the batches of epoch `epoch`, loading each one; see
    /// [`Dataset::epoch_batches`] for the order. Start at batch `skip` to
    /// resume a run mid-epoch with exactly the samples it would have drawn.
    pub fn iter_epoch(
        &self,
        epoch: u64,
        batch_size: usize,
        seed: u64,
        skip: usize,
    ) -> EpochIter<'_> {
        EpochIter {
            dataset: self,
            plans: self.epoch_batches(epoch, batch_size, seed),
            next: skip,
            epoch,
            seed,
        }
    }

    /// Number of batches in every epoch.
    pub fn batches_per_epoch(&self, batch_size: usize) -> usize {
        self.batches_per_epoch_of(None, batch_size)
    }

    /// Loads the samples of one batch in parallel (deterministically).
    pub fn load_batch(
        &self,
        plan: &BatchPlan,
        seed: u64,
        epoch: u64,
        batch_index: u64,
    ) -> Result<Vec<Sample>, Problem> {
        plan.items
            .par_iter()
            .enumerate()
            .map(|(pos, &image)| {
                self.load_sample(image, &mut sample_rng(seed, epoch, batch_index, pos))
            })
            .collect()
    }

    /// The samples of one batch as [`Dataset::load_batch`] draws them — the
    /// same crops, flips and captions — without decoding a single image:
    /// their `pixels` are empty. For a run whose latents are all cached.
    pub fn draw_batch(
        &self,
        plan: &BatchPlan,
        seed: u64,
        epoch: u64,
        batch_index: u64,
    ) -> Vec<Sample> {
        plan.items
            .iter()
            .enumerate()
            .map(|(pos, &image)| {
                self.draw_sample(image, &mut sample_rng(seed, epoch, batch_index, pos))
            })
            .collect()
    }

    /// Loads one image as a sample: decode, resize to cover its bucket, crop
    /// (centre or random), maybe flip, apply caption operations.
    pub fn load_sample(&self, image: usize, rng: &mut Rng) -> Result<Sample, Problem> {
        let mut sample = self.draw_sample(image, rng);
        sample.pixels = self.render(image, sample.crop, sample.flipped)?;
        Ok(sample)
    }

    /// The sample [`Dataset::load_sample`] would load with `rng` (it draws the
    /// same numbers), with empty `pixels`.
    pub fn draw_sample(&self, image: usize, rng: &mut Rng) -> Sample {
        let entry = &self.images[image];
        let subset = &self.subsets[entry.subset];
        let crop = crop_geometry(
            [entry.width, entry.height],
            entry.bucket,
            self.config.crop,
            |range| rng.below(u64::from(range) + 1) as u32,
        );
        let flipped = subset.flip && rng.chance(0.5);
        let caption = subset.caption_ops.apply(&entry.caption, rng);
        self.sample_without_pixels(image, crop, flipped, caption)
    }

    /// The sample of `image` with a centred crop, mirrored when `flipped`, its
    /// caption as written (no caption operations): with `crop = "center"`
    /// every sample training draws of this image has the pixels of one of
    /// these two, so caching their latents before training covers the run.
    pub fn load_variant(&self, image: usize, flipped: bool) -> Result<Sample, Problem> {
        let entry = &self.images[image];
        let crop = crop_geometry(
            [entry.width, entry.height],
            entry.bucket,
            crate::config::CropMode::Center,
            |_| 0,
        );
        let mut sample = self.sample_without_pixels(image, crop, flipped, entry.caption.clone());
        sample.pixels = self.render(image, crop, flipped)?;
        Ok(sample)
    }

    fn sample_without_pixels(
        &self,
        image: usize,
        crop: CropGeometry,
        flipped: bool,
        caption: String,
    ) -> Sample {
        let subset = &self.subsets[self.images[image].subset];
        Sample {
            image,
            pixels: Vec::new(),
            width: crop.size[0],
            height: crop.size[1],
            caption,
            kind: subset.kind,
            loss_weight: subset.loss_weight,
            crop,
            flipped,
        }
    }

    /// The loss mask of `sample` at its pixel size (`height × width`, row
    /// major, 1 = trained, 0 = not), cut and mirrored exactly as its pixels
    /// are; `None` for an image without a mask.
    pub fn load_mask(&self, sample: &Sample) -> Result<Option<Vec<f32>>, Problem> {
        let entry = &self.images[sample.image];
        let (path, alpha) = match &entry.mask {
            None => return Ok(None),
            Some(MaskSource::File(p)) => (p, false),
            Some(MaskSource::Alpha) => (&entry.path, true),
        };
        let mask = decode_mask(path, alpha).map_err(|e| {
            Problem::error(
                path,
                format!("mask changed since the dataset was scanned: {e}"),
            )
        })?;
        if mask.dimensions() != (entry.width, entry.height) {
            return Err(Problem::error(
                path,
                "mask changed size since the dataset was scanned; run again",
            ));
        }
        // Bilinear for a mask: Lanczos would ring around its edges.
        let cropped = cut(
            mask,
            [entry.width, entry.height],
            sample.crop,
            sample.flipped,
            FilterType::Triangle,
        );
        Ok(Some(
            cropped.pixels().map(|p| f32::from(p[0]) / 255.0).collect(),
        ))
    }

    /// Decodes `image` and cuts the crop `geom` out of it, mirrored when
    /// `flipped`: CHW pixels in [-1, 1].
    fn render(&self, image: usize, geom: CropGeometry, flipped: bool) -> Result<Vec<f32>, Problem> {
        let entry = &self.images[image];
        let decoded = decode_image(&entry.path, self.config.background_rgb()).map_err(|e| {
            Problem::error(
                &entry.path,
                format!("changed since the dataset was scanned: {e}"),
            )
        })?;
        let rgb = decoded.rgb;
        if rgb.dimensions() != (entry.width, entry.height) {
            return Err(Problem::error(
                &entry.path,
                "changed size since the dataset was scanned; run again",
            ));
        }
        let cropped = cut(
            rgb,
            [entry.width, entry.height],
            geom,
            flipped,
            FilterType::Lanczos3,
        );
        Ok(to_chw_unit(&cropped))
    }
}

/// Resizes `img` (of size `size`) as `geom` says with `filter`, cuts the
/// crop out of it and mirrors it when `flipped`: what a sample's pixels and
/// its mask both go through.
fn cut<P>(
    img: ImageBuffer<P, Vec<P::Subpixel>>,
    size: [u32; 2],
    geom: CropGeometry,
    flipped: bool,
    filter: FilterType,
) -> ImageBuffer<P, Vec<P::Subpixel>>
where
    P: Pixel + 'static,
    P::Subpixel: 'static,
{
    let resized = if geom.resized == size {
        img
    } else {
        imageops::resize(&img, geom.resized[0], geom.resized[1], filter)
    };
    let mut cropped = imageops::crop_imm(
        &resized,
        geom.offset[0],
        geom.offset[1],
        geom.size[0],
        geom.size[1],
    )
    .to_image();
    if flipped {
        imageops::flip_horizontal_in_place(&mut cropped);
    }
    cropped
}

/// The random stream of the sample at `pos` in batch `batch_index` of `epoch`.
fn sample_rng(seed: u64, epoch: u64, batch_index: u64, pos: usize) -> Rng {
    Rng::derive(&[seed, SAMPLE_STREAM, epoch, batch_index, pos as u64])
}

/// The batches of one epoch, loaded one at a time (see [`Dataset::iter_epoch`]).
pub struct EpochIter<'a> {
    dataset: &'a Dataset,
    plans: Vec<BatchPlan>,
    next: usize,
    epoch: u64,
    seed: u64,
}

impl Iterator for EpochIter<'_> {
    /// The batch index within the epoch and its samples, or the problem
    /// with a file that changed since the scan.
    type Item = (usize, Result<Vec<Sample>, Problem>);

    fn next(&mut self) -> Option<Self::Item> {
        let i = self.next;
        let plan = self.plans.get(i)?;
        self.next += 1;
        Some((
            i,
            self.dataset
                .load_batch(plan, self.seed, self.epoch, i as u64),
        ))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.plans.len().saturating_sub(self.next);
        (n, Some(n))
    }
}

impl ExactSizeIterator for EpochIter<'_> {}

/// 8-bit HWC RGB → f32 CHW in [-1, 1] (`v / 127.5 − 1`, as diffusers' `Normalize([0.5], [0.5])`).
pub fn to_chw_unit(img: &image::RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = f32::from(p[c]) / 127.5 - 1.0;
        }
    }
    out
}
