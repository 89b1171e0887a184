//! `--set KEY=VALUE` overrides applied to the TOML document before it is
//! deserialised, so every config option can be set from the command line
//! without being declared a second time as a flag.

use toml::{Table, Value};

/// A `--set` argument that cannot be applied; the message says how to write it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct OverrideError(pub String);

fn err(msg: impl Into<String>) -> OverrideError {
    OverrideError(msg.into())
}

/// One step of a key path: a table key, optionally indexing an array.
fn parse_segment(seg: &str) -> Result<(String, Option<usize>), OverrideError> {
    match seg.split_once('[') {
        None => Ok((seg.to_string(), None)),
        Some((name, rest)) => {
            let idx = rest
                .strip_suffix(']')
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| err(format!("`{seg}`: an index is written `name[0]`")))?;
            Ok((name.to_string(), Some(idx)))
        }
    }
}

/// Parses `VALUE` as TOML (`768`, `true`, `"text"`, `[1, 2]`); anything that
/// is not valid TOML is taken as a plain string, so `--set x.caption=a dog` works.
pub fn parse_value(raw: &str) -> Value {
    let doc = format!("v = {raw}");
    match doc.parse::<Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| Value::String(raw.to_string())),
        Err(_) => Value::String(raw.to_string()),
    }
}

/// Sets `key` (e.g. `dataset.subsets[0].repeats`) to `value` in `doc`,
/// creating tables on the way. Indexing past the end of an array appends
/// exactly one element (so `subsets[1]` after `subsets[0]` adds a subset).
pub fn set(doc: &mut Table, key: &str, value: Value) -> Result<(), OverrideError> {
    let segs: Vec<&str> = key.split('.').collect();
    if segs.iter().any(|s| s.is_empty()) {
        return Err(err(format!(
            "`{key}` is not a config key (expected e.g. `train.steps`)"
        )));
    }
    let mut table = doc;
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        let (name, idx) = parse_segment(seg)?;
        match idx {
            None if last => {
                table.insert(name, value);
                return Ok(());
            }
            None => {
                let entry = table
                    .entry(name.clone())
                    .or_insert_with(|| Value::Table(Table::new()));
                table = entry
                    .as_table_mut()
                    .ok_or_else(|| err(format!("`{name}` in `{key}` is not a table")))?;
            }
            Some(n) => {
                let entry = table
                    .entry(name.clone())
                    .or_insert_with(|| Value::Array(Vec::new()));
                let arr = entry
                    .as_array_mut()
                    .ok_or_else(|| err(format!("`{name}` in `{key}` is not a list")))?;
                if n > arr.len() {
                    return Err(err(format!(
                        "`{key}`: `{name}` has {} entries; the next one is [{}]",
                        arr.len(),
                        arr.len()
                    )));
                }
                if n == arr.len() {
                    arr.push(if last {
                        value.clone()
                    } else {
                        Value::Table(Table::new())
                    });
                }
                if last {
                    arr[n] = value;
                    return Ok(());
                }
                table = arr[n]
                    .as_table_mut()
                    .ok_or_else(|| err(format!("`{name}[{n}]` in `{key}` is not a table")))?;
            }
        }
    }
    Ok(())
}

/// Applies `KEY=VALUE` strings in order (a later one wins).
pub fn apply_all(doc: &mut Table, sets: &[String]) -> Result<(), OverrideError> {
    for s in sets {
        let (k, v) = s.split_once('=').ok_or_else(|| {
            err(format!(
                "--set {s:?}: expected KEY=VALUE, e.g. --set train.steps=500"
            ))
        })?;
        set(doc, k.trim(), parse_value(v.trim()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_nested_and_indexed_keys() {
        let mut doc: Table = "[dataset]\nresolution = 512\n[[dataset.subsets]]\npath = \"a\""
            .parse()
            .unwrap();
        apply_all(
            &mut doc,
            &[
                "dataset.resolution=768".into(),
                "dataset.subsets[0].repeats=3".into(),
                "dataset.subsets[1].path=b c".into(),
                "dataset.crop=\"random\"".into(),
                "train.unet_lr=2e-4".into(),
            ],
        )
        .unwrap();
        let d = doc["dataset"].as_table().unwrap();
        assert_eq!(d["resolution"].as_integer(), Some(768));
        assert_eq!(d["crop"].as_str(), Some("random"));
        let subs = d["subsets"].as_array().unwrap();
        assert_eq!(subs[0]["repeats"].as_integer(), Some(3));
        assert_eq!(subs[1]["path"].as_str(), Some("b c"));
        assert_eq!(doc["train"]["unet_lr"].as_float(), Some(2e-4));
        assert!(apply_all(&mut doc, &["dataset.subsets[5].path=x".into()]).is_err());
        assert!(apply_all(&mut doc, &["noequals".into()]).is_err());
        assert!(apply_all(&mut doc, &["dataset..x=1".into()]).is_err());
        assert!(apply_all(&mut doc, &["dataset.resolution.x=1".into()]).is_err());
    }
}
