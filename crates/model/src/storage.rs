//! fp8 storage of frozen weights (`model.dtype = "fp8"`, what kohya's `--fp8_base` and
//! OneTrainer's fp8 do): the UNet's Linear and Conv2d weights are kept in `F8E4M3` (one byte
//! each, e4m3: 3 mantissa bits, range ±448), everything else (norms, biases) and every
//! computation in the compute dtype. Each layer converts its weight to the compute dtype for
//! the call that needs it — the forward, and again the backward — so no converted copy stays
//! in the graph between them (see [`crate::ops::linear`], [`crate::ops::conv`]), and the
//! weights' memory is halved against f16 whether or not gradient checkpointing is on.

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use crate::unet::UNet2DConditionModel;

/// The storage dtype of fp8 weights.
pub const FP8: DType = DType::F8E4M3;

/// Whether the tensor `name` of `shape` is stored in fp8: the weight of a Linear (2-D) or
/// Conv2d (4-D) layer, not an embedding table (`token_embedding.weight`; the UNet has none, its
/// `time_embedding.linear_1` is a Linear).
pub fn stored_in_fp8(name: &str, shape: &Shape) -> bool {
    name.ends_with(".weight")
        && matches!(shape.rank(), 2 | 4)
        && !name.ends_with("embedding.weight")
}

/// A weight source whose Linear/Conv2d weights come out in [`FP8`] (the others in the
/// builder's dtype). Each tensor is converted as it is built, so loading holds no more than
/// one layer in the wider dtype.
pub struct Fp8Weights<B>(pub B);

impl<B: SimpleBackend> SimpleBackend for Fp8Weights<B> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let t = self.0.get(s.clone(), name, h, dtype, dev)?;
        if stored_in_fp8(name, &s) {
            t.to_dtype(FP8)
        } else {
            Ok(t)
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// Converts a built UNet's Linear/Conv2d weights to [`FP8`] in place (for a model built in
/// memory; files are converted as they load, with [`Fp8Weights`]).
pub fn unet_to_fp8(unet: &mut UNet2DConditionModel) -> Result<()> {
    let mut failed = None;
    unet.visit_layers_mut(&mut |path, mut layer| {
        if failed.is_some() {
            return;
        }
        let w = layer.weight_mut();
        match w.to_dtype(FP8) {
            Ok(t) => *w = t,
            Err(e) => failed = Some(candle_core::Error::Msg(format!("{path}: {e}"))),
        }
    });
    failed.map_or(Ok(()), Err)
}
