//! diffusers folders: `model_index.json` and one sub-folder per component.
//!
//! Each component folder holds a `config.json` (passed through untouched: it *is* the config the
//! component builds from) and weights under one of these names, `BASE` being
//! `diffusion_pytorch_model` (diffusers) or `model` (transformers):
//!
//! * `BASE.safetensors`, or sharded: `BASE.safetensors.index.json` naming the shards;
//! * variants: `BASE.VARIANT.safetensors`, `BASE.safetensors.index.VARIANT.json` (diffusers) or
//!   `BASE.VARIANT.safetensors.index.json`.
//!
//! Without a requested variant the full-precision file wins; a variant (fp16 first) is used only
//! when no full file exists, and a note says so. With a requested variant that variant wins and
//! the full file is the fallback. Pickled weights (`*.bin`, `*.ckpt`, ...) are refused by name,
//! never opened.
//!
//! Text-encoder keys are normalised to the `text_model.` form (see
//! [`ldm_keys::clip`]) and buffers such as `position_ids` dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::error::LoadError;
use super::ldm_keys::{self, Rename};
use super::safetensors_file::SafetensorsFile;
use super::weights::{ComponentWeights, WeightEntry};
use super::{Component, Prediction};

/// Extensions of pickled weight files.
pub(crate) const PICKLE_EXTENSIONS: [&str; 6] = ["ckpt", "pt", "pth", "bin", "pkl", "pickle"];

/// One component of a folder.
#[derive(Debug)]
pub(crate) struct FolderComponent {
    pub config: Value,
    pub weights: ComponentWeights,
}

/// An opened diffusers folder.
#[derive(Debug)]
pub(crate) struct Folder {
    pub components: BTreeMap<Component, FolderComponent>,
    pub tokenizers: BTreeMap<Component, PathBuf>,
    pub scheduler_config: Option<Value>,
    /// `prediction_type` from `scheduler/scheduler_config.json`, when the folder has one.
    pub prediction: Option<Prediction>,
    pub notes: Vec<String>,
}

impl Folder {
    pub(crate) fn open(root: &Path, variant: Option<&str>) -> Result<Self, LoadError> {
        let index_path = root.join("model_index.json");
        if !index_path.is_file() {
            let hint = if root.join("config.json").is_file() {
                "this looks like one component folder; give its parent, the folder holding \
                 model_index.json"
            } else {
                "not a diffusers folder (no model_index.json)"
            };
            return Err(LoadError::NotAModel {
                path: root.to_path_buf(),
                reason: hint.into(),
            });
        }
        let model_index = read_json(&index_path)?;
        let mut notes = Vec::new();
        let mut components = BTreeMap::new();
        for component in Component::ALL {
            let name = component.folder_name();
            if !listed(&model_index, name) {
                continue;
            }
            let dir = root.join(name);
            let config_path = dir.join("config.json");
            if !config_path.is_file() {
                return Err(LoadError::MissingFile {
                    file: config_path,
                    what: format!("model_index.json lists {name}"),
                });
            }
            let config = read_json(&config_path)?;
            let files = find_weight_files(&dir, variant, &mut notes)?;
            let weights = open_weights(component, &files)?;
            components.insert(component, FolderComponent { config, weights });
        }
        if !components.contains_key(&Component::Unet) {
            let class = model_index
                .get("_class_name")
                .and_then(Value::as_str)
                .unwrap_or("?");
            return Err(LoadError::NotAModel {
                path: root.to_path_buf(),
                reason: format!(
                    "model_index.json ({class}) lists no unet; not a Stable Diffusion 1/2/XL \
                     pipeline{}",
                    super::single_file::SUPPORTED
                ),
            });
        }
        if let Some(channels) = components[&Component::Unet]
            .config
            .get("in_channels")
            .and_then(Value::as_u64)
            .filter(|&c| c != 4)
        {
            return Err(LoadError::Unsupported {
                path: root.to_path_buf(),
                what: format!(
                    "{}{}",
                    super::single_file::unet_input_kind(channels as usize),
                    super::single_file::SUPPORTED
                ),
            });
        }
        let mut tokenizers = BTreeMap::new();
        for (component, name) in [
            (Component::TextEncoder, "tokenizer"),
            (Component::TextEncoder2, "tokenizer_2"),
        ] {
            if root.join(name).is_dir() {
                tokenizers.insert(component, root.join(name));
            }
        }
        let scheduler_path = root.join("scheduler").join("scheduler_config.json");
        let (scheduler_config, prediction) = if scheduler_path.is_file() {
            let config = read_json(&scheduler_path)?;
            let prediction = match config.get("prediction_type").and_then(Value::as_str) {
                None | Some("epsilon") => Prediction::Epsilon,
                Some("v_prediction") => Prediction::V,
                Some(other) => {
                    return Err(LoadError::InvalidConfig {
                        file: scheduler_path,
                        reason: format!(
                            "prediction_type `{other}` is not supported (epsilon or v_prediction)"
                        ),
                    });
                }
            };
            (Some(config), Some(prediction))
        } else {
            (None, None)
        };
        Ok(Self {
            components,
            tokenizers,
            scheduler_config,
            prediction,
            notes,
        })
    }
}

/// Whether `model_index.json` lists component `name` with a non-null library and class.
fn listed(index: &Value, name: &str) -> bool {
    match index.get(name) {
        Some(Value::Array(parts)) => !parts.is_empty() && parts.iter().all(|p| !p.is_null()),
        _ => false,
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| LoadError::InvalidConfig {
        file: path.to_path_buf(),
        reason: format!("invalid JSON: {e}"),
    })
}

const BASES: [&str; 2] = ["diffusion_pytorch_model", "model"];

/// The weight files of one component: one file, or the shards of an index with the index's
/// `weight_map` (key → shard), which is checked against the shards once they are open.
pub(crate) struct WeightFiles {
    files: Vec<PathBuf>,
    index: Option<(PathBuf, BTreeMap<String, PathBuf>)>,
}

impl WeightFiles {
    /// One unsharded file.
    pub(crate) fn single(path: PathBuf) -> Self {
        Self {
            files: vec![path],
            index: None,
        }
    }
}

/// Finds the weight files of one component folder.
pub(crate) fn find_weight_files(
    dir: &Path,
    variant: Option<&str>,
    notes: &mut Vec<String>,
) -> Result<WeightFiles, LoadError> {
    let names: BTreeSet<String> = std::fs::read_dir(dir)
        .map_err(|e| LoadError::io(dir, e))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    let component = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();

    // Variants present: `BASE.V.safetensors`, `BASE.safetensors.index.V.json`,
    // `BASE.V.safetensors.index.json`.
    let mut variants: BTreeSet<String> = BTreeSet::new();
    for name in &names {
        for base in BASES {
            let Some(rest) = name.strip_prefix(base).and_then(|r| r.strip_prefix('.')) else {
                continue;
            };
            let v = rest
                .strip_suffix(".safetensors.index.json")
                .or_else(|| rest.strip_suffix(".safetensors"))
                .or_else(|| {
                    rest.strip_prefix("safetensors.index.")
                        .and_then(|r| r.strip_suffix(".json"))
                });
            if let Some(v) = v.filter(|v| !v.is_empty() && !v.contains('.') && !v.contains('-')) {
                variants.insert(v.to_string());
            }
        }
    }

    let mut order: Vec<Option<String>> = Vec::new();
    match variant {
        Some(v) => {
            order.push(Some(v.to_string()));
            order.push(None);
        }
        None => {
            order.push(None);
            if variants.contains("fp16") {
                order.push(Some("fp16".into()));
            }
            order.extend(variants.iter().filter(|v| *v != "fp16").cloned().map(Some));
        }
    }
    for (rank, choice) in order.iter().enumerate() {
        for base in BASES {
            let (single, indexes) = match choice {
                None => (
                    format!("{base}.safetensors"),
                    vec![format!("{base}.safetensors.index.json")],
                ),
                Some(v) => (
                    format!("{base}.{v}.safetensors"),
                    vec![
                        format!("{base}.safetensors.index.{v}.json"),
                        format!("{base}.{v}.safetensors.index.json"),
                    ],
                ),
            };
            let found = if names.contains(&single) {
                Some(WeightFiles {
                    files: vec![dir.join(&single)],
                    index: None,
                })
            } else if let Some(index) = indexes.iter().find(|i| names.contains(*i)) {
                Some(shards(&dir.join(index))?)
            } else {
                None
            };
            if let Some(files) = found {
                if rank > 0 {
                    let what = match (variant, choice) {
                        (Some(v), None) => {
                            format!("no {v} variant, using the full-precision weights")
                        }
                        (_, Some(v)) => format!("no full-precision weights, using the {v} variant"),
                        (None, None) => String::new(),
                    };
                    notes.push(format!("{component}: {what}"));
                }
                return Ok(files);
            }
        }
    }
    // No safetensors: name the pickle if there is one, so the user knows what to convert.
    if let Some(pickle) = names.iter().find(|n| {
        Path::new(n)
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| PICKLE_EXTENSIONS.contains(&e))
    }) {
        return Err(LoadError::PickleRefused {
            file: dir.join(pickle),
            context: format!(" the only weights in {component}/"),
        });
    }
    Err(LoadError::MissingWeights {
        dir: dir.to_path_buf(),
    })
}

/// The shard files of a `*.safetensors.index.json`, in order.
fn shards(index: &Path) -> Result<WeightFiles, LoadError> {
    let json = read_json(index)?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| LoadError::InvalidConfig {
            file: index.to_path_buf(),
            reason: "no `weight_map` object".into(),
        })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files = BTreeSet::new();
    let mut weight_map = BTreeMap::new();
    for (key, file) in map {
        let file = file.as_str().ok_or_else(|| LoadError::InvalidConfig {
            file: index.to_path_buf(),
            reason: format!("weight_map entry `{key}` is not a file name"),
        })?;
        if file.contains('/') || file.contains('\\') || !file.ends_with(".safetensors") {
            return Err(LoadError::InvalidConfig {
                file: index.to_path_buf(),
                reason: format!(
                    "weight_map entry `{key}` names `{file}`; expected a .safetensors file next to \
                     the index"
                ),
            });
        }
        files.insert(file.to_string());
        weight_map.insert(key.clone(), dir.join(file));
    }
    Ok(WeightFiles {
        files: files.into_iter().map(|f| dir.join(f)).collect(),
        index: Some((index.to_path_buf(), weight_map)),
    })
}

/// Opens the files and tables their tensors under normalised names.
pub(crate) fn open_weights(
    component: Component,
    found: &WeightFiles,
) -> Result<ComponentWeights, LoadError> {
    let mut weights = ComponentWeights::new(component);
    let text = matches!(component, Component::TextEncoder | Component::TextEncoder2);
    for path in &found.files {
        let file = Arc::new(SafetensorsFile::open(path)?);
        if let Some((index, map)) = &found.index {
            // The index promises these keys in this shard; a shard that lacks one is a broken
            // download, better said now than as a missing weight later.
            if let Some(key) = map
                .iter()
                .find(|(k, f)| *f == path && file.get(k).is_none())
                .map(|(k, _)| k)
            {
                return Err(LoadError::MissingKey {
                    file: path.clone(),
                    key: key.clone(),
                    context: format!(" (listed for this shard in {})", index.display()),
                });
            }
        }
        for key in file.tensors().keys() {
            let name = if text {
                match ldm_keys::clip(key) {
                    Rename::To(targets) => targets[0].key.clone(),
                    Rename::Drop(_) => continue,
                    Rename::Unknown => key.clone(),
                }
            } else {
                key.clone()
            };
            let entry = WeightEntry::whole(&file, key).ok_or_else(|| LoadError::MissingKey {
                file: path.clone(),
                key: key.clone(),
                context: String::new(),
            })?;
            weights.insert(name, entry)?;
        }
    }
    Ok(weights)
}
