//! The dataset summary as plain data: what `sd-lora check-data --json` prints
//! and what its human-readable output is rendered from.

use crate::SubsetKind;
use crate::bucket::Bucket;
use crate::problem::{Problem, Severity, serialize_path_lossy};
use crate::scan::{CaptionSource, Dataset};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Everything known about a scanned dataset.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Totals.
    pub summary: Totals,
    /// One entry per concrete subset.
    pub subsets: Vec<SubsetReport>,
    /// Images per bucket (with repeats), largest area first.
    pub buckets: Vec<BucketCount>,
    /// Every usable image.
    pub images: Vec<ImageReport>,
    /// Every problem.
    pub problems: Vec<Problem>,
}

/// Totals over the dataset.
#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    /// Usable images.
    pub images: usize,
    /// Samples per epoch (images × repeats).
    pub samples_per_epoch: usize,
    /// Problems with severity error (files not used).
    pub errors: usize,
    /// Problems with severity warning.
    pub warnings: usize,
}

/// One subset.
#[derive(Debug, Clone, Serialize)]
pub struct SubsetReport {
    /// Folder.
    #[serde(serialize_with = "serialize_path_lossy")]
    pub path: PathBuf,
    /// instance or class.
    pub kind: SubsetKind,
    /// Repeats per epoch.
    pub repeats: u32,
    /// Usable images.
    pub images: usize,
    /// Captions from files, by extension.
    pub caption_files: BTreeMap<String, usize>,
    /// Images captioned by the folder name or prompt.
    pub fallback_captions: usize,
    /// The fallback caption, if any.
    pub fallback_caption: Option<String>,
    /// Where the fallback caption comes from: folder or prompt.
    pub fallback_source: CaptionSource,
    /// Images with no caption.
    pub uncaptioned: usize,
    /// Loss weight of its samples.
    pub loss_weight: f32,
    /// Images with a loss mask (a `-masklabel` file or, with
    /// `dataset.alpha_mask`, an alpha channel).
    pub masks: usize,
}

/// A bucket and how many samples per epoch it holds.
#[derive(Debug, Clone, Serialize)]
pub struct BucketCount {
    /// `[width, height]`.
    pub bucket: Bucket,
    /// Samples per epoch (with repeats).
    pub images: usize,
}

/// One usable image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageReport {
    /// File.
    #[serde(serialize_with = "serialize_path_lossy")]
    pub path: PathBuf,
    /// Width after EXIF rotation.
    pub width: u32,
    /// Height after EXIF rotation.
    pub height: u32,
    /// Caption (before caption operations).
    pub caption: String,
    /// file, folder, prompt or none.
    pub caption_source: CaptionSource,
    /// Index into `subsets`.
    pub subset: usize,
    /// `[width, height]` of its bucket.
    pub bucket: Bucket,
}

impl Report {
    /// Summarises a scanned dataset.
    pub fn new(ds: &Dataset) -> Report {
        let count = |s: Severity| ds.problems.iter().filter(|p| p.severity == s).count();
        let mut buckets: Vec<BucketCount> = ds
            .bucket_histogram()
            .into_iter()
            .map(|(bucket, images)| BucketCount { bucket, images })
            .collect();
        buckets.sort_by_key(|b| (std::cmp::Reverse(b.images), b.bucket));
        Report {
            summary: Totals {
                images: ds.images.len(),
                samples_per_epoch: ds.samples_per_epoch(),
                errors: count(Severity::Error),
                warnings: count(Severity::Warning),
            },
            subsets: ds
                .subsets
                .iter()
                .enumerate()
                .map(|(i, s)| SubsetReport {
                    path: s.path.clone(),
                    kind: s.kind,
                    repeats: s.repeats,
                    images: s.images,
                    caption_files: s.captions_by_extension.clone(),
                    fallback_captions: s.fallback_captions,
                    fallback_caption: s.fallback_caption.clone(),
                    fallback_source: s.fallback_source,
                    uncaptioned: s.uncaptioned,
                    loss_weight: s.loss_weight,
                    masks: ds
                        .images
                        .iter()
                        .filter(|e| e.subset == i && e.mask.is_some())
                        .count(),
                })
                .collect(),
            buckets,
            images: ds
                .images
                .iter()
                .map(|e| ImageReport {
                    path: e.path.clone(),
                    width: e.width,
                    height: e.height,
                    caption: e.caption.clone(),
                    caption_source: e.caption_source,
                    subset: e.subset,
                    bucket: e.bucket,
                })
                .collect(),
            problems: ds.problems.clone(),
        }
    }
}
