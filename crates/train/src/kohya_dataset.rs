//! kohya sd-scripts dataset configs (`--dataset_config`), read as they are.
//!
//! A kohya dataset config has a `[general]` table, `[[datasets]]` and, in
//! each, `[[datasets.subsets]]`; a value is looked up in the subset, then its
//! dataset, then `[general]`. [`expand`] translates one into the
//! `[dataset]` (and `train.batch_size`, `train.validation_split`) keys of
//! our own config and merges them *under* the document: keys the user wrote
//! in our config or gave on the command line win. Keys kohya knows that we
//! do not use are listed in notes (never silently dropped); keys kohya does
//! not know are errors, as they are in kohya.
//!
//! Paths (`image_dir`) are used as kohya uses them, relative to the working
//! directory; a relative path that does not exist there but does beside the
//! kohya file is taken from there.

use std::path::{Path, PathBuf};

use toml::{Table, Value};

use crate::config::ConfigError;

/// Subset keys we translate.
const SUBSET_KEYS: &[&str] = &[
    "image_dir",
    "class_tokens",
    "is_reg",
    "num_repeats",
    "caption_extension",
    "shuffle_caption",
    "keep_tokens",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
    "flip_aug",
    "random_crop",
    "alpha_mask",
];

/// Dataset keys we translate.
const DATASET_KEYS: &[&str] = &[
    "resolution",
    "batch_size",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "bucket_no_upscale",
    "validation_split",
];

/// kohya keys sd-lora does not use, with what to know about each.
const IGNORED: &[(&str, &str)] = &[
    ("color_aug", "colour augmentation is not implemented"),
    (
        "face_crop_aug_range",
        "face-crop augmentation is not implemented",
    ),
    ("token_warmup_min", "token warm-up is not implemented"),
    ("token_warmup_step", "token warm-up is not implemented"),
    ("caption_dropout_every_n_epochs", "use caption_dropout_rate"),
    ("keep_tokens_separator", "use keep_tokens"),
    ("secondary_separator", "tags are split on commas only"),
    ("enable_wildcard", "wildcard captions are not implemented"),
    ("caption_prefix", "write the prefix into the captions"),
    ("caption_suffix", "write the suffix into the captions"),
    ("cache_info", "sd-lora caches latents by its own rules"),
    ("custom_attributes", "not used"),
    ("network_multiplier", "not used"),
    ("debug_dataset", "use `sd-lora check-data`"),
    (
        "validation_seed",
        "the validation set is drawn with train.seed",
    ),
    (
        "max_token_length",
        "prompts of any length are split into 77-token chunks",
    ),
];

/// kohya keys of datasets sd-lora cannot train on, with why.
const REFUSED: &[(&str, &str)] = &[
    (
        "metadata_file",
        "fine-tuning datasets (captions in a metadata JSON) are not supported; use caption files",
    ),
    (
        "conditioning_data_dir",
        "ControlNet datasets are not supported",
    ),
];

/// Whether a parsed TOML document is a kohya dataset config (its top level
/// has `general` or `datasets`) rather than one of ours.
pub fn is_kohya_dataset_config(doc: &Table) -> bool {
    doc.contains_key("datasets") || doc.contains_key("general")
}

fn bad(path: &Path, key: &str, value: &Value, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: format!("{key} (in {})", path.display()),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// A kohya file translated: the fragment of our config it gives, and notes.
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    /// `{dataset = {...}, train = {...}}`.
    pub fragment: Table,
    pub notes: Vec<String>,
}

/// Reads and translates the kohya dataset config at `path`.
pub fn translate_file(path: &Path) -> Result<Translated, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let doc: Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })?;
    translate(&doc, path)
}

/// Translates a parsed kohya dataset config (`path` names it in messages
/// and locates relative folders).
pub fn translate(doc: &Table, path: &Path) -> Result<Translated, ConfigError> {
    let mut notes = Vec::new();
    let empty = Table::new();
    for key in doc.keys() {
        if key != "general" && key != "datasets" {
            return Err(bad(
                path,
                key,
                &doc[key],
                "a kohya dataset config has only [general] and [[datasets]] at the top",
            ));
        }
    }
    let general = match doc.get("general") {
        Some(Value::Table(t)) => t,
        Some(v) => return Err(bad(path, "general", v, "must be a table")),
        None => &empty,
    };
    let datasets: Vec<&Table> = match doc.get("datasets") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|d| match d {
                Value::Table(t) => Ok(t),
                v => Err(bad(
                    path,
                    "datasets",
                    v,
                    "each [[datasets]] must be a table",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(bad(path, "datasets", v, "write [[datasets]] tables")),
        None => Vec::new(),
    };
    if datasets.is_empty() {
        return Err(ConfigError::Invalid {
            key: format!("datasets (in {})", path.display()),
            value: "(none)".into(),
            reason: "the file has no [[datasets]] table; add one with [[datasets.subsets]]".into(),
        });
    }
    // Every key anywhere must be one kohya has.
    let mut ignored: std::collections::BTreeSet<&str> = Default::default();
    let mut check_keys = |table: &Table, place: &str, allow_subsets: bool| {
        for (k, v) in table {
            if SUBSET_KEYS.contains(&k.as_str())
                || DATASET_KEYS.contains(&k.as_str())
                || (allow_subsets && k == "subsets")
            {
                continue;
            }
            if let Some((_, why)) = REFUSED.iter().find(|(r, _)| r == k) {
                return Err(bad(path, &format!("{place}{k}"), v, *why));
            }
            if let Some((name, _)) = IGNORED.iter().find(|(i, _)| i == k) {
                ignored.insert(name);
                continue;
            }
            return Err(bad(
                path,
                &format!("{place}{k}"),
                v,
                format!(
                    "not a kohya dataset option; sd-lora reads {}, {} and lists {} as ignored",
                    SUBSET_KEYS.join(", "),
                    DATASET_KEYS.join(", "),
                    IGNORED
                        .iter()
                        .map(|(k, _)| *k)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        Ok(())
    };
    check_keys(general, "general.", false)?;
    for (i, d) in datasets.iter().enumerate() {
        check_keys(d, &format!("datasets[{i}]."), true)?;
        if let Some(Value::Array(subsets)) = d.get("subsets") {
            for (j, s) in subsets.iter().enumerate() {
                match s {
                    Value::Table(t) => {
                        check_keys(t, &format!("datasets[{i}].subsets[{j}]."), false)?
                    }
                    v => {
                        return Err(bad(
                            path,
                            &format!("datasets[{i}].subsets"),
                            v,
                            "each [[datasets.subsets]] must be a table",
                        ));
                    }
                }
            }
        }
    }
    for name in &ignored {
        let why = IGNORED
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, w)| *w)
            .unwrap_or("");
        notes.push(format!("{}: `{name}` ignored ({why})", path.display()));
    }

    // Dataset-level values: one run trains one dataset, so every [[datasets]]
    // must agree on them.
    let lookup = |key: &str, tables: &[&Table]| -> Option<Value> {
        tables.iter().find_map(|t| t.get(key).cloned())
    };
    let mut dataset = Table::new();
    let mut train = Table::new();
    for key in DATASET_KEYS {
        let values: Vec<Option<Value>> = datasets
            .iter()
            .map(|d| lookup(key, &[d, general]))
            .collect();
        if values.windows(2).any(|w| w[0] != w[1]) {
            return Err(ConfigError::Invalid {
                key: format!("datasets.{key} (in {})", path.display()),
                value: values
                    .iter()
                    .map(|v| v.as_ref().map_or("(unset)".into(), Value::to_string))
                    .collect::<Vec<_>>()
                    .join(" / "),
                reason: "sd-lora trains one dataset per run: give every [[datasets]] the same \
                         value, or train them in separate runs"
                    .into(),
            });
        }
        let Some(value) = values.into_iter().next().flatten() else {
            continue;
        };
        match *key {
            "resolution" => {
                let side = match &value {
                    Value::Integer(n) => Some(*n),
                    Value::Array(a) => match a.as_slice() {
                        [Value::Integer(w), Value::Integer(h)] if w == h => Some(*w),
                        _ => None,
                    },
                    _ => None,
                };
                let side = side.ok_or_else(|| {
                    bad(
                        path,
                        "resolution",
                        &value,
                        "sd-lora trains at a square resolution (one number, or [N, N]); \
                         aspect ratios come from the buckets",
                    )
                })?;
                dataset.insert("resolution".into(), Value::Integer(side));
            }
            "enable_bucket" => {
                dataset.insert("bucketing".into(), value);
            }
            "min_bucket_reso" => {
                dataset.insert("min_bucket_side".into(), value);
            }
            "max_bucket_reso" => {
                dataset.insert("max_bucket_side".into(), value);
            }
            "bucket_reso_steps" => {
                dataset.insert("bucket_step".into(), value);
            }
            "bucket_no_upscale" => {
                dataset.insert("bucket_no_upscale".into(), value);
            }
            "batch_size" => {
                train.insert("batch_size".into(), value);
            }
            "validation_split" => {
                train.insert("validation_split".into(), value);
            }
            _ => {}
        }
    }
    // kohya buckets only when asked.
    dataset.entry("bucketing").or_insert(Value::Boolean(false));

    let kohya_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut subsets = Vec::new();
    let mut random_crop = Vec::new();
    let mut alpha_mask = Vec::new();
    for (i, d) in datasets.iter().enumerate() {
        let list = match d.get("subsets") {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_table).collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        if list.is_empty() {
            return Err(ConfigError::Invalid {
                key: format!("datasets[{i}].subsets (in {})", path.display()),
                value: "(none)".into(),
                reason: "each [[datasets]] needs at least one [[datasets.subsets]] with an \
                         image_dir"
                    .into(),
            });
        }
        for (j, s) in list.into_iter().enumerate() {
            let chain = [s, *d, general];
            let at = |k: &str| lookup(k, &chain);
            let Some(Value::String(dir)) = at("image_dir") else {
                return Err(ConfigError::Invalid {
                    key: format!(
                        "datasets[{i}].subsets[{j}].image_dir (in {})",
                        path.display()
                    ),
                    value: at("image_dir").map_or("(unset)".into(), |v| v.to_string()),
                    reason: "every subset needs image_dir, the folder of its images".into(),
                });
            };
            let mut sub = Table::new();
            sub.insert(
                "path".into(),
                Value::String(locate(&dir, &kohya_dir).to_string_lossy().into_owned()),
            );
            sub.insert("layout".into(), Value::String("images".into()));
            let is_reg = matches!(at("is_reg"), Some(Value::Boolean(true)));
            sub.insert(
                "kind".into(),
                Value::String(if is_reg { "class" } else { "instance" }.into()),
            );
            sub.insert(
                "repeats".into(),
                at("num_repeats").unwrap_or(Value::Integer(1)),
            );
            if let Some(v) = at("class_tokens") {
                sub.insert("caption".into(), v);
            }
            for (kohya, ours) in [
                ("caption_extension", "caption_extension"),
                ("shuffle_caption", "shuffle_caption"),
                ("keep_tokens", "keep_tokens"),
                ("caption_dropout_rate", "caption_dropout_rate"),
                ("caption_tag_dropout_rate", "caption_tag_dropout_rate"),
                ("flip_aug", "flip"),
            ] {
                if let Some(v) = at(kohya) {
                    sub.insert(ours.into(), v);
                }
            }
            random_crop.push(matches!(at("random_crop"), Some(Value::Boolean(true))));
            alpha_mask.push(matches!(at("alpha_mask"), Some(Value::Boolean(true))));
            subsets.push(Value::Table(sub));
        }
    }
    if random_crop.iter().any(|&r| r) {
        dataset.insert("crop".into(), Value::String("random".into()));
        if !random_crop.iter().all(|&r| r) {
            notes.push(format!(
                "{}: random_crop is on for some subsets: sd-lora crops every subset at random \
                 (`dataset.crop` is one setting per run)",
                path.display()
            ));
        }
    }
    if alpha_mask.iter().any(|&r| r) {
        dataset.insert("alpha_mask".into(), Value::Boolean(true));
        if !alpha_mask.iter().all(|&r| r) {
            notes.push(format!(
                "{}: alpha_mask is on for some subsets: sd-lora uses the alpha channel of every \
                 subset's images (`dataset.alpha_mask` is one setting per run)",
                path.display()
            ));
        }
    }
    dataset.insert("subsets".into(), Value::Array(subsets));
    let mut fragment = Table::new();
    fragment.insert("dataset".into(), Value::Table(dataset));
    if !train.is_empty() {
        fragment.insert("train".into(), Value::Table(train));
    }
    Ok(Translated { fragment, notes })
}

/// `dir` as kohya would open it (relative to the working directory), or
/// beside the kohya file when only that exists.
fn locate(dir: &str, kohya_dir: &Path) -> PathBuf {
    let p = PathBuf::from(dir);
    if p.is_absolute() || p.exists() {
        return p;
    }
    let beside = kohya_dir.join(&p);
    if beside.exists() {
        crate::config::clean(&beside)
    } else {
        p
    }
}

/// If `doc` names a kohya dataset config (`dataset.kohya_config`), merges
/// its translation under `doc`: keys `doc` already has win, except that
/// subsets come from one place only. The `kohya_config` key is removed, so
/// the resolved config (`--dry-run`) is complete without the kohya file.
/// Returns the notes to show.
pub fn expand(doc: &mut Table) -> Result<Vec<String>, ConfigError> {
    let Some(file) = doc
        .get_mut("dataset")
        .and_then(Value::as_table_mut)
        .and_then(|d| d.remove("kohya_config"))
    else {
        return Ok(Vec::new());
    };
    let Some(file) = file.as_str().map(PathBuf::from) else {
        return Err(ConfigError::Invalid {
            key: "dataset.kohya_config".into(),
            value: file.to_string(),
            reason: "must be the path of a kohya dataset config (a string)".into(),
        });
    };
    let t = translate_file(&file)?;
    for (section, values) in t.fragment {
        let Value::Table(values) = values else {
            continue;
        };
        let target = doc
            .entry(section.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        let Value::Table(target) = target else {
            continue;
        };
        for (k, v) in values {
            if k == "subsets"
                && target
                    .get("subsets")
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty())
            {
                return Err(ConfigError::Invalid {
                    key: "dataset.subsets".into(),
                    value: "(given twice)".into(),
                    reason: format!(
                        "the subsets come from the kohya dataset config {}; remove \
                         [[dataset.subsets]] / --data, or the kohya_config",
                        file.display()
                    ),
                });
            }
            target.entry(k).or_insert(v);
        }
    }
    Ok(t.notes)
}
