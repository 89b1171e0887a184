//! The training configuration: one TOML file with `[model]`, `[network]`,
//! `[train]`, `[dataset]` and `[output]` tables.
//!
//! Every option is defined here once, with its doc comment. The TOML keys,
//! the `--set TABLE.KEY=VALUE` overrides, the CLI's quick flags (which are
//! `--set` overrides in disguise) and `docs/config.md` are all derived from
//! these structs (serde for the keys, schemars for the docs). The `[dataset]`
//! table is `sd_lora_data::DatasetConfig`, defined in the data crate.
//!
//! [`TrainConfig::load`] reads a file, makes the paths written in it relative
//! to the file's folder, applies `--set` overrides (whose paths stay relative
//! to the working directory, as the user typed them), and validates every
//! value, so a typo stops the run before any work with an error naming the
//! key and the allowed values.

use crate::overrides;
use candle_core::DType;
use schemars::JsonSchema;
use sd_lora_data::DatasetConfig;
use sd_lora_model::load::{LoadOptions, Prediction};
use sd_lora_model::lora::TargetInfo;
use sd_lora_model::lora::blocks::{BlockSettings, apply_blocks};
use sd_lora_model::lora::format::SaveDtype;
use sd_lora_model::lora::lycoris::{DoraAxis, NetworkType};
use sd_lora_model::lora::targets::{Preset, RankAlpha, TargetSpec};
use sd_lora_model::sampling::SamplerKind;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use toml::{Table, Value};

pub use crate::loss::{HuberSchedule, LossType};
use crate::loss::{LossOptions, NoiseOptions};
pub use crate::lr::LrScheduleKind;
pub use crate::optim::OptimizerKind;
use crate::optim::{AdafactorConfig, AdamWConfig, LionConfig, OptimizerSpec, ProdigyConfig};

/// The names of the built-in models `model.path` accepts.
pub use sd_lora_model::builtin::BUILTIN_MODELS;

/// The top-level tables of a training config.
pub const SECTIONS: &[&str] = &["model", "network", "train", "dataset", "output"];

/// A config section: its TOML table name and the JSON schema of its struct,
/// from which both docs/config.md and the web app's form are generated.
pub struct SectionSchema {
    /// TOML path of the table, e.g. `dataset`.
    pub table: &'static str,
    /// `schemars::schema_for!` of the struct.
    pub schema: schemars::Schema,
}

/// The sections `sd-lora` reads, in the order the docs present them.
pub fn section_schemas() -> Vec<SectionSchema> {
    vec![
        SectionSchema {
            table: "model",
            schema: schemars::schema_for!(ModelSection),
        },
        SectionSchema {
            table: "network",
            schema: schemars::schema_for!(NetworkSection),
        },
        SectionSchema {
            table: "train",
            schema: schemars::schema_for!(TrainSection),
        },
        SectionSchema {
            table: "dataset",
            schema: schemars::schema_for!(sd_lora_data::DatasetConfig),
        },
        SectionSchema {
            table: "output",
            schema: schemars::schema_for!(OutputSection),
        },
    ]
}

/// A whole training run: what to train, on what, how, and where to write it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// The base model.
    pub model: ModelSection,
    /// The LoRA network: which layers, rank and alpha.
    pub network: NetworkSection,
    /// The optimisation: steps, learning rates, schedule, loss options.
    pub train: TrainSection,
    /// The training images.
    pub dataset: DatasetConfig,
    /// Where and how results are written.
    pub output: OutputSection,
    /// The `section.key`s the file and the overrides gave (not a config key:
    /// it tells defaults that depend on the model from values the user chose).
    #[serde(skip)]
    #[schemars(skip)]
    pub given: GivenKeys,
    /// Things to tell the user about how the config was read (kohya keys
    /// ignored); not a config key.
    #[serde(skip)]
    #[schemars(skip)]
    pub notes: Vec<String>,
}

/// The `section.key`s a config document set. Equality ignores them: two
/// configs with the same values are equal however they were written.
#[derive(Debug, Clone, Default)]
pub struct GivenKeys(pub std::collections::BTreeSet<String>);

impl PartialEq for GivenKeys {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl GivenKeys {
    /// Whether the document set `key` (`section.key`).
    pub fn contains(&self, key: &str) -> bool {
        self.0.contains(key)
    }
}

/// The base model the LoRA is trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// The base model: a diffusers folder, a single-file `.safetensors`
    /// checkpoint (SD1.x, SD2.x or SDXL, e.g. `v1-5-pruned-emaonly.safetensors`
    /// or `sd_xl_base_1.0.safetensors`), or a built-in tiny model built in code
    /// (`builtin:tiny`, SD1's layout; `builtin:tiny-sdxl`, SDXL's), for the
    /// quickstarts and tests — they draw nothing useful.
    pub path: String,
    /// A VAE to use instead of the model's own: a VAE folder (`config.json` +
    /// weights), a diffusers model folder (its `vae/`), or a VAE `.safetensors`
    /// file as A1111 uses them (e.g. an fp16-safe SDXL VAE). Empty: the model's.
    pub vae: String,
    /// Precision of the VAE: `auto` keeps SDXL's VAE in f32 when the model is
    /// f16 (its activations overflow f16 and give NaN latents) unless the VAE's
    /// config says `force_upcast = false` (an fp16-safe VAE folder); other VAEs
    /// take `model.dtype`. `f32`, `f16`, `bf16` force it.
    pub vae_dtype: VaeDtypeChoice,
    /// A diffusers folder whose `COMPONENT/config.json` files (and scheduler
    /// prediction type) replace what is inferred from a single-file
    /// checkpoint's shapes — for checkpoints whose architecture cannot be
    /// inferred (e.g. an unusual text-encoder width or head count). Only the
    /// JSON files are read. Empty: infer.
    pub config: String,
    /// What the UNet predicts: `auto` takes it from the model (its scheduler
    /// config, or the checkpoint's layout); set `v` for SD2-768 single files
    /// whose prediction cannot be detected.
    pub prediction: PredictionChoice,
    /// Storage precision of the frozen base weights. LoRA weights and optimizer
    /// state are always f32. `f16`/`bf16` halve the memory of the base model
    /// (use them on GPUs; on CPU `f32` is fastest).
    pub dtype: StorageDtype,
    /// Where to train: `cpu`, `cuda` (the first GPU), `cuda:N`, or `metal`
    /// (Apple GPUs).
    pub device: String,
    /// Which text-encoder layer conditions the UNet, counted from the end:
    /// 1 = the last layer (SD1.x default), 2 = the penultimate (common for
    /// anime models trained with "clip skip 2").
    pub clip_skip: usize,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            path: "builtin:tiny".to_string(),
            vae: String::new(),
            vae_dtype: VaeDtypeChoice::Auto,
            config: String::new(),
            prediction: PredictionChoice::Auto,
            dtype: StorageDtype::F32,
            device: "cpu".to_string(),
            clip_skip: 1,
        }
    }
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PredictionChoice {
    /// Detect it from the model.
    #[default]
    Auto,
    /// The added noise (SD1.x, SD2-base).
    Epsilon,
    /// The velocity (SD2-768 "v-models").
    #[serde(alias = "v_prediction")]
    V,
}

/// Storage precision of the frozen base weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StorageDtype {
    /// 32-bit float: exact, 4 bytes per weight.
    #[default]
    F32,
    /// 16-bit float: 2 bytes per weight; the usual choice on NVIDIA GPUs.
    F16,
    /// bfloat16: 2 bytes per weight, f32's range (Ampere and newer GPUs).
    Bf16,
    /// fp8 (e4m3) for the UNet's Linear and Conv2d weights, 1 byte each,
    /// converted to bf16 layer by layer for the computation (kohya's
    /// `--fp8_base`); the other weights and all computation in bf16. Halves
    /// the UNet against f16, at fp8's precision (3 mantissa bits).
    #[serde(alias = "f8", alias = "fp8_e4m3")]
    Fp8,
}

/// Precision of the VAE (`model.vae_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VaeDtypeChoice {
    /// f32 for SDXL's VAE under an f16 model (unless its config says it is
    /// fp16-safe), else the model's dtype.
    #[default]
    Auto,
    /// 32-bit float.
    F32,
    /// 16-bit float (only for an fp16-safe VAE on SDXL).
    F16,
    /// bfloat16.
    Bf16,
}

impl VaeDtypeChoice {
    /// The loader's setting: `None` = automatic.
    pub fn to_dtype(self) -> Option<DType> {
        match self {
            VaeDtypeChoice::Auto => None,
            VaeDtypeChoice::F32 => Some(DType::F32),
            VaeDtypeChoice::F16 => Some(DType::F16),
            VaeDtypeChoice::Bf16 => Some(DType::BF16),
        }
    }
}

impl PredictionChoice {
    /// The model loader's override: `None` = detect.
    pub fn to_prediction(self) -> Option<Prediction> {
        match self {
            PredictionChoice::Auto => None,
            PredictionChoice::Epsilon => Some(Prediction::Epsilon),
            PredictionChoice::V => Some(Prediction::V),
        }
    }
}

impl StorageDtype {
    /// The candle dtype the model is built and computes in (bf16 for `fp8`,
    /// whose UNet Linear/Conv weights are stored apart, see
    /// [`LoadOptions::fp8_unet`]).
    pub fn to_dtype(self) -> DType {
        match self {
            StorageDtype::F32 => DType::F32,
            StorageDtype::F16 => DType::F16,
            StorageDtype::Bf16 | StorageDtype::Fp8 => DType::BF16,
        }
    }

    /// Bytes per stored UNet Linear/Conv2d weight element (1 for `fp8`).
    pub fn unet_weight_bytes(self) -> usize {
        match self {
            StorageDtype::Fp8 => 1,
            other => other.size_in_bytes(),
        }
    }

    /// Bytes per stored element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            StorageDtype::F32 => 4,
            StorageDtype::F16 | StorageDtype::Bf16 | StorageDtype::Fp8 => 2,
        }
    }
}

/// A parsed `model.device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU.
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
    /// An Apple GPU.
    Metal,
}

impl DeviceSpec {
    /// Parses `cpu`, `cuda`, `cuda:N` or `metal`, exactly as written.
    pub fn parse(s: &str) -> Option<DeviceSpec> {
        match s {
            "cpu" => Some(DeviceSpec::Cpu),
            "cuda" => Some(DeviceSpec::Cuda(0)),
            "metal" => Some(DeviceSpec::Metal),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda),
        }
    }
}

/// The LoRA network: which layers are adapted, with which rank and alpha.
///
/// Defaults: the kohya preset at rank 16, alpha 8 — the common kohya ratio
/// alpha/rank = 1/2 (as dim 32/alpha 16) at half the file size (roughly
/// 14 MB for SD1.5 in f16, 19 MB with the text encoder); enough capacity for a
/// subject or a style with learning rates around 1e-4.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// Which layers get a LoRA: `kohya` (every layer of the UNet's transformer
    /// blocks and of the text encoder's layers, as kohya's "LoRA"),
    /// `attention` (only the attention projections, as diffusers), `conv`
    /// (kohya plus the ResNet and sampler convolutions, as kohya's LoCon), or
    /// `none` (only what `include` names).
    pub preset: String,
    /// What each module is made of: `lora` (plain LoRA), `dora` (LoRA plus a
    /// trained magnitude, LyCORIS' `dora_wd`: loads in diffusers, ComfyUI and
    /// Forge; for A1111's built-in loader see `dora_axis`), `loha` (LyCORIS LoHa: a Hadamard product of two
    /// rank-`rank` products) or `lokr` (LyCORIS LoKr: a Kronecker product).
    /// Each combines with the presets (`conv` = LoCon). Saved with LyCORIS' key
    /// names; LoHa/LoKr in the kohya format only (diffusers reads neither).
    #[serde(rename = "type")]
    pub network_type: NetworkType,
    /// DoRA: one magnitude per output row (`output`: the DoRA paper's,
    /// LyCORIS' default, the only form PEFT/diffusers read) or per input
    /// column (`input`: the only form A1111's built-in loader applies right;
    /// ComfyUI and Forge read both).
    pub dora_axis: DoraAxis,
    /// LoKr: LyCORIS' `factor`, how each dimension splits between the small
    /// and the large Kronecker factor: -1 = the split closest to a square
    /// (320 → 16×20), N > 0 = a factor of at most N (N itself when it divides).
    pub lokr_factor: i64,
    /// Rank (kohya `network_dim`) of the UNet's Linear and 1×1-conv LoRAs.
    pub rank: usize,
    /// Alpha (kohya `network_alpha`): the LoRA output is scaled by alpha / rank.
    pub alpha: f32,
    /// Rank of LoRAs on convolutions with a 3×3 kernel (the `conv` preset);
    /// defaults to `rank`.
    pub conv_rank: Option<usize>,
    /// Alpha of the 3×3-conv LoRAs; defaults to `alpha`.
    pub conv_alpha: Option<f32>,
    /// Rank of the text-encoder LoRAs; defaults to `rank`.
    pub text_encoder_rank: Option<usize>,
    /// Alpha of the text-encoder LoRAs; defaults to `alpha`.
    pub text_encoder_alpha: Option<f32>,
    /// Glob patterns (`*`, `?`) of extra layers to adapt, on diffusers module
    /// paths, e.g. `"*.time_emb_proj"`. A pattern that matches no layer is an error.
    pub include: Vec<String>,
    /// Glob patterns of layers never to adapt (wins over the preset and `include`),
    /// e.g. `"up_blocks.3.*"`.
    pub exclude: Vec<String>,
    /// Dropout probability on the LoRA input during training (0 = none; 0.1 is a common regulariser).
    pub dropout: f32,
    /// Also train LoRAs on the text encoder (better identity for DreamBooth,
    /// more memory; its learning rate is `train.text_encoder_lr`). When off,
    /// text embeddings are computed once and cached.
    pub train_text_encoder: bool,
    /// Learning-rate weights of the UNet's down blocks (kohya's
    /// `down_lr_weight`; blocks numbered as kohya does, docs/training.md):
    /// 12 numbers for SD1/SD2 (`IN00`–`IN11`), 9 for SDXL (`IN00`–`IN08`),
    /// or a shape — `"sine"`, `"cosine"`, `"linear"`, `"reverse_linear"`,
    /// `"zeros"` — with an optional offset, `"cosine+0.5"`. A short list is
    /// filled with 1. A block whose weight is 0 (or at most
    /// `block_lr_zero_threshold`) gets no LoRA.
    pub down_lr_weight: Option<BlockWeightsValue>,
    /// Learning-rate weight of the mid block(s) (kohya's `mid_lr_weight`):
    /// one number for SD1/SD2, up to 3 (`MID00`–`MID02`) for SDXL.
    pub mid_lr_weight: Option<BlockWeightsValue>,
    /// Learning-rate weights of the up blocks (kohya's `up_lr_weight`),
    /// `OUT00`–`OUT11` (SDXL `OUT00`–`OUT08`); as `down_lr_weight`.
    pub up_lr_weight: Option<BlockWeightsValue>,
    /// Blocks whose learning-rate weight is at most this get no LoRA (kohya's
    /// `block_lr_zero_threshold`).
    pub block_lr_zero_threshold: f64,
    /// Rank of the UNet's Linear layers per block (kohya's `block_dims`): 25
    /// numbers for SD1/SD2 (`IN00`–`IN11`, `MID`, `OUT00`–`OUT11`), 23 for SDXL
    /// (`BASE`, `IN00`–`IN08`, `MID00`–`MID02`, `OUT00`–`OUT08`, `OUT`); 0 leaves
    /// a block out. Empty: `rank` everywhere.
    pub block_dims: Vec<usize>,
    /// Alpha per block, with `block_dims` (kohya's `block_alphas`). Empty: `alpha`.
    pub block_alphas: Vec<f32>,
    /// Rank of the UNet's 3×3 convs per block (kohya's `conv_block_dims`, with
    /// the `conv` preset). Empty: `conv_rank` everywhere.
    pub conv_block_dims: Vec<usize>,
    /// Conv alpha per block (kohya's `conv_block_alphas`). Empty: `conv_alpha`.
    pub conv_block_alphas: Vec<f32>,
}

/// A per-block list: numbers (a single number for one block), or a kohya
/// shape name with an optional `+offset`.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum BlockWeightsValue {
    /// One weight (the mid block of SD1/SD2).
    One(f64),
    /// A weight per block.
    List(Vec<f64>),
    /// `sine`, `cosine`, `linear`, `reverse_linear` or `zeros`, optionally `+offset`.
    Shape(String),
}

impl<'de> Deserialize<'de> for BlockWeightsValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // By hand rather than serde's untagged enum, whose error ("did not
        // match any variant") does not say what is expected.
        let expected = "a number, a list of numbers, or one of sine, cosine, linear, \
                        reverse_linear, zeros (optionally with +offset)";
        match Value::deserialize(d)? {
            Value::Integer(n) => Ok(Self::One(n as f64)),
            Value::Float(x) => Ok(Self::One(x)),
            Value::String(s) => Ok(Self::Shape(s)),
            Value::Array(a) => a
                .iter()
                .map(|v| match v {
                    Value::Integer(n) => Ok(*n as f64),
                    Value::Float(x) => Ok(*x),
                    other => Err(serde::de::Error::custom(format!(
                        "{other} in the list is not a number; expected {expected}"
                    ))),
                })
                .collect::<Result<_, _>>()
                .map(Self::List),
            other => Err(serde::de::Error::custom(format!(
                "{other} is not {expected}"
            ))),
        }
    }
}

impl BlockWeightsValue {
    fn to_model(&self) -> sd_lora_model::lora::blocks::BlockWeights {
        use sd_lora_model::lora::blocks::BlockWeights;
        match self {
            BlockWeightsValue::One(x) => BlockWeights::List(vec![*x]),
            BlockWeightsValue::List(v) => BlockWeights::List(v.clone()),
            BlockWeightsValue::Shape(s) => BlockWeights::Shape(s.clone()),
        }
    }
}

impl Default for NetworkSection {
    fn default() -> Self {
        NetworkSection {
            preset: "kohya".to_string(),
            network_type: NetworkType::Lora,
            dora_axis: DoraAxis::Output,
            lokr_factor: -1,
            rank: 16,
            alpha: 8.0,
            conv_rank: None,
            conv_alpha: None,
            text_encoder_rank: None,
            text_encoder_alpha: None,
            include: Vec::new(),
            exclude: Vec::new(),
            dropout: 0.0,
            train_text_encoder: false,
            down_lr_weight: None,
            mid_lr_weight: None,
            up_lr_weight: None,
            block_lr_zero_threshold: 0.0,
            block_dims: Vec::new(),
            block_alphas: Vec::new(),
            conv_block_dims: Vec::new(),
            conv_block_alphas: Vec::new(),
        }
    }
}

impl NetworkSection {
    /// The preset (valid after [`TrainConfig::validate`]; `kohya` otherwise).
    pub fn preset(&self) -> Preset {
        self.preset.parse().unwrap_or_default()
    }

    /// The model crate's target selection for this section: the UNet always,
    /// the text encoder when `train_text_encoder` is set.
    pub fn target_spec(&self) -> TargetSpec {
        let ra = |rank: usize, alpha: f32| RankAlpha { rank, alpha };
        TargetSpec {
            preset: self.preset(),
            unet: true,
            text_encoder: self.train_text_encoder,
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            unet_linear: ra(self.rank, self.alpha),
            unet_conv: ra(
                self.conv_rank.unwrap_or(self.rank),
                self.conv_alpha.unwrap_or(self.alpha),
            ),
            text_encoder_rank: ra(
                self.text_encoder_rank.unwrap_or(self.rank),
                self.text_encoder_alpha.unwrap_or(self.alpha),
            ),
            block_params: Default::default(),
        }
    }

    /// kohya's per-block settings of this section.
    pub fn block_settings(&self) -> BlockSettings {
        BlockSettings {
            down_lr_weight: self
                .down_lr_weight
                .as_ref()
                .map(BlockWeightsValue::to_model),
            mid_lr_weight: self.mid_lr_weight.as_ref().map(BlockWeightsValue::to_model),
            up_lr_weight: self.up_lr_weight.as_ref().map(BlockWeightsValue::to_model),
            lr_zero_threshold: self.block_lr_zero_threshold,
            block_dims: self.block_dims.clone(),
            block_alphas: self.block_alphas.clone(),
            conv_block_dims: self.conv_block_dims.clone(),
            conv_block_alphas: self.conv_block_alphas.clone(),
        }
    }

    /// [`Self::target_spec`] resolved against a model's layers: the block
    /// settings applied (they depend on the family: SD1/SD2 or SDXL). Also
    /// returns notes for the run's log.
    pub fn target_spec_for(
        &self,
        targets: &[TargetInfo],
    ) -> Result<(TargetSpec, Vec<String>), ConfigError> {
        let mut spec = self.target_spec();
        let notes = apply_blocks(&mut spec, &self.block_settings(), targets)
            .map_err(ConfigError::Blocks)?;
        Ok((spec, notes))
    }
}

/// The optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Number of optimizer steps (each `batch_size × gradient_accumulation` samples).
    pub steps: usize,
    /// Samples per micro-batch. All samples of a batch share an aspect-ratio bucket.
    pub batch_size: usize,
    /// Seed of everything random (LoRA initialisation, data order, crops,
    /// noise, timesteps): the same config and seed give the same file on CPU.
    pub seed: u64,
    /// Learning rate of the UNet LoRA (1e-4 is usual; 1e-4–5e-4 for styles).
    pub unet_lr: f64,
    /// Learning rate of the text-encoder LoRA (usually about half of `unet_lr`).
    pub text_encoder_lr: f64,
    /// Learning rate of the LoRA on SDXL's second text encoder (OpenCLIP-bigG);
    /// unset: `text_encoder_lr`. Ignored by SD1/SD2.
    pub text_encoder_2_lr: Option<f64>,
    /// The optimizer (kohya's `optimizer_type`): `adamw`, `adamw8bit`
    /// (about 2 bytes of state per parameter instead of 8), `prodigy` (set the
    /// learning rates to 1.0), `adafactor` or `lion` (3–10× smaller learning
    /// rates than AdamW).
    pub optimizer: OptimizerKind,
    /// Decoupled weight decay of every optimizer (0 = none).
    pub weight_decay: f64,
    /// β1 (momentum of the gradient mean) of AdamW, AdamW8bit and Prodigy.
    pub adam_beta1: f64,
    /// β2 (momentum of the squared gradient) of AdamW, AdamW8bit and Prodigy.
    pub adam_beta2: f64,
    /// ε (added to the denominator) of AdamW, AdamW8bit and Prodigy.
    pub adam_eps: f64,
    /// Lion β1: how much of the momentum (against the new gradient) sets
    /// the update's sign.
    pub lion_beta1: f64,
    /// Lion β2: decay of its momentum.
    pub lion_beta2: f64,
    /// Prodigy: multiplier of its step-size estimate; the value to tune
    /// (0.5–2).
    pub prodigy_d_coef: f64,
    /// Prodigy: initial step-size estimate (rarely changed).
    pub prodigy_d0: f64,
    /// Prodigy: Adam's bias correction in the step size (kohya users often
    /// turn it on).
    pub prodigy_use_bias_correction: bool,
    /// Prodigy: keep the learning rate out of the estimate's denominator
    /// (recommended with warm-up).
    pub prodigy_safeguard_warmup: bool,
    /// Prodigy: largest factor the step size may grow by per step (e.g.
    /// 1.02); unset = unbounded.
    pub prodigy_growth_rate: Option<f64>,
    /// Prodigy: decay of the estimate's statistics; unset = √`adam_beta2`.
    pub prodigy_beta3: Option<f64>,
    /// Prodigy: keep the estimate's statistics for every n-th value only
    /// (11 saves most of their memory; 1 = exact).
    pub prodigy_slice_p: usize,
    /// Adafactor: step size `min(1e-2, 1/√step)` instead of the learning
    /// rates and schedule.
    pub adafactor_relative_step: bool,
    /// Adafactor: scale the step by each tensor's RMS.
    pub adafactor_scale_parameter: bool,
    /// Adafactor with relative step: start the step size at 1e-6·step.
    pub adafactor_warmup_init: bool,
    /// Adafactor first-moment decay; unset = none (its default: least memory).
    pub adafactor_beta1: Option<f64>,
    /// Adafactor: updates with an RMS above this are scaled down to it.
    pub adafactor_clip_threshold: f64,
    /// Adafactor: exponent of the second moment's decay `1 − step^rate`.
    pub adafactor_decay_rate: f64,
    /// Learning-rate schedule after warm-up.
    pub lr_scheduler: LrScheduleKind,
    /// Steps of linear warm-up from 0 to the full learning rate (more than
    /// `steps` is allowed: the run then ends during warm-up).
    pub warmup_steps: usize,
    /// Number of cosine cycles of `cosine_with_restarts`.
    pub lr_cycles: usize,
    /// Micro-batches whose gradients are averaged into one optimizer step
    /// (a larger effective batch without more memory).
    pub gradient_accumulation: usize,
    /// Clip the global gradient norm to this value (0 = no clipping).
    pub max_grad_norm: f64,
    /// Min-SNR-γ loss weighting (5 is the paper's value); unset = plain MSE.
    /// Speeds up convergence by down-weighting easy low-noise timesteps.
    pub min_snr_gamma: Option<f64>,
    /// Noise offset: adds this much per-channel constant noise, so the model
    /// can learn very dark or bright images (0.05–0.1 is usual; 0 = off).
    pub noise_offset: f64,
    /// Multi-resolution ("pyramid") noise: levels of coarser noise added to
    /// ε, for overall brightness and composition (kohya's
    /// `multires_noise_iterations`; 6–10 usual, 0 = off).
    pub multires_noise_iterations: usize,
    /// Weight of each coarser level of multi-resolution noise (`discountⁱ`;
    /// kohya's `multires_noise_discount`, 0.3 usual).
    pub multires_noise_discount: f64,
    /// Input perturbation noise γ (kohya's `ip_noise_gamma`): the UNet sees
    /// the latents noised with `ε + γ·ε'` while it learns to predict ε — a
    /// regulariser (0.1 usual, 0 = off).
    pub ip_noise_gamma: f64,
    /// Draw the input perturbation's strength uniformly from
    /// `[0, ip_noise_gamma)` at each step.
    pub ip_noise_gamma_random_strength: bool,
    /// Smallest timestep trained (kohya's `min_timestep`; 0 = from the
    /// start).
    pub min_timestep: usize,
    /// Timesteps trained are below this (kohya's `max_timestep`); unset = the
    /// schedule's length (1000).
    pub max_timestep: Option<usize>,
    /// Rescale the training noise schedule to zero terminal SNR (Lin et al.
    /// 2023; kohya's `zero_terminal_snr`), so the model learns to start from
    /// pure noise: for v-prediction models. Previews sample as before.
    pub zero_terminal_snr: bool,
    /// Debiased estimation loss weighting (kohya's
    /// `debiased_estimation_loss`): each sample's loss times `1/√SNR` (ε) or
    /// `1/(SNR + 1)` (v).
    pub debiased_estimation: bool,
    /// The per-element loss (kohya's `loss_type`): `l2` (MSE), `l1`, `huber`
    /// (pseudo-Huber) or `smooth_l1`.
    pub loss_type: LossType,
    /// How the Huber threshold follows the timestep (kohya's
    /// `huber_schedule`): `snr`, `exponential` or `constant`.
    pub huber_schedule: HuberSchedule,
    /// The Huber threshold parameter (kohya's `huber_c`).
    pub huber_c: f64,
    /// Scale of the `exponential` and `constant` Huber thresholds (kohya's
    /// `huber_scale`).
    pub huber_scale: f64,
    /// With loss masks (`dataset.alpha_mask`, or `NAME-masklabel.png` files):
    /// how much the unmasked (transparent / black) area still counts, from 0
    /// (only the masked area is trained, as kohya's `alpha_mask` does) to 1
    /// (masks have no effect). OneTrainer's default is 0.1.
    pub unmasked_weight: f64,
    /// Stop the run after this many steps in a row with a non-finite loss or
    /// gradient (each such step is skipped and reported).
    pub max_nonfinite_steps: usize,
    /// Where VAE latents of the training images are kept: `memory` or `disk`
    /// (also saved to `latent_cache_dir` and reused by later runs). With
    /// `dataset.crop = "center"` every image (and its mirror image where
    /// `flip` is on) is encoded before the first step, then the VAE encoder is
    /// released; with random crops each crop is encoded when first drawn.
    /// `none`: every sample is encoded every time it is drawn.
    pub cache_latents: LatentCacheMode,
    /// Folder of the disk latent cache; defaults to `OUTPUT/latent_cache`.
    pub latent_cache_dir: Option<PathBuf>,
    /// Fraction of the instance images held out of training as a validation
    /// set (kohya's `validation_split`; 0.1 is usual, 0 = none). The seed
    /// picks them.
    pub validation_split: f64,
    /// A folder of validation images (captioned like the dataset), instead of
    /// or besides `validation_split`.
    pub validation_dir: Option<PathBuf>,
    /// Evaluate the validation set every this many steps (kohya's
    /// `validate_every_n_steps`); 0 = at every checkpoint and at the end.
    pub validate_every_n_steps: usize,
    /// Gradient checkpointing: keep only the inputs of every UNet ResNet,
    /// transformer block and upsampler in the forward pass and recompute them
    /// in the backward pass. Activation memory drops about five-fold (what
    /// lets SD1.5 at 512 px train in a few GB) for a third to a half more time
    /// per step; the gradients are the same.
    pub gradient_checkpointing: bool,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            steps: 1000,
            batch_size: 1,
            seed: 42,
            unet_lr: 1e-4,
            text_encoder_lr: 5e-5,
            text_encoder_2_lr: None,
            optimizer: OptimizerKind::Adamw,
            weight_decay: 1e-2,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            lion_beta1: 0.9,
            lion_beta2: 0.99,
            prodigy_d_coef: 1.0,
            prodigy_d0: 1e-6,
            prodigy_use_bias_correction: false,
            prodigy_safeguard_warmup: false,
            prodigy_growth_rate: None,
            prodigy_beta3: None,
            prodigy_slice_p: 1,
            adafactor_relative_step: false,
            adafactor_scale_parameter: false,
            adafactor_warmup_init: false,
            adafactor_beta1: None,
            adafactor_clip_threshold: 1.0,
            adafactor_decay_rate: -0.8,
            lr_scheduler: LrScheduleKind::Constant,
            warmup_steps: 0,
            lr_cycles: 1,
            gradient_accumulation: 1,
            max_grad_norm: 1.0,
            min_snr_gamma: None,
            noise_offset: 0.0,
            multires_noise_iterations: 0,
            multires_noise_discount: 0.3,
            ip_noise_gamma: 0.0,
            ip_noise_gamma_random_strength: false,
            min_timestep: 0,
            max_timestep: None,
            zero_terminal_snr: false,
            debiased_estimation: false,
            loss_type: LossType::L2,
            huber_schedule: HuberSchedule::Snr,
            huber_c: 0.1,
            huber_scale: 1.0,
            unmasked_weight: 0.0,
            max_nonfinite_steps: 5,
            cache_latents: LatentCacheMode::Memory,
            latent_cache_dir: None,
            validation_split: 0.0,
            validation_dir: None,
            validate_every_n_steps: 0,
            gradient_checkpointing: false,
        }
    }
}

/// Where VAE latents are cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LatentCacheMode {
    /// In memory, for this run.
    #[default]
    Memory,
    /// In memory and on disk (`train.latent_cache_dir`), reused across runs.
    Disk,
    /// No cache: encode every sample every time.
    None,
}

impl LatentCacheMode {
    /// Whether latents are also kept on disk.
    pub fn is_disk(self) -> bool {
        self == LatentCacheMode::Disk
    }

    /// Whether latents are cached at all.
    pub fn is_cached(self) -> bool {
        self != LatentCacheMode::None
    }
}

/// Where and how results are written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OutputSection {
    /// Output folder (created if missing): the LoRA files, `logs/loss.csv`,
    /// `loss.png`, `train_summary.json` and the resume state.
    pub dir: PathBuf,
    /// File name of the LoRA, without extension: `DIR/NAME.safetensors`.
    pub name: String,
    /// Also save `NAME-stepNNNNNN.safetensors` (and the resume state) every
    /// this many steps (0 = only at the end).
    pub save_every: usize,
    /// Key layout of the saved file: `kohya` (AUTOMATIC1111, Forge, ComfyUI)
    /// or `peft` (diffusers `load_lora_weights`). `sd-lora convert` converts later.
    pub save_format: SaveFormatChoice,
    /// Precision of the saved LoRA weights.
    pub save_dtype: SaveDtypeChoice,
    /// Preview prompts rendered with the LoRA being trained, every
    /// `sample_every` steps and at the end, into `OUTPUT/samples/` (one PNG per
    /// prompt with A1111 `parameters` metadata, and one grid per step). Each
    /// entry is a prompt string, or a table `{ prompt = "...", seed = 7, steps
    /// = 30, cfg = 6.5, width = 512, height = 768, negative_prompt = "...",
    /// sampler = "euler_a" }` whose keys override the `sample_*` defaults below.
    pub sample_prompts: Vec<SamplePrompt>,
    /// Render the preview prompts every this many steps (0 = only at the end).
    pub sample_every: usize,
    /// Sampler of previews and generated class images: `ddim`, `euler`,
    /// `euler_a`, `dpmpp_2m` or `dpmpp_2m_karras` (A1111's names work too).
    pub sample_sampler: String,
    /// Sampler steps of previews and generated class images.
    pub sample_steps: usize,
    /// Classifier-free guidance scale of previews and generated class images.
    pub sample_cfg: f64,
    /// Negative prompt of previews and generated class images (empty = none).
    pub sample_negative_prompt: String,
    /// Seed of the first preview prompt; prompt `i` uses `sample_seed + i`
    /// unless it sets its own, so every step renders the same noise and the
    /// grids show only what training changed.
    pub sample_seed: u64,
}

/// One preview prompt (see `output.sample_prompts`). Unset fields take the
/// `output.sample_*` defaults; width and height default to
/// `dataset.resolution`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SamplePrompt {
    /// The prompt (A1111 syntax: `(word:1.2)`, any length).
    pub prompt: String,
    /// Negative prompt of this prompt.
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// Seed of this prompt.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Sampler steps of this prompt.
    #[serde(default)]
    pub steps: Option<usize>,
    /// Guidance scale of this prompt.
    #[serde(default)]
    pub cfg: Option<f64>,
    /// Width in pixels (a multiple of 8).
    #[serde(default)]
    pub width: Option<u32>,
    /// Height in pixels (a multiple of 8).
    #[serde(default)]
    pub height: Option<u32>,
    /// Sampler of this prompt.
    #[serde(default)]
    pub sampler: Option<String>,
}

/// The table form of [`SamplePrompt`], read by its `Deserialize`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SamplePromptTable {
    prompt: String,
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    steps: Option<usize>,
    #[serde(default)]
    cfg: Option<f64>,
    #[serde(default)]
    width: Option<u32>,
    #[serde(default)]
    height: Option<u32>,
    #[serde(default)]
    sampler: Option<String>,
}

/// A preview prompt is written either as a plain string or as a table.
impl<'de> Deserialize<'de> for SamplePrompt {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PromptVisitor;
        impl<'de> serde::de::Visitor<'de> for PromptVisitor {
            type Value = SamplePrompt;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a prompt string, or a table with `prompt` and optional negative_prompt, seed, steps, cfg, width, height, sampler",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SamplePrompt, E> {
                Ok(SamplePrompt {
                    prompt: v.to_string(),
                    ..Default::default()
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<SamplePrompt, A::Error> {
                let t = SamplePromptTable::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )?;
                Ok(SamplePrompt {
                    prompt: t.prompt,
                    negative_prompt: t.negative_prompt,
                    seed: t.seed,
                    steps: t.steps,
                    cfg: t.cfg,
                    width: t.width,
                    height: t.height,
                    sampler: t.sampler,
                })
            }
        }
        d.deserialize_any(PromptVisitor)
    }
}

impl Default for OutputSection {
    fn default() -> Self {
        OutputSection {
            dir: PathBuf::from("output"),
            name: "lora".to_string(),
            save_every: 250,
            save_format: SaveFormatChoice::Kohya,
            save_dtype: SaveDtypeChoice::F16,
            sample_prompts: Vec::new(),
            sample_every: 0,
            sample_sampler: "euler_a".to_string(),
            sample_steps: 20,
            sample_cfg: 7.0,
            sample_negative_prompt: String::new(),
            sample_seed: 1234,
        }
    }
}

/// Key layout of the saved LoRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SaveFormatChoice {
    /// kohya-ss keys (`lora_unet_…`), with `ss_*` metadata.
    #[default]
    Kohya,
    /// PEFT/diffusers keys (`unet.….lora_A.weight`).
    Peft,
}

impl SaveFormatChoice {
    /// Whether files are written with PEFT/diffusers keys.
    pub fn is_peft(self) -> bool {
        self == SaveFormatChoice::Peft
    }
}

/// Precision of the saved LoRA weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SaveDtypeChoice {
    /// 16-bit float (the usual choice; half the size).
    #[default]
    F16,
    /// bfloat16.
    Bf16,
    /// 32-bit float (exact).
    F32,
}

impl SaveDtypeChoice {
    /// The LoRA writer's dtype.
    pub fn to_save_dtype(self) -> SaveDtype {
        match self {
            SaveDtypeChoice::F16 => SaveDtype::F16,
            SaveDtypeChoice::Bf16 => SaveDtype::BF16,
            SaveDtypeChoice::F32 => SaveDtype::F32,
        }
    }
}

/// Why a config cannot be used. Every variant names the file or key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    // The I/O error is in the message, not a `source`: the CLI prints
    // sources after the message, which would say it twice.
    #[error("cannot read config file {}: {error} (check the path)", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{} is not valid TOML: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    /// A top-level table that is not one of [`SECTIONS`].
    #[error("unknown config section `{name}` in {origin}; allowed: {}", SECTIONS.join(", "))]
    UnknownSection { name: String, origin: String },
    /// A `--set` argument that cannot be applied.
    #[error("{0}")]
    Override(#[from] overrides::OverrideError),
    /// A key that does not exist or has the wrong type / an unknown enum value
    /// (serde's message lists the expected keys or values).
    #[error("`{key}` in {origin}: {message}")]
    Key {
        key: String,
        origin: String,
        message: String,
    },
    /// A value of the right type that is out of range.
    #[error("`{key}` = {value}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
    /// Block settings that do not fit the model (the message names the key).
    #[error("{0}")]
    Blocks(String),
}

impl ConfigError {
    /// The offending key, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Key { key, .. } | ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::UnknownSection { name, .. } => Some(name),
            _ => None,
        }
    }
}

impl From<sd_lora_data::config::ConfigError> for ConfigError {
    fn from(e: sd_lora_data::config::ConfigError) -> Self {
        ConfigError::Invalid {
            key: e.key,
            value: e.value,
            reason: e.reason,
        }
    }
}

fn bad(key: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Where a config came from, for messages.
fn origin_of(path: Option<&Path>) -> String {
    path.map(|p| p.display().to_string())
        .unwrap_or_else(|| "command-line options".to_string())
}

/// Reads `path` (if any), makes the paths written in it relative to its
/// folder, applies `sets` and checks the top-level tables. Returns the
/// document, not yet typed.
pub fn load_document(path: Option<&Path>, sets: &[String]) -> Result<Table, ConfigError> {
    let mut doc = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|error| ConfigError::Read {
                path: p.to_path_buf(),
                error,
            })?;
            let mut doc: Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Syntax {
                        path: p.to_path_buf(),
                        message: e.message().to_string(),
                    })?;
            if crate::kohya_dataset::is_kohya_dataset_config(&doc) {
                // A kohya dataset config given as the config: train on it
                // with every other option at its default.
                doc = kohya_dataset_document(p);
            } else {
                let base = p.parent().map(Path::to_path_buf).unwrap_or_default();
                resolve_paths(&mut doc, &base);
            }
            doc
        }
        None => Table::new(),
    };
    // Overrides come after path resolution: a path given on the command line
    // is relative to the working directory, where the user typed it.
    overrides::apply_all(&mut doc, sets)?;
    let origin = origin_of(path);
    for key in doc.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            return Err(ConfigError::UnknownSection {
                name: key.clone(),
                origin,
            });
        }
    }
    Ok(doc)
}

/// The document `[dataset] kohya_config = "path"`.
pub fn kohya_dataset_document(path: &Path) -> Table {
    let mut dataset = Table::new();
    dataset.insert(
        "kohya_config".into(),
        Value::String(path.to_string_lossy().into_owned()),
    );
    let mut doc = Table::new();
    doc.insert("dataset".into(), Value::Table(dataset));
    doc
}

/// The keys that hold file-system paths, as `(table, key)`; each
/// `dataset.subsets[*].path` is one too (see [`try_for_each_path`]).
const PATH_KEYS: &[(&str, &str)] = &[
    ("model", "path"),
    ("model", "vae"),
    ("model", "config"),
    ("output", "dir"),
    ("train", "latent_cache_dir"),
    ("train", "validation_dir"),
    ("dataset", "kohya_config"),
];

/// Calls `f(key, value)` on every path string in `doc` (at [`PATH_KEYS`]
/// and `dataset.subsets[N].path`, named so in `key`), stopping at the first
/// error. Values of another type are left for the typed parse to report.
pub fn try_for_each_path<E>(
    doc: &mut Table,
    mut f: impl FnMut(&str, &mut String) -> Result<(), E>,
) -> Result<(), E> {
    for (table, key) in PATH_KEYS {
        if let Some(Value::String(s)) = doc
            .get_mut(*table)
            .and_then(Value::as_table_mut)
            .and_then(|t| t.get_mut(*key))
        {
            f(&format!("{table}.{key}"), s)?;
        }
    }
    if let Some(subsets) = doc
        .get_mut("dataset")
        .and_then(Value::as_table_mut)
        .and_then(|t| t.get_mut("subsets"))
        .and_then(Value::as_array_mut)
    {
        for (i, s) in subsets.iter_mut().enumerate() {
            if let Some(Value::String(p)) = s.as_table_mut().and_then(|t| t.get_mut("path")) {
                f(&format!("dataset.subsets[{i}].path"), p)?;
            }
        }
    }
    Ok(())
}

/// Joins relative path strings at the keys that hold file-system paths to
/// `base`: `model.path` (unless built-in), `model.vae`, `model.config`,
/// `dataset.subsets[*].path`, `dataset.kohya_config`, `output.dir`,
/// `train.latent_cache_dir`, `train.validation_dir`.
pub fn resolve_paths(doc: &mut Table, base: &Path) {
    if base.as_os_str().is_empty() {
        return;
    }
    let _ = try_for_each_path(doc, |_, s| {
        let p = Path::new(s.as_str());
        if !s.is_empty() && p.is_relative() && !s.starts_with("builtin:") {
            *s = clean(&base.join(p)).to_string_lossy().into_owned();
        }
        Ok::<(), std::convert::Infallible>(())
    });
}

/// Removes `.` and `name/..` pairs without touching the file system, so
/// `configs/../assets/x` is shown as `assets/x` (links are not resolved: a
/// leading `..` is kept).
pub fn clean(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component> = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            // `/..` is `/`.
            Component::ParentDir if matches!(out.last(), Some(Component::RootDir)) => {}
            other => out.push(other),
        }
    }
    if out.is_empty() {
        return PathBuf::from(".");
    }
    out.iter().collect()
}

impl TrainConfig {
    /// Parses the TOML file at `path` (none: all defaults) with `--set`
    /// overrides `sets` applied in order, resolves relative paths written in
    /// the file against its folder, and validates everything.
    pub fn load(path: Option<&Path>, sets: &[String]) -> Result<Self, ConfigError> {
        let cfg = Self::load_unvalidated(path, sets)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// [`TrainConfig::load`] without [`TrainConfig::validate`] (for tools that
    /// check only a part, and for tests).
    pub fn load_unvalidated(path: Option<&Path>, sets: &[String]) -> Result<Self, ConfigError> {
        let mut doc = load_document(path, sets)?;
        let notes = crate::kohya_dataset::expand(&mut doc)?;
        let mut cfg = Self::from_document(doc, &origin_of(path)).map_err(|e| match e {
            // A bad value given on the command line is named as such, not as
            // the file's.
            ConfigError::Key {
                key,
                origin,
                message,
            } => {
                let from_command_line = sets.iter().any(|s| {
                    let set = s.split_once('=').map_or(s.as_str(), |(k, _)| k).trim();
                    let set = set.split('[').next().unwrap_or(set);
                    key == set
                        || key.starts_with(&format!("{set}."))
                        || key.starts_with(&format!("{set}["))
                });
                ConfigError::Key {
                    key,
                    origin: if from_command_line {
                        "the command line".into()
                    } else {
                        origin
                    },
                    message,
                }
            }
            other => other,
        })?;
        cfg.notes = notes;
        Ok(cfg)
    }

    /// The typed config of a document; `origin` names it in errors.
    pub fn from_document(doc: Table, origin: &str) -> Result<Self, ConfigError> {
        // serde_path_to_error names the offending key (`train.lr_scheduler`),
        // which a plain conversion from a merged TOML value would lose.
        let given = doc
            .iter()
            .flat_map(|(section, v)| {
                v.as_table()
                    .into_iter()
                    .flat_map(|t| t.keys())
                    .map(move |k| format!("{section}.{k}"))
            })
            .collect();
        let mut cfg: Self = serde_path_to_error::deserialize(Value::Table(doc)).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Key {
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                origin: origin.to_string(),
                message: e.inner().message().to_string(),
            }
        })?;
        cfg.given = GivenKeys(given);
        Ok(cfg)
    }

    /// Fills in the defaults that depend on the model: `dataset.resolution`
    /// becomes the model's native resolution (512 for SD1.x, 768 for SD2.x-v,
    /// 1024 for SDXL, 64 for the built-in models) unless it was given. Returns
    /// a line saying what was chosen, for the run's log.
    pub fn apply_model_defaults(&mut self, native_resolution: u32) -> Option<String> {
        if self.given.contains("dataset.resolution") || native_resolution == 0 {
            return None;
        }
        self.dataset.resolution = native_resolution;
        Some(format!(
            "dataset.resolution = {native_resolution} (the model's native resolution; set it to \
             train at another)"
        ))
    }

    /// The resolved config as TOML (what `--dry-run` prints).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    /// Folder of the disk latent cache.
    pub fn latent_cache_dir(&self) -> PathBuf {
        self.train
            .latent_cache_dir
            .clone()
            .unwrap_or_else(|| self.output.dir.join("latent_cache"))
    }

    /// Checks every value, so a bad one stops the run before any work, with
    /// a message naming the key and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        self.network.validate()?;
        self.train.validate()?;
        self.output.validate()?;
        self.dataset.validate()?;
        self.validate_prodigy_lrs()?;
        self.validate_save_format()?;
        Ok(())
    }

    /// PEFT/diffusers files hold LoRA and output-axis DoRA only: say so before
    /// training rather than at the first save.
    fn validate_save_format(&self) -> Result<(), ConfigError> {
        if self.output.save_format != SaveFormatChoice::Peft {
            return Ok(());
        }
        let n = &self.network;
        match n.network_type {
            NetworkType::Loha | NetworkType::Lokr => Err(bad(
                "output.save_format",
                "\"peft\"",
                format!(
                    "PEFT/diffusers files hold LoRA and DoRA only, and network.type is \"{}\"; \
                     save in the kohya format (ComfyUI, A1111 and Forge read {} files)",
                    n.network_type,
                    n.network_type.display_name()
                ),
            )),
            NetworkType::Dora if n.dora_axis == DoraAxis::Input => Err(bad(
                "output.save_format",
                "\"peft\"",
                "PEFT/diffusers DoRA has one magnitude per output row, and network.dora_axis is \
                 \"input\"; use dora_axis = \"output\" or the kohya format",
            )),
            _ => Ok(()),
        }
    }

    /// Prodigy adapts one step size for all parts, so they must share the
    /// learning rate that multiplies it (as `prodigyopt` requires).
    fn validate_prodigy_lrs(&self) -> Result<(), ConfigError> {
        let t = &self.train;
        if t.optimizer != OptimizerKind::Prodigy || !self.network.train_text_encoder {
            return Ok(());
        }
        for (key, lr) in [
            ("train.text_encoder_lr", Some(t.text_encoder_lr)),
            ("train.text_encoder_2_lr", t.text_encoder_2_lr),
        ] {
            if let Some(lr) = lr
                && lr != t.unet_lr
            {
                return Err(bad(
                    key,
                    lr,
                    format!(
                        "with train.optimizer = \"prodigy\" every trained part needs the learning rate of \
                         train.unet_lr ({}): Prodigy finds one step size and the learning rate multiplies it; \
                         set them equal (1.0 is usual)",
                        t.unet_lr
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Settings that are allowed but probably not meant, one line each.
    pub fn warnings(&self) -> Vec<String> {
        let t = &self.train;
        let mut out = Vec::new();
        if t.optimizer == OptimizerKind::Prodigy && t.unet_lr < 0.1 {
            out.push(format!(
                "train.optimizer = \"prodigy\" with train.unet_lr = {}: Prodigy's learning rate multiplies \
                 the step size it finds and is usually 1.0; this run will barely move",
                t.unet_lr
            ));
        }
        if t.optimizer == OptimizerKind::Adafactor && t.adafactor_relative_step {
            out.push(
                "train.adafactor_relative_step = true: the learning rates and train.lr_scheduler are not \
                 used; Adafactor sets its own step size"
                    .to_string(),
            );
        }
        out
    }
}

/// The sampler named by `key`, or an error listing the names.
pub fn parse_sampler(key: &str, name: &str) -> Result<SamplerKind, ConfigError> {
    name.parse().map_err(|_| {
        bad(
            key,
            format!("{name:?}"),
            format!(
                "unknown sampler; use one of {}",
                SamplerKind::NAMES.join(", ")
            ),
        )
    })
}

fn sample_steps(key: &str, n: usize) -> Result<(), ConfigError> {
    if n == 0 {
        return Err(bad(
            key,
            0,
            "at least 1 sampler step is needed (20–30 is usual)",
        ));
    }
    Ok(())
}

fn sample_cfg(key: &str, c: f64) -> Result<(), ConfigError> {
    if !c.is_finite() {
        return Err(bad(
            key,
            c,
            "the guidance scale must be a finite number (7 is usual)",
        ));
    }
    Ok(())
}

/// `Ok` if `v` is finite and > 0.
fn positive(key: &str, v: f64, hint: &str) -> Result<(), ConfigError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(bad(key, v, format!("must be a finite number > 0 ({hint})")))
    }
}

/// `Ok` if `v` is finite and ≥ 0.
fn non_negative(key: &str, v: f64, hint: &str) -> Result<(), ConfigError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(bad(key, v, format!("must be a finite number ≥ 0 ({hint})")))
    }
}

impl ModelSection {
    fn validate(&self) -> Result<(), ConfigError> {
        let p = self.path.trim();
        if p.is_empty() {
            return Err(bad(
                "model.path",
                "\"\"",
                "must name a diffusers folder, a .safetensors checkpoint or builtin:tiny / builtin:tiny-sdxl",
            ));
        }
        if p.starts_with("builtin:") && !BUILTIN_MODELS.contains(&p) {
            return Err(bad(
                "model.path",
                format!("{p:?}"),
                format!(
                    "unknown built-in model; allowed: {}",
                    BUILTIN_MODELS.join(", ")
                ),
            ));
        }
        if p.starts_with("builtin:") {
            for (key, value) in [("model.vae", &self.vae), ("model.config", &self.config)] {
                if !value.trim().is_empty() {
                    return Err(bad(
                        key,
                        format!("{value:?}"),
                        "a built-in model has its own VAE and configs; use it with a model file \
                         or folder",
                    ));
                }
            }
        }
        if DeviceSpec::parse(&self.device).is_none() {
            return Err(bad(
                "model.device",
                format!("{:?}", self.device),
                "allowed: cpu, cuda, cuda:N (N = GPU number, e.g. cuda:1), metal",
            ));
        }
        if self.clip_skip == 0 {
            return Err(bad(
                "model.clip_skip",
                0,
                "must be at least 1 (1 = the last text-encoder layer, 2 = the penultimate)",
            ));
        }
        Ok(())
    }

    /// The parsed device (`Cpu` if invalid; [`TrainConfig::validate`] rejects that).
    pub fn device_spec(&self) -> DeviceSpec {
        DeviceSpec::parse(&self.device).unwrap_or(DeviceSpec::Cpu)
    }

    /// Whether `path` names a built-in model.
    pub fn is_builtin(&self) -> bool {
        self.path.trim().starts_with("builtin:")
    }

    /// The model loader's options for this section.
    pub fn load_options(&self) -> LoadOptions {
        let path = |s: &str| (!s.trim().is_empty()).then(|| PathBuf::from(s.trim()));
        LoadOptions {
            prediction: self.prediction.to_prediction(),
            vae: path(&self.vae),
            config_dir: path(&self.config),
            vae_dtype: self.vae_dtype.to_dtype(),
            fp8_unet: self.dtype == StorageDtype::Fp8,
            ..LoadOptions::default()
        }
    }
}

impl NetworkSection {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.lokr_factor == 0 || self.lokr_factor < -1 {
            return Err(bad(
                "network.lokr_factor",
                self.lokr_factor,
                "must be -1 (the split closest to a square) or a positive number",
            ));
        }
        if self.preset.parse::<Preset>().is_err() {
            return Err(bad(
                "network.preset",
                format!("{:?}", self.preset),
                "allowed: kohya, attention, conv, none",
            ));
        }
        let rank = |key: &str, r: usize| {
            if r == 0 {
                Err(bad(
                    key,
                    0,
                    "must be at least 1 (4–32 is usual; 16 is the default)",
                ))
            } else {
                Ok(())
            }
        };
        let alpha = |key: &str, a: f32| {
            positive(
                key,
                a as f64,
                "alpha/rank scales the LoRA; rank/2 or 1 are usual",
            )
        };
        rank("network.rank", self.rank)?;
        alpha("network.alpha", self.alpha)?;
        if let Some(r) = self.conv_rank {
            rank("network.conv_rank", r)?;
        }
        if let Some(a) = self.conv_alpha {
            alpha("network.conv_alpha", a)?;
        }
        if let Some(r) = self.text_encoder_rank {
            rank("network.text_encoder_rank", r)?;
        }
        if let Some(a) = self.text_encoder_alpha {
            alpha("network.text_encoder_alpha", a)?;
        }
        for (name, pats) in [("include", &self.include), ("exclude", &self.exclude)] {
            if let Some(i) = pats.iter().position(|p| p.trim().is_empty()) {
                return Err(bad(
                    &format!("network.{name}[{i}]"),
                    "\"\"",
                    "must be a glob pattern on module paths, e.g. \"*.to_q\"",
                ));
            }
        }
        if self.preset() == Preset::None && self.include.is_empty() {
            return Err(bad(
                "network.preset",
                "\"none\"",
                "selects no layer without `network.include` patterns; use kohya, attention or conv, or add include patterns",
            ));
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return Err(bad(
                "network.dropout",
                self.dropout,
                "must be a probability in [0, 1) (0 = off, 0.1 is usual)",
            ));
        }
        Ok(())
    }
}

impl TrainSection {
    /// The optimizer with its hyper-parameters from these options.
    pub fn optimizer_spec(&self) -> OptimizerSpec {
        let adam = AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_eps,
        };
        match self.optimizer {
            OptimizerKind::Adamw => OptimizerSpec::AdamW(adam),
            OptimizerKind::Adamw8bit => OptimizerSpec::AdamW8bit(adam),
            OptimizerKind::Prodigy => OptimizerSpec::Prodigy(ProdigyConfig {
                beta1: self.adam_beta1,
                beta2: self.adam_beta2,
                beta3: self.prodigy_beta3,
                eps: self.adam_eps,
                d0: self.prodigy_d0,
                d_coef: self.prodigy_d_coef,
                growth_rate: self.prodigy_growth_rate,
                use_bias_correction: self.prodigy_use_bias_correction,
                safeguard_warmup: self.prodigy_safeguard_warmup,
                slice_p: self.prodigy_slice_p,
            }),
            OptimizerKind::Adafactor => OptimizerSpec::Adafactor(AdafactorConfig {
                relative_step: self.adafactor_relative_step,
                scale_parameter: self.adafactor_scale_parameter,
                warmup_init: self.adafactor_warmup_init,
                beta1: self.adafactor_beta1,
                clip_threshold: self.adafactor_clip_threshold,
                decay_rate: self.adafactor_decay_rate,
                ..AdafactorConfig::default()
            }),
            OptimizerKind::Lion => OptimizerSpec::Lion(LionConfig {
                beta1: self.lion_beta1,
                beta2: self.lion_beta2,
            }),
        }
    }

    /// How the trainer draws noise and timesteps.
    pub fn noise_options(&self) -> NoiseOptions {
        NoiseOptions {
            offset: self.noise_offset,
            multires_iterations: self.multires_noise_iterations,
            multires_discount: self.multires_noise_discount,
            ip_noise_gamma: self.ip_noise_gamma,
            ip_noise_random_strength: self.ip_noise_gamma_random_strength,
            min_timestep: self.min_timestep,
            max_timestep: self.max_timestep,
        }
    }

    /// How the trainer computes and weights the loss.
    pub fn loss_options(&self) -> LossOptions {
        LossOptions {
            min_snr_gamma: self.min_snr_gamma,
            debiased_estimation: self.debiased_estimation,
            loss_type: self.loss_type,
            huber_schedule: self.huber_schedule,
            huber_c: self.huber_c,
            huber_scale: self.huber_scale,
            unmasked_weight: self.unmasked_weight,
        }
    }

    /// The noise and loss options beyond the basics.
    fn validate_noise_options(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.unmasked_weight) {
            return Err(bad(
                "train.unmasked_weight",
                self.unmasked_weight,
                "must be between 0 (train only the masked area) and 1 (ignore masks)",
            ));
        }
        if !(self.multires_noise_discount.is_finite()
            && self.multires_noise_discount > 0.0
            && self.multires_noise_discount < 1.0)
        {
            return Err(bad(
                "train.multires_noise_discount",
                self.multires_noise_discount,
                "must be between 0 and 1 (0.3 is usual)",
            ));
        }
        if self.multires_noise_iterations > 32 {
            return Err(bad(
                "train.multires_noise_iterations",
                self.multires_noise_iterations,
                "must be at most 32 (6–10 is usual, 0 = off)",
            ));
        }
        if !(self.ip_noise_gamma.is_finite() && (0.0..=1.0).contains(&self.ip_noise_gamma)) {
            return Err(bad(
                "train.ip_noise_gamma",
                self.ip_noise_gamma,
                "must be between 0 and 1 (0.1 is usual, 0 = off)",
            ));
        }
        if let Some(max) = self.max_timestep
            && max <= self.min_timestep
        {
            return Err(bad(
                "train.max_timestep",
                max,
                format!(
                    "must be above train.min_timestep ({}); timesteps are drawn from [min, max)",
                    self.min_timestep
                ),
            ));
        }
        if !(self.huber_c.is_finite() && self.huber_c > 0.0 && self.huber_c <= 1.0) {
            return Err(bad(
                "train.huber_c",
                self.huber_c,
                "must be in (0, 1] (0.1 is usual)",
            ));
        }
        positive("train.huber_scale", self.huber_scale, "1.0 is usual")?;
        if !(self.validation_split.is_finite() && (0.0..0.5).contains(&self.validation_split)) {
            return Err(bad(
                "train.validation_split",
                self.validation_split,
                "must be in [0, 0.5) (0.1 is usual, 0 = no split)",
            ));
        }
        if let Some(d) = &self.validation_dir
            && d.as_os_str().is_empty()
        {
            return Err(bad(
                "train.validation_dir",
                "\"\"",
                "must name a folder of images (or leave it out)",
            ));
        }
        Ok(())
    }

    /// The options of the optimizers other than AdamW (checked whichever
    /// optimizer is chosen, so a typo never waits for the day it is used).
    fn validate_optimizer_options(&self) -> Result<(), ConfigError> {
        let unit = |key: &str, b: f64, hint: &str| {
            if b.is_finite() && (0.0..1.0).contains(&b) {
                Ok(())
            } else {
                Err(bad(key, b, format!("must be in [0, 1) ({hint})")))
            }
        };
        unit("train.lion_beta1", self.lion_beta1, "0.9 is usual")?;
        unit("train.lion_beta2", self.lion_beta2, "0.99 is usual")?;
        positive(
            "train.prodigy_d_coef",
            self.prodigy_d_coef,
            "0.5–2; 1 is the default",
        )?;
        positive("train.prodigy_d0", self.prodigy_d0, "1e-6 is the default")?;
        if let Some(g) = self.prodigy_growth_rate
            && !(g.is_finite() && g >= 1.0)
        {
            return Err(bad(
                "train.prodigy_growth_rate",
                g,
                "must be ≥ 1 (1.02 is usual; leave it out for no limit)",
            ));
        }
        if let Some(b) = self.prodigy_beta3 {
            unit("train.prodigy_beta3", b, "leave it out for √adam_beta2")?;
        }
        if self.prodigy_slice_p == 0 {
            return Err(bad(
                "train.prodigy_slice_p",
                0,
                "must be at least 1 (1 = exact, 11 saves memory)",
            ));
        }
        if let Some(b) = self.adafactor_beta1 {
            unit(
                "train.adafactor_beta1",
                b,
                "leave it out for no first moment",
            )?;
        }
        positive(
            "train.adafactor_clip_threshold",
            self.adafactor_clip_threshold,
            "1.0 is the default",
        )?;
        if !(self.adafactor_decay_rate.is_finite() && self.adafactor_decay_rate < 0.0) {
            return Err(bad(
                "train.adafactor_decay_rate",
                self.adafactor_decay_rate,
                "must be < 0 (−0.8 is the default)",
            ));
        }
        if self.adafactor_warmup_init && !self.adafactor_relative_step {
            return Err(bad(
                "train.adafactor_warmup_init",
                true,
                "needs train.adafactor_relative_step = true",
            ));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let at_least_one = |key: &str, v: usize, hint: &str| {
            if v == 0 {
                Err(bad(key, 0, format!("must be at least 1 ({hint})")))
            } else {
                Ok(())
            }
        };
        at_least_one("train.steps", self.steps, "number of optimizer steps")?;
        at_least_one("train.batch_size", self.batch_size, "1–4 is usual")?;
        at_least_one(
            "train.gradient_accumulation",
            self.gradient_accumulation,
            "1 = no accumulation",
        )?;
        at_least_one("train.lr_cycles", self.lr_cycles, "1 = a single cycle")?;
        at_least_one(
            "train.max_nonfinite_steps",
            self.max_nonfinite_steps,
            "5 is the default",
        )?;
        positive("train.unet_lr", self.unet_lr, "1e-4 is usual")?;
        positive(
            "train.text_encoder_lr",
            self.text_encoder_lr,
            "5e-5 is usual",
        )?;
        if let Some(lr) = self.text_encoder_2_lr {
            positive(
                "train.text_encoder_2_lr",
                lr,
                "leave it out to use text_encoder_lr",
            )?;
        }
        non_negative("train.weight_decay", self.weight_decay, "0.01 is usual")?;
        for (key, b) in [
            ("train.adam_beta1", self.adam_beta1),
            ("train.adam_beta2", self.adam_beta2),
        ] {
            if !(b.is_finite() && (0.0..1.0).contains(&b)) {
                return Err(bad(key, b, "must be in [0, 1) (0.9 and 0.999 are usual)"));
            }
        }
        positive("train.adam_eps", self.adam_eps, "1e-8 is usual")?;
        self.validate_optimizer_options()?;
        self.validate_noise_options()?;
        non_negative(
            "train.max_grad_norm",
            self.max_grad_norm,
            "0 = no clipping, 1.0 is usual",
        )?;
        if let Some(g) = self.min_snr_gamma {
            positive(
                "train.min_snr_gamma",
                g,
                "5 is usual; leave it out to disable",
            )?;
        }
        if !(self.noise_offset.is_finite() && (0.0..=1.0).contains(&self.noise_offset)) {
            return Err(bad(
                "train.noise_offset",
                self.noise_offset,
                "must be between 0 and 1 (0 = off, 0.05–0.1 is usual)",
            ));
        }
        if let Some(d) = &self.latent_cache_dir
            && d.as_os_str().is_empty()
        {
            return Err(bad(
                "train.latent_cache_dir",
                "\"\"",
                "must name a folder (leave it out for OUTPUT/latent_cache)",
            ));
        }
        Ok(())
    }
}

impl OutputSection {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.dir.as_os_str().is_empty() {
            return Err(bad("output.dir", "\"\"", "must name a folder"));
        }
        let n = &self.name;
        if n.trim().is_empty()
            || n.contains(['/', '\\', ':', '\0'])
            || n.starts_with('.')
            || n.ends_with(".safetensors")
        {
            return Err(bad(
                "output.name",
                format!("{n:?}"),
                "must be a plain file name without folder or extension, e.g. \"my_dog\"",
            ));
        }
        parse_sampler("output.sample_sampler", &self.sample_sampler)?;
        sample_steps("output.sample_steps", self.sample_steps)?;
        sample_cfg("output.sample_cfg", self.sample_cfg)?;
        for (i, p) in self.sample_prompts.iter().enumerate() {
            let key = |k: &str| format!("output.sample_prompts[{i}].{k}");
            if let Some(s) = &p.sampler {
                parse_sampler(&key("sampler"), s)?;
            }
            if let Some(n) = p.steps {
                sample_steps(&key("steps"), n)?;
            }
            if let Some(c) = p.cfg {
                sample_cfg(&key("cfg"), c)?;
            }
            for (name, v) in [("width", p.width), ("height", p.height)] {
                if let Some(v) = v
                    && (v < 8 || !v.is_multiple_of(8))
                {
                    return Err(bad(
                        &key(name),
                        v,
                        "must be a multiple of 8 (and at least 8)",
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_cleaning() {
        assert_eq!(
            clean(Path::new("configs/../assets/x")),
            Path::new("assets/x")
        );
        assert_eq!(clean(Path::new("../a/./b")), Path::new("../a/b"));
        assert_eq!(clean(Path::new("/a/b/../../..")), Path::new("/"));
        assert_eq!(clean(Path::new("a/..")), Path::new("."));
    }

    #[test]
    fn devices() {
        assert_eq!(DeviceSpec::parse("cpu"), Some(DeviceSpec::Cpu));
        assert_eq!(DeviceSpec::parse("cuda"), Some(DeviceSpec::Cuda(0)));
        assert_eq!(DeviceSpec::parse("cuda:3"), Some(DeviceSpec::Cuda(3)));
        assert_eq!(DeviceSpec::parse("metal"), Some(DeviceSpec::Metal));
        assert_eq!(DeviceSpec::parse("gpu"), None);
        assert_eq!(DeviceSpec::parse("cuda:x"), None);
    }
}
