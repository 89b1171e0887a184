//! The LoRA adapter a frozen layer can hold, and its forward pass.
//!
//! [`super::adapted::LoraLinear`] and [`super::adapted::LoraConv2d`] (the frozen
//! layers of [`crate::ops`] as the models hold them) have a `lora` slot; when it
//! holds a [`LoraAdapter`] (and the adapter is not merged) their
//! forward adds `multiplier · (alpha / rank) · up(down(dropout(x)))` to the
//! frozen base output, and `down` and `up` — candle [`Var`]s — receive
//! gradients. For a Linear layer the base output and the LoRA term are one graph
//! node with a hand-written backward ([`LoraAdapter::apply_linear`]), which keeps
//! one output-sized tensor instead of four; for a Conv2d the LoRA path is built
//! from ordinary candle matmuls plus a custom-gradient conv for the `down`, added
//! to the base output (which still computes only the input gradient).
//!
//! # DoRA, LoHa, LoKr
//!
//! The other network types ([`super::lycoris`]) hold their own tensors
//! ([`AdapterParams`]) and change the whole weight: each adapted layer is one
//! graph node on (`x`, the parameters packed into one tensor) whose forward
//! builds the update `ΔW` without a graph (and, for an f32 weight without
//! dropout, runs `W + ΔW` as one product), and whose backward rebuilds it,
//! gives the input gradient and the parameters' gradients from `dΔW = gᵀ·x̃`
//! with per-type formulas ([`LoraAdapter::apply_linear_update`]). No
//! weight-sized tensor stays in the graph between the forward and the
//! backward.
//!
//! # Dtypes
//!
//! The LoRA tensors are f32 whatever the base dtype (f64 only when the base is
//! f64, for finite-difference tests): the input is converted to the LoRA dtype,
//! the delta is computed there and converted back to the base dtype before it
//! is added. On the CPU this also sidesteps candle's missing bf16 conv.
//!
//! # Conv LoRA
//!
//! `down` is a conv with the base layer's kernel size, stride and padding, `up` a
//! 1×1 conv (computed as a matmul over pixels). The `down` conv has a hand-written
//! backward: the input gradient is [`crate::ops::conv`]'s (candle's own fails for a
//! stride-2 conv on inputs whose height and width differ in parity, and is a naive
//! loop on the CPU), the kernel gradient a conv of the input with the output
//! gradient dilated by the stride.
//!
//! # Dropout
//!
//! Optional, off by default, and only applied while its [`DropoutControl`] says
//! "training". The mask is a pure function of (seed, module, step, element
//! index) — a counter-based hash, not a stateful generator — so it is
//! reproducible, independent of the order in which layers run, and identical
//! when a block is recomputed for gradient checkpointing within the same step.
//! The trainer advances the step with [`DropoutControl::set_step`].
//!
//! # Checkpointing
//!
//! The forward reads `down`/`up` through [`crate::ops::checkpoint::param`], so
//! inside a checkpointed segment's no-grad forward they are detached and
//! candle records nothing; the segment's recomputation reads the variables.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use candle_core::{DType, Result, Tensor, Var, bail};

use super::lycoris::{
    DoraAxis, KronFactor, LycorisModule, NetworkType, check_magnitude, dora_delta, hada_delta,
    kron_delta,
};
use super::{LayerKind, LoraModule, ModuleWeights};
use crate::ops::checkpoint::param;
use crate::ops::conv::input_grad;
use crate::ops::matmul::matmul;
use crate::ops::with_grad2;
use crate::ops::{FrozenConv2d, FrozenLinear};

/// The dtype of the LoRA tensors for a base layer of dtype `base`: f64 for an
/// f64 base (tests), f32 otherwise.
pub fn lora_dtype(base: DType) -> DType {
    if base == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Shared switches for the dropout of many adapters: training on/off and the
/// current step (which, with the seed and module, determines the mask).
/// Cloning shares the state.
#[derive(Debug, Clone, Default)]
pub struct DropoutControl(Arc<DropoutState>);

#[derive(Debug, Default)]
struct DropoutState {
    training: AtomicBool,
    step: AtomicU64,
}

impl DropoutControl {
    /// A control in eval mode (no dropout) at step 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Turns dropout on (training) or off (eval).
    pub fn set_training(&self, training: bool) {
        self.0.training.store(training, Ordering::Relaxed);
    }

    /// Whether dropout is applied.
    pub fn is_training(&self) -> bool {
        self.0.training.load(Ordering::Relaxed)
    }

    /// Sets the step that selects the masks (call once per optimizer step).
    pub fn set_step(&self, step: u64) {
        self.0.step.store(step, Ordering::Relaxed);
    }

    /// The current step.
    pub fn step(&self) -> u64 {
        self.0.step.load(Ordering::Relaxed)
    }
}

/// Dropout on the input of the LoRA path (as PEFT's `lora_dropout`).
#[derive(Debug, Clone)]
pub struct LoraDropout {
    /// Probability of zeroing an element, in `[0, 1)`.
    pub p: f32,
    /// Seed of this module's masks (derive it from a global seed and the module
    /// path, see [`module_seed`]).
    pub seed: u64,
    /// Training switch and step, usually shared by all adapters of a model.
    pub control: DropoutControl,
}

impl LoraDropout {
    /// The mask for an input of `shape` at the current step: each element 0 with
    /// probability `p`, else `1 / (1 − p)`.
    fn mask(&self, shape: &[usize], dtype: DType, device: &candle_core::Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let key = splitmix64(self.seed ^ splitmix64(self.control.step()));
        let keep = 1.0 / (1.0 - self.p as f64);
        let p = self.p as f64;
        let data: Vec<f32> = (0..n as u64)
            .map(|i| {
                let u = unit(splitmix64(key.wrapping_add(i.wrapping_mul(GOLDEN))));
                if u < p { 0.0 } else { keep as f32 }
            })
            .collect();
        Tensor::from_vec(data, shape, device)?.to_dtype(dtype)
    }
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The splitmix64 finaliser of `z + golden`: a good 64-bit mix.
pub(crate) fn splitmix64(z: u64) -> u64 {
    let mut z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A 64-bit value to a uniform number in `[0, 1)`.
pub(crate) fn unit(z: u64) -> f64 {
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// FNV-1a of a string, to give each module its own seed.
pub(crate) fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The seed of module `path` of `component` under a global `seed`: initialisation
/// and dropout masks of a module do not depend on which other modules exist.
pub fn module_seed(seed: u64, component: super::LoraComponent, path: &str) -> u64 {
    splitmix64(seed ^ splitmix64(fnv1a(path) ^ component as u64))
}

/// One LoKr factor as trainable variables: whole, or a low-rank product `a·b`.
#[derive(Debug, Clone)]
pub enum KronVar {
    /// `lokr_w1` / `lokr_w2`.
    Full(Var),
    /// `lokr_w{1,2}_a` · `lokr_w{1,2}_b`.
    LowRank { a: Var, b: Var },
}

impl KronVar {
    fn view(&self) -> KronFactor {
        match self {
            KronVar::Full(v) => KronFactor::Full(v.as_tensor().clone()),
            KronVar::LowRank { a, b } => KronFactor::LowRank {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
            },
        }
    }

    fn of(factor: &KronFactor) -> Result<KronVar> {
        Ok(match factor {
            KronFactor::Full(t) => KronVar::Full(Var::from_tensor(t)?),
            KronFactor::LowRank { a, b } => KronVar::LowRank {
                a: Var::from_tensor(a)?,
                b: Var::from_tensor(b)?,
            },
        })
    }

    /// Number of tensors (1 whole, 2 as a product).
    fn len(&self) -> usize {
        match self {
            KronVar::Full(_) => 1,
            KronVar::LowRank { .. } => 2,
        }
    }

    fn named(&self, which: u8) -> Vec<(String, Var)> {
        match self {
            KronVar::Full(v) => vec![(format!("lokr_w{which}"), v.clone())],
            KronVar::LowRank { a, b } => vec![
                (format!("lokr_w{which}_a"), a.clone()),
                (format!("lokr_w{which}_b"), b.clone()),
            ],
        }
    }

    fn rank(&self) -> Option<usize> {
        match self {
            KronVar::Full(_) => None,
            KronVar::LowRank { b, .. } => Some(b.dims()[0]),
        }
    }
}

/// The trainable tensors of an adapter, by network type (see [`super::lycoris`]).
#[derive(Debug, Clone)]
pub enum AdapterParams {
    /// LoRA: `down`, `up`; DoRA when `dora` holds the magnitude and its axis.
    LowRank {
        down: Var,
        up: Var,
        dora: Option<(Var, DoraAxis)>,
    },
    /// LoHa: `(w1_a·w1_b) ⊙ (w2_a·w2_b)`.
    Hada {
        w1_a: Var,
        w1_b: Var,
        w2_a: Var,
        w2_b: Var,
    },
    /// LoKr: `w1 ⊗ w2`.
    Kron { w1: KronVar, w2: KronVar },
}

impl AdapterParams {
    /// The variables with the names the files give them (`down`/`up` for the
    /// low-rank halves, `dora_scale`, `hada_w1_a`, `lokr_w2_b`, …).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        match self {
            AdapterParams::LowRank { down, up, dora } => {
                let mut v = vec![
                    ("down".to_string(), down.clone()),
                    ("up".into(), up.clone()),
                ];
                if let Some((m, _)) = dora {
                    v.push(("dora_scale".into(), m.clone()));
                }
                v
            }
            AdapterParams::Hada {
                w1_a,
                w1_b,
                w2_a,
                w2_b,
            } => vec![
                ("hada_w1_a".into(), w1_a.clone()),
                ("hada_w1_b".into(), w1_b.clone()),
                ("hada_w2_a".into(), w2_a.clone()),
                ("hada_w2_b".into(), w2_b.clone()),
            ],
            AdapterParams::Kron { w1, w2 } => {
                let mut v = w1.named(1);
                v.extend(w2.named(2));
                v
            }
        }
    }

    /// The variables, in [`Self::named_vars`] order.
    pub fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }

    /// The network type these parameters make.
    pub fn network_type(&self) -> NetworkType {
        match self {
            AdapterParams::LowRank { dora: None, .. } => NetworkType::Lora,
            AdapterParams::LowRank { dora: Some(_), .. } => NetworkType::Dora,
            AdapterParams::Hada { .. } => NetworkType::Loha,
            AdapterParams::Kron { .. } => NetworkType::Lokr,
        }
    }

    /// The rank `alpha` is divided by (`None` for a LoKr with both factors full,
    /// whose scale is 1).
    pub fn rank(&self) -> Option<usize> {
        match self {
            AdapterParams::LowRank { down, .. } => down.dims().first().copied(),
            AdapterParams::Hada { w1_b, .. } => w1_b.dims().first().copied(),
            AdapterParams::Kron { w1, w2 } => w2.rank().or(w1.rank()),
        }
    }

    /// The dtype of the parameters.
    pub fn dtype(&self) -> DType {
        self.named_vars()
            .first()
            .map(|(_, v)| v.dtype())
            .unwrap_or(DType::F32)
    }

    /// Copies of the current values as f32 CPU module weights with `alpha`.
    pub fn snapshot(&self, alpha: f32) -> Result<ModuleWeights> {
        let snap = |t: &Tensor| -> Result<Tensor> {
            t.detach()
                .to_dtype(DType::F32)?
                .to_device(&candle_core::Device::Cpu)?
                .copy()
        };
        Ok(match self.view(alpha) {
            ModuleWeights::LowRank(m) => ModuleWeights::LowRank(LoraModule {
                down: snap(&m.down)?,
                up: snap(&m.up)?,
                alpha,
                dora_scale: m.dora_scale.as_ref().map(snap).transpose()?,
            }),
            ModuleWeights::Lycoris(l) => ModuleWeights::Lycoris(l.map(&snap)?),
        })
    }

    /// The current values as module weights with `alpha`, sharing the
    /// variables' storage (no copy).
    pub fn view(&self, alpha: f32) -> ModuleWeights {
        match self {
            AdapterParams::LowRank { down, up, dora } => ModuleWeights::LowRank(LoraModule {
                down: down.as_tensor().clone(),
                up: up.as_tensor().clone(),
                alpha,
                dora_scale: dora.as_ref().map(|(m, _)| m.as_tensor().clone()),
            }),
            AdapterParams::Hada {
                w1_a,
                w1_b,
                w2_a,
                w2_b,
            } => ModuleWeights::Lycoris(LycorisModule::Hada {
                w1_a: w1_a.as_tensor().clone(),
                w1_b: w1_b.as_tensor().clone(),
                w2_a: w2_a.as_tensor().clone(),
                w2_b: w2_b.as_tensor().clone(),
                alpha,
            }),
            AdapterParams::Kron { w1, w2 } => ModuleWeights::Lycoris(LycorisModule::Kron {
                w1: w1.view(),
                w2: w2.view(),
                alpha,
            }),
        }
    }

    /// Variables holding copies of a file module's tensors converted to `dtype`
    /// on `device`; a DoRA magnitude's axis is read from its shape against
    /// `weight_shape`.
    pub fn from_weights(
        module: &ModuleWeights,
        weight_shape: &[usize],
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<AdapterParams> {
        let var = |t: &Tensor| -> Result<Var> {
            Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)
        };
        Ok(match module {
            ModuleWeights::LowRank(m) => AdapterParams::LowRank {
                down: var(&m.down)?,
                up: var(&m.up)?,
                dora: match &m.dora_scale {
                    None => None,
                    Some(s) => {
                        let axis = check_magnitude(s.dims(), weight_shape)
                            .map_err(candle_core::Error::Msg)?;
                        Some((var(s)?, axis))
                    }
                },
            },
            ModuleWeights::Lycoris(l) => {
                let l = l.map(&|t| t.to_dtype(dtype)?.to_device(device))?;
                match &l {
                    LycorisModule::Hada {
                        w1_a,
                        w1_b,
                        w2_a,
                        w2_b,
                        ..
                    } => AdapterParams::Hada {
                        w1_a: Var::from_tensor(w1_a)?,
                        w1_b: Var::from_tensor(w1_b)?,
                        w2_a: Var::from_tensor(w2_a)?,
                        w2_b: Var::from_tensor(w2_b)?,
                    },
                    LycorisModule::Kron { w1, w2, .. } => AdapterParams::Kron {
                        w1: KronVar::of(w1)?,
                        w2: KronVar::of(w2)?,
                    },
                }
            }
        })
    }
}

/// A LoRA adapter on one frozen layer. Plain LoRA shapes: Linear: `down [rank, in]`,
/// `up [out, rank]`; Conv2d: `down [rank, in, kh, kw]`, `up [out, rank, 1, 1]`;
/// the other types as [`super::lycoris`] describes.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// The trainable tensors, f32 (f64 on an f64 base).
    pub params: AdapterParams,
    /// The update is scaled by `alpha / rank`.
    pub alpha: f32,
    /// Extra inference scale (1 for training).
    pub multiplier: f32,
    /// Dropout on the LoRA path's input; `None` for none.
    pub dropout: Option<LoraDropout>,
    /// While merged: the base weight as it was before merging (restored bit for
    /// bit by unmerging), and the forward skips the LoRA path.
    pub merged_from: Option<Tensor>,
}

impl LoraAdapter {
    /// A plain LoRA adapter with multiplier 1, no dropout, not merged; `down`
    /// and `up` must agree on the rank and have the same float dtype.
    pub fn new(down: Var, up: Var, alpha: f32) -> Result<Self> {
        let (dr, ur) = (down.dims().first().copied(), up.dims().get(1).copied());
        if dr.is_none() || dr != ur || dr == Some(0) {
            bail!(
                "LoRA down {:?} and up {:?} do not agree on a (non-zero) rank",
                down.dims(),
                up.dims()
            )
        }
        if down.dtype() != up.dtype() || !down.dtype().is_float() {
            bail!(
                "LoRA down ({:?}) and up ({:?}) must have the same float dtype",
                down.dtype(),
                up.dtype()
            )
        }
        Ok(Self::with_params(
            AdapterParams::LowRank {
                down,
                up,
                dora: None,
            },
            alpha,
        ))
    }

    /// An adapter of any type with multiplier 1, no dropout, not merged (shapes
    /// are checked against the layer by [`Self::check_shapes`]).
    pub fn with_params(params: AdapterParams, alpha: f32) -> Self {
        Self {
            params,
            alpha,
            multiplier: 1.0,
            dropout: None,
            merged_from: None,
        }
    }

    /// `down` and `up` of a plain LoRA adapter (`None` for DoRA, LoHa, LoKr):
    /// the adapters the fused low-rank paths handle.
    pub fn plain(&self) -> Option<(&Var, &Var)> {
        match &self.params {
            AdapterParams::LowRank {
                down,
                up,
                dora: None,
            } => Some((down, up)),
            _ => None,
        }
    }

    /// The rank (`None` for a LoKr with both factors full).
    pub fn rank(&self) -> Option<usize> {
        self.params.rank()
    }

    /// The factor of the update: `multiplier · alpha / rank` (`multiplier` for a
    /// LoKr with both factors full).
    pub fn scale(&self) -> f64 {
        self.multiplier as f64 * self.scale_at_one()
    }

    /// Whether the adapter is merged into the base weight.
    pub fn is_merged(&self) -> bool {
        self.merged_from.is_some()
    }

    /// Checks that the parameters fit a layer of `kind` with the given
    /// features; the error names the expected and actual shapes.
    pub fn check_shapes(
        &self,
        kind: LayerKind,
        in_features: usize,
        out_features: usize,
    ) -> Result<()> {
        self.params
            .view(self.alpha)
            .check_fits(kind, in_features, out_features)
            .map_err(candle_core::Error::Msg)
    }

    /// The active dropout, if any (set, non-zero and in training mode).
    /// Whether dropout applies to the LoRA path now.
    pub(crate) fn dropout_active(&self) -> bool {
        self.active_dropout().is_some()
    }

    fn active_dropout(&self) -> Option<&LoraDropout> {
        self.dropout
            .as_ref()
            .filter(|d| d.p > 0.0 && d.control.is_training())
    }

    /// The active dropout's mask for `x` as an `[m, in]` matrix in `dtype`.
    fn flat_mask(
        &self,
        x: &Tensor,
        dtype: DType,
        m: usize,
        in_features: usize,
    ) -> Result<Option<Tensor>> {
        match self.active_dropout() {
            Some(d) => Ok(Some(
                d.mask(x.dims(), dtype, x.device())?
                    .reshape((m, in_features))?,
            )),
            None => Ok(None),
        }
    }

    /// `x` in the LoRA dtype, with dropout applied when active. The mask is a
    /// constant, applied through a custom gradient so that no gradient buffer is
    /// stored for it.
    fn input(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(self.params.dtype())?;
        match self.active_dropout() {
            None => Ok(x),
            Some(d) => {
                let mask = d.mask(x.dims(), x.dtype(), x.device())?;
                let y = x.detach().mul(&mask)?;
                crate::ops::with_grad1("lora-dropout", &x, y, move |a| {
                    Ok([Some(a.grad.mul(&mask)?)])
                })
            }
        }
    }

    /// A Linear layer's output with this adapter: `base + scale·(dropout(x)·downᵀ)·upᵀ`
    /// for `x: (..., in)`, where `base = x·Wᵀ + b` was computed from `x` without a
    /// graph and `weight` is the frozen `W: [out, in]`.
    ///
    /// The result is one graph node on (`x`, `down`, `up`) with a hand-written
    /// backward, `dx = g·W + scale·((g·up)·down ⊙ mask)`, `ddown = scale·(g·up)ᵀ·x̃`,
    /// `dup = scale·gᵀ·(x̃·downᵀ)` (x̃ = dropout(x)): built from candle ops it would
    /// keep the base output, the up-projection, its scaled copy and the sum — four
    /// output-sized tensors per adapted layer — where this keeps one.
    pub fn apply_linear(&self, x: &Tensor, base: Tensor, weight: &Tensor) -> Result<Tensor> {
        let Some((down, up)) = self.plain() else {
            bail!("apply_linear takes a plain LoRA adapter")
        };
        let (down, up) = (param(down), param(up));
        let (_, in_features) = down.dims2()?;
        let (out_features, _) = up.dims2()?;
        if x.rank() == 0 || x.dim(candle_core::D::Minus1)? != in_features {
            bail!(
                "LoRA: input shape {:?} does not end in in_features {in_features}",
                x.dims()
            )
        }
        if base.dims().last() != Some(&out_features)
            || weight.dims2()? != (out_features, in_features)
        {
            bail!(
                "LoRA: base output {:?} / weight {:?} do not match the adapter [{out_features}, {in_features}]",
                base.dims(),
                weight.dims()
            )
        }
        let m = x.elem_count() / in_features;
        let ldt = down.dtype();
        let scale = self.scale();
        let mask = self.flat_mask(x, ldt, m, in_features)?;
        // x̃ in the LoRA dtype, as a [m, in] matrix.
        let lora_input =
            move |x: &Tensor, mask: &Option<Tensor>| flat_input(x, mask, ldt, (m, in_features));
        let (down_d, up_d) = (down.detach(), up.detach());
        let h = matmul(&lora_input(&x.detach(), &mask)?, &down_d.t()?)?;
        let delta = (matmul(&h, &up_d.t()?)? * scale)?;
        let delta = delta.reshape(base.shape())?.to_dtype(base.dtype())?;
        let y = (base + delta)?;
        let weight = weight.detach();
        crate::ops::with_grad3("linear-lora", [x, &down, &up], y, move |a| {
            let [x, down, up] = a.inputs;
            let [need_x, need_down, need_up] = a.needs_grad;
            let g = a.grad.reshape((m, out_features))?;
            let gl = g.to_dtype(ldt)?;
            // g·up·scale: the gradient of the rank-r bottleneck.
            let gh = (matmul(&gl, up)? * scale)?;
            let dx = if need_x {
                let dl = matmul(&gh, down)?;
                let dl = match &mask {
                    Some(mask) => dl.mul(mask)?,
                    None => dl,
                };
                // The frozen weight in the gradient's dtype (it may be stored in fp8).
                let dx = (matmul(&g, &weight.to_dtype(g.dtype())?)? + dl.to_dtype(g.dtype())?)?;
                Some(dx.reshape(x.shape())?)
            } else {
                None
            };
            let xl = if need_down || need_up {
                Some(lora_input(x, &mask)?)
            } else {
                None
            };
            let (ddown, dup) = match &xl {
                Some(xl) => (
                    if need_down {
                        Some(matmul(&gh.t()?, xl)?)
                    } else {
                        None
                    },
                    if need_up {
                        Some((matmul(&gl.t()?, &matmul(xl, &down.t()?)?)? * scale)?)
                    } else {
                        None
                    },
                ),
                None => (None, None),
            };
            Ok([dx, ddown, dup])
        })
    }

    /// The LoRA term of a Conv2d layer (stride `stride`, padding `padding`,
    /// frozen kernel `weight`) for `x: [b, in, h, w]` (base dtype), in the base
    /// dtype.
    pub fn conv_delta(
        &self,
        x: &Tensor,
        weight: &Tensor,
        stride: usize,
        padding: usize,
    ) -> Result<Tensor> {
        let Some((down, up)) = self.plain() else {
            // DoRA, LoHa, LoKr: a conv with the whole update as its kernel.
            return self.conv_update(x, weight, stride, padding, None);
        };
        let (r, _, _, _) = down.dims4()?;
        let (out, _, _, _) = up.dims4()?;
        let h = conv2d_down(&self.input(x)?, &param(down), stride, padding)?;
        let (b, _, oh, ow) = h.dims4()?;
        // The 1×1 `up` conv as a matmul over pixels: [out, r] · [b, r, oh·ow].
        let up = param(up).reshape((out, r))?;
        let y = up.broadcast_matmul(&h.reshape((b, r, oh * ow))?)?;
        (y * self.scale())?
            .reshape((b, out, oh, ow))?
            .to_dtype(x.dtype())
    }

    /// A Linear layer's output for a DoRA, LoHa or LoKr adapter: `base` (the
    /// frozen layer's output for `x`, computed without a graph) plus
    /// `x̃·ΔWᵀ`, with the update `ΔW` ([`Self::update`]) built from the
    /// parameters.
    ///
    /// One graph node on (`x`, the packed parameters): the forward builds `ΔW`
    /// without a graph and drops it; the backward rebuilds it, gives
    /// `dx = g·W + (g·ΔW) ⊙ mask` and `dΔW = gᵀ·x̃`, and differentiates the
    /// rebuild for the parameters ([`Self::local_update`]). Built from candle
    /// ops, every adapted layer would keep `ΔW` and the intermediates of its
    /// rebuild (DoRA: four weight-sized tensors) until the backward — 8 GB more
    /// than LoRA for SD1.5's default layers; this keeps the parameters only.
    pub fn apply_linear_update(&self, x: &Tensor, frozen: &FrozenLinear) -> Result<Tensor> {
        let weight = &frozen.weight;
        let (packed, shapes) = self.packed_params()?;
        let ldt = self.params.dtype();
        // With the weight in the LoRA dtype and no dropout, `W + ΔW` is one
        // product in the forward and one in the backward (instead of two each).
        let fold = weight.dtype() == ldt && self.active_dropout().is_none();
        let (out_features, in_features) = weight.dims2()?;
        if x.rank() == 0 || x.dim(candle_core::D::Minus1)? != in_features {
            bail!(
                "LoRA: input shape {:?} does not end in in_features {in_features}",
                x.dims()
            )
        }
        let m = x.elem_count() / in_features;
        let mask = self.flat_mask(x, ldt, m, in_features)?;
        // x̃ in the LoRA dtype, as a [m, in] matrix.
        let lora_input =
            move |x: &Tensor, mask: &Option<Tensor>| flat_input(x, mask, ldt, (m, in_features));
        let weight = weight.detach();
        let update = self.update_from(&Self::unpack(&packed.detach(), &shapes)?, &weight)?;
        let y = if fold {
            let merged = (&weight + &update)?;
            drop(update);
            FrozenLinear {
                weight: merged,
                bias: frozen.bias.as_ref().map(Tensor::detach),
            }
            .forward(&x.detach())?
        } else {
            let base = frozen.forward(&x.detach())?;
            let delta = matmul(&lora_input(&x.detach(), &mask)?, &update.t()?.contiguous()?)?;
            drop(update);
            (&base + delta.reshape(base.shape())?.to_dtype(base.dtype())?)?
        };
        let this = self.clone();
        crate::ops::with_grad2("linear-lora-update", [x, &packed], y, move |a| {
            let [x, packed] = a.inputs;
            let [need_x, need_p] = a.needs_grad;
            let g = a.grad.reshape((m, out_features))?;
            let gl = g.to_dtype(ldt)?;
            let d_update = if need_p {
                Some(matmul(&gl.t()?.contiguous()?, &lora_input(x, &mask)?)?)
            } else {
                None
            };
            let (update, dp) = this.update_and_grad(packed, &shapes, &weight, d_update.as_ref())?;
            drop(d_update);
            let dx = if !need_x {
                None
            } else if fold {
                let merged = (&weight + &update)?;
                Some(matmul(&g, &merged)?.reshape(x.shape())?)
            } else {
                let dl = matmul(&gl, &update.contiguous()?)?;
                let dl = match &mask {
                    Some(mask) => dl.mul(mask)?,
                    None => dl,
                };
                let dx = (matmul(&g, &weight.to_dtype(g.dtype())?)? + dl.to_dtype(g.dtype())?)?;
                Some(dx.reshape(x.shape())?)
            };
            Ok([dx, dp])
        })
    }

    /// A Conv2d layer's output for a DoRA, LoHa or LoKr adapter: one node for
    /// the whole layer when the kernel is in the LoRA dtype and there is no
    /// dropout, else the frozen conv plus [`Self::conv_update`]'s term.
    pub fn apply_conv_update(&self, x: &Tensor, frozen: &FrozenConv2d) -> Result<Tensor> {
        let (stride, padding) = (frozen.stride, frozen.padding);
        if frozen.weight.dtype() == self.params.dtype() && self.active_dropout().is_none() {
            return self.conv_update(
                x,
                &frozen.weight,
                stride,
                padding,
                Some(frozen.bias.as_ref()),
            );
        }
        frozen.forward(x)? + self.conv_update(x, &frozen.weight, stride, padding, None)?
    }

    /// The LoRA term of a Conv2d layer for a DoRA, LoHa or LoKr adapter:
    /// `conv(x̃, ΔW)`, one graph node on (`x̃`, the packed parameters) that, as
    /// [`Self::apply_linear_update`], keeps no weight-sized tensor between the
    /// forward and the backward.
    /// With `bias` (`Some`: the frozen layer's bias, or `Some(None)` for a
    /// layer without one) the node computes the whole layer, `conv(x, W + ΔW)
    /// + b`: one convolution each way instead of two.
    fn conv_update(
        &self,
        x: &Tensor,
        weight: &Tensor,
        stride: usize,
        padding: usize,
        bias: Option<Option<&Tensor>>,
    ) -> Result<Tensor> {
        let (packed, shapes) = self.packed_params()?;
        let xl = self.input(x)?;
        let (_, _, h, w) = xl.dims4()?;
        let (out, _, kh, kw) = weight.dims4()?;
        let weight = weight.detach();
        let fold = bias.is_some();
        let kernel =
            |update: Tensor| -> Result<Tensor> { if fold { &weight + update } else { Ok(update) } };
        let update = self.update_from(&Self::unpack(&packed.detach(), &shapes)?, &weight)?;
        let mut y =
            crate::ops::conv::conv2d_plain(&xl.detach(), &kernel(update)?, padding, stride)?;
        if let Some(Some(b)) = bias {
            y = y.broadcast_add(&b.detach().to_dtype(y.dtype())?.reshape((1, out, 1, 1))?)?;
        }
        let this = self.clone();
        let y = crate::ops::with_grad2("conv-lora-update", [&xl, &packed], y, move |a| {
            let [xl, packed] = a.inputs;
            let [need_x, need_p] = a.needs_grad;
            let d_update = if need_p {
                Some(update_kernel_grad(xl, a.grad, (kh, kw), stride, padding)?)
            } else {
                None
            };
            let (update, dp) = this.update_and_grad(packed, &shapes, &weight, d_update.as_ref())?;
            drop(d_update);
            let dx = if need_x {
                let k = if fold { (&weight + &update)? } else { update };
                Some(input_grad(a.grad, &k, (h, w), (kh, kw), stride, padding)?)
            } else {
                None
            };
            Ok([dx, dp])
        })?;
        y.to_dtype(x.dtype())
    }

    /// The adapter's whole update of the frozen weight `weight`, shaped like
    /// it, in the LoRA dtype, multiplier included: `W' − W` (for DoRA it
    /// depends on `W`). Built from the parameters (through
    /// [`crate::ops::checkpoint::param`]), so it has their gradients.
    pub fn update(&self, weight: &Tensor) -> Result<Tensor> {
        let tensors: Vec<Tensor> = self.params.vars().iter().map(param).collect();
        self.update_from(&tensors, weight)
    }

    /// [`Self::update`] from the parameter values `t`, in [`AdapterParams::vars`]
    /// order (the variables themselves, detached copies, or a local graph's).
    fn update_from(&self, t: &[Tensor], weight: &Tensor) -> Result<Tensor> {
        let dtype = self.params.dtype();
        let shape = weight.dims();
        let mult = self.multiplier as f64;
        let ratio = self.scale_at_one();
        let scaled = |t: Tensor| if mult == 1.0 { Ok(t) } else { t * mult };
        match (&self.params, t) {
            (AdapterParams::LowRank { dora, .. }, [down, up, rest @ ..]) => {
                let r = down.dim(0)?;
                let flat = down.reshape((r, down.elem_count() / r))?;
                let delta =
                    (up.reshape((up.dim(0)?, r))?.matmul(&flat)? * ratio)?.reshape(shape)?;
                match (dora, rest) {
                    (None, []) => scaled(delta),
                    (Some((_, axis)), [m]) => {
                        let w = weight.detach().to_dtype(dtype)?;
                        dora_delta(&w, &delta, m, *axis, mult)
                    }
                    _ => bail!("LoRA update: {} tensors for a DoRA/LoRA module", t.len()),
                }
            }
            (AdapterParams::Hada { .. }, [w1_a, w1_b, w2_a, w2_b]) => {
                scaled(hada_delta([w1_a, w1_b, w2_a, w2_b], ratio, shape)?)
            }
            (AdapterParams::Kron { w1, w2 }, t) => {
                let (n1, n2) = (w1.len(), w2.len());
                if t.len() != n1 + n2 {
                    bail!("LoKr update: {} tensors, expected {}", t.len(), n1 + n2)
                }
                let (f1, f2) = (kron_factor(&t[..n1])?, kron_factor(&t[n1..])?);
                scaled(kron_delta(&f1, &f2, ratio, shape)?)
            }
            _ => bail!("LoRA update: {} tensors do not fit the adapter", t.len()),
        }
    }

    /// The parameters packed into one flat tensor (through
    /// [`crate::ops::checkpoint::param`]; `cat` gives each its gradient back), with
    /// the shapes to unpack it.
    fn packed_params(&self) -> Result<(Tensor, Vec<Vec<usize>>)> {
        let vars = self.params.vars();
        let shapes: Vec<Vec<usize>> = vars.iter().map(|v| v.dims().to_vec()).collect();
        let flat: Vec<Tensor> = vars
            .iter()
            .map(|v| param(v).flatten_all())
            .collect::<Result<_>>()?;
        Ok((Tensor::cat(&flat, 0)?, shapes))
    }

    /// `packed` split back into tensors of `shapes`.
    fn unpack(packed: &Tensor, shapes: &[Vec<usize>]) -> Result<Vec<Tensor>> {
        let mut at = 0;
        shapes
            .iter()
            .map(|s| {
                let n: usize = s.iter().product();
                let t = packed.narrow(0, at, n)?.reshape(s.as_slice())?;
                at += n;
                Ok(t)
            })
            .collect()
    }

    /// The gradient of the packed parameters `packed` given the gradient
    /// `d_update` of the update they make on `weight`, written out per type
    /// (checked against LyCORIS' autograd by `tests/lycoris.rs`): a few
    /// weight-sized passes and skinny products, where candle's autograd of
    /// [`Self::update_from`] would take several times as long for its
    /// broadcasts. Also returns the update itself ([`Self::update_from`]'s
    /// value), which the input gradient needs.
    fn update_and_grad(
        &self,
        packed: &Tensor,
        shapes: &[Vec<usize>],
        weight: &Tensor,
        d_update: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let t = Self::unpack(packed, shapes)?;
        let Some(g) = d_update else {
            return Ok((self.update_from(&t, weight)?, None));
        };
        let shape = weight.dims();
        let out = shape[0];
        let k_all = weight.elem_count() / out;
        let mult = self.multiplier as f64;
        let ratio = self.scale_at_one();
        let g = g.to_dtype(packed.dtype())?.reshape((out, k_all))?;
        // Each type forms its update from the intermediates its gradient
        // needs, so nothing is computed twice.
        let (update, grads): (Tensor, Vec<Tensor>) = match (&self.params, t.as_slice()) {
            (AdapterParams::LowRank { dora, .. }, [down, up, rest @ ..]) => {
                let r = down.dim(0)?;
                let flat_down = down.reshape((r, down.elem_count() / r))?;
                let up2 = up.reshape((out, r))?;
                let delta = (matmul(&up2, &flat_down)? * ratio)?;
                let (update, d_delta, dm) = match (dora, rest) {
                    (None, []) => ((delta * mult)?, (g * mult)?, None),
                    (Some((_, axis)), [m]) => {
                        let (update, d_delta, dm) =
                            dora_update_and_grad(weight, &delta, m, *axis, mult, &g)?;
                        (update, d_delta, Some(dm))
                    }
                    _ => bail!("LoRA gradient: {} tensors for a LoRA/DoRA module", t.len()),
                };
                let (dd, du) = low_rank_grads(&d_delta, &up2, &flat_down, ratio)?;
                (update, [dd, du].into_iter().chain(dm).collect())
            }
            (AdapterParams::Hada { .. }, [w1_a, w1_b, w2_a, w2_b]) => {
                let g = (g * (mult * ratio))?;
                let p1 = matmul(w1_a, w1_b)?;
                let p2 = matmul(w2_a, w2_b)?;
                let dp1 = g.mul(&p2)?;
                let dp2 = g.mul(&p1)?;
                let update = (p1.mul(&p2)? * (mult * ratio))?;
                let grads = vec![
                    matmul(&dp1, &w1_b.t()?.contiguous()?)?,
                    matmul(&w1_a.t()?.contiguous()?, &dp1)?,
                    matmul(&dp2, &w2_b.t()?.contiguous()?)?,
                    matmul(&w2_a.t()?.contiguous()?, &dp2)?,
                ];
                (update, grads)
            }
            (AdapterParams::Kron { w1, .. }, t) => {
                let n1 = w1.len();
                let f1 = kron_factor(&t[..n1])?;
                let f2 = kron_factor(&t[n1..])?;
                let (a, c) = f1.dims2()?;
                let bb = f2.dim(0)?;
                let dd = f2.elem_count() / bb;
                // G as [a, b, c, d] → [a·c, b·d]: dF1 = G·vec(F2), dF2 = vec(F1)ᵀ·G.
                let gp = (g * (mult * ratio))?
                    .reshape((a, bb, c, dd))?
                    .permute((0, 2, 1, 3))?
                    .contiguous()?
                    .reshape((a * c, bb * dd))?;
                let df1 = matmul(&gp, &f2.reshape((bb * dd, 1))?)?.reshape((a, c))?;
                let df2 = matmul(&f1.reshape((1, a * c))?, &gp)?.reshape((bb, dd))?;
                let mut grads = factor_grads(&t[..n1], &df1)?;
                grads.extend(factor_grads(&t[n1..], &df2)?);
                (kron_delta(&f1, &f2, mult * ratio, shape)?, grads)
            }
            _ => bail!("LoRA gradient: {} tensors do not fit the adapter", t.len()),
        };
        Ok((update.reshape(shape)?, Some(pack(&grads)?)))
    }

    /// `alpha / rank` (1 for a LoKr with both factors full).
    fn scale_at_one(&self) -> f64 {
        match self.rank() {
            Some(r) if r > 0 => self.alpha as f64 / r as f64,
            _ => 1.0,
        }
    }

    /// What merging adds to the weight `weight`: [`Self::update`] without a
    /// graph, in the LoRA dtype.
    pub fn delta_weight(&self, weight: &Tensor) -> Result<Tensor> {
        Ok(self.update(weight)?.detach())
    }
}

/// `conv2d(x, down)` with a backward that computes the input gradient with the
/// frozen conv's method and the kernel gradient directly (see the module docs).
fn conv2d_down(x: &Tensor, down: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (_, _, kh, kw) = down.dims4()?;
    let y = crate::ops::conv::conv2d_plain(&x.detach(), &down.detach(), padding, stride)?;
    with_grad2("lora-conv-down", [x, down], y, move |a| {
        let [x, down] = a.inputs;
        let dx = if a.needs_grad[0] {
            Some(input_grad(a.grad, down, (h, w), (kh, kw), stride, padding)?)
        } else {
            None
        };
        let dk = if a.needs_grad[1] {
            Some(kernel_grad(x, a.grad, (kh, kw), stride, padding)?)
        } else {
            None
        };
        Ok([dx, dk])
    })
}

/// `x̃ = x ⊙ mask` in `dtype`, as an `[m, in]` matrix (the fused Linear
/// nodes' LoRA input, rebuilt in their backward).
fn flat_input(
    x: &Tensor,
    mask: &Option<Tensor>,
    dtype: DType,
    shape: (usize, usize),
) -> Result<Tensor> {
    let x = x.to_dtype(dtype)?.reshape(shape)?;
    match mask {
        Some(mask) => x.mul(mask),
        None => Ok(x),
    }
}

/// Flattens and concatenates gradients in the packed parameters' order.
fn pack(grads: &[Tensor]) -> Result<Tensor> {
    let flat: Vec<Tensor> = grads
        .iter()
        .map(|g| g.flatten_all())
        .collect::<Result<_>>()?;
    Tensor::cat(&flat, 0)
}

/// The gradients of `down` and `up` (`[r, K]`, `[out, r]`) given that of
/// `Δ = ratio·up·down` (`[out, K]`).
fn low_rank_grads(
    d_delta: &Tensor,
    up2: &Tensor,
    flat_down: &Tensor,
    ratio: f64,
) -> Result<(Tensor, Tensor)> {
    let d_down = (matmul(&up2.t()?.contiguous()?, d_delta)? * ratio)?;
    let d_up = (matmul(d_delta, &flat_down.t()?.contiguous()?)? * ratio)?;
    Ok((d_down, d_up))
}

/// A LoKr factor from its tensors: whole, or the product `a·b`.
fn kron_factor(tensors: &[Tensor]) -> Result<Tensor> {
    match tensors {
        [full] => Ok(full.clone()),
        [a, b] => a.matmul(b),
        _ => bail!("LoKr factor of {} tensors", tensors.len()),
    }
}

/// The gradients of a LoKr factor's tensors (whole, or `a·b`) given that of
/// the factor (`d`, 2-D).
fn factor_grads(tensors: &[Tensor], d: &Tensor) -> Result<Vec<Tensor>> {
    match tensors {
        [_] => Ok(vec![d.clone()]),
        [a, b] => Ok(vec![
            matmul(d, &b.t()?.contiguous()?)?,
            matmul(&a.t()?.contiguous()?, d)?,
        ]),
        _ => bail!("LoKr factor of {} tensors", tensors.len()),
    }
}

/// DoRA's update `U = μ·(m ⊙ M/n − W)` (`M = W + Δ`, `n = ‖M‖ + ε` along
/// `axis`; `delta` is `Δ` as `[out, K]`) and, given `g`, the gradient of `U`,
/// the gradients of `Δ` (`[out, K]`) and of the magnitude: with
/// `c = Σ μg⊙M` along the axis, `dm = c/n` and
/// `dΔ = μg ⊙ m/n − (c·m/n²) ⊙ M/‖M‖`.
fn dora_update_and_grad(
    weight: &Tensor,
    delta: &Tensor,
    m: &Tensor,
    axis: DoraAxis,
    mult: f64,
    g: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dims = weight.dims();
    let (out, inp) = (dims[0], dims[1]);
    let k = weight.elem_count() / (out * inp);
    let w = weight
        .detach()
        .to_dtype(g.dtype())?
        .reshape((out, inp, k))?;
    let merged = (&w + delta.reshape((out, inp, k))?)?;
    let axes: &[usize] = match axis {
        DoraAxis::Output => &[1, 2],
        DoraAxis::Input => &[0, 2],
    };
    let m3 = match axis {
        DoraAxis::Output => m.reshape((out, 1, 1))?,
        DoraAxis::Input => m.reshape((1, inp, 1))?,
    };
    let norm = merged.sqr()?.sum_keepdim(axes)?.sqrt()?;
    let n = (&norm + f32::EPSILON as f64)?;
    let s = m3.div(&n)?;
    let update = ((merged.broadcast_mul(&s)? - w)? * mult)?;
    let g = (g.reshape((out, inp, k))? * mult)?;
    let c = g.mul(&merged)?.sum_keepdim(axes)?;
    let dm = c.div(&n)?;
    // d‖M‖ = −c·m/n², spread over M/‖M‖.
    let dnorm = c.mul(&m3)?.div(&n.sqr()?)?.neg()?;
    let coef = dnorm.div(&norm.maximum(f32::MIN_POSITIVE as f64)?)?;
    let d_merged = (g.broadcast_mul(&s)? + merged.broadcast_mul(&coef)?)?;
    Ok((
        update.reshape((out, inp * k))?,
        d_merged.reshape((out, inp * k))?,
        dm.reshape(m.dims())?,
    ))
}

/// The kernel gradient of a whole-update conv (`[out, in, kh, kw]`): for the
/// 1×1 convs the default presets adapt (SD1's `proj_in`/`proj_out`), one
/// matrix product `Σ_b g_b·x_bᵀ` over the pixels — many times faster than the
/// general conv of [`kernel_grad`] at these channel counts.
fn update_kernel_grad(
    x: &Tensor,
    g: &Tensor,
    (kh, kw): (usize, usize),
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    if (kh, kw, stride, padding) != (1, 1, 1, 0) {
        return kernel_grad(x, g, (kh, kw), stride, padding);
    }
    let (b, cin, h, w) = x.dims4()?;
    let cout = g.dim(1)?;
    // [in, b·hw] and [out, b·hw]: the batch joins the pixels.
    let xs = x
        .reshape((b, cin, h * w))?
        .transpose(0, 1)?
        .reshape((cin, b * h * w))?;
    let gs = g
        .to_dtype(x.dtype())?
        .reshape((b, cout, h * w))?
        .transpose(0, 1)?
        .reshape((cout, b * h * w))?;
    matmul(&gs.contiguous()?, &xs.t()?.contiguous()?)?.reshape((cout, cin, 1, 1))
}

/// The gradient of `conv2d(x, k, padding, stride)` with respect to the kernel
/// `k: [r, in, kh, kw]` given the output gradient `g: [b, r, oh, ow]`:
/// `dk[r, i, a, c] = Σ g[n, r, p, q] · x_pad[n, i, p·s + a, q·s + c]`, which is a
/// conv of `x` (batch and channels swapped) with `g` as the kernel, dilated by `s`.
fn kernel_grad(
    x: &Tensor,
    g: &Tensor,
    (kh, kw): (usize, usize),
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let xt = x.transpose(0, 1)?.contiguous()?;
    let gt = g.transpose(0, 1)?.contiguous()?;
    let dk = xt.conv2d(&gt, padding, 1, stride, 1)?;
    dk.narrow(2, 0, kh)?
        .narrow(3, 0, kw)?
        .transpose(0, 1)?
        .contiguous()
}
