//! Reading a LoRA file for a given model, as `inspect --model`, `generate
//! --lora` and `merge --model` do: names resolved against the model's layers
//! (a LoRA of another family is refused by name), then every module's shapes
//! checked, every mismatch listed.

use anyhow::{Context, Result, bail};
use sd_lora_model::lora::TargetInfo;
use sd_lora_model::lora::format::{LoraFile, read_lora_for_model, validate};
use std::fmt::Write as _;
use std::path::Path;

/// Reads `path` against `targets`. `shown` names the LoRA and `model` the
/// model in messages (e.g. `--lora x.safetensors`, `v1-5.safetensors`).
pub fn read_fitting(
    path: &Path,
    targets: &[TargetInfo],
    shown: &str,
    model: &str,
) -> Result<LoraFile> {
    let file = read_lora_for_model(path, targets)
        .with_context(|| format!("{shown} does not fit {model}"))?;
    if let Err(mismatches) = validate(&file.weights, targets) {
        let mut msg = format!(
            "{shown} does not fit {model}: {} of {} modules do not map onto the model:",
            mismatches.len(),
            file.weights.len()
        );
        for m in &mismatches {
            let _ = write!(msg, "\n  {m}");
        }
        bail!(msg);
    }
    Ok(file)
}
