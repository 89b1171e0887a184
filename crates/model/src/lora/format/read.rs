//! Reading LoRA files of any of the three formats, detected from the keys.
//!
//! The container is opened with the header-checked reader of [`crate::load::safetensors_file`]
//! (header length, JSON, dtypes, `shape × dtype = byte length`, data inside the file); on top of
//! it a LoRA file must not have overlapping tensor data and its metadata values must be strings,
//! as the format requires (the model reader tolerates both, a LoRA reader has no reason to).
//!
//! Then every key must be understood: a tensor we cannot place, a module name no SD1/SD2/SDXL
//! model has (or, given a model, that model lacks), a module missing its up or down half, ranks
//! that disagree — each is an error listing every offending key, never a silently smaller LoRA.
//! A LoRA of the other family than the model's (SDXL on SD1.5, …) is refused by name.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device};

use super::names::{self, KohyaNameMap, LoraFamily, NameError};
use super::{LoraFile, LoraFormat, LoraFormatError};
use crate::load::safetensors_file::SafetensorsFile;
use crate::lora::lycoris::{KronFactor, LycorisModule};
use crate::lora::{LoraComponent, LoraModule, LoraWeights, ModuleWeights, TargetInfo};

/// Reads a LoRA file, resolving module names by the SD1/SD2/SDXL grammar.
pub fn read_lora(path: &Path) -> Result<LoraFile, LoraFormatError> {
    read(path, None)
}

/// Reads a LoRA file, resolving module names exactly against `targets` (the model's adaptable
/// layers): a name the model does not have is an error. Shapes are checked by
/// [`super::validate()`].
pub fn read_lora_for_model(
    path: &Path,
    targets: &[TargetInfo],
) -> Result<LoraFile, LoraFormatError> {
    read(path, Some(targets))
}

/// Which half of a module a tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
    /// DoRA's magnitude: kohya/LyCORIS `dora_scale`, PEFT `lora_magnitude_vector`.
    Magnitude,
    /// A LyCORIS LoHa/LoKr tensor, by its key suffix (`hada_w1_a`, `lokr_w2`, …).
    Lycoris(&'static str),
}

/// The LyCORIS LoHa/LoKr tensors sd-lora reads (Tucker-decomposed conv
/// factors `hada_t1`/`hada_t2`/`lokr_t2` are not among them).
const LYCORIS_SUFFIXES: [&str; 10] = [
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
];

/// A key understood: its format (`None` for a dotted `.alpha`, which PEFT and diffusers files
/// may both carry), the module it belongs to (as named in the file) and which part it is.
struct KeyInfo {
    format: Option<LoraFormat>,
    module: String,
    part: Part,
}

fn classify(key: &str) -> Option<KeyInfo> {
    let kohya = |module: &str, part| {
        (module.starts_with("lora_") && !module.contains('.')).then(|| KeyInfo {
            format: Some(LoraFormat::Kohya),
            module: module.to_string(),
            part,
        })
    };
    let dotted = |format, module: &str, part| {
        (!module.is_empty()).then(|| KeyInfo {
            format,
            module: module.to_string(),
            part,
        })
    };
    if let Some(m) = key.strip_suffix(".lora_down.weight") {
        return kohya(m, Part::Down);
    }
    if let Some(m) = key.strip_suffix(".lora_up.weight") {
        return kohya(m, Part::Up);
    }
    if let Some(m) = key.strip_suffix(".alpha") {
        return if m.contains('.') {
            dotted(None, m, Part::Alpha)
        } else {
            kohya(m, Part::Alpha)
        };
    }
    if let Some(m) = key.strip_suffix(".dora_scale") {
        return kohya(m, Part::Magnitude);
    }
    for suffix in LYCORIS_SUFFIXES {
        if let Some(m) = key.strip_suffix(suffix).and_then(|m| m.strip_suffix('.')) {
            return kohya(m, Part::Lycoris(suffix));
        }
    }
    for suffix in [".lora_magnitude_vector", ".lora_magnitude_vector.weight"] {
        if let Some(m) = key.strip_suffix(suffix) {
            return dotted(Some(LoraFormat::Peft), m, Part::Magnitude);
        }
    }
    if let Some(m) = key.strip_suffix(".lora_A.weight") {
        return dotted(Some(LoraFormat::Peft), m, Part::Down);
    }
    if let Some(m) = key.strip_suffix(".lora_B.weight") {
        return dotted(Some(LoraFormat::Peft), m, Part::Up);
    }
    for (suffix, part) in [
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
    ] {
        if let Some(m) = key.strip_suffix(suffix) {
            return dotted(Some(LoraFormat::Diffusers), m, part);
        }
    }
    // Attention processors of old diffusers: `<attn>.processor.to_q_lora.down.weight`.
    for (suffix, part) in [
        ("_lora.down.weight", Part::Down),
        ("_lora.up.weight", Part::Up),
    ] {
        if let Some(m) = key.strip_suffix(suffix)
            && let Some((attn, proj)) = m.rsplit_once(".processor.")
        {
            let proj = match proj {
                "to_q" | "to_k" | "to_v" => proj,
                "to_out" => "to_out.0",
                _ => return None,
            };
            return dotted(Some(LoraFormat::Diffusers), &format!("{attn}.{proj}"), part);
        }
    }
    None
}

/// Why a set of unreadable keys is unreadable, when we can tell.
fn unsupported_hint(keys: &[String]) -> String {
    let any = |pat: &str| keys.iter().any(|k| k.contains(pat));
    if any("hada_t1") || any("hada_t2") || any("lokr_t2") || any("lora_mid") {
        " (LyCORIS Tucker-decomposed conv factors — `use_tucker`/`use_cp` — are not supported; \
         retrain without them)"
            .into()
    } else if any("oft_") || any("boft_") {
        " (LyCORIS (B)OFT is not supported)".into()
    } else if any("ia3") || any("on_input") {
        " (LyCORIS IA³ is not supported)".into()
    } else if any("glora") || any(".a1.weight") {
        " (LyCORIS GLoRA is not supported)".into()
    } else if any(".diff") {
        " (LyCORIS full-weight diffs are not supported)".into()
    } else {
        String::new()
    }
}

#[derive(Default)]
struct Parts<'a> {
    down: Option<&'a str>,
    up: Option<&'a str>,
    alpha: Option<&'a str>,
    magnitude: Option<&'a str>,
    lycoris: BTreeMap<&'static str, &'a str>,
}

fn read(path: &Path, targets: Option<&[TargetInfo]>) -> Result<LoraFile, LoraFormatError> {
    let st = SafetensorsFile::open(path)?;
    check_no_overlap(path, &st)?;
    check_metadata_strings(path)?;
    let file_size = std::fs::metadata(path)
        .map_err(|source| LoraFormatError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let not_a_lora = |reason: String| LoraFormatError::NotALora {
        file: path.to_path_buf(),
        reason,
    };

    // 1. Every key must be a LoRA tensor of a known format.
    let mut unknown = Vec::new();
    let mut formats = BTreeMap::new();
    let mut modules: BTreeMap<String, Parts> = BTreeMap::new();
    let mut problems = Vec::new();
    for key in st.tensors().keys() {
        let Some(info) = classify(key) else {
            unknown.push(key.clone());
            continue;
        };
        if let Some(f) = info.format {
            *formats.entry(f.to_string()).or_insert(0usize) += 1;
        }
        let parts = modules.entry(info.module).or_default();
        let slot = match info.part {
            Part::Down => &mut parts.down,
            Part::Up => &mut parts.up,
            Part::Alpha => &mut parts.alpha,
            Part::Magnitude => &mut parts.magnitude,
            Part::Lycoris(suffix) => {
                if let Some(previous) = parts.lycoris.insert(suffix, key) {
                    problems.push(format!("`{previous}` and `{key}` are the same tensor"));
                }
                continue;
            }
        };
        if let Some(previous) = slot.replace(key) {
            problems.push(format!("`{previous}` and `{key}` are the same tensor"));
        }
    }
    let format = match formats.keys().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => {
            let sample: Vec<&str> = st.tensors().keys().take(3).map(String::as_str).collect();
            let looks_like_model = st.tensors().keys().any(|k| {
                k.starts_with("model.diffusion_model.")
                    || k.starts_with("down_blocks.")
                    || k.starts_with("text_model.")
                    || k.starts_with("encoder.down")
            });
            return Err(not_a_lora(if st.tensors().is_empty() {
                "it holds no tensors".into()
            } else if looks_like_model {
                format!(
                    "its keys ({}, …) are those of a model's weights, not of a LoRA",
                    sample.join(", ")
                )
            } else {
                format!(
                    "no key ends in .lora_down.weight, .lora_A.weight or .lora.down.weight \
                     (first keys: {})",
                    sample.join(", ")
                )
            }));
        }
        ["kohya"] => LoraFormat::Kohya,
        ["peft"] => LoraFormat::Peft,
        ["diffusers"] => LoraFormat::Diffusers,
        ref several => {
            return Err(not_a_lora(format!(
                "it mixes LoRA key conventions ({}); convert it with the tool that wrote it",
                several.join(", ")
            )));
        }
    };
    if !unknown.is_empty() {
        let hint = unsupported_hint(&unknown);
        return Err(LoraFormatError::UnsupportedKeys {
            file: path.to_path_buf(),
            keys: unknown,
            hint,
        });
    }
    // A dotted `.alpha` in a kohya file belongs to no kohya module.
    if format == LoraFormat::Kohya {
        let stray: Vec<String> = modules
            .keys()
            .filter(|m| m.contains('.'))
            .map(|m| format!("{m}.alpha"))
            .collect();
        if !stray.is_empty() {
            return Err(LoraFormatError::UnsupportedKeys {
                file: path.to_path_buf(),
                keys: stray,
                hint: " (dotted alpha keys in a kohya file)".into(),
            });
        }
    }

    // 2. Every module must name a module of the model.
    let map = targets.map(KohyaNameMap::from_targets);
    let target_set: Option<HashSet<(LoraComponent, &str)>> =
        targets.map(|t| t.iter().map(|t| (t.component, t.path.as_str())).collect());
    let model_family = map.as_ref().and_then(KohyaNameMap::family);
    let name_family = names_family(path, format, modules.keys())?;
    let mut resolved: Vec<(&str, (LoraComponent, String))> = Vec::new();
    let (mut unknown_names, mut wrong_family) = (Vec::new(), Vec::new());
    for name in modules.keys() {
        let result = match format {
            LoraFormat::Kohya => names::resolve_kohya_name(name, map.as_ref()),
            LoraFormat::Peft | LoraFormat::Diffusers => resolve_dotted(name, target_set.as_ref()),
        };
        match result {
            Ok(r) => resolved.push((name, r)),
            Err(NameError::WrongFamily(n)) => wrong_family.push(n),
            Err(NameError::Unknown(n)) => unknown_names.push(n),
        }
    }
    // A PEFT/diffusers LoRA names modules by diffusers paths, which SD1 and SDXL share in part:
    // it is of the other family when its paths say so and the model lacks some of them.
    if let (Some(model), Some(lora)) = (model_family, name_family)
        && model != lora
        && !unknown_names.is_empty()
        && format != LoraFormat::Kohya
    {
        wrong_family.append(&mut unknown_names);
    }
    if !wrong_family.is_empty() {
        return Err(LoraFormatError::WrongFamily {
            file: path.to_path_buf(),
            lora: name_family.unwrap_or(LoraFamily::Sd),
            model: model_family.unwrap_or(LoraFamily::Sd),
            names: wrong_family,
        });
    }
    if !unknown_names.is_empty() {
        return Err(LoraFormatError::UnknownModules {
            file: path.to_path_buf(),
            names: unknown_names,
            target: if targets.is_some() {
                "the model".into()
            } else {
                "an SD1/SD2/SDXL model".into()
            },
        });
    }

    // 3. Load and check each module.
    let mut weights = LoraWeights::default();
    let mut dtype_counts: HashMap<DType, usize> = HashMap::new();
    let mut seen: HashMap<(LoraComponent, String), &str> = HashMap::new();
    for (name, key) in resolved {
        let parts = &modules[name];
        let lycoris = !parts.lycoris.is_empty();
        let low_rank = parts.down.is_some() || parts.up.is_some();
        if lycoris && (low_rank || parts.magnitude.is_some()) {
            problems.push(format!(
                "module `{name}` mixes LyCORIS tensors ({}) with {}",
                parts.lycoris.keys().copied().collect::<Vec<_>>().join(", "),
                if low_rank {
                    "lora_up/lora_down"
                } else {
                    "a DoRA dora_scale (DoRA on LoHa/LoKr is not supported)"
                }
            ));
            continue;
        }
        if !lycoris && (parts.down.is_none() || parts.up.is_none()) {
            let missing = match (parts.down, parts.up) {
                (None, None) => "has an alpha but no weights",
                (None, Some(_)) => "has no down weight",
                _ => "has no up weight",
            };
            problems.push(format!("module `{name}` {missing}"));
            continue;
        }
        if let Some(other) = seen.insert(key.clone(), name) {
            problems.push(format!(
                "modules `{other}` and `{name}` both adapt {:?} `{}`",
                key.0, key.1
            ));
            continue;
        }
        let mut load = |key: &str| -> Result<Option<candle_core::Tensor>, LoraFormatError> {
            let info = &st.tensors()[key];
            let t = st.load_range(
                key,
                &info.dtype,
                &info.shape,
                info.start,
                info.end,
                &Device::Cpu,
            )?;
            if !t.dtype().is_float() {
                problems.push(format!(
                    "`{key}` has dtype {}, not a float type",
                    info.dtype
                ));
                return Ok(None);
            }
            *dtype_counts.entry(t.dtype()).or_default() += 1;
            let t = t
                .to_dtype(DType::F32)
                .map_err(|source| LoraFormatError::Tensor {
                    what: format!("{}: converting `{key}` to f32", path.display()),
                    source,
                })?;
            Ok(Some(t))
        };
        let module = if lycoris {
            let mut tensors = BTreeMap::new();
            let mut ok = true;
            for (suffix, key) in &parts.lycoris {
                match load(key)? {
                    Some(t) => {
                        tensors.insert(*suffix, t);
                    }
                    None => ok = false,
                }
            }
            if !ok {
                continue;
            }
            match lycoris_module(name, tensors) {
                Ok(m) => ModuleWeights::Lycoris(m),
                Err(e) => {
                    problems.push(e);
                    continue;
                }
            }
        } else {
            let (Some(down_key), Some(up_key)) = (parts.down, parts.up) else {
                continue;
            };
            let (Some(down), Some(up)) = (load(down_key)?, load(up_key)?) else {
                continue;
            };
            let magnitude = match parts.magnitude {
                Some(k) => match load(k)? {
                    // PEFT stores a Linear layer's magnitude as `[out]`.
                    Some(m) if m.rank() == 1 => {
                        let mut shape = vec![m.elem_count()];
                        shape.resize(down.rank().max(2), 1);
                        Some(m.reshape(shape).map_err(|source| LoraFormatError::Tensor {
                            what: format!("{}: reshaping `{k}`", path.display()),
                            source,
                        })?)
                    }
                    // … and a conv's as `[1, out, 1, 1]`.
                    Some(m) if format == LoraFormat::Peft && m.rank() == 4 => {
                        let out = m.dims()[1];
                        Some(m.reshape((out, 1, 1, 1)).map_err(|source| {
                            LoraFormatError::Tensor {
                                what: format!("{}: reshaping `{k}`", path.display()),
                                source,
                            }
                        })?)
                    }
                    Some(m) => Some(m),
                    None => continue,
                },
                None => None,
            };
            let mut m = LoraModule::new(down, up, 0.0);
            m.dora_scale = magnitude;
            ModuleWeights::LowRank(m)
        };
        let rank = match &module {
            ModuleWeights::LowRank(m) => m.rank(),
            ModuleWeights::Lycoris(m) => m.rank().unwrap_or(1),
        };
        let alpha = match parts.alpha {
            None => rank as f32,
            Some(alpha_key) => {
                let info = &st.tensors()[alpha_key];
                let alpha_tensor = st.load_range(
                    alpha_key,
                    &info.dtype,
                    &info.shape,
                    info.start,
                    info.end,
                    &Device::Cpu,
                )?;
                let value = (alpha_tensor.elem_count() == 1 && alpha_tensor.dtype().is_float())
                    .then(|| {
                        alpha_tensor
                            .to_dtype(DType::F32)
                            .and_then(|t| t.flatten_all())
                            .and_then(|t| t.to_vec1::<f32>())
                            .ok()
                            .and_then(|v| v.first().copied())
                    })
                    .flatten();
                match value {
                    // kohya: an alpha of 0 (or none) means alpha = rank.
                    Some(0.0) => rank as f32,
                    Some(a) if a.is_finite() && a > 0.0 => a,
                    _ => {
                        problems.push(format!(
                            "`{alpha_key}` must hold one positive float (it is {} {:?})",
                            info.dtype, info.shape
                        ));
                        continue;
                    }
                }
            }
        };
        let module = match module {
            ModuleWeights::LowRank(mut m) => {
                m.alpha = alpha;
                let before = problems.len();
                problems.extend(module_problems(name, &m));
                if problems.len() != before {
                    continue;
                }
                ModuleWeights::LowRank(m)
            }
            ModuleWeights::Lycoris(m) => ModuleWeights::Lycoris(with_lycoris_alpha(m, alpha)),
        };
        weights.insert(key, module);
    }
    if !problems.is_empty() {
        return Err(LoraFormatError::BadModules {
            file: path.to_path_buf(),
            problems,
        });
    }
    let dtype = dtype_counts
        .into_iter()
        .max_by_key(|(d, n)| (*n, d.as_str()))
        .map(|(d, _)| d)
        .unwrap_or(DType::F32);
    let family = name_family
        .or(model_family)
        .or_else(|| metadata_family(st.metadata()))
        .unwrap_or(LoraFamily::Sd);
    Ok(LoraFile {
        path: path.to_path_buf(),
        format,
        family,
        weights,
        metadata: st.metadata().clone(),
        dtype,
        file_size,
    })
}

/// The (component, path) of a PEFT/diffusers module name such as
/// `unet.down_blocks.0.attentions.0.proj_in`, `text_encoder.text_model.…`,
/// `base_model.model.<path>` or an unprefixed path.
fn resolve_dotted(
    name: &str,
    targets: Option<&HashSet<(LoraComponent, &str)>>,
) -> Result<(LoraComponent, String), NameError> {
    let infer = |path: &str| {
        if path.starts_with("text_model.") {
            LoraComponent::TextEncoder
        } else {
            LoraComponent::Unet
        }
    };
    let (component, path) = if let Some(p) = name.strip_prefix("unet.") {
        (LoraComponent::Unet, p)
    } else if let Some(p) = name.strip_prefix("text_encoder_2.") {
        (LoraComponent::TextEncoder2, p)
    } else if let Some(p) = name.strip_prefix("text_encoder.") {
        (LoraComponent::TextEncoder, p)
    } else if let Some(p) = name.strip_prefix("base_model.model.") {
        (infer(p), p)
    } else {
        (infer(name), name)
    };
    let known = match targets {
        Some(set) => set.contains(&(component, path)),
        None => names::is_known_path(component, path),
    };
    if known {
        Ok((component, path.to_string()))
    } else {
        Err(NameError::Unknown(name.to_string()))
    }
}

/// The family a file's module names show: kohya names always tell (a file mixing both is
/// refused); PEFT/diffusers paths only when they hold something SD1/SD2 lacks (a second text
/// encoder, the added-conditioning MLP, a second transformer block).
fn names_family<'a>(
    path: &Path,
    format: LoraFormat,
    names: impl Iterator<Item = &'a String>,
) -> Result<Option<LoraFamily>, LoraFormatError> {
    if format != LoraFormat::Kohya {
        let sdxl = names
            .into_iter()
            .any(|n| n.starts_with("text_encoder_2.") || names::path_is_sdxl_only(n));
        return Ok(sdxl.then_some(LoraFamily::Sdxl));
    }
    let mut examples: BTreeMap<LoraFamily, &str> = BTreeMap::new();
    for name in names {
        examples
            .entry(LoraFamily::of_kohya_name(name))
            .or_insert(name);
    }
    match examples.len() {
        0 => Ok(None),
        1 => Ok(examples.keys().next().copied()),
        _ => Err(LoraFormatError::NotALora {
            file: path.to_path_buf(),
            reason: format!(
                "it mixes SD1/SD2 and SDXL module names (`{}`, `{}`)",
                examples[&LoraFamily::Sd],
                examples[&LoraFamily::Sdxl]
            ),
        }),
    }
}

/// The family the kohya / modelspec metadata names, if any.
fn metadata_family(metadata: &BTreeMap<String, String>) -> Option<LoraFamily> {
    let base = metadata.get("ss_base_model_version").map(String::as_str);
    let arch = metadata.get("modelspec.architecture").map(String::as_str);
    if base.is_some_and(|b| b.starts_with("sdxl"))
        || arch.is_some_and(|a| a.starts_with("stable-diffusion-xl"))
    {
        Some(LoraFamily::Sdxl)
    } else if base.is_some_and(|b| b.starts_with("sd_v")) {
        Some(LoraFamily::Sd)
    } else {
        None
    }
}

/// A LoHa or LoKr module from its tensors (by key suffix), or what is wrong
/// with them. The alpha is set afterwards.
fn lycoris_module(
    name: &str,
    mut t: BTreeMap<&'static str, candle_core::Tensor>,
) -> Result<LycorisModule, String> {
    let names: Vec<&str> = t.keys().copied().collect();
    let hada = names.iter().any(|n| n.starts_with("hada_"));
    let lokr = names.iter().any(|n| n.starts_with("lokr_"));
    let module = if hada && lokr {
        return Err(format!(
            "module `{name}` mixes LoHa and LoKr tensors ({})",
            names.join(", ")
        ));
    } else if hada {
        match (
            t.remove("hada_w1_a"),
            t.remove("hada_w1_b"),
            t.remove("hada_w2_a"),
            t.remove("hada_w2_b"),
        ) {
            (Some(w1_a), Some(w1_b), Some(w2_a), Some(w2_b)) => LycorisModule::Hada {
                w1_a,
                w1_b,
                w2_a,
                w2_b,
                alpha: 1.0,
            },
            _ => {
                return Err(format!(
                    "LoHa module `{name}` needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b; \
                     it has {}",
                    names.join(", ")
                ));
            }
        }
    } else {
        let mut factor = |which: u8| -> Result<KronFactor, String> {
            let full = t.remove(if which == 1 { "lokr_w1" } else { "lokr_w2" });
            let a = t.remove(if which == 1 { "lokr_w1_a" } else { "lokr_w2_a" });
            let b = t.remove(if which == 1 { "lokr_w1_b" } else { "lokr_w2_b" });
            match (full, a, b) {
                (Some(f), None, None) => Ok(KronFactor::Full(f)),
                (None, Some(a), Some(b)) => Ok(KronFactor::LowRank { a, b }),
                _ => Err(format!(
                    "LoKr module `{name}` needs lokr_w{which} or both lokr_w{which}_a and \
                     lokr_w{which}_b; it has {}",
                    names.join(", ")
                )),
            }
        };
        let w1 = factor(1)?;
        let w2 = factor(2)?;
        LycorisModule::Kron { w1, w2, alpha: 1.0 }
    };
    module
        .update_dims()
        .map_err(|e| format!("module `{name}`: {e}"))?;
    Ok(module)
}

fn with_lycoris_alpha(m: LycorisModule, alpha: f32) -> LycorisModule {
    match m {
        LycorisModule::Hada {
            w1_a,
            w1_b,
            w2_a,
            w2_b,
            ..
        } => LycorisModule::Hada {
            w1_a,
            w1_b,
            w2_a,
            w2_b,
            alpha,
        },
        LycorisModule::Kron { w1, w2, .. } => LycorisModule::Kron { w1, w2, alpha },
    }
}

/// Problems of a module on its own (whatever the model): dimensions, rank agreement, alpha.
pub(crate) fn module_problems(name: &str, m: &LoraModule) -> Vec<String> {
    let (down, up) = (m.down.dims(), m.up.dims());
    let mut out = Vec::new();
    match (down.len(), up.len()) {
        (2, 2) | (4, 4) => {}
        _ => {
            out.push(format!(
                "module `{name}`: down {down:?} and up {up:?} must both be 2-D (Linear) or both \
                 4-D (Conv2d)"
            ));
            return out;
        }
    }
    if down[0] == 0 {
        out.push(format!("module `{name}`: rank 0 (down {down:?})"));
    }
    if up[1] != down[0] {
        out.push(format!(
            "module `{name}`: rank mismatch: down {down:?} has rank {} but up {up:?} has {}",
            down[0], up[1]
        ));
    }
    if up.len() == 4 && (up[2], up[3]) != (1, 1) {
        out.push(format!(
            "module `{name}`: up {up:?} must be a 1×1 convolution"
        ));
    }
    if !(m.alpha.is_finite() && m.alpha > 0.0) {
        out.push(format!(
            "module `{name}`: alpha {} is not positive",
            m.alpha
        ));
    }
    out
}

/// Tensor data ranges must not overlap (two tensors sharing bytes is a corrupt or crafted file).
fn check_no_overlap(path: &Path, st: &SafetensorsFile) -> Result<(), LoraFormatError> {
    let mut ranges: Vec<(usize, usize, &str)> = st
        .tensors()
        .iter()
        .filter(|(_, t)| t.end > t.start)
        .map(|(k, t)| (t.start, t.end, k.as_str()))
        .collect();
    ranges.sort();
    for pair in ranges.windows(2) {
        let ((_, end_a, a), (start_b, _, b)) = (pair[0], pair[1]);
        if start_b < end_a {
            return Err(LoraFormatError::Malformed {
                file: path.to_path_buf(),
                reason: format!("the data of tensors `{a}` and `{b}` overlap"),
            });
        }
    }
    Ok(())
}

/// `__metadata__`, when present, must be an object of strings. (The generic reader turns
/// non-strings into their JSON text; a LoRA with them was written by a broken tool.)
fn check_metadata_strings(path: &Path) -> Result<(), LoraFormatError> {
    let malformed = |reason: String| LoraFormatError::Malformed {
        file: path.to_path_buf(),
        reason,
    };
    let io = |source| LoraFormatError::Io {
        path: path.to_path_buf(),
        source,
    };
    // SafetensorsFile::open has already checked the header length against the file and limit.
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let n = usize::try_from(u64::from_le_bytes(len))
        .map_err(|_| malformed("the header length does not fit in memory".into()))?;
    let mut header = vec![0u8; n];
    f.read_exact(&mut header).map_err(io)?;
    let value: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| malformed(format!("the header is not valid JSON: {e}")))?;
    match value.get("__metadata__") {
        None => Ok(()),
        Some(serde_json::Value::Object(map)) => {
            let bad: Vec<&str> = map
                .iter()
                .filter(|(_, v)| !v.is_string())
                .map(|(k, _)| k.as_str())
                .collect();
            if bad.is_empty() {
                Ok(())
            } else {
                Err(malformed(format!(
                    "metadata values must be strings, but {} {} not: {}",
                    bad.len(),
                    if bad.len() == 1 { "is" } else { "are" },
                    bad.join(", ")
                )))
            }
        }
        Some(other) => {
            let kind = match other {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::Object(_) => "an object",
            };
            Err(malformed(format!(
                "`__metadata__` must be an object of strings, not {kind}"
            )))
        }
    }
}
