//! Which layers get a LoRA: presets, user patterns, and rank/alpha per group.
//!
//! [`model_targets`] lists every adaptable layer of a model (its
//! [`TargetInfo`]); [`select`] keeps those a [`TargetSpec`] asks for.
//!
//! # Presets (on module paths, as kohya's sd-scripts and diffusers choose them)
//!
//! - [`Preset::Kohya`] (default, kohya's "LoRA"): in the UNet every layer inside a
//!   `Transformer2DModel` — `proj_in`, `proj_out`, `attn1`/`attn2`
//!   `to_q`/`to_k`/`to_v`/`to_out.0`, `ff.net.0.proj`, `ff.net.2`; in the text
//!   encoder every layer of `text_model.encoder.layers.N` —
//!   `self_attn.{q,k,v,out}_proj`, `mlp.fc1`, `mlp.fc2`.
//! - [`Preset::Attention`] (diffusers' default): only `to_q`, `to_k`, `to_v`,
//!   `to_out.0` of the UNet's transformers and `self_attn.{q,k,v,out}_proj`.
//! - [`Preset::Conv`] (kohya's LoCon): Kohya plus every layer of the ResNets
//!   (`conv1`, `conv2`, `time_emb_proj`, `conv_shortcut`) and of the samplers
//!   (`downsamplers.0.conv`, `upsamplers.0.conv`). As in kohya, `conv_in`,
//!   `conv_out` and `time_embedding` are never in a preset.
//! - [`Preset::None`]: only what `include` patterns name.
//!
//! # Patterns
//!
//! Globs on the module path: `*` matches any run of characters (dots included),
//! `?` one character; everything else literally. A layer is selected when its
//! component is enabled and (it is in the preset or an `include` pattern
//! matches) and no `exclude` pattern matches. UNet and text-encoder paths never
//! collide (the latter start with `text_model.`), so one list serves both.
//! [`TargetSpec::check_patterns`] reports patterns that match no layer.
//!
//! # Groups (rank and alpha)
//!
//! As in kohya: Linear layers and 1×1 convs of the UNet take the UNet
//! (`network_dim`) rank and alpha, convs with a larger kernel take the conv
//! (`conv_dim`) ones, and the text encoder has its own.

use std::str::FromStr;

use super::encoders::TextEncodersRef;
use crate::unet::UNet2DConditionModel;

use super::{LayerKind, LoraComponent, TargetInfo};

/// A named set of target layers (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// kohya's "LoRA": transformer blocks of the UNet, encoder layers of the TE.
    #[default]
    Kohya,
    /// Attention projections only (diffusers' default).
    Attention,
    /// kohya's LoCon: Kohya plus ResNet and sampler layers.
    Conv,
    /// Nothing: only `include` patterns.
    None,
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Kohya => "kohya",
            Self::Attention => "attention",
            Self::Conv => "conv",
            Self::None => "none",
        })
    }
}

impl FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "kohya" | "lora" => Ok(Self::Kohya),
            "attention" | "attn" => Ok(Self::Attention),
            "conv" | "locon" => Ok(Self::Conv),
            "none" => Ok(Self::None),
            other => Err(format!(
                "unknown LoRA target preset {other:?}: use kohya, attention, conv or none"
            )),
        }
    }
}

/// Rank and alpha of a group of LoRA modules.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RankAlpha {
    pub rank: usize,
    pub alpha: f32,
}

/// The groups that have their own rank and alpha.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetGroup {
    /// UNet Linear layers and 1×1 convs.
    UnetLinear,
    /// UNet convs with a kernel larger than 1×1.
    UnetConv,
    /// Text encoder(s).
    TextEncoder,
}

/// What to adapt and with which rank/alpha.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TargetSpec {
    pub preset: Preset,
    /// Adapt the UNet.
    pub unet: bool,
    /// Adapt the text encoder(s).
    pub text_encoder: bool,
    /// Glob patterns of extra layers to adapt.
    pub include: Vec<String>,
    /// Glob patterns of layers never to adapt (wins over preset and include).
    pub exclude: Vec<String>,
    pub unet_linear: RankAlpha,
    pub unet_conv: RankAlpha,
    pub text_encoder_rank: RankAlpha,
    /// Per-layer rank/alpha and learning-rate weight from kohya's block
    /// settings ([`super::blocks::apply_blocks`]); a rank of 0 removes the
    /// layer. Layers not listed keep their group's values and weight 1.
    pub block_params:
        std::collections::BTreeMap<(LoraComponent, String), super::blocks::BlockParams>,
}

impl Default for TargetSpec {
    /// The kohya preset on UNet and text encoder, rank 4, alpha 1 (kohya's
    /// `network_dim`/`network_alpha` defaults) for every group.
    fn default() -> Self {
        let ra = RankAlpha {
            rank: 4,
            alpha: 1.0,
        };
        Self {
            preset: Preset::Kohya,
            unet: true,
            text_encoder: true,
            include: Vec::new(),
            exclude: Vec::new(),
            unet_linear: ra,
            unet_conv: ra,
            text_encoder_rank: ra,
            block_params: Default::default(),
        }
    }
}

impl TargetSpec {
    /// The group of a target.
    pub fn group(target: &TargetInfo) -> TargetGroup {
        match (target.component, target.kind) {
            (LoraComponent::TextEncoder | LoraComponent::TextEncoder2, _) => {
                TargetGroup::TextEncoder
            }
            (LoraComponent::Unet, LayerKind::Conv2d { kernel, .. }) if kernel != [1, 1] => {
                TargetGroup::UnetConv
            }
            (LoraComponent::Unet, _) => TargetGroup::UnetLinear,
        }
    }

    /// Rank and alpha for a target.
    pub fn params(&self, target: &TargetInfo) -> RankAlpha {
        if let Some(b) = self.block(target) {
            return b.rank_alpha;
        }
        match Self::group(target) {
            TargetGroup::UnetLinear => self.unet_linear,
            TargetGroup::UnetConv => self.unet_conv,
            TargetGroup::TextEncoder => self.text_encoder_rank,
        }
    }

    fn block(&self, target: &TargetInfo) -> Option<&super::blocks::BlockParams> {
        if self.block_params.is_empty() {
            return None;
        }
        self.block_params
            .get(&(target.component, target.path.clone()))
    }

    /// The learning-rate weight of a target's block (1 without block settings).
    pub fn lr_weight(&self, target: &TargetInfo) -> f64 {
        self.block(target).map_or(1.0, |b| b.lr_weight)
    }

    /// Whether `target` is selected.
    pub fn selects(&self, target: &TargetInfo) -> bool {
        if self.block(target).is_some_and(|b| b.rank_alpha.rank == 0) {
            return false;
        }
        let enabled = match target.component {
            LoraComponent::Unet => self.unet,
            LoraComponent::TextEncoder | LoraComponent::TextEncoder2 => self.text_encoder,
        };
        if !enabled || self.exclude.iter().any(|p| glob_match(p, &target.path)) {
            return false;
        }
        in_preset(self.preset, target) || self.include.iter().any(|p| glob_match(p, &target.path))
    }

    /// An error naming every include/exclude pattern that matches no layer of
    /// `targets` (a typo would otherwise silently train nothing), and any zero rank.
    pub fn check_patterns(&self, targets: &[TargetInfo]) -> Result<(), String> {
        let mut problems: Vec<String> = self
            .include
            .iter()
            .chain(&self.exclude)
            .filter(|p| !targets.iter().any(|t| glob_match(p, &t.path)))
            .map(|p| format!("pattern {p:?} matches no layer"))
            .collect();
        for (name, ra) in [
            ("UNet", self.unet_linear),
            ("UNet conv", self.unet_conv),
            ("text encoder", self.text_encoder_rank),
        ] {
            if ra.rank == 0 {
                problems.push(format!("{name} rank is 0"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("LoRA targets: {}", problems.join("; ")))
        }
    }
}

/// The path's segments.
fn segments(path: &str) -> Vec<&str> {
    path.split('.').collect()
}

/// Whether a target is in a preset (see the module docs).
pub fn in_preset(preset: Preset, target: &TargetInfo) -> bool {
    let seg = segments(&target.path);
    let last = seg.last().copied().unwrap_or("");
    let attention_proj = |seg: &[&str]| {
        let n = seg.len();
        matches!(last, "to_q" | "to_k" | "to_v")
            || (n >= 2 && seg[n - 2] == "to_out" && last == "0")
    };
    match target.component {
        LoraComponent::Unet => {
            let in_transformer = seg.contains(&"attentions");
            let in_resnet_or_sampler = seg
                .iter()
                .any(|s| matches!(*s, "resnets" | "downsamplers" | "upsamplers"));
            match preset {
                Preset::Kohya => in_transformer,
                Preset::Attention => in_transformer && attention_proj(&seg),
                Preset::Conv => in_transformer || in_resnet_or_sampler,
                Preset::None => false,
            }
        }
        LoraComponent::TextEncoder | LoraComponent::TextEncoder2 => {
            let in_layers = target.path.starts_with("text_model.encoder.layers.");
            match preset {
                Preset::Kohya | Preset::Conv => in_layers,
                Preset::Attention => {
                    in_layers && matches!(last, "q_proj" | "k_proj" | "v_proj" | "out_proj")
                }
                Preset::None => false,
            }
        }
    }
}

/// Glob match of `pattern` (`*` any run, `?` one character) against all of `text`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matcher with backtracking to the last `*`.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Every adaptable (Linear/Conv2d) layer of the UNet and, when given, the text
/// encoder(s), in model order.
pub fn model_targets<'t>(
    unet: &UNet2DConditionModel,
    text_encoders: impl Into<TextEncodersRef<'t>>,
) -> Vec<TargetInfo> {
    let mut out = Vec::new();
    unet.visit_layers(&mut |path, layer| out.push(layer.target(LoraComponent::Unet, path)));
    for (c, te) in text_encoders.into().iter() {
        te.visit_layers(&mut |path, layer| out.push(layer.target(c, path)));
    }
    out
}

/// The adaptable layer stored as the weight `key` (`PATH.weight`) of
/// `shape` in `component`, read from a weight table without building the
/// model: 2-D weights are Linear layers, 4-D ones convs; embedding tables
/// are not layers a LoRA adapts. A weight does not record a conv's stride or
/// padding: they are given as 1 and `kernel/2`; only shapes matter to the
/// callers (dry-run estimates, merging, extracting).
pub fn stored_layer(component: LoraComponent, key: &str, shape: &[usize]) -> Option<TargetInfo> {
    let path = key.strip_suffix(".weight")?;
    if path.ends_with("embedding") || path.contains("embeddings.") {
        return None;
    }
    let kind = match *shape {
        [_, _] => LayerKind::Linear,
        [_, _, kh, kw] => LayerKind::Conv2d {
            kernel: [kh, kw],
            stride: 1,
            padding: kh / 2,
        },
        _ => return None,
    };
    Some(TargetInfo {
        component,
        path: path.to_string(),
        kind,
        in_features: shape[1],
        out_features: shape[0],
    })
}

/// The targets that `spec` selects, in the order given.
pub fn select(targets: &[TargetInfo], spec: &TargetSpec) -> Vec<TargetInfo> {
    targets
        .iter()
        .filter(|t| spec.selects(t))
        .cloned()
        .collect()
}
