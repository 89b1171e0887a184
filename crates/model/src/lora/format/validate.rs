//! Does a LoRA fit a model? Every module must adapt a layer the model has, with shapes that fit
//! it; every mismatch is reported, so a user sees at once that a LoRA was made for another model
//! instead of getting an image in which it silently did nothing.

use std::collections::HashMap;
use std::fmt;

use super::names::kohya_name;
use crate::lora::{LayerKind, LoraComponent, LoraWeights, TargetInfo};

/// One module of a LoRA that does not fit the model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mismatch {
    pub component: LoraComponent,
    /// The diffusers module path.
    pub path: String,
    /// The module's kohya name (what users see in the file of the default format).
    pub key: String,
    /// What is wrong, with the shapes.
    pub problem: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` ({}): {}", self.key, self.path, self.problem)
    }
}

/// Checks `weights` against the model's adaptable layers; `Err` lists every offending module.
pub fn validate(weights: &LoraWeights, targets: &[TargetInfo]) -> Result<(), Vec<Mismatch>> {
    let by_path: HashMap<(LoraComponent, &str), &TargetInfo> = targets
        .iter()
        .map(|t| ((t.component, t.path.as_str()), t))
        .collect();
    let mut out = Vec::new();
    for ((component, path), module) in weights.all() {
        let mismatch = |problem: String| Mismatch {
            component: *component,
            path: path.clone(),
            key: kohya_name(*component, path),
            problem,
        };
        let Some(target) = by_path.get(&(*component, path.as_str())) else {
            out.push(mismatch(format!(
                "the model has no {} layer `{path}`",
                component_name(*component)
            )));
            continue;
        };
        let kind = match target.kind {
            LayerKind::Linear => format!("Linear {}→{}", target.in_features, target.out_features),
            LayerKind::Conv2d { kernel, .. } => format!(
                "Conv2d {}→{} {}×{}",
                target.in_features, target.out_features, kernel[0], kernel[1]
            ),
        };
        if let Err(problem) =
            module.check_fits(target.kind, target.in_features, target.out_features)
        {
            out.push(mismatch(format!("{problem} (layer: {kind})")));
        }
    }
    if out.is_empty() { Ok(()) } else { Err(out) }
}

fn component_name(c: LoraComponent) -> &'static str {
    match c {
        LoraComponent::Unet => "UNet",
        LoraComponent::TextEncoder => "text-encoder",
        LoraComponent::TextEncoder2 => "second text-encoder",
    }
}
