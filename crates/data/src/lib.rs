//! # sd-lora-data
//!
//! Turns the image folders artists already have into training samples.
//!
//! - [`config`]: the `[dataset]` options (each defined once, with its docs).
//! - [`folder`]: kohya `N_caption` folder names and which files are images or captions.
//! - [`caption`]: caption-file rules and seeded caption operations.
//! - [`decode`]: robust decoding of any image file to upright 8-bit RGB.
//! - [`bucket`]: aspect-ratio buckets (kohya's list) and crop geometry.
//! - [`scan`]: scanning folders into a [`Dataset`] with a [`Problem`] per bad file.
//! - [`sample`]: epoch order, batches within a bucket, and sample loading.
//! - [`report`]: the summary `sd-lora check-data` prints, as data.
//!
//! Nothing in a user's folder can panic this crate or stop a scan: broken
//! files become problem records and good files are all used. The crate knows
//! nothing of models; samples are plain `f32` buffers in CHW layout.

pub mod bucket;
pub mod caption;
pub mod config;
pub mod decode;
pub mod folder;
pub mod problem;
pub mod report;
pub mod rng;
pub mod sample;
pub mod scan;

pub use config::{CropMode, DatasetConfig, Layout, SubsetConfig, SubsetKind};
pub use problem::{Problem, Severity};
pub use sample::{BatchPlan, EpochIter, Sample};
pub use scan::{CaptionSource, Dataset, ImageEntry, MaskSource, Subset};
