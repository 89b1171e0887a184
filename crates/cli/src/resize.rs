//! `sd-lora resize IN OUT --rank N | --dynamic RULE --param X`: a LoRA at
//! another rank, by SVD of each module (kohya's `resize_lora.py`).

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use sd_lora_model::lora::resize::{RankRule, resize_file};
use std::fmt::Write as _;
use std::path::PathBuf;

/// Arguments of `resize`.
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// The LoRA file to resize (kohya, PEFT or diffusers format).
    #[arg(value_name = "IN")]
    pub input: PathBuf,
    /// Where to write the resized LoRA (`.safetensors`, same format as IN).
    #[arg(value_name = "OUT")]
    pub output: PathBuf,
    /// The new rank; with `--dynamic`, the largest rank a module may keep.
    #[arg(long, value_name = "N")]
    pub rank: Option<usize>,
    /// Choose each module's rank from its singular values (kohya's
    /// `dynamic_method`): `sv_ratio` keeps values above σ₁/X, `sv_fro` keeps
    /// a share X of the Frobenius norm, `sv_cumulative` a share X of the sum.
    #[arg(long, value_enum, value_name = "RULE", requires = "param")]
    pub dynamic: Option<DynamicArg>,
    /// The parameter of `--dynamic` (e.g. `sv_fro` 0.9, `sv_ratio` 8).
    #[arg(long, value_name = "X", requires = "dynamic")]
    pub param: Option<f64>,
    /// Print every module's rank and kept share of the Frobenius norm.
    #[arg(long)]
    pub verbose: bool,
    /// Replace OUT if it exists (never IN).
    #[arg(long)]
    pub force: bool,
}

/// `--dynamic` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
#[allow(clippy::enum_variant_names)]
pub enum DynamicArg {
    /// Singular values above the largest divided by X.
    #[value(name = "sv_ratio")]
    SvRatio,
    /// The fewest values keeping a share X of the Frobenius norm.
    #[value(name = "sv_fro")]
    SvFro,
    /// The fewest values keeping a share X of their sum.
    #[value(name = "sv_cumulative")]
    SvCumulative,
}

/// Runs the command; returns the process exit code.
pub fn run(args: &ResizeArgs) -> Result<u8> {
    let rule = match (args.dynamic, args.param, args.rank) {
        (None, _, None) => bail!("give --rank N, or --dynamic RULE --param X (see --help)"),
        (None, _, Some(0)) => bail!("--rank must be at least 1"),
        (None, _, Some(k)) => RankRule::Fixed(k),
        (Some(d), Some(x), _) => {
            let ok = match d {
                DynamicArg::SvRatio => x > 1.0,
                DynamicArg::SvFro | DynamicArg::SvCumulative => x > 0.0 && x <= 1.0,
            };
            if !(x.is_finite() && ok) {
                bail!(
                    "--param {x}: sv_ratio takes a ratio above 1 (e.g. 8); sv_fro and sv_cumulative \
                     a share in (0, 1] (e.g. 0.9)"
                );
            }
            match d {
                DynamicArg::SvRatio => RankRule::SvRatio(x),
                DynamicArg::SvFro => RankRule::SvFro(x),
                DynamicArg::SvCumulative => RankRule::SvCumulative(x),
            }
        }
        (Some(_), None, _) => bail!("--dynamic needs --param X"),
    };
    crate::output_guard::require_safetensors(&args.output)?;
    crate::output_guard::check_output(&args.output, &[&args.input], args.force)?;
    let max_rank = args.dynamic.and(args.rank);
    let report = resize_file(&args.input, &args.output, rule, max_rank)?;
    let mut out = String::new();
    let kept: Vec<f64> = report.modules.iter().map(|(_, s)| s.fro_kept).collect();
    if args.verbose {
        for ((component, path), s) in &report.modules {
            let _ = writeln!(
                out,
                "{component:?} {path}: rank {} → {}, Frobenius norm kept {:.2} %",
                s.old_rank,
                s.new_rank,
                100.0 * s.fro_kept
            );
        }
    }
    let ranks = |f: fn(&sd_lora_model::lora::resize::ResizeStats) -> usize| {
        let v: Vec<usize> = report.modules.iter().map(|(_, s)| f(s)).collect();
        (
            v.iter().copied().min().unwrap_or(0),
            v.iter().copied().max().unwrap_or(0),
        )
    };
    let (old_lo, old_hi) = ranks(|s| s.old_rank);
    let (new_lo, new_hi) = ranks(|s| s.new_rank);
    let span = |lo: usize, hi: usize| {
        if lo == hi {
            lo.to_string()
        } else {
            format!("{lo}–{hi}")
        }
    };
    let mean = kept.iter().sum::<f64>() / kept.len().max(1) as f64;
    let min = kept.iter().copied().fold(f64::INFINITY, f64::min);
    let _ = writeln!(
        out,
        "wrote {} ({} modules, {:?}): rank {} → {}; Frobenius norm kept: mean {:.2} %, lowest {:.2} %",
        args.output.display(),
        report.modules.len(),
        report.format,
        span(old_lo, old_hi),
        span(new_lo, new_hi),
        100.0 * mean,
        100.0 * if min.is_finite() { min } else { 1.0 }
    );
    crate::emit(&out)?;
    Ok(0)
}
