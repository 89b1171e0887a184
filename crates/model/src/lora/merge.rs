//! `sd-lora merge`: LoRAs baked into a checkpoint, or several LoRAs made one.
//!
//! **Into a checkpoint** ([`merge_into_model`]): each module's update
//! `weight · (alpha/rank) · up · down` is added to the layer's weight, and
//! the checkpoint is written back in its own layout and dtype — a single
//! file stays a single file with the same keys, order and header (byte for
//! byte: only the merged tensors' values change), a diffusers folder stays a
//! folder. It streams: the output is written tensor by tensor from the
//! memory-mapped input, and an update is formed only when its tensor is
//! written, so memory holds the LoRAs and one tensor, never two checkpoints.
//! Layers stored packed (OpenCLIP's `in_proj_weight`, holding q, k and v)
//! get each update in its own rows; a transposed one (`text_projection`) the
//! transposed update.
//!
//! **Into one LoRA** ([`merge_loras`]): modules present in several files are
//! concatenated along the rank (`down` stacked, `up` side by side, each
//! part's `weight · alpha/rank` folded into its `up`), so the sum of the
//! updates is exact; `--rank N` then cuts each module to the best rank-N
//! approximation of that sum ([`super::resize::resize_module`]). Every
//! module keeps one alpha, as [`super::resize`] explains.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::format::{LoraFamily, LoraFile};
use super::resize::{RankRule, resize_module, with_alpha};
use super::targets::stored_layer;
use super::{LoraComponent, LoraModule, LoraWeights, ModuleWeights, TargetInfo};
use crate::atomic_file::temporary_beside;
use crate::load::safetensors_file::{SafetensorsFile, dtype_size};
use crate::load::{LoadError, ModelSource, SourceFormat};

/// One LoRA and the weight it is merged with.
#[derive(Debug, Clone)]
pub struct WeightedLora {
    pub file: LoraFile,
    pub weight: f32,
}

/// Why a merge was refused or failed. Everything that can be checked is
/// checked before the first byte is written.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{0}")]
    Refused(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Tensor {
        context: String,
        source: Box<candle_core::Error>,
    },
}

fn tensor_err(context: impl Into<String>) -> impl FnOnce(candle_core::Error) -> MergeError {
    let context = context.into();
    move |source| MergeError::Tensor {
        context,
        source: Box::new(source),
    }
}

/// Every Linear/Conv2d layer of a checkpoint's UNet and text encoders, from
/// its weight table alone ([`stored_layer`]) — what a LoRA for it may adapt,
/// without building the model.
pub fn stored_targets(source: &ModelSource) -> Result<Vec<TargetInfo>, LoadError> {
    let mut out = Vec::new();
    for component in source.components() {
        let Some(lora_component) = LoraComponent::of_model(component) else {
            continue;
        };
        for (key, entry) in source.weights(component)?.entries() {
            out.extend(stored_layer(lora_component, key, entry.shape()));
        }
    }
    Ok(out)
}

/// `weight · Δ` of one module on the layer stored in `stored` (f32 values in
/// the stored layout), flattened to `[out, in·kh·kw]` in the layer's layout.
/// A plain LoRA's update does not depend on the weight; DoRA's does, and is
/// computed from the original weight in the layer's real shape (its norm runs
/// along one axis); LoHa/LoKr need that shape to arrange their products.
fn term_delta(
    stored: &[f32],
    r: &RangeEdit,
    weight: f64,
    m: &ModuleWeights,
) -> candle_core::Result<Tensor> {
    if let ModuleWeights::LowRank(lr) = m
        && lr.dora_scale.is_none()
    {
        return lr.scaled_product(weight * f64::from(lr.scale()));
    }
    let w = if r.transposed {
        let (rows, cols) = (r.shape[1], r.shape[0]);
        Tensor::from_slice(stored, (rows, cols), &Device::Cpu)?
            .t()?
            .contiguous()?
    } else {
        Tensor::from_slice(stored, r.shape.as_slice(), &Device::Cpu)?
    };
    // A module for a Linear stored as a 1×1 conv (or the reverse) sees the
    // shape its own tensors have; the norms and products are the same.
    let w = match m {
        ModuleWeights::LowRank(lr) => {
            let mut shape = vec![lr.up.dims()[0]];
            shape.extend_from_slice(&lr.down.dims()[1..]);
            w.reshape(shape)?
        }
        ModuleWeights::Lycoris(_) => w,
    };
    let d = m.delta(&w)?;
    let out = d.dims()[0];
    d.reshape((out, d.elem_count() / out))?.affine(weight, 0.0)
}

/// The planned edits of one file: the opened file and, by tensor name, the
/// updates to its byte ranges.
type FilePlan = (Arc<SafetensorsFile>, BTreeMap<String, Vec<RangeEdit>>);

/// A merged LoRA's modules and what was done to each.
pub type MergedLora = (LoraWeights, BTreeMap<(LoraComponent, String), MergedModule>);

/// Updates to one layer stored at a byte range of a tensor.
struct RangeEdit {
    start: usize,
    end: usize,
    /// The layer's weight is stored transposed.
    transposed: bool,
    /// The layer's (logical) shape.
    shape: Vec<usize>,
    /// (LoRA weight, module) pairs; the update is Σ weight·Δ(module), each Δ
    /// computed on the original weight.
    terms: Vec<(f64, ModuleWeights)>,
    /// For messages: component and module path.
    label: String,
}

/// What [`merge_into_model`] wrote.
#[derive(Debug, Clone, Default)]
pub struct MergeReport {
    /// Layers changed (a layer adapted by two LoRAs counts once).
    pub layers: usize,
    /// Files written (with their paths in the output).
    pub files_written: Vec<PathBuf>,
    /// Files of a diffusers folder left out of the output (weights the
    /// loader does not use, e.g. a `.bin` beside the `.safetensors`).
    pub skipped: Vec<PathBuf>,
}

/// Merges `loras` into the checkpoint `source` and writes `output` (a
/// `.safetensors` file for a single-file checkpoint, a folder for a diffusers
/// folder), atomically. The LoRAs must have been read and checked against
/// this model (`read_lora_for_model` + `validate` with [`stored_targets`]).
pub fn merge_into_model(
    source: &ModelSource,
    loras: &[WeightedLora],
    output: &Path,
) -> Result<MergeReport, MergeError> {
    // Plan: every update, by file and tensor, checked before writing.
    let mut plan: BTreeMap<PathBuf, FilePlan> = BTreeMap::new();
    let mut layers = 0;
    for lora in loras {
        for ((component, path), m) in lora.file.weights.all() {
            let c = component.model_component();
            let key = format!("{path}.weight");
            let entry = source.weights(c)?.get(&key).ok_or_else(|| {
                MergeError::Refused(format!(
                    "{}: module {path} adapts a {c} layer the model {} does not have",
                    lora.file.path.display(),
                    source.path().display()
                ))
            })?;
            if !matches!(entry.dtype(), "F32" | "F16" | "BF16") {
                return Err(MergeError::Refused(format!(
                    "{}: `{}` is stored as {}; sd-lora merges into F32, F16 and BF16 weights only",
                    entry.file().display(),
                    entry.source_key(),
                    entry.dtype()
                )));
            }
            let (start, end) = entry.byte_range();
            let file = entry.source_file();
            let (_, edits) = plan
                .entry(file.path().to_path_buf())
                .or_insert_with(|| (Arc::clone(file), BTreeMap::new()));
            let ranges = edits.entry(entry.source_key().to_string()).or_default();
            let weight = f64::from(lora.weight);
            match ranges.iter_mut().find(|r| r.start == start) {
                Some(r) => r.terms.push((weight, m)),
                None => {
                    layers += 1;
                    ranges.push(RangeEdit {
                        start,
                        end,
                        transposed: entry.is_transposed(),
                        shape: entry.shape().to_vec(),
                        terms: vec![(weight, m)],
                        label: format!("{c} {path}"),
                    });
                }
            }
        }
    }
    let mut report = MergeReport {
        layers,
        ..MergeReport::default()
    };
    match source.format() {
        SourceFormat::BuiltIn => {
            return Err(MergeError::Refused(format!(
                "{} is a built-in model, built in code: merge needs a checkpoint file or folder",
                source.path().display()
            )));
        }
        SourceFormat::SingleFile => {
            let input = source.path();
            let file = match plan.values().next() {
                Some((file, _)) => Arc::clone(file),
                None => Arc::new(SafetensorsFile::open(input)?),
            };
            let edits = plan.remove(input).map(|(_, e)| e).unwrap_or_default();
            if !plan.is_empty() {
                return Err(MergeError::Refused(format!(
                    "the LoRAs adapt weights outside {} (a separately given VAE?); merge into the \
                     checkpoint alone",
                    input.display()
                )));
            }
            write_atomically(output, |w| rewrite(&file, &edits, w))?;
            report.files_written.push(output.to_path_buf());
        }
        SourceFormat::DiffusersFolder => {
            let used: BTreeMap<PathBuf, ()> = source
                .components()
                .into_iter()
                .filter_map(|c| source.weights(c).ok())
                .flat_map(|w| w.files())
                .map(|p| (p, ()))
                .collect();
            write_folder_atomically(output, |tmp| {
                copy_folder(source.path(), tmp, &used, &mut plan, &mut report)
            })?;
        }
    }
    Ok(report)
}

/// Extensions of weight files: those the loader does not use are left out
/// of a merged folder rather than copied unmerged.
const WEIGHT_EXTENSIONS: [&str; 8] = [
    "safetensors",
    "bin",
    "ckpt",
    "pt",
    "pth",
    "msgpack",
    "onnx",
    "h5",
];

/// Copies the folder `from` into `to`: the weight files in `used` rewritten
/// with their edits, other weight files left out, everything else copied.
fn copy_folder(
    from: &Path,
    to: &Path,
    used: &BTreeMap<PathBuf, ()>,
    plan: &mut BTreeMap<PathBuf, FilePlan>,
    report: &mut MergeReport,
) -> Result<(), MergeError> {
    std::fs::create_dir_all(to).map_err(io(to))?;
    let mut entries: Vec<_> = std::fs::read_dir(from)
        .map_err(io(from))?
        .collect::<Result<_, _>>()
        .map_err(io(from))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let src = e.path();
        let dst = to.join(e.file_name());
        if src.is_dir() {
            copy_folder(&src, &dst, used, plan, report)?;
            continue;
        }
        let canonical = src.canonicalize().unwrap_or_else(|_| src.clone());
        let is_used = used.contains_key(&src) || used.contains_key(&canonical);
        let is_weights = src
            .extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| WEIGHT_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()));
        if is_used {
            let (file, edits) = match plan.remove(&src).or_else(|| plan.remove(&canonical)) {
                Some(found) => found,
                None => (Arc::new(SafetensorsFile::open(&src)?), BTreeMap::new()),
            };
            let out = std::fs::File::create(&dst).map_err(io(&dst))?;
            let mut w = BufWriter::new(out);
            rewrite(&file, &edits, &mut w)?;
            w.flush().map_err(io(&dst))?;
            report.files_written.push(dst);
        } else if is_weights {
            report.skipped.push(src);
        } else {
            std::fs::copy(&src, &dst).map_err(io(&src))?;
        }
    }
    Ok(())
}

/// Writes `file` to `w` with `edits` applied: the header and every unedited
/// tensor byte for byte, each edited tensor converted to f32, updated and
/// stored back in its dtype (round to nearest even, as PyTorch does).
fn rewrite(
    file: &SafetensorsFile,
    edits: &BTreeMap<String, Vec<RangeEdit>>,
    w: &mut dyn Write,
) -> Result<(), MergeError> {
    let path = file.path().to_path_buf();
    let io = |source| MergeError::Io {
        path: path.clone(),
        source,
    };
    let mut tensors: Vec<(&String, &crate::load::safetensors_file::TensorInfo)> =
        file.tensors().iter().collect();
    tensors.sort_by_key(|(_, t)| t.start);
    let mut pos = 0usize;
    let copy = |from: usize, to: usize, w: &mut dyn Write| -> Result<(), MergeError> {
        const CHUNK: usize = 64 << 20;
        let mut at = from;
        while at < to {
            let next = (at + CHUNK).min(to);
            let bytes = file.bytes(at, next).ok_or_else(|| {
                MergeError::Refused(format!("{}: byte range outside the file", path.display()))
            })?;
            w.write_all(bytes).map_err(io)?;
            file.release(at, next);
            at = next;
        }
        Ok(())
    };
    for (key, info) in tensors {
        copy(pos, info.start, w)?;
        match edits.get(key.as_str()) {
            None => copy(info.start, info.end, w)?,
            Some(ranges) => {
                let bytes = edited_tensor(file, key, info, ranges)?;
                w.write_all(&bytes).map_err(io)?;
            }
        }
        pos = info.end;
    }
    copy(pos, file.len(), w)?;
    Ok(())
}

/// The bytes of tensor `key` with its range edits applied.
fn edited_tensor(
    file: &SafetensorsFile,
    key: &str,
    info: &crate::load::safetensors_file::TensorInfo,
    ranges: &[RangeEdit],
) -> Result<Vec<u8>, MergeError> {
    let context = format!("{}: `{key}`", file.path().display());
    let elem = dtype_size(&info.dtype).unwrap_or(4);
    let stored = file.load_range(
        key,
        &info.dtype,
        &[info.numel()],
        info.start,
        info.end,
        &Device::Cpu,
    )?;
    let mut values = stored
        .to_dtype(DType::F32)
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(tensor_err(context.clone()))?;
    for r in ranges {
        let from = (r.start - info.start) / elem;
        let count = (r.end - r.start) / elem;
        let mut delta: Option<Tensor> = None;
        for (weight, m) in &r.terms {
            let d = term_delta(&values[from..from + count], r, *weight, m)
                .map_err(tensor_err(r.label.clone()))?;
            delta = Some(match delta {
                None => d,
                Some(acc) => (acc + d).map_err(tensor_err(r.label.clone()))?,
            });
        }
        let Some(delta) = delta else { continue };
        let delta = if r.transposed {
            delta.t().and_then(|t| t.contiguous())
        } else {
            Ok(delta)
        }
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(tensor_err(r.label.clone()))?;
        if delta.len() != count {
            return Err(MergeError::Refused(format!(
                "{}: the update has {} values, the stored layer {count}",
                r.label,
                delta.len()
            )));
        }
        for (v, d) in values[from..from + count].iter_mut().zip(&delta) {
            *v += d;
        }
    }
    Ok(match info.dtype.as_str() {
        "F32" => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        "F16" => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
    })
}

/// The [`MergeError::Io`] of an operation on `path`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MergeError {
    let path = path.to_path_buf();
    move |source| MergeError::Io { path, source }
}

/// Writes `path` atomically ([`crate::atomic_file`]).
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<(), MergeError>,
) -> Result<(), MergeError> {
    crate::atomic_file::write_with(path, |p, source| io(p)(source), write)
}

/// Builds a folder at a temporary path beside `path`, then renames it into
/// place (an existing `path` is replaced only once the new one is complete).
fn write_folder_atomically(
    path: &Path,
    build: impl FnOnce(&Path) -> Result<(), MergeError>,
) -> Result<(), MergeError> {
    let tmp = temporary_beside(path);
    let result = (|| {
        build(&tmp)?;
        if path.exists() {
            let old = temporary_beside(path).with_extension("old");
            std::fs::rename(path, &old).map_err(io(path))?;
            std::fs::rename(&tmp, path).map_err(io(path))?;
            let _ = std::fs::remove_dir_all(&old);
            Ok(())
        } else {
            std::fs::rename(&tmp, path).map_err(io(path))
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// What [`merge_loras`] made of each module.
#[derive(Debug, Clone, PartialEq)]
pub struct MergedModule {
    /// How many of the inputs adapt it.
    pub sources: usize,
    /// Its rank after concatenation, and after `--rank` (the same without).
    pub concatenated_rank: usize,
    pub rank: usize,
    /// Share of the summed update's Frobenius norm kept (1 without `--rank`).
    pub fro_kept: f64,
}

/// Merges LoRAs of one family into one: modules in several inputs are
/// concatenated along the rank (exact), then cut to `rank` by SVD when
/// given. Every module of the result has the alpha `alpha` (default: the
/// most common rank of the result, so most modules have scale 1).
pub fn merge_loras(loras: &[WeightedLora], rank: Option<usize>) -> Result<MergedLora, MergeError> {
    let Some(first) = loras.first() else {
        return Err(MergeError::Refused("no LoRA to merge".into()));
    };
    for l in loras {
        l.file
            .weights
            .require_plain("merging LoRAs into one LoRA")
            .map_err(|e| {
                MergeError::Refused(format!(
                    "{}: {e}; merge it into a checkpoint with --model instead",
                    l.file.path.display()
                ))
            })?;
        if l.file.family != first.file.family {
            let name = |f: LoraFamily| match f {
                LoraFamily::Sd => "SD1/SD2",
                LoraFamily::Sdxl => "SDXL",
            };
            return Err(MergeError::Refused(format!(
                "{} is an {} LoRA and {} an {} one: LoRAs for different model families cannot \
                 be merged",
                first.file.path.display(),
                name(first.file.family),
                l.file.path.display(),
                name(l.file.family)
            )));
        }
    }
    // Per module: (weight · scale, module, file) of each input adapting it.
    type Part<'a> = (f64, &'a LoraModule, &'a Path);
    let mut parts: BTreeMap<(LoraComponent, String), Vec<Part>> = BTreeMap::new();
    for l in loras {
        for (key, m) in &l.file.weights.modules {
            parts.entry(key.clone()).or_default().push((
                f64::from(l.weight) * f64::from(m.scale()),
                m,
                &l.file.path,
            ));
        }
    }
    let mut out = LoraWeights::default();
    let mut stats = BTreeMap::new();
    for (key, list) in parts {
        let (_, m0, p0) = list[0];
        let shape_of = |m: &LoraModule| {
            let mut d = m.down.dims().to_vec();
            d[0] = 0;
            (d, m.up.dims()[0])
        };
        for &(_, m, p) in &list[1..] {
            if shape_of(m) != shape_of(m0) {
                return Err(MergeError::Refused(format!(
                    "module {}: {} has down {:?} / up {:?}, {} down {:?} / up {:?}: the files \
                     adapt different layers under one name (made for different models)",
                    key.1,
                    p0.display(),
                    m0.down.dims(),
                    m0.up.dims(),
                    p.display(),
                    m.down.dims(),
                    m.up.dims()
                )));
            }
        }
        let ctx = format!("module {}", key.1);
        let downs: Vec<Tensor> = list
            .iter()
            .map(|(_, m, _)| m.down.to_dtype(DType::F32))
            .collect::<candle_core::Result<_>>()
            .map_err(tensor_err(ctx.clone()))?;
        let ups: Vec<Tensor> = list
            .iter()
            .map(|(s, m, _)| m.up.to_dtype(DType::F32)?.affine(*s, 0.0))
            .collect::<candle_core::Result<_>>()
            .map_err(tensor_err(ctx.clone()))?;
        let down = Tensor::cat(&downs, 0).map_err(tensor_err(ctx.clone()))?;
        let up = Tensor::cat(&ups, 1).map_err(tensor_err(ctx.clone()))?;
        let concatenated_rank = down.dims()[0];
        let merged = LoraModule {
            down,
            up,
            alpha: concatenated_rank as f32,
            dora_scale: None,
        };
        let (module, fro_kept) = match rank {
            Some(k) if k < concatenated_rank => {
                let (m, s) = resize_module(&merged, RankRule::Fixed(k), None, DType::F32)
                    .map_err(tensor_err(ctx.clone()))?;
                (m, s.fro_kept)
            }
            _ => (merged, 1.0),
        };
        stats.insert(
            key.clone(),
            MergedModule {
                sources: list.len(),
                concatenated_rank,
                rank: module.rank(),
                fro_kept,
            },
        );
        out.modules.insert(key, module);
    }
    // One alpha for every module (see the module docs).
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for m in out.modules.values() {
        *counts.entry(m.rank()).or_default() += 1;
    }
    let alpha = counts
        .into_iter()
        .max_by_key(|&(rank, n)| (n, rank))
        .map_or(1.0, |(rank, _)| rank as f32);
    for (key, m) in out.modules.iter_mut() {
        if m.alpha != alpha {
            *m = with_alpha(m, alpha).map_err(tensor_err(format!("module {}", key.1)))?;
        }
    }
    Ok((out, stats))
}
