//! `sd-lora merge`: LoRAs into a checkpoint (`--model`), or several LoRAs
//! into one (no `--model`). See `sd_lora_model::lora::merge`.

use anyhow::{Result, bail};
use clap::Args;
use sd_lora_model::load::{ModelSource, SourceFormat};
use sd_lora_model::lora::format::{
    BaseModelVersion, LoraFamily, Metadata, SaveDtype, read_lora, write_lora,
};
use sd_lora_model::lora::merge::{WeightedLora, merge_into_model, merge_loras, stored_targets};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::convert::FormatArg;
use crate::generate_cmd::parse_lora_arg;

/// Arguments of `merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The checkpoint to merge into (a single `.safetensors` file or a
    /// diffusers folder); without it, the LoRAs are merged into one LoRA.
    #[arg(long, value_name = "BASE")]
    pub model: Option<PathBuf>,
    /// A LoRA and its weight (default 1; negative subtracts). Repeat for
    /// several.
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]", required = true)]
    pub loras: Vec<String>,
    /// Where to write: a `.safetensors` file (a LoRA, or a merged single-file
    /// checkpoint), or a folder for a merged diffusers folder.
    #[arg(long, short, value_name = "OUT")]
    pub output: PathBuf,
    /// Merging LoRAs: cut every module to this rank by SVD (default: keep the
    /// concatenated ranks, which is exact).
    #[arg(long, value_name = "N")]
    pub rank: Option<usize>,
    /// Merging LoRAs: the format to write.
    #[arg(long, value_enum, default_value = "kohya", value_name = "FORMAT")]
    pub format: FormatArg,
    /// Print every module.
    #[arg(long)]
    pub verbose: bool,
    /// Replace OUT if it exists (never an input).
    #[arg(long)]
    pub force: bool,
}

/// Runs the command; returns the process exit code.
pub fn run(args: &MergeArgs) -> Result<u8> {
    let loras = args
        .loras
        .iter()
        .map(|a| parse_lora_arg(a))
        .collect::<Result<Vec<_>>>()?;
    let mut inputs: Vec<&Path> = loras.iter().map(|l| l.path.as_path()).collect();
    if let Some(model) = &args.model {
        inputs.push(model);
    }
    crate::output_guard::check_output(&args.output, &inputs, args.force)?;
    let described: Vec<String> = loras
        .iter()
        .map(|l| format!("{} ×{}", l.path.display(), l.scale))
        .collect();
    match &args.model {
        Some(model) => {
            if args.rank.is_some() {
                bail!("--rank is for merging LoRAs into one; it has no meaning with --model");
            }
            if model.to_string_lossy().starts_with("builtin:") {
                bail!(
                    "{}: a built-in model is built in code; merge needs a checkpoint file or \
                     diffusers folder",
                    model.display()
                );
            }
            let source = ModelSource::open(model)?;
            match source.format() {
                SourceFormat::SingleFile => crate::output_guard::require_safetensors(&args.output)?,
                _ => {
                    if args.output.extension().is_some_and(|e| e == "safetensors") {
                        bail!(
                            "{} is a diffusers folder: the merged model is a folder too; give \
                             --output a folder name",
                            model.display()
                        );
                    }
                }
            }
            let targets = stored_targets(&source)?;
            let mut weighted = Vec::new();
            for l in &loras {
                let file = crate::lora_fit::read_fitting(
                    &l.path,
                    &targets,
                    &l.path.display().to_string(),
                    &format!("{} ({} model)", model.display(), source.architecture()),
                )?;
                weighted.push(WeightedLora {
                    file,
                    weight: l.scale as f32,
                });
            }
            let report = merge_into_model(&source, &weighted, &args.output)?;
            let mut out = String::new();
            if args.verbose {
                for f in &report.files_written {
                    let _ = writeln!(out, "wrote {}", f.display());
                }
            }
            for s in &report.skipped {
                let _ = writeln!(
                    out,
                    "left out {} (weights sd-lora does not load; they would be unmerged)",
                    s.display()
                );
            }
            let _ = writeln!(
                out,
                "merged {} into {} layers of {} ({}); wrote {}",
                described.join(" + "),
                report.layers,
                model.display(),
                source.architecture(),
                args.output.display()
            );
            crate::emit(&out)?;
        }
        None => {
            crate::output_guard::require_safetensors(&args.output)?;
            if args.rank == Some(0) {
                bail!("--rank must be at least 1");
            }
            let mut weighted = Vec::new();
            for l in &loras {
                weighted.push(WeightedLora {
                    file: read_lora(&l.path)?,
                    weight: l.scale as f32,
                });
            }
            let (weights, stats) = merge_loras(&weighted, args.rank)?;
            let first = &weighted[0].file;
            let mut meta = Metadata::from_map(&first.metadata);
            if first.family == LoraFamily::Sdxl {
                meta.base_model = Some(BaseModelVersion::SdxlBase);
            }
            meta.extra.insert(
                "ss_training_comment".into(),
                format!(
                    "merged by sd-lora: {}{}",
                    described.join(" + "),
                    args.rank.map(|r| format!(", rank {r}")).unwrap_or_default()
                ),
            );
            let meta = meta.with_network_of(&weights);
            write_lora(
                &args.output,
                &weights,
                args.format.write_format(),
                &meta.to_map(),
                SaveDtype::for_dtype(first.dtype),
            )?;
            let mut out = String::new();
            if args.verbose {
                for ((component, path), s) in &stats {
                    let _ = writeln!(
                        out,
                        "{component:?} {path}: {} file(s), rank {} → {}, Frobenius norm kept {:.2} %",
                        s.sources,
                        s.concatenated_rank,
                        s.rank,
                        100.0 * s.fro_kept
                    );
                }
            }
            let shared = stats.values().filter(|s| s.sources > 1).count();
            let lowest = stats
                .values()
                .map(|s| s.fro_kept)
                .fold(f64::INFINITY, f64::min);
            let _ = writeln!(
                out,
                "merged {} into one LoRA: {} modules ({} in more than one file){}; wrote {}",
                described.join(" + "),
                stats.len(),
                shared,
                match args.rank {
                    Some(r) => format!(
                        ", rank {r} by SVD (lowest share of a module's norm kept {:.2} %)",
                        100.0 * if lowest.is_finite() { lowest } else { 1.0 }
                    ),
                    None => ", ranks concatenated (exact)".into(),
                },
                args.output.display()
            );
            crate::emit(&out)?;
        }
    }
    Ok(0)
}
