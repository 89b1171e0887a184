//! The `__metadata__` of a LoRA file: kohya's `ss_*` training record and `modelspec.*`.
//!
//! Every value in a safetensors header's metadata is a string; kohya writes numbers with Python's
//! `str()` and nested data (`ss_tag_frequency`, `ss_dataset_dirs`, `ss_network_args`) as JSON
//! text. [`Metadata`] holds the fields we write as typed values and keeps every other key in
//! [`Metadata::extra`]: every key of any map `m` comes back unchanged in `to_map(from_map(m))`
//! (which may add the keys kohya always writes: `modelspec.title` and, with a base model, the
//! derived `modelspec.*` fields).
//!
//! `modelspec.*` follows what kohya's `library/sai_model_spec.py` writes for an SD1/SD2 LoRA:
//! spec `1.0.1`, architecture `stable-diffusion-v1/lora` | `stable-diffusion-v2-512/lora` |
//! `stable-diffusion-v2-768-v/lora`, implementation `diffusers`, resolution `512x512`,
//! prediction type `epsilon` | `v`.

use std::collections::BTreeMap;

use crate::lora::lycoris::{DoraAxis, NetworkType};

use serde::{Deserialize, Serialize};

use crate::lora::LoraWeights;

/// `ss_network_module` of a plain kohya LoRA (also what LoCon-in-kohya writes).
pub const NETWORK_MODULE_LORA: &str = "networks.lora";

/// `ss_network_module` of a LyCORIS network (DoRA, LoHa, LoKr), whose
/// `ss_network_args` carry `algo` (and `dora_wd`).
pub const NETWORK_MODULE_LYCORIS: &str = "lycoris.kohya";
/// The modelspec version kohya writes.
pub const MODELSPEC_VERSION: &str = "1.0.1";

/// The base model a LoRA was trained on, as `ss_base_model_version` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum BaseModelVersion {
    /// SD 1.x (`sd_v1`).
    SdV1,
    /// SD 2.x with epsilon prediction, 512 px (`sd_v2`).
    SdV2,
    /// SD 2.x with v-prediction, 768 px (`sd_v2_v`).
    SdV2V,
    /// SDXL base and its fine-tunes (`sdxl_base_v1-0`).
    SdxlBase,
}

impl BaseModelVersion {
    /// The `ss_base_model_version` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SdV1 => "sd_v1",
            Self::SdV2 => "sd_v2",
            Self::SdV2V => "sd_v2_v",
            Self::SdxlBase => "sdxl_base_v1-0",
        }
    }

    /// The base model version of a model of `architecture` predicting `prediction`.
    pub fn of_model(
        architecture: crate::load::Architecture,
        prediction: crate::load::Prediction,
    ) -> Self {
        use crate::load::{Architecture, Prediction};
        match (architecture, prediction) {
            (Architecture::Sd1, _) => Self::SdV1,
            (Architecture::Sd2, Prediction::V) => Self::SdV2V,
            (Architecture::Sd2, _) => Self::SdV2,
            (Architecture::Sdxl, _) => Self::SdxlBase,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "sd_v1" => Self::SdV1,
            "sd_v2" => Self::SdV2,
            "sd_v2_v" => Self::SdV2V,
            "sdxl_base_v1-0" => Self::SdxlBase,
            _ => return None,
        })
    }

    /// kohya's `ss_v2`: true for SD 2.x only (SDXL files say `False`, as kohya's do).
    pub fn is_v2(self) -> bool {
        matches!(self, Self::SdV2 | Self::SdV2V)
    }

    /// `modelspec.architecture` of a LoRA for this base.
    pub fn modelspec_architecture(self) -> &'static str {
        match self {
            Self::SdV1 => "stable-diffusion-v1/lora",
            Self::SdV2 => "stable-diffusion-v2-512/lora",
            Self::SdV2V => "stable-diffusion-v2-768-v/lora",
            Self::SdxlBase => "stable-diffusion-xl-v1-base/lora",
        }
    }

    /// The native resolution (`modelspec.resolution` when no training resolution is known).
    pub fn default_resolution(self) -> (u32, u32) {
        match self {
            Self::SdV1 | Self::SdV2 => (512, 512),
            Self::SdV2V => (768, 768),
            Self::SdxlBase => (1024, 1024),
        }
    }

    /// `modelspec.prediction_type`.
    pub fn prediction_type(self) -> &'static str {
        match self {
            Self::SdV2V => "v",
            _ => "epsilon",
        }
    }
}

/// One training folder as kohya summarises it in `ss_dataset_dirs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetDirInfo {
    pub n_repeats: u64,
    pub img_count: u64,
}

/// The metadata of a LoRA file we write: typed kohya/modelspec fields plus everything else.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Metadata {
    /// `ss_output_name`; also the default `modelspec.title`.
    pub output_name: Option<String>,
    /// `ss_network_module`; the kohya writer puts `networks.lora` when the map has none.
    pub network_module: Option<String>,
    /// `ss_network_dim`: the (UNet/text-encoder) rank.
    pub network_dim: Option<usize>,
    /// `ss_network_alpha`.
    pub network_alpha: Option<f32>,
    /// `ss_network_args` (a JSON object of strings), e.g. `conv_dim`/`conv_alpha` for LoCon.
    pub network_args: BTreeMap<String, String>,
    /// `ss_base_model_version`, and the `modelspec.*` architecture fields derived from it.
    pub base_model: Option<BaseModelVersion>,
    /// `ss_resolution`, written as kohya does: `(512, 512)` (width, height).
    pub resolution: Option<(u32, u32)>,
    /// `ss_steps`: optimizer steps done.
    pub steps: Option<u64>,
    /// `ss_epoch`: epochs done.
    pub epoch: Option<u64>,
    /// `ss_num_epochs`: epochs planned.
    pub num_epochs: Option<u64>,
    /// `ss_learning_rate`, `ss_unet_lr`, `ss_text_encoder_lr`.
    pub learning_rate: Option<f64>,
    pub unet_lr: Option<f64>,
    pub text_encoder_lr: Option<f64>,
    /// `ss_seed`.
    pub seed: Option<u64>,
    /// `ss_num_train_images`.
    pub num_train_images: Option<u64>,
    /// `ss_dataset_dirs`: folder name → repeats and image count.
    pub dataset_dirs: BTreeMap<String, DatasetDirInfo>,
    /// `ss_tag_frequency`: folder name → tag → count.
    pub tag_frequency: BTreeMap<String, BTreeMap<String, u64>>,
    /// `ss_training_started_at` / `ss_training_finished_at`: Unix seconds.
    pub training_started_at: Option<f64>,
    pub training_finished_at: Option<f64>,
    /// `modelspec.title` (defaults to the output name, then `LoRA`).
    pub title: Option<String>,
    /// `modelspec.date`, ISO-8601 (`2026-11-28T14:00:00`).
    pub date: Option<String>,
    /// `modelspec.description`, `modelspec.author`, `modelspec.trigger_phrase`.
    pub description: Option<String>,
    pub author: Option<String>,
    pub trigger_phrase: Option<String>,
    /// Every other key, verbatim. Typed fields win over an `extra` entry of the same key.
    pub extra: BTreeMap<String, String>,
}

/// Keys whose values [`Metadata::to_map`] derives from [`Metadata::base_model`] and the
/// resolution (kept in `extra` by `from_map`, and written only where `extra` lacks them).
const DERIVED_MODELSPEC: &[&str] = &[
    "modelspec.sai_model_spec",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.resolution",
    "modelspec.prediction_type",
];

impl Metadata {
    /// Fills `ss_network_module`, `ss_network_dim`/`ss_network_alpha` (the most common rank and
    /// alpha of the Linear modules) and, when there are conv modules, `conv_dim`/`conv_alpha` in
    /// `ss_network_args` — as kohya records a LoRA/LoCon network. Values these fields held
    /// before (metadata read from another file, e.g. before a resize or merge) are replaced:
    /// they describe `weights` only.
    pub fn with_network_of(mut self, weights: &LoraWeights) -> Self {
        self.network_dim = None;
        self.network_alpha = None;
        for k in ["conv_dim", "conv_alpha", "algo", "dora_wd", "wd_on_output"] {
            self.network_args.remove(k);
        }
        let most_common = |conv: bool| {
            let mut counts: BTreeMap<(usize, u32), usize> = BTreeMap::new();
            for m in weights.modules.values() {
                if (m.down.dims().len() == 4) == conv {
                    *counts.entry((m.rank(), m.alpha.to_bits())).or_default() += 1;
                }
            }
            for m in weights.lycoris.values() {
                if !conv {
                    let rank = m.rank().unwrap_or(0);
                    *counts.entry((rank, m.alpha().to_bits())).or_default() += 1;
                }
            }
            counts
                .into_iter()
                .max_by_key(|(_, n)| *n)
                .map(|((rank, alpha), _)| (rank, f32::from_bits(alpha)))
        };
        let network = weights.network_type();
        if network == NetworkType::Lora {
            if self.network_module.as_deref() == Some(NETWORK_MODULE_LYCORIS) {
                self.network_module = None;
            }
            self.network_module
                .get_or_insert_with(|| NETWORK_MODULE_LORA.to_string());
        } else {
            // As LyCORIS' kohya wrapper records its networks.
            self.network_module = Some(NETWORK_MODULE_LYCORIS.to_string());
            let algo = match network {
                NetworkType::Loha => "loha",
                NetworkType::Lokr => "lokr",
                _ => "lora",
            };
            self.network_args.insert("algo".into(), algo.into());
            if network == NetworkType::Dora {
                self.network_args.insert("dora_wd".into(), "True".into());
                let input_axis = weights
                    .modules
                    .values()
                    .any(|m| m.dora_axis() == Some(DoraAxis::Input));
                let on_output = if input_axis { "False" } else { "True" };
                self.network_args
                    .insert("wd_on_output".into(), on_output.into());
            }
        }
        if let Some((rank, alpha)) = most_common(false) {
            self.network_dim = Some(rank);
            self.network_alpha = Some(alpha);
        }
        if let Some((rank, alpha)) = most_common(true) {
            self.network_args
                .insert("conv_dim".into(), rank.to_string());
            self.network_args
                .insert("conv_alpha".into(), float_str(f64::from(alpha)));
        }
        self
    }

    /// The header map: every value a string, `ss_*` then `modelspec.*` and the extras.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = self.extra.clone();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        if let Some(v) = &self.network_module {
            put("ss_network_module", v.clone());
        }
        if let Some(v) = &self.output_name {
            put("ss_output_name", v.clone());
        }
        if let Some(v) = self.network_dim {
            put("ss_network_dim", v.to_string());
        }
        if let Some(v) = self.network_alpha {
            put("ss_network_alpha", float_str(f64::from(v)));
        }
        if !self.network_args.is_empty() {
            put("ss_network_args", json(&self.network_args));
        }
        if let Some(v) = self.base_model {
            put("ss_base_model_version", v.as_str().to_string());
            put("ss_v2", python_bool(v.is_v2()).into());
        }
        if let Some((w, h)) = self.resolution {
            put("ss_resolution", format!("({w}, {h})"));
        }
        let ints = [
            ("ss_steps", self.steps),
            ("ss_epoch", self.epoch),
            ("ss_num_epochs", self.num_epochs),
            ("ss_seed", self.seed),
            ("ss_num_train_images", self.num_train_images),
        ];
        for (k, v) in ints {
            if let Some(v) = v {
                put(k, v.to_string());
            }
        }
        let floats = [
            ("ss_learning_rate", self.learning_rate),
            ("ss_unet_lr", self.unet_lr),
            ("ss_text_encoder_lr", self.text_encoder_lr),
            ("ss_training_started_at", self.training_started_at),
            ("ss_training_finished_at", self.training_finished_at),
        ];
        for (k, v) in floats {
            if let Some(v) = v {
                put(k, float_str(v));
            }
        }
        if !self.dataset_dirs.is_empty() {
            put("ss_dataset_dirs", json(&self.dataset_dirs));
        }
        if !self.tag_frequency.is_empty() {
            put("ss_tag_frequency", json(&self.tag_frequency));
        }
        let title = self
            .title
            .clone()
            .or_else(|| self.output_name.clone())
            .unwrap_or_else(|| "LoRA".to_string());
        put("modelspec.title", title);
        let texts = [
            ("modelspec.date", &self.date),
            ("modelspec.description", &self.description),
            ("modelspec.author", &self.author),
            ("modelspec.trigger_phrase", &self.trigger_phrase),
        ];
        for (k, v) in texts {
            if let Some(v) = v {
                put(k, v.clone());
            }
        }
        if let Some(base) = self.base_model {
            let (w, h) = self.resolution.unwrap_or(base.default_resolution());
            let derived = [
                MODELSPEC_VERSION.to_string(),
                base.modelspec_architecture().to_string(),
                "diffusers".to_string(),
                format!("{w}x{h}"),
                base.prediction_type().to_string(),
            ];
            for (k, v) in DERIVED_MODELSPEC.iter().zip(derived) {
                m.entry(k.to_string()).or_insert(v);
            }
        }
        m
    }

    /// Reads the typed fields back; a key whose value does not parse stays in `extra` verbatim,
    /// so no information is lost.
    pub fn from_map(map: &BTreeMap<String, String>) -> Self {
        let mut rest = map.clone();
        let mut md = Metadata::default();
        fn take<T>(
            rest: &mut BTreeMap<String, String>,
            key: &str,
            parse: impl FnOnce(&str) -> Option<T>,
        ) -> Option<T> {
            let value = parse(rest.get(key)?)?;
            rest.remove(key);
            Some(value)
        }
        let text = |s: &str| Some(s.to_string());
        md.output_name = take(&mut rest, "ss_output_name", text);
        md.network_module = take(&mut rest, "ss_network_module", text);
        md.network_dim = take(&mut rest, "ss_network_dim", |s| s.trim().parse().ok());
        md.network_alpha = take(&mut rest, "ss_network_alpha", |s| s.trim().parse().ok());
        md.network_args = take(&mut rest, "ss_network_args", |s| {
            let v: BTreeMap<String, serde_json::Value> = serde_json::from_str(s).ok()?;
            // kohya's values are strings; numbers written by other tools become their text.
            let m: BTreeMap<String, String> = v
                .into_iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(s) => (k, s),
                    other => (k, other.to_string()),
                })
                .collect();
            // Only take it when writing it back gives the same text.
            (json(&m) == s).then_some(m)
        })
        .unwrap_or_default();
        // `ss_v2` is derived from the base model; drop it only when it agrees.
        md.base_model = take(&mut rest, "ss_base_model_version", BaseModelVersion::parse);
        if let Some(base) = md.base_model
            && rest.get("ss_v2").map(String::as_str) == Some(python_bool(base.is_v2()))
        {
            rest.remove("ss_v2");
        }
        md.resolution = take(&mut rest, "ss_resolution", |s| {
            parse_resolution(s).filter(|(w, h)| format!("({w}, {h})") == s)
        });
        let int = |s: &str| s.trim().parse::<u64>().ok();
        md.steps = take(&mut rest, "ss_steps", int);
        md.epoch = take(&mut rest, "ss_epoch", int);
        md.num_epochs = take(&mut rest, "ss_num_epochs", int);
        md.seed = take(&mut rest, "ss_seed", int);
        md.num_train_images = take(&mut rest, "ss_num_train_images", int);
        // Floats only when re-formatting reproduces the text, so to_map(from_map(m)) == m.
        let float = |s: &str| s.parse::<f64>().ok().filter(|v| float_str(*v) == s);
        md.learning_rate = take(&mut rest, "ss_learning_rate", float);
        md.unet_lr = take(&mut rest, "ss_unet_lr", float);
        md.text_encoder_lr = take(&mut rest, "ss_text_encoder_lr", float);
        md.training_started_at = take(&mut rest, "ss_training_started_at", float);
        md.training_finished_at = take(&mut rest, "ss_training_finished_at", float);
        if let Some(a) = md.network_alpha
            && map.get("ss_network_alpha").map(String::as_str) != Some(&float_str(f64::from(a)))
        {
            // e.g. "8" where we would write "8.0": keep the original text.
            md.network_alpha = None;
            if let Some(v) = map.get("ss_network_alpha") {
                rest.insert("ss_network_alpha".into(), v.clone());
            }
        }
        md.dataset_dirs = take(&mut rest, "ss_dataset_dirs", |s| {
            let v: BTreeMap<String, DatasetDirInfo> = serde_json::from_str(s).ok()?;
            (json(&v) == s).then_some(v)
        })
        .unwrap_or_default();
        md.tag_frequency = take(&mut rest, "ss_tag_frequency", |s| {
            let v: BTreeMap<String, BTreeMap<String, u64>> = serde_json::from_str(s).ok()?;
            (json(&v) == s).then_some(v)
        })
        .unwrap_or_default();
        md.title = take(&mut rest, "modelspec.title", text);
        md.date = take(&mut rest, "modelspec.date", text);
        md.description = take(&mut rest, "modelspec.description", text);
        md.author = take(&mut rest, "modelspec.author", text);
        md.trigger_phrase = take(&mut rest, "modelspec.trigger_phrase", text);
        md.extra = rest;
        md
    }
}

/// Python's `str(bool)`.
fn python_bool(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

/// A float as Python's `str()` writes it for the usual values (`0.0001`, `8.0`, `1e-05`).
pub fn float_str(v: f64) -> String {
    if v.is_finite() && v == v.trunc() && v.abs() < 1e16 {
        format!("{v:.1}")
    } else if v != 0.0 && v.is_finite() && (v.abs() < 1e-4 || v.abs() >= 1e16) {
        // Python switches to exponent notation below 1e-4, with a two-digit exponent.
        let s = format!("{v:e}");
        match s.split_once('e') {
            Some((mantissa, exp)) => {
                let (sign, digits) = match exp.strip_prefix('-') {
                    Some(d) => ("-", d),
                    None => ("+", exp),
                };
                format!("{mantissa}e{sign}{digits:0>2}")
            }
            None => s,
        }
    } else {
        format!("{v}")
    }
}

/// `(512, 512)`, `512,512`, `512x512` or `512`.
fn parse_resolution(s: &str) -> Option<(u32, u32)> {
    let inner = s.trim().trim_start_matches('(').trim_end_matches(')');
    let parts: Vec<&str> = inner.split([',', 'x']).map(str::trim).collect();
    match parts.as_slice() {
        [a] => {
            let a = a.parse().ok()?;
            Some((a, a))
        }
        [a, b] => Some((a.parse().ok()?, b.parse().ok()?)),
        _ => None,
    }
}

/// Compact JSON with `", "`/`": "` separators, as Python's `json.dumps` writes.
fn json<T: Serialize>(value: &T) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
    // Serialising maps of strings and numbers cannot fail.
    if value.serialize(&mut ser).is_err() {
        return String::new();
    }
    String::from_utf8(out).unwrap_or_default()
}

/// `json.dumps` separators: `", "` between items, `": "` after keys.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}
