//! `sd-lora inspect FILE`: what a model (file or folder) or a LoRA file holds.

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use sd_lora_model::load::{
    self, LoadOptions, ModelInfo, ModelSource, Prediction, PredictionSource, SourceFormat,
};
use sd_lora_model::lora::format::{LoraFile, LoraFormatError, LoraSummary, read_lora};
use sd_lora_model::lora::lycoris::{DoraAxis, NetworkType};
use sd_lora_model::lora::targets::model_targets;
use sd_lora_model::pipeline::StableDiffusion;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// Arguments of `inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A diffusers folder (with model_index.json), a single-file `.safetensors`
    /// checkpoint, or a LoRA `.safetensors` file (kohya, PEFT or diffusers format).
    #[arg(value_name = "FILE")]
    pub path: PathBuf,
    /// For a LoRA file: also check that every module maps onto this model
    /// (a diffusers folder or single-file checkpoint) with matching shapes.
    #[arg(long, value_name = "MODEL")]
    pub model: Option<PathBuf>,
    /// What the model predicts, for single files (weights do not show it; folders read scheduler_config.json).
    #[arg(long, value_enum, value_name = "TYPE")]
    pub prediction: Option<PredictionArg>,
    /// Weights variant of a diffusers folder, e.g. `fp16` for `*.fp16.safetensors`.
    #[arg(long, value_name = "NAME")]
    pub variant: Option<String>,
    /// A diffusers folder whose `COMPONENT/config.json` files replace what is
    /// inferred from a single file's shapes (as `model.config`).
    #[arg(long, value_name = "DIR")]
    pub model_config: Option<PathBuf>,
    /// A VAE to report instead of the model's own (as `model.vae`).
    #[arg(long, value_name = "PATH")]
    pub vae: Option<PathBuf>,
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
    let options = load_options(args);
    let is_safetensors = args
        .path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if args.path.is_file() && is_safetensors {
        match read_lora(&args.path) {
            Ok(file) => return inspect_lora(args, &file, options),
            Err(LoraFormatError::NotALora { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if args.model.is_some() {
        bail!(
            "{}: --model only applies to LoRA files, and this is not one",
            args.path.display()
        );
    }
    let shown = args.path.to_string_lossy();
    let info = if sd_lora_model::builtin::is_builtin(&shown) {
        sd_lora_model::builtin::BuiltinModel::from_path(&shown)?.info()?
    } else {
        load::inspect(&args.path, options)?
    };
    if args.json {
        crate::emit(&(serde_json::to_string_pretty(&info)? + "\n"))?;
    } else {
        crate::emit(&render(&info))?;
    }
    Ok(0)
}

fn load_options(args: &InspectArgs) -> LoadOptions {
    LoadOptions {
        variant: args.variant.clone(),
        prediction: args.prediction.map(|p| match p {
            PredictionArg::Epsilon => Prediction::Epsilon,
            PredictionArg::V => Prediction::V,
        }),
        config_dir: args.model_config.clone(),
        vae: args.vae.clone(),
        ..Default::default()
    }
}

/// The JSON form of a LoRA report.
#[derive(serde::Serialize)]
struct LoraReport<'a> {
    kind: &'static str,
    path: &'a Path,
    #[serde(flatten)]
    summary: LoraSummary,
    /// Present with `--model`: the model checked and the modules that matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    model_check: Option<ModelCheck>,
}

#[derive(serde::Serialize)]
struct ModelCheck {
    model: PathBuf,
    matched_modules: usize,
}

fn inspect_lora(args: &InspectArgs, file: &LoraFile, options: LoadOptions) -> Result<u8> {
    let summary = LoraSummary::from_file(file);
    let model_check = match &args.model {
        None => None,
        Some(model) => Some(check_against_model(file, model, options)?),
    };
    if args.json {
        let report = LoraReport {
            kind: "lora",
            path: &args.path,
            summary,
            model_check,
        };
        crate::emit(&(serde_json::to_string_pretty(&report)? + "\n"))?;
    } else {
        crate::emit(&render_lora(&args.path, &summary, model_check.as_ref()))?;
    }
    Ok(0)
}

/// Every module of the LoRA must name a layer of the model, with fitting
/// shapes; anything else is listed (a LoRA that silently does nothing is the
/// worst outcome).
fn check_against_model(file: &LoraFile, model: &Path, options: LoadOptions) -> Result<ModelCheck> {
    // Only the layer shapes matter here: f16 halves the memory of the check.
    let (dtype, cpu) = (candle_core::DType::F16, candle_core::Device::Cpu);
    let sd = if sd_lora_model::builtin::is_builtin(&model.to_string_lossy()) {
        sd_lora_model::builtin::load(&model.to_string_lossy(), dtype, &cpu)?
    } else {
        let source = ModelSource::open_with(model, options)?;
        StableDiffusion::load(&source, dtype, &cpu)
            .with_context(|| format!("loading {} to check the LoRA against it", model.display()))?
    };
    let (unet, text_encoders) = sd.lora_parts();
    let targets = model_targets(unet, text_encoders);
    // Read again against the model: names it lacks, or a LoRA of the other family, are refused
    // by name before the shapes are compared.
    let file = &crate::lora_fit::read_fitting(
        &file.path,
        &targets,
        &file.path.display().to_string(),
        &model.display().to_string(),
    )?;
    Ok(ModelCheck {
        model: model.to_path_buf(),
        matched_modules: file.weights.len(),
    })
}

fn render_lora(path: &Path, s: &LoraSummary, check: Option<&ModelCheck>) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{} (LoRA, {} format)", path.display(), s.format);
    let _ = writeln!(o, "  family        {}", s.family);
    let kind = match (s.network_type, s.dora_axis) {
        (NetworkType::Dora, Some(DoraAxis::Input)) => {
            "DoRA (magnitude per input column: A1111's form; PEFT/diffusers cannot read it)"
                .to_string()
        }
        (NetworkType::Dora, _) => "DoRA (magnitude per output row)".to_string(),
        (NetworkType::Loha, _) => "LoHa (LyCORIS)".to_string(),
        (NetworkType::Lokr, _) => "LoKr (LyCORIS)".to_string(),
        (NetworkType::Lora, _) => "LoRA".to_string(),
    };
    let _ = writeln!(o, "  type          {kind}");
    let _ = writeln!(
        o,
        "  base model    {}",
        s.base_model_version.as_deref().unwrap_or("not recorded")
    );
    let modules: Vec<String> = s
        .modules
        .iter()
        .map(|(c, n)| {
            format!(
                "{n} {}",
                serde_json::to_value(c)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            )
        })
        .collect();
    let _ = writeln!(
        o,
        "  modules       {} ({} linear, {} conv)",
        modules.join(", "),
        s.linear_modules,
        s.conv_modules
    );
    let list = |v: &[f32]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ranks: Vec<String> = s.ranks.iter().map(|r| r.to_string()).collect();
    let _ = writeln!(o, "  rank          {}", ranks.join(", "));
    let _ = writeln!(o, "  alpha         {}", list(&s.alphas));
    let _ = writeln!(o, "  scale         {}   (alpha / rank)", list(&s.scales));
    let _ = writeln!(o, "  dtype         {}", s.dtype);
    let _ = writeln!(o, "  size          {} bytes", thousands(s.file_size));
    if let Some(m) = &s.network_module {
        let _ = writeln!(o, "  network       {m}");
    }
    if let Some(h) = &s.model_hash {
        let _ = writeln!(
            o,
            "  hash          {h} (legacy {})",
            s.legacy_hash.as_deref().unwrap_or("-")
        );
    }
    if !s.top_tags.is_empty() {
        let tags: Vec<String> = s
            .top_tags
            .iter()
            .map(|(t, n)| format!("{t} ({n})"))
            .collect();
        let _ = writeln!(o, "  top tags      {}", tags.join(", "));
    }
    if !s.training.is_empty() {
        let _ = writeln!(o, "\n  training metadata");
        for (k, v) in &s.training {
            let v = if v.chars().count() > 100 {
                format!("{}…", v.chars().take(100).collect::<String>())
            } else {
                v.clone()
            };
            let _ = writeln!(o, "    {k} = {v}");
        }
    }
    if let Some(c) = check {
        let _ = writeln!(
            o,
            "\n  all {} modules map onto {}",
            c.matched_modules,
            c.model.display()
        );
    }
    o
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
        SourceFormat::BuiltIn => "built-in model, random weights",
    };
    let _ = writeln!(o, "{} ({format})", info.path.display());
    let _ = writeln!(o, "  architecture  {}", info.architecture);
    let from = match info.prediction_source {
        PredictionSource::SchedulerConfig => "from scheduler/scheduler_config.json",
        PredictionSource::Option => "from --prediction",
        PredictionSource::AssumedDefault => {
            "assumed; single files do not record it: pass --prediction v for SD2-768-v models"
        }
        PredictionSource::BuiltIn => "the built-in model's",
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
