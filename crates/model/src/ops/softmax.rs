//! Softmax over the last dimension, with a backward.
//!
//! `candle_nn::ops::softmax_last_dim` is a fused kernel without a backward: a
//! gradient through it is silently zero. `candle_nn::ops::softmax` is
//! differentiable but built from five primitive ops, each of which keeps its
//! intermediate for the backward. Here the fused kernel runs the forward and the
//! backward is the analytic `dx = y·(g − Σ g·y)`, written in terms of the output so
//! nothing else needs to be kept.

use candle_core::{D, Result, Tensor};

use super::custom_grad::with_grad1;

/// `softmax(x)` over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    // The fused kernels read the input as contiguous rows.
    let y = candle_nn::ops::softmax_last_dim(&x.detach().contiguous()?)?;
    with_grad1("softmax-last-dim", x, y, |a| {
        let y = a.output;
        let dot = (a.grad * y)?.sum_keepdim(D::Minus1)?;
        let dx = (a.grad.broadcast_sub(&dot)? * y)?;
        Ok([Some(dx)])
    })
}
