//! The training config as the page holds it (a JSON object of the keys the
//! user set, by section) turned into the TOML the CLI reads, with every
//! path-valued key confined to the roots; back again for loading a file; and
//! the equivalent command line.

use crate::error::ApiError;
use crate::roots::Roots;
use sd_lora_train::config::{SECTIONS, try_for_each_path};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// JSON → TOML: `null`s are left out (a key not set), integers stay
/// integers. `key` names the value in messages.
fn to_toml(v: &Json, key: &str) -> Result<Option<Value>, ApiError> {
    Ok(Some(match v {
        Json::Null => return Ok(None),
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::Integer(i),
            (None, Some(f)) if n.is_f64() => Value::Float(f),
            _ => return Err(ApiError::bad(format!("`{key}`: {n} is too large")).with_key(key)),
        },
        Json::String(s) => Value::String(s.clone()),
        Json::Array(items) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                if let Some(t) = to_toml(item, &format!("{key}[{i}]"))? {
                    out.push(t);
                }
            }
            Value::Array(out)
        }
        Json::Object(map) => {
            let mut t = Table::new();
            for (k, item) in map {
                if let Some(v) = to_toml(item, &format!("{key}.{k}"))? {
                    t.insert(k.clone(), v);
                }
            }
            Value::Table(t)
        }
    }))
}

/// The page's config as a TOML document. Only known sections; the keys
/// inside are checked by the CLI, which names the wrong ones.
pub fn document(config: &Json) -> Result<Table, ApiError> {
    let Json::Object(map) = config else {
        return Err(ApiError::bad("the config must be an object of sections"));
    };
    let mut doc = Table::new();
    for (section, v) in map {
        if !SECTIONS.contains(&section.as_str()) {
            return Err(ApiError::bad(format!(
                "unknown config section `{section}`; allowed: {}",
                SECTIONS.join(", ")
            )));
        }
        match to_toml(v, section)? {
            Some(Value::Table(t)) if !t.is_empty() => {
                doc.insert(section.clone(), Value::Table(t));
            }
            Some(Value::Table(_)) | None => {}
            Some(_) => {
                return Err(
                    ApiError::bad(format!("`{section}` must be a table of keys"))
                        .with_key(section.clone()),
                );
            }
        }
    }
    Ok(doc)
}

/// Makes every path in `doc` absolute and inside the roots (built-in models
/// are not paths). The error names the key.
pub fn confine_paths(doc: &mut Table, roots: &Roots) -> Result<(), ApiError> {
    try_for_each_path(doc, |key, s| {
        if s.is_empty() || s.starts_with("builtin:") {
            return Ok(());
        }
        let abs = roots
            .resolve(s, &format!("`{key}`"))
            .map_err(|e| e.with_key(key))?;
        *s = abs.to_string_lossy().into_owned();
        Ok(())
    })
}

/// Rewrites absolute paths in `doc` relative to `dir` (where the file is
/// saved) when they lie under it, so a saved config can move with its
/// project; the CLI reads paths relative to the file's folder.
pub fn relative_to(doc: &mut Table, dir: &Path) {
    let _ = try_for_each_path(doc, |_, s| {
        if let Ok(rest) = Path::new(s.as_str()).strip_prefix(dir) {
            let rel = rest.to_string_lossy().into_owned();
            *s = if rel.is_empty() { ".".to_string() } else { rel };
        }
        Ok::<(), std::convert::Infallible>(())
    });
}

/// TOML → JSON for the page.
pub fn to_json(v: &Value) -> Json {
    match v {
        Value::String(s) => Json::String(s.clone()),
        Value::Integer(i) => Json::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Boolean(b) => Json::Bool(*b),
        Value::Datetime(d) => Json::String(d.to_string()),
        Value::Array(a) => Json::Array(a.iter().map(to_json).collect()),
        Value::Table(t) => Json::Object(t.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
    }
}

/// `sd-lora train` with one `--set` per key of `doc` (tables inside a
/// section as inline TOML): the command that runs the same config without
/// a file.
pub fn command_line(doc: &Table) -> String {
    let mut args = vec![std::ffi::OsString::from("train")];
    for (section, v) in doc {
        let Some(t) = v.as_table() else { continue };
        for (k, v) in t {
            args.push("--set".into());
            args.push(format!("{section}.{k}={v}").into());
        }
    }
    crate::cli::command_line(&args)
}

/// The output folder `doc` trains into (its `output.dir`, else the CLI's
/// default), absolute.
pub fn output_dir(doc: &Table, base: &Path) -> PathBuf {
    let dir = doc
        .get("output")
        .and_then(|o| o.get("dir"))
        .and_then(Value::as_str)
        .map(PathBuf::from)
        .unwrap_or_else(|| sd_lora_train::config::TrainConfig::default().output.dir);
    if dir.is_absolute() {
        dir
    } else {
        base.join(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Nulls are dropped, integers stay integers, unknown sections refused.
    #[test]
    fn json_becomes_toml() {
        let doc = document(&json!({
            "train": {"steps": 20, "unet_lr": 0.001, "seed": null},
            "dataset": {"subsets": [{"path": "data", "kind": "instance"}]},
            "output": {}
        }))
        .unwrap();
        assert_eq!(doc["train"]["steps"], Value::Integer(20));
        assert_eq!(doc["train"]["unet_lr"], Value::Float(0.001));
        assert!(doc["train"].get("seed").is_none());
        assert!(doc.get("output").is_none());
        let e = document(&json!({"trian": {}})).unwrap_err();
        assert!(
            e.message.contains("unknown config section `trian`"),
            "{}",
            e.message
        );
        let line = command_line(&doc);
        assert!(line.starts_with("sd-lora train --set "), "{line}");
        assert!(line.contains("--set train.steps=20"), "{line}");
        assert!(
            line.contains("'dataset.subsets=[{ kind = \"instance\", path = \"data\" }]'"),
            "{line}"
        );
    }

    /// Every path key is confined; built-in models pass; the error names the key.
    #[test]
    fn paths_are_confined() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("data")).unwrap();
        let roots = Roots::new(&[t.path().to_path_buf()]).unwrap();
        let base = t.path().canonicalize().unwrap();
        let mut doc = document(&json!({
            "model": {"path": "builtin:tiny"},
            "dataset": {"subsets": [{"path": "data"}]},
            "output": {"dir": "out/run"}
        }))
        .unwrap();
        confine_paths(&mut doc, &roots).unwrap();
        assert_eq!(doc["model"]["path"].as_str(), Some("builtin:tiny"));
        assert_eq!(
            doc["dataset"]["subsets"][0]["path"]
                .as_str()
                .map(PathBuf::from),
            Some(base.join("data"))
        );
        relative_to(&mut doc, &base);
        assert_eq!(doc["output"]["dir"].as_str(), Some("out/run"));
        let mut bad = document(&json!({"dataset": {"subsets": [{"path": "../x"}]}})).unwrap();
        let e = confine_paths(&mut bad, &roots).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("dataset.subsets[0].path"));
        let mut bad = document(&json!({"model": {"vae": "/etc"}})).unwrap();
        assert_eq!(
            confine_paths(&mut bad, &roots).unwrap_err().key.as_deref(),
            Some("model.vae")
        );
    }
}
