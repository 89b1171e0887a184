//! The rename table: original LDM / OpenCLIP key names → diffusers / transformers names.
//!
//! This is the only place that knows both naming schemes. Each function takes a key *without*
//! its component prefix (see the `*_PREFIX` constants) and returns the diffusers name(s), so it
//! can be tested on plain strings. The mapping mirrors diffusers' `convert_from_ckpt.py`
//! (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
//! `convert_open_clip_checkpoint`), including its choices:
//!
//! * VAE mid-block attention: LDM stores q/k/v/proj_out as 1×1 convs `[c, c, 1, 1]`; diffusers
//!   uses Linear `[c, c]` ([`Conversion::ConvToLinear`]).
//! * OpenCLIP stacks q, k, v in one `in_proj_weight`/`in_proj_bias` along dim 0; diffusers splits
//!   them ([`Conversion::Chunk`]).
//! * SD2 conditions on OpenCLIP's *penultimate* layer, and diffusers' conversion builds a
//!   `CLIPTextModel` with `num_hidden_layers = layers − 1`: the last resblock and the
//!   `text_projection` are not part of the converted model, so they are [`Rename::Drop`]ped here.
//!   Its final LayerNorm (`ln_final`) is kept: OpenCLIP applies it after the penultimate layer,
//!   which is what `CLIPTextModel`'s `final_layer_norm` then does.
//! * SDXL's second encoder (OpenCLIP-bigG) keeps every layer — SDXL reads the penultimate hidden
//!   state *and* the pooled output of the last — and its `text_projection` becomes
//!   `CLIPTextModelWithProjection`'s Linear `text_projection.weight`, the transpose of the stored
//!   matrix ([`open_clip_full`]).
//! * SDXL's `label_emb.0.{0,2}` (the MLP over the pooled embedding and size/crop ids) is
//!   diffusers' `add_embedding.linear_{1,2}`.

/// Prefix of UNet keys in a single-file checkpoint.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Prefix of VAE keys.
pub const VAE_PREFIX: &str = "first_stage_model.";
/// Prefix of SD1's CLIP-L text encoder (transformers layout inside).
pub const SD1_TEXT_PREFIX: &str = "cond_stage_model.transformer.";
/// Prefix of SD2's OpenCLIP-H text encoder.
pub const SD2_TEXT_PREFIX: &str = "cond_stage_model.model.";
/// Prefix of SDXL's first text encoder (CLIP-L, transformers layout inside).
pub const SDXL_TEXT_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// Prefix of SDXL's second text encoder (OpenCLIP-bigG).
pub const SDXL_TEXT_2_PREFIX: &str = "conditioner.embedders.1.model.";
/// Prefix of the SDXL refiner's only text encoder (OpenCLIP-bigG; diffusers' `text_encoder_2`).
pub const SDXL_REFINER_TEXT_2_PREFIX: &str = "conditioner.embedders.0.model.";

/// How the converted tensor's bytes relate to the source tensor's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// The same tensor.
    Same,
    /// A 1×1 conv weight `[o, i, 1, 1]` viewed as a Linear weight `[o, i]` (same bytes).
    ConvToLinear,
    /// Chunk `index` of `of` equal chunks along dim 0.
    Chunk { index: usize, of: usize },
    /// The transpose of a 2-D tensor (OpenCLIP's `text_projection`, stored `[in, out]`).
    Transpose,
}

/// One converted tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub key: String,
    pub conversion: Conversion,
}

/// What becomes of one source key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rename {
    /// Converted to these tensors (one, or three for a stacked q/k/v).
    To(Vec<Target>),
    /// Deliberately not part of the converted model (a buffer, or a layer the model does not
    /// use); the reason is for notes.
    Drop(&'static str),
    /// A key we do not recognise.
    Unknown,
}

impl Rename {
    fn same(key: String) -> Self {
        Rename::To(vec![Target {
            key,
            conversion: Conversion::Same,
        }])
    }
}

/// `"{prefix}{N}.{rest}"` → `(N, rest)`.
fn split_index<'a>(key: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let tail = key.strip_prefix(prefix)?;
    let (number, rest) = tail.split_once('.')?;
    Some((number.parse().ok()?, rest))
}

/// Buffers that some checkpoints save next to parameters. They are never model weights, so
/// they are neither converted nor counted as parameters.
pub fn is_buffer(key: &str) -> bool {
    key.ends_with("position_ids") || key.ends_with("attn_mask") || key.ends_with("logit_scale")
}

// ---------------------------------------------------------------------------------------------
// UNet
// ---------------------------------------------------------------------------------------------

/// LDM ResBlock internals ↔ diffusers `ResnetBlock2D` names.
const RESNET_NAMES: [(&str, &str); 6] = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
];

/// LDM ResBlock internals → diffusers `ResnetBlock2D` names.
fn unet_resnet(rest: &str) -> Option<String> {
    RESNET_NAMES
        .iter()
        .find_map(|(ldm, diffusers)| rest.strip_prefix(ldm).map(|p| format!("{diffusers}{p}")))
}

/// Converts a UNet key (after [`UNET_PREFIX`]). `layers_per_block` is the number of ResBlocks
/// per down level: LDM numbers `input_blocks`/`output_blocks` flat, `layers_per_block + 1` per
/// level (the extra one is the downsampler going down, the extra ResBlock going up).
///
/// Inside a SpatialTransformer (`norm`, `proj_in`, `transformer_blocks.K.attn1.to_q`, ...) the
/// names are already diffusers', so only the block address changes.
pub fn unet(key: &str, layers_per_block: usize) -> Rename {
    let per_level = layers_per_block + 1;
    let resnet = |address: String, rest: &str| match unet_resnet(rest) {
        Some(inner) => Rename::same(format!("{address}.{inner}")),
        None => Rename::Unknown,
    };
    for (ldm, diffusers) in [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ] {
        if let Some(p) = key.strip_prefix(ldm) {
            return Rename::same(format!("{diffusers}{p}"));
        }
    }
    if let Some((i, rest)) = split_index(key, "input_blocks.") {
        let Some((j, rest)) = split_index(rest, "") else {
            return Rename::Unknown;
        };
        if i == 0 {
            return Rename::Unknown;
        }
        let (block, layer) = ((i - 1) / per_level, (i - 1) % per_level);
        return match j {
            0 => match rest.strip_prefix("op.") {
                Some(p) => Rename::same(format!("down_blocks.{block}.downsamplers.0.conv.{p}")),
                None => resnet(format!("down_blocks.{block}.resnets.{layer}"), rest),
            },
            1 => Rename::same(format!("down_blocks.{block}.attentions.{layer}.{rest}")),
            _ => Rename::Unknown,
        };
    }
    if let Some((j, rest)) = split_index(key, "middle_block.") {
        return match j {
            0 => resnet("mid_block.resnets.0".into(), rest),
            1 => Rename::same(format!("mid_block.attentions.0.{rest}")),
            2 => resnet("mid_block.resnets.1".into(), rest),
            _ => Rename::Unknown,
        };
    }
    if let Some((i, rest)) = split_index(key, "output_blocks.") {
        let Some((j, rest)) = split_index(rest, "") else {
            return Rename::Unknown;
        };
        let (block, layer) = (i / per_level, i % per_level);
        // Index 1 is the SpatialTransformer when the level has attention, else the Upsample
        // (whose only tensors are `conv.*`); index 2 is then the Upsample.
        return match (j, rest.strip_prefix("conv.")) {
            (0, _) => resnet(format!("up_blocks.{block}.resnets.{layer}"), rest),
            (1 | 2, Some(p)) => Rename::same(format!("up_blocks.{block}.upsamplers.0.conv.{p}")),
            (1, None) => Rename::same(format!("up_blocks.{block}.attentions.{layer}.{rest}")),
            _ => Rename::Unknown,
        };
    }
    Rename::Unknown
}

/// The original (sgm/LDM) address of a diffusers UNet *module* path — the inverse of [`unet`]
/// for Linear/Conv2d modules, used for SDXL's kohya LoRA names
/// (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` →
/// `input_blocks.4.1.transformer_blocks.0.attn1.to_q`). `up_attention[b]`: whether up block `b`
/// has transformers (its upsampler is then the block's third module, else its second). `None`
/// for a path outside the UNet's layout.
pub fn unet_module_to_ldm(
    path: &str,
    layers_per_block: usize,
    up_attention: &[bool],
) -> Option<String> {
    let per_level = layers_per_block + 1;
    for (diffusers, ldm) in [
        ("conv_in", "input_blocks.0.0"),
        ("conv_out", "out.2"),
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
    ] {
        if path == diffusers {
            return Some(ldm.to_string());
        }
    }
    // A ResNet's layer inside its block: the inverse of `unet_resnet`.
    let resnet = |address: String, rest: &str| {
        let (ldm, _) = RESNET_NAMES
            .iter()
            .find(|(_, diffusers)| diffusers.strip_suffix('.') == Some(rest))?;
        Some(format!("{address}.{}", ldm.trim_end_matches('.')))
    };
    // `resnets.{l}.…` or `attentions.{l}.…` of a block with `layers` slots,
    // slot `l` being the LDM block `slot(l)` (ResNet first, transformer second).
    let in_block = |rest: &str, layers: usize, slot: &dyn Fn(usize) -> String| {
        if let Some((l, rest)) = split_index(rest, "resnets.") {
            return (l < layers)
                .then(|| resnet(format!("{}.0", slot(l)), rest))
                .flatten();
        }
        let (l, rest) = split_index(rest, "attentions.")?;
        (l < layers).then(|| format!("{}.1.{rest}", slot(l)))
    };
    if let Some((b, rest)) = split_index(path, "down_blocks.") {
        if rest == "downsamplers.0.conv" {
            return Some(format!("input_blocks.{}.0.op", (b + 1) * per_level));
        }
        return in_block(rest, layers_per_block, &|l| {
            format!("input_blocks.{}", 1 + b * per_level + l)
        });
    }
    if let Some(rest) = path.strip_prefix("mid_block.") {
        if let Some((l, rest)) = split_index(rest, "resnets.") {
            return (l < 2)
                .then(|| resnet(format!("middle_block.{}", 2 * l), rest))
                .flatten();
        }
        if let Some((0, rest)) = split_index(rest, "attentions.") {
            return Some(format!("middle_block.1.{rest}"));
        }
        return None;
    }
    let (b, rest) = split_index(path, "up_blocks.")?;
    if rest == "upsamplers.0.conv" {
        let index = if *up_attention.get(b)? { 2 } else { 1 };
        return Some(format!(
            "output_blocks.{}.{index}.conv",
            b * per_level + layers_per_block
        ));
    }
    in_block(rest, per_level, &|l| {
        format!("output_blocks.{}", b * per_level + l)
    })
}

// ---------------------------------------------------------------------------------------------
// VAE
// ---------------------------------------------------------------------------------------------

/// Converts a VAE key (after [`VAE_PREFIX`]). `num_levels` is the number of resolution levels
/// (`len(block_out_channels)`): LDM numbers the decoder's `up` levels from the lowest
/// resolution's *opposite* end, diffusers' `up_blocks` from the lowest resolution, so
/// `decoder.up.{i}` is `decoder.up_blocks.{num_levels - 1 - i}`.
pub fn vae(key: &str, num_levels: usize) -> Rename {
    for (ldm, diffusers) in [
        ("encoder.norm_out.", "encoder.conv_norm_out."),
        ("decoder.norm_out.", "decoder.conv_norm_out."),
        ("encoder.conv_in.", "encoder.conv_in."),
        ("encoder.conv_out.", "encoder.conv_out."),
        ("decoder.conv_in.", "decoder.conv_in."),
        ("decoder.conv_out.", "decoder.conv_out."),
        ("quant_conv.", "quant_conv."),
        ("post_quant_conv.", "post_quant_conv."),
    ] {
        if let Some(p) = key.strip_prefix(ldm) {
            return Rename::same(format!("{diffusers}{p}"));
        }
    }
    let resnet = |address: String, rest: &str| {
        let inner = match rest.strip_prefix("nin_shortcut.") {
            Some(p) => format!("conv_shortcut.{p}"),
            None if ["norm1.", "conv1.", "norm2.", "conv2."]
                .iter()
                .any(|n| rest.starts_with(n)) =>
            {
                rest.to_string()
            }
            None => return Rename::Unknown,
        };
        Rename::same(format!("{address}.{inner}"))
    };
    let Some((coder, rest)) = key.split_once('.') else {
        return Rename::Unknown;
    };
    if coder != "encoder" && coder != "decoder" {
        return Rename::Unknown;
    }
    if let Some(rest) = rest.strip_prefix("mid.") {
        if let Some(p) = rest.strip_prefix("block_1.") {
            return resnet(format!("{coder}.mid_block.resnets.0"), p);
        }
        if let Some(p) = rest.strip_prefix("block_2.") {
            return resnet(format!("{coder}.mid_block.resnets.1"), p);
        }
        if let Some(p) = rest.strip_prefix("attn_1.") {
            let address = format!("{coder}.mid_block.attentions.0");
            for (ldm, diffusers, conv) in [
                ("norm.", "group_norm.", false),
                ("q.", "to_q.", true),
                ("k.", "to_k.", true),
                ("v.", "to_v.", true),
                ("proj_out.", "to_out.0.", true),
            ] {
                if let Some(param) = p.strip_prefix(ldm) {
                    let conversion = if conv && param == "weight" {
                        Conversion::ConvToLinear
                    } else {
                        Conversion::Same
                    };
                    return Rename::To(vec![Target {
                        key: format!("{address}.{diffusers}{param}"),
                        conversion,
                    }]);
                }
            }
        }
        return Rename::Unknown;
    }
    if coder == "encoder"
        && let Some((i, rest)) = split_index(rest, "down.")
    {
        if let Some((j, p)) = split_index(rest, "block.") {
            return resnet(format!("encoder.down_blocks.{i}.resnets.{j}"), p);
        }
        if let Some(p) = rest.strip_prefix("downsample.conv.") {
            return Rename::same(format!("encoder.down_blocks.{i}.downsamplers.0.conv.{p}"));
        }
        return Rename::Unknown;
    }
    if coder == "decoder"
        && let Some((i, rest)) = split_index(rest, "up.")
    {
        let Some(block) = num_levels.checked_sub(1 + i) else {
            return Rename::Unknown;
        };
        if let Some((j, p)) = split_index(rest, "block.") {
            return resnet(format!("decoder.up_blocks.{block}.resnets.{j}"), p);
        }
        if let Some(p) = rest.strip_prefix("upsample.conv.") {
            return Rename::same(format!("decoder.up_blocks.{block}.upsamplers.0.conv.{p}"));
        }
    }
    Rename::Unknown
}

// ---------------------------------------------------------------------------------------------
// Text encoders
// ---------------------------------------------------------------------------------------------

/// Normalises a transformers CLIP text-model key to the `text_model.` form.
///
/// Real SD folders and SD1 single files (`cond_stage_model.transformer.text_model.*`) already
/// have it; transformers 5 saves `CLIPTextModel` without it, and some old SD1 single files store
/// `cond_stage_model.transformer.{embeddings,encoder,final_layer_norm}.*`. `text_projection.*`
/// (SDXL's second encoder) is outside `text_model` in both layouts and stays as it is.
pub fn clip(key: &str) -> Rename {
    if is_buffer(key) {
        return Rename::Drop("buffer, not a parameter");
    }
    if key.starts_with("text_model.") || key.starts_with("text_projection.") {
        return Rename::same(key.to_string());
    }
    if ["embeddings.", "encoder.", "final_layer_norm."]
        .iter()
        .any(|p| key.starts_with(p))
    {
        return Rename::same(format!("text_model.{key}"));
    }
    Rename::Unknown
}

/// Converts an OpenCLIP text-tower key (after [`SD2_TEXT_PREFIX`]) of a model with
/// `num_layers` resblocks into SD2's diffusers text encoder (`CLIPTextModel` with
/// `num_layers − 1` layers; see the module docs for why the last layer is dropped).
pub fn open_clip(key: &str, num_layers: usize) -> Rename {
    open_clip_tower(key, Some(num_layers))
}

/// Converts an OpenCLIP text-tower key (after [`SDXL_TEXT_2_PREFIX`]) into SDXL's second text
/// encoder (`CLIPTextModelWithProjection`): every layer kept, `text_projection` transposed into
/// a Linear weight.
pub fn open_clip_full(key: &str) -> Rename {
    open_clip_tower(key, None)
}

/// `drop_last_of`: SD2's rule (the last of this many layers and the projection are dropped);
/// `None`: keep everything (SDXL).
fn open_clip_tower(key: &str, drop_last_of: Option<usize>) -> Rename {
    if is_buffer(key) {
        return Rename::Drop("buffer, not a parameter");
    }
    match key {
        "token_embedding.weight" => {
            return Rename::same("text_model.embeddings.token_embedding.weight".into());
        }
        "positional_embedding" => {
            return Rename::same("text_model.embeddings.position_embedding.weight".into());
        }
        "ln_final.weight" => return Rename::same("text_model.final_layer_norm.weight".into()),
        "ln_final.bias" => return Rename::same("text_model.final_layer_norm.bias".into()),
        "text_projection" if drop_last_of.is_some() => {
            return Rename::Drop("SD2 uses the penultimate layer, not the projection");
        }
        "text_projection" => {
            return Rename::To(vec![Target {
                key: "text_projection.weight".into(),
                conversion: Conversion::Transpose,
            }]);
        }
        _ => {}
    }
    let Some((n, rest)) = split_index(key, "transformer.resblocks.") else {
        return Rename::Unknown;
    };
    if drop_last_of == Some(n + 1) {
        return Rename::Drop("last OpenCLIP layer: SD2 uses the penultimate layer");
    }
    let layer = format!("text_model.encoder.layers.{n}");
    let stacked = |param: &str| {
        Rename::To(
            ["q_proj", "k_proj", "v_proj"]
                .iter()
                .enumerate()
                .map(|(index, proj)| Target {
                    key: format!("{layer}.self_attn.{proj}.{param}"),
                    conversion: Conversion::Chunk { index, of: 3 },
                })
                .collect(),
        )
    };
    match rest {
        "attn.in_proj_weight" => return stacked("weight"),
        "attn.in_proj_bias" => return stacked("bias"),
        _ => {}
    }
    for (ldm, diffusers) in [
        ("attn.out_proj.", "self_attn.out_proj."),
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
    ] {
        if let Some(p) = rest.strip_prefix(ldm) {
            return Rename::same(format!("{layer}.{diffusers}{p}"));
        }
    }
    Rename::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(r: Rename) -> String {
        match r {
            Rename::To(t) if t.len() == 1 => t[0].key.clone(),
            other => panic!("expected one target, got {other:?}"),
        }
    }

    #[test]
    fn unet_keys_of_the_sd1_layout() {
        // SD1: 4 levels, 2 ResBlocks each; input_blocks 3, 6, 9 are downsamplers.
        let cases = [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("time_embed.2.bias", "time_embedding.linear_2.bias"),
            ("input_blocks.0.0.weight", "conv_in.weight"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.1.0.in_layers.2.bias",
                "down_blocks.0.resnets.0.conv1.bias",
            ),
            (
                "input_blocks.2.0.emb_layers.1.weight",
                "down_blocks.0.resnets.1.time_emb_proj.weight",
            ),
            (
                "input_blocks.2.0.out_layers.0.bias",
                "down_blocks.0.resnets.1.norm2.bias",
            ),
            (
                "input_blocks.2.0.out_layers.3.weight",
                "down_blocks.0.resnets.1.conv2.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.weight",
                "down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
                "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "input_blocks.7.1.proj_in.weight",
                "down_blocks.2.attentions.0.proj_in.weight",
            ),
            (
                "input_blocks.11.0.out_layers.3.bias",
                "down_blocks.3.resnets.1.conv2.bias",
            ),
            (
                "middle_block.0.in_layers.0.weight",
                "mid_block.resnets.0.norm1.weight",
            ),
            (
                "middle_block.1.norm.weight",
                "mid_block.attentions.0.norm.weight",
            ),
            (
                "middle_block.2.skip_connection.bias",
                "mid_block.resnets.1.conv_shortcut.bias",
            ),
            (
                "output_blocks.0.0.in_layers.2.weight",
                "up_blocks.0.resnets.0.conv1.weight",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.3.1.proj_out.bias",
                "up_blocks.1.attentions.0.proj_out.bias",
            ),
            (
                "output_blocks.5.1.transformer_blocks.0.ff.net.0.proj.weight",
                "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.11.1.transformer_blocks.0.norm3.weight",
                "up_blocks.3.attentions.2.transformer_blocks.0.norm3.weight",
            ),
            ("out.0.weight", "conv_norm_out.weight"),
            ("out.2.bias", "conv_out.bias"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(one(unet(ldm, 2)), diffusers, "{ldm}");
        }
        // One ResBlock per level: input_blocks 2 is the first downsampler.
        assert_eq!(
            one(unet("input_blocks.2.0.op.bias", 1)),
            "down_blocks.0.downsamplers.0.conv.bias"
        );
        assert_eq!(
            one(unet("input_blocks.3.0.in_layers.0.bias", 1)),
            "down_blocks.1.resnets.0.norm1.bias"
        );
        assert_eq!(
            one(unet("label_emb.0.0.weight", 2)),
            "add_embedding.linear_1.weight"
        );
        assert_eq!(
            one(unet("label_emb.0.2.bias", 2)),
            "add_embedding.linear_2.bias"
        );
        assert_eq!(unet("label_emb.0.1.weight", 2), Rename::Unknown);
        assert_eq!(unet("input_blocks.1.0.weird.weight", 2), Rename::Unknown);
        assert_eq!(unet("input_blocks.x.0.op.weight", 2), Rename::Unknown);
    }

    #[test]
    fn vae_keys_and_the_reversed_decoder_levels() {
        let cases = [
            (
                "encoder.conv_in.weight",
                "encoder.conv_in.weight",
                Conversion::Same,
            ),
            (
                "encoder.norm_out.bias",
                "encoder.conv_norm_out.bias",
                Conversion::Same,
            ),
            (
                "encoder.down.0.block.1.conv2.weight",
                "encoder.down_blocks.0.resnets.1.conv2.weight",
                Conversion::Same,
            ),
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                Conversion::Same,
            ),
            (
                "encoder.down.2.downsample.conv.bias",
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
                Conversion::Same,
            ),
            (
                "encoder.mid.block_1.norm1.weight",
                "encoder.mid_block.resnets.0.norm1.weight",
                Conversion::Same,
            ),
            (
                "decoder.mid.block_2.conv2.bias",
                "decoder.mid_block.resnets.1.conv2.bias",
                Conversion::Same,
            ),
            (
                "encoder.mid.attn_1.norm.weight",
                "encoder.mid_block.attentions.0.group_norm.weight",
                Conversion::Same,
            ),
            (
                "encoder.mid.attn_1.q.weight",
                "encoder.mid_block.attentions.0.to_q.weight",
                Conversion::ConvToLinear,
            ),
            (
                "decoder.mid.attn_1.k.bias",
                "decoder.mid_block.attentions.0.to_k.bias",
                Conversion::Same,
            ),
            (
                "decoder.mid.attn_1.v.weight",
                "decoder.mid_block.attentions.0.to_v.weight",
                Conversion::ConvToLinear,
            ),
            (
                "decoder.mid.attn_1.proj_out.weight",
                "decoder.mid_block.attentions.0.to_out.0.weight",
                Conversion::ConvToLinear,
            ),
            (
                "decoder.up.3.block.2.conv1.weight",
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                Conversion::Same,
            ),
            (
                "decoder.up.0.block.0.nin_shortcut.bias",
                "decoder.up_blocks.3.resnets.0.conv_shortcut.bias",
                Conversion::Same,
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                Conversion::Same,
            ),
            ("quant_conv.weight", "quant_conv.weight", Conversion::Same),
            (
                "post_quant_conv.bias",
                "post_quant_conv.bias",
                Conversion::Same,
            ),
        ];
        for (ldm, key, conversion) in cases {
            assert_eq!(
                vae(ldm, 4),
                Rename::To(vec![Target {
                    key: key.into(),
                    conversion
                }]),
                "{ldm}"
            );
        }
        assert_eq!(vae("decoder.up.4.block.0.conv1.weight", 4), Rename::Unknown);
        assert_eq!(vae("loss.logvar", 4), Rename::Unknown);
    }

    #[test]
    fn clip_keys_with_and_without_the_text_model_prefix() {
        for (key, expected) in [
            (
                "text_model.encoder.layers.0.mlp.fc1.weight",
                "text_model.encoder.layers.0.mlp.fc1.weight",
            ),
            (
                "encoder.layers.0.mlp.fc1.weight",
                "text_model.encoder.layers.0.mlp.fc1.weight",
            ),
            (
                "embeddings.token_embedding.weight",
                "text_model.embeddings.token_embedding.weight",
            ),
            ("final_layer_norm.bias", "text_model.final_layer_norm.bias"),
            ("text_projection.weight", "text_projection.weight"),
        ] {
            assert_eq!(one(clip(key)), expected);
        }
        assert!(matches!(
            clip("text_model.embeddings.position_ids"),
            Rename::Drop(_)
        ));
        assert!(matches!(clip("embeddings.position_ids"), Rename::Drop(_)));
        assert_eq!(clip("logit_scale_typo.x"), Rename::Unknown);
    }

    #[test]
    fn open_clip_keys_split_qkv_and_drop_the_last_layer() {
        let layers = 24;
        assert_eq!(
            one(open_clip(
                "transformer.resblocks.3.attn.out_proj.weight",
                layers
            )),
            "text_model.encoder.layers.3.self_attn.out_proj.weight"
        );
        assert_eq!(
            one(open_clip("transformer.resblocks.0.ln_1.bias", layers)),
            "text_model.encoder.layers.0.layer_norm1.bias"
        );
        assert_eq!(
            one(open_clip("transformer.resblocks.22.ln_2.weight", layers)),
            "text_model.encoder.layers.22.layer_norm2.weight"
        );
        assert_eq!(
            one(open_clip("transformer.resblocks.1.mlp.c_fc.weight", layers)),
            "text_model.encoder.layers.1.mlp.fc1.weight"
        );
        assert_eq!(
            one(open_clip("transformer.resblocks.1.mlp.c_proj.bias", layers)),
            "text_model.encoder.layers.1.mlp.fc2.bias"
        );
        assert_eq!(
            one(open_clip("positional_embedding", layers)),
            "text_model.embeddings.position_embedding.weight"
        );
        assert_eq!(
            one(open_clip("token_embedding.weight", layers)),
            "text_model.embeddings.token_embedding.weight"
        );
        assert_eq!(
            one(open_clip("ln_final.weight", layers)),
            "text_model.final_layer_norm.weight"
        );
        let Rename::To(qkv) = open_clip("transformer.resblocks.2.attn.in_proj_bias", layers) else {
            panic!("in_proj_bias must convert");
        };
        let keys: Vec<_> = qkv.iter().map(|t| (t.key.as_str(), t.conversion)).collect();
        assert_eq!(
            keys,
            [
                (
                    "text_model.encoder.layers.2.self_attn.q_proj.bias",
                    Conversion::Chunk { index: 0, of: 3 }
                ),
                (
                    "text_model.encoder.layers.2.self_attn.k_proj.bias",
                    Conversion::Chunk { index: 1, of: 3 }
                ),
                (
                    "text_model.encoder.layers.2.self_attn.v_proj.bias",
                    Conversion::Chunk { index: 2, of: 3 }
                ),
            ]
        );
        assert!(matches!(
            open_clip("transformer.resblocks.23.ln_1.bias", layers),
            Rename::Drop(_)
        ));
        assert!(matches!(
            open_clip("text_projection", layers),
            Rename::Drop(_)
        ));
        assert!(matches!(open_clip("logit_scale", layers), Rename::Drop(_)));
        assert!(matches!(open_clip("attn_mask", layers), Rename::Drop(_)));
        assert_eq!(
            open_clip("transformer.resblocks.1.attn.weird", layers),
            Rename::Unknown
        );
    }

    #[test]
    fn sdxl_big_g_keeps_every_layer_and_transposes_the_projection() {
        // The last of 32 layers is kept (SDXL pools from it).
        assert_eq!(
            one(open_clip_full("transformer.resblocks.31.ln_1.bias")),
            "text_model.encoder.layers.31.layer_norm1.bias"
        );
        assert_eq!(
            open_clip_full("text_projection"),
            Rename::To(vec![Target {
                key: "text_projection.weight".into(),
                conversion: Conversion::Transpose
            }])
        );
        assert_eq!(
            one(open_clip_full("ln_final.bias")),
            "text_model.final_layer_norm.bias"
        );
        assert!(matches!(open_clip_full("logit_scale"), Rename::Drop(_)));
    }

    #[test]
    fn unet_module_paths_map_back_to_ldm() {
        // SDXL's layout: 2 ResBlocks per level, up blocks 0 and 1 with attention.
        let up = [true, true, false];
        let cases = [
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
            ),
            (
                "down_blocks.0.resnets.1.conv2",
                "input_blocks.2.0.out_layers.3",
            ),
            ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
            (
                "mid_block.resnets.1.time_emb_proj",
                "middle_block.2.emb_layers.1",
            ),
            ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
            (
                "up_blocks.0.attentions.2.proj_out",
                "output_blocks.2.1.proj_out",
            ),
            ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
            (
                "up_blocks.2.resnets.0.conv_shortcut",
                "output_blocks.6.0.skip_connection",
            ),
            ("add_embedding.linear_2", "label_emb.0.2"),
        ];
        for (diffusers, ldm) in cases {
            assert_eq!(
                unet_module_to_ldm(diffusers, 2, &up).as_deref(),
                Some(ldm),
                "{diffusers}"
            );
            // And `unet` takes it back.
            assert_eq!(
                one(unet(&format!("{ldm}.weight"), 2)),
                format!("{diffusers}.weight")
            );
        }
        assert_eq!(
            unet_module_to_ldm("up_blocks.3.upsamplers.0.conv", 2, &up),
            None
        );
        assert_eq!(
            unet_module_to_ldm("down_blocks.0.resnets.2.conv1", 2, &up),
            None
        );
        assert_eq!(unet_module_to_ldm("down_blocks.0.norm", 2, &up), None);
    }
}
