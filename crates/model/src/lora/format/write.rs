//! Writing LoRA files (kohya by default, PEFT on request) and converting between them.
//!
//! kohya: `NAME.lora_down.weight`, `NAME.lora_up.weight` and a 0-dim `NAME.alpha`, all in the
//! save dtype — kohya's `save_weights` casts the whole state dict, the `alpha` buffer included,
//! to the save dtype, so an fp16 file has an fp16 alpha (exact for the usual integer and
//! half-integer alphas). Metadata gets `sshs_model_hash` / `sshs_legacy_hash` computed as kohya
//! does (see [`super::serialize`]).
//!
//! PEFT: `unet.<path>.lora_A.weight` (down) / `lora_B.weight` (up); the format has no alpha, so
//! `alpha / rank` is folded into `lora_B` and a reader takes alpha = rank: the product
//! `scale · up · down` is unchanged.
//!
//! Files are written atomically: to a temporary file in the destination folder, then renamed,
//! so an interrupted save never leaves a truncated LoRA under the final name.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use super::metadata::{BaseModelVersion, Metadata, NETWORK_MODULE_LORA};
use super::names::{self, KohyaNaming, LoraFamily};
use super::read::{module_problems, read_lora};
use super::serialize::{RawTensor, serialize, sshs_hashes};
use super::{LoraFormat, LoraFormatError};
use crate::lora::lycoris::DoraAxis;
use crate::lora::{LoraComponent, LoraModule, LoraWeights};

/// The dtype LoRA tensors are saved in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SaveDtype {
    /// Half precision: what kohya saves by default, and ours.
    #[default]
    F16,
    BF16,
    F32,
}

impl SaveDtype {
    /// The safetensors dtype name.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            SaveDtype::F16 => "F16",
            SaveDtype::BF16 => "BF16",
            SaveDtype::F32 => "F32",
        }
    }

    /// The save dtype that keeps a file stored as `dtype` as it is (F16 for anything else).
    pub fn for_dtype(dtype: DType) -> Self {
        match dtype {
            DType::F32 | DType::F64 => SaveDtype::F32,
            DType::BF16 => SaveDtype::BF16,
            _ => SaveDtype::F16,
        }
    }
}

/// The formats we write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteFormat {
    Kohya,
    Peft,
}

/// Writes `weights` in kohya format with `metadata` (plus `ss_network_module` when absent, and
/// the `sshs_*` hashes).
///
/// The names follow the family: SD1/SD2 diffusers paths, or SDXL's sgm paths when `metadata`
/// says the base model is SDXL or the LoRA has modules on a second text encoder (with SDXL base's
/// layout; [`write_kohya_named`] takes the model's own).
pub fn write_kohya(
    path: &Path,
    weights: &LoraWeights,
    metadata: &Metadata,
    dtype: SaveDtype,
) -> Result<(), LoraFormatError> {
    write_lora(path, weights, WriteFormat::Kohya, &metadata.to_map(), dtype)
}

/// [`write_kohya`] with the family's naming given (see [`KohyaNaming::from_targets`]).
pub fn write_kohya_named(
    path: &Path,
    weights: &LoraWeights,
    metadata: &Metadata,
    dtype: SaveDtype,
    naming: &KohyaNaming,
) -> Result<(), LoraFormatError> {
    write_lora_named(
        path,
        weights,
        WriteFormat::Kohya,
        &metadata.to_map(),
        dtype,
        naming,
    )
}

/// Writes `weights` in PEFT format (alpha folded into `lora_B`) with `metadata`.
pub fn write_peft(
    path: &Path,
    weights: &LoraWeights,
    metadata: &Metadata,
    dtype: SaveDtype,
) -> Result<(), LoraFormatError> {
    write_lora(path, weights, WriteFormat::Peft, &metadata.to_map(), dtype)
}

/// Writes `weights` in `format` with a raw metadata map. Existing `sshs_*` hashes in `metadata`
/// are replaced by ones computed for this file. kohya names follow SDXL base's layout when
/// `ss_base_model_version` says SDXL or a module exists only in SDXL (second text encoder,
/// added-conditioning MLP, a second transformer block).
pub fn write_lora(
    path: &Path,
    weights: &LoraWeights,
    format: WriteFormat,
    metadata: &BTreeMap<String, String>,
    dtype: SaveDtype,
) -> Result<(), LoraFormatError> {
    let sdxl = metadata.get("ss_base_model_version").map(String::as_str)
        == Some(BaseModelVersion::SdxlBase.as_str())
        || weights.keys().any(|(c, p)| {
            *c == LoraComponent::TextEncoder2
                || (*c == LoraComponent::Unet && names::path_is_sdxl_only(p))
        });
    let naming = if sdxl {
        LoraFamily::Sdxl
    } else {
        LoraFamily::Sd
    }
    .kohya_naming();
    write_lora_named(path, weights, format, metadata, dtype, &naming)
}

fn write_lora_named(
    path: &Path,
    weights: &LoraWeights,
    format: WriteFormat,
    metadata: &BTreeMap<String, String>,
    dtype: SaveDtype,
    naming: &KohyaNaming,
) -> Result<(), LoraFormatError> {
    let mut problems: Vec<String> = weights
        .modules
        .iter()
        .flat_map(|((c, p), m)| module_problems(&format!("{c:?} {p}"), m))
        .collect();
    problems.extend(weights.lycoris.iter().filter_map(|((c, p), m)| {
        m.update_dims()
            .err()
            .map(|e| format!("module `{c:?} {p}`: {e}"))
    }));
    if format == WriteFormat::Peft {
        if !weights.lycoris.is_empty() {
            return Err(LoraFormatError::Unrepresentable {
                file: path.to_path_buf(),
                reason: format!(
                    "this is a {} network: PEFT/diffusers LoRA files hold LoRA and DoRA only; \
                     keep the kohya format, which ComfyUI, A1111 and Forge read",
                    weights.network_type().display_name()
                ),
            });
        }
        let input_axis: Vec<String> = weights
            .modules
            .iter()
            .filter(|(_, m)| m.dora_axis() == Some(DoraAxis::Input))
            .map(|((c, p), _)| format!("{c:?} {p}"))
            .take(3)
            .collect();
        if !input_axis.is_empty() {
            return Err(LoraFormatError::Unrepresentable {
                file: path.to_path_buf(),
                reason: format!(
                    "its DoRA magnitudes run along the input axis (e.g. {}); PEFT/diffusers DoRA \
                     has one magnitude per output row: train with network.dora_axis = \"output\" \
                     or keep the kohya format",
                    input_axis.join(", ")
                ),
            });
        }
    }
    if !problems.is_empty() {
        return Err(LoraFormatError::BadModules {
            file: path.to_path_buf(),
            problems,
        });
    }
    let tensors = match format {
        WriteFormat::Kohya => kohya_tensors(weights, dtype, naming),
        WriteFormat::Peft => peft_tensors(weights, dtype),
    }
    .map_err(|source| LoraFormatError::Tensor {
        what: format!("{}: preparing the LoRA tensors", path.display()),
        source,
    })?;
    let mut metadata: BTreeMap<String, String> = metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("sshs_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    match format {
        WriteFormat::Kohya => {
            metadata
                .entry("ss_network_module".into())
                .or_insert_with(|| NETWORK_MODULE_LORA.into());
        }
        WriteFormat::Peft => {
            // alpha is folded into lora_B, so the file's alpha is its rank.
            if let Some(dim) = metadata.get("ss_network_dim").cloned() {
                metadata.insert("ss_network_alpha".into(), dim);
            }
        }
    }
    let (model_hash, legacy_hash) = sshs_hashes(&tensors, &metadata);
    metadata.insert("sshs_model_hash".into(), model_hash);
    metadata.insert("sshs_legacy_hash".into(), legacy_hash);
    let bytes = serialize(&tensors, Some(&metadata));
    write_atomically(path, &bytes)
}

fn kohya_tensors(
    weights: &LoraWeights,
    dtype: SaveDtype,
    naming: &KohyaNaming,
) -> candle_core::Result<Vec<RawTensor>> {
    let mut out = Vec::with_capacity(weights.modules.len() * 3);
    for ((component, path), module) in &weights.modules {
        let Some(name) = naming.name(*component, path) else {
            candle_core::bail!("{component:?} module `{path}` has no name in the sgm layout")
        };
        out.push(raw(
            format!("{name}.lora_down.weight"),
            &module.down,
            dtype,
        )?);
        out.push(raw(format!("{name}.lora_up.weight"), &module.up, dtype)?);
        out.push(alpha_tensor(&name, module.alpha, dtype));
        if let Some(m) = &module.dora_scale {
            out.push(raw(format!("{name}.dora_scale"), m, dtype)?);
        }
    }
    for ((component, path), module) in &weights.lycoris {
        let Some(name) = naming.name(*component, path) else {
            candle_core::bail!("{component:?} module `{path}` has no name in the sgm layout")
        };
        for (suffix, t) in module.named_tensors() {
            out.push(raw(format!("{name}.{suffix}"), t, dtype)?);
        }
        out.push(alpha_tensor(&name, module.alpha(), dtype));
    }
    Ok(out)
}

fn alpha_tensor(name: &str, alpha: f32, dtype: SaveDtype) -> RawTensor {
    RawTensor {
        name: format!("{name}.alpha"),
        dtype: dtype.safetensors_name(),
        shape: vec![],
        bytes: encode(&[alpha], dtype),
    }
}

/// The PEFT/diffusers prefix of a component.
pub(crate) fn peft_prefix(component: LoraComponent) -> &'static str {
    match component {
        LoraComponent::Unet => "unet.",
        LoraComponent::TextEncoder => "text_encoder.",
        LoraComponent::TextEncoder2 => "text_encoder_2.",
    }
}

fn peft_tensors(weights: &LoraWeights, dtype: SaveDtype) -> candle_core::Result<Vec<RawTensor>> {
    let mut out = Vec::with_capacity(weights.modules.len() * 2);
    for ((component, path), module) in &weights.modules {
        let name = format!("{}{path}", peft_prefix(*component));
        let up = folded_up(module)?;
        out.push(raw(format!("{name}.lora_A.weight"), &module.down, dtype)?);
        out.push(raw(format!("{name}.lora_B.weight"), &up, dtype)?);
        if let Some(m) = &module.dora_scale {
            // PEFT keeps a Linear layer's magnitude as `[out]`, a conv's as
            // `[1, out, 1, 1]`.
            let m = if m.rank() == 2 {
                m.flatten_all()?
            } else {
                m.reshape((1, m.elem_count(), 1, 1))?
            };
            // With `.weight`: transformers' loader (text encoders) needs it,
            // diffusers' UNet loader takes either.
            out.push(raw(
                format!("{name}.lora_magnitude_vector.weight"),
                &m,
                dtype,
            )?);
        }
    }
    Ok(out)
}

/// `up · alpha / rank` (the module's up itself when the scale is 1).
fn folded_up(module: &LoraModule) -> candle_core::Result<Tensor> {
    let up = module.up.to_dtype(DType::F32)?;
    let scale = module.scale();
    if scale == 1.0 {
        Ok(up)
    } else {
        up.affine(f64::from(scale), 0.0)
    }
}

fn raw(name: String, t: &Tensor, dtype: SaveDtype) -> candle_core::Result<RawTensor> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(RawTensor {
        name,
        dtype: dtype.safetensors_name(),
        shape: t.dims().to_vec(),
        bytes: encode(&values, dtype),
    })
}

/// Little-endian bytes of `values` in `dtype`, rounding to nearest-even as PyTorch does.
fn encode(values: &[f32], dtype: SaveDtype) -> Vec<u8> {
    match dtype {
        SaveDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        SaveDtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        SaveDtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
    }
}

/// Writes `bytes` to `path` atomically ([`crate::atomic_file`]).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), LoraFormatError> {
    crate::atomic_file::write_with(
        path,
        |p, source| LoraFormatError::Io {
            path: p.to_path_buf(),
            source,
        },
        |w| {
            w.write_all(bytes).map_err(|source| LoraFormatError::Io {
                path: path.to_path_buf(),
                source,
            })
        },
    )
}

/// What [`convert`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConvertReport {
    pub from: LoraFormat,
    pub to: WriteFormat,
    pub modules: usize,
    pub dtype: SaveDtype,
}

/// Converts a LoRA file to `to`, keeping its dtype (F16 for dtypes we do not write) and its
/// metadata (hashes recomputed). kohya → PEFT → kohya is lossless: alpha is folded into the up
/// weights for PEFT and comes back as alpha = rank, with the same `scale · up · down`.
pub fn convert(
    input: &Path,
    output: &Path,
    to: WriteFormat,
) -> Result<ConvertReport, LoraFormatError> {
    let file = read_lora(input)?;
    let dtype = SaveDtype::for_dtype(file.dtype);
    let naming = file.family.kohya_naming();
    write_lora_named(output, &file.weights, to, &file.metadata, dtype, &naming)?;
    Ok(ConvertReport {
        from: file.format,
        to,
        modules: file.weights.len(),
        dtype,
    })
}
