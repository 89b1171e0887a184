//! The CLIP text transformer (transformers' `CLIPTextModel`, optionally with the
//! `text_projection` of `CLIPTextModelWithProjection`), built only from the ops
//! of [`crate::ops`] so that gradients reach every layer.
//!
//! Struct and field names mirror the checkpoint keys:
//!
//! ```text
//! text_model.embeddings.token_embedding.weight             ClipTextTransformer.embeddings.token_embedding
//! text_model.embeddings.position_embedding.weight          ….embeddings.position_embedding
//! text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj   ….encoder.layers[N].self_attn.{q,k,v,out}_proj
//! text_model.encoder.layers.N.layer_norm1 / layer_norm2    ….encoder.layers[N].layer_norm1 / layer_norm2
//! text_model.encoder.layers.N.mlp.fc1 / fc2                ….encoder.layers[N].mlp.fc1 / fc2
//! text_model.final_layer_norm                              ….final_layer_norm
//! text_projection (optional, no bias)                      ….text_projection
//! ```
//!
//! Each layer is pre-norm: `h += attn(ln1(h))` with a causal mask, then
//! `h += fc2(act(fc1(ln2(h))))`. No attention mask beyond the causal one is
//! applied: Stable Diffusion feeds the padded prompt as it is.
//!
//! # Clip skip
//!
//! [`ClipTextTransformer::forward_with_clip_skip`] follows AUTOMATIC1111 and
//! kohya: `clip_skip = 1` is the normal output (`last_hidden_state`), `clip_skip
//! = k` takes the hidden state `k − 1` layers before the end
//! (`hidden_states[-k]`) and passes it through `final_layer_norm`. SD1 models
//! trained "with clip skip 2" (many anime models) expect 2. SD2's converted text
//! encoder already has OpenCLIP's last layer removed (23 of 24 layers) and its
//! `final_layer_norm` is the one OpenCLIP applies after the penultimate layer,
//! so its natural setting is 1.
//!
//! SDXL conditions on `hidden_states[-2]` of both its encoders *without*
//! `final_layer_norm`, plus `text_embeds` of the second:
//! [`ClipTextTransformer::forward_sdxl`] (clip skip `k` reads
//! `hidden_states[-(k + 1)]`, as diffusers' `clip_skip = k − 1`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Error, Result, Tensor, bail};
use candle_nn::VarBuilder;

use super::config::{ClipTextConfig, HiddenAct};
use crate::lora::adapted::LoraLinear;
use crate::ops::{FrozenLinear, attention_with_bias, gelu, layer_norm, quick_gelu};

/// The key prefix of the text transformer inside `CLIPTextModel` checkpoints.
pub const TEXT_MODEL_PREFIX: &str = "text_model.";

/// A frozen lookup table, `weight: [num_embeddings, dim]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// `[num_embeddings, dim]`.
    pub weight: Tensor,
}

impl Embedding {
    fn new(vb: VarBuilder, num: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((num, dim), "weight")?,
        })
    }

    /// The rows of `ids` (any shape of integer ids), shaped `ids.shape() + [dim]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let dim = self.weight.dim(1)?;
        let mut shape = ids.dims().to_vec();
        shape.push(dim);
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
        self.weight.index_select(&flat, 0)?.reshape(shape)
    }
}

/// LayerNorm over the last dimension with frozen `weight` (γ) and `bias` (β).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// γ, `[dim]`.
    pub weight: Tensor,
    /// β, `[dim]`.
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// A frozen linear layer read from `vb` (`weight`, and `bias` when `bias`),
/// with an empty LoRA slot.
fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<LoraLinear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    FrozenLinear::new(weight, bias).map(LoraLinear::new)
}

/// `text_model.embeddings`: token plus position embeddings.
#[derive(Debug, Clone)]
pub struct ClipTextEmbeddings {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
}

impl ClipTextEmbeddings {
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            token_embedding: Embedding::new(
                vb.pp("token_embedding"),
                cfg.vocab_size,
                cfg.hidden_size,
            )?,
            position_embedding: Embedding::new(
                vb.pp("position_embedding"),
                cfg.max_position_embeddings,
                cfg.hidden_size,
            )?,
        })
    }

    /// `ids: [batch, seq]` → `[batch, seq, hidden]`, positions `0..seq`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, seq) = ids.dims2()?;
        let max = self.position_embedding.weight.dim(0)?;
        if seq > max {
            bail!("CLIP text encoder: {seq} tokens, but the model has only {max} positions")
        }
        let tokens = self.token_embedding.forward(ids)?;
        let positions = self.position_embedding.weight.narrow(0, 0, seq)?;
        tokens.broadcast_add(&positions)
    }
}

/// `self_attn`: multi-head self-attention with q/k/v/out projections.
#[derive(Debug, Clone)]
pub struct ClipAttention {
    pub q_proj: LoraLinear,
    pub k_proj: LoraLinear,
    pub v_proj: LoraLinear,
    pub out_proj: LoraLinear,
    pub num_heads: usize,
}

impl ClipAttention {
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: linear(vb.pp("q_proj"), d, d, true)?,
            k_proj: linear(vb.pp("k_proj"), d, d, true)?,
            v_proj: linear(vb.pp("v_proj"), d, d, true)?,
            out_proj: linear(vb.pp("out_proj"), d, d, true)?,
            num_heads: cfg.num_attention_heads,
        })
    }

    /// `x: [batch, seq, hidden]`; `mask` broadcasts to `[batch, heads, seq, seq]`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let h = self.num_heads;
        let hd = d / h;
        let heads = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = heads(self.q_proj.forward(x)?)?;
        let k = heads(self.k_proj.forward(x)?)?;
        let v = heads(self.v_proj.forward(x)?)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let y = attention_with_bias(&q, &k, &v, scale, mask)?;
        let y = y.transpose(1, 2)?.reshape((b, t, d))?;
        self.out_proj.forward(&y)
    }
}

/// `mlp`: `fc2(act(fc1(x)))`.
#[derive(Debug, Clone)]
pub struct ClipMlp {
    pub fc1: LoraLinear,
    pub fc2: LoraLinear,
    pub activation: HiddenAct,
}

impl ClipMlp {
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            fc1: linear(vb.pp("fc1"), cfg.hidden_size, cfg.intermediate_size, true)?,
            fc2: linear(vb.pp("fc2"), cfg.intermediate_size, cfg.hidden_size, true)?,
            activation: cfg.hidden_act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.fc1.forward(x)?;
        let y = match self.activation {
            HiddenAct::QuickGelu => quick_gelu(&y)?,
            HiddenAct::Gelu => gelu(&y)?,
        };
        self.fc2.forward(&y)
    }
}

/// `encoder.layers.N`: a pre-norm transformer layer.
#[derive(Debug, Clone)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            self_attn: ClipAttention::new(vb.pp("self_attn"), cfg)?,
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), cfg.hidden_size, cfg.layer_norm_eps)?,
            mlp: ClipMlp::new(vb.pp("mlp"), cfg)?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), cfg.hidden_size, cfg.layer_norm_eps)?,
        })
    }

    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = (x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?)?;
        &h + self.mlp.forward(&self.layer_norm2.forward(&h)?)?
    }
}

/// `encoder`: the stack of layers.
#[derive(Debug, Clone)]
pub struct ClipEncoder {
    pub layers: Vec<ClipEncoderLayer>,
}

impl ClipEncoder {
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(vb.pp(i), cfg))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }
}

/// What [`ClipTextTransformer::forward`] returns.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// `final_layer_norm` of the last layer's output, `[batch, seq, hidden]`:
    /// SD1's and SD2's conditioning.
    pub last_hidden_state: Tensor,
    /// The embedding output, then the output of each layer (`num_hidden_layers
    /// + 1` tensors, before any final LayerNorm), as transformers'
    /// `output_hidden_states=True` gives them.
    pub hidden_states: Vec<Tensor>,
    /// `last_hidden_state` at each prompt's end token, `[batch, hidden]`.
    pub pooled: Tensor,
    /// `text_projection(pooled)`, `[batch, projection_dim]`, when the checkpoint
    /// has a `text_projection` (SDXL's second text encoder).
    pub text_embeds: Option<Tensor>,
}

/// The CLIP text transformer (`text_model`), plus `text_projection` if present.
#[derive(Debug, Clone)]
pub struct ClipTextTransformer {
    pub embeddings: ClipTextEmbeddings,
    pub encoder: ClipEncoder,
    pub final_layer_norm: LayerNorm,
    /// `text_projection: [projection_dim, hidden]` without bias; only in
    /// `CLIPTextModelWithProjection` checkpoints.
    pub text_projection: Option<LoraLinear>,
    pub config: ClipTextConfig,
    /// Set by [`Self::release_weights`]: the weights are gone.
    released: bool,
}

impl ClipTextTransformer {
    /// Builds the model from a `VarBuilder` whose keys are the transformers names
    /// *with* the `text_model.` prefix (`text_model.encoder.layers.0.…`);
    /// `text_projection.weight` is loaded when present. The weights take the
    /// VarBuilder's dtype, which is also the compute dtype.
    pub fn new(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        config.validate()?;
        let text_projection = if vb.contains_tensor("text_projection.weight") {
            Some(linear(
                vb.pp("text_projection"),
                config.hidden_size,
                config.projection_dim,
                false,
            )?)
        } else {
            None
        };
        let vb = vb.pp("text_model");
        Ok(Self {
            embeddings: ClipTextEmbeddings::new(vb.pp("embeddings"), config)?,
            encoder: ClipEncoder::new(vb.pp("encoder"), config)?,
            final_layer_norm: LayerNorm::new(
                vb.pp("final_layer_norm"),
                config.hidden_size,
                config.layer_norm_eps,
            )?,
            text_projection,
            config: config.clone(),
            released: false,
        })
    }

    /// Builds the model from named tensors (e.g. `candle_core::safetensors::load`
    /// of `text_encoder/model.safetensors`), converted to `dtype` on `device`.
    /// Keys may carry the `text_model.` prefix (transformers 4, real diffusers
    /// folders) or not (transformers 5 saves without it).
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        config: &ClipTextConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let tensors = with_text_model_prefix(tensors);
        Self::new(VarBuilder::from_tensors(tensors, dtype, device), config)
    }

    /// Reads a `.safetensors` file of a text encoder (see [`Self::from_tensors`]).
    pub fn from_safetensors(
        path: impl AsRef<Path>,
        config: &ClipTextConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let path = path.as_ref();
        let tensors = candle_core::safetensors::load(path, device)
            .map_err(|e| Error::Msg(format!("cannot read {}: {e}", path.display())))?;
        Self::from_tensors(tensors, config, dtype, device)
            .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))
    }

    /// The dtype of the weights (and of the computation).
    pub fn dtype(&self) -> DType {
        self.embeddings.token_embedding.weight.dtype()
    }

    /// The embedding output for `ids: [batch, seq]` (integer ids, seq ≤ 77).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.check_loaded()?;
        self.embeddings.forward(ids)
    }

    /// Drops the weights that matter (the token embedding, every layer, the
    /// projection; what is left is a few KB), for a training run that has
    /// cached every output it needs. Any later use is an error saying so.
    pub fn release_weights(&mut self) -> Result<()> {
        let (dim, dtype, device) = {
            let w = &self.embeddings.token_embedding.weight;
            (w.dim(1)?, w.dtype(), w.device().clone())
        };
        self.embeddings.token_embedding.weight = Tensor::zeros((0, dim), dtype, &device)?;
        self.encoder.layers = Vec::new();
        self.text_projection = None;
        self.released = true;
        Ok(())
    }

    /// Whether [`Self::release_weights`] was called.
    pub fn is_released(&self) -> bool {
        self.released
    }

    fn check_loaded(&self) -> Result<()> {
        if self.released {
            bail!(
                "the text encoder is not loaded (it was released once every caption's output was cached)"
            )
        }
        Ok(())
    }

    /// Runs the model on `ids: [batch, seq]`.
    pub fn forward(&self, ids: &Tensor) -> Result<ClipTextOutput> {
        self.forward_from_embeddings(&self.embed(ids)?, ids)
    }

    /// Runs the encoder on an embedding output `hidden: [batch, seq, hidden]`
    /// (normally [`Self::embed`]`(ids)`; anything that should receive a gradient
    /// may be substituted). `ids` only locate the end tokens for `pooled`.
    pub fn forward_from_embeddings(&self, hidden: &Tensor, ids: &Tensor) -> Result<ClipTextOutput> {
        self.check_loaded()?;
        let mask = causal_mask(hidden.dim(1)?, hidden.dtype(), hidden.device())?;
        let mut hidden_states = Vec::with_capacity(self.encoder.layers.len() + 1);
        hidden_states.push(hidden.clone());
        let mut h = hidden.clone();
        for layer in &self.encoder.layers {
            h = layer.forward(&h, Some(&mask))?;
            hidden_states.push(h.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(&h)?;
        let pooled = gather_rows(
            &last_hidden_state,
            &eos_positions(ids, self.config.eos_token_id)?,
        )?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipTextOutput {
            last_hidden_state,
            hidden_states,
            pooled,
            text_embeds,
        })
    }

    /// The conditioning of Stable Diffusion tools with clip skip (see the module
    /// docs): `final_layer_norm(hidden_states[-clip_skip])`, where
    /// `clip_skip = 1` is `last_hidden_state`. The skipped layers are not run.
    /// `clip_skip` must be between 1 and `num_hidden_layers + 1`.
    pub fn forward_with_clip_skip(&self, ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        self.check_loaded()?;
        let n = self.encoder.layers.len();
        if clip_skip == 0 || clip_skip > n + 1 {
            bail!(
                "clip skip {clip_skip} is out of range: use 1 (the last layer, the default) \
                 up to {} for this {n}-layer text encoder (2 = the penultimate layer)",
                n + 1
            )
        }
        let mut h = self.embed(ids)?;
        let mask = causal_mask(h.dim(1)?, h.dtype(), h.device())?;
        for layer in &self.encoder.layers[..n + 1 - clip_skip] {
            h = layer.forward(&h, Some(&mask))?;
        }
        self.final_layer_norm.forward(&h)
    }

    /// SDXL's reading of a text encoder: `hidden_states[-(clip_skip + 1)]`
    /// without the final LayerNorm (`clip_skip = 1`: the penultimate layer,
    /// SDXL's conditioning) and, when `pooled`, `text_projection` of the
    /// final-normed last layer at each end token (`[batch, projection_dim]`).
    /// Layers after the one read run only when the pooled output is wanted.
    pub fn forward_sdxl(
        &self,
        ids: &Tensor,
        clip_skip: usize,
        pooled: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.check_loaded()?;
        let n = self.encoder.layers.len();
        if clip_skip == 0 || clip_skip > n {
            bail!(
                "clip skip {clip_skip} is out of range: use 1 (SDXL's penultimate layer, the \
                 default) up to {n} for this {n}-layer text encoder"
            )
        }
        let read = n - clip_skip;
        let mut h = self.embed(ids)?;
        let mask = causal_mask(h.dim(1)?, h.dtype(), h.device())?;
        let run = if pooled { n } else { read };
        let mut hidden = (read == 0).then(|| h.clone());
        for (i, layer) in self.encoder.layers[..run].iter().enumerate() {
            h = layer.forward(&h, Some(&mask))?;
            if i + 1 == read {
                hidden = Some(h.clone());
            }
        }
        let Some(hidden) = hidden else {
            bail!("text encoder: layer {read} was not run")
        };
        if !pooled {
            return Ok((hidden, None));
        }
        let Some(projection) = &self.text_projection else {
            bail!("this text encoder has no text_projection, so it gives no pooled embedding")
        };
        let last = self.final_layer_norm.forward(&h)?;
        let at_end = gather_rows(&last, &eos_positions(ids, self.config.eos_token_id)?)?;
        Ok((hidden, Some(projection.forward(&at_end)?)))
    }
}

/// Adds `text_model.` to the keys if none has it (transformers 5 saves the text
/// encoder without it); `text_projection.*` stays at the top level.
pub fn with_text_model_prefix(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    if tensors.keys().any(|k| k.starts_with(TEXT_MODEL_PREFIX)) {
        return tensors;
    }
    tensors
        .into_iter()
        .map(|(k, v)| {
            if k.starts_with("text_projection.") {
                (k, v)
            } else {
                (format!("{TEXT_MODEL_PREFIX}{k}"), v)
            }
        })
        .collect()
}

/// CLIP's causal mask, `[seq, seq]`: 0 on and below the diagonal, −∞ above (a
/// token sees only itself and earlier tokens).
pub fn causal_mask(seq: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq, seq), device)?.to_dtype(dtype)
}

/// The position of each prompt's end token in `ids: [batch, seq]`, by
/// transformers' rule: when the config's `eos_token_id` is 2 (old configs, SD1
/// and SD2, where the real end token is 49407, the largest id) the position of
/// the largest id (the first one on ties); otherwise the first position holding
/// `eos_token_id` (position 0 if there is none, as in transformers).
pub fn eos_positions(ids: &Tensor, eos_token_id: u32) -> Result<Vec<usize>> {
    let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    Ok(rows
        .iter()
        .map(|row| {
            if eos_token_id == 2 {
                // `max_by_key` keeps the last maximum; reversing makes it the first.
                row.iter()
                    .enumerate()
                    .rev()
                    .max_by_key(|&(_, &id)| id)
                    .map_or(0, |(i, _)| i)
            } else {
                row.iter().position(|&id| id == eos_token_id).unwrap_or(0)
            }
        })
        .collect())
}

/// `x[b, positions[b], :]` for each batch row: `[batch, seq, d]` → `[batch, d]`.
fn gather_rows(x: &Tensor, positions: &[usize]) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    if positions.len() != b {
        bail!("{} end positions for a batch of {b}", positions.len())
    }
    let index: Vec<u32> = positions
        .iter()
        .enumerate()
        .map(|(i, &p)| (i * t + p) as u32)
        .collect();
    let index = Tensor::new(index, x.device())?;
    x.reshape((b * t, d))?.index_select(&index, 0)
}

crate::lora::visit::impl_visit_layers!(ClipAttention {
    q_proj => "q_proj",
    k_proj => "k_proj",
    v_proj => "v_proj",
    out_proj => "out_proj",
});
crate::lora::visit::impl_visit_layers!(ClipMlp {
    fc1 => "fc1",
    fc2 => "fc2",
});
crate::lora::visit::impl_visit_layers!(ClipEncoderLayer {
    self_attn => "self_attn",
    mlp => "mlp",
});
crate::lora::visit::impl_visit_layers!(ClipEncoder { layers => "layers" });

/// Paths are the transformers keys: `text_model.encoder.layers.N.…` and, when
/// present, `text_projection` (outside `text_model`).
impl crate::lora::visit::VisitLayers for ClipTextTransformer {
    fn visit_layers_at(
        &self,
        path: &str,
        f: &mut dyn FnMut(&str, crate::lora::visit::LayerRef<'_>),
    ) {
        use crate::lora::visit::join;
        let text_model = join(path, "text_model");
        self.encoder
            .visit_layers_at(&join(&text_model, "encoder"), f);
        self.text_projection
            .visit_layers_at(&join(path, "text_projection"), f);
    }
    fn visit_layers_mut_at(
        &mut self,
        path: &str,
        f: &mut dyn FnMut(&str, crate::lora::visit::LayerMut<'_>),
    ) {
        use crate::lora::visit::join;
        let text_model = join(path, "text_model");
        self.encoder
            .visit_layers_mut_at(&join(&text_model, "encoder"), f);
        self.text_projection
            .visit_layers_mut_at(&join(path, "text_projection"), f);
    }
}

impl ClipTextTransformer {
    /// Calls `f(path, layer)` for every Linear layer, `path` being its
    /// transformers key minus `.weight` (`text_model.encoder.layers.0.self_attn.q_proj`, …).
    pub fn visit_layers(&self, f: &mut dyn FnMut(&str, crate::lora::visit::LayerRef<'_>)) {
        crate::lora::visit::VisitLayers::visit_layers_at(self, "", f)
    }

    /// The mutable version of [`Self::visit_layers`] (to attach LoRA adapters).
    pub fn visit_layers_mut(&mut self, f: &mut dyn FnMut(&str, crate::lora::visit::LayerMut<'_>)) {
        crate::lora::visit::VisitLayers::visit_layers_mut_at(self, "", f)
    }
}
