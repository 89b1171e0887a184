//! The frozen layers with a LoRA slot: what the UNet, the text encoders and
//! the VAE's shared blocks hold.
//!
//! [`LoraLinear`] and [`LoraConv2d`] wrap the frozen ops of [`crate::ops`] and
//! an optional [`LoraAdapter`]; they implement the ops' [`LinearLayer`] /
//! [`ConvLayer`] traits, so the blocks and the fused ops run them without the
//! ops knowing about LoRA. With an active adapter a Linear layer is one graph
//! node ([`LoraAdapter::apply_linear`]; on the CPU in f32 one fused op,
//! [`super::linear_cpu`]), a Conv2d the frozen conv plus the LoRA term.

use candle_core::{Module, Result, Tensor};

use super::layer::LoraAdapter;
use crate::ops::{ConvLayer, FrozenConv2d, FrozenLinear, LinearLayer};

/// A frozen Linear layer and its LoRA slot.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// The frozen layer (`weight`, `bias`).
    pub base: FrozenLinear,
    /// An adapter whose term is added to the output (skipped while merged into
    /// the base weight).
    pub lora: Option<LoraAdapter>,
}

impl LoraLinear {
    /// The frozen layer with an empty slot.
    pub fn new(base: FrozenLinear) -> Self {
        LoraLinear { base, lora: None }
    }

    /// The attached adapter when it takes part in the forward (attached and
    /// not merged into the weight).
    pub fn active_lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref().filter(|l| !l.is_merged())
    }

    /// `x·Wᵀ + b`, plus the LoRA term when an unmerged adapter is attached.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some(lora) = self.active_lora() else {
            return self.base.forward(x);
        };
        let (w, b) = (&self.base.weight, self.base.bias.as_ref());
        if lora.plain().is_none() {
            return lora.apply_linear_update(x, &self.base);
        }
        if let Some(y) = super::linear_cpu::forward(lora, x, w, b)? {
            return Ok(y);
        }
        lora.apply_linear(x, self.base.forward(&x.detach())?, w)
    }
}

impl From<FrozenLinear> for LoraLinear {
    fn from(base: FrozenLinear) -> Self {
        LoraLinear::new(base)
    }
}

impl LinearLayer for LoraLinear {
    fn frozen(&self) -> &FrozenLinear {
        &self.base
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        LoraLinear::forward(self, x)
    }
    fn is_adapted(&self) -> bool {
        self.active_lora().is_some()
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        LoraLinear::forward(self, x)
    }
}

/// A frozen Conv2d layer and its LoRA slot.
#[derive(Debug, Clone)]
pub struct LoraConv2d {
    /// The frozen convolution (`weight`, `bias`, `stride`, `padding`).
    pub base: FrozenConv2d,
    /// An adapter whose term is added to the output (skipped while merged into
    /// the base weight).
    pub lora: Option<LoraAdapter>,
}

impl LoraConv2d {
    /// The frozen convolution with an empty slot.
    pub fn new(base: FrozenConv2d) -> Self {
        LoraConv2d { base, lora: None }
    }

    /// The attached adapter when it takes part in the forward.
    pub fn active_lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref().filter(|l| !l.is_merged())
    }

    /// The frozen convolution plus the LoRA term when an unmerged adapter is
    /// attached.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(lora) = self.active_lora()
            && lora.plain().is_none()
        {
            return lora.apply_conv_update(x, &self.base);
        }
        let y = self.base.forward(x)?;
        match self.active_lora() {
            Some(lora) => {
                y + lora.conv_delta(x, &self.base.weight, self.base.stride, self.base.padding)?
            }
            None => Ok(y),
        }
    }
}

impl From<FrozenConv2d> for LoraConv2d {
    fn from(base: FrozenConv2d) -> Self {
        LoraConv2d::new(base)
    }
}

impl ConvLayer for LoraConv2d {
    fn frozen(&self) -> &FrozenConv2d {
        &self.base
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        LoraConv2d::forward(self, x)
    }
    fn is_adapted(&self) -> bool {
        self.active_lora().is_some()
    }
}
