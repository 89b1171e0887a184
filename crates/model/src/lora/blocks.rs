//! kohya's UNet blocks, for per-block learning rates and ranks
//! (`down_lr_weight`, `mid_lr_weight`, `up_lr_weight`, `block_dims`,
//! `block_alphas`, `conv_block_dims`, `conv_block_alphas`).
//!
//! kohya numbers the UNet's blocks as the original (LDM/sgm) checkpoint
//! does, and every per-block list is indexed by that number:
//!
//! - **SD1/SD2**: 25 blocks — `IN00`–`IN11` (the 12 `input_blocks`;
//!   `IN00` is `conv_in`, which never has a LoRA), `MID`, `OUT00`–`OUT11`.
//!   A diffusers path `down_blocks.i.{resnets|attentions}.j` is `IN(1+3i+j)`,
//!   `down_blocks.i.downsamplers.0` is `IN(3+3i)`; `up_blocks.i.…​.j` is
//!   `OUT(3i+j)` with the upsampler in `OUT(3i+2)`; `mid_block` is `MID`.
//! - **SDXL**: 23 blocks — `BASE` (time and size embeddings), `IN00`–`IN08`,
//!   `MID00`–`MID02`, `OUT00`–`OUT08`, `OUT` (`out.*`); the number of an
//!   sgm name `input_blocks_N…` is `1+N`, `middle_block_N` `10+N`,
//!   `output_blocks_N` `13+N`.
//!
//! The down list covers `IN…`, the mid list `MID…`, the up list `OUT…`;
//! `BASE` and SDXL's `OUT` always have weight 1.

use super::format::KohyaNaming;
use super::{LoraComponent, TargetInfo};

/// The block layout of a model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    /// Number of `IN`/`OUT` blocks (12 SD1/SD2, 9 SDXL).
    pub down_or_up: usize,
    /// Number of `MID` blocks (1 SD1/SD2, 3 SDXL).
    pub mid: usize,
    /// SDXL's extra `BASE` and `OUT` blocks at either end.
    pub sdxl: bool,
}

impl BlockLayout {
    pub const SD: BlockLayout = BlockLayout {
        down_or_up: 12,
        mid: 1,
        sdxl: false,
    };
    pub const SDXL: BlockLayout = BlockLayout {
        down_or_up: 9,
        mid: 3,
        sdxl: true,
    };

    /// The layout of a naming (SDXL for sgm names).
    pub fn of(naming: &KohyaNaming) -> Self {
        match naming {
            KohyaNaming::Diffusers => Self::SD,
            KohyaNaming::Sgm(_) => Self::SDXL,
        }
    }

    /// How many blocks a full per-block list has (25 SD1/SD2, 23 SDXL).
    pub fn len(&self) -> usize {
        2 * self.down_or_up + self.mid + if self.sdxl { 2 } else { 0 }
    }

    /// Never empty; for clippy's `len` convention.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The blocks, for messages: `IN00–IN11, MID, OUT00–OUT11`.
    pub fn describe(&self) -> String {
        let span =
            |from: usize, n: usize| format!("{}–{}", self.name(from), self.name(from + n - 1));
        let mid = if self.mid == 1 {
            self.name(self.first_mid())
        } else {
            span(self.first_mid(), self.mid)
        };
        let core = format!(
            "{}, {mid}, {}",
            span(self.first_in(), self.down_or_up),
            span(self.first_out(), self.down_or_up)
        );
        if self.sdxl {
            format!("BASE, {core}, OUT")
        } else {
            core
        }
    }

    /// Index of the first `IN` block.
    pub fn first_in(&self) -> usize {
        usize::from(self.sdxl)
    }

    /// Index of the first `MID` block.
    pub fn first_mid(&self) -> usize {
        self.first_in() + self.down_or_up
    }

    /// Index of the first `OUT` block.
    pub fn first_out(&self) -> usize {
        self.first_mid() + self.mid
    }

    /// The block's kohya name (`IN04`, `MID`, `MID01`, `OUT11`, `BASE`, `OUT`).
    pub fn name(&self, index: usize) -> String {
        if self.sdxl && index == 0 {
            return "BASE".into();
        }
        if self.sdxl && index == self.len() - 1 {
            return "OUT".into();
        }
        if index < self.first_mid() {
            format!("IN{:02}", index - self.first_in())
        } else if index < self.first_out() {
            if self.mid == 1 {
                "MID".into()
            } else {
                format!("MID{:02}", index - self.first_mid())
            }
        } else {
            format!("OUT{:02}", index - self.first_out())
        }
    }
}

/// Number after `prefix` in `text` (`"down_blocks."` in `down_blocks.2.x`).
fn number_after(text: &str, prefix: &str) -> Option<usize> {
    let rest = text.strip_prefix(prefix)?;
    let end = rest.find(['.', '_']).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// kohya's block number of a UNet target (None for text encoders and for
/// layers outside every block, e.g. SD1's `conv_in` and `time_embedding`).
pub fn block_index(target: &TargetInfo, naming: &KohyaNaming) -> Option<usize> {
    if target.component != LoraComponent::Unet {
        return None;
    }
    let layout = BlockLayout::of(naming);
    if layout.sdxl {
        let name = naming.name(LoraComponent::Unet, &target.path)?;
        let name = name.strip_prefix("lora_unet_")?;
        if name.starts_with("time_embed_") || name.starts_with("label_emb_") {
            return Some(0);
        }
        if let Some(n) = number_after(name, "input_blocks_") {
            return (n < layout.down_or_up).then_some(layout.first_in() + n);
        }
        if let Some(n) = number_after(name, "middle_block_") {
            return (n < layout.mid).then_some(layout.first_mid() + n);
        }
        if let Some(n) = number_after(name, "output_blocks_") {
            return (n < layout.down_or_up).then_some(layout.first_out() + n);
        }
        return name.starts_with("out_").then_some(layout.len() - 1);
    }
    let path = target.path.as_str();
    if path.starts_with("mid_block.") {
        return Some(layout.first_mid());
    }
    let (up, rest) = if let Some(r) = path.strip_prefix("down_blocks.") {
        (false, r)
    } else if let Some(r) = path.strip_prefix("up_blocks.") {
        (true, r)
    } else {
        return None;
    };
    let (i, rest) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let (kind, rest) = rest.split_once('.')?;
    let j: usize = number_after(rest, "")?;
    let within = match kind {
        "resnets" | "attentions" => 3 * i + j,
        "downsamplers" | "upsamplers" => 3 * i + 2,
        _ => return None,
    };
    let index = if up {
        layout.first_out() + within
    } else {
        layout.first_in() + 1 + within
    };
    (index < layout.len()).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::LayerKind;
    use crate::lora::format::SgmLayout;

    fn unet(path: &str) -> TargetInfo {
        TargetInfo {
            component: LoraComponent::Unet,
            path: path.into(),
            kind: LayerKind::Linear,
            in_features: 1,
            out_features: 1,
        }
    }

    #[test]
    fn sd_blocks_follow_the_ldm_numbering() {
        let n = KohyaNaming::Diffusers;
        let at = |p: &str| block_index(&unet(p), &n).map(|i| BlockLayout::SD.name(i));
        let t = "transformer_blocks.0.attn1.to_q";
        assert_eq!(
            at(&format!("down_blocks.0.attentions.0.{t}")).as_deref(),
            Some("IN01")
        );
        assert_eq!(
            at(&format!("down_blocks.1.attentions.1.{t}")).as_deref(),
            Some("IN05")
        );
        assert_eq!(
            at("down_blocks.2.downsamplers.0.conv").as_deref(),
            Some("IN09")
        );
        assert_eq!(at("down_blocks.3.resnets.1.conv1").as_deref(), Some("IN11"));
        assert_eq!(
            at(&format!("mid_block.attentions.0.{t}")).as_deref(),
            Some("MID")
        );
        assert_eq!(at("up_blocks.0.resnets.2.conv1").as_deref(), Some("OUT02"));
        assert_eq!(
            at("up_blocks.0.upsamplers.0.conv").as_deref(),
            Some("OUT02")
        );
        assert_eq!(
            at(&format!("up_blocks.3.attentions.2.{t}")).as_deref(),
            Some("OUT11")
        );
        assert_eq!(at("conv_in"), None);
        assert_eq!(at("time_embedding.linear_1"), None);
        assert_eq!(BlockLayout::SD.len(), 25);
    }

    #[test]
    fn block_lists_resolve_as_kohya_spreads_them() {
        let mut notes = Vec::new();
        let s = BlockSettings {
            down_lr_weight: Some(BlockWeights::Shape("linear+0.5".into())),
            mid_lr_weight: Some(BlockWeights::List(vec![0.0])),
            up_lr_weight: Some(BlockWeights::List(vec![0.2, 2.0])),
            lr_zero_threshold: 0.25,
            ..Default::default()
        };
        let w = s.lr_weights(BlockLayout::SD, &mut notes).unwrap().unwrap();
        assert_eq!(w.len(), 25);
        assert!((w[0] - 0.5).abs() < 1e-12 && (w[11] - 1.5).abs() < 1e-12);
        assert_eq!(w[12], 0.0, "mid");
        assert_eq!(
            &w[13..16],
            &[0.0, 2.0, 1.0],
            "0.2 ≤ threshold; filled with 1"
        );
        assert!(notes[0].contains("up_lr_weight has 2 of 12"), "{notes:?}");
        let sdxl = s
            .lr_weights(BlockLayout::SDXL, &mut notes)
            .unwrap()
            .unwrap();
        assert_eq!((sdxl.len(), sdxl[0], sdxl[22]), (23, 1.0, 1.0));
        assert_eq!(BlockLayout::SD.describe(), "IN00–IN11, MID, OUT00–OUT11");
        assert_eq!(
            BlockLayout::SDXL.describe(),
            "BASE, IN00–IN08, MID00–MID02, OUT00–OUT08, OUT"
        );
        let long = BlockSettings {
            down_lr_weight: Some(BlockWeights::List(vec![1.0; 13])),
            ..Default::default()
        };
        assert!(long.lr_weights(BlockLayout::SD, &mut notes).is_err());
    }

    #[test]
    fn sdxl_blocks_follow_the_sgm_numbering() {
        let n = KohyaNaming::Sgm(SgmLayout::sdxl_base());
        let at = |p: &str| block_index(&unet(p), &n).map(|i| BlockLayout::SDXL.name(i));
        let t = "transformer_blocks.0.attn1.to_q";
        // diffusers down_blocks.1.attentions.0 is sgm input_blocks.4.1.
        assert_eq!(
            at(&format!("down_blocks.1.attentions.0.{t}")).as_deref(),
            Some("IN04")
        );
        assert_eq!(
            at(&format!("mid_block.attentions.0.{t}")).as_deref(),
            Some("MID01")
        );
        assert_eq!(
            at(&format!("up_blocks.0.attentions.2.{t}")).as_deref(),
            Some("OUT02")
        );
        assert_eq!(at("time_embedding.linear_1").as_deref(), Some("BASE"));
        assert_eq!(at("conv_out").as_deref(), Some("OUT"));
        assert_eq!(BlockLayout::SDXL.len(), 23);
    }
}

/// A per-block list as written: numbers, or one of kohya's shapes
/// (`sine`, `cosine`, `linear`, `reverse_linear`, `zeros`) with an optional
/// `+offset` (`"cosine+0.25"`).
#[derive(Debug, Clone, PartialEq)]
pub enum BlockWeights {
    List(Vec<f64>),
    Shape(String),
}

/// The shapes [`BlockWeights::Shape`] names.
pub const WEIGHT_SHAPES: [&str; 5] = ["sine", "cosine", "linear", "reverse_linear", "zeros"];

impl BlockWeights {
    /// The `n` values (a shape is spread over `n` blocks as kohya spreads it).
    fn values(&self, n: usize, key: &str) -> Result<Vec<f64>, String> {
        match self {
            BlockWeights::List(v) => Ok(v.clone()),
            BlockWeights::Shape(s) => {
                let (name, offset) = match s.split_once('+') {
                    Some((name, off)) => (
                        name.trim(),
                        off.trim().parse::<f64>().map_err(|_| {
                            format!("{key} = {s:?}: the part after + must be a number")
                        })?,
                    ),
                    None => (s.trim(), 0.0),
                };
                let last = (n.max(2) - 1) as f64;
                let quarter_sine = |i: usize| (std::f64::consts::FRAC_PI_2 * i as f64 / last).sin();
                let v: Vec<f64> = match name {
                    "sine" => (0..n).map(quarter_sine).collect(),
                    "cosine" => (0..n).rev().map(quarter_sine).collect(),
                    "linear" => (0..n).map(|i| i as f64 / last).collect(),
                    "reverse_linear" => (0..n).rev().map(|i| i as f64 / last).collect(),
                    "zeros" => vec![0.0; n],
                    _ => {
                        return Err(format!(
                            "{key} = {s:?}: not a list of numbers or one of {}",
                            WEIGHT_SHAPES.join(", ")
                        ));
                    }
                };
                Ok(v.into_iter().map(|x| x + offset).collect())
            }
        }
    }
}

/// Per-block settings as the user gave them (kohya's network args).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockSettings {
    pub down_lr_weight: Option<BlockWeights>,
    pub mid_lr_weight: Option<BlockWeights>,
    pub up_lr_weight: Option<BlockWeights>,
    /// Blocks whose learning-rate weight is at most this get no LoRA.
    pub lr_zero_threshold: f64,
    pub block_dims: Vec<usize>,
    pub block_alphas: Vec<f32>,
    pub conv_block_dims: Vec<usize>,
    pub conv_block_alphas: Vec<f32>,
}

impl BlockSettings {
    /// Whether nothing is set (every block as the network's defaults).
    pub fn is_empty(&self) -> bool {
        self.down_lr_weight.is_none()
            && self.mid_lr_weight.is_none()
            && self.up_lr_weight.is_none()
            && self.block_dims.is_empty()
            && self.block_alphas.is_empty()
            && self.conv_block_dims.is_empty()
            && self.conv_block_alphas.is_empty()
    }

    /// The learning-rate weight of every block (`layout.len()` values), or
    /// None when no lr weight is set. Short lists are filled with 1 (as
    /// kohya, with a note); long ones are refused.
    pub fn lr_weights(
        &self,
        layout: BlockLayout,
        notes: &mut Vec<String>,
    ) -> Result<Option<Vec<f64>>, String> {
        if self.down_lr_weight.is_none()
            && self.mid_lr_weight.is_none()
            && self.up_lr_weight.is_none()
        {
            return Ok(None);
        }
        let family = if layout.sdxl { "an SDXL" } else { "an SD1/SD2" };
        let mut part = |w: &Option<BlockWeights>, n: usize, key: &str, names: String| match w {
            None => Ok(vec![1.0; n]),
            Some(w) => {
                let mut v = w.values(n, key)?;
                if v.len() > n {
                    return Err(format!(
                        "{key} has {} values; {family} UNet has {n} ({names})",
                        v.len()
                    ));
                }
                if v.len() < n {
                    notes.push(format!(
                        "{key} has {} of {n} values ({names}); the rest are 1",
                        v.len()
                    ));
                    v.resize(n, 1.0);
                }
                if let Some(bad) = v.iter().find(|x| !x.is_finite() || **x < 0.0) {
                    return Err(format!("{key}: {bad} is not a weight ≥ 0"));
                }
                Ok(v)
            }
        };
        let span =
            |from: usize, n: usize| format!("{}–{}", layout.name(from), layout.name(from + n - 1));
        let down = part(
            &self.down_lr_weight,
            layout.down_or_up,
            "network.down_lr_weight",
            span(layout.first_in(), layout.down_or_up),
        )?;
        let mid = part(
            &self.mid_lr_weight,
            layout.mid,
            "network.mid_lr_weight",
            if layout.mid == 1 {
                "MID".into()
            } else {
                span(layout.first_mid(), layout.mid)
            },
        )?;
        let up = part(
            &self.up_lr_weight,
            layout.down_or_up,
            "network.up_lr_weight",
            span(layout.first_out(), layout.down_or_up),
        )?;
        let mut all = Vec::with_capacity(layout.len());
        if layout.sdxl {
            all.push(1.0);
        }
        all.extend(down);
        all.extend(mid);
        all.extend(up);
        if layout.sdxl {
            all.push(1.0);
        }
        Ok(Some(
            all.into_iter()
                .map(|w| if w > self.lr_zero_threshold { w } else { 0.0 })
                .collect(),
        ))
    }
}

/// A layer's rank/alpha and learning-rate weight from its block.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BlockParams {
    /// Rank 0: the block gets no LoRA.
    pub rank_alpha: super::targets::RankAlpha,
    /// Multiplies the UNet learning rate.
    pub lr_weight: f64,
}

/// Resolves `settings` against a model's `targets` into `spec`'s per-layer
/// overrides ([`super::targets::TargetSpec::block_params`]). Returns notes:
/// lists filled up, and values given to blocks in which the preset and
/// patterns select no layer (so they do nothing).
pub fn apply_blocks(
    spec: &mut super::targets::TargetSpec,
    settings: &BlockSettings,
    targets: &[TargetInfo],
) -> Result<Vec<String>, String> {
    use super::targets::{RankAlpha, TargetGroup, TargetSpec};
    spec.block_params.clear();
    let mut notes = Vec::new();
    if settings.is_empty() {
        return Ok(notes);
    }
    let naming = KohyaNaming::from_targets(targets);
    let layout = BlockLayout::of(&naming);
    let family = if layout.sdxl { "an SDXL" } else { "an SD1/SD2" };
    let lr = settings.lr_weights(layout, &mut notes)?;
    let full = |key: &str, n: usize| -> Result<(), String> {
        if n != 0 && n != layout.len() {
            return Err(format!(
                "{key} has {n} values; {family} UNet has {} blocks ({}{})",
                layout.len(),
                layout.describe(),
                if layout.sdxl {
                    ""
                } else {
                    "; IN00 never has a LoRA"
                }
            ));
        }
        Ok(())
    };
    full("network.block_dims", settings.block_dims.len())?;
    full("network.block_alphas", settings.block_alphas.len())?;
    full("network.conv_block_dims", settings.conv_block_dims.len())?;
    full(
        "network.conv_block_alphas",
        settings.conv_block_alphas.len(),
    )?;
    if !settings.block_alphas.is_empty() && settings.block_dims.is_empty() {
        return Err("network.block_alphas needs network.block_dims".into());
    }
    if !settings.conv_block_alphas.is_empty() && settings.conv_block_dims.is_empty() {
        return Err("network.conv_block_alphas needs network.conv_block_dims".into());
    }
    let mut used = vec![false; layout.len()];
    for t in targets {
        if !spec.selects(t) {
            continue;
        }
        let Some(i) = block_index(t, &naming) else {
            continue;
        };
        used[i] = true;
        let base = spec.params(t);
        let (dims, alphas) = match TargetSpec::group(t) {
            TargetGroup::UnetConv => (&settings.conv_block_dims, &settings.conv_block_alphas),
            _ => (&settings.block_dims, &settings.block_alphas),
        };
        let rank_alpha = if dims.is_empty() {
            base
        } else {
            RankAlpha {
                rank: dims[i],
                alpha: alphas.get(i).copied().unwrap_or(base.alpha),
            }
        };
        let lr_weight = lr.as_ref().map_or(1.0, |w| w[i]);
        let rank_alpha = if lr_weight == 0.0 {
            RankAlpha {
                rank: 0,
                ..rank_alpha
            }
        } else {
            rank_alpha
        };
        spec.block_params.insert(
            (t.component, t.path.clone()),
            BlockParams {
                rank_alpha,
                lr_weight,
            },
        );
    }
    let idle = |i: usize| !used[i];
    if let Some(w) = &lr {
        let named: Vec<String> = (0..layout.len())
            .filter(|&i| idle(i) && w[i] != 1.0)
            .map(|i| format!("{} = {:.3}", layout.name(i), w[i]))
            .collect();
        if !named.is_empty() {
            notes.push(format!(
                "block learning-rate weights for blocks without a LoRA layer (preset {}) do \
                 nothing: {}",
                spec.preset,
                named.join(", ")
            ));
        }
    }
    for (key, dims, base) in [
        (
            "network.block_dims",
            &settings.block_dims,
            spec.unet_linear.rank,
        ),
        (
            "network.conv_block_dims",
            &settings.conv_block_dims,
            spec.unet_conv.rank,
        ),
    ] {
        let named: Vec<String> = dims
            .iter()
            .enumerate()
            .filter(|&(i, &d)| idle(i) && d != 0 && d != base)
            .map(|(i, d)| format!("{} = {d}", layout.name(i)))
            .collect();
        if !named.is_empty() {
            notes.push(format!(
                "{key}: ranks for blocks without a LoRA layer (preset {}) do nothing: {}",
                spec.preset,
                named.join(", ")
            ));
        }
    }
    if !spec.block_params.values().any(|p| p.rank_alpha.rank > 0)
        && !targets
            .iter()
            .any(|t| t.component != LoraComponent::Unet && spec.selects(t))
    {
        return Err(
            "the block settings leave no layer to train (every block's rank or \
                    learning-rate weight is 0)"
                .into(),
        );
    }
    Ok(notes)
}
