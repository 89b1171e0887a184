//! Putting LoRA adapters on a model and taking them off again.
//!
//! - [`create_trainable`]: fresh trainable adapters on the layers a
//!   [`TargetSpec`] selects (`down` kaiming-uniform from a seeded generator,
//!   `up` zero), returning the [`Var`]s for the optimizer;
//! - [`attach`]: adapters from loaded [`LoraWeights`] (inference, or resuming);
//!   every module must find its layer with fitting shapes, or nothing is
//!   attached and the error lists every offending module;
//! - [`extract`]: the current values as [`LoraWeights`] (for saving);
//! - [`collect_trainable`]: the variables of adapters already attached (to
//!   resume training from a loaded LoRA);
//! - [`remove_all`], [`set_multiplier`];
//! - [`merge`] / [`unmerge`]: fold `multiplier · alpha/rank · up·down` into the
//!   base weights (for fast inference) and back.
//!
//! # Merge precision
//!
//! The merged weight is computed in the LoRA dtype (f32) and rounded once to the
//! base dtype, so in f32 a merged forward equals the unmerged one up to float
//! reassociation (~1e-6 relative), and in f16/bf16 up to that one rounding of the
//! weight. Unmerging does not subtract: the adapter keeps the original weight
//! tensor while merged (`LoraAdapter::merged_from`) and puts it back, so unmerge
//! restores the weights bit for bit in every dtype — at the cost of holding both
//! the original and the merged weight of each adapted layer while merged.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Result, Tensor, Var, bail};

use super::encoders::{TextEncodersMut, TextEncodersRef};
use super::layer::{
    AdapterParams, DropoutControl, KronVar, LoraAdapter, LoraDropout, lora_dtype, module_seed,
    splitmix64, unit,
};
use super::lycoris::{DoraAxis, NetworkType, dora_norm, fresh_shapes};
use super::targets::{TargetSpec, model_targets, select};
use super::visit::{LayerMut, LayerRef};
use super::{LayerKind, LoraComponent, LoraWeights, ModuleWeights, TargetInfo};
use crate::unet::UNet2DConditionModel;

/// Options of [`create_trainable`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TrainOptions {
    /// Seed of the `down` initialisation and of the dropout masks; each module
    /// derives its own from this and its path.
    pub seed: u64,
    /// Dropout probability on the LoRA input (0 = none).
    pub dropout: f32,
    /// What the modules are made of.
    pub network: NetworkType,
    /// DoRA: the axis of the magnitude.
    pub dora_axis: DoraAxis,
    /// LoKr: LyCORIS' `factor` (≤ 0: the split closest to a square).
    pub lokr_factor: i64,
}

/// One trainable module: where it is and its parameters.
#[derive(Debug, Clone)]
pub struct TrainableModule {
    pub target: TargetInfo,
    pub params: AdapterParams,
    pub alpha: f32,
}

impl TrainableModule {
    /// The `down` of a LoRA/DoRA module (`None` for LoHa/LoKr).
    pub fn down(&self) -> Option<&Var> {
        match &self.params {
            AdapterParams::LowRank { down, .. } => Some(down),
            _ => None,
        }
    }

    /// The `up` of a LoRA/DoRA module (`None` for LoHa/LoKr).
    pub fn up(&self) -> Option<&Var> {
        match &self.params {
            AdapterParams::LowRank { up, .. } => Some(up),
            _ => None,
        }
    }

    /// Copies of the current values (f32, CPU) as module weights.
    pub fn snapshot(&self) -> Result<ModuleWeights> {
        self.params.snapshot(self.alpha)
    }
}

/// What [`create_trainable`] made.
#[derive(Debug, Clone)]
pub struct TrainableLora {
    /// The modules, UNet first, in model order.
    pub modules: Vec<TrainableModule>,
    /// The dropout switch shared by all modules (starts in eval mode: call
    /// `set_training(true)` in the training loop, `set_step` every step).
    pub dropout: DropoutControl,
}

impl TrainableLora {
    /// Every trainable variable (`down` then `up` of each LoRA module, the
    /// type's own tensors otherwise), for the optimizer.
    pub fn vars(&self) -> Vec<Var> {
        self.modules.iter().flat_map(|m| m.params.vars()).collect()
    }

    /// Number of modules.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// Whether there are no modules.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }
}

/// Calls `f(component, path, layer)` for every layer of the UNet and the text
/// encoders.
fn for_each_layer_mut(
    unet: &mut UNet2DConditionModel,
    mut text_encoders: TextEncodersMut<'_>,
    f: &mut dyn FnMut(LoraComponent, &str, LayerMut<'_>),
) {
    unet.visit_layers_mut(&mut |p, l| f(LoraComponent::Unet, p, l));
    for (c, te) in text_encoders.iter_mut() {
        te.visit_layers_mut(&mut |p, l| f(c, p, l));
    }
}

/// Shared-reference version of [`for_each_layer_mut`].
fn for_each_layer(
    unet: &UNet2DConditionModel,
    text_encoders: TextEncodersRef<'_>,
    f: &mut dyn FnMut(LoraComponent, &str, LayerRef<'_>),
) {
    unet.visit_layers(&mut |p, l| f(LoraComponent::Unet, p, l));
    for (c, te) in text_encoders.iter() {
        te.visit_layers(&mut |p, l| f(c, p, l));
    }
}

/// `"unet:down_blocks.0…"`: how errors name a module.
fn display(component: LoraComponent, path: &str) -> String {
    let c = match component {
        LoraComponent::Unet => "unet",
        LoraComponent::TextEncoder => "text_encoder",
        LoraComponent::TextEncoder2 => "text_encoder_2",
    };
    format!("{c}:{path}")
}

/// Fails with all `problems` listed (at most 20 shown), or succeeds if none.
fn report(what: &str, problems: &[String]) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = problems.iter().take(20).map(String::as_str).collect();
    let more = if problems.len() > shown.len() {
        format!("\n  … and {} more", problems.len() - shown.len())
    } else {
        String::new()
    };
    bail!(
        "{what}: {} problem(s):\n  {}{more}",
        problems.len(),
        shown.join("\n  ")
    )
}

/// A seeded kaiming-uniform `down` (PyTorch's `kaiming_uniform_(a = √5)`, as
/// kohya: bound `1/√fan_in`, `fan_in = in · kh · kw`).
fn kaiming_down(
    shape: &[usize],
    seed: u64,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let fan_in: usize = shape[1..].iter().product();
    let bound = 1.0 / (fan_in as f64).sqrt();
    let n: usize = shape.iter().product();
    let mut state = seed;
    let data: Vec<f64> = (0..n)
        .map(|_| {
            state = splitmix64(state);
            (2.0 * unit(state) - 1.0) * bound
        })
        .collect();
    Tensor::from_vec(data, shape, device)?.to_dtype(dtype)
}

/// A seeded normal tensor with standard deviation `std` (Box–Muller on the
/// same counter-based generator as [`kaiming_down`]).
fn seeded_normal(
    shape: &[usize],
    std: f64,
    seed: u64,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut state = seed;
    let mut next = || {
        state = splitmix64(state);
        unit(state)
    };
    let data: Vec<f64> = (0..n)
        .map(|_| {
            let (u1, u2) = (1.0 - next(), next());
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std
        })
        .collect();
    Tensor::from_vec(data, shape, device)?.to_dtype(dtype)
}

/// Fresh trainable parameters of `options.network` for `target` (rank `rank`)
/// on a layer with weight `weight`, initialised as LyCORIS does: the update is
/// zero at the start (LoRA/DoRA `up`, LoHa `w2_a`, LoKr `w2`/`w2_b` zero), and
/// DoRA's magnitude is the weight's own norm, so training starts at the base model.
fn fresh_params(
    target: &TargetInfo,
    rank: usize,
    weight: &Tensor,
    seed: u64,
    options: &TrainOptions,
) -> Result<AdapterParams> {
    let (dtype, device) = (lora_dtype(weight.dtype()), weight.device().clone());
    let var = |t: Tensor| Var::from_tensor(&t);
    let kaiming = |shape: &[usize], salt: u64| {
        kaiming_down(shape, splitmix64(seed ^ salt), dtype, &device).and_then(var)
    };
    let normal = |shape: &[usize], std: f64, salt: u64| {
        seeded_normal(shape, std, splitmix64(seed ^ salt), dtype, &device).and_then(var)
    };
    let kernel = match target.kind {
        LayerKind::Linear => None,
        LayerKind::Conv2d { kernel, .. } => Some(kernel),
    };
    let shapes = fresh_shapes(
        options.network,
        target.out_features,
        target.in_features,
        kernel,
        rank,
        options.lokr_factor,
    );
    let mut vars: BTreeMap<&str, Var> = BTreeMap::new();
    for (name, shape) in shapes {
        let var = match name {
            // The `down` of plain LoRA keeps its historical seed, so runs repeat.
            "down" => var(kaiming_down(&shape, seed, dtype, &device)?)?,
            "dora_scale" => {
                let w = weight.detach().to_dtype(dtype)?;
                var(dora_norm(&w, options.dora_axis)?)?
            }
            "hada_w1_a" => normal(&shape, 0.1, 1)?,
            "hada_w1_b" => normal(&shape, 1.0, 2)?,
            "hada_w2_b" => normal(&shape, 1.0, 3)?,
            "lokr_w1" => kaiming(&shape, 4)?,
            "lokr_w2_a" => kaiming(&shape, 5)?,
            // up, hada_w2_a, lokr_w2, lokr_w2_b: the update starts at zero.
            _ => Var::zeros(shape, dtype, &device)?,
        };
        vars.insert(name, var);
    }
    let mut take = |name: &str| {
        vars.remove(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no `{name}` was made")))
    };
    Ok(match options.network {
        NetworkType::Lora | NetworkType::Dora => AdapterParams::LowRank {
            down: take("down")?,
            up: take("up")?,
            dora: match take("dora_scale") {
                Ok(m) => Some((m, options.dora_axis)),
                Err(_) => None,
            },
        },
        NetworkType::Loha => AdapterParams::Hada {
            w1_a: take("hada_w1_a")?,
            w1_b: take("hada_w1_b")?,
            w2_a: take("hada_w2_a")?,
            w2_b: take("hada_w2_b")?,
        },
        NetworkType::Lokr => AdapterParams::Kron {
            w1: KronVar::Full(take("lokr_w1")?),
            w2: match take("lokr_w2") {
                Ok(w2) => KronVar::Full(w2),
                Err(_) => KronVar::LowRank {
                    a: take("lokr_w2_a")?,
                    b: take("lokr_w2_b")?,
                },
            },
        },
    })
}

/// Creates trainable adapters on every layer `spec` selects and returns their
/// variables. Fails (attaching nothing) when a pattern matches no layer, a rank
/// is 0, nothing is selected, or a selected layer already has an adapter.
pub fn create_trainable<'t>(
    unet: &mut UNet2DConditionModel,
    text_encoders: impl Into<TextEncodersMut<'t>>,
    spec: &TargetSpec,
    options: &TrainOptions,
) -> Result<TrainableLora> {
    if !(0.0..1.0).contains(&options.dropout) {
        bail!("LoRA dropout must be in [0, 1), got {}", options.dropout)
    }
    let text_encoders = text_encoders.into();
    let all = model_targets(unet, text_encoders.as_ref());
    if let Err(e) = spec.check_patterns(&all) {
        bail!("{e}")
    }
    let selected: BTreeMap<(LoraComponent, String), TargetInfo> = select(&all, spec)
        .into_iter()
        .map(|t| ((t.component, t.path.clone()), t))
        .collect();
    if selected.is_empty() {
        bail!("LoRA targets: the preset and patterns select no layer")
    }
    let mut problems = Vec::new();
    for_each_layer(unet, text_encoders.as_ref(), &mut |c, p, l| {
        if l.lora().is_some() && selected.contains_key(&(c, p.to_string())) {
            problems.push(format!("{} already has a LoRA adapter", display(c, p)));
        }
    });
    report("cannot create LoRA", &problems)?;

    let control = DropoutControl::new();
    let mut modules = Vec::with_capacity(selected.len());
    let mut errors: Vec<String> = Vec::new();
    for_each_layer_mut(unet, text_encoders, &mut |c, p, mut layer| {
        let Some(target) = selected.get(&(c, p.to_string())) else {
            return;
        };
        let ra = spec.params(target);
        let seed = module_seed(options.seed, c, p);
        let made = (|| -> Result<LoraAdapter> {
            let weight = layer.as_ref().weight();
            let params = fresh_params(target, ra.rank, weight, seed, options)?;
            // A LoKr with both factors full has scale 1; LyCORIS stores its
            // alpha as the rank to say so.
            let alpha = if params.rank().is_none() {
                ra.rank as f32
            } else {
                ra.alpha
            };
            let mut adapter = LoraAdapter::with_params(params, alpha);
            if options.dropout > 0.0 {
                adapter.dropout = Some(LoraDropout {
                    p: options.dropout,
                    seed: splitmix64(seed ^ 0xD50F),
                    control: control.clone(),
                });
            }
            Ok(adapter)
        })();
        match made {
            Ok(adapter) => {
                modules.push(TrainableModule {
                    target: target.clone(),
                    params: adapter.params.clone(),
                    alpha: adapter.alpha,
                });
                *layer.lora_mut() = Some(adapter);
            }
            Err(e) => errors.push(format!("{}: {e}", display(c, p))),
        }
    });
    report("cannot create LoRA", &errors)?;
    Ok(TrainableLora {
        modules,
        dropout: control,
    })
}

/// The adapters already on the model (e.g. put there by [`attach`] to resume
/// training) as a [`TrainableLora`], with dropout set up as `options` says
/// (`options.seed` only seeds the dropout masks here). Merged adapters are an
/// error: their variables no longer act on the output.
pub fn collect_trainable<'t>(
    unet: &mut UNet2DConditionModel,
    text_encoders: impl Into<TextEncodersMut<'t>>,
    options: &TrainOptions,
) -> Result<TrainableLora> {
    if !(0.0..1.0).contains(&options.dropout) {
        bail!("LoRA dropout must be in [0, 1), got {}", options.dropout)
    }
    let control = DropoutControl::new();
    let mut modules = Vec::new();
    let mut problems = Vec::new();
    for_each_layer_mut(unet, text_encoders.into(), &mut |c, p, mut layer| {
        let target = layer.as_ref().target(c, p);
        let Some(adapter) = layer.lora_mut().as_mut() else {
            return;
        };
        if adapter.is_merged() {
            problems.push(format!(
                "{}: merged (unmerge before training)",
                display(c, p)
            ));
            return;
        }
        adapter.dropout = (options.dropout > 0.0).then(|| LoraDropout {
            p: options.dropout,
            seed: splitmix64(module_seed(options.seed, c, p) ^ 0xD50F),
            control: control.clone(),
        });
        modules.push(TrainableModule {
            target,
            params: adapter.params.clone(),
            alpha: adapter.alpha,
        });
    });
    report("cannot train the attached LoRA", &problems)?;
    if modules.is_empty() {
        bail!("no LoRA adapter is attached to the model")
    }
    Ok(TrainableLora {
        modules,
        dropout: control,
    })
}

/// Checks one module of a file against its target layer.
fn check_module(target: &TargetInfo, m: &ModuleWeights) -> Option<String> {
    let name = display(target.component, &target.path);
    if let Err(e) = m.check_fits(target.kind, target.in_features, target.out_features) {
        return Some(format!(
            "{name}: {e} ({:?}, in {}, out {})",
            target.kind, target.in_features, target.out_features
        ));
    }
    if !m.alpha().is_finite() {
        return Some(format!("{name}: alpha is {}", m.alpha()));
    }
    None
}

/// Attaches every module of `weights` to its layer with inference scale
/// `multiplier`, returning the number attached. All modules are checked first:
/// a module whose path is no layer of the model, whose component is not given
/// (or is SDXL's second text encoder), whose shapes do not fit, or whose layer
/// already has an adapter is an error listing every such module, and then
/// nothing is attached.
pub fn attach<'t>(
    unet: &mut UNet2DConditionModel,
    text_encoders: impl Into<TextEncodersMut<'t>>,
    weights: &LoraWeights,
    multiplier: f32,
) -> Result<usize> {
    let text_encoders = text_encoders.into();
    let given = text_encoders.as_ref();
    let has_first = given.has(LoraComponent::TextEncoder);
    let has_second = given.has(LoraComponent::TextEncoder2);
    let mut targets: BTreeMap<(LoraComponent, String), (TargetInfo, bool)> = BTreeMap::new();
    for_each_layer(unet, text_encoders.as_ref(), &mut |c, p, l| {
        targets.insert((c, p.to_string()), (l.target(c, p), l.lora().is_some()));
    });
    let mut problems = Vec::new();
    for ((c, p), m) in weights.all() {
        match targets.get(&(*c, p.clone())) {
            Some((target, has_lora)) => {
                if let Some(problem) = check_module(target, &m) {
                    problems.push(problem);
                } else if *has_lora {
                    problems.push(format!(
                        "{} already has a LoRA adapter (remove it first; stacking LoRAs on one \
                         layer is done by merging)",
                        display(*c, p)
                    ));
                }
            }
            None => {
                let why = match c {
                    LoraComponent::TextEncoder2 if !has_second => {
                        "the model has no second text encoder (an SDXL LoRA on an SD1/SD2 model?)"
                    }
                    LoraComponent::TextEncoder if !has_first => "no text encoder was given",
                    _ => "no such Linear/Conv2d layer in the model",
                };
                problems.push(format!("{}: {why}", display(*c, p)));
            }
        }
    }
    report("cannot attach LoRA", &problems)?;

    let mut count = 0;
    let mut errors = Vec::new();
    for_each_layer_mut(unet, text_encoders, &mut |c, p, mut layer| {
        let Some(m) = weights.get(&(c, p.to_string())) else {
            return;
        };
        let made = (|| -> Result<LoraAdapter> {
            let weight = layer.as_ref().weight();
            let (dtype, device) = (lora_dtype(weight.dtype()), weight.device().clone());
            // `Var::from_tensor` copies, so the adapter never aliases `weights`.
            let params = AdapterParams::from_weights(&m, weight.dims(), dtype, &device)?;
            let mut adapter = LoraAdapter::with_params(params, m.alpha());
            adapter.multiplier = multiplier;
            Ok(adapter)
        })();
        match made {
            Ok(adapter) => {
                *layer.lora_mut() = Some(adapter);
                count += 1;
            }
            Err(e) => errors.push(format!("{}: {e}", display(c, p))),
        }
    });
    report("cannot attach LoRA", &errors)?;
    Ok(count)
}

/// The current LoRA of the model as f32 [`LoraWeights`] (copies, so later
/// training steps do not change them). The multiplier is not folded in.
pub fn extract<'t>(
    unet: &UNet2DConditionModel,
    text_encoders: impl Into<TextEncodersRef<'t>>,
) -> Result<LoraWeights> {
    let mut out = LoraWeights::default();
    let mut errors = Vec::new();
    for_each_layer(unet, text_encoders.into(), &mut |c, p, l| {
        let Some(a) = l.lora() else { return };
        match a.params.snapshot(a.alpha) {
            Ok(m) => out.insert((c, p.to_string()), m),
            Err(e) => errors.push(format!("{}: {e}", display(c, p))),
        }
    });
    report("cannot extract LoRA", &errors)?;
    Ok(out)
}

/// Removes every adapter (unmerging merged ones first); returns how many.
pub fn remove_all<'t>(
    unet: &mut UNet2DConditionModel,
    text_encoders: impl Into<TextEncodersMut<'t>>,
) -> usize {
    let mut count = 0;
    for_each_layer_mut(unet, text_encoders.into(), &mut |_, _, mut layer| {
        if let Some(adapter) = layer.lora_mut().take() {
            if let Some(original) = adapter.merged_from {
                *layer.weight_mut() = original;
            }
            count += 1;
        }
    });
    count
}

/// Sets the inference scale of every (unmerged) adapter; returns how many.
/// Merged adapters keep the multiplier they were merged with (unmerge first).
pub fn set_multiplier<'t>(
    unet: &mut UNet2DConditionModel,
    text_encoders: impl Into<TextEncodersMut<'t>>,
    multiplier: f32,
) -> usize {
    let mut count = 0;
    for_each_layer_mut(unet, text_encoders.into(), &mut |_, _, mut layer| {
        if let Some(a) = layer.lora_mut().as_mut().filter(|a| !a.is_merged()) {
            a.multiplier = multiplier;
            count += 1;
        }
    });
    count
}

/// Merges `multiplier · alpha/rank · up·down` of every unmerged adapter into its
/// base weight (see the module docs for precision); returns how many. The
/// adapters stay attached (skipped by the forward) until [`unmerge`] or
/// [`remove_all`].
pub fn merge<'t>(
    unet: &mut UNet2DConditionModel,
    text_encoders: impl Into<TextEncodersMut<'t>>,
    multiplier: f32,
) -> Result<usize> {
    let mut count = 0;
    let mut errors = Vec::new();
    for_each_layer_mut(unet, text_encoders.into(), &mut |c, p, mut layer| {
        let weight = layer.as_ref().weight().clone();
        let Some(adapter) = layer.lora_mut().as_mut().filter(|a| !a.is_merged()) else {
            return;
        };
        adapter.multiplier = multiplier;
        let merged = (|| -> Result<Tensor> {
            let delta = adapter.delta_weight(&weight)?;
            (weight.to_dtype(delta.dtype())? + delta)?
                .to_dtype(weight.dtype())
                .map(|w| w.detach())
        })();
        match merged {
            Ok(merged) => {
                adapter.merged_from = Some(weight);
                *layer.weight_mut() = merged;
                count += 1;
            }
            Err(e) => errors.push(format!("{}: {e}", display(c, p))),
        }
    });
    report("cannot merge LoRA", &errors)?;
    Ok(count)
}

/// Restores the original weight of every merged adapter (bit for bit) and
/// re-enables its LoRA path; returns how many.
pub fn unmerge<'t>(
    unet: &mut UNet2DConditionModel,
    text_encoders: impl Into<TextEncodersMut<'t>>,
) -> usize {
    let mut count = 0;
    for_each_layer_mut(unet, text_encoders.into(), &mut |_, _, mut layer| {
        let original = layer.lora_mut().as_mut().and_then(|a| a.merged_from.take());
        if let Some(original) = original {
            *layer.weight_mut() = original;
            count += 1;
        }
    });
    count
}

/// The (component, path) keys of every layer that holds an adapter.
pub fn adapted_layers<'t>(
    unet: &UNet2DConditionModel,
    text_encoders: impl Into<TextEncodersRef<'t>>,
) -> BTreeSet<(LoraComponent, String)> {
    let mut out = BTreeSet::new();
    for_each_layer(unet, text_encoders.into(), &mut |c, p, l| {
        if l.lora().is_some() {
            out.insert((c, p.to_string()));
        }
    });
    out
}
