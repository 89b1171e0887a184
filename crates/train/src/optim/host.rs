//! What the host-side optimizers share: parameters and gradients as f32
//! vectors, and their state as named tensors.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Shape, Tensor, Var};

use super::{ParamGroup, state_key};

/// The gradient's values (row-major, f32) times `scale`. Scaling in f32, as
/// the tensor paths do (`grad * scale` with the scale cast to f32).
pub(crate) fn grad_values(grad: &Tensor, scale: f64) -> Result<Vec<f32>> {
    let mut g = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if scale != 1.0 {
        let s = scale as f32;
        g.iter_mut().for_each(|x| *x *= s);
    }
    Ok(g)
}

/// The parameter's values (row-major, f32).
pub(crate) fn param_values(var: &Var) -> Result<Vec<f32>> {
    var.as_tensor()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// Writes `values` into the parameter (its shape, dtype and device).
pub(crate) fn set_param(var: &Var, values: Vec<f32>) -> Result<()> {
    let t = Tensor::from_vec(values, var.shape(), &Device::Cpu)?
        .to_dtype(var.dtype())?
        .to_device(var.device())?;
    var.set(&t)?;
    sd_lora_model::ops::op_count::add_in_place(1);
    Ok(())
}

/// Collects state tensors under `group.i.what` keys (CPU tensors).
#[derive(Debug, Default)]
pub(crate) struct StateOut(pub(crate) Vec<(String, Tensor)>);

impl StateOut {
    /// f32 values with the given shape.
    pub(crate) fn f32(
        &mut self,
        group: &str,
        i: usize,
        what: &str,
        v: &[f32],
        shape: impl Into<Shape>,
    ) -> Result<()> {
        let t = Tensor::from_slice(v, shape, &Device::Cpu)?;
        self.0.push((state_key(group, i, what), t));
        Ok(())
    }

    /// 8-bit codes, flat.
    pub(crate) fn u8(&mut self, group: &str, i: usize, what: &str, v: &[u8]) -> Result<()> {
        let t = Tensor::from_slice(v, v.len(), &Device::Cpu)?;
        self.0.push((state_key(group, i, what), t));
        Ok(())
    }

    /// A count, as a one-element I64 tensor.
    pub(crate) fn count(&mut self, key: String, n: u64) -> Result<()> {
        let t = Tensor::from_vec(vec![n as i64], 1, &Device::Cpu)?;
        self.0.push((key, t));
        Ok(())
    }

    /// A real number, as a one-element F64 tensor (exact).
    pub(crate) fn scalar(&mut self, key: String, x: f64) -> Result<()> {
        let t = Tensor::from_vec(vec![x], 1, &Device::Cpu)?;
        self.0.push((key, t));
        Ok(())
    }
}

/// Reads state tensors back, checking each one's size.
pub(crate) struct StateIn<'a> {
    /// The optimizer's name, for messages.
    pub(crate) who: &'a str,
    pub(crate) t: &'a HashMap<String, Tensor>,
}

impl StateIn<'_> {
    fn get(&self, key: &str) -> Result<&Tensor> {
        self.t.get(key).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{} state: tensor {key:?} is missing; the checkpoint was saved with another optimizer, \
                 other parameter groups or other LoRA settings — resume with the same config, or start \
                 a new run",
                self.who
            ))
        })
    }

    fn check_len(&self, key: &str, t: &Tensor, len: usize) -> Result<()> {
        if t.elem_count() != len {
            candle_core::bail!(
                "{} state: tensor {key:?} has {} values but the parameter needs {len}; the checkpoint \
                 belongs to a different LoRA configuration",
                self.who,
                t.elem_count()
            );
        }
        Ok(())
    }

    /// `len` f32 values.
    pub(crate) fn f32(&self, group: &str, i: usize, what: &str, len: usize) -> Result<Vec<f32>> {
        let key = state_key(group, i, what);
        let t = self.get(&key)?;
        self.check_len(&key, t, len)?;
        t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
    }

    /// `len` 8-bit codes.
    pub(crate) fn u8(&self, group: &str, i: usize, what: &str, len: usize) -> Result<Vec<u8>> {
        let key = state_key(group, i, what);
        let t = self.get(&key)?;
        self.check_len(&key, t, len)?;
        if t.dtype() != DType::U8 {
            candle_core::bail!(
                "{} state: tensor {key:?} holds {:?}, expected 8-bit codes",
                self.who,
                t.dtype()
            );
        }
        t.flatten_all()?.to_vec1::<u8>()
    }

    /// Whether `key` is present (optional state such as a first moment).
    pub(crate) fn has(&self, group: &str, i: usize, what: &str) -> bool {
        self.t.contains_key(&state_key(group, i, what))
    }

    /// A count saved by [`StateOut::count`].
    pub(crate) fn count(&self, key: &str) -> Result<u64> {
        let v = self
            .get(key)?
            .flatten_all()?
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?;
        match v.as_slice() {
            [s] if *s >= 0 => Ok(*s as u64),
            _ => candle_core::bail!(
                "{} state: tensor {key:?} must hold one non-negative count, got {v:?}",
                self.who
            ),
        }
    }

    /// A number saved by [`StateOut::scalar`].
    pub(crate) fn scalar(&self, key: &str) -> Result<f64> {
        let v = self
            .get(key)?
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        match v.as_slice() {
            [x] => Ok(*x),
            _ => candle_core::bail!(
                "{} state: tensor {key:?} must hold one number, got {} values",
                self.who,
                v.len()
            ),
        }
    }
}

/// Saves every parameter's state with `f(out, group name, index, var,
/// state)`, in group then parameter order.
pub(crate) fn save_each<S>(
    out: &mut StateOut,
    groups: &[ParamGroup],
    state: &[Vec<S>],
    mut f: impl FnMut(&mut StateOut, &str, usize, &Var, &S) -> Result<()>,
) -> Result<()> {
    for (group, gstate) in groups.iter().zip(state) {
        for (i, (var, st)) in group.vars.iter().zip(gstate).enumerate() {
            f(out, &group.name, i, var, st)?;
        }
    }
    Ok(())
}

/// Builds every parameter's state with `f(group name, index, var)`; the
/// first error stops it (nothing is replaced by the caller then).
pub(crate) fn load_each<S>(
    groups: &[ParamGroup],
    mut f: impl FnMut(&str, usize, &Var) -> Result<S>,
) -> Result<Vec<Vec<S>>> {
    groups
        .iter()
        .map(|g| {
            g.vars
                .iter()
                .enumerate()
                .map(|(i, v)| f(&g.name, i, v))
                .collect()
        })
        .collect()
}

/// The update loop of a host optimizer: for every parameter with a
/// gradient, `f(group, state, gradient, values)` updates the values (f32,
/// row-major; the gradient already times `grad_scale`), which are then
/// written back.
pub(crate) fn update_each<S>(
    groups: &[ParamGroup],
    state: &mut [Vec<S>],
    grads: &[Vec<Option<Tensor>>],
    grad_scale: f64,
    mut f: impl FnMut(&ParamGroup, &Var, &mut S, &[f32], &mut [f32]) -> Result<()>,
) -> Result<()> {
    for ((group, gstate), ggrads) in groups.iter().zip(state).zip(grads) {
        for ((var, st), grad) in group.vars.iter().zip(gstate).zip(ggrads) {
            let Some(grad) = grad else { continue };
            let g = grad_values(grad, grad_scale)?;
            let mut p = param_values(var)?;
            f(group, var, st, &g, &mut p)?;
            set_param(var, p)?;
        }
    }
    Ok(())
}
