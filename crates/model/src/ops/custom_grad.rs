//! Giving any forward computation a backward pass of our choosing.
//!
//! candle's autograd can only be extended through custom ops (`CustomOp1/2/3` with
//! a `bwd`): the constructors of its `BackpropOp` are private to candle. A custom op
//! normally has to implement its forward separately for every backend, on raw
//! storages. The functions here avoid that: the caller computes the forward
//! *eagerly* with ordinary tensor ops on detached inputs (so candle records no
//! graph for it), and then attaches that result to the real inputs through a small
//! custom op whose forward only hands the precomputed result out and whose `bwd`
//! runs the caller's closure. Because the forward is ordinary tensor code, the same
//! op runs on CPU, CUDA and Metal storages alike.
//!
//! The hand-out costs one copy of the output (a `Storage` cannot be moved out of a
//! tensor); the precomputed tensor is released as soon as it has been copied, so
//! the graph keeps a single copy of the output. When no input takes part in a
//! gradient computation the result is returned as is, without the copy.

use std::sync::Mutex;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, MetalStorage, Result, Shape,
    Storage, Tensor, bail,
};

/// What a backward closure is given.
pub struct BackwardArgs<'a, const N: usize> {
    /// The op's inputs, detached from the graph so that the backward computation
    /// records no graph of its own.
    pub inputs: [&'a Tensor; N],
    /// The op's output (detached), for backward formulas written in terms of it.
    pub output: &'a Tensor,
    /// The gradient of the loss with respect to the output.
    pub grad: &'a Tensor,
    /// Which inputs take part in the gradient computation. A gradient returned for
    /// an input that does not would be stored in the `GradStore` and never used, so
    /// closures should skip computing it; it is discarded here in any case.
    pub needs_grad: [bool; N],
}

/// The backward pass of an op with `N` inputs: one gradient per input, `None`
/// where no gradient is needed.
pub type BackwardFn<const N: usize> =
    Box<dyn Fn(&BackwardArgs<'_, N>) -> Result<[Option<Tensor>; N]> + Send + Sync>;

/// The custom op attached to the inputs: hands out the precomputed output once and
/// runs the backward closure.
struct Attached<const N: usize> {
    name: &'static str,
    /// Taken (and so released) by the forward, which candle runs exactly once.
    output: Mutex<Option<Tensor>>,
    backward: BackwardFn<N>,
}

impl<const N: usize> Attached<N> {
    fn new(name: &'static str, output: Tensor, backward: BackwardFn<N>) -> Self {
        Self {
            name,
            output: Mutex::new(Some(output)),
            backward,
        }
    }

    fn take_output(&self) -> Result<Tensor> {
        let mut slot = match self.output.lock() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        match slot.take() {
            Some(t) => Ok(t),
            None => bail!(
                "{}: the precomputed output was already handed out",
                self.name
            ),
        }
    }

    /// Copies the precomputed output into a fresh storage of the backend `S`;
    /// `pick` selects the matching variant of [`Storage`].
    fn hand_out<S>(&self, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        let output = self.take_output()?;
        let (storage, layout) = output.storage_and_layout();
        let Some(src) = pick(&storage) else {
            bail!(
                "{}: the precomputed output is on another device than the input",
                self.name
            )
        };
        Ok((copy_out(src, layout)?, layout.shape().clone()))
    }

    fn run_backward(
        &self,
        inputs: [&Tensor; N],
        output: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; N]> {
        let needs_grad = inputs.map(|t| t.track_op());
        let detached = inputs.map(|t| t.detach());
        let args = BackwardArgs {
            inputs: std::array::from_fn(|i| &detached[i]),
            output: &output.detach(),
            grad,
            needs_grad,
        };
        let grads = (self.backward)(&args)?;
        let mut out: [Option<Tensor>; N] = std::array::from_fn(|_| None);
        for (i, g) in grads.into_iter().enumerate() {
            let Some(g) = g else { continue };
            if !needs_grad[i] {
                continue;
            }
            if g.dims() != inputs[i].dims() {
                bail!(
                    "{}: gradient of input {i} has shape {:?}, the input {:?}",
                    self.name,
                    g.dims(),
                    inputs[i].dims()
                )
            }
            out[i] = Some(g.to_dtype(inputs[i].dtype())?);
        }
        Ok(out)
    }
}

/// A contiguous copy of `src` viewed through `layout`, on the same backend.
fn copy_out<S>(src: &S, layout: &Layout) -> Result<S>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    // SAFETY: `copy_strided_src` writes every element of the new storage (it has
    // exactly `layout.shape().elem_count()` elements) before anyone reads it.
    let mut dst = unsafe { src.device().alloc_uninit(layout.shape(), src.dtype())? };
    src.copy_strided_src(&mut dst, 0, layout)?;
    Ok(dst)
}

fn cpu(s: &Storage) -> Option<&CpuStorage> {
    match s {
        Storage::Cpu(s) => Some(s),
        _ => None,
    }
}

fn cuda(s: &Storage) -> Option<&CudaStorage> {
    match s {
        Storage::Cuda(s) => Some(s),
        _ => None,
    }
}

fn metal(s: &Storage) -> Option<&MetalStorage> {
    match s {
        Storage::Metal(s) => Some(s),
        _ => None,
    }
}

impl CustomOp1 for Attached<1> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.hand_out(cpu)
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.hand_out(cuda)
    }
    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.hand_out(metal)
    }
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let [g] = self.run_backward([arg], res, grad)?;
        Ok(g)
    }
}

impl CustomOp2 for Attached<2> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.hand_out(cpu)
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.hand_out(cuda)
    }
    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.hand_out(metal)
    }
    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [g1, g2] = self.run_backward([a1, a2], res, grad)?;
        Ok((g1, g2))
    }
}

impl CustomOp3 for Attached<3> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.hand_out(cpu)
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.hand_out(cuda)
    }
    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.hand_out(metal)
    }
    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [g1, g2, g3] = self.run_backward([a1, a2, a3], res, grad)?;
        Ok((g1, g2, g3))
    }
}

/// Attaches `output`, computed from `x` without a graph, to `x` with the gradient
/// given by `backward`.
///
/// `output` must be a tensor of its own (computed by an op that allocates), not a
/// view sharing `x`'s storage: the hand-out reads it while candle holds `x`'s
/// storage for the op.
pub fn with_grad1<F>(name: &'static str, x: &Tensor, output: Tensor, backward: F) -> Result<Tensor>
where
    F: Fn(&BackwardArgs<'_, 1>) -> Result<[Option<Tensor>; 1]> + Send + Sync + 'static,
{
    if !x.track_op() {
        return Ok(output);
    }
    x.apply_op1(Attached::<1>::new(name, output, Box::new(backward)))
}

/// Two-input version of [`with_grad1`].
pub fn with_grad2<F>(
    name: &'static str,
    inputs: [&Tensor; 2],
    output: Tensor,
    backward: F,
) -> Result<Tensor>
where
    F: Fn(&BackwardArgs<'_, 2>) -> Result<[Option<Tensor>; 2]> + Send + Sync + 'static,
{
    let [a, b] = inputs;
    if !a.track_op() && !b.track_op() {
        return Ok(output);
    }
    a.apply_op2(b, Attached::<2>::new(name, output, Box::new(backward)))
}

/// Three-input version of [`with_grad1`].
pub fn with_grad3<F>(
    name: &'static str,
    inputs: [&Tensor; 3],
    output: Tensor,
    backward: F,
) -> Result<Tensor>
where
    F: Fn(&BackwardArgs<'_, 3>) -> Result<[Option<Tensor>; 3]> + Send + Sync + 'static,
{
    let [a, b, c] = inputs;
    if !a.track_op() && !b.track_op() && !c.track_op() {
        return Ok(output);
    }
    a.apply_op3(b, c, Attached::<3>::new(name, output, Box::new(backward)))
}

/// `x + other` where only `x` receives a gradient; `other` must broadcast to the
/// shape of `x` (the result has the shape of `x`).
///
/// A plain `x.broadcast_add(other)` with a constant `other` (a frozen bias, an
/// attention mask) makes candle store a full-size zero-filled gradient for the
/// broadcast copy of `other` that nothing ever reads.
pub fn add_frozen(x: &Tensor, other: &Tensor) -> Result<Tensor> {
    let y = x.detach().broadcast_add(&other.detach())?;
    with_grad1("add-frozen", x, y, |a| Ok([Some(a.grad.clone())]))
}
