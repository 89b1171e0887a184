//! Reading a TOML config file for `check-data`: parse, make relative paths
//! relative to the file, apply `--set` overrides, check every key and value
//! with the training config (so a full training config is accepted, and a
//! typo in any section is reported), and take its `[dataset]`.

use anyhow::{Context, Result, bail};
use sd_lora_data::DatasetConfig;
use sd_lora_train::config::{SECTIONS, TrainConfig, kohya_dataset_document, resolve_paths};
use sd_lora_train::{kohya_dataset, overrides};
use std::path::{Path, PathBuf};
use toml::Table;

/// Reads `path` (if any), resolves the paths written in it against its
/// folder, applies `sets` (whose paths stay relative to the working
/// directory), and returns the document with the folder of the file.
pub fn load_document(path: Option<&Path>, sets: &[String]) -> Result<(Table, PathBuf)> {
    let (mut doc, base) = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| {
                format!("cannot read config file {} (check the path)", p.display())
            })?;
            let mut doc: Table = text
                .parse()
                .with_context(|| format!("{} is not valid TOML", p.display()))?;
            let base = p.parent().map(Path::to_path_buf).unwrap_or_default();
            if kohya_dataset::is_kohya_dataset_config(&doc) {
                doc = kohya_dataset_document(p);
            } else {
                resolve_paths(&mut doc, &base);
            }
            (doc, base)
        }
        None => (Table::new(), PathBuf::new()),
    };
    overrides::apply_all(&mut doc, sets)?;
    for note in kohya_dataset::expand(&mut doc)? {
        eprintln!("note: {note}");
    }
    for key in doc.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            bail!(
                "unknown config section `{key}`{}; allowed: {}",
                path.map(|p| format!(" in {}", p.display()))
                    .unwrap_or_default(),
                SECTIONS.join(", ")
            );
        }
    }
    Ok((doc, base))
}

/// The `[dataset]` table of `doc` after the whole document has been checked
/// as a training config (keys and values of every section). Paths were made
/// relative to the file by [`load_document`]; `_base` is kept for callers.
/// When the document names a model and no resolution, the model's native
/// resolution is used, as `train` does (the model's headers are read).
pub fn dataset_config(doc: &Table, _base: &Path, origin: &str) -> Result<DatasetConfig> {
    let mut cfg = TrainConfig::from_document(doc.clone(), origin)?;
    cfg.validate()?;
    if cfg.given.contains("model.path") {
        let facts = crate::train_cmd::model_facts(&cfg)?;
        if let Some(note) = cfg.apply_model_defaults(facts.native_resolution()) {
            eprintln!("{note}");
            cfg.validate()?;
        }
    }
    Ok(cfg.dataset)
}
