//! `--set KEY=VALUE` overrides applied to the TOML document before it is
//! deserialised, so every config option can be set from the command line
//! without being declared a second time as a flag.

use anyhow::{Context, Result, bail};
use toml::{Table, Value};

/// One step of a key path: a table key, optionally indexing an array.
fn parse_segment(seg: &str) -> Result<(String, Option<usize>)> {
    match seg.split_once('[') {
        None => Ok((seg.to_string(), None)),
        Some((name, rest)) => {
            let idx = rest
                .strip_suffix(']')
                .and_then(|n| n.parse::<usize>().ok())
                .with_context(|| format!("`{seg}`: an index is written `name[0]`"))?;
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
pub fn set(doc: &mut Table, key: &str, value: Value) -> Result<()> {
    let segs: Vec<&str> = key.split('.').collect();
    if segs.iter().any(|s| s.is_empty()) {
        bail!("`{key}` is not a config key (expected e.g. `dataset.resolution`)");
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
                    .with_context(|| format!("`{name}` in `{key}` is not a table"))?;
            }
            Some(n) => {
                let entry = table
                    .entry(name.clone())
                    .or_insert_with(|| Value::Array(Vec::new()));
                let arr = entry
                    .as_array_mut()
                    .with_context(|| format!("`{name}` in `{key}` is not a list"))?;
                if n > arr.len() {
                    bail!(
                        "`{key}`: `{name}` has {} entries; the next one is [{}]",
                        arr.len(),
                        arr.len()
                    );
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
                    .with_context(|| format!("`{name}[{n}]` in `{key}` is not a table"))?;
            }
        }
    }
    Ok(())
}

/// Applies `KEY=VALUE` strings in order.
pub fn apply_all(doc: &mut Table, sets: &[String]) -> Result<()> {
    for s in sets {
        let (k, v) = s.split_once('=').with_context(|| {
            format!("--set {s:?}: expected KEY=VALUE, e.g. --set dataset.resolution=768")
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
            ],
        )
        .unwrap();
        let d = doc["dataset"].as_table().unwrap();
        assert_eq!(d["resolution"].as_integer(), Some(768));
        assert_eq!(d["crop"].as_str(), Some("random"));
        let subs = d["subsets"].as_array().unwrap();
        assert_eq!(subs[0]["repeats"].as_integer(), Some(3));
        assert_eq!(subs[1]["path"].as_str(), Some("b c"));
        assert!(apply_all(&mut doc, &["dataset.subsets[5].path=x".into()]).is_err());
        assert!(apply_all(&mut doc, &["noequals".into()]).is_err());
        assert!(apply_all(&mut doc, &["dataset..x=1".into()]).is_err());
        assert!(apply_all(&mut doc, &["dataset.resolution.x=1".into()]).is_err());
    }
}
