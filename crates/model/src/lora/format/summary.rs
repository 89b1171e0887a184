//! What `sd-lora inspect` shows about a LoRA file.

use std::collections::BTreeMap;

use super::{LoraFamily, LoraFile, LoraFormat};
use crate::lora::LoraComponent;
use crate::lora::lycoris::{DoraAxis, NetworkType};

/// Whether a module path names a convolution of the UNet (its ResNet convs,
/// shortcuts, down/upsamplers and the outer convs); LyCORIS modules do not
/// show it in their shapes.
fn is_conv_path(path: &str) -> bool {
    path.contains(".resnets.")
        || path.contains("samplers.")
        || matches!(path, "conv_in" | "conv_out")
}

/// Metadata keys holding large JSON blobs, summarised rather than shown.
const BULKY_KEYS: &[&str] = &[
    "ss_tag_frequency",
    "ss_dataset_dirs",
    "ss_reg_dataset_dirs",
    "ss_datasets",
    "ss_bucket_info",
    "modelspec.thumbnail",
];

/// A LoRA file at a glance (serialisable for `--json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoraSummary {
    pub format: LoraFormat,
    /// LoRA, DoRA, LoHa or LoKr.
    pub network_type: NetworkType,
    /// DoRA: the axis of the magnitudes.
    pub dora_axis: Option<DoraAxis>,
    /// The model family it is for (SD1/SD2 or SDXL).
    pub family: LoraFamily,
    /// `ss_base_model_version`, else `modelspec.architecture`.
    pub base_model_version: Option<String>,
    /// Modules per component.
    pub modules: BTreeMap<LoraComponent, usize>,
    /// Modules adapting Linear layers (2-D) and convolutions (4-D).
    pub linear_modules: usize,
    pub conv_modules: usize,
    /// Distinct ranks, alphas and effective scales (`alpha / rank`), ascending.
    pub ranks: Vec<usize>,
    pub alphas: Vec<f32>,
    pub scales: Vec<f32>,
    /// The stored dtype (`F16`, `BF16`, `F32`).
    pub dtype: String,
    pub file_size: u64,
    /// `ss_network_module`.
    pub network_module: Option<String>,
    /// `sshs_model_hash` and `sshs_legacy_hash` as stored.
    pub model_hash: Option<String>,
    pub legacy_hash: Option<String>,
    /// The most frequent training tags (from `ss_tag_frequency`, summed over folders), at most 20.
    pub top_tags: Vec<(String, u64)>,
    /// Every other `ss_*` and `modelspec.*` value (bulky JSON blobs left out).
    pub training: BTreeMap<String, String>,
}

impl LoraSummary {
    pub fn from_file(file: &LoraFile) -> Self {
        let md = &file.metadata;
        let mut modules = BTreeMap::new();
        let (mut linear_modules, mut conv_modules) = (0, 0);
        let (mut ranks, mut alphas, mut scales) = (Vec::new(), Vec::new(), Vec::new());
        for ((component, _), m) in &file.weights.modules {
            *modules.entry(*component).or_insert(0) += 1;
            if m.down.dims().len() == 4 {
                conv_modules += 1;
            } else {
                linear_modules += 1;
            }
            ranks.push(m.rank());
            alphas.push(m.alpha);
            scales.push(m.scale());
        }
        for ((component, path), m) in &file.weights.lycoris {
            *modules.entry(*component).or_insert(0) += 1;
            if is_conv_path(path) {
                conv_modules += 1;
            } else {
                linear_modules += 1;
            }
            ranks.extend(m.rank());
            alphas.push(m.alpha());
            scales.push(m.scale() as f32);
        }
        let dora_axis = file.weights.modules.values().find_map(|m| m.dora_axis());
        ranks.sort_unstable();
        ranks.dedup();
        for v in [&mut alphas, &mut scales] {
            v.sort_by(f32::total_cmp);
            v.dedup();
        }
        let mut tags: BTreeMap<String, u64> = BTreeMap::new();
        if let Some(freq) = md.get("ss_tag_frequency")
            && let Ok(dirs) = serde_json::from_str::<BTreeMap<String, BTreeMap<String, u64>>>(freq)
        {
            for (tag, n) in dirs.into_values().flatten() {
                *tags.entry(tag).or_insert(0) += n;
            }
        }
        let mut top_tags: Vec<(String, u64)> = tags.into_iter().collect();
        top_tags.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        top_tags.truncate(20);
        let training = md
            .iter()
            .filter(|(k, _)| {
                (k.starts_with("ss_") || k.starts_with("modelspec."))
                    && !BULKY_KEYS.contains(&k.as_str())
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        LoraSummary {
            format: file.format,
            network_type: file.weights.network_type(),
            dora_axis,
            family: file.family,
            base_model_version: md
                .get("ss_base_model_version")
                .or_else(|| md.get("modelspec.architecture"))
                .cloned(),
            modules,
            linear_modules,
            conv_modules,
            ranks,
            alphas,
            scales,
            dtype: format!("{:?}", file.dtype).to_uppercase(),
            file_size: file.file_size,
            network_module: md.get("ss_network_module").cloned(),
            model_hash: md.get("sshs_model_hash").cloned(),
            legacy_hash: md.get("sshs_legacy_hash").cloned(),
            top_tags,
            training,
        }
    }
}
