//! AdamW's update of an f32 parameter on the CPU, in place.
//!
//! The tensor-op update ([`crate::optim`]'s generic path) runs fifteen ops per
//! parameter, each allocating a tensor the parameter's size; with a few
//! hundred small LoRA tensors that is thousands of ops per step. Here the
//! same arithmetic runs as three in-place passes (candle's `InplaceOp2/3`):
//! the first moment, the second moment, then the parameter. Every scalar is
//! applied as candle applies it (`x·s + 0` for a scalar multiply, so even the
//! sign of a zero matches), so both paths give the same bits.

use candle_core::{
    CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Storage, Tensor, Var,
};

use crate::optim::{Hyper, ParamState};

/// Updates `var` and its moments in place when everything is a contiguous f32
/// CPU tensor; `false` (nothing done) otherwise.
pub(crate) fn update(var: &Var, st: &mut ParamState, grad: &Tensor, h: &Hyper) -> Result<bool> {
    let p = var.as_tensor();
    let all = [p, grad, &st.exp_avg, &st.exp_avg_sq];
    if !all
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
    {
        return Ok(false);
    }
    st.exp_avg.inplace_op2(grad, &FirstMoment(*h))?;
    st.exp_avg_sq.inplace_op2(grad, &SecondMoment(*h))?;
    p.inplace_op3(&st.exp_avg, &st.exp_avg_sq, &Parameter(*h))?;
    sd_lora_model::ops::op_count::add_in_place(3);
    Ok(true)
}

/// `Σ x²` of a contiguous f32 CPU tensor, accumulated in f64; `None` for any
/// other tensor.
pub(crate) fn sum_squares(t: &Tensor) -> Option<f64> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Some(
            v[start..end]
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum(),
        ),
        _ => None,
    }
}

/// candle's scalar multiply (`affine(x, s, 0)`).
#[inline(always)]
fn scaled(x: f32, s: f32) -> f32 {
    x * s + 0.0
}

/// The gradient as the update sees it (times the clipping coefficient).
#[inline(always)]
fn clipped(g: f32, h: &Hyper) -> f32 {
    if h.grad_scale == 1.0 {
        g
    } else {
        scaled(g, h.grad_scale)
    }
}

/// The contiguous f32 values of an in-place op's operand.
fn values<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("adamw: {what} must be a contiguous f32 tensor"),
    }
}

fn values_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("adamw: {what} must be a contiguous f32 tensor"),
    }
}

/// `m ← β₁·m + (1−β₁)·g`.
struct FirstMoment(Hyper);

impl InplaceOp2 for FirstMoment {
    fn name(&self) -> &'static str {
        "adamw-first-moment"
    }

    fn cpu_fwd(&self, m: &mut CpuStorage, ml: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let h = &self.0;
        let g = values(g, gl, "the gradient")?;
        let m = values_mut(m, ml, "the first moment")?;
        if m.len() != g.len() {
            candle_core::bail!("adamw: first moment and gradient differ in size")
        }
        for (m, &g) in m.iter_mut().zip(g) {
            *m = scaled(*m, h.beta1) + scaled(clipped(g, h), h.one_minus_beta1);
        }
        Ok(())
    }
}

/// `v ← β₂·v + (1−β₂)·g²`.
struct SecondMoment(Hyper);

impl InplaceOp2 for SecondMoment {
    fn name(&self) -> &'static str {
        "adamw-second-moment"
    }

    fn cpu_fwd(&self, v: &mut CpuStorage, vl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let h = &self.0;
        let g = values(g, gl, "the gradient")?;
        let v = values_mut(v, vl, "the second moment")?;
        if v.len() != g.len() {
            candle_core::bail!("adamw: second moment and gradient differ in size")
        }
        for (v, &g) in v.iter_mut().zip(g) {
            let g = clipped(g, h);
            *v = scaled(*v, h.beta2) + scaled(g * g, h.one_minus_beta2);
        }
        Ok(())
    }
}

/// `p ← p·(1 − lr·wd) − step_size · m / (√v / √(1−β₂ᵗ) + ε)`.
struct Parameter(Hyper);

impl InplaceOp3 for Parameter {
    fn name(&self) -> &'static str {
        "adamw-parameter"
    }

    fn cpu_fwd(
        &self,
        p: &mut CpuStorage,
        pl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let h = &self.0;
        let m = values(m, ml, "the first moment")?;
        let v = values(v, vl, "the second moment")?;
        let p = values_mut(p, pl, "the parameter")?;
        if p.len() != m.len() || p.len() != v.len() {
            candle_core::bail!("adamw: parameter and moments differ in size")
        }
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            // `x + eps` is candle's `affine(x, 1, eps)`.
            let denom = scaled(v.sqrt(), h.inv_sqrt_bias2) * 1.0 + h.eps;
            let update = scaled(m / denom, h.step_size);
            let decayed = match h.decay {
                Some(d) => scaled(*p, d),
                None => *p,
            };
            *p = decayed - update;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use crate::optim::{AdamW, AdamWConfig, ParamGroup};

    /// The in-place kernel and the tensor ops give the same bits over several
    /// steps: with and without weight decay, clipping coefficient 1 and not,
    /// a parameter skipped in one step, gradients with zeros of both signs.
    #[test]
    fn fused_equals_tensor_ops_bit_for_bit() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let make = || -> candle_core::Result<(AdamW, Vec<Var>)> {
            let vars = vec![
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 5), &dev)?.copy()?)?,
                Var::from_tensor(&Tensor::zeros(13, candle_core::DType::F32, &dev)?)?,
            ];
            let groups = vec![
                ParamGroup {
                    name: "a".into(),
                    vars: vec![vars[0].clone()],
                    lr: 1e-2,
                    weight_decay: 1e-2,
                },
                ParamGroup {
                    name: "b".into(),
                    vars: vec![vars[1].clone()],
                    lr: 3e-3,
                    weight_decay: 0.0,
                },
            ];
            Ok((AdamW::new(groups, AdamWConfig::default())?, vars))
        };
        let (mut fused, fv) = make()?;
        let (mut generic, gv) = make()?;
        // Same starting values.
        gv[0].set(fv[0].as_tensor())?;
        for step in 0..4 {
            let mut g0 = Tensor::randn(0f32, 1.0, (7, 5), &dev)?.to_vec2::<f32>()?;
            g0[0][0] = -0.0;
            g0[1][1] = 0.0;
            let g0 = Tensor::new(g0, &dev)?;
            let g1 = (Tensor::randn(0f32, 1.0, 13, &dev)? * 1e-3)?;
            let grads = vec![vec![Some(g0)], vec![(step != 2).then_some(g1)]];
            let scale = if step % 2 == 0 { 1.0 } else { 0.37 };
            fused.step_impl(&grads, 0.9, scale, true)?;
            generic.step_impl(&grads, 0.9, scale, false)?;
            for (a, b) in fv.iter().zip(&gv) {
                let bits = |v: &Var| -> candle_core::Result<Vec<u32>> {
                    Ok(v.as_tensor()
                        .flatten_all()?
                        .to_vec1::<f32>()?
                        .iter()
                        .map(|x| x.to_bits())
                        .collect())
                };
                assert_eq!(bits(a)?, bits(b)?, "step {step}");
            }
        }
        let (sa, sb) = (fused.state_tensors()?, generic.state_tensors()?);
        for ((ka, ta), (kb, tb)) in sa.iter().zip(&sb) {
            assert_eq!(ka, kb);
            let diff = (ta.to_dtype(candle_core::DType::F64)?
                - tb.to_dtype(candle_core::DType::F64)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
            assert_eq!(diff, 0.0, "{ka}");
        }
        Ok(())
    }
}
