//! The UNet2DConditionModel (work in progress).
