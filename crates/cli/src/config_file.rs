//! Reading a TOML config file: parse, apply `--set` overrides, check keys,
//! and make relative paths relative to the file.

use crate::overrides;
use anyhow::{Context, Result, bail};
use sd_lora_data::DatasetConfig;
use std::path::{Path, PathBuf};
use toml::Table;

/// Top-level tables the config may hold.
const SECTIONS: &[&str] = &["dataset"];

/// Reads `path` (if any), applies `sets`, and returns the document with the
/// folder relative paths should be resolved against.
pub fn load_document(path: Option<&Path>, sets: &[String]) -> Result<(Table, PathBuf)> {
    let (mut doc, base) = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| {
                format!("cannot read config file {} (check the path)", p.display())
            })?;
            let doc: Table = text
                .parse()
                .with_context(|| format!("{} is not valid TOML", p.display()))?;
            let base = p.parent().map(Path::to_path_buf).unwrap_or_default();
            (doc, base)
        }
        None => (Table::new(), PathBuf::new()),
    };
    overrides::apply_all(&mut doc, sets)?;
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

/// The `[dataset]` table as a typed config, relative subset paths joined to `base`.
pub fn dataset_config(doc: &Table, base: &Path, origin: &str) -> Result<DatasetConfig> {
    let table = doc
        .get("dataset")
        .cloned()
        .unwrap_or(toml::Value::Table(Table::new()));
    // serde_path_to_error names the offending key (`dataset.subsets[0].kind`),
    // which a plain conversion from a merged TOML value would lose.
    let mut cfg: DatasetConfig = serde_path_to_error::deserialize(table).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." {
            "dataset".to_string()
        } else {
            format!("dataset.{path}")
        };
        anyhow::anyhow!("`{key}` in {origin}: {}", e.inner().message())
    })?;
    for s in &mut cfg.subsets {
        if s.path.is_relative() && !base.as_os_str().is_empty() {
            s.path = clean(&base.join(&s.path));
        }
    }
    Ok(cfg)
}

/// Removes `.` and `name/..` pairs without touching the file system, so
/// `configs/../assets/x` is shown as `assets/x` (links are not resolved: a
/// leading `..` is kept).
fn clean(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component> = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            // `/..` is `/`.
            Component::ParentDir if matches!(out.last(), Some(Component::RootDir)) => {}
            other => out.push(other),
        }
    }
    if out.is_empty() {
        return PathBuf::from(".");
    }
    out.iter().collect()
}

#[cfg(test)]
mod tests {
    use super::clean;
    use std::path::Path;

    #[test]
    fn lexical_cleaning() {
        assert_eq!(
            clean(Path::new("configs/../assets/x")),
            Path::new("assets/x")
        );
        assert_eq!(clean(Path::new("../a/./b")), Path::new("../a/b"));
        assert_eq!(clean(Path::new("/a/b/../../..")), Path::new("/"));
        assert_eq!(clean(Path::new("a/..")), Path::new("."));
    }
}
