//! A memory-mapped `.safetensors` file whose header we parse and validate ourselves.
//!
//! Why not `safetensors::SafeTensors` or candle's `MmapedSafetensors`: we want an error that names
//! the file and says *what* is wrong (empty file, header length past the end, invalid JSON,
//! tensor data past the end) for every malformed input, and byte ranges we can slice further (an
//! OpenCLIP `in_proj_weight` is q, k and v stacked along dim 0, so each is a contiguous byte
//! range of the same mapping — no copy of the file, no copy of the tensor until it is loaded).
//!
//! Layout (the format's whole specification): 8 bytes little-endian `N`, then `N` bytes of JSON
//! `{"name": {"dtype": "F16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__":
//! {..}}`, then the data section; offsets are relative to the data section's start.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::error::LoadError;

/// The safetensors crate refuses headers above 100 MB; so do we, before allocating for one.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Where one tensor lives in the file, as its header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The safetensors dtype name as written in the header (`F32`, `F16`, `BF16`, `I64`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file (header already added).
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A validated, memory-mapped safetensors file.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    /// Opens and maps `path`, then validates the header against the file's length.
    ///
    /// Files that start like a pickle (a zip archive, as `torch.save` writes, or a raw pickle
    /// stream) are refused as pickles even when named `.safetensors`: we only look at the first
    /// bytes to say so, we never interpret them.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let mut file = File::open(path).map_err(|e| LoadError::io(path, e))?;
        let len = file.metadata().map_err(|e| LoadError::io(path, e))?.len();
        if len == 0 {
            return Err(LoadError::malformed(path, "the file is empty"));
        }
        if len < 8 {
            return Err(LoadError::malformed(
                path,
                format!("the file has {len} bytes, fewer than the 8-byte header length"),
            ));
        }
        let mut head = [0u8; 8];
        file.read_exact(&mut head)
            .map_err(|e| LoadError::io(path, e))?;
        let header_len = u64::from_le_bytes(head);
        // A torch.save zip ("PK\3\4") or raw pickle stream (0x80, protocol 2..=5) read as a
        // length is always absurdly large, so only an unusable length is checked for these
        // signatures: a valid header length can legitimately start with byte 0x80.
        let absurd = header_len > MAX_HEADER_BYTES || header_len > len - 8;
        if absurd
            && (head.starts_with(b"PK\x03\x04") || (head[0] == 0x80 && (2..=5).contains(&head[1])))
        {
            return Err(LoadError::PickleRefused {
                file: path.to_path_buf(),
                context: " a file named .safetensors whose content is a PyTorch pickle".into(),
            });
        }
        if header_len > MAX_HEADER_BYTES {
            return Err(LoadError::malformed(
                path,
                format!(
                    "header length {header_len} is larger than the 100 MB limit (file is {len} \
                     bytes); the file is not safetensors or is corrupt"
                ),
            ));
        }
        if header_len > len - 8 {
            return Err(LoadError::malformed(
                path,
                format!(
                    "header length {header_len} runs past the end of the file ({len} bytes); the \
                     file is truncated or not safetensors"
                ),
            ));
        }
        // SAFETY: the mapping is read-only. As with every memory-mapped model loader, a file
        // truncated by another process while we hold the mapping would fault; users do not
        // rewrite model files during training.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
        let header_end = 8 + header_len as usize;
        let (tensors, metadata) = parse_header(path, &mmap[8..header_end], header_end, mmap.len())?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor, by name, in name order.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The header's `__metadata__` string map (empty when absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The file's bytes `start..end` as mapped (`None` outside the file). Callers that copy
    /// them out should [`release`](Self::release) the range afterwards.
    pub(crate) fn bytes(&self, start: usize, end: usize) -> Option<&[u8]> {
        self.mmap.get(start..end)
    }

    /// The length of the file in bytes.
    pub(crate) fn len(&self) -> usize {
        self.mmap.len()
    }

    /// Materialises `len_bytes` bytes from `start` as a tensor of `shape` and safetensors
    /// `dtype`. `key` names the source tensor in errors.
    pub(crate) fn load_range(
        &self,
        key: &str,
        dtype: &str,
        shape: &[usize],
        start: usize,
        end: usize,
        device: &Device,
    ) -> Result<Tensor, LoadError> {
        let candle_dtype = candle_dtype(dtype).ok_or_else(|| LoadError::UnsupportedDtype {
            file: self.path.clone(),
            key: key.to_string(),
            dtype: dtype.to_string(),
        })?;
        // Ranges come from a validated header (and sub-ranges of it), so they are in bounds;
        // `get` keeps a logic error from becoming a panic all the same.
        let bytes = self.mmap.get(start..end).ok_or_else(|| {
            LoadError::malformed(
                &self.path,
                format!("tensor `{key}`: byte range {start}..{end} is outside the file"),
            )
        })?;
        let tensor =
            Tensor::from_raw_buffer(bytes, candle_dtype, shape, device).map_err(|source| {
                LoadError::Tensor {
                    file: self.path.clone(),
                    key: key.to_string(),
                    source: Box::new(source),
                }
            });
        self.release(start, end);
        tensor
    }

    /// Drops the mapping's pages of `start..end` from this process's memory
    /// once their bytes were copied into a tensor. Touched pages of a file
    /// mapping count in the process's resident memory until unmapped or
    /// released, so without this a model loaded tensor by tensor is resident
    /// twice at the end — the file's pages and the built tensors (8.25 GB for
    /// SD1.5's 4.12 GB of f32 weights). The kernel keeps them in its page
    /// cache, and a later read of the same range maps them back.
    pub(crate) fn release(&self, start: usize, end: usize) {
        #[cfg(unix)]
        {
            const PAGE: usize = 4096;
            // Whole pages around the range; a page shared with a neighbouring
            // tensor is simply read again if that tensor is loaded later.
            let from = start / PAGE * PAGE;
            let to = end.div_ceil(PAGE).saturating_mul(PAGE).min(self.mmap.len());
            if to > from {
                // SAFETY: the mapping is read-only and never written through,
                // so MADV_DONTNEED discards nothing: later reads fault the
                // file's contents back in. No reference into the range is
                // held across this call (`load_range` has copied the bytes).
                // A failure only leaves the pages resident.
                let _ = unsafe {
                    self.mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        from,
                        to - from,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = (start, end);
    }
}

/// Size in bytes of one element of a safetensors dtype, `None` for names we do not know.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// The candle dtype for a safetensors dtype name, `None` where candle has none.
pub fn candle_dtype(dtype: &str) -> Option<DType> {
    Some(match dtype {
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I16" => DType::I16,
        "I32" => DType::I32,
        "I64" => DType::I64,
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        "F32" => DType::F32,
        "F64" => DType::F64,
        "F8_E4M3" => DType::F8E4M3,
        _ => return None,
    })
}

type Header = (BTreeMap<String, TensorInfo>, BTreeMap<String, String>);

fn parse_header(
    path: &Path,
    json: &[u8],
    data_start: usize,
    file_len: usize,
) -> Result<Header, LoadError> {
    let value: serde_json::Value = serde_json::from_slice(json)
        .map_err(|e| LoadError::malformed(path, format!("the header is not valid JSON: {e}")))?;
    let serde_json::Value::Object(entries) = value else {
        return Err(LoadError::malformed(
            path,
            "the header is not a JSON object",
        ));
    };
    let data_len = file_len - data_start;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, entry) in entries {
        if name == "__metadata__" {
            // Metadata is free-form strings; a non-string value is tolerated as its JSON text
            // rather than refusing a model over an informational field.
            if let serde_json::Value::Object(map) = entry {
                for (k, v) in map {
                    let v = match v {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    metadata.insert(k, v);
                }
            }
            continue;
        }
        let bad = |why: String| LoadError::malformed(path, format!("tensor `{name}`: {why}"));
        let dtype = entry
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("header entry has no string `dtype`".into()))?
            .to_string();
        let elem = dtype_size(&dtype).ok_or_else(|| bad(format!("unknown dtype `{dtype}`")))?;
        let shape = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|dims| {
                dims.iter()
                    .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                    .collect::<Option<Vec<usize>>>()
            })
            .ok_or_else(|| bad("header entry has no `shape` list of integers".into()))?;
        let offsets = entry
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| match o.as_slice() {
                [a, b] => Some((a.as_u64()?, b.as_u64()?)),
                _ => None,
            })
            .ok_or_else(|| bad("header entry has no `data_offsets` [begin, end]".into()))?;
        let (begin, end) = (offsets.0 as usize, offsets.1 as usize);
        if begin > end {
            return Err(bad(format!("data_offsets [{begin}, {end}] are reversed")));
        }
        let expected_bytes = shape
            .iter()
            .try_fold(elem, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
        if end - begin != expected_bytes {
            return Err(bad(format!(
                "data_offsets [{begin}, {end}] span {} bytes but shape {shape:?} of {dtype} needs \
                 {expected_bytes}",
                end - begin
            )));
        }
        if end > data_len {
            return Err(bad(format!(
                "data ends at byte {end} of the data section, which has only {data_len} bytes: \
                 the file is truncated"
            )));
        }
        tensors.insert(
            name,
            TensorInfo {
                dtype,
                shape,
                start: data_start + begin,
                end: data_start + end,
            },
        );
    }
    Ok((tensors, metadata))
}
