//! `sd-lora convert IN OUT --to kohya|peft`: rewrite a LoRA in another format.

use anyhow::Result;
use clap::{Args, ValueEnum};
use sd_lora_model::lora::format::{WriteFormat, convert};
use std::path::PathBuf;

/// Arguments of `convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The LoRA file to read (kohya, PEFT or diffusers format).
    #[arg(value_name = "IN")]
    pub input: PathBuf,
    /// Where to write the converted file (`.safetensors`).
    #[arg(value_name = "OUT")]
    pub output: PathBuf,
    /// Target format.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub to: FormatArg,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub force: bool,
}

/// `--to` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// kohya (`lora_unet_…`, with alpha): read by A1111/Forge, ComfyUI and diffusers.
    Kohya,
    /// PEFT/diffusers (`unet.….lora_A/lora_B`; alpha folded into the weights).
    Peft,
}

impl FormatArg {
    /// The writer's format.
    pub fn write_format(self) -> WriteFormat {
        match self {
            FormatArg::Kohya => WriteFormat::Kohya,
            FormatArg::Peft => WriteFormat::Peft,
        }
    }
}

/// Runs the command; returns the process exit code.
pub fn run(args: &ConvertArgs) -> Result<u8> {
    crate::output_guard::require_safetensors(&args.output)?;
    crate::output_guard::check_output(&args.output, &[&args.input], args.force)?;
    let to = args.to.write_format();
    let report = convert(&args.input, &args.output, to)?;
    crate::emit(&format!(
        "wrote {} ({} modules, {:?}) from a {} file\n",
        args.output.display(),
        report.modules,
        report.dtype,
        report.from
    ))?;
    Ok(0)
}
