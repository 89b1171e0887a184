//! LoRA files: kohya (written by default), PEFT (written on request) and old diffusers (read).
//!
//! - [`names`]: kohya module names ↔ (component, diffusers module path), with a model's targets
//!   or by grammar without one.
//! - [`metadata`]: the typed kohya `ss_*` / `modelspec.*` metadata.
//! - [`serialize`]: byte-exact safetensors writing and the `sshs_*` hashes the web UIs show.
//! - [`write`](mod@write): kohya/PEFT writers (atomic: temp file + rename) and [`convert`].
//! - [`read`]: [`read_lora`], which detects the format from the keys, and refuses malformed
//!   files, unknown module names and inconsistent modules with errors that list every offending
//!   key — a LoRA whose keys are silently dropped is the failure users complain about most.
//! - [`validate`](mod@validate): does a LoRA fit a model (every module exists, every shape fits)?
//! - [`summary`]: what `sd-lora inspect` shows about a LoRA file.

pub mod metadata;
pub mod names;
pub mod read;
pub mod serialize;
pub mod summary;
pub mod validate;
pub mod write;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use crate::load::LoadError;

use super::LoraWeights;

pub use metadata::{BaseModelVersion, DatasetDirInfo, Metadata};
pub use names::{
    KohyaNameMap, KohyaNaming, LoraFamily, NameError, SgmLayout, kohya_name, parse_kohya_name,
};
pub use read::{read_lora, read_lora_for_model};
pub use summary::LoraSummary;
pub use validate::{Mismatch, validate};
pub use write::{
    ConvertReport, SaveDtype, WriteFormat, convert, write_kohya, write_kohya_named, write_lora,
    write_peft,
};

/// The key convention of a LoRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraFormat {
    /// `lora_unet_…​.lora_down.weight` / `.lora_up.weight` / `.alpha` (kohya sd-scripts, A1111,
    /// ComfyUI).
    Kohya,
    /// `unet.<path>.lora_A.weight` / `.lora_B.weight` (PEFT, diffusers ≥ 0.26).
    Peft,
    /// `<path>.lora.down.weight` / `.lora.up.weight` or `.lora_linear_layer.down.weight`
    /// (diffusers before PEFT).
    Diffusers,
}

impl fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoraFormat::Kohya => "kohya",
            LoraFormat::Peft => "peft",
            LoraFormat::Diffusers => "diffusers",
        })
    }
}

/// A LoRA file as read: its modules (f32), metadata and what it was stored as.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    pub format: LoraFormat,
    /// The model family it is for (from its names; else the model's it was read against; else
    /// its metadata; else SD1/SD2).
    pub family: LoraFamily,
    pub weights: LoraWeights,
    /// The header's `__metadata__` (every value a string).
    pub metadata: BTreeMap<String, String>,
    /// The dtype most of the LoRA tensors are stored in (they are converted to f32 on reading).
    pub dtype: candle_core::DType,
    /// Size of the file in bytes.
    pub file_size: u64,
}

/// Everything that can go wrong reading, writing or checking a LoRA file. Variants that concern
/// keys list every offending key, not just the first.
#[derive(Debug, thiserror::Error)]
pub enum LoraFormatError {
    /// The safetensors container itself is unreadable or malformed.
    #[error(transparent)]
    Load(#[from] LoadError),

    /// The safetensors header breaks a rule the generic reader tolerates (overlapping tensor
    /// data, non-string metadata).
    #[error("{file}: not a valid safetensors file: {reason}")]
    Malformed { file: PathBuf, reason: String },

    /// A valid safetensors file that holds no LoRA (a model, an embedding, …) or mixes formats.
    #[error("{file}: not a LoRA file: {reason}")]
    NotALora { file: PathBuf, reason: String },

    /// Tensors of a kind we do not read (LyCORIS LoHa/LoKr, DoRA, …).
    #[error("{file}: {} tensor(s) sd-lora cannot read{hint}: {}", keys.len(), keys.join(", "))]
    UnsupportedKeys {
        file: PathBuf,
        keys: Vec<String>,
        /// e.g. " (LyCORIS LoHa `hada_*` tensors are not supported)".
        hint: String,
    },

    /// The weights cannot be written in the requested format.
    #[error("{file}: cannot be written in this format: {reason}")]
    Unrepresentable { file: PathBuf, reason: String },

    /// Module names that map to no module of the model (or, without a model, of any
    /// SD1/SD2/SDXL model). Listed in full: loading them anyway would silently do nothing.
    #[error(
        "{file}: {} LoRA module(s) match no module of {target}: {}. Was this LoRA trained for a \
         different base model?",
        names.len(),
        names.join(", ")
    )]
    UnknownModules {
        file: PathBuf,
        names: Vec<String>,
        /// "an SD1/SD2/SDXL model" or "the model".
        target: String,
    },

    /// A LoRA for the other model family than the model's.
    #[error(
        "{file}: this is an {lora} LoRA and the model is {model}: {} module(s) name layers of \
         an {lora} model (e.g. {}); use it with an {lora} base model",
        names.len(),
        names.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
    )]
    WrongFamily {
        file: PathBuf,
        lora: LoraFamily,
        model: LoraFamily,
        names: Vec<String>,
    },

    /// Modules missing a half, with inconsistent ranks, impossible shapes or non-float data.
    #[error("{file}: {} LoRA module problem(s): {}", problems.len(), problems.join("; "))]
    BadModules {
        file: PathBuf,
        problems: Vec<String>,
    },

    /// The LoRA does not fit the model it is applied to.
    #[error(
        "{file}: the LoRA does not fit the model ({} problem(s)): {}",
        mismatches.len(),
        mismatches.iter().map(|m| m.to_string()).collect::<Vec<_>>().join("; ")
    )]
    DoesNotFit {
        file: PathBuf,
        mismatches: Vec<Mismatch>,
    },

    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// candle failed while converting a tensor.
    #[error("{what}: {source}")]
    Tensor {
        what: String,
        #[source]
        source: candle_core::Error,
    },
}
