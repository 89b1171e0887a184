//! `sd-lora extract --base BASE --tuned TUNED --rank N --output OUT`: a LoRA
//! from the difference of two checkpoints. See
//! `sd_lora_model::lora::extract`.

use anyhow::{Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sd_lora_model::load::ModelSource;
use sd_lora_model::lora::LoraComponent;
use sd_lora_model::lora::extract::{ExtractOptions, extract};
use sd_lora_model::lora::format::{BaseModelVersion, Metadata, SaveDtype, write_lora};
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;

use crate::convert::FormatArg;

/// Arguments of `extract`.
#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// The original checkpoint (single `.safetensors` file or diffusers folder).
    #[arg(long, value_name = "BASE")]
    pub base: PathBuf,
    /// The fine-tuned checkpoint, same architecture.
    #[arg(long, value_name = "TUNED")]
    pub tuned: PathBuf,
    /// Rank of the Linear layers (and 1×1 convs).
    #[arg(long, value_name = "N")]
    pub rank: usize,
    /// Also extract the ResNet and sampler layers (LoCon), convs with this
    /// rank.
    #[arg(long, value_name = "N")]
    pub conv_rank: Option<usize>,
    /// A text encoder whose largest change is at most this is left out (it
    /// was not trained; kohya's default).
    #[arg(long, value_name = "X", default_value_t = 0.01)]
    pub min_diff: f32,
    /// Where to write the LoRA (`.safetensors`).
    #[arg(long, short, value_name = "OUT")]
    pub output: PathBuf,
    /// The format to write.
    #[arg(long, value_enum, default_value = "kohya", value_name = "FORMAT")]
    pub format: FormatArg,
    /// Save dtype of the LoRA tensors.
    #[arg(long, value_enum, default_value = "f16", value_name = "DTYPE")]
    pub save_dtype: SaveDtypeArg,
    /// Print every module's kept share of the update's Frobenius norm.
    #[arg(long)]
    pub verbose: bool,
    /// Replace OUT if it exists (never an input).
    #[arg(long)]
    pub force: bool,
}

/// `--save-dtype` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SaveDtypeArg {
    F16,
    Bf16,
    F32,
}

/// Runs the command; returns the process exit code.
pub fn run(args: &ExtractArgs) -> Result<u8> {
    crate::output_guard::require_safetensors(&args.output)?;
    crate::output_guard::check_output(&args.output, &[&args.base, &args.tuned], args.force)?;
    if args.rank == 0 || args.conv_rank == Some(0) {
        bail!("--rank and --conv-rank must be at least 1");
    }
    if !(args.min_diff.is_finite() && args.min_diff >= 0.0) {
        bail!("--min-diff must be a number ≥ 0");
    }
    for p in [&args.base, &args.tuned] {
        if p.to_string_lossy().starts_with("builtin:") {
            bail!(
                "{}: a built-in model is built in code; extract needs checkpoint files or \
                 diffusers folders",
                p.display()
            );
        }
    }
    let base = ModelSource::open(&args.base)?;
    let tuned = ModelSource::open(&args.tuned)?;
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("extracting {bar:30} {pos}/{len} layers, ETA {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let options = ExtractOptions {
        rank: args.rank,
        conv_rank: args.conv_rank,
        min_diff: args.min_diff,
    };
    let (weights, report) = extract(&base, &tuned, options, &mut |done, total, path| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(path.to_string());
    })?;
    bar.finish_and_clear();
    if weights.modules.is_empty() {
        bail!(
            "{} and {} have the same weights in every layer extract looks at: there is no \
             difference to extract",
            args.base.display(),
            args.tuned.display()
        );
    }
    let mut meta = Metadata {
        base_model: Some(BaseModelVersion::of_model(
            base.architecture(),
            base.prediction(),
        )),
        output_name: args
            .output
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned()),
        ..Metadata::default()
    };
    meta.extra.insert(
        "ss_training_comment".into(),
        format!(
            "extracted by sd-lora from {} (tuned) minus {} (base), rank {}{}",
            args.tuned.display(),
            args.base.display(),
            args.rank,
            args.conv_rank
                .map(|r| format!(", conv rank {r}"))
                .unwrap_or_default()
        ),
    );
    let meta = meta.with_network_of(&weights);
    let dtype = match args.save_dtype {
        SaveDtypeArg::F16 => SaveDtype::F16,
        SaveDtypeArg::Bf16 => SaveDtype::BF16,
        SaveDtypeArg::F32 => SaveDtype::F32,
    };
    write_lora(
        &args.output,
        &weights,
        args.format.write_format(),
        &meta.to_map(),
        dtype,
    )?;
    let mut out = String::new();
    if args.verbose {
        for m in &report.modules {
            let _ = writeln!(
                out,
                "{:?} {}: rank {}, Frobenius norm kept {:.2} %, largest change {:.3e}",
                m.component,
                m.path,
                m.rank,
                100.0 * m.fro_kept,
                m.max_diff
            );
        }
    }
    for (c, max) in &report.skipped_text_encoders {
        let name = match c {
            LoraComponent::TextEncoder2 => "the second text encoder",
            _ => "the text encoder",
        };
        let _ = writeln!(
            out,
            "left out {name}: its largest change is {max:.3e} (≤ --min-diff {}), so it was not \
             trained",
            args.min_diff
        );
    }
    let kept: Vec<f64> = report.modules.iter().map(|m| m.fro_kept).collect();
    let mean = kept.iter().sum::<f64>() / kept.len().max(1) as f64;
    let lowest = kept.iter().copied().fold(1.0, f64::min);
    let _ = writeln!(
        out,
        "wrote {} ({} modules; {} identical layers left out): Frobenius norm of the \
         difference kept: mean {:.2} %, lowest {:.2} %",
        args.output.display(),
        report.modules.len(),
        report.unchanged,
        100.0 * mean,
        100.0 * lowest
    );
    crate::emit(&out)?;
    Ok(0)
}
