//! `sd-lora check-data`: what will be trained on, and what is wrong with it.

use crate::config_file;
use anyhow::{Result, bail};
use clap::Args;
use sd_lora_data::report::Report;
use sd_lora_data::{CaptionSource, Dataset, Severity};
use std::fmt::Write;
use std::path::PathBuf;

/// Arguments of `check-data`.
#[derive(Debug, Args)]
pub struct CheckDataArgs {
    /// A kohya root (sub-folders named `N_caption`), a folder named
    /// `N_caption`, or a plain folder of images.
    #[arg(value_name = "PATH", required_unless_present = "config")]
    pub path: Option<PathBuf>,
    /// Read the `[dataset]` table of this TOML config instead of PATH.
    #[arg(long, value_name = "FILE", conflicts_with = "path")]
    pub config: Option<PathBuf>,
    /// Caption for PATH's images that have no caption file (sets `dataset.subsets[0].caption`).
    #[arg(long, value_name = "TEXT", requires = "path")]
    pub instance_prompt: Option<String>,
    /// A folder of class (prior-preservation) images, added as a class subset.
    #[arg(long, value_name = "DIR", requires = "path")]
    pub class_data: Option<PathBuf>,
    /// Caption for the class images (sets the class subset's `caption`).
    #[arg(long, value_name = "TEXT", requires = "class_data")]
    pub class_prompt: Option<String>,
    /// Training resolution (sets `dataset.resolution`).
    #[arg(long, value_name = "N")]
    pub resolution: Option<u32>,
    /// Set any config key, e.g. `--set dataset.bucket_no_upscale=true` (repeatable; see docs/config.md).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Exit with status 1 if there is any problem, warnings included.
    #[arg(long)]
    pub strict: bool,
    /// Also list every image with its size, bucket and caption.
    #[arg(long)]
    pub images: bool,
}

/// Runs the command; returns the process exit code.
pub fn run(args: &CheckDataArgs) -> Result<u8> {
    // Quick flags become `--set` overrides placed first, so explicit --set wins.
    let mut sets = Vec::new();
    let toml_str = |s: &str| toml::Value::String(s.to_string()).to_string();
    if let Some(p) = &args.path {
        if !p.exists() {
            bail!("{}: no such file or folder", p.display());
        }
        if !p.is_dir() {
            bail!(
                "{}: not a folder; give the folder that holds the images",
                p.display()
            );
        }
        sets.push(format!(
            "dataset.subsets[0].path={}",
            toml_str(&p.to_string_lossy())
        ));
        if let Some(t) = &args.instance_prompt {
            sets.push(format!("dataset.subsets[0].caption={}", toml_str(t)));
        }
        if let Some(c) = &args.class_data {
            sets.push(format!(
                "dataset.subsets[1].path={}",
                toml_str(&c.to_string_lossy())
            ));
            sets.push("dataset.subsets[1].kind=\"class\"".to_string());
            if let Some(t) = &args.class_prompt {
                sets.push(format!("dataset.subsets[1].caption={}", toml_str(t)));
            }
        }
    }
    if let Some(r) = args.resolution {
        sets.push(format!("dataset.resolution={r}"));
    }
    sets.extend(args.sets.iter().cloned());
    let (doc, base) = config_file::load_document(args.config.as_deref(), &sets)?;
    let origin = args
        .config
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "command-line options".to_string());
    let cfg = config_file::dataset_config(&doc, &base, &origin)?;
    let ds = Dataset::scan(&cfg)?;
    let report = Report::new(&ds);
    if args.json {
        crate::emit(&(serde_json::to_string_pretty(&report)? + "\n"))?;
    } else {
        crate::emit(&render(&ds, &report, args.images))?;
    }
    if !ds.has_images() {
        eprintln!(
            "error: no usable images found; {}",
            if report.problems.is_empty() {
                "put PNG/JPEG/WebP images in the folder (or N_caption sub-folders)".to_string()
            } else {
                "see the problems above".to_string()
            }
        );
        return Ok(1);
    }
    if args.strict && !report.problems.is_empty() {
        eprintln!(
            "error: --strict: {} problem(s) found",
            report.problems.len()
        );
        return Ok(1);
    }
    Ok(0)
}

/// `1 image`, `2 images`.
pub(crate) fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The human-readable report.
fn render(ds: &Dataset, r: &Report, list_images: bool) -> String {
    let mut o = String::new();
    let c = &ds.config;
    let _ = writeln!(
        o,
        "Dataset: {}, {}, {} per epoch",
        plural(r.subsets.len(), "subset", "subsets"),
        plural(r.summary.images, "image", "images"),
        plural(r.summary.samples_per_epoch, "sample", "samples"),
    );
    let _ = writeln!(
        o,
        "Resolution {}, {}\n",
        c.resolution,
        if !c.bucketing {
            "no bucketing (square resize and crop)".to_string()
        } else {
            format!(
                "aspect-ratio buckets (step {}, sides {}–{}{})",
                c.bucket_step,
                c.min_bucket_side(),
                c.max_bucket_side(),
                if c.bucket_no_upscale {
                    ", no upscale"
                } else {
                    ""
                }
            )
        }
    );
    let _ = writeln!(o, "Subsets");
    for (i, s) in r.subsets.iter().enumerate() {
        let mut caps: Vec<String> = s
            .caption_files
            .iter()
            .map(|(ext, n)| format!("{n} from {ext} files"))
            .collect();
        if s.fallback_captions > 0 {
            let from = match s.fallback_source {
                CaptionSource::Prompt => "the prompt",
                _ => "the folder name",
            };
            caps.push(format!("{} from {from}", s.fallback_captions));
        }
        if s.uncaptioned > 0 {
            caps.push(format!("{} without caption", s.uncaptioned));
        }
        let _ = writeln!(o, "  [{i}] {} ({})", s.path.display(), s.kind);
        let _ = writeln!(
            o,
            "      {} × {}, loss weight {}; captions: {}",
            plural(s.images, "image", "images"),
            plural(s.repeats as usize, "repeat", "repeats"),
            s.loss_weight,
            if caps.is_empty() {
                "none".to_string()
            } else {
                caps.join(", ")
            }
        );
        if let Some(f) = &s.fallback_caption {
            let _ = writeln!(
                o,
                "      caption for images without a caption file: \"{f}\""
            );
        }
        if s.masks > 0 {
            let _ = writeln!(
                o,
                "      loss masks: {} of {} (train.unmasked_weight sets the weight outside them)",
                s.masks, s.images
            );
        }
    }
    if !r.buckets.is_empty() {
        let _ = writeln!(o, "\nBuckets (width×height: samples per epoch)");
        let max = r.buckets.iter().map(|b| b.images).max().unwrap_or(1).max(1);
        for b in &r.buckets {
            let bar = "█".repeat((b.images * 30).div_ceil(max));
            let _ = writeln!(
                o,
                "  {:>9}  {:>5}  {bar}",
                format!("{}×{}", b.bucket[0], b.bucket[1]),
                b.images
            );
        }
    }
    if list_images && !r.images.is_empty() {
        let _ = writeln!(o, "\nImages");
        for im in &r.images {
            let src = serde_json::to_value(im.caption_source)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "  {}  {}×{} → {}×{}  [{src}] {}",
                im.path.display(),
                im.width,
                im.height,
                im.bucket[0],
                im.bucket[1],
                im.caption
            );
        }
    }
    let _ = write!(o, "\nProblems: ");
    if r.problems.is_empty() {
        let _ = writeln!(o, "none");
    } else {
        let _ = writeln!(
            o,
            "{}, {} (errors: file not used; warnings: used, but check it)",
            plural(r.summary.errors, "error", "errors"),
            plural(r.summary.warnings, "warning", "warnings")
        );
        for p in &r.problems {
            let tag = match p.severity {
                Severity::Error => "error  ",
                Severity::Warning => "warning",
            };
            let _ = writeln!(o, "  {tag} {}: {}", p.path.display(), p.message);
        }
    }
    o
}
