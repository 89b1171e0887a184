//! One component's weights under their diffusers/transformers names, loaded lazily.
//!
//! A [`ComponentWeights`] is a table `diffusers name → (file, byte range, dtype, shape)`. Building
//! it reads only headers; a tensor's bytes are touched when it is loaded, straight from the
//! memory mapping. Conversions never copy at table-building time: a VAE 1×1 conv weight becomes a
//! Linear weight by changing the recorded shape (same bytes), and OpenCLIP's stacked
//! `in_proj_weight` becomes q/k/v as three contiguous sub-ranges of the same bytes. The one
//! conversion that moves values, OpenCLIP's `text_projection` (stored `[in, out]`, a Linear weight
//! is `[out, in]`), is recorded as a flag and applied when the tensor is loaded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use super::Component;
use super::error::LoadError;
use super::safetensors_file::{SafetensorsFile, dtype_size};

/// Where one converted tensor's bytes are, and what they are.
#[derive(Debug, Clone)]
pub struct WeightEntry {
    file: Arc<SafetensorsFile>,
    source_key: String,
    dtype: String,
    shape: Vec<usize>,
    start: usize,
    end: usize,
    /// The stored 2-D tensor is the transpose of this one (see [`Self::transposed`]).
    transposed: bool,
}

impl WeightEntry {
    /// The whole tensor `key` of `file`, unchanged. `None` if the file has no such tensor.
    pub(crate) fn whole(file: &Arc<SafetensorsFile>, key: &str) -> Option<Self> {
        let info = file.get(key)?;
        Some(Self {
            file: Arc::clone(file),
            source_key: key.to_string(),
            dtype: info.dtype.clone(),
            shape: info.shape.clone(),
            start: info.start,
            end: info.end,
            transposed: false,
        })
    }

    /// The transpose of a 2-D tensor (OpenCLIP's `text_projection`, stored `[in, out]`, as a
    /// Linear weight `[out, in]`). The values are moved when the tensor is loaded.
    pub(crate) fn transposed(mut self) -> Result<Self, LoadError> {
        match self.shape.as_slice() {
            [a, b] if !self.transposed => {
                self.shape = vec![*b, *a];
                self.transposed = true;
                Ok(self)
            }
            _ => Err(LoadError::ShapeMismatch {
                file: self.file.path().to_path_buf(),
                key: self.source_key,
                found: self.shape,
                expected: "a 2-D tensor to transpose".into(),
            }),
        }
    }

    /// The same bytes seen with another shape of equal element count (e.g. `[c, c, 1, 1]` →
    /// `[c, c]`).
    pub(crate) fn reshaped(mut self, shape: Vec<usize>) -> Result<Self, LoadError> {
        if self.transposed || shape.iter().product::<usize>() != self.numel() {
            return Err(LoadError::ShapeMismatch {
                file: self.file.path().to_path_buf(),
                key: self.source_key,
                found: self.shape,
                expected: format!(
                    "{} elements to view as {shape:?}",
                    shape.iter().product::<usize>()
                ),
            });
        }
        self.shape = shape;
        Ok(self)
    }

    /// Chunk `index` of `count` equal chunks along dim 0 (rows are contiguous in a row-major
    /// tensor, so a chunk is a byte sub-range).
    pub(crate) fn row_chunk(mut self, index: usize, count: usize) -> Result<Self, LoadError> {
        let rows = self.shape.first().copied().unwrap_or(0);
        if self.transposed || self.shape.is_empty() || rows % count != 0 || index >= count {
            return Err(LoadError::ShapeMismatch {
                file: self.file.path().to_path_buf(),
                key: self.source_key,
                found: self.shape,
                expected: format!("a first dimension divisible by {count} (stacked q, k, v)"),
            });
        }
        let chunk_bytes = (self.end - self.start) / count;
        self.start += index * chunk_bytes;
        self.end = self.start + chunk_bytes;
        self.shape[0] = rows / count;
        Ok(self)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The safetensors dtype name (`F32`, `F16`, ...).
    pub fn dtype(&self) -> &str {
        &self.dtype
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The file the bytes come from.
    pub fn file(&self) -> &Path {
        self.file.path()
    }

    /// The tensor's name in that file (before conversion).
    pub fn source_key(&self) -> &str {
        &self.source_key
    }

    /// The opened file the bytes come from.
    pub(crate) fn source_file(&self) -> &Arc<SafetensorsFile> {
        &self.file
    }

    /// The absolute byte range of this tensor in its file (a sub-range of the stored tensor
    /// for one of a stacked q/k/v).
    pub(crate) fn byte_range(&self) -> (usize, usize) {
        (self.start, self.end)
    }

    /// Whether the values are the transpose of the stored ones (see [`Self::transposed`]).
    pub(crate) fn is_transposed(&self) -> bool {
        self.transposed
    }

    /// Reads the tensor onto `device` in its stored dtype.
    pub fn load(&self, device: &Device) -> Result<Tensor, LoadError> {
        debug_assert_eq!(
            Some(self.end - self.start),
            dtype_size(&self.dtype).map(|s| s * self.numel())
        );
        if !self.transposed {
            return self.file.load_range(
                &self.source_key,
                &self.dtype,
                &self.shape,
                self.start,
                self.end,
                device,
            );
        }
        let stored: Vec<usize> = self.shape.iter().rev().copied().collect();
        let tensor = self.file.load_range(
            &self.source_key,
            &self.dtype,
            &stored,
            self.start,
            self.end,
            device,
        )?;
        tensor
            .t()
            .and_then(|t| t.contiguous())
            .map_err(|source| LoadError::Tensor {
                file: self.file.path().to_path_buf(),
                key: self.source_key.clone(),
                source: Box::new(source),
            })
    }
}

/// The weights of one component, named as in its diffusers/transformers checkpoint.
#[derive(Debug, Clone)]
pub struct ComponentWeights {
    component: Component,
    entries: BTreeMap<String, WeightEntry>,
}

impl ComponentWeights {
    pub(crate) fn new(component: Component) -> Self {
        Self {
            component,
            entries: BTreeMap::new(),
        }
    }

    /// Adds `entry` under `key`; two sources for one name is an error naming both.
    pub(crate) fn insert(&mut self, key: String, entry: WeightEntry) -> Result<(), LoadError> {
        if let Some(previous) = self.entries.get(&key) {
            return Err(LoadError::DuplicateKey {
                file: entry.file().to_path_buf(),
                key,
                first: previous.source_key.clone(),
                second: entry.source_key,
            });
        }
        self.entries.insert(key, entry);
        Ok(())
    }

    pub fn component(&self) -> Component {
        self.component
    }

    /// Every key, in sorted order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, &WeightEntry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn get(&self, key: &str) -> Option<&WeightEntry> {
        self.entries.get(key)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Elements of every tensor: buffers (`position_ids`, ...) are never entries, so this is the
    /// exact parameter count.
    pub fn parameter_count(&self) -> u64 {
        self.entries.values().map(|e| e.numel() as u64).sum()
    }

    /// The distinct stored dtypes, sorted (`["F16"]`, `["F32"]`, occasionally mixed).
    pub fn dtypes(&self) -> Vec<String> {
        let set: BTreeSet<&str> = self.entries.values().map(|e| e.dtype()).collect();
        set.into_iter().map(str::to_string).collect()
    }

    /// The files the weights come from, sorted.
    pub fn files(&self) -> Vec<PathBuf> {
        let set: BTreeSet<&Path> = self.entries.values().map(|e| e.file()).collect();
        set.into_iter().map(Path::to_path_buf).collect()
    }

    /// Loads one tensor onto `device`, converted to `dtype` when given.
    pub fn load(
        &self,
        key: &str,
        device: &Device,
        dtype: Option<DType>,
    ) -> Result<Tensor, LoadError> {
        let entry = self.entries.get(key).ok_or_else(|| LoadError::MissingKey {
            file: self.files().into_iter().next().unwrap_or_default(),
            key: key.to_string(),
            context: format!(" (no such {} weight after conversion)", self.component),
        })?;
        let tensor = entry.load(device)?;
        match dtype {
            Some(dtype) if dtype != tensor.dtype() => {
                tensor.to_dtype(dtype).map_err(|source| LoadError::Tensor {
                    file: entry.file().to_path_buf(),
                    key: entry.source_key.clone(),
                    source: Box::new(source),
                })
            }
            _ => Ok(tensor),
        }
    }

    /// Loads every tensor (one component at a time keeps peak memory at one component).
    pub fn load_all(
        &self,
        device: &Device,
        dtype: Option<DType>,
    ) -> Result<HashMap<String, Tensor>, LoadError> {
        self.entries
            .keys()
            .map(|k| Ok((k.clone(), self.load(k, device, dtype)?)))
            .collect()
    }

    /// A candle `VarBuilder` over these weights that loads each tensor when the model asks for
    /// it, checks its shape, and converts it to `dtype`.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

impl candle_nn::var_builder::SimpleBackend for ComponentWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let entry = self.entries.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: the {} has no weight `{name}` (files: {:?})",
                self.component,
                self.component,
                self.files()
            ))
        })?;
        if entry.shape() != s.dims() {
            let stored = if entry.source_key == name {
                String::new()
            } else {
                format!(" (stored as `{}`)", entry.source_key)
            };
            return Err(candle_core::Error::Msg(format!(
                "{}: {} weight `{name}`{stored} has shape {:?}, the model expects {:?}",
                entry.file().display(),
                self.component,
                entry.shape,
                s.dims()
            )));
        }
        self.get_unchecked(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev, Some(dtype))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}
