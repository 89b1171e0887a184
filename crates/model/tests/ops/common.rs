//! Shared test helpers: a seeded generator, gradient checks against finite
//! differences, and GradStore inspection.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use sd_lora_model::ops::with_grad1;

/// xorshift64*: deterministic inputs (candle's CPU `randn` cannot be seeded).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A tensor of standard normals.
    pub fn tensor(&mut self, shape: &[usize], dtype: DType) -> Tensor {
        let n = shape.iter().product();
        let data: Vec<f64> = (0..n).map(|_| self.normal()).collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("tensor")
    }
}

/// Number of entries in a GradStore. It has no `len`, but its `Debug` prints each
/// key as `TensorId(n)` (and tensors print no ids).
pub fn grad_entries(grads: &GradStore) -> usize {
    format!("{grads:?}").matches("TensorId(").count()
}

/// `Σ y·u` as a scalar whose backward injects `u` as the gradient of `y`, without
/// the zero-filled gradient entry that `(y * u).sum_all()` leaves for the
/// constant `u`.
pub fn dot_loss(y: &Tensor, u: &Tensor) -> Result<Tensor> {
    let value = (y.detach() * u)?.sum_all()?;
    let u = u.clone();
    with_grad1("dot-loss", y, value, move |a| {
        Ok([Some(u.broadcast_mul(a.grad)?)])
    })
}

/// The result of a gradient check: the largest relative error per input checked
/// (max |analytic − numeric| / max |numeric|) and the GradStore's entry count.
pub struct GradCheck {
    pub rel_errors: Vec<f64>,
    pub entries: usize,
}

/// Checks the gradients of `f` with respect to the inputs marked in `wrt` against
/// central finite differences, for the loss `Σ f(inputs)·u` with a random `u`.
/// Inputs must be f64. Inputs not in `wrt` are passed as plain (frozen) tensors.
pub fn check_grads<F>(f: F, inputs: &[Tensor], wrt: &[bool], rng: &mut Rng) -> GradCheck
where
    F: Fn(&[Tensor]) -> Result<Tensor>,
{
    const EPS: f64 = 1e-5;
    let vars: Vec<Option<Var>> = inputs
        .iter()
        .zip(wrt)
        .map(|(t, &w)| w.then(|| Var::from_tensor(t).expect("var")))
        .collect();
    let args: Vec<Tensor> = inputs
        .iter()
        .zip(&vars)
        .map(|(t, v)| {
            v.as_ref()
                .map_or_else(|| t.clone(), |v| v.as_tensor().clone())
        })
        .collect();
    let y = f(&args).expect("forward");
    let u = rng.tensor(y.dims(), DType::F64);
    let grads = dot_loss(&y, &u)
        .and_then(|l| l.backward())
        .expect("backward");

    let loss_at = |xs: &[Tensor]| -> f64 {
        let y = f(xs).expect("forward");
        (y * &u)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.to_scalar::<f64>())
            .expect("loss")
    };
    let mut rel_errors = Vec::new();
    for (i, var) in vars.iter().enumerate() {
        let Some(var) = var else { continue };
        let analytic = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for input {i}"))
            .flatten_all()
            .and_then(|t| t.to_vec1::<f64>())
            .expect("grad values");
        let base = inputs[i]
            .flatten_all()
            .and_then(|t| t.to_vec1::<f64>())
            .expect("values");
        let mut xs = inputs.to_vec();
        let (mut max_diff, mut max_num) = (0f64, 0f64);
        for j in 0..base.len() {
            let mut eval = |delta: f64| {
                let mut v = base.clone();
                v[j] += delta;
                xs[i] = Tensor::from_vec(v, inputs[i].dims(), &Device::Cpu).expect("tensor");
                loss_at(&xs)
            };
            let numeric = (eval(EPS) - eval(-EPS)) / (2.0 * EPS);
            max_diff = max_diff.max((analytic[j] - numeric).abs());
            max_num = max_num.max(numeric.abs());
        }
        rel_errors.push(max_diff / max_num.max(1e-12));
    }
    GradCheck {
        rel_errors,
        entries: grad_entries(&grads),
    }
}

/// Asserts a gradient check passed: every error within `tol`, and exactly one
/// GradStore entry per input checked (nothing stored for frozen inputs).
pub fn assert_grads_ok(name: &str, check: &GradCheck, tol: f64) {
    println!("{name}: relative gradient errors {:?}", check.rel_errors);
    for (i, e) in check.rel_errors.iter().enumerate() {
        assert!(*e < tol, "{name}: input {i} gradient error {e:e} > {tol:e}");
    }
    assert_eq!(
        check.entries,
        check.rel_errors.len(),
        "{name}: GradStore holds entries besides the inputs checked"
    );
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_dtype(DType::F64))
        .and_then(|d| d.to_scalar::<f64>())
        .expect("diff")
}

/// max |a − b| / max |b|, both read as f64.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (
        a.to_dtype(DType::F64).expect("a"),
        b.to_dtype(DType::F64).expect("b"),
    );
    let scale = b
        .abs()
        .and_then(|t| t.max_all())
        .and_then(|t| t.to_scalar::<f64>())
        .expect("scale");
    max_abs_diff(&a, &b) / scale
}

/// How an op's f32 CPU path (its one-pass kernels) compares with the generic
/// tensor-op path that f64 takes: runs `f(x, dtype)` on `x` (f64) as is and
/// converted to f32, backpropagates `Σ f(x)·u` in each, and returns the
/// relative differences of the f32 output and input gradient from the f64 ones.
/// `f` converts any other operands to `dtype` itself.
pub fn f32_against_f64<F>(f: F, x: &Tensor, u: &Tensor) -> (f64, f64)
where
    F: Fn(&Tensor, DType) -> Result<Tensor>,
{
    let run = |dtype: DType| {
        let v = Var::from_tensor(&x.to_dtype(dtype).expect("x")).expect("var");
        let y = f(v.as_tensor(), dtype).expect("forward");
        let u = u.to_dtype(dtype).expect("u");
        let grads = (&y * &u)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .expect("backward");
        let dx = grads.get(v.as_tensor()).expect("input gradient").clone();
        (y, dx)
    };
    let (y64, dx64) = run(DType::F64);
    let (y32, dx32) = run(DType::F32);
    (rel_diff(&y32, &y64), rel_diff(&dx32, &dx64))
}
