//! Everything that can go wrong while finding, opening and converting model weights.
//!
//! Every variant names the file (and where it applies the key and the shapes), because the
//! user's next step is nearly always "look at that file": a wrong download, a LoRA given where a
//! base model was expected, a folder missing its `config.json`.

use std::path::PathBuf;

/// What a user can run to turn a pickle into safetensors; shared by every pickle refusal.
const PICKLE_ADVICE: &str = "pickle files (.ckpt, .pt, .pth, .bin) can execute arbitrary code \
when they are opened, so sd-lora never unpickles them. Use the .safetensors version of the model \
(most model sites and Hugging Face repositories offer one), or convert it once, in a Python \
environment you trust: for a single file, `python -c \"import torch, safetensors.torch as st; \
sd = torch.load('model.ckpt', map_location='cpu', weights_only=True); sd = sd.get('state_dict', \
sd); st.save_file({k: v.contiguous() for k, v in sd.items() if hasattr(v, 'contiguous')}, \
'model.safetensors')\"`; for a diffusers folder, `StableDiffusionPipeline.from_pretrained(DIR)\
.save_pretrained(DIR, safe_serialization=True)`";

/// An error while locating, opening or converting model weights.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The path does not exist.
    #[error("{path}: no such file or directory")]
    NotFound { path: PathBuf },

    /// Reading a file or directory failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A pickle file was given (or is all a diffusers folder holds). Refused before reading any
    /// of its content.
    #[error("{file}: refusing to load{context}: {advice}", advice = PICKLE_ADVICE)]
    PickleRefused {
        file: PathBuf,
        /// Extra words after "refusing to load", e.g. " the only weights of text_encoder/".
        context: String,
    },

    /// The file claims to be safetensors but its bytes say otherwise.
    #[error("{file}: not a valid safetensors file: {reason}")]
    Malformed { file: PathBuf, reason: String },

    /// The path is neither a diffusers folder nor a `.safetensors` file, or it is one but holds
    /// no Stable Diffusion model (a LoRA, a VAE on its own, ...).
    #[error("{path}: {reason}")]
    NotAModel { path: PathBuf, reason: String },

    /// A file the layout requires is absent.
    #[error("{file}: missing ({what})")]
    MissingFile { file: PathBuf, what: String },

    /// A JSON configuration file is unreadable or holds an unusable value.
    #[error("{file}: {reason}")]
    InvalidConfig { file: PathBuf, reason: String },

    /// A component folder has a config but no weight file we recognise.
    #[error(
        "{dir}: no weights found (looked for diffusion_pytorch_model[.VARIANT].safetensors, \
         model[.VARIANT].safetensors and their sharded *.safetensors.index.json forms)"
    )]
    MissingWeights { dir: PathBuf },

    /// A tensor the conversion or the model needs is not in the file.
    #[error("{file}: tensor `{key}` is missing{context}")]
    MissingKey {
        file: PathBuf,
        key: String,
        /// Why it was looked for, e.g. " (needed to infer the UNet's input channels)".
        context: String,
    },

    /// A tensor has a shape the conversion or the model cannot use.
    #[error("{file}: tensor `{key}` has shape {found:?}, expected {expected}")]
    ShapeMismatch {
        file: PathBuf,
        key: String,
        found: Vec<usize>,
        expected: String,
    },

    /// Two source tensors were converted to the same name.
    #[error("{file}: tensors `{first}` and `{second}` both convert to `{key}`")]
    DuplicateKey {
        file: PathBuf,
        key: String,
        first: String,
        second: String,
    },

    /// The model has no such component (e.g. `text_encoder_2` of an SD1 model, or a single file
    /// without VAE weights).
    #[error("{path}: the model has no {component} (it has: {available})")]
    MissingComponent {
        path: PathBuf,
        component: String,
        available: String,
    },

    /// A recognised model we cannot convert yet.
    #[error("{path}: {what}")]
    Unsupported { path: PathBuf, what: String },

    /// A configuration value cannot be read off the weights and no option provided it.
    #[error("{file}: cannot infer {what} from the weights: {hint}")]
    CannotInfer {
        file: PathBuf,
        what: String,
        hint: String,
    },

    /// A tensor uses a dtype candle cannot hold.
    #[error("{file}: tensor `{key}` has dtype {dtype}, which candle cannot load")]
    UnsupportedDtype {
        file: PathBuf,
        key: String,
        dtype: String,
    },

    /// candle failed while materialising a tensor.
    #[error("{file}: loading tensor `{key}`: {source}")]
    Tensor {
        file: PathBuf,
        key: String,
        #[source]
        source: Box<candle_core::Error>,
    },
}

impl LoadError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            LoadError::NotFound { path }
        } else {
            LoadError::Io { path, source }
        }
    }

    pub(crate) fn malformed(file: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        LoadError::Malformed {
            file: file.into(),
            reason: reason.into(),
        }
    }
}
