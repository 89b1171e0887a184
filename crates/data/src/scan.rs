//! Scanning the configured folders into a [`Dataset`]: which images exist,
//! what each one's caption is, which bucket it trains in, and every problem
//! found on the way.
//!
//! The scan never stops at a bad file: it records a [`Problem`] and goes on.
//! Images are decoded fully (in parallel, results in file order) so that
//! truncated or mislabelled files are caught now rather than mid-training.

use crate::bucket::{Bucket, Bucketing, crop_geometry};
use crate::caption::{CaptionFile, CaptionOps, read_caption_file};
use crate::config::{ConfigError, CropMode, DatasetConfig, Layout, SubsetConfig, SubsetKind};
use crate::decode::decode_image;
use crate::folder::{FileRole, file_role, parse_kohya_folder_name};
use crate::problem::Problem;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where an image's caption came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptionSource {
    /// A caption file next to the image.
    File,
    /// The caption part of an `N_caption` folder name.
    Folder,
    /// The subset's configured caption (instance or class prompt).
    Prompt,
    /// Nothing: the image trains with an empty caption.
    None,
}

/// One folder of images with its options, as resolved from the config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Subset {
    /// The folder.
    #[serde(serialize_with = "crate::problem::serialize_path_lossy")]
    pub path: PathBuf,
    /// Instance or class images.
    pub kind: SubsetKind,
    /// Times each image is seen per epoch.
    pub repeats: u32,
    /// Caption for images without a caption file, and where it came from.
    pub fallback_caption: Option<String>,
    /// [`CaptionSource::Folder`] or [`CaptionSource::Prompt`] for the fallback.
    pub fallback_source: CaptionSource,
    /// Index of the `[[dataset.subsets]]` entry this came from.
    pub config_index: usize,
    /// Preferred caption extension.
    pub caption_extension: String,
    /// Caption operations applied when samples are drawn.
    #[serde(skip)]
    pub caption_ops: CaptionOps,
    /// Random horizontal flips.
    pub flip: bool,
    /// Loss weight of this subset's samples.
    pub loss_weight: f32,
    /// Usable images found.
    pub images: usize,
    /// Captions read from files, by extension.
    pub captions_by_extension: BTreeMap<String, usize>,
    /// Images captioned from the folder name or prompt.
    pub fallback_captions: usize,
    /// Images with no caption at all.
    pub uncaptioned: usize,
}

/// One usable image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageEntry {
    /// The image file.
    #[serde(serialize_with = "crate::problem::serialize_path_lossy")]
    pub path: PathBuf,
    /// Width in pixels after EXIF rotation.
    pub width: u32,
    /// Height in pixels after EXIF rotation.
    pub height: u32,
    /// The caption before caption operations.
    pub caption: String,
    /// Where the caption came from.
    pub caption_source: CaptionSource,
    /// Index into [`Dataset::subsets`].
    pub subset: usize,
    /// The bucket it trains in, `[width, height]`.
    pub bucket: Bucket,
    /// The caption file read, if any.
    #[serde(skip)]
    pub caption_file: Option<PathBuf>,
    /// Where its loss mask comes from, if it has one.
    pub mask: Option<MaskSource>,
}

/// Where an image's loss mask comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskSource {
    /// A grayscale `NAME-masklabel.*` file beside the image (white = trained).
    #[serde(serialize_with = "crate::problem::serialize_path_lossy")]
    File(PathBuf),
    /// The image's own alpha channel (`dataset.alpha_mask`).
    Alpha,
}

/// The scanned dataset: subsets, usable images and problems.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The (validated) config it was scanned from.
    pub config: DatasetConfig,
    /// How images are bucketed.
    pub bucketing: Bucketing,
    /// Concrete subsets (a kohya root expands into one per sub-folder).
    pub subsets: Vec<Subset>,
    /// Usable images, in subset then file-name order.
    pub images: Vec<ImageEntry>,
    /// Every problem found, sorted by path.
    pub problems: Vec<Problem>,
}

/// An image waiting to be decoded, with its caption file if any.
struct Candidate {
    subset: usize,
    image: PathBuf,
    caption_file: Option<PathBuf>,
    mask_file: Option<PathBuf>,
}

/// Images enlarged by more than this get a warning: they will look soft.
const UPSCALE_WARNING: f64 = 1.5;

impl Dataset {
    /// Validates `config` and scans its folders. Only an invalid config is an
    /// `Err`; every problem with files and folders is recorded in
    /// [`Dataset::problems`] instead.
    pub fn scan(config: &DatasetConfig) -> Result<Dataset, ConfigError> {
        config.validate()?;
        let mut problems = Vec::new();
        let mut subsets = Vec::new();
        for (i, sc) in config.subsets.iter().enumerate() {
            resolve_subset(config, i, sc, &mut subsets, &mut problems);
        }
        let mut candidates = Vec::new();
        for (si, s) in subsets.iter().enumerate() {
            list_subset(si, s, &mut candidates, &mut problems);
        }

        let background = config.background_rgb();
        let min_side = config.min_image_side;
        let bucketing = Bucketing::from_config(config);
        let results: Vec<(Option<ImageEntry>, Vec<Problem>)> = candidates
            .par_iter()
            .map(|c| {
                let alpha = config.alpha_mask;
                examine(
                    c,
                    &subsets[c.subset],
                    background,
                    min_side,
                    alpha,
                    &bucketing,
                )
            })
            .collect();

        let mut images = Vec::new();
        for (entry, probs) in results {
            problems.extend(probs);
            if let Some(e) = entry {
                let s = &mut subsets[e.subset];
                s.images += 1;
                match e.caption_source {
                    CaptionSource::File => {
                        let ext = e
                            .caption_file
                            .as_deref()
                            .and_then(Path::extension)
                            .map(|x| format!(".{}", x.to_string_lossy().to_ascii_lowercase()))
                            .unwrap_or_default();
                        *s.captions_by_extension.entry(ext).or_insert(0) += 1;
                    }
                    CaptionSource::Folder | CaptionSource::Prompt => s.fallback_captions += 1,
                    CaptionSource::None => s.uncaptioned += 1,
                }
                images.push(e);
            }
        }
        for s in &subsets {
            if s.images == 0 {
                problems.push(Problem::warning(
                    &s.path,
                    "no usable images in this folder; add PNG/JPEG/WebP images or remove it from the dataset",
                ));
            }
        }
        // Stable sort: a file's problems stay in the order they were found.
        problems.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Dataset {
            config: config.clone(),
            bucketing,
            subsets,
            images,
            problems,
        })
    }

    /// Whether there is anything to train on.
    pub fn has_images(&self) -> bool {
        !self.images.is_empty()
    }

    /// Number of images per bucket, counting repeats (what an epoch draws).
    pub fn bucket_histogram(&self) -> BTreeMap<Bucket, usize> {
        let mut h = BTreeMap::new();
        for e in &self.images {
            *h.entry(e.bucket).or_insert(0) += self.subsets[e.subset].repeats as usize;
        }
        h
    }

    /// Samples per epoch: every image times its subset's repeats.
    pub fn samples_per_epoch(&self) -> usize {
        self.images
            .iter()
            .map(|e| self.subsets[e.subset].repeats as usize)
            .sum()
    }
}

fn subset_from_config(
    config: &DatasetConfig,
    index: usize,
    sc: &SubsetConfig,
    path: PathBuf,
    folder_name: Option<crate::folder::KohyaFolderName>,
) -> Subset {
    let (fallback_caption, fallback_source) = match (&sc.caption, &folder_name) {
        (Some(c), _) => (Some(c.trim().to_string()), CaptionSource::Prompt),
        (None, Some(f)) if !f.caption.is_empty() => {
            (Some(f.caption.clone()), CaptionSource::Folder)
        }
        _ => (None, CaptionSource::None),
    };
    let loss_weight = sc.loss_weight.unwrap_or(match sc.kind {
        SubsetKind::Instance => 1.0,
        SubsetKind::Class => config.prior_loss_weight,
    });
    Subset {
        path,
        kind: sc.kind,
        repeats: sc
            .repeats
            .or(folder_name.as_ref().map(|f| f.repeats))
            .unwrap_or(1),
        fallback_caption: fallback_caption.filter(|c| !c.is_empty()),
        fallback_source,
        config_index: index,
        caption_extension: sc.caption_extension.to_ascii_lowercase(),
        caption_ops: CaptionOps {
            shuffle: sc.shuffle_caption,
            keep_tokens: sc.keep_tokens,
            caption_dropout_rate: sc.caption_dropout_rate,
            tag_dropout_rate: sc.caption_tag_dropout_rate,
        },
        flip: sc.flip,
        loss_weight,
        images: 0,
        captions_by_extension: BTreeMap::new(),
        fallback_captions: 0,
        uncaptioned: 0,
    }
}

/// Sorted directory entries, or a problem naming the folder.
fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let rd = std::fs::read_dir(dir).map_err(|e| e.to_string())?;
    let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    Ok(v)
}

fn has_images(dir: &Path) -> bool {
    read_dir_sorted(dir)
        .map(|v| {
            v.iter()
                .any(|p| p.is_file() && file_role(p, ".txt") == FileRole::Image)
        })
        .unwrap_or(false)
}

/// Turns one config entry into concrete subsets (several for a kohya root).
fn resolve_subset(
    config: &DatasetConfig,
    index: usize,
    sc: &SubsetConfig,
    out: &mut Vec<Subset>,
    problems: &mut Vec<Problem>,
) {
    let key = format!("dataset.subsets[{index}].path");
    let path = &sc.path;
    if !path.exists() {
        problems.push(Problem::error(
            path,
            format!("folder not found; check `{key}` (relative paths are relative to the current directory)"),
        ));
        return;
    }
    if !path.is_dir() {
        problems.push(Problem::error(
            path,
            format!(
                "this is a file, not a folder; `{key}` must name the folder that holds the images"
            ),
        ));
        return;
    }
    let entries = match read_dir_sorted(path) {
        Ok(e) => e,
        Err(e) => {
            problems.push(Problem::error(
                path,
                format!("cannot list the folder ({e}); check its permissions"),
            ));
            return;
        }
    };
    let subdirs: Vec<&PathBuf> = entries.iter().filter(|p| p.is_dir()).collect();
    let dir_name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let kohya_children = subdirs
        .iter()
        .filter(|d| parse_kohya_folder_name(&dir_name(d)).is_some())
        .count();
    let is_kohya_root = match sc.layout {
        Layout::Kohya => true,
        Layout::Images => false,
        Layout::Auto => kohya_children > 0,
    };
    if !is_kohya_root {
        let own_name = parse_kohya_folder_name(&dir_name(path));
        out.push(subset_from_config(
            config,
            index,
            sc,
            path.clone(),
            own_name,
        ));
        for d in subdirs {
            if !dir_name(d).starts_with('.') && has_images(d) {
                problems.push(Problem::warning(
                    d,
                    "sub-folder is not read: images are only taken from the subset folder itself; \
                     add this folder as its own subset, or name it `N_caption` to make the parent a kohya root",
                ));
            }
        }
        return;
    }
    if kohya_children == 0 {
        problems.push(Problem::error(
            path,
            "layout is `kohya` but no sub-folder is named `N_caption` (e.g. `10_ohwx dog`); rename the sub-folders or use layout = \"images\"",
        ));
        return;
    }
    for p in &entries {
        let name = dir_name(p);
        if name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            match parse_kohya_folder_name(&name) {
                Some(f) => out.push(subset_from_config(config, index, sc, p.clone(), Some(f))),
                None => problems.push(Problem::warning(
                    p,
                    format!(
                        "folder name is not `N_caption` (repeats, underscore, caption; e.g. `10_{}`); its images are not used — rename it to include the repeat count",
                        if name.is_empty() { "ohwx dog" } else { &name }
                    ),
                )),
            }
        } else if file_role(p, &sc.caption_extension) == FileRole::Image {
            problems.push(Problem::warning(
                p,
                "image directly in the kohya root is not used; move it into an `N_caption` sub-folder",
            ));
        }
    }
}

/// Lists one subset's folder: images with their caption files, and problems
/// with files that cannot be used.
fn list_subset(si: usize, s: &Subset, out: &mut Vec<Candidate>, problems: &mut Vec<Problem>) {
    let entries = match read_dir_sorted(&s.path) {
        Ok(e) => e,
        Err(e) => {
            problems.push(Problem::error(
                &s.path,
                format!("cannot list the folder ({e}); check its permissions"),
            ));
            return;
        }
    };
    let mut images = Vec::new();
    // stem → caption files (extension lower-case with dot, path)
    let mut captions: BTreeMap<String, Vec<(String, PathBuf)>> = BTreeMap::new();
    // image stem → mask file
    let mut masks: BTreeMap<String, PathBuf> = BTreeMap::new();
    for p in entries {
        if !p.is_file() {
            // `is_file` follows links: a link whose target is gone is neither
            // file nor folder, and would otherwise vanish without a word.
            if !p.is_dir() && file_role(&p, &s.caption_extension) == FileRole::Image {
                problems.push(Problem::error(
                    &p,
                    "broken link: its target does not exist; fix or remove the link",
                ));
            }
            continue;
        }
        match file_role(&p, &s.caption_extension) {
            FileRole::Image => images.push(p),
            FileRole::Mask(image_stem) => {
                if let Some(first) = masks.get(&image_stem) {
                    problems.push(Problem::warning(
                        &p,
                        format!(
                            "ignored: {} is already the mask of {image_stem}; remove one of the two",
                            file_name(first)
                        ),
                    ));
                } else {
                    masks.insert(image_stem, p);
                }
            }
            FileRole::Caption(ext) => {
                captions.entry(stem(&p)).or_default().push((ext, p));
            }
            FileRole::UnsupportedImage(what) => problems.push(Problem::error(
                &p,
                format!("{what} files cannot be read; convert it to PNG or JPEG"),
            )),
            FileRole::Other => {}
        }
    }
    let preference = |ext: &str| {
        if ext == s.caption_extension {
            0
        } else if ext == ".txt" {
            1
        } else {
            2
        }
    };
    let mut used_stems = std::collections::BTreeSet::new();
    for img in images {
        let st = stem(&img);
        let caption_file = captions.get(&st).and_then(|files| {
            let best = files.iter().min_by_key(|(ext, _)| preference(ext))?;
            for (_, other) in files.iter().filter(|(_, p)| *p != best.1) {
                problems.push(Problem::warning(
                    other,
                    format!(
                        "ignored: {} is used as the caption of {}; remove one of the two",
                        file_name(&best.1),
                        file_name(&img)
                    ),
                ));
            }
            Some(best.1.clone())
        });
        let mask_file = masks.remove(&st);
        used_stems.insert(st);
        out.push(Candidate {
            subset: si,
            image: img,
            caption_file,
            mask_file,
        });
    }
    for (st, p) in &masks {
        problems.push(Problem::warning(
            p,
            format!("mask has no image named {st}.png/.jpg/…; add the image or remove the mask"),
        ));
    }
    for (st, files) in &captions {
        if !used_stems.contains(st) {
            for (_, p) in files {
                problems.push(Problem::warning(
                    p,
                    format!(
                        "caption file has no image named {st}.png/.jpg/…; add the image or remove the caption"
                    ),
                ));
            }
        }
    }
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Decodes one image and reads its caption.
fn examine(
    c: &Candidate,
    subset: &Subset,
    background: [u8; 3],
    min_side: u32,
    alpha_mask: bool,
    bucketing: &Bucketing,
) -> (Option<ImageEntry>, Vec<Problem>) {
    let mut problems = Vec::new();
    let decoded = match decode_image(&c.image, background) {
        Ok(d) => d,
        Err(e) => {
            problems.push(Problem::error(&c.image, e.to_string()));
            return (None, problems);
        }
    };
    let (width, height) = decoded.rgb.dimensions();
    let had_alpha = decoded.had_alpha;
    drop(decoded);
    let mask = match &c.mask_file {
        Some(m) => match decode_image(m, [0, 0, 0]) {
            Ok(d) if d.rgb.dimensions() == (width, height) => Some(MaskSource::File(m.clone())),
            Ok(d) => {
                let (mw, mh) = d.rgb.dimensions();
                problems.push(Problem::error(
                    &c.image,
                    format!(
                        "its mask {} is {mw}×{mh} px and the image {width}×{height}: make the mask \
                         the image's size (the image is skipped, not trained unmasked)",
                        file_name(m)
                    ),
                ));
                return (None, problems);
            }
            Err(e) => {
                problems.push(Problem::error(
                    &c.image,
                    format!(
                        "its mask {} cannot be read ({e}); fix or remove the mask (the image is \
                         skipped, not trained unmasked)",
                        file_name(m)
                    ),
                ));
                return (None, problems);
            }
        },
        None if alpha_mask && had_alpha => Some(MaskSource::Alpha),
        None => None,
    };
    if width.min(height) < min_side {
        problems.push(Problem::error(
            &c.image,
            format!(
                "image is {width}×{height} px, smaller than dataset.min_image_side = {min_side}; use a larger image or lower min_image_side"
            ),
        ));
        return (None, problems);
    }
    let fallback = || match &subset.fallback_caption {
        Some(cap) => (cap.clone(), subset.fallback_source),
        None => (String::new(), CaptionSource::None),
    };
    let fallback_words = |f: &(String, CaptionSource)| match f.1 {
        CaptionSource::None => "an empty caption".to_string(),
        _ => format!("the {} caption \"{}\"", source_word(f.1), f.0),
    };
    let (caption, caption_source) = match &c.caption_file {
        None => fallback(),
        Some(cf) => match read_caption_file(cf) {
            CaptionFile::Text {
                caption,
                extra_lines,
            } => {
                if extra_lines > 0 {
                    problems.push(Problem::warning(
                        cf,
                        format!(
                            "caption has {} non-empty lines; only the first is used — join them with commas if all are meant",
                            extra_lines + 1
                        ),
                    ));
                }
                (caption, CaptionSource::File)
            }
            CaptionFile::Empty => {
                let f = fallback();
                problems.push(Problem::warning(
                    cf,
                    format!(
                        "caption file is empty; using {} instead",
                        fallback_words(&f)
                    ),
                ));
                f
            }
            CaptionFile::NotUtf8 { offset } => {
                let f = fallback();
                problems.push(Problem::warning(
                    cf,
                    format!(
                        "caption is not valid UTF-8 (bad byte at offset {offset}); using {} instead — re-save the file as UTF-8",
                        fallback_words(&f)
                    ),
                ));
                f
            }
            CaptionFile::Unreadable(e) => {
                let f = fallback();
                problems.push(Problem::warning(
                    cf,
                    format!(
                        "cannot read caption file ({e}); using {} instead",
                        fallback_words(&f)
                    ),
                ));
                f
            }
        },
    };
    if caption_source == CaptionSource::None && c.caption_file.is_none() {
        problems.push(Problem::warning(
            &c.image,
            "no caption: no caption file, folder caption or prompt; add a .txt file next to it or set the subset's `caption`",
        ));
    }
    let bucket = bucketing.assign(width, height);
    let geom = crop_geometry([width, height], bucket, CropMode::Center, |_| 0);
    let enlarge = f64::from(geom.resized[0]) / f64::from(width);
    if enlarge > UPSCALE_WARNING {
        problems.push(Problem::warning(
            &c.image,
            format!(
                "image is {width}×{height} px and will be enlarged ×{enlarge:.1} to fill its {}×{} bucket, which makes it soft; use a larger image, a lower resolution, or bucket_no_upscale = true",
                bucket[0], bucket[1]
            ),
        ));
    }
    (
        Some(ImageEntry {
            path: c.image.clone(),
            width,
            height,
            caption,
            caption_source,
            subset: c.subset,
            bucket,
            caption_file: c
                .caption_file
                .clone()
                .filter(|_| caption_source == CaptionSource::File),
            mask,
        }),
        problems,
    )
}

fn source_word(s: CaptionSource) -> &'static str {
    match s {
        CaptionSource::File => "file",
        CaptionSource::Folder => "folder",
        CaptionSource::Prompt => "prompt",
        CaptionSource::None => "empty",
    }
}
