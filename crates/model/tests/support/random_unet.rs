//! A tiny SD1-like UNet with seeded random weights, shared by the tests that
//! compare two ways of running the same model (checkpointing, half storage,
//! the random-weight UNet tests), and the relative error they compare with.
//! Each test binary uses a different part of it.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use sd_lora_model::unet::UNetConfig;

/// splitmix64: a tiny seedable generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

pub fn hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

pub fn randn(seed: u64, shape: impl Into<Shape>, mean: f64, std: f64, dtype: DType) -> Tensor {
    let shape = shape.into();
    let mut rng = Rng(seed);
    let data: Vec<f64> = (0..shape.elem_count())
        .map(|_| mean + std * rng.normal())
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Norm scales around 1, small biases, other weights scaled by 1/√fan-in.
pub fn random_weight(name: &str, shape: &Shape) -> Tensor {
    let dims = shape.dims();
    if dims.len() == 1 {
        let mean = if name.ends_with(".weight") { 1.0 } else { 0.0 };
        randn(hash(name), shape.clone(), mean, 0.1, DType::F64)
    } else {
        let fan_in: usize = dims[1..].iter().product();
        let std = 1.0 / (fan_in as f64).sqrt();
        randn(hash(name), shape.clone(), 0.0, std, DType::F64)
    }
}

/// A backend that invents each requested tensor from its key and records it.
#[derive(Default, Clone)]
pub struct Recorder(pub Arc<Mutex<HashMap<String, Tensor>>>);

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        _: &Device,
    ) -> Result<Tensor> {
        let t = random_weight(name, &s);
        self.0.lock().unwrap().insert(name.to_string(), t.clone());
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("get_unchecked({name}) without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// SD1's topology, tiny: a cross-attention level and a plain level, two ResNets
/// per down block (three per up block), conv projections, mid-block attention.
pub fn config() -> UNetConfig {
    UNetConfig::from_json_str(
        r#"{
            "block_out_channels": [8, 16],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 2,
            "attention_head_dim": 2,
            "cross_attention_dim": 12,
            "norm_num_groups": 4,
            "sample_size": 8
        }"#,
    )
    .unwrap()
}

/// The largest absolute value of `t`.
pub fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// max |a − b| / max |b|.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    max_abs(&d) / max_abs(b).max(1e-30)
}
