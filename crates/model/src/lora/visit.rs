//! Walking the Linear and Conv2d layers of a model with their module paths.
//!
//! [`VisitLayers`] is implemented by every module struct of the UNet and the text
//! encoder (next to the struct, with `impl_visit_layers!`), by the frozen layers
//! themselves, and by `Option`/`Vec` of visitable things (a `Vec` adds the list
//! index to the path). Paths are the checkpoint keys minus `.weight`, in dotted
//! form even where a field name spells an index with `_` (`to_out_0` is visited
//! as `to_out.0`, `net_2` as `net.2`).
//!
//! The entry points are [`crate::unet::UNet2DConditionModel::visit_layers`] /
//! `visit_layers_mut` and the same on [`crate::clip::ClipTextTransformer`].

use std::collections::HashSet;

use candle_core::Var;

use super::adapted::{LoraConv2d, LoraLinear};
use super::layer::LoraAdapter;
use super::{LayerKind, LoraComponent, TargetInfo};

/// A shared reference to one adaptable layer.
#[derive(Debug, Clone, Copy)]
pub enum LayerRef<'a> {
    Linear(&'a LoraLinear),
    Conv(&'a LoraConv2d),
}

/// A mutable reference to one adaptable layer.
#[derive(Debug)]
pub enum LayerMut<'a> {
    Linear(&'a mut LoraLinear),
    Conv(&'a mut LoraConv2d),
}

/// The kind and features of a layer from its weight shape (`[out, in]` or
/// `[out, in, kh, kw]`).
fn kind_of(layer: LayerRef<'_>) -> (LayerKind, usize, usize) {
    match layer {
        LayerRef::Linear(l) => {
            let d = l.base.weight.dims();
            (LayerKind::Linear, d[1], d[0])
        }
        LayerRef::Conv(c) => {
            let d = c.base.weight.dims();
            let kind = LayerKind::Conv2d {
                kernel: [d[2], d[3]],
                stride: c.base.stride,
                padding: c.base.padding,
            };
            (kind, d[1], d[0])
        }
    }
}

impl<'a> LayerRef<'a> {
    /// The layer's kind, `(kind, in_features, out_features)`.
    pub fn shape(self) -> (LayerKind, usize, usize) {
        kind_of(self)
    }

    /// The [`TargetInfo`] of this layer at `path` in `component`.
    pub fn target(self, component: LoraComponent, path: &str) -> TargetInfo {
        let (kind, in_features, out_features) = kind_of(self);
        TargetInfo {
            component,
            path: path.to_string(),
            kind,
            in_features,
            out_features,
        }
    }

    /// The frozen weight.
    pub fn weight(self) -> &'a candle_core::Tensor {
        match self {
            LayerRef::Linear(l) => &l.base.weight,
            LayerRef::Conv(c) => &c.base.weight,
        }
    }

    /// The LoRA adapter, if any.
    pub fn lora(self) -> Option<&'a LoraAdapter> {
        match self {
            LayerRef::Linear(l) => l.lora.as_ref(),
            LayerRef::Conv(c) => c.lora.as_ref(),
        }
    }
}

impl LayerMut<'_> {
    /// A shared view of the layer.
    pub fn as_ref(&self) -> LayerRef<'_> {
        match self {
            LayerMut::Linear(l) => LayerRef::Linear(l),
            LayerMut::Conv(c) => LayerRef::Conv(c),
        }
    }

    /// The frozen weight.
    pub fn weight_mut(&mut self) -> &mut candle_core::Tensor {
        match self {
            LayerMut::Linear(l) => &mut l.base.weight,
            LayerMut::Conv(c) => &mut c.base.weight,
        }
    }

    /// The LoRA slot.
    pub fn lora_mut(&mut self) -> &mut Option<LoraAdapter> {
        match self {
            LayerMut::Linear(l) => &mut l.lora,
            LayerMut::Conv(c) => &mut c.lora,
        }
    }
}

/// The variables (`down`, `up`, or another type's) of the unmerged LoRA adapters in `module`,
/// without duplicates: the parameters a checkpointed segment must report
/// gradients for.
pub fn lora_params<M: VisitLayers + ?Sized>(module: &M) -> Vec<Var> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    module.visit_layers_at("", &mut |_, layer| {
        if let Some(lora) = layer.lora().filter(|l| !l.is_merged()) {
            for v in lora.params.vars() {
                if seen.insert(v.as_tensor().id()) {
                    out.push(v);
                }
            }
        }
    });
    out
}

/// `path.key`, or `key` at the root.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Something that holds Linear/Conv2d layers at known module paths.
pub trait VisitLayers {
    /// Calls `f(path, layer)` for every layer, `path` being this value's own
    /// path (`""` at the model root) joined with the layer's.
    fn visit_layers_at(&self, path: &str, f: &mut dyn FnMut(&str, LayerRef<'_>));
    /// The mutable version of [`Self::visit_layers_at`].
    fn visit_layers_mut_at(&mut self, path: &str, f: &mut dyn FnMut(&str, LayerMut<'_>));
}

impl VisitLayers for LoraLinear {
    fn visit_layers_at(&self, path: &str, f: &mut dyn FnMut(&str, LayerRef<'_>)) {
        f(path, LayerRef::Linear(self))
    }
    fn visit_layers_mut_at(&mut self, path: &str, f: &mut dyn FnMut(&str, LayerMut<'_>)) {
        f(path, LayerMut::Linear(self))
    }
}

impl VisitLayers for LoraConv2d {
    fn visit_layers_at(&self, path: &str, f: &mut dyn FnMut(&str, LayerRef<'_>)) {
        f(path, LayerRef::Conv(self))
    }
    fn visit_layers_mut_at(&mut self, path: &str, f: &mut dyn FnMut(&str, LayerMut<'_>)) {
        f(path, LayerMut::Conv(self))
    }
}

impl<T: VisitLayers> VisitLayers for Option<T> {
    fn visit_layers_at(&self, path: &str, f: &mut dyn FnMut(&str, LayerRef<'_>)) {
        if let Some(inner) = self {
            inner.visit_layers_at(path, f)
        }
    }
    fn visit_layers_mut_at(&mut self, path: &str, f: &mut dyn FnMut(&str, LayerMut<'_>)) {
        if let Some(inner) = self {
            inner.visit_layers_mut_at(path, f)
        }
    }
}

/// A list (`resnets`, `attentions`, `layers`, …): element `i` at `path.i`.
impl<T: VisitLayers> VisitLayers for Vec<T> {
    fn visit_layers_at(&self, path: &str, f: &mut dyn FnMut(&str, LayerRef<'_>)) {
        for (i, item) in self.iter().enumerate() {
            item.visit_layers_at(&join(path, &i.to_string()), f)
        }
    }
    fn visit_layers_mut_at(&mut self, path: &str, f: &mut dyn FnMut(&str, LayerMut<'_>)) {
        for (i, item) in self.iter_mut().enumerate() {
            item.visit_layers_mut_at(&join(path, &i.to_string()), f)
        }
    }
}

/// Implements [`VisitLayers`] for a struct from its visitable fields and their
/// checkpoint keys: `impl_visit_layers!(Attention { to_q => "to_q", to_out_0 => "to_out.0" });`.
macro_rules! impl_visit_layers {
    ($ty:ty { $($field:ident => $key:literal),* $(,)? }) => {
        impl $crate::lora::visit::VisitLayers for $ty {
            fn visit_layers_at(
                &self,
                path: &str,
                f: &mut dyn FnMut(&str, $crate::lora::visit::LayerRef<'_>),
            ) {
                $(
                    $crate::lora::visit::VisitLayers::visit_layers_at(
                        &self.$field,
                        &$crate::lora::visit::join(path, $key),
                        f,
                    );
                )*
            }
            fn visit_layers_mut_at(
                &mut self,
                path: &str,
                f: &mut dyn FnMut(&str, $crate::lora::visit::LayerMut<'_>),
            ) {
                $(
                    $crate::lora::visit::VisitLayers::visit_layers_mut_at(
                        &mut self.$field,
                        &$crate::lora::visit::join(path, $key),
                        f,
                    );
                )*
            }
        }
    };
}
pub(crate) use impl_visit_layers;
