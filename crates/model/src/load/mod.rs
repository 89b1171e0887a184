//! Loading models the way users have them: diffusers folders and single-file checkpoints.
//!
//! [`ModelSource::open`] takes a path and hands back, per component (UNet, VAE, text
//! encoder(s)), what a diffusers folder would hold: the component's `config.json` as a
//! [`serde_json::Value`] and its weights under diffusers/transformers key names, as lazily loaded
//! [`ComponentWeights`] (a table of byte ranges in memory-mapped files; nothing is read until a
//! tensor is asked for, and [`ComponentWeights::into_var_builder`] turns it into a candle
//! `VarBuilder`). The components parse the config and build themselves; this module knows
//! nothing of their Rust types.
//!
//! Accepted:
//! * **diffusers folders** ([`folder`]): `model_index.json`, `unet/`, `vae/`, `text_encoder/`
//!   (and `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`, `scheduler/`), single or sharded
//!   `.safetensors`, fp16 and other variants ([`LoadOptions::variant`]).
//! * **single-file `.safetensors`** with original LDM key names ([`single_file`]): SD1.x and SD2.x
//!   are converted (renaming in [`ldm_keys`], configuration inferred from tensor shapes in
//!   [`ldm_config`], whose docs list exactly what is inferred and what is assumed). SDXL files
//!   (sgm layout: `conditioner.embedders.{0,1}`) are converted the same way; the SDXL refiner is
//!   recognised and can be inspected, but not converted.
//!
//! Refused: pickles (`.ckpt`, `.pt`, `.pth`, `.bin`, ...), by name, before a byte is read —
//! unpickling runs arbitrary code. The error says how to convert.
//!
//! v-prediction is invisible in weights: folders take it from `scheduler/scheduler_config.json`;
//! single files from [`LoadOptions::prediction`], else epsilon is assumed and
//! [`ModelSource::prediction_source`] says so.
//!
//! [`ModelSource::inspect`] gives what `sd-lora inspect` prints: architecture, prediction,
//! dtypes and exact parameter counts per component, computed from headers alone, identical for a
//! folder and its single-file equivalent (counts are of the converted tensors; buffers such as
//! `position_ids` are never weights; SD2's unused last OpenCLIP layer is not part of the model).

pub mod error;
pub mod folder;
pub mod ldm_config;
pub mod ldm_keys;
pub mod safetensors_file;
mod separate_vae;
pub mod single_file;
pub mod weights;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

pub use error::LoadError;
pub use weights::{ComponentWeights, WeightEntry};

use folder::{Folder, PICKLE_EXTENSIONS};
use separate_vae::SeparateVae;
use single_file::SingleFile;

/// A component of a Stable Diffusion pipeline, named as its diffusers sub-folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    Unet,
    Vae,
    TextEncoder,
    #[serde(rename = "text_encoder_2")]
    TextEncoder2,
}

impl Component {
    pub const ALL: [Component; 4] = [
        Component::Unet,
        Component::Vae,
        Component::TextEncoder,
        Component::TextEncoder2,
    ];

    /// The diffusers sub-folder name (`unet`, `vae`, `text_encoder`, `text_encoder_2`).
    pub fn folder_name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Vae => "vae",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.folder_name())
    }
}

/// The model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Sd1,
    Sd2,
    Sdxl,
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Architecture::Sd1 => "sd1",
            Architecture::Sd2 => "sd2",
            Architecture::Sdxl => "sdxl",
        })
    }
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum Prediction {
    /// The added noise ε (diffusers `epsilon`).
    #[serde(rename = "epsilon")]
    Epsilon,
    /// The velocity `v = √ᾱ ε − √(1−ᾱ) x₀` (diffusers `v_prediction`).
    #[serde(rename = "v_prediction")]
    V,
}

impl fmt::Display for Prediction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Prediction::Epsilon => "epsilon",
            Prediction::V => "v_prediction",
        })
    }
}

/// Where [`ModelSource::prediction`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionSource {
    /// `scheduler/scheduler_config.json` of a diffusers folder.
    SchedulerConfig,
    /// [`LoadOptions::prediction`].
    Option,
    /// Nothing said; epsilon assumed (right for SD1 and SD2-base, wrong for SD2-768-v).
    AssumedDefault,
    /// A built-in model's definition.
    BuiltIn,
}

/// On-disk form of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    DiffusersFolder,
    SingleFile,
    /// A model built in code (`builtin:…`).
    BuiltIn,
}

/// UNet attention heads for single files, where they cannot be seen in the weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttentionHeads {
    /// The same number of heads at every level (SD1: 8).
    Fixed(usize),
    /// A fixed head size: heads = level channels / size (SD2: 64).
    HeadDim(usize),
    /// Heads per down level, in order.
    PerLevel(Vec<usize>),
}

/// How to open a model. `Default` fits real SD1/SD2 models.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Weight variant of a diffusers folder (`"fp16"`, ...). `None`: the full-precision files,
    /// or a variant when a component has no full-precision file. `Some(v)`: `v` where present,
    /// the full-precision files elsewhere.
    pub variant: Option<String>,
    /// Prediction type. Overrides a folder's scheduler config; the only source for single files.
    pub prediction: Option<Prediction>,
    /// Single files: UNet heads (default: 8 fixed for SD1, head size 64 for SD2).
    pub unet_attention_heads: Option<AttentionHeads>,
    /// Single files: text-encoder heads (default hidden / 64).
    pub text_encoder_heads: Option<usize>,
    /// Single files: heads of SDXL's second text encoder (default hidden / 64).
    pub text_encoder_2_heads: Option<usize>,
    /// Top-level keys replaced in a component's config after loading or inference, e.g.
    /// `norm_num_groups` or `sample_size` of a small single-file model.
    pub config_overrides: BTreeMap<Component, serde_json::Map<String, Value>>,
    /// A diffusers folder whose configs replace the model's (`COMPONENT/config.json` for each
    /// component it has, and `scheduler/scheduler_config.json`'s prediction type): for a single
    /// file whose architecture cannot be inferred from its shapes. Weights are not read.
    pub config_dir: Option<PathBuf>,
    /// A VAE to use instead of the model's own (see [`separate_vae`]).
    pub vae: Option<PathBuf>,
    /// The VAE's storage dtype; `None`: SDXL's VAE stays f32 under an f16 model unless its
    /// config says `force_upcast: false`, other VAEs take the model's dtype.
    pub vae_dtype: Option<candle_core::DType>,
    /// Store the UNet's Linear/Conv2d weights in fp8 (e4m3), computing in the pipeline's dtype
    /// (see [`crate::storage`]).
    pub fp8_unet: bool,
}

/// A component ready to build: its config and its weights.
#[derive(Debug, Clone)]
pub struct LoadedComponent {
    pub component: Component,
    /// Exactly what the component's diffusers/transformers `config.json` holds (read from the
    /// folder, or inferred for a single file), with [`LoadOptions::config_overrides`] applied.
    pub config: Value,
    pub weights: ComponentWeights,
}

#[derive(Debug)]
enum Inner {
    Folder(Folder),
    Single(SingleFile),
}

/// An opened model: a diffusers folder or a single-file checkpoint.
#[derive(Debug)]
pub struct ModelSource {
    path: PathBuf,
    options: LoadOptions,
    architecture: Architecture,
    prediction: Prediction,
    prediction_source: PredictionSource,
    inner: Inner,
    /// The VAE given apart ([`LoadOptions::vae`]).
    vae: Option<SeparateVae>,
    /// Component configs from [`LoadOptions::config_dir`].
    configs: BTreeMap<Component, Value>,
    notes: Vec<String>,
}

impl ModelSource {
    /// Opens `path` with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        Self::open_with(path, LoadOptions::default())
    }

    /// Opens a diffusers folder (or its `model_index.json`) or a single `.safetensors` file.
    /// Only headers and JSON files are read.
    pub fn open_with(path: impl AsRef<Path>, options: LoadOptions) -> Result<Self, LoadError> {
        let path = path.as_ref();
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        // Refuse pickles by name first, whether or not the file exists: not a byte is read.
        if let Some(ext) = &extension
            && PICKLE_EXTENSIONS.contains(&ext.as_str())
        {
            return Err(LoadError::PickleRefused {
                file: path.to_path_buf(),
                context: " this pickle file".into(),
            });
        }
        let metadata = std::fs::metadata(path).map_err(|e| LoadError::io(path, e))?;
        let root = if metadata.is_file() && path.file_name() == Some("model_index.json".as_ref()) {
            path.parent().unwrap_or(Path::new(".")).to_path_buf()
        } else {
            path.to_path_buf()
        };
        let mut notes = Vec::new();
        let (inner, architecture, folder_prediction) = if root.is_dir() {
            let folder = Folder::open(&root, options.variant.as_deref())?;
            notes.extend(folder.notes.iter().cloned());
            let architecture = folder_architecture(&folder);
            let prediction = folder.prediction;
            (Inner::Folder(folder), architecture, prediction)
        } else {
            match extension.as_deref() {
                Some("safetensors" | "sft") => {}
                _ => {
                    return Err(LoadError::NotAModel {
                        path: path.to_path_buf(),
                        reason: "expected a diffusers folder or a .safetensors file".into(),
                    });
                }
            }
            let single = SingleFile::open(path)?;
            notes.extend(single.notes.iter().cloned());
            let architecture = single.architecture;
            (Inner::Single(single), architecture, None)
        };
        let (configs, config_prediction) = match &options.config_dir {
            Some(dir) => read_config_dir(dir, &mut notes)?,
            None => (BTreeMap::new(), None),
        };
        let folder_prediction = config_prediction.or(folder_prediction);
        let (prediction, prediction_source) = match (options.prediction, folder_prediction) {
            (Some(p), folder) => {
                if let Some(f) = folder.filter(|f| *f != p) {
                    notes.push(format!(
                        "prediction type {p} from the options overrides the scheduler config's {f}"
                    ));
                }
                (p, PredictionSource::Option)
            }
            (None, Some(p)) => (p, PredictionSource::SchedulerConfig),
            (None, None) => {
                notes.push(
                    "prediction type not known (single files do not record it); assuming \
                     epsilon — pass the v-prediction option for SD2 768-v models"
                        .into(),
                );
                (Prediction::Epsilon, PredictionSource::AssumedDefault)
            }
        };
        let vae = match &options.vae {
            Some(v) => {
                let groups_overridden = options
                    .config_overrides
                    .get(&Component::Vae)
                    .is_some_and(|m| m.contains_key("norm_num_groups"));
                let vae = SeparateVae::open(
                    v,
                    architecture,
                    prediction,
                    options.variant.as_deref(),
                    groups_overridden,
                )?;
                notes.extend(vae.notes.iter().cloned());
                Some(vae)
            }
            None => None,
        };
        Ok(Self {
            path: root,
            options,
            architecture,
            prediction,
            prediction_source,
            inner,
            vae,
            configs,
            notes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The options it was opened with.
    pub fn options(&self) -> &LoadOptions {
        &self.options
    }

    pub fn format(&self) -> SourceFormat {
        match self.inner {
            Inner::Folder(_) => SourceFormat::DiffusersFolder,
            Inner::Single(_) => SourceFormat::SingleFile,
        }
    }

    pub fn architecture(&self) -> Architecture {
        self.architecture
    }

    /// The prediction type to train with (see [`prediction_source`](Self::prediction_source)).
    pub fn prediction(&self) -> Prediction {
        self.prediction
    }

    pub fn prediction_source(&self) -> PredictionSource {
        self.prediction_source
    }

    /// Things the user may want to know: assumptions made, variants chosen, keys ignored.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The components present, in [`Component::ALL`] order.
    pub fn components(&self) -> Vec<Component> {
        let mut components: BTreeSet<Component> = match &self.inner {
            Inner::Folder(f) => f.components.keys().copied().collect(),
            Inner::Single(s) => s.weights.keys().copied().collect(),
        };
        if self.vae.is_some() {
            components.insert(Component::Vae);
        }
        components.into_iter().collect()
    }

    /// The tokenizer folder for a text encoder (`tokenizer/`, `tokenizer_2/`), when the model
    /// has one. Single files never do: use the embedded CLIP vocabulary.
    pub fn tokenizer_dir(&self, text_encoder: Component) -> Option<&Path> {
        match &self.inner {
            Inner::Folder(f) => f.tokenizers.get(&text_encoder).map(PathBuf::as_path),
            Inner::Single(_) => None,
        }
    }

    /// `scheduler/scheduler_config.json` of a folder.
    pub fn scheduler_config(&self) -> Option<&Value> {
        match &self.inner {
            Inner::Folder(f) => f.scheduler_config.as_ref(),
            Inner::Single(_) => None,
        }
    }

    /// The weights of `component` (converted to diffusers names).
    pub fn weights(&self, component: Component) -> Result<&ComponentWeights, LoadError> {
        if let (Component::Vae, Some(vae)) = (component, &self.vae) {
            return Ok(&vae.weights);
        }
        let found = match &self.inner {
            Inner::Folder(f) => f.components.get(&component).map(|c| &c.weights),
            Inner::Single(s) => {
                if !s.convertible {
                    return Err(s.unsupported());
                }
                s.weights.get(&component)
            }
        };
        found.ok_or_else(|| self.missing(component))
    }

    /// The config of `component`: the folder's `config.json`, or inferred from a single file's
    /// shapes; [`LoadOptions::config_overrides`] applied.
    pub fn config(&self, component: Component) -> Result<Value, LoadError> {
        let given = match (component, &self.vae) {
            (Component::Vae, Some(vae)) => Some(vae.config.clone()),
            _ => self.configs.get(&component).cloned(),
        };
        let mut config = match given {
            Some(config) => config,
            None => match &self.inner {
                Inner::Folder(f) => f
                    .components
                    .get(&component)
                    .map(|c| c.config.clone())
                    .ok_or_else(|| self.missing(component))?,
                Inner::Single(s) => {
                    if s.convertible && !s.weights.contains_key(&component) {
                        return Err(self.missing(component));
                    }
                    s.config(component, self.prediction, &self.options)?
                }
            },
        };
        if let (Some(overrides), Value::Object(map)) =
            (self.options.config_overrides.get(&component), &mut config)
        {
            for (k, v) in overrides {
                map.insert(k.clone(), v.clone());
            }
        }
        Ok(config)
    }

    /// Config and weights of `component`, ready to build.
    pub fn component(&self, component: Component) -> Result<LoadedComponent, LoadError> {
        Ok(LoadedComponent {
            component,
            config: self.config(component)?,
            weights: self.weights(component)?.clone(),
        })
    }

    /// Architecture, prediction, dtypes and exact parameter counts, from headers only.
    pub fn inspect(&self) -> ModelInfo {
        let mut components = Vec::new();
        let per_component: Vec<(Component, &ComponentWeights)> = match &self.inner {
            Inner::Folder(f) => f
                .components
                .iter()
                .map(|(c, fc)| (*c, &fc.weights))
                .collect(),
            Inner::Single(s) => s.weights.iter().map(|(c, w)| (*c, w)).collect(),
        };
        let mut per_component = per_component;
        if let Some(vae) = &self.vae {
            per_component.retain(|(c, _)| *c != Component::Vae);
            per_component.push((Component::Vae, &vae.weights));
            per_component.sort_by_key(|(c, _)| *c);
        }
        let mut all_dtypes = BTreeSet::new();
        for (component, weights) in per_component {
            let dtypes = weights.dtypes();
            all_dtypes.extend(dtypes.iter().cloned());
            components.push(ComponentInfo {
                component,
                parameters: weights.parameter_count(),
                tensors: weights.len(),
                dtypes,
                files: weights.files(),
            });
        }
        ModelInfo {
            path: self.path.clone(),
            format: self.format(),
            architecture: self.architecture,
            prediction: self.prediction,
            prediction_source: self.prediction_source,
            dtypes: all_dtypes.into_iter().collect(),
            total_parameters: components.iter().map(|c| c.parameters).sum(),
            components,
            notes: self.notes.clone(),
        }
    }

    fn missing(&self, component: Component) -> LoadError {
        let available: Vec<String> = self.components().iter().map(|c| c.to_string()).collect();
        LoadError::MissingComponent {
            path: self.path.clone(),
            component: component.to_string(),
            available: available.join(", "),
        }
    }
}

/// The component configs of a [`LoadOptions::config_dir`] folder and its scheduler's prediction
/// type. Needs at least one `COMPONENT/config.json`.
fn read_config_dir(
    dir: &Path,
    notes: &mut Vec<String>,
) -> Result<(BTreeMap<Component, Value>, Option<Prediction>), LoadError> {
    if !dir.is_dir() {
        return Err(LoadError::NotAModel {
            path: dir.to_path_buf(),
            reason: "model.config: expected a diffusers folder holding unet/config.json,                      text_encoder/config.json, … (weights are not needed)"
                .into(),
        });
    }
    let mut configs = BTreeMap::new();
    for component in Component::ALL {
        let path = dir.join(component.folder_name()).join("config.json");
        if path.is_file() {
            configs.insert(component, folder::read_json(&path)?);
        }
    }
    if configs.is_empty() {
        return Err(LoadError::MissingFile {
            file: dir.join("unet").join("config.json"),
            what: "model.config names a folder without any COMPONENT/config.json".into(),
        });
    }
    let scheduler = dir.join("scheduler").join("scheduler_config.json");
    let prediction = if scheduler.is_file() {
        match folder::read_json(&scheduler)?
            .get("prediction_type")
            .and_then(Value::as_str)
        {
            Some("v_prediction") => Some(Prediction::V),
            Some("epsilon") => Some(Prediction::Epsilon),
            _ => None,
        }
    } else {
        None
    };
    let names: Vec<String> = configs.keys().map(|c| c.to_string()).collect();
    notes.push(format!(
        "configs of {} from {}",
        names.join(", "),
        dir.display()
    ));
    Ok((configs, prediction))
}

/// Opens `path` and describes it (the `sd-lora inspect MODEL` report).
pub fn inspect(path: impl AsRef<Path>, options: LoadOptions) -> Result<ModelInfo, LoadError> {
    Ok(ModelSource::open_with(path, options)?.inspect())
}

/// What `sd-lora inspect` prints; `serde_json::to_string_pretty` gives the `--json` form.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub format: SourceFormat,
    pub architecture: Architecture,
    pub prediction: Prediction,
    pub prediction_source: PredictionSource,
    /// Every stored dtype (safetensors names: `F32`, `F16`, `BF16`, ...), sorted.
    pub dtypes: Vec<String>,
    pub components: Vec<ComponentInfo>,
    pub total_parameters: u64,
    pub notes: Vec<String>,
}

/// One component's line of [`ModelInfo`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComponentInfo {
    pub component: Component,
    /// Exact number of parameter elements (buffers excluded).
    pub parameters: u64,
    pub tensors: usize,
    pub dtypes: Vec<String>,
    pub files: Vec<PathBuf>,
}

/// SDXL if it has a second text encoder or SDXL's added embeddings; SD2 if the text encoder is
/// OpenCLIP's (GELU) or, without a text encoder config, the UNet uses linear projections; else
/// SD1.
fn folder_architecture(folder: &Folder) -> Architecture {
    let config = |c: Component| folder.components.get(&c).map(|fc| &fc.config);
    let unet = config(Component::Unet);
    if folder.components.contains_key(&Component::TextEncoder2)
        || unet
            .and_then(|u| u.get("addition_embed_type"))
            .and_then(Value::as_str)
            == Some("text_time")
    {
        return Architecture::Sdxl;
    }
    match config(Component::TextEncoder)
        .and_then(|t| t.get("hidden_act"))
        .and_then(Value::as_str)
    {
        Some("gelu") => Architecture::Sd2,
        Some(_) => Architecture::Sd1,
        None => {
            if unet
                .and_then(|u| u.get("use_linear_projection"))
                .and_then(Value::as_bool)
                == Some(true)
            {
                Architecture::Sd2
            } else {
                Architecture::Sd1
            }
        }
    }
}
