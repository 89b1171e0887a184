//! Tests of `sd_lora_model::ops`: gradients against finite differences in f64,
//! forwards (and, where candle's are differentiable, gradients) against candle's
//! own ops in f32, and no GradStore entries for frozen weights.

mod activation;
mod attention;
mod common;
mod conv;
mod fused;
mod half;
mod linear;
mod matmul;
mod norm;
mod softmax;
