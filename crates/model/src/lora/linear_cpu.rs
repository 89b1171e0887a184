//! A LoRA Linear layer on the CPU in f32: the frozen product, the bias and the
//! LoRA term as one op each way.
//!
//! The generic path ([`LoraAdapter::apply_linear`] on the frozen layer's
//! output) runs a dozen tensor ops forward (casts, reshapes, transposes, two
//! products, the scale, the sum with the base output) and as many backward,
//! each with its own tensor and, for the sums, a pass over an output-sized
//! buffer. Here the forward is `y = x·Wᵀ + b`, then `y += s·(x·Dᵀ)·Uᵀ`
//! accumulated by the product itself into `y`; the backward is
//! `gh = s·g·U`, `dx = g·W + gh·D` (accumulated the same way),
//! `dD = ghᵀ·x`, `dU = s·gᵀ·(x·Dᵀ)` — the same formulas, fewer passes.
//!
//! Used when the input, the weights and the adapter are f32 CPU tensors and no
//! LoRA dropout is active; anything else takes the generic path.

use candle_core::{DType, Result, Tensor};

use super::layer::LoraAdapter;
use crate::ops::checkpoint::param;
use crate::ops::matmul::{Operand, product_into, products_f32};
use crate::ops::{with_f32_slice, with_grad3};

/// Row-major `[rows, cols]` data as a product operand, or its transpose.
fn plain(data: &[f32], cols: usize) -> Operand<'_> {
    (data, 0, (0, cols, 1))
}

fn transposed(data: &[f32], cols: usize) -> Operand<'_> {
    (data, 0, (0, 1, cols))
}

/// `x·Wᵀ + b + s·(x·Dᵀ)·Uᵀ` as one graph node, or `None` when the fused
/// path does not apply (see the module docs).
pub(crate) fn forward(
    lora: &LoraAdapter,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let Some((lora_down, lora_up)) = lora.plain() else {
        return Ok(None);
    };
    if !f32_cpu(x)
        || !f32_cpu(weight)
        || !f32_cpu(lora_down.as_tensor())
        || !f32_cpu(lora_up.as_tensor())
        || bias.is_some_and(|b| !f32_cpu(b))
        || lora.dropout_active()
        || x.elem_count() == 0
    {
        return Ok(None);
    }
    let (out_f, in_f) = weight.dims2()?;
    let (rank, down_in) = lora_down.dims2()?;
    if x.dim(candle_core::D::Minus1)? != in_f
        || down_in != in_f
        || lora_up.dims2()? != (out_f, rank)
        || bias.is_some_and(|b| b.dims() != [out_f])
    {
        return Ok(None);
    }
    let m = x.elem_count() / in_f;
    let scale = lora.scale() as f32;
    crate::ops::flops::add_linear(m, out_f, in_f);
    let (down, up) = (param(lora_down), param(lora_up));
    let xc = x.detach().contiguous()?;
    let weight = weight.detach().contiguous()?;
    let (dc, uc) = (down.detach().contiguous()?, up.detach().contiguous()?);
    let bias = match bias {
        Some(b) => Some(b.detach().contiguous()?.to_vec1::<f32>()?),
        None => None,
    };
    let y = with_f32_slice(&xc, |xs| {
        with_f32_slice(&weight, |ws| {
            with_f32_slice(&dc, |ds| {
                with_f32_slice(&uc, |us| {
                    let mut y =
                        products_f32(plain(xs, in_f), transposed(ws, in_f), (1, m, in_f, out_f))?;
                    if let Some(b) = &bias {
                        use rayon::prelude::*;
                        y.par_chunks_mut(out_f).for_each(|row| {
                            for (v, b) in row.iter_mut().zip(b) {
                                *v += *b;
                            }
                        });
                    }
                    let h =
                        products_f32(plain(xs, in_f), transposed(ds, in_f), (1, m, in_f, rank))?;
                    product_into(
                        &mut y,
                        plain(&h, rank),
                        transposed(us, rank),
                        (m, rank, out_f),
                        true,
                        scale,
                    )?;
                    Ok(y)
                })
            })
        })
    })?;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out_f;
    }
    let y = Tensor::from_vec(y, dims, x.device())?;
    with_grad3("linear-lora", [x, &down, &up], y, move |a| {
        let [x, down, up] = a.inputs;
        let [need_x, need_down, need_up] = a.needs_grad;
        let (xc, g) = (x.contiguous()?, a.grad.contiguous()?);
        let (dc, uc) = (down.contiguous()?, up.contiguous()?);
        let grads = with_f32_slice(&g, |gs| {
            with_f32_slice(&xc, |xs| {
                with_f32_slice(&weight, |ws| {
                    with_f32_slice(&dc, |ds| {
                        with_f32_slice(&uc, |us| {
                            // gh = s·g·U: the gradient of the rank-r bottleneck.
                            let mut gh = vec![0f32; m * rank];
                            product_into(
                                &mut gh,
                                plain(gs, out_f),
                                plain(us, rank),
                                (m, out_f, rank),
                                false,
                                scale,
                            )?;
                            let dx = if need_x {
                                let mut dx = products_f32(
                                    plain(gs, out_f),
                                    plain(ws, in_f),
                                    (1, m, out_f, in_f),
                                )?;
                                product_into(
                                    &mut dx,
                                    plain(&gh, rank),
                                    plain(ds, in_f),
                                    (m, rank, in_f),
                                    true,
                                    1.0,
                                )?;
                                Some(dx)
                            } else {
                                None
                            };
                            let ddown = if need_down {
                                let mut dd = vec![0f32; rank * in_f];
                                product_into(
                                    &mut dd,
                                    transposed(&gh, rank),
                                    plain(xs, in_f),
                                    (rank, m, in_f),
                                    false,
                                    1.0,
                                )?;
                                Some(dd)
                            } else {
                                None
                            };
                            let dup = if need_up {
                                let h = products_f32(
                                    plain(xs, in_f),
                                    transposed(ds, in_f),
                                    (1, m, in_f, rank),
                                )?;
                                let mut du = vec![0f32; out_f * rank];
                                product_into(
                                    &mut du,
                                    transposed(gs, out_f),
                                    plain(&h, rank),
                                    (out_f, m, rank),
                                    false,
                                    scale,
                                )?;
                                Some(du)
                            } else {
                                None
                            };
                            Ok([dx, ddown, dup])
                        })
                    })
                })
            })
        })?;
        let mut out: [Option<Tensor>; 3] = [None, None, None];
        for ((slot, grad), t) in out.iter_mut().zip(grads).zip([x, down, up]) {
            if let Some(grad) = grad {
                *slot = Some(Tensor::from_vec(grad, t.dims(), t.device())?);
            }
        }
        Ok(out)
    })
    .map(Some)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use crate::lora::adapted::LoraLinear;
    use crate::lora::layer::LoraAdapter;
    use crate::ops::FrozenLinear;

    /// The fused f32 layer against the generic path in f64 (a LoRA Linear in
    /// f64 never takes the fused path): output and the gradients of `x`,
    /// `down` and `up`, with and without a bias, on a `[2, 3, in]` input.
    #[test]
    fn matches_the_generic_path() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (inf, outf, rank) = (7, 5, 3);
        for with_bias in [true, false] {
            let w = Tensor::randn(0f64, 1.0, (outf, inf), &dev)?;
            let b = Tensor::randn(0f64, 1.0, outf, &dev)?;
            let d = Tensor::randn(0f64, 1.0, (rank, inf), &dev)?;
            let u = Tensor::randn(0f64, 1.0, (outf, rank), &dev)?;
            let x = Tensor::randn(0f64, 1.0, (2, 3, inf), &dev)?;
            let g = Tensor::randn(0f64, 1.0, (2, 3, outf), &dev)?;
            let run = |dtype: DType| -> candle_core::Result<Vec<Tensor>> {
                let c = |t: &Tensor| t.to_dtype(dtype);
                let mut layer = LoraLinear::new(FrozenLinear::new(
                    c(&w)?,
                    with_bias.then(|| c(&b)).transpose()?,
                )?);
                let (dv, uv) = (Var::from_tensor(&c(&d)?)?, Var::from_tensor(&c(&u)?)?);
                layer.lora = Some(LoraAdapter::new(dv.clone(), uv.clone(), 6.0)?);
                let xv = Var::from_tensor(&c(&x)?)?;
                let y = layer.forward(xv.as_tensor())?;
                let grads = (&y * c(&g)?)?.sum_all()?.backward()?;
                let get = |v: &Var| grads.get(v.as_tensor()).cloned().expect("gradient");
                [y, get(&xv), get(&dv), get(&uv)]
                    .into_iter()
                    .map(|t| t.to_dtype(DType::F64))
                    .collect()
            };
            let (fused, generic) = (run(DType::F32)?, run(DType::F64)?);
            for (what, (a, b)) in ["y", "dx", "ddown", "dup"]
                .iter()
                .zip(fused.iter().zip(&generic))
            {
                assert_eq!(a.dims(), b.dims(), "{what}");
                let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-9);
                let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(
                    diff <= 1e-5 * scale,
                    "{what} (bias {with_bias}): {diff} of {scale}"
                );
            }
        }
        Ok(())
    }
}
