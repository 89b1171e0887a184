//! Finite-difference checks of the LoRA gradients (f64, a tiny UNet built in
//! code with seeded random weights), and what a LoRA layer leaves in the
//! `GradStore`: gradients for the input and the LoRA variables, nothing
//! weight-sized for the frozen base.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use sd_lora_model::lora::adapted::{LoraConv2d, LoraLinear};
use sd_lora_model::lora::attach::{TrainOptions, create_trainable};
use sd_lora_model::lora::layer::LoraAdapter;
use sd_lora_model::lora::targets::{Preset, TargetSpec};
use sd_lora_model::ops::{FrozenConv2d, FrozenLinear, with_grad1};
use sd_lora_model::unet::{UNet2DConditionModel, UNetConfig};

/// splitmix64 in (−1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    fn tensor(&mut self, shape: &[usize], scale: f64, dtype: DType) -> Tensor {
        let n = shape.iter().product();
        let data: Vec<f64> = (0..n).map(|_| self.next() * scale).collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }
}

fn hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Invents every requested weight from its key: norm scales near 1, other
/// weights uniform with variance ~1/fan-in.
struct Random;

impl SimpleBackend for Random {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        _: &Device,
    ) -> Result<Tensor> {
        let mut rng = Rng(hash(name));
        let dims = s.dims();
        let t = if dims.len() == 1 {
            let base = if name.ends_with(".weight") { 1.0 } else { 0.0 };
            rng.tensor(dims, 0.1, DType::F64).affine(1.0, base)?
        } else {
            let fan_in: usize = dims[1..].iter().product();
            rng.tensor(dims, (3.0 / fan_in as f64).sqrt(), DType::F64)
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("get_unchecked({name}) without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Two levels (cross-attention then plain), conv projections, tiny widths.
fn tiny_unet() -> UNet2DConditionModel {
    let cfg = UNetConfig::from_json_str(
        r#"{
            "block_out_channels": [8, 16],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 1,
            "attention_head_dim": 2,
            "cross_attention_dim": 12,
            "norm_num_groups": 4,
            "sample_size": 8
        }"#,
    )
    .unwrap();
    let vb = VarBuilder::from_backend(Box::new(Random), DType::F64, Device::Cpu);
    UNet2DConditionModel::new(vb, &cfg).unwrap()
}

/// `Σ y·u`, whose backward injects `u` without leaving a gradient for `u`.
fn dot_loss(y: &Tensor, u: &Tensor) -> Result<Tensor> {
    let value = (y.detach() * u)?.sum_all()?;
    let u = u.clone();
    with_grad1("dot-loss", y, value, move |a| {
        Ok([Some(u.broadcast_mul(a.grad)?)])
    })
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Central differences of `loss` with respect to a few elements of `var`,
/// compared with `grad`; returns the largest error relative to max |grad|.
fn fd_check(var: &Var, grad: &Tensor, loss: &dyn Fn() -> f64, picks: &[usize]) -> f64 {
    let eps = 1e-5;
    let shape = var.dims().to_vec();
    let base: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
    let g: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
    let gmax = g.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(gmax > 0.0, "zero gradient");
    let mut worst = 0f64;
    for &i in picks {
        let i = i % base.len();
        let at = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
            loss()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        worst = worst.max((fd - g[i]).abs() / gmax);
    }
    var.set(&Tensor::from_vec(base, shape.as_slice(), &Device::Cpu).unwrap())
        .unwrap();
    worst
}

#[test]
fn finite_differences_of_attention_and_conv_lora_through_the_unet() {
    let mut unet = tiny_unet();
    let lora = create_trainable(
        &mut unet,
        None,
        &TargetSpec {
            preset: Preset::Conv,
            text_encoder: false,
            ..TargetSpec::default()
        },
        &TrainOptions {
            seed: 2,
            dropout: 0.0,
            ..TrainOptions::default()
        },
    )
    .unwrap();
    let mut rng = Rng(17);
    for m in &lora.modules {
        assert_eq!(m.down().unwrap().dtype(), DType::F64, "f64 base, f64 LoRA");
        m.up()
            .unwrap()
            .set(&rng.tensor(m.up().unwrap().dims(), 0.3, DType::F64))
            .unwrap();
    }
    // Odd height, even width: the stride-2 downsampler sees mismatched parities.
    let x = rng.tensor(&[2, 4, 7, 6], 1.0, DType::F64);
    let ctx = rng.tensor(&[2, 5, 12], 1.0, DType::F64);
    let t = Tensor::new(&[3f64, 600.], &Device::Cpu).unwrap();
    let u = rng.tensor(&[2, 4, 7, 6], 1.0, DType::F64);
    let loss = || -> Tensor { dot_loss(&unet.forward(&x, &t, &ctx).unwrap(), &u).unwrap() };
    let grads: GradStore = loss().backward().unwrap();
    let value = || scalar(&loss());
    for path in [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
        "down_blocks.0.attentions.0.proj_in",
        "down_blocks.0.resnets.0.conv1",
        "down_blocks.0.downsamplers.0.conv",
        "up_blocks.0.upsamplers.0.conv",
        "down_blocks.1.resnets.0.conv_shortcut",
    ] {
        let m = lora
            .modules
            .iter()
            .find(|m| m.target.path == path)
            .unwrap_or_else(|| panic!("{path} not adapted"));
        for (name, var) in [("down", &m.down().unwrap()), ("up", &m.up().unwrap())] {
            let g = grads.get(var.as_tensor()).unwrap();
            let err = fd_check(var, g, &value, &[0, 7, 29, 101]);
            println!("{path}.{name}: finite differences vs backward {err:.2e}");
            assert!(err < 1e-6, "{path}.{name}: {err}");
        }
    }
}

/// Shapes of every gradient in the store.
fn grad_shapes(grads: &GradStore) -> Vec<Vec<usize>> {
    grads
        .get_ids()
        .filter_map(|id| grads.get_id(*id))
        .map(|t| t.dims().to_vec())
        .collect()
}

#[test]
fn lora_layers_store_no_gradient_for_the_frozen_weights() {
    let mut rng = Rng(1);
    // Linear: weight [6, 5], rank 3, input [2, 4, 5].
    let w = rng.tensor(&[6, 5], 0.4, DType::F32);
    let b = rng.tensor(&[6], 0.1, DType::F32);
    let mut lin = FrozenLinear::new(w.clone(), Some(b.clone()))
        .map(LoraLinear::new)
        .unwrap();
    let down = Var::from_tensor(&rng.tensor(&[3, 5], 0.4, DType::F32)).unwrap();
    let up = Var::from_tensor(&rng.tensor(&[6, 3], 0.4, DType::F32)).unwrap();
    lin.lora = Some(LoraAdapter::new(down.clone(), up.clone(), 3.0).unwrap());
    let x = Var::from_tensor(&rng.tensor(&[2, 4, 5], 1.0, DType::F32)).unwrap();
    let u = rng.tensor(&[2, 4, 6], 1.0, DType::F32);
    let grads = dot_loss(&lin.forward(&x).unwrap(), &u)
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
    for v in [&x, &down, &up] {
        assert!(grads.get(v.as_tensor()).is_some());
    }
    let shapes = grad_shapes(&grads);
    println!(
        "linear + LoRA: {} gradient entries {shapes:?}",
        shapes.len()
    );
    assert!(
        !shapes.contains(&vec![6, 5]),
        "a weight-sized gradient was computed"
    );

    // Conv 3×3 stride 2: weight [6, 4, 3, 3], rank 2.
    let w = rng.tensor(&[6, 4, 3, 3], 0.3, DType::F32);
    let mut conv = FrozenConv2d::new(w.clone(), None, 2, 1)
        .map(LoraConv2d::new)
        .unwrap();
    let down = Var::from_tensor(&rng.tensor(&[2, 4, 3, 3], 0.3, DType::F32)).unwrap();
    let up = Var::from_tensor(&rng.tensor(&[6, 2, 1, 1], 0.3, DType::F32)).unwrap();
    conv.lora = Some(LoraAdapter::new(down.clone(), up.clone(), 2.0).unwrap());
    let x = Var::from_tensor(&rng.tensor(&[1, 4, 7, 6], 1.0, DType::F32)).unwrap();
    let y = conv.forward(&x).unwrap();
    assert_eq!(y.dims(), &[1, 6, 4, 3]);
    let u = rng.tensor(y.dims(), 1.0, DType::F32);
    let grads = dot_loss(&y, &u).unwrap().backward().unwrap();
    assert!(grads.get(&w).is_none());
    for v in [&x, &down, &up] {
        assert!(grads.get(v.as_tensor()).is_some());
    }
    let shapes = grad_shapes(&grads);
    println!("conv + LoRA: {} gradient entries {shapes:?}", shapes.len());
    assert!(!shapes.contains(&vec![6, 4, 3, 3]));
}

/// The LoRA path of an adapter on a plain layer, checked by finite differences
/// in f64 for the input as well (the UNet test covers down/up).
#[test]
fn finite_differences_of_a_strided_conv_lora_layer_including_the_input() {
    let mut rng = Rng(6);
    let w = rng.tensor(&[5, 3, 3, 3], 0.3, DType::F64);
    let mut conv = FrozenConv2d::new(w, None, 2, 1)
        .map(LoraConv2d::new)
        .unwrap();
    let down = Var::from_tensor(&rng.tensor(&[2, 3, 3, 3], 0.3, DType::F64)).unwrap();
    let up = Var::from_tensor(&rng.tensor(&[5, 2, 1, 1], 0.3, DType::F64)).unwrap();
    conv.lora = Some(LoraAdapter::new(down.clone(), up.clone(), 1.5).unwrap());
    let x = Var::from_tensor(&rng.tensor(&[2, 3, 6, 5], 1.0, DType::F64)).unwrap();
    let u = rng.tensor(&[2, 5, 3, 3], 1.0, DType::F64);
    let loss = || scalar(&dot_loss(&conv.forward(&x).unwrap(), &u).unwrap());
    let grads = dot_loss(&conv.forward(&x).unwrap(), &u)
        .unwrap()
        .backward()
        .unwrap();
    let picks: Vec<usize> = (0..40).map(|i| i * 7).collect();
    for (name, var) in [("x", &x), ("down", &down), ("up", &up)] {
        let err = fd_check(var, grads.get(var.as_tensor()).unwrap(), &loss, &picks);
        println!("strided conv LoRA d/d{name}: {err:.2e}");
        assert!(err < 1e-7, "{name}: {err}");
    }
}

/// A Linear layer with its adapter (one graph node with a hand-written
/// backward), dropout active and a bias, on a rank-3 input: finite differences
/// in f64 for the input, `down` and `up`.
#[test]
fn finite_differences_of_a_linear_lora_layer_with_dropout() {
    use sd_lora_model::lora::layer::{DropoutControl, LoraDropout};
    let mut rng = Rng(7);
    let w = rng.tensor(&[5, 4], 0.5, DType::F64);
    let b = rng.tensor(&[5], 0.5, DType::F64);
    let mut lin = FrozenLinear::new(w, Some(b)).map(LoraLinear::new).unwrap();
    let down = Var::from_tensor(&rng.tensor(&[3, 4], 0.5, DType::F64)).unwrap();
    let up = Var::from_tensor(&rng.tensor(&[5, 3], 0.5, DType::F64)).unwrap();
    let mut lora = LoraAdapter::new(down.clone(), up.clone(), 2.0).unwrap();
    let control = DropoutControl::new();
    control.set_training(true);
    control.set_step(3);
    lora.dropout = Some(LoraDropout {
        p: 0.3,
        seed: 11,
        control,
    });
    lin.lora = Some(lora);
    let x = Var::from_tensor(&rng.tensor(&[2, 3, 4], 1.0, DType::F64)).unwrap();
    let u = rng.tensor(&[2, 3, 5], 1.0, DType::F64);
    let loss = || scalar(&dot_loss(&lin.forward(&x).unwrap(), &u).unwrap());
    let grads = dot_loss(&lin.forward(&x).unwrap(), &u)
        .unwrap()
        .backward()
        .unwrap();
    let picks: Vec<usize> = (0..24).collect();
    for (name, var) in [("x", &x), ("down", &down), ("up", &up)] {
        let err = fd_check(var, grads.get(var.as_tensor()).unwrap(), &loss, &picks);
        println!("linear LoRA with dropout d/d{name}: {err:.2e}");
        assert!(err < 1e-7, "{name}: {err}");
    }
}
