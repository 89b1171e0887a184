//! SDXL base at full size, built from its diffusers configs with weights that
//! take no memory (every tensor a broadcast zero): the exact parameter counts
//! of its four components, kohya's default targets (722 UNet + 264 text-encoder
//! modules, as kohya sd-scripts reports for SDXL base), and kohya names that are
//! unique and read back by the grammar to the same modules.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use sd_lora_model::clip::{ClipTextConfig, ClipTextTransformer, HiddenAct};
use sd_lora_model::lora::encoders::TextEncodersRef;
use sd_lora_model::lora::format::{KohyaNaming, LoraFamily, parse_kohya_name};
use sd_lora_model::lora::targets::{Preset, TargetSpec, model_targets, select};
use sd_lora_model::lora::{LoraComponent, TargetInfo};
use sd_lora_model::unet::{UNet2DConditionModel, UNetConfig};
use sd_lora_model::vae::{AutoencoderKL, VaeConfig};

/// `stabilityai/stable-diffusion-xl-base-1.0`'s `unet/config.json` (the keys that matter).
const SDXL_UNET: &str = r#"{
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "norm_eps": 1e-05,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": true
}"#;

/// Its `vae/config.json`.
const SDXL_VAE: &str = r#"{
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
    "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": true,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

fn clip_l() -> ClipTextConfig {
    // SD1's CLIP ViT-L/14 is SDXL's first encoder.
    ClipTextConfig::sd1()
}

fn open_clip_big_g() -> ClipTextConfig {
    ClipTextConfig {
        hidden_size: 1280,
        intermediate_size: 5120,
        num_hidden_layers: 32,
        num_attention_heads: 20,
        hidden_act: HiddenAct::Gelu,
        projection_dim: 1280,
        pad_token_id: 0,
        ..ClipTextConfig::sd1()
    }
}

/// A backend whose tensors are one zero broadcast to the asked shape, and
/// which records every key's element count.
#[derive(Clone, Default)]
struct ShapeOnly {
    projection: bool,
    counts: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl ShapeOnly {
    fn make(&self, name: &str, shape: &Shape, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.counts
            .lock()
            .unwrap()
            .insert(name.to_string(), shape.elem_count());
        Tensor::zeros(1, dtype, dev)?.broadcast_as(shape)
    }

    fn total(&self) -> usize {
        self.counts.lock().unwrap().values().sum()
    }
}

impl SimpleBackend for ShapeOnly {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        self.make(name, &s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        // The VAE's mid-block attention projections (512 channels).
        self.make(name, &Shape::from((512, 512)), dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        if name == "text_projection.weight" {
            return self.projection;
        }
        !(name.ends_with(".query.weight") || name.ends_with(".proj_attn.weight"))
    }
}

fn builder(backend: &ShapeOnly) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(backend.clone()), DType::F16, Device::Cpu)
}

#[test]
fn sdxl_base_counts_targets_and_kohya_names() {
    let unet_cfg = UNetConfig::from_json_str(SDXL_UNET).unwrap();
    let vae_cfg = VaeConfig::from_json_str(SDXL_VAE).unwrap();
    let (u, v, t1) = (
        ShapeOnly::default(),
        ShapeOnly::default(),
        ShapeOnly::default(),
    );
    let t2 = ShapeOnly {
        projection: true,
        ..ShapeOnly::default()
    };
    let unet = UNet2DConditionModel::new(builder(&u), &unet_cfg).unwrap();
    AutoencoderKL::new(builder(&v), &vae_cfg).unwrap();
    let te1 = ClipTextTransformer::new(builder(&t1), &clip_l()).unwrap();
    let te2 = ClipTextTransformer::new(builder(&t2), &open_clip_big_g()).unwrap();

    // The parameter counts of SDXL base 1.0 (diffusers' `num_parameters()`).
    assert_eq!(u.total(), 2_567_463_684, "UNet");
    assert_eq!(t1.total(), 123_060_480, "text encoder (CLIP-L)");
    assert_eq!(t2.total(), 694_659_840, "text encoder 2 (OpenCLIP-bigG)");
    assert_eq!(v.total(), 83_653_863, "VAE");

    let encoders = TextEncodersRef {
        first: Some(&te1),
        second: Some(&te2),
    };
    let all = model_targets(&unet, encoders);
    let spec = TargetSpec {
        preset: Preset::Kohya,
        ..TargetSpec::default()
    };
    let chosen = select(&all, &spec);
    let count = |c| {
        chosen
            .iter()
            .filter(|t: &&TargetInfo| t.component == c)
            .count()
    };
    assert_eq!(count(LoraComponent::Unet), 722);
    assert_eq!(
        count(LoraComponent::TextEncoder) + count(LoraComponent::TextEncoder2),
        264
    );
    assert_eq!(count(LoraComponent::TextEncoder2), 192);

    // Every adaptable layer has a unique kohya name in SDXL's sgm layout, and
    // the grammar (no model) reads it back to the same module.
    let naming = KohyaNaming::from_targets(&all);
    assert_eq!(naming, LoraFamily::Sdxl.kohya_naming());
    let mut seen = HashSet::new();
    for t in &all {
        let name = naming
            .name(t.component, &t.path)
            .unwrap_or_else(|| panic!("no kohya name for {:?} {}", t.component, t.path));
        assert!(seen.insert(name.clone()), "{name} named twice");
        assert_eq!(
            parse_kohya_name(&name),
            Ok((t.component, t.path.clone())),
            "{name}"
        );
    }
}
