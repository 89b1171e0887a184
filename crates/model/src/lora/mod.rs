//! # LoRA: low-rank adapters on the frozen layers
//!
//! A LoRA module adapts one frozen Linear or Conv2d layer:
//! `y = W x + multiplier · (alpha / rank) · up(down(dropout(x)))`, with `down`
//! kaiming-uniform and `up` zero at initialisation, so training starts exactly
//! at the base model. LoRA tensors are always f32, whatever the base dtype
//! (only an f64 base, used by finite-difference tests, gets f64 ones).
//!
//! This module holds the types shared by the layers, the target selection and
//! the file formats: [`LoraComponent`], [`LayerKind`], [`TargetInfo`],
//! [`LoraModule`] and [`LoraWeights`].
//!
//! - [`adapted`]: [`adapted::LoraLinear`] / [`adapted::LoraConv2d`], the frozen
//!   layers of [`crate::ops`] with a LoRA slot, as the models hold them;
//! - [`layer`]: the [`layer::LoraAdapter`] held in that slot, its forward
//!   (f32 whatever the base dtype), dropout and merge arithmetic;
//! - [`visit`]: walking every Linear/Conv2d of the UNet and the text encoder with
//!   its module path (the checkpoint key minus `.weight`);
//! - [`targets`]: which layers get a LoRA (presets, patterns, rank/alpha per group);
//! - [`attach`]: creating trainable adapters, attaching loaded weights,
//!   extracting, removing, merging and unmerging.

use std::collections::BTreeMap;

pub mod adapted;
pub mod attach;
pub mod blocks;
pub mod encoders;
pub mod extract;
pub mod layer;
pub(crate) mod linear_cpu;
pub mod lycoris;
pub mod merge;
pub mod resize;
pub mod svd;
pub mod targets;
pub mod visit;

/// Which model part a LoRA module adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraComponent {
    /// The UNet2DConditionModel.
    Unet,
    /// The (first) text encoder: SD1/SD2's only one, SDXL's CLIP-L.
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP-bigG; `text_encoder_2` in diffusers).
    #[serde(rename = "text_encoder_2")]
    TextEncoder2,
}

impl LoraComponent {
    /// The checkpoint component holding this part's layers.
    pub fn model_component(self) -> crate::load::Component {
        use crate::load::Component;
        match self {
            LoraComponent::Unet => Component::Unet,
            LoraComponent::TextEncoder => Component::TextEncoder,
            LoraComponent::TextEncoder2 => Component::TextEncoder2,
        }
    }

    /// The LoRA part of a checkpoint component (`None` for the VAE, which
    /// LoRAs never adapt).
    pub fn of_model(c: crate::load::Component) -> Option<Self> {
        use crate::load::Component;
        match c {
            Component::Unet => Some(LoraComponent::Unet),
            Component::TextEncoder => Some(LoraComponent::TextEncoder),
            Component::TextEncoder2 => Some(LoraComponent::TextEncoder2),
            Component::Vae => None,
        }
    }
}

/// The shape of the layer a LoRA module adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum LayerKind {
    /// A Linear layer (`[out, in]` weight).
    Linear,
    /// A 2-D convolution (`[out, in, kh, kw]` weight).
    Conv2d {
        /// Kernel size `[kh, kw]`.
        kernel: [usize; 2],
        /// Stride (same in both directions).
        stride: usize,
        /// Zero padding (same on all sides).
        padding: usize,
    },
}

/// One adaptable layer of a model: where it is and its shape.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TargetInfo {
    /// The model part holding the layer.
    pub component: LoraComponent,
    /// diffusers/transformers module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`
    /// (UNet) or `text_model.encoder.layers.0.self_attn.q_proj` (text encoder) — exactly the weight key minus `.weight`.
    pub path: String,
    /// Linear or Conv2d, with the conv geometry.
    pub kind: LayerKind,
    /// Input features (input channels for a conv).
    pub in_features: usize,
    /// Output features (output channels for a conv).
    pub out_features: usize,
}

/// The weights of one LoRA module. Shapes: Linear: down [rank, in], up [out, rank];
/// Conv2d: down [rank, in, kh, kw], up [out, rank, 1, 1]. Stored as f32.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// The down projection (`lora_down` / PEFT `lora_A`).
    pub down: candle_core::Tensor,
    /// The up projection (`lora_up` / PEFT `lora_B`).
    pub up: candle_core::Tensor,
    /// The alpha of the module: the LoRA path is scaled by `alpha / rank`.
    pub alpha: f32,
    /// DoRA's magnitude (`dora_scale`): `[out, 1(, 1, 1)]` along the output
    /// axis, `[1, in(, 1, 1)]` along the input axis; `None` for plain LoRA.
    pub dora_scale: Option<candle_core::Tensor>,
}

impl LoraModule {
    /// The rank: `down.dims()[0]` (0 for a malformed, dimensionless `down`).
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }

    /// The scale applied to the LoRA path: `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank() as f32
    }

    /// A plain LoRA module.
    pub fn new(down: candle_core::Tensor, up: candle_core::Tensor, alpha: f32) -> Self {
        LoraModule {
            down,
            up,
            alpha,
            dora_scale: None,
        }
    }

    /// `scale · up·down` flattened to `[out, in·kh·kw]`, in f32.
    pub fn scaled_product(&self, scale: f64) -> candle_core::Result<candle_core::Tensor> {
        let r = self.rank();
        let up = self.up.to_dtype(candle_core::DType::F32)?;
        let out = up.dims().first().copied().unwrap_or(0);
        let down = self
            .down
            .to_dtype(candle_core::DType::F32)?
            .flatten_from(1)?;
        up.reshape((out, r))?.matmul(&down)?.affine(scale, 0.0)
    }

    /// `alpha/rank · up·down` shaped like a weight with `down`'s trailing dims.
    pub fn low_rank_delta(&self) -> candle_core::Result<candle_core::Tensor> {
        let mut shape = vec![self.up.dims().first().copied().unwrap_or(0)];
        shape.extend_from_slice(&self.down.dims()[1..]);
        self.scaled_product(f64::from(self.scale()))?.reshape(shape)
    }

    /// The axis of the DoRA magnitude, read from its shape (`None` for plain
    /// LoRA or a magnitude that fits neither axis).
    pub fn dora_axis(&self) -> Option<lycoris::DoraAxis> {
        let s = self.dora_scale.as_ref()?;
        let out = *self.up.dims().first()?;
        let in_ = *self.down.dims().get(1)?;
        lycoris::DoraAxis::of_shape(s.dims(), out, in_)
    }

    /// What the module adds to the weight `weight` (f32, the layer's shape)
    /// at multiplier 1: `scale·up·down`, or for DoRA `DoRA(W) − W`.
    pub fn delta(&self, weight: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        let delta = self.low_rank_delta()?;
        match &self.dora_scale {
            None => Ok(delta),
            Some(m) => {
                let axis = lycoris::DoraAxis::of_shape(m.dims(), weight.dim(0)?, weight.dim(1)?)
                    .ok_or_else(|| {
                        candle_core::Error::Msg(format!(
                            "dora_scale {:?} does not fit the weight {:?}",
                            m.dims(),
                            weight.dims()
                        ))
                    })?;
                lycoris::dora_delta(weight, &delta, m, axis, 1.0)
            }
        }
    }
}

/// One module of either kind, as stored in a file (cheap to clone: tensors
/// share their storage).
#[derive(Debug, Clone)]
pub enum ModuleWeights {
    /// LoRA or DoRA.
    LowRank(LoraModule),
    /// LoHa or LoKr.
    Lycoris(lycoris::LycorisModule),
}

impl ModuleWeights {
    /// The module's alpha.
    pub fn alpha(&self) -> f32 {
        match self {
            ModuleWeights::LowRank(m) => m.alpha,
            ModuleWeights::Lycoris(m) => m.alpha(),
        }
    }

    /// Its network type.
    pub fn network_type(&self) -> lycoris::NetworkType {
        match self {
            ModuleWeights::LowRank(m) if m.dora_scale.is_some() => lycoris::NetworkType::Dora,
            ModuleWeights::LowRank(_) => lycoris::NetworkType::Lora,
            ModuleWeights::Lycoris(m) => m.network_type(),
        }
    }

    /// What it adds to the weight `weight` (f32, the layer's shape) at
    /// multiplier 1.
    pub fn delta(&self, weight: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            ModuleWeights::LowRank(m) => m.delta(weight),
            ModuleWeights::Lycoris(m) => m.delta(weight.dims()),
        }
    }

    /// Whether the module fits a layer of `kind` with `in_features` inputs and
    /// `out_features` outputs; the error names the shapes it has and needs.
    pub fn check_fits(
        &self,
        kind: LayerKind,
        in_features: usize,
        out_features: usize,
    ) -> Result<(), String> {
        let (weight_shape, k) = match kind {
            LayerKind::Linear => (vec![out_features, in_features], 1),
            LayerKind::Conv2d { kernel, .. } => (
                vec![out_features, in_features, kernel[0], kernel[1]],
                kernel[0] * kernel[1],
            ),
        };
        match self {
            ModuleWeights::LowRank(m) => {
                let rank = m.rank();
                let (want_down, want_up): (Vec<usize>, Vec<usize>) = match kind {
                    LayerKind::Linear => (vec![rank, in_features], vec![out_features, rank]),
                    LayerKind::Conv2d { kernel, .. } => (
                        vec![rank, in_features, kernel[0], kernel[1]],
                        vec![out_features, rank, 1, 1],
                    ),
                };
                let mut problems = Vec::new();
                if rank == 0 || m.down.dims() != want_down.as_slice() {
                    problems.push(format!(
                        "down is {:?}, the layer needs {want_down:?}",
                        m.down.dims()
                    ));
                }
                if m.up.dims() != want_up.as_slice() {
                    problems.push(format!(
                        "up is {:?}, the layer needs {want_up:?}",
                        m.up.dims()
                    ));
                }
                if let Some(s) = &m.dora_scale
                    && let Err(e) = lycoris::check_magnitude(s.dims(), &weight_shape)
                {
                    problems.push(e);
                }
                if problems.is_empty() {
                    Ok(())
                } else {
                    Err(problems.join(", "))
                }
            }
            ModuleWeights::Lycoris(m) => {
                let dims = m.update_dims()?;
                lycoris::check_update_dims(dims, out_features, in_features, k)
            }
        }
    }
}

/// A whole LoRA: modules keyed by (component, diffusers module path).
#[derive(Debug, Clone, Default)]
pub struct LoraWeights {
    /// The low-rank modules (LoRA, DoRA), ordered by component then path.
    pub modules: BTreeMap<(LoraComponent, String), LoraModule>,
    /// The LyCORIS product modules (LoHa, LoKr). A file holds one kind or the
    /// other; kept apart because resizing, SVD merging and PEFT only apply to
    /// low-rank modules.
    pub lycoris: BTreeMap<(LoraComponent, String), lycoris::LycorisModule>,
}

impl LoraWeights {
    /// Number of modules of either kind.
    pub fn len(&self) -> usize {
        self.modules.len() + self.lycoris.len()
    }

    /// Whether there are no modules.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The network type: LoHa/LoKr from the LyCORIS modules, DoRA when a
    /// module has a magnitude, else LoRA.
    pub fn network_type(&self) -> lycoris::NetworkType {
        if let Some(m) = self.lycoris.values().next() {
            m.network_type()
        } else if self.modules.values().any(|m| m.dora_scale.is_some()) {
            lycoris::NetworkType::Dora
        } else {
            lycoris::NetworkType::Lora
        }
    }

    /// Every module key, of either kind, in order.
    pub fn keys(&self) -> impl Iterator<Item = &(LoraComponent, String)> {
        let mut keys: Vec<_> = self.modules.keys().chain(self.lycoris.keys()).collect();
        keys.sort();
        keys.into_iter()
    }

    /// Every module of either kind, in key order (clones share storage).
    pub fn all(&self) -> Vec<(&(LoraComponent, String), ModuleWeights)> {
        let mut v: Vec<_> = self
            .modules
            .iter()
            .map(|(k, m)| (k, ModuleWeights::LowRank(m.clone())))
            .chain(
                self.lycoris
                    .iter()
                    .map(|(k, m)| (k, ModuleWeights::Lycoris(m.clone()))),
            )
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }

    /// The module at `key`, of either kind.
    pub fn get(&self, key: &(LoraComponent, String)) -> Option<ModuleWeights> {
        self.modules
            .get(key)
            .map(|m| ModuleWeights::LowRank(m.clone()))
            .or_else(|| {
                self.lycoris
                    .get(key)
                    .map(|m| ModuleWeights::Lycoris(m.clone()))
            })
    }

    /// Inserts a module of either kind.
    pub fn insert(&mut self, key: (LoraComponent, String), module: ModuleWeights) {
        match module {
            ModuleWeights::LowRank(m) => {
                self.modules.insert(key, m);
            }
            ModuleWeights::Lycoris(m) => {
                self.lycoris.insert(key, m);
            }
        }
    }

    /// Fails, naming `what`, unless every module is a plain low-rank one
    /// (operations such as resizing and SVD merging apply to nothing else).
    pub fn require_plain(&self, what: &str) -> Result<(), String> {
        match self.network_type() {
            lycoris::NetworkType::Lora => Ok(()),
            t => Err(format!(
                "{what} works on plain LoRA files; this one is {} ({} modules)",
                t.display_name(),
                self.len()
            )),
        }
    }
}
pub mod format;
