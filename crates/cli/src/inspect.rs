//! `sd-lora inspect MODEL`: what a model file or folder holds.

use anyhow::Result;
use clap::{Args, ValueEnum};
use sd_lora_model::load::{
    self, LoadOptions, ModelInfo, Prediction, PredictionSource, SourceFormat,
};
use std::fmt::Write;
use std::path::PathBuf;

/// Arguments of `inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A diffusers folder (with model_index.json) or a single-file `.safetensors` checkpoint.
    #[arg(value_name = "MODEL")]
    pub path: PathBuf,
    /// What the model predicts, for single files (weights do not show it; folders read scheduler_config.json).
    #[arg(long, value_enum, value_name = "TYPE")]
    pub prediction: Option<PredictionArg>,
    /// Weights variant of a diffusers folder, e.g. `fp16` for `*.fp16.safetensors`.
    #[arg(long, value_name = "NAME")]
    pub variant: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `--prediction` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PredictionArg {
    /// The noise ε (SD1.x, SD2-base, SDXL).
    Epsilon,
    /// v-prediction (SD2-768-v).
    V,
}

/// Runs the command; returns the process exit code.
pub fn run(args: &InspectArgs) -> Result<u8> {
    let options = LoadOptions {
        variant: args.variant.clone(),
        prediction: args.prediction.map(|p| match p {
            PredictionArg::Epsilon => Prediction::Epsilon,
            PredictionArg::V => Prediction::V,
        }),
        ..Default::default()
    };
    let info = load::inspect(&args.path, options)?;
    if args.json {
        crate::emit(&(serde_json::to_string_pretty(&info)? + "\n"))?;
    } else {
        crate::emit(&render(&info))?;
    }
    Ok(0)
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn render(info: &ModelInfo) -> String {
    let mut o = String::new();
    let format = match info.format {
        SourceFormat::DiffusersFolder => "diffusers folder",
        SourceFormat::SingleFile => "single-file checkpoint",
    };
    let _ = writeln!(o, "{} ({format})", info.path.display());
    let _ = writeln!(o, "  architecture  {}", info.architecture);
    let from = match info.prediction_source {
        PredictionSource::SchedulerConfig => "from scheduler/scheduler_config.json",
        PredictionSource::Option => "from --prediction",
        PredictionSource::AssumedDefault => {
            "assumed; single files do not record it: pass --prediction v for SD2-768-v models"
        }
    };
    let _ = writeln!(o, "  prediction    {} ({from})", info.prediction);
    let _ = writeln!(o, "  dtype         {}", info.dtypes.join(", "));
    let _ = writeln!(
        o,
        "\n  {:<16}{:>15}{:>9}  dtype",
        "component", "parameters", "tensors"
    );
    for c in &info.components {
        let _ = writeln!(
            o,
            "  {:<16}{:>15}{:>9}  {}",
            c.component.to_string(),
            thousands(c.parameters),
            c.tensors,
            c.dtypes.join(", ")
        );
    }
    let _ = writeln!(
        o,
        "  {:<16}{:>15}",
        "total",
        thousands(info.total_parameters)
    );
    if !info.notes.is_empty() {
        o.push('\n');
    }
    for n in &info.notes {
        let _ = writeln!(o, "  note: {n}");
    }
    o
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_separators() {
        assert_eq!(super::thousands(0), "0");
        assert_eq!(super::thousands(999), "999");
        assert_eq!(super::thousands(859_520_964), "859,520,964");
    }
}
