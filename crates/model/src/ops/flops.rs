//! A process-wide FLOP counter for the benchmark (`sd-lora bench`).
//!
//! The frozen linear and conv layers and the attention ops report the
//! floating-point operations of their *forward* here; the benchmark switches
//! the counter on for one forward pass ([`start`]), reads it ([`take`] or
//! [`take_counts`]) and derives the FLOPs of a whole training step from the
//! split by kind (see `docs/performance.md` for the formula).
//!
//! Counted, as multiply-adds × 2:
//!
//! - linear: `2·M·N·K` for `[M, K] × [K, N]` (the bias is not counted);
//! - conv: `2·B·Hout·Wout·Cout·(Cin/groups)·kh·kw`;
//! - attention: the two matmuls, `2·B·tq·tk·d` for `q·kᵀ` and `2·B·tq·tk·dv`
//!   for `p·v` (the softmax and the scaling are not counted).
//!
//! Norms, activations, elementwise ops and the LoRA adapters' own small
//! matmuls are not counted: for an SD UNet they are a fraction of a percent of
//! the total.
//!
//! The counter is off by default and [`add`] is then one relaxed atomic load,
//! so leaving the calls in the ops costs nothing measurable. It is global (not
//! per thread or per model): two forwards counted at the same time in one
//! process add up, which is why its exact-count test lives in its own test
//! binary.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What kind of op reported the FLOPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlopKind {
    /// Frozen linear layers ([`super::FrozenLinear`]).
    Linear,
    /// Frozen 2-D convolutions ([`super::FrozenConv2d`]).
    Conv,
    /// The `q·kᵀ` and `p·v` matmuls of attention.
    Attention,
}

/// FLOPs per kind, as counted since [`start`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FlopCounts {
    pub linear: u64,
    pub conv: u64,
    pub attention: u64,
}

impl FlopCounts {
    /// The sum over all kinds.
    pub fn total(&self) -> u64 {
        self.linear + self.conv + self.attention
    }
}

static ON: AtomicBool = AtomicBool::new(false);
static LINEAR: AtomicU64 = AtomicU64::new(0);
static CONV: AtomicU64 = AtomicU64::new(0);
static ATTENTION: AtomicU64 = AtomicU64::new(0);

fn slot(kind: FlopKind) -> &'static AtomicU64 {
    match kind {
        FlopKind::Linear => &LINEAR,
        FlopKind::Conv => &CONV,
        FlopKind::Attention => &ATTENTION,
    }
}

/// Resets the counts to zero and switches counting on.
pub fn start() {
    for c in [&LINEAR, &CONV, &ATTENTION] {
        c.store(0, Ordering::Relaxed);
    }
    ON.store(true, Ordering::Relaxed);
}

/// Whether counting is on.
pub fn is_on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Switches counting off and returns the counts per kind since [`start`].
pub fn take_counts() -> FlopCounts {
    ON.store(false, Ordering::Relaxed);
    FlopCounts {
        linear: LINEAR.swap(0, Ordering::Relaxed),
        conv: CONV.swap(0, Ordering::Relaxed),
        attention: ATTENTION.swap(0, Ordering::Relaxed),
    }
}

/// Switches counting off and returns the total since [`start`].
pub fn take() -> u64 {
    take_counts().total()
}

/// Adds `n` FLOPs of `kind` when counting is on; otherwise does nothing.
#[inline]
pub fn add(kind: FlopKind, n: u64) {
    if ON.load(Ordering::Relaxed) {
        slot(kind).fetch_add(n, Ordering::Relaxed);
    }
}

/// Adds the FLOPs of a matmul `[m, k] × [k, n]` (`2·m·n·k`) as a linear layer's.
#[inline]
pub fn add_linear(m: usize, n: usize, k: usize) {
    if is_on() {
        add(FlopKind::Linear, 2 * (m as u64) * (n as u64) * (k as u64));
    }
}

/// Adds the FLOPs of a convolution whose output is `out_dims`
/// (`[b, cout, hout, wout]`) with a kernel `kernel_dims` (`[cout, cin/groups,
/// kh, kw]`): `2·b·hout·wout·cout·(cin/groups)·kh·kw`. Other ranks count nothing.
#[inline]
pub fn add_conv(out_dims: &[usize], kernel_dims: &[usize]) {
    if !is_on() {
        return;
    }
    if let ([b, _, ho, wo], [co, ci, kh, kw]) = (out_dims, kernel_dims) {
        let n = [*b, *ho, *wo, *co, *ci, *kh, *kw]
            .iter()
            .fold(2u64, |acc, &d| acc * d as u64);
        add(FlopKind::Conv, n);
    }
}

/// Adds the FLOPs of attention with `q: [..., tq, d]`, `k: [..., tk, d]` and
/// `v: [..., tk, dv]`: `2·B·tq·tk·d` (`q·kᵀ`) + `2·B·tq·tk·dv` (`p·v`), `B` the
/// product of the leading dimensions. Shapes of rank < 2 count nothing.
#[inline]
pub fn add_attention(q: &[usize], k: &[usize], v: &[usize]) {
    if !is_on() {
        return;
    }
    let r = q.len();
    if r < 2 || k.len() != r || v.len() != r {
        return;
    }
    let batch: u64 = q[..r - 2].iter().map(|&d| d as u64).product();
    let (tq, d, tk, dv) = (
        q[r - 2] as u64,
        q[r - 1] as u64,
        k[r - 2] as u64,
        v[r - 1] as u64,
    );
    add(FlopKind::Attention, 2 * batch * tq * tk * (d + dv));
}
