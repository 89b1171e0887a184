//! Gradient checkpointing: run a segment of the network without keeping its
//! activations, and recompute them when the backward pass reaches it.
//!
//! candle has neither a no-grad mode nor checkpointing, and a tensor's graph
//! keeps every intermediate it was computed from alive until the loss is
//! dropped. [`checkpoint`] builds both from [`super::custom_grad`]:
//!
//! - **forward**: the segment runs on *detached* inputs with the thread-local
//!   no-grad switch on ([`no_grad`]), under which LoRA adapters read their
//!   `down`/`up` through [`param`] (detached), so candle records no graph
//!   inside the segment at all; the (detached) output is attached to the real
//!   inputs with a custom backward. The graph then holds only the segment's
//!   inputs and one copy of its output; the activations inside are freed as
//!   soon as the segment returns.
//! - **backward**: the closure re-runs the segment with gradients on, on
//!   fresh tracked copies of the inputs that need a gradient (a [`Var`] each;
//!   inputs that need none — a frozen text encoder's context, a time embedding
//!   with no LoRA upstream — stay plain tensors), and backpropagates the
//!   incoming gradient through that small graph. The input gradients go back
//!   to candle; the gradients of the segment's LoRA parameters cannot (a custom
//!   op has at most three inputs), so they are put in a thread-local side
//!   store, which [`backward`] merges into the [`GradStore`] it returns.
//!
//! So **callers that may have checkpointing on must call [`backward`] instead
//! of `loss.backward()`**; with checkpointing off the two are identical.
//!
//! [`no_grad`] is also useful on its own: frozen weights are plain tensors, so
//! with LoRA parameters detached a forward on untracked inputs (sampling a
//! preview during training) records no graph at all, checkpointing or not.
//!
//! The recomputation gives bit-identical activations: the segment runs the
//! same ops on the same values, and trainable layers must make any randomness a
//! pure function of their inputs and the step (LoRA dropout masks depend on
//! (seed, module, step) only), so it repeats as long as
//! the step is not advanced between the forward and the backward. Gradients
//! equal a plain backward up to the order in which the contributions to a
//! segment's input are summed (~1e-7 relative in f32).
//!
//! # Memory
//!
//! candle's backward drops each non-variable node's gradient as soon as the
//! node is processed (`GradStore::remove` in `Tensor::backward`), but the
//! forward graph itself stays alive until the loss is dropped. With
//! checkpointing that graph holds only the segment boundaries; during the
//! backward one segment's activations exist at a time.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId, Var, bail};

use super::custom_grad::{with_grad1, with_grad2, with_grad3};

thread_local! {
    /// Whether the no-grad switch is on (inside a checkpointed forward).
    static NO_GRAD: Cell<bool> = const { Cell::new(false) };
    /// Whether a segment's recomputation (its backward) is running.
    static RECOMPUTING: Cell<bool> = const { Cell::new(false) };
    /// LoRA parameter gradients computed by segment recomputations, keyed by
    /// the variable's tensor id, waiting for [`backward`] to merge them.
    static SIDE_GRADS: RefCell<HashMap<TensorId, Tensor>> = RefCell::new(HashMap::new());
}

/// Restores the previous state of the no-grad switch when dropped (also on an
/// early return through `?` or a panic).
struct GradMode(bool);

impl GradMode {
    fn set(enabled: bool) -> Self {
        Self(NO_GRAD.with(|c| c.replace(!enabled)))
    }
}

impl Drop for GradMode {
    fn drop(&mut self) {
        NO_GRAD.with(|c| c.set(self.0));
    }
}

/// Marks a segment's recomputation until dropped (restoring the previous
/// state, so nested segments work).
struct Recomputing(bool);

impl Recomputing {
    fn enter() -> Self {
        Self(RECOMPUTING.with(|c| c.replace(true)))
    }
}

impl Drop for Recomputing {
    fn drop(&mut self) {
        RECOMPUTING.with(|c| c.set(self.0));
    }
}

/// Whether this thread is re-running a checkpointed segment for its backward.
/// Checkpointing trades time for memory, so layers that can recompute a large
/// intermediate in their own backward instead of keeping it (the feed-forward's
/// hidden layer, [`crate::blocks::FeedForward`]) do so here, where the segment's
/// whole forward is being recomputed anyway.
pub fn is_recomputing() -> bool {
    RECOMPUTING.with(Cell::get)
}

/// Whether gradients are recorded on this thread (false inside [`no_grad`]).
pub fn is_grad_enabled() -> bool {
    !NO_GRAD.with(Cell::get)
}

/// Runs `f` with the no-grad switch on: trainable parameters read through
/// [`param`] are detached, so `f` records no graph when its inputs are
/// detached too.
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let _mode = GradMode::set(false);
    f()
}

/// The tensor of a trainable parameter as a layer should use it: the variable
/// itself, or a detached view of it while the no-grad switch is on.
pub fn param(var: &Var) -> Tensor {
    if is_grad_enabled() {
        var.as_tensor().clone()
    } else {
        var.as_tensor().detach()
    }
}

/// Runs `f(inputs)` as a checkpointed segment whose trainable parameters are
/// `params` (see the module docs). `f` must be deterministic and must read
/// every trainable parameter it uses through [`param`] (LoRA adapters do);
/// parameters it uses that are not in `params` get no gradient.
///
/// Inputs that take part in no gradient computation (a frozen text encoder's
/// context, a time embedding with no LoRA upstream) are kept by the closure as
/// constants; at most three inputs may be tracked (a custom op has at most
/// three inputs). Taking several inputs lets a segment start with cheap glue
/// such as the up path's concatenation, whose output then is not kept.
///
/// Falls back to a plain `f(inputs)` when there is nothing to differentiate (no
/// input tracked and no parameter) or when already inside a no-grad region.
pub fn checkpoint<F>(name: &'static str, inputs: &[&Tensor], params: &[Var], f: F) -> Result<Tensor>
where
    F: Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
{
    let graph_inputs: Vec<&Tensor> = inputs.iter().copied().filter(|t| t.track_op()).collect();
    if !is_grad_enabled() || (graph_inputs.is_empty() && params.is_empty()) {
        return f(&inputs.iter().map(|t| (*t).clone()).collect::<Vec<_>>());
    }
    if graph_inputs.len() > 3 {
        bail!(
            "{name}: {} inputs need a gradient; a checkpointed segment takes at most 3",
            graph_inputs.len()
        )
    }
    // The final detach drops any graph `f` might still have recorded (a frozen
    // weight that happens to be a `Var`), so no activation survives.
    let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    let output = no_grad(|| f(&detached))?.detach();
    // The closure keeps the untracked inputs; the tracked ones come back as the
    // op's inputs in the backward (one copy kept, by the graph).
    let constants = inputs
        .iter()
        .zip(detached)
        .map(|(t, d)| (!t.track_op()).then_some(d))
        .collect();
    let segment = Segment {
        f,
        constants,
        params: params.to_vec(),
    };
    match graph_inputs[..] {
        [] => {
            // No input is tracked but the segment has parameters: the first one
            // anchors the op in the graph (a variable always is). Its slot
            // returns no gradient: all parameter gradients go to the side store.
            let anchor = params[0].as_tensor();
            with_grad1(name, anchor, output, move |args| {
                segment.recompute(&[], &[], args.grad)?;
                Ok([None])
            })
        }
        [a] => with_grad1(name, a, output, move |args| {
            segment.input_grads(&args.inputs, &args.needs_grad, args.grad)
        }),
        [a, b] => with_grad2(name, [a, b], output, move |args| {
            segment.input_grads(&args.inputs, &args.needs_grad, args.grad)
        }),
        [a, b, c] => with_grad3(name, [a, b, c], output, move |args| {
            segment.input_grads(&args.inputs, &args.needs_grad, args.grad)
        }),
        _ => unreachable!("at most three tracked inputs, checked above"),
    }
}

/// What a checkpointed segment's backward needs to re-run it.
struct Segment<F> {
    f: F,
    /// Every input of `f` that is not tracked; `None` where it is (its value
    /// arrives, in order, as the op's next input in the backward).
    constants: Vec<Option<Tensor>>,
    params: Vec<Var>,
}

impl<F> Segment<F>
where
    F: Fn(&[Tensor]) -> Result<Tensor>,
{
    /// [`Self::recompute`] for a custom op with `N` inputs.
    fn input_grads<const N: usize>(
        &self,
        inputs: &[&Tensor; N],
        needs: &[bool; N],
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; N]> {
        let grads = self.recompute(inputs, needs, grad)?;
        let n = grads.len();
        grads.try_into().map_err(|_| {
            candle_core::Error::Msg(format!(
                "checkpointed segment: {n} input gradients for {N} inputs"
            ))
        })
    }

    /// The backward of the segment: re-runs `f` with gradients on (a tracked
    /// copy of each tracked input that `needs` a gradient), backpropagates
    /// `grad` from its output, stashes the parameters' gradients and returns
    /// the tracked inputs' gradients.
    fn recompute(
        &self,
        inputs: &[&Tensor],
        needs: &[bool],
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let _mode = GradMode::set(true);
        let _recomputing = Recomputing::enter();
        let mut given = inputs.iter().zip(needs);
        let mut vars = Vec::with_capacity(inputs.len());
        let mut args = Vec::with_capacity(self.constants.len());
        for constant in &self.constants {
            if let Some(t) = constant {
                args.push(t.clone());
                continue;
            }
            let Some((&input, &need)) = given.next() else {
                bail!("checkpointed segment: fewer inputs than tracked arguments")
            };
            let var = need.then(|| Var::from_tensor(input)).transpose()?;
            args.push(var.as_ref().map_or(input, Var::as_tensor).clone());
            vars.push(var);
        }
        let output = (self.f)(&args)?;
        drop(args);
        // Backpropagate `grad` without building `(output · grad).sum()`: a
        // scalar whose backward hands `grad` straight to `output`.
        let zero = Tensor::zeros((), output.dtype(), output.device())?;
        let g = grad.clone();
        let root = with_grad1("checkpoint-vjp", &output, zero, move |_| {
            Ok([Some(g.clone())])
        })?;
        let grads = root.backward()?;
        drop(root);
        drop(output);
        SIDE_GRADS.with(|store| -> Result<()> {
            let mut store = store.borrow_mut();
            for p in &self.params {
                let Some(g) = grads.get(p.as_tensor()) else {
                    continue;
                };
                let id = p.as_tensor().id();
                let sum = match store.remove(&id) {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                };
                store.insert(id, sum);
            }
            Ok(())
        })?;
        // candle expects a gradient for every tracked input it handed us (it
        // fails on a node whose gradient was never populated), so a path that
        // turned out not to reach the output gives zeros.
        vars.iter()
            .map(|v| match v {
                None => Ok(None),
                Some(v) => match grads.get(v.as_tensor()) {
                    Some(g) => Ok(Some(g.clone())),
                    None => Ok(Some(v.as_tensor().zeros_like()?)),
                },
            })
            .collect()
    }
}

/// `loss.backward()`, plus the parameter gradients that checkpointed segments
/// computed during their recomputation (added to any gradient the parameter
/// got outside the segments). Identical to `loss.backward()` when no segment
/// ran checkpointed.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    // Leftovers of a plain `loss.backward()` on a checkpointed graph, or of a
    // backward that failed half-way, must not leak into this step.
    SIDE_GRADS.with(|s| s.borrow_mut().clear());
    let result = loss.backward();
    let side = SIDE_GRADS.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let mut grads = result?;
    for (id, g) in side {
        let sum = match grads.get_id(id) {
            Some(prev) => (prev + &g)?,
            None => g,
        };
        grads.insert_id(id, sum);
    }
    Ok(grads)
}
