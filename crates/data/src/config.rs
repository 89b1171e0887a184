//! The dataset part of the configuration (`[dataset]` in a training TOML).
//!
//! Every option is defined here once, with its doc comment; the TOML keys,
//! the `--set dataset.KEY=VALUE` overrides and `docs/config.md` are all derived
//! from these structs (serde for the keys, schemars for the docs).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where the training images come from and how they become samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DatasetConfig {
    /// Image sets to train on. Each is an image folder, a kohya-style
    /// folder named `N_caption`, or a kohya root whose sub-folders are named
    /// `N_caption` (`N` = repeats per epoch). Write one `[[dataset.subsets]]`
    /// table per set.
    pub subsets: Vec<SubsetConfig>,
    /// Training resolution in pixels: square images are `resolution` ×
    /// `resolution`, and aspect-ratio buckets have at most that area. Left
    /// out: the model's native resolution (512 for SD1.x and SD2.x-base, 768
    /// for SD2.x-v, 1024 for SDXL, 64 for the built-in models); 512 where no
    /// model is known.
    pub resolution: u32,
    /// Aspect-ratio bucketing: keep each image's shape by training it at the
    /// bucket closest in aspect ratio, instead of cropping everything square.
    pub bucketing: bool,
    /// Bucket sides are multiples of this many pixels (64 as in kohya; must be a multiple of 8).
    pub bucket_step: u32,
    /// Smallest bucket side in pixels. Left out: half the resolution, rounded
    /// down to `bucket_step` and at least `bucket_step` (256 at 512 px, kohya's
    /// default; 512 at 1024 px).
    pub min_bucket_side: Option<u32>,
    /// Largest bucket side in pixels. Left out: twice the resolution, rounded
    /// down to `bucket_step` (1024 at 512 px, kohya's default; 2048 at 1024 px).
    pub max_bucket_side: Option<u32>,
    /// Never enlarge an image: each image gets a bucket no larger than itself
    /// (rounded down to `bucket_step`), still within the resolution's area.
    pub bucket_no_upscale: bool,
    /// How an image is cropped after being resized to cover its bucket.
    pub crop: CropMode,
    /// Images whose shorter side (after EXIF rotation) is below this many
    /// pixels are skipped with an error in the report.
    pub min_image_side: u32,
    /// Colour that transparent pixels are composited onto, as `#rrggbb`.
    pub background: String,
    /// Loss weight of class (prior-preservation) images relative to instance images.
    pub prior_loss_weight: f32,
    /// Use each image's alpha channel as its loss mask (kohya's
    /// `alpha_mask`): opaque pixels are trained, transparent ones count as
    /// much as `train.unmasked_weight` says. Images without alpha are
    /// trained whole. A grayscale `NAME-masklabel.png` beside an image
    /// (OneTrainer's masks: white is trained) is used whether or not this is
    /// on, and wins over the alpha channel.
    pub alpha_mask: bool,
    /// A kohya sd-scripts dataset config (the TOML given to kohya's
    /// `--dataset_config`: `[general]`, `[[datasets]]`,
    /// `[[datasets.subsets]]` with `image_dir`, `class_tokens`,
    /// `num_repeats`, `is_reg`, `caption_extension`, …) to train on. Its
    /// subsets and options are used as if written in this table; keys written
    /// here or given on the command line win. kohya options sd-lora does not
    /// use are listed as ignored when the config is read. `sd-lora train
    /// --config kohya.toml` reads such a file directly.
    pub kohya_config: Option<PathBuf>,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        DatasetConfig {
            subsets: Vec::new(),
            resolution: 512,
            bucketing: true,
            bucket_step: 64,
            min_bucket_side: None,
            max_bucket_side: None,
            bucket_no_upscale: false,
            crop: CropMode::Center,
            min_image_side: 64,
            background: "#ffffff".to_string(),
            prior_loss_weight: 1.0,
            alpha_mask: false,
            kohya_config: None,
        }
    }
}

/// One set of images with its own repeats, captions and options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubsetConfig {
    /// Folder holding the images (or, for a kohya root, the `N_caption` sub-folders).
    pub path: PathBuf,
    /// `instance` for the subject being learned, `class` for prior-preservation
    /// (regularisation) images of the plain class.
    #[serde(default)]
    pub kind: SubsetKind,
    /// How to read `path`: `auto` detects a kohya root (sub-folders named
    /// `N_caption`) or a plain image folder; `images` and `kohya` force one.
    #[serde(default)]
    pub layout: Layout,
    /// Times each image is seen per epoch. Defaults to the `N` of an
    /// `N_caption` folder name, else 1.
    #[serde(default)]
    pub repeats: Option<u32>,
    /// Caption for images without a caption file: the instance or class
    /// prompt, e.g. "a photo of ohwx dog". Defaults to the caption part of an
    /// `N_caption` folder name.
    #[serde(default)]
    pub caption: Option<String>,
    /// Extension of caption files next to the images. `.txt` and `.caption`
    /// are both looked for; this one is preferred when both exist.
    #[serde(default = "default_caption_extension")]
    pub caption_extension: String,
    /// Shuffle the comma-separated tags of each caption every time it is used.
    #[serde(default)]
    pub shuffle_caption: bool,
    /// Number of leading comma-separated tags kept in place (never shuffled or
    /// dropped), e.g. 1 to keep the identifier first.
    #[serde(default)]
    pub keep_tokens: usize,
    /// Probability (0–1) that a sample is trained with an empty caption.
    #[serde(default)]
    pub caption_dropout_rate: f64,
    /// Probability (0–1) that each tag after the first `keep_tokens` is dropped.
    #[serde(default)]
    pub caption_tag_dropout_rate: f64,
    /// Randomly mirror images horizontally (don't for asymmetric subjects or text).
    #[serde(default)]
    pub flip: bool,
    /// Loss weight of this subset. Defaults to 1 for instance images and to
    /// `dataset.prior_loss_weight` for class images.
    #[serde(default)]
    pub loss_weight: Option<f32>,
    /// Class subsets only: the number of class images prior preservation
    /// should have. When the folder holds fewer, `sd-lora train` first
    /// generates the missing ones with the base model (no LoRA) from this
    /// subset's `caption` (the class prompt) and saves them into the folder as
    /// `class-NNNN.png`, never overwriting; later runs find them and generate
    /// nothing. Unset: use the images that are there.
    #[serde(default)]
    pub num_class_images: Option<usize>,
}

fn default_caption_extension() -> String {
    ".txt".to_string()
}

impl SubsetConfig {
    /// A subset with every option at its default.
    pub fn new(path: impl Into<PathBuf>, kind: SubsetKind) -> Self {
        SubsetConfig {
            path: path.into(),
            kind,
            layout: Layout::Auto,
            repeats: None,
            caption: None,
            caption_extension: default_caption_extension(),
            shuffle_caption: false,
            keep_tokens: 0,
            caption_dropout_rate: 0.0,
            caption_tag_dropout_rate: 0.0,
            flip: false,
            loss_weight: None,
            num_class_images: None,
        }
    }
}

/// What a subset's images are for; the loss weights them differently.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SubsetKind {
    /// Images of the subject or style being learned.
    #[default]
    Instance,
    /// Prior-preservation images of the plain class ("a photo of a dog").
    Class,
}

impl std::fmt::Display for SubsetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SubsetKind::Instance => "instance",
            SubsetKind::Class => "class",
        })
    }
}

/// How a subset's folder is organised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// A kohya root if the folder has `N_caption` sub-folders, else an image folder.
    #[default]
    Auto,
    /// The folder's own images (sub-folders are not read).
    Images,
    /// A kohya root: every `N_caption` sub-folder is a subset of its own.
    Kohya,
}

/// How an image is cropped to its bucket after resizing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CropMode {
    /// Keep the middle of the image.
    #[default]
    Center,
    /// A random window, different every epoch (seeded).
    Random,
}

/// A config value that cannot be used, named by its key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{key}` = {value}: {reason}")]
pub struct ConfigError {
    /// Full key, e.g. `dataset.subsets[0].caption_dropout_rate`.
    pub key: String,
    /// The offending value as written.
    pub value: String,
    /// What is allowed.
    pub reason: String,
}

fn bad(key: impl Into<String>, value: impl ToString, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Parses `#rrggbb` (or `rrggbb`) into RGB bytes.
pub fn parse_hex_colour(s: &str) -> Option<[u8; 3]> {
    let hex = s.trim().trim_start_matches('#');
    if hex.len() != 6 || !hex.is_ascii() {
        return None;
    }
    let byte = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).ok();
    Some([byte(0)?, byte(2)?, byte(4)?])
}

impl DatasetConfig {
    /// The smallest bucket side in effect: `min_bucket_side`, or half the
    /// resolution rounded down to `bucket_step` (at least `bucket_step`).
    pub fn min_bucket_side(&self) -> u32 {
        self.min_bucket_side.unwrap_or_else(|| {
            let step = self.bucket_step.max(1);
            (self.resolution / 2 / step * step).max(self.bucket_step)
        })
    }

    /// The largest bucket side in effect: `max_bucket_side`, or twice the
    /// resolution rounded down to `bucket_step`.
    pub fn max_bucket_side(&self) -> u32 {
        self.max_bucket_side.unwrap_or_else(|| {
            let step = self.bucket_step.max(1);
            (self.resolution * 2 / step * step).max(self.bucket_step)
        })
    }

    /// Checks every value, so a bad one stops the run before any work,
    /// with a message naming the key and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.subsets.is_empty() {
            return Err(bad(
                "dataset.subsets",
                "[]",
                "no image folders given: add a [[dataset.subsets]] table with a `path`, or pass a folder on the command line",
            ));
        }
        if self.resolution < 64 || !self.resolution.is_multiple_of(8) {
            return Err(bad(
                "dataset.resolution",
                self.resolution,
                "must be a multiple of 8 and at least 64 (512 for SD1.x, 768 for SD2-768, 1024 for SDXL)",
            ));
        }
        if self.bucket_step == 0 || !self.bucket_step.is_multiple_of(8) {
            return Err(bad(
                "dataset.bucket_step",
                self.bucket_step,
                "must be a positive multiple of 8 (64 is usual)",
            ));
        }
        if self.bucketing {
            let (min, max) = (self.min_bucket_side(), self.max_bucket_side());
            if min < self.bucket_step {
                return Err(bad(
                    "dataset.min_bucket_side",
                    min,
                    format!("must be at least bucket_step ({})", self.bucket_step),
                ));
            }
            if min > self.resolution {
                return Err(bad(
                    "dataset.min_bucket_side",
                    min,
                    format!(
                        "must not exceed resolution ({}); leave it out to use half the resolution",
                        self.resolution
                    ),
                ));
            }
            if min > max {
                return Err(bad(
                    "dataset.min_bucket_side",
                    min,
                    format!("must not exceed max_bucket_side ({max})"),
                ));
            }
        }
        if parse_hex_colour(&self.background).is_none() {
            return Err(bad(
                "dataset.background",
                format!("{:?}", self.background),
                "must be a colour written #rrggbb, e.g. \"#ffffff\" for white",
            ));
        }
        if !(self.prior_loss_weight.is_finite() && self.prior_loss_weight >= 0.0) {
            return Err(bad(
                "dataset.prior_loss_weight",
                self.prior_loss_weight,
                "must be a number ≥ 0 (1.0 is usual)",
            ));
        }
        for (i, s) in self.subsets.iter().enumerate() {
            s.validate(&format!("dataset.subsets[{i}]"))?;
        }
        Ok(())
    }

    /// Background colour as RGB bytes (white when the string is invalid;
    /// [`DatasetConfig::validate`] rejects that case before any use).
    pub fn background_rgb(&self) -> [u8; 3] {
        parse_hex_colour(&self.background).unwrap_or([255, 255, 255])
    }
}

impl SubsetConfig {
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.path.as_os_str().is_empty() {
            return Err(bad(format!("{key}.path"), "\"\"", "must name a folder"));
        }
        if self.repeats == Some(0) {
            return Err(bad(
                format!("{key}.repeats"),
                0,
                "must be at least 1 (leave it out to take it from the folder name)",
            ));
        }
        let ext = &self.caption_extension;
        if !ext.starts_with('.') || ext.len() < 2 || ext.contains(['/', '\\']) {
            return Err(bad(
                format!("{key}.caption_extension"),
                format!("{ext:?}"),
                "must be a file extension with its dot, e.g. \".txt\" or \".caption\"",
            ));
        }
        for (name, v) in [
            ("caption_dropout_rate", self.caption_dropout_rate),
            ("caption_tag_dropout_rate", self.caption_tag_dropout_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(bad(
                    format!("{key}.{name}"),
                    v,
                    "must be a probability between 0 and 1",
                ));
            }
        }
        if let Some(w) = self.loss_weight
            && !(w.is_finite() && w >= 0.0)
        {
            return Err(bad(format!("{key}.loss_weight"), w, "must be a number ≥ 0"));
        }
        if let Some(n) = self.num_class_images
            && self.kind != SubsetKind::Class
        {
            return Err(bad(
                format!("{key}.num_class_images"),
                n,
                "only class subsets (kind = \"class\") get generated images; remove it or set kind = \"class\"",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_subset() -> DatasetConfig {
        DatasetConfig {
            subsets: vec![SubsetConfig::new("x", SubsetKind::Instance)],
            ..Default::default()
        }
    }

    #[test]
    fn defaults_validate_and_bad_values_name_their_key() {
        assert!(one_subset().validate().is_ok());
        let mut c = one_subset();
        c.subsets[0].caption_dropout_rate = 1.5;
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "dataset.subsets[0].caption_dropout_rate");
        let mut c = one_subset();
        c.background = "blue".into();
        assert_eq!(c.validate().unwrap_err().key, "dataset.background");
        let mut c = one_subset();
        c.resolution = 500;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("multiple of 8")
        );
        assert_eq!(
            DatasetConfig::default().validate().unwrap_err().key,
            "dataset.subsets"
        );
    }

    /// Left out, the bucket limits follow the resolution (kohya's 256–1024 at
    /// 512 px); given, they are used as they are and checked against it.
    #[test]
    fn bucket_limits_follow_the_resolution() {
        let mut c = one_subset();
        for (res, min, max) in [
            (512, 256, 1024),
            (1024, 512, 2048),
            (64, 64, 128),
            (96, 64, 192),
        ] {
            c.resolution = res;
            assert_eq!(
                (c.min_bucket_side(), c.max_bucket_side()),
                (min, max),
                "{res}"
            );
            assert!(c.validate().is_ok(), "{res}");
        }
        c.resolution = 64;
        c.min_bucket_side = Some(256);
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "dataset.min_bucket_side");
        assert!(e.to_string().contains("leave it out"), "{e}");
        c.min_bucket_side = Some(64);
        c.max_bucket_side = Some(64);
        assert!(c.validate().is_ok());
        assert_eq!((c.min_bucket_side(), c.max_bucket_side()), (64, 64));
    }

    #[test]
    fn hex_colours() {
        assert_eq!(parse_hex_colour("#ff8000"), Some([255, 128, 0]));
        assert_eq!(parse_hex_colour("000000"), Some([0, 0, 0]));
        assert_eq!(parse_hex_colour("#fff"), None);
        assert_eq!(parse_hex_colour("#ééé"), None);
    }
}
