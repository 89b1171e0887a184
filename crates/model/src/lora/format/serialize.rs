//! Byte-exact safetensors serialisation and the hashes the web UIs display.
//!
//! The layout is the one the `safetensors` library writes (Python's `safetensors.torch.save` is
//! the same Rust code): tensors sorted by dtype (larger first, in the library's dtype order) then
//! by name, packed without gaps; the header is compact JSON with `__metadata__` first, then the
//! tensors in data order, each `{"dtype","shape","data_offsets"}`, padded with spaces to a
//! multiple of 8 bytes. We write it ourselves rather than call `safetensors::serialize` because
//! that library keeps metadata in a `HashMap`, so its key order (not its length) changes from run
//! to run; ours is sorted, so the same LoRA always gives the same bytes.
//!
//! Hashes, as kohya's `precalculate_safetensors_hashes` computes them
//! (`library/train_util.py`): the file is serialised with only the `ss_*` metadata (so editing
//! a title later does not change the hash), then
//! - `sshs_model_hash` = sha256 hex of every byte after the header (`addnet_hash_safetensors`):
//!   the data section only, so it does not depend on the metadata at all;
//! - `sshs_legacy_hash` = the first 8 hex digits of the sha256 of the `0x10000` bytes at offset
//!   `0x100000` of that serialisation (`addnet_hash_legacy`; fewer bytes, or none, when the file
//!   is shorter — a file under 1 MiB hashes the empty string, `e3b0c442`). It does depend on
//!   the header's length, hence the `ss_*`-only serialisation.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

/// One tensor ready to be written: safetensors dtype name, shape and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// The `safetensors` library's dtype order (its `Dtype` enum); larger is written first.
fn dtype_rank(dtype: &str) -> usize {
    const ORDER: &[&str] = &[
        "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16",
        "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
    ];
    ORDER.iter().position(|d| *d == dtype).unwrap_or(0)
}

#[derive(serde::Serialize)]
struct HeaderEntry<'a> {
    dtype: &'a str,
    shape: &'a [usize],
    data_offsets: [usize; 2],
}

/// The whole file: 8-byte header length, header, data. `metadata: None` writes no
/// `__metadata__` entry; `Some` (even empty) writes one, as Python's `save(t, metadata={})` does.
pub fn serialize(tensors: &[RawTensor], metadata: Option<&BTreeMap<String, String>>) -> Vec<u8> {
    let mut order: Vec<&RawTensor> = tensors.iter().collect();
    order.sort_by(|a, b| {
        dtype_rank(b.dtype)
            .cmp(&dtype_rank(a.dtype))
            .then_with(|| a.name.cmp(&b.name))
    });
    let mut header = String::from("{");
    let mut first = true;
    if let Some(metadata) = metadata {
        header.push_str("\"__metadata__\":");
        header.push_str(&to_json(metadata));
        first = false;
    }
    let mut offset = 0usize;
    for t in &order {
        if !first {
            header.push(',');
        }
        first = false;
        header.push_str(&to_json(t.name.as_str()));
        header.push(':');
        let entry = HeaderEntry {
            dtype: t.dtype,
            shape: &t.shape,
            data_offsets: [offset, offset + t.bytes.len()],
        };
        header.push_str(&to_json(&entry));
        offset += t.bytes.len();
    }
    header.push('}');
    let mut header = header.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for t in order {
        out.extend_from_slice(&t.bytes);
    }
    out
}

/// Compact JSON of a header value (strings, string maps and integers always serialise).
fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// `addnet_hash_safetensors`: sha256 hex of the bytes after the header of a serialised file.
pub fn addnet_hash_safetensors(file: &[u8]) -> String {
    let header_len = file
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    let start = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .unwrap_or(usize::MAX)
        .min(file.len());
    hex(&Sha256::digest(&file[start..]))
}

/// `addnet_hash_legacy`: first 8 hex digits of the sha256 of `file[0x100000..0x110000]`
/// (clamped to the file, as Python's `read` is).
pub fn addnet_hash_legacy(file: &[u8]) -> String {
    let start = 0x100000.min(file.len());
    let end = (0x100000 + 0x10000).min(file.len());
    hex(&Sha256::digest(&file[start..end]))[..8].to_string()
}

/// `(sshs_model_hash, sshs_legacy_hash)` of `tensors` with `metadata`, computed on the
/// serialisation with only the `ss_*` keys.
pub fn sshs_hashes(tensors: &[RawTensor], metadata: &BTreeMap<String, String>) -> (String, String) {
    let ss: BTreeMap<String, String> = metadata
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let bytes = serialize(tensors, Some(&ss));
    (addnet_hash_safetensors(&bytes), addnet_hash_legacy(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
