//! Counting the tensor operations of a training step.
//!
//! On a GPU every candle op is at least one kernel launch, and at batch 1 a
//! step that issues thousands of small ops is bound by the host issuing them,
//! not by the device. The count is what fusing ops and dropping copies has to
//! bring down, so `sd-lora bench --train` prints it per step, on any device.
//!
//! What is counted:
//!
//! - **tensors created**: candle gives every tensor it creates — the result of
//!   an op, a copy, and also a view (reshape, transpose, narrow, broadcast,
//!   detach) — the next value of one process-wide counter (its `TensorId`).
//!   The difference of that counter over a step is read here without any hook
//!   in candle. Views launch no kernel, so this is an upper bound of the ops
//!   that do work; it is exact and costs nothing to keep on.
//! - **in-place updates**: work that writes an existing storage and creates no
//!   tensor (`Var::set`, our fused optimizer kernel), which the ops report
//!   through [`add_in_place`].
//!
//! Both counters are global: ops run on other threads during a step (there
//! are none in training) would be counted too.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};

static IN_PLACE: AtomicU64 = AtomicU64::new(0);

/// A reading of the two counters; subtract two readings to count what
/// happened between them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpCount {
    /// Tensors candle created (ops, copies and views).
    pub tensors: u64,
    /// In-place updates reported by [`add_in_place`].
    pub in_place: u64,
}

impl OpCount {
    /// The counters now. Reading creates one empty CPU tensor (no allocation),
    /// which is subtracted again by [`since`](Self::since).
    pub fn now() -> Self {
        OpCount {
            tensors: next_tensor_id(),
            in_place: IN_PLACE.load(Ordering::Relaxed),
        }
    }

    /// What was counted from `self` (an earlier reading) until now.
    pub fn since(self) -> Self {
        let now = Self::now();
        OpCount {
            // The reading itself created one tensor.
            tensors: now.tensors.saturating_sub(self.tensors + 1),
            in_place: now.in_place.saturating_sub(self.in_place),
        }
    }

    /// Tensors created plus in-place updates.
    pub fn total(&self) -> u64 {
        self.tensors + self.in_place
    }
}

/// Reports `n` in-place updates (work that creates no tensor).
pub fn add_in_place(n: u64) {
    IN_PLACE.fetch_add(n, Ordering::Relaxed);
}

/// The id candle gave the tensor it created last, plus one: an empty tensor
/// is created and its id read. `TensorId` has no public accessor; its `Debug`
/// output is `TensorId(n)`.
fn next_tensor_id() -> u64 {
    let Ok(t) = Tensor::zeros(0, DType::U8, &Device::Cpu) else {
        return 0;
    };
    let id = format!("{:?}", t.id());
    id.trim_start_matches("TensorId(")
        .trim_end_matches(')')
        .parse()
        .unwrap_or(0)
}

/// Graph nodes between `loss` and the variables it depends on: the nodes the
/// backward pass visits (each one runs at least one op there).
pub fn graph_nodes(loss: &Tensor) -> usize {
    loss.sorted_nodes().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_ops_and_views_and_in_place() -> candle_core::Result<()> {
        let a = Tensor::ones((4, 4), DType::F32, &Device::Cpu)?;
        let start = OpCount::now();
        let b = (&a + 1.0)?; // one op
        let c = b.t()?; // one view
        let _d = c.contiguous()?; // one copy
        add_in_place(2);
        let n = start.since();
        // Other tests in this binary may create tensors concurrently: at least
        // what this one did.
        assert!(n.tensors >= 3, "{n:?}");
        assert!(n.in_place >= 2, "{n:?}");
        Ok(())
    }

    #[test]
    fn graph_nodes_counts_the_backward_path() -> candle_core::Result<()> {
        let w = candle_core::Var::ones((3,), DType::F32, &Device::Cpu)?;
        let x = Tensor::ones((3,), DType::F32, &Device::Cpu)?;
        let loss = (w.as_tensor() * &x)?.sqr()?.sum_all()?;
        // mul, sqr, sum (kept dims) and its reshape to a scalar, and the Var.
        assert_eq!(graph_nodes(&loss), 5);
        Ok(())
    }
}
