//! kohya module names ↔ (component, diffusers module path).
//!
//! Forward is mechanical: prefix + path with `.` → `_`
//! (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` →
//! `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`). The reverse is
//! ambiguous in general (`to_out_0` is `to_out.0`, but `ff_net_0_proj` is `ff.net.0.proj`), so it
//! is done two ways:
//! - with a model's targets, by building the forward map from them and looking names up exactly
//!   ([`KohyaNameMap`]) — the authoritative way;
//! - without a model, by a grammar of the SD1/SD2 diffusers UNet and CLIP text-encoder names
//!   ([`parse_kohya_name`]): a tokenizer that knows the multi-word segments (`down_blocks`,
//!   `to_q`, `time_emb_proj`, `linear_1`, ...) followed by a check that the dotted path is a
//!   module those models actually have. Anything else is an error, never a guess: a wrong path
//!   would make the module silently do nothing.
//!
//! SDXL kohya files name the UNet with the original sgm paths (`lora_unet_input_blocks_4_1_...`)
//! and the text encoders `lora_te1_`/`lora_te2_` ([`KohyaNaming::Sgm`], the SDXL family's naming
//! table). Against a model's targets they are looked up in the forward map (exact); without a
//! model the sgm path is tokenized, converted with the checkpoint loader's own key map in SDXL
//! base's layout ([`crate::load::ldm_keys::unet`]) and accepted only if converting back gives the
//! same name — every SDXL-family checkpoint (Pony, Illustrious, …) shares that layout.

use std::collections::HashMap;
use std::sync::LazyLock;

use regex::Regex;

use crate::lora::{LoraComponent, TargetInfo};

/// kohya prefix of UNet modules.
pub const PREFIX_UNET: &str = "lora_unet_";
/// kohya prefix of the SD1/SD2 text encoder's modules.
pub const PREFIX_TE: &str = "lora_te_";
/// kohya prefix of SDXL's first text encoder (CLIP-L).
pub const PREFIX_TE1: &str = "lora_te1_";
/// kohya prefix of SDXL's second text encoder (OpenCLIP-bigG).
pub const PREFIX_TE2: &str = "lora_te2_";

/// Why a kohya module name could not be turned into a module path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    /// Not a name of any module we know (of the model, or of any SD1/SD2/SDXL model).
    Unknown(String),
    /// A name of the other family than the model's (an SDXL name for an SD1/SD2 model or the
    /// reverse).
    WrongFamily(String),
}

/// The model family a LoRA's names belong to: SD1 and SD2 share their naming, SDXL has its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraFamily {
    /// SD1.x / SD2.x: diffusers module paths, `lora_te_`.
    Sd,
    /// SDXL: sgm UNet paths, `lora_te1_` / `lora_te2_`.
    Sdxl,
}

impl LoraFamily {
    /// How this family names kohya modules (SDXL: SDXL base's layout).
    pub fn kohya_naming(self) -> KohyaNaming {
        match self {
            Self::Sd => KohyaNaming::Diffusers,
            Self::Sdxl => KohyaNaming::Sgm(SgmLayout::sdxl_base()),
        }
    }

    /// The family of a kohya module name.
    pub fn of_kohya_name(name: &str) -> Self {
        if is_sdxl_name(name) {
            Self::Sdxl
        } else {
            Self::Sd
        }
    }
}

impl std::fmt::Display for LoraFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sd => "SD1/SD2",
            Self::Sdxl => "SDXL",
        })
    }
}

/// The kohya prefix of `component`. `sdxl` selects `lora_te1_` over `lora_te_` for the first text
/// encoder (the second one is always `lora_te2_`).
pub fn kohya_prefix(component: LoraComponent, sdxl: bool) -> &'static str {
    match component {
        LoraComponent::Unet => PREFIX_UNET,
        LoraComponent::TextEncoder if sdxl => PREFIX_TE1,
        LoraComponent::TextEncoder => PREFIX_TE,
        LoraComponent::TextEncoder2 => PREFIX_TE2,
    }
}

/// The layout facts SDXL's sgm UNet names depend on (see
/// [`crate::load::ldm_keys::unet_module_to_ldm`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SgmLayout {
    /// ResNets per down level (2 in every SDXL checkpoint).
    pub layers_per_block: usize,
    /// Per up block: whether it has transformers.
    pub up_attention: Vec<bool>,
}

impl SgmLayout {
    /// SDXL base and every model fine-tuned from it (Pony, Illustrious, …).
    pub fn sdxl_base() -> Self {
        Self {
            layers_per_block: 2,
            up_attention: vec![true, true, false],
        }
    }

    /// The layout of a UNet, read off its adaptable layers' paths.
    fn from_targets(targets: &[TargetInfo]) -> Self {
        let unet = || {
            targets
                .iter()
                .filter(|t| t.component == LoraComponent::Unet)
        };
        let layers_per_block = unet()
            .filter_map(|t| {
                let rest = t.path.strip_prefix("down_blocks.0.resnets.")?;
                rest.split_once('.')?.0.parse::<usize>().ok()
            })
            .max()
            .map_or(2, |m| m + 1);
        let ups = unet()
            .filter_map(|t| {
                let rest = t.path.strip_prefix("up_blocks.")?;
                rest.split_once('.')?.0.parse::<usize>().ok()
            })
            .max()
            .map_or(0, |m| m + 1);
        let up_attention = (0..ups)
            .map(|b| {
                let prefix = format!("up_blocks.{b}.attentions.");
                unet().any(|t| t.path.starts_with(&prefix))
            })
            .collect();
        Self {
            layers_per_block,
            up_attention,
        }
    }
}

/// How a family names LoRA modules in kohya files: part of the model-family seam.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum KohyaNaming {
    /// SD1/SD2: `lora_unet_` + the diffusers path, `lora_te_`.
    #[default]
    Diffusers,
    /// SDXL: `lora_unet_` + the sgm path, `lora_te1_` / `lora_te2_`.
    Sgm(SgmLayout),
}

impl KohyaNaming {
    /// The family whose naming this is.
    pub fn family(&self) -> LoraFamily {
        match self {
            Self::Diffusers => LoraFamily::Sd,
            Self::Sgm(_) => LoraFamily::Sdxl,
        }
    }

    /// The naming of the model whose adaptable layers are `targets`: SDXL's when its UNet
    /// has the added (pooled text + size) embedding or it has a second text encoder.
    pub fn from_targets(targets: &[TargetInfo]) -> Self {
        let sdxl = targets.iter().any(|t| {
            t.component == LoraComponent::TextEncoder2
                || (t.component == LoraComponent::Unet && t.path.starts_with("add_embedding."))
        });
        if sdxl {
            Self::Sgm(SgmLayout::from_targets(targets))
        } else {
            Self::Diffusers
        }
    }

    /// The kohya module name of `(component, path)`; `None` for a UNet path outside the
    /// sgm layout.
    pub fn name(&self, component: LoraComponent, path: &str) -> Option<String> {
        match (self, component) {
            (Self::Diffusers, _) => Some(kohya_name_with(component, path, false)),
            (Self::Sgm(layout), LoraComponent::Unet) => {
                let ldm = crate::load::ldm_keys::unet_module_to_ldm(
                    path,
                    layout.layers_per_block,
                    &layout.up_attention,
                )?;
                Some(format!("{PREFIX_UNET}{}", ldm.replace('.', "_")))
            }
            (Self::Sgm(_), _) => Some(kohya_name_with(component, path, true)),
        }
    }
}

/// The SD1/SD2 kohya name of a module: prefix + path with `.` → `_`.
pub fn kohya_name(component: LoraComponent, path: &str) -> String {
    kohya_name_with(component, path, false)
}

fn kohya_name_with(component: LoraComponent, path: &str, sdxl: bool) -> String {
    format!(
        "{}{}",
        kohya_prefix(component, sdxl),
        path.replace('.', "_")
    )
}

/// Path segments that themselves contain `_`, and the single-word ones, of the SD1/SD2 UNet and
/// CLIP text encoder. The tokenizer takes the longest match at each position.
const SEGMENTS: &[&str] = &[
    // UNet
    "down_blocks",
    "up_blocks",
    "mid_block",
    "attentions",
    "resnets",
    "transformer_blocks",
    "attn1",
    "attn2",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "ff",
    "net",
    "proj",
    "proj_in",
    "proj_out",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "downsamplers",
    "upsamplers",
    "conv",
    "conv_in",
    "conv_out",
    "time_embedding",
    "linear_1",
    "linear_2",
    // CLIP text encoder
    "text_model",
    "encoder",
    "layers",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "mlp",
    "fc1",
    "fc2",
    "embeddings",
    "token_embedding",
    "position_embedding",
    "text_projection",
    // SDXL's UNet in sgm paths
    "input_blocks",
    "middle_block",
    "output_blocks",
    "in_layers",
    "emb_layers",
    "out_layers",
    "skip_connection",
    "op",
    "time_embed",
    "label_emb",
    "out",
];

/// Longest multi-word segment, in `_`-separated words (`time_emb_proj`).
const MAX_SEGMENT_WORDS: usize = 3;

/// Every adaptable (2-D or 4-D weight) module path of an SD1/SD2/SDXL diffusers UNet (SDXL's
/// added-conditioning MLP `add_embedding` included).
static UNET_PATH: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^(?:(?:(?:down_blocks|up_blocks)\.\d+|mid_block)\.(?:attentions\.\d+\.(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:(?:attn1|attn2)\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2)))|resnets\.\d+\.(?:conv1|conv2|time_emb_proj|conv_shortcut))|down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv|conv_in|conv_out|time_embedding\.linear_[12]|add_embedding\.linear_[12])$",
    )
    .expect("static regex")
});

/// Every adaptable module path of a CLIP text encoder (transformers names).
static TEXT_ENCODER_PATH: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^text_model\.(?:encoder\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.(?:fc1|fc2))|embeddings\.(?:token_embedding|position_embedding))$",
    )
    .expect("static regex")
});

/// Whether `path` is a module path an SD1/SD2/SDXL `component` has (by the grammar, without a
/// model).
pub fn is_known_path(component: LoraComponent, path: &str) -> bool {
    match component {
        LoraComponent::Unet => UNET_PATH.is_match(path),
        LoraComponent::TextEncoder => TEXT_ENCODER_PATH.is_match(path),
        // OpenCLIP-bigG also has its pooled-output projection.
        LoraComponent::TextEncoder2 => {
            TEXT_ENCODER_PATH.is_match(path) || path == "text_projection"
        }
    }
}

/// Whether a diffusers module path (optionally `unet.`-prefixed) exists only in SDXL's UNet: the
/// added-conditioning MLP, or a transformer block after the first (SD1/SD2 have one per
/// transformer, SDXL two or ten).
pub fn path_is_sdxl_only(path: &str) -> bool {
    static SDXL_ONLY: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"(?:^|\.)(?:add_embedding\.|transformer_blocks\.[1-9])").expect("static regex")
    });
    SDXL_ONLY.is_match(path)
}

/// Whether a kohya module name is SDXL-style: sgm UNet names or `lora_te1_`/`lora_te2_`.
pub fn is_sdxl_name(name: &str) -> bool {
    if name.starts_with(PREFIX_TE1) || name.starts_with(PREFIX_TE2) {
        return true;
    }
    name.strip_prefix(PREFIX_UNET).is_some_and(|rest| {
        rest == "out_2"
            || [
                "input_blocks_",
                "middle_block_",
                "output_blocks_",
                "label_emb_",
                "time_embed_",
            ]
            .iter()
            .any(|p| rest.starts_with(p))
    })
}

/// The (component, diffusers path) of a kohya module name, by grammar (no model needed): SD1/SD2
/// names, and SDXL's in SDXL base's layout.
///
/// `lora_te_text_model_encoder_layers_0_mlp_fc1` → `(TextEncoder, text_model.encoder.layers.0.mlp.fc1)`;
/// `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q` →
/// `(Unet, down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q)`.
pub fn parse_kohya_name(name: &str) -> Result<(LoraComponent, String), NameError> {
    if is_sdxl_name(name) {
        return parse_sgm_name(name).ok_or_else(|| NameError::Unknown(name.to_string()));
    }
    let (component, rest) = if let Some(rest) = name.strip_prefix(PREFIX_UNET) {
        (LoraComponent::Unet, rest)
    } else if let Some(rest) = name.strip_prefix(PREFIX_TE) {
        (LoraComponent::TextEncoder, rest)
    } else {
        return Err(NameError::Unknown(name.to_string()));
    };
    let path = underscores_to_path(rest).ok_or_else(|| NameError::Unknown(name.to_string()))?;
    if is_known_path(component, &path) {
        Ok((component, path))
    } else {
        Err(NameError::Unknown(name.to_string()))
    }
}

/// An SDXL kohya name → (component, diffusers path), in SDXL base's layout; `None` unless the
/// path converts back to exactly `name`.
fn parse_sgm_name(name: &str) -> Option<(LoraComponent, String)> {
    for (prefix, component) in [
        (PREFIX_TE1, LoraComponent::TextEncoder),
        (PREFIX_TE2, LoraComponent::TextEncoder2),
    ] {
        if let Some(rest) = name.strip_prefix(prefix) {
            let path = underscores_to_path(rest)?;
            return is_known_path(component, &path).then_some((component, path));
        }
    }
    let ldm = underscores_to_path(name.strip_prefix(PREFIX_UNET)?)?;
    let layout = SgmLayout::sdxl_base();
    let crate::load::ldm_keys::Rename::To(targets) =
        crate::load::ldm_keys::unet(&format!("{ldm}.weight"), layout.layers_per_block)
    else {
        return None;
    };
    let [target] = &targets[..] else {
        return None;
    };
    let path = target.key.strip_suffix(".weight")?.to_string();
    let naming = KohyaNaming::Sgm(layout);
    (is_known_path(LoraComponent::Unet, &path)
        && naming.name(LoraComponent::Unet, &path).as_deref() == Some(name))
    .then_some((LoraComponent::Unet, path))
}

/// `down_blocks_0_attentions_1_proj_in` → `down_blocks.0.attentions.1.proj_in`, or `None` when a
/// word is neither a number nor (the start of) a known segment.
fn underscores_to_path(rest: &str) -> Option<String> {
    let words: Vec<&str> = rest.split('_').collect();
    let mut segments: Vec<String> = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let word = words[i];
        if !word.is_empty() && word.bytes().all(|b| b.is_ascii_digit()) {
            segments.push(word.to_string());
            i += 1;
            continue;
        }
        let max = MAX_SEGMENT_WORDS.min(words.len() - i);
        let (n, segment) = (1..=max)
            .rev()
            .map(|n| (n, words[i..i + n].join("_")))
            .find(|(_, candidate)| SEGMENTS.contains(&candidate.as_str()))?;
        i += n;
        segments.push(segment);
    }
    Some(segments.join("."))
}

/// Exact kohya name → (component, path) lookup, built forward from a model's targets.
#[derive(Debug, Clone, Default)]
pub struct KohyaNameMap {
    map: HashMap<String, (LoraComponent, String)>,
    family: Option<LoraFamily>,
}

impl KohyaNameMap {
    /// The names of every target, in the model's family naming ([`KohyaNaming::from_targets`]).
    pub fn from_targets(targets: &[TargetInfo]) -> Self {
        let naming = KohyaNaming::from_targets(targets);
        let map = targets
            .iter()
            .filter_map(|t| {
                let name = naming.name(t.component, &t.path)?;
                Some((name, (t.component, t.path.clone())))
            })
            .collect();
        Self {
            map,
            family: Some(naming.family()),
        }
    }

    /// The family of the model the map was built from.
    pub fn family(&self) -> Option<LoraFamily> {
        self.family
    }

    /// The module a kohya name stands for, if the model has it.
    pub fn lookup(&self, name: &str) -> Option<(LoraComponent, &str)> {
        self.map.get(name).map(|(c, p)| (*c, p.as_str()))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Resolves kohya names either exactly against `map` or, without one, by the grammar.
pub fn resolve_kohya_name(
    name: &str,
    map: Option<&KohyaNameMap>,
) -> Result<(LoraComponent, String), NameError> {
    match map {
        Some(map) => map
            .lookup(name)
            .map(|(c, p)| (c, p.to_string()))
            .ok_or_else(|| {
                if map
                    .family
                    .is_some_and(|f| f != LoraFamily::of_kohya_name(name))
                {
                    NameError::WrongFamily(name.to_string())
                } else {
                    NameError::Unknown(name.to_string())
                }
            }),
        None => parse_kohya_name(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar_examples() {
        let cases = [
            (
                "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q",
                "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
            ),
            (
                "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
                "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0",
            ),
            (
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
                "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
            ),
            (
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
                "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
            ),
            (
                "lora_unet_down_blocks_1_resnets_0_time_emb_proj",
                "down_blocks.1.resnets.0.time_emb_proj",
            ),
            (
                "lora_unet_up_blocks_0_upsamplers_0_conv",
                "up_blocks.0.upsamplers.0.conv",
            ),
            (
                "lora_unet_time_embedding_linear_1",
                "time_embedding.linear_1",
            ),
        ];
        for (name, path) in cases {
            assert_eq!(
                parse_kohya_name(name),
                Ok((LoraComponent::Unet, path.to_string())),
                "{name}"
            );
            assert_eq!(kohya_name(LoraComponent::Unet, path), name);
        }
        assert_eq!(
            parse_kohya_name("lora_te_text_model_encoder_layers_11_self_attn_out_proj"),
            Ok((
                LoraComponent::TextEncoder,
                "text_model.encoder.layers.11.self_attn.out_proj".to_string()
            ))
        );
    }

    #[test]
    fn grammar_rejects() {
        for name in [
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_x",
            "lora_unet_down_blocks_0_attentions_0_to_q",
            "lora_unet_",
            "lora_unet_down_blocks__0",
            "lora_foo_bar",
            "lora_te_text_model_encoder_layers_0_mlp_fc3",
        ] {
            assert_eq!(
                parse_kohya_name(name),
                Err(NameError::Unknown(name.to_string()))
            );
        }
        for name in [
            // SDXL base's output block 2 has attention: its upsampler is module 2, not 1.
            "lora_unet_output_blocks_2_1_conv",
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_x",
            "lora_unet_input_blocks_4_3_proj_in",
            "lora_te2_text_model_encoder_layers_0_mlp_fc3",
        ] {
            assert_eq!(
                parse_kohya_name(name),
                Err(NameError::Unknown(name.to_string())),
                "{name}"
            );
        }
    }

    #[test]
    fn sdxl_grammar_examples() {
        let cases = [
            (
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                LoraComponent::Unet,
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            ),
            (
                "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj",
                LoraComponent::Unet,
                "mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj",
            ),
            (
                "lora_unet_output_blocks_5_1_proj_out",
                LoraComponent::Unet,
                "up_blocks.1.attentions.2.proj_out",
            ),
            (
                "lora_unet_output_blocks_2_2_conv",
                LoraComponent::Unet,
                "up_blocks.0.upsamplers.0.conv",
            ),
            (
                "lora_unet_input_blocks_3_0_op",
                LoraComponent::Unet,
                "down_blocks.0.downsamplers.0.conv",
            ),
            (
                "lora_unet_output_blocks_8_0_skip_connection",
                LoraComponent::Unet,
                "up_blocks.2.resnets.2.conv_shortcut",
            ),
            (
                "lora_unet_input_blocks_1_0_emb_layers_1",
                LoraComponent::Unet,
                "down_blocks.0.resnets.0.time_emb_proj",
            ),
            (
                "lora_unet_label_emb_0_2",
                LoraComponent::Unet,
                "add_embedding.linear_2",
            ),
            (
                "lora_unet_time_embed_0",
                LoraComponent::Unet,
                "time_embedding.linear_1",
            ),
            ("lora_unet_out_2", LoraComponent::Unet, "conv_out"),
            (
                "lora_te1_text_model_encoder_layers_0_mlp_fc1",
                LoraComponent::TextEncoder,
                "text_model.encoder.layers.0.mlp.fc1",
            ),
            (
                "lora_te2_text_model_encoder_layers_31_self_attn_out_proj",
                LoraComponent::TextEncoder2,
                "text_model.encoder.layers.31.self_attn.out_proj",
            ),
        ];
        let naming = LoraFamily::Sdxl.kohya_naming();
        for (name, component, path) in cases {
            assert_eq!(
                parse_kohya_name(name),
                Ok((component, path.to_string())),
                "{name}"
            );
            assert_eq!(naming.name(component, path).as_deref(), Some(name));
            assert_eq!(LoraFamily::of_kohya_name(name), LoraFamily::Sdxl);
        }
    }
}
