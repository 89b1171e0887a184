//! `sd-lora extract`: a LoRA from the difference of two checkpoints (kohya's
//! `extract_lora_from_models.py`).
//!
//! For every layer kohya's LoRA would adapt — the UNet's transformer layers
//! and the text encoders' attention and MLP layers, plus (with a conv rank)
//! the ResNet and sampler layers — `ΔW = tuned − base` is factored to the
//! best rank-N approximation (`up = U_N·S_N`, `down = V_Nᵀ`, alpha = N so
//! the scale is 1, as kohya writes it), by the randomized SVD of
//! [`super::svd::low_rank`]. Conv kernels are flattened to
//! `[out, in·kh·kw]`, as kohya does. Layers whose weights are identical are
//! left out; a text encoder whose largest change is at most `min_diff`
//! (kohya: 0.01) is left out whole, as kohya does — fine-tuned checkpoints
//! whose text encoder was not trained differ there only by rounding.
//!
//! Only two layers (one from each checkpoint) are in memory at a time.

use candle_core::{DType, Device};

use super::merge::stored_targets;
use super::svd::low_rank;
use super::targets::{Preset, TargetGroup, TargetSpec, in_preset};
use super::{LayerKind, LoraComponent, LoraModule, LoraWeights, TargetInfo};
use crate::load::{LoadError, ModelSource};

/// What to extract.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExtractOptions {
    /// Rank of Linear layers and 1×1 convs.
    pub rank: usize,
    /// Rank of convs with a larger kernel; `None` leaves the ResNets out.
    pub conv_rank: Option<usize>,
    /// A text encoder whose largest absolute change is at most this is left out.
    pub min_diff: f32,
}

/// One extracted module.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractedModule {
    pub component: LoraComponent,
    pub path: String,
    pub rank: usize,
    /// `‖up·down‖_F / ‖ΔW‖_F`.
    pub fro_kept: f64,
    /// Largest absolute change of the layer's weights.
    pub max_diff: f32,
}

/// What [`extract`] did.
#[derive(Debug, Clone, Default)]
pub struct ExtractReport {
    pub modules: Vec<ExtractedModule>,
    /// Layers left out because their weights are identical.
    pub unchanged: usize,
    /// Text encoders left out, with their largest change.
    pub skipped_text_encoders: Vec<(LoraComponent, f32)>,
}

/// Why an extraction was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{0}")]
    Refused(String),
    #[error("{context}: {source}")]
    Tensor {
        context: String,
        source: Box<candle_core::Error>,
    },
}

/// The layers extraction adapts, from the base's weight table.
pub fn extraction_targets(base: &ModelSource, conv: bool) -> Result<Vec<TargetInfo>, LoadError> {
    let preset = if conv { Preset::Conv } else { Preset::Kohya };
    Ok(stored_targets(base)?
        .into_iter()
        .filter(|t| in_preset(preset, t))
        .collect())
}

/// Extracts the LoRA `tuned − base`. `progress(done, total, path)` is
/// called before each layer.
pub fn extract(
    base: &ModelSource,
    tuned: &ModelSource,
    options: ExtractOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<(LoraWeights, ExtractReport), ExtractError> {
    if base.architecture() != tuned.architecture() {
        return Err(ExtractError::Refused(format!(
            "{} is an {} model and {} an {} one: extract needs two checkpoints of the same \
             architecture",
            base.path().display(),
            base.architecture(),
            tuned.path().display(),
            tuned.architecture()
        )));
    }
    if options.rank == 0 || options.conv_rank == Some(0) {
        return Err(ExtractError::Refused("ranks must be at least 1".into()));
    }
    let targets = extraction_targets(base, options.conv_rank.is_some())?;
    // Every layer must exist with the same shape in the tuned model: checked
    // for all before any work.
    let mut missing = Vec::new();
    for t in &targets {
        let key = format!("{}.weight", t.path);
        let c = t.component.model_component();
        let base_shape = base.weights(c)?.get(&key).map(|e| e.shape().to_vec());
        let tuned_shape = tuned
            .weights(c)
            .ok()
            .and_then(|w| w.get(&key).map(|e| e.shape().to_vec()));
        if tuned_shape != base_shape {
            missing.push(format!(
                "{c} {key}: {:?} in the base, {:?} in the tuned model",
                base_shape, tuned_shape
            ));
        }
    }
    if !missing.is_empty() {
        let n = missing.len();
        missing.truncate(5);
        return Err(ExtractError::Refused(format!(
            "{} and {} do not have the same layers ({n} differ), e.g. {}",
            base.path().display(),
            tuned.path().display(),
            missing.join("; ")
        )));
    }
    let mut weights = LoraWeights::default();
    let mut report = ExtractReport::default();
    let mut te_max: std::collections::BTreeMap<LoraComponent, f32> = Default::default();
    for (i, t) in targets.iter().enumerate() {
        progress(i, targets.len(), &t.path);
        let key = format!("{}.weight", t.path);
        let c = t.component.model_component();
        let context = format!("{c} {key}");
        let terr = |source| ExtractError::Tensor {
            context: context.clone(),
            source: Box::new(source),
        };
        let b = base
            .weights(c)?
            .load(&key, &Device::Cpu, Some(DType::F32))?;
        let d = tuned
            .weights(c)?
            .load(&key, &Device::Cpu, Some(DType::F32))?;
        let delta = (d - b).map_err(terr)?;
        let max_diff = delta
            .abs()
            .and_then(|a| a.max_all())
            .and_then(|m| m.to_scalar::<f32>())
            .map_err(terr)?;
        if t.component != LoraComponent::Unet {
            let m = te_max.entry(t.component).or_insert(0.0);
            *m = m.max(max_diff);
        }
        if max_diff == 0.0 {
            report.unchanged += 1;
            continue;
        }
        let rank = match TargetSpec::group(t) {
            TargetGroup::UnetConv => options.conv_rank.unwrap_or(options.rank),
            _ => options.rank,
        };
        let dims = delta.dims().to_vec();
        let (out, inner) = (dims[0], dims[1..].iter().product::<usize>());
        let rank = rank.min(out).min(inner);
        let flat = delta.reshape((out, inner)).map_err(terr)?;
        let seed = 0x5d10_7a00 ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let f = low_rank(&flat, rank, seed).map_err(terr)?;
        let (up, down) = match t.kind {
            LayerKind::Linear => (f.up.clone(), f.down.clone()),
            LayerKind::Conv2d { kernel, .. } => (
                f.up.reshape((out, rank, 1, 1)).map_err(terr)?,
                f.down
                    .reshape((rank, dims[1], kernel[0], kernel[1]))
                    .map_err(terr)?,
            ),
        };
        report.modules.push(ExtractedModule {
            component: t.component,
            path: t.path.clone(),
            rank,
            fro_kept: f.fro_kept(rank),
            max_diff,
        });
        weights.modules.insert(
            (t.component, t.path.clone()),
            LoraModule {
                down,
                up,
                alpha: rank as f32,
                dora_scale: None,
            },
        );
    }
    progress(targets.len(), targets.len(), "");
    for (component, max) in te_max {
        if max <= options.min_diff {
            weights.modules.retain(|(c, _), _| *c != component);
            report.modules.retain(|m| m.component != component);
            report.skipped_text_encoders.push((component, max));
        }
    }
    Ok((weights, report))
}
