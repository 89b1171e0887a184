//! The LoRA variants beside plain LoRA: DoRA, LoHa and LoKr, as LyCORIS defines
//! them (the library kohya users train them with, and whose formulas A1111/Forge
//! and ComfyUI implement to load them).
//!
//! - **DoRA** (weight-decomposed LoRA): a LoRA `Δ = (alpha/rank)·up·down` plus a
//!   trained magnitude `m` (`dora_scale`): the adapted weight is
//!   `m ⊙ (W + Δ) / ‖W + Δ‖`, the norm taken per output row ([`DoraAxis::Output`],
//!   LyCORIS' default, the DoRA paper's, PEFT's and diffusers') or per input
//!   column ([`DoraAxis::Input`], which A1111's built-in loader assumes). As in
//!   LyCORIS the norm is not detached and gets `f32::EPSILON` added. With an
//!   inference multiplier `w` the weight is `W + w·(DoRA(W) − W)`, as ComfyUI
//!   and A1111 apply it.
//! - **LoHa** (Hadamard product): `ΔW = (alpha/rank)·(w1_a·w1_b) ⊙ (w2_a·w2_b)`,
//!   with `w1_a, w2_a: [out, rank]`, `w1_b, w2_b: [rank, in·kh·kw]`.
//! - **LoKr** (Kronecker product): `ΔW = scale·(w1 ⊗ w2)`, `w1: [a, c]`,
//!   `w2: [b, d]` (or `[b, d, kh, kw]`) with `out = a·b`, `in = c·d`; either factor
//!   may be stored as a low-rank product (`lokr_w1_a·lokr_w1_b`). The scale is
//!   `alpha / rank` when a factor is low-rank (rank = its inner dimension) and 1
//!   when both are full, as LyCORIS, A1111 and ComfyUI all read it.
//!
//! The update formulas here take plain tensors, so the trainable adapters (whose
//! parameters are candle variables) and the files' modules (merging, `generate`)
//! share one implementation; every op used has a backward in candle.

use candle_core::{DType, Result, Tensor};

/// What the trained modules are made of (`network.type`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum NetworkType {
    /// Plain LoRA: `(alpha/rank)·up·down`.
    #[default]
    Lora,
    /// LoRA with a trained per-row (or per-column) magnitude (LyCORIS `dora_wd`).
    Dora,
    /// LyCORIS LoHa: a Hadamard product of two low-rank products.
    Loha,
    /// LyCORIS LoKr: a Kronecker product of a small and a (low-rank) large factor.
    Lokr,
}

impl NetworkType {
    /// Every type, in the order the docs list them.
    pub const ALL: [NetworkType; 4] = [
        NetworkType::Lora,
        NetworkType::Dora,
        NetworkType::Loha,
        NetworkType::Lokr,
    ];

    /// The config/metadata name: `lora`, `dora`, `loha`, `lokr`.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkType::Lora => "lora",
            NetworkType::Dora => "dora",
            NetworkType::Loha => "loha",
            NetworkType::Lokr => "lokr",
        }
    }

    /// How users name it: `LoRA`, `DoRA`, `LoHa`, `LoKr`.
    pub fn display_name(self) -> &'static str {
        match self {
            NetworkType::Lora => "LoRA",
            NetworkType::Dora => "DoRA",
            NetworkType::Loha => "LoHa",
            NetworkType::Lokr => "LoKr",
        }
    }
}

impl std::fmt::Display for NetworkType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Along which axis DoRA's magnitude runs (`network.dora_axis`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum DoraAxis {
    /// One magnitude per output row (`dora_scale: [out, 1]`): the DoRA paper's,
    /// LyCORIS' default (`wd_on_output=True`), PEFT's and diffusers'.
    #[default]
    Output,
    /// One magnitude per input column (`dora_scale: [1, in]`): what A1111's
    /// built-in LoRA loader applies; PEFT/diffusers cannot express it.
    Input,
}

impl DoraAxis {
    /// The axis a stored `dora_scale` of `shape` runs along, for a layer with
    /// `out` outputs and `in_` inputs (`None` when it fits neither).
    pub fn of_shape(shape: &[usize], out: usize, in_: usize) -> Option<DoraAxis> {
        let rest_ones = shape.len() >= 2 && shape[2..].iter().all(|&d| d == 1);
        if !rest_ones {
            return None;
        }
        if shape[0] == out && shape[1] == 1 {
            Some(DoraAxis::Output)
        } else if shape[0] == 1 && shape[1] == in_ {
            Some(DoraAxis::Input)
        } else {
            None
        }
    }

    /// The shape of the magnitude for a weight of `weight_shape`.
    pub fn magnitude_shape(self, weight_shape: &[usize]) -> Vec<usize> {
        let mut s = vec![1; weight_shape.len()];
        match self {
            DoraAxis::Output => s[0] = weight_shape[0],
            DoraAxis::Input => s[1] = weight_shape[1],
        }
        s
    }

    /// The dimensions summed over for the norm.
    fn norm_dims(self, rank: usize) -> Vec<usize> {
        match self {
            DoraAxis::Output => (1..rank).collect(),
            DoraAxis::Input => std::iter::once(0).chain(2..rank).collect(),
        }
    }
}

/// The column norms of `w` along `axis` (shaped like the magnitude): DoRA's
/// initial magnitude, and its normaliser.
pub fn dora_norm(w: &Tensor, axis: DoraAxis) -> Result<Tensor> {
    w.sqr()?.sum_keepdim(axis.norm_dims(w.rank()))?.sqrt()
}

/// `multiplier · (m ⊙ (W + Δ)/(‖W + Δ‖ + ε) − W)`: what DoRA adds to the weight
/// `weight` (in `delta`'s dtype) given the scaled low-rank update `delta` and
/// the magnitude `magnitude`. Differentiable in `delta` and `magnitude`.
pub fn dora_delta(
    weight: &Tensor,
    delta: &Tensor,
    magnitude: &Tensor,
    axis: DoraAxis,
    multiplier: f64,
) -> Result<Tensor> {
    let merged = (weight + delta)?;
    let norm = (dora_norm(&merged, axis)? + f32::EPSILON as f64)?;
    let scaled = merged.broadcast_mul(&magnitude.broadcast_div(&norm)?)?;
    let d = (scaled - weight)?;
    if multiplier == 1.0 {
        Ok(d)
    } else {
        d * multiplier
    }
}

/// LoHa's `scale · (w1_a·w1_b) ⊙ (w2_a·w2_b)` reshaped to `shape`.
pub fn hada_delta(
    [w1_a, w1_b, w2_a, w2_b]: [&Tensor; 4],
    scale: f64,
    shape: &[usize],
) -> Result<Tensor> {
    let p1 = w1_a.matmul(w1_b)?;
    let p2 = w2_a.matmul(w2_b)?;
    (p1.mul(&p2)? * scale)?.reshape(shape)
}

/// LoKr's `scale · (w1 ⊗ w2)` reshaped to `shape`; `w1: [a, c]`, `w2` flattened
/// to `[b, d·kh·kw]`.
pub fn kron_delta(w1: &Tensor, w2: &Tensor, scale: f64, shape: &[usize]) -> Result<Tensor> {
    let (a, c) = w1.dims2()?;
    let b = w2.dim(0)?;
    let d = w2.elem_count() / b.max(1);
    let w2 = w2.reshape((1, b, 1, d))?;
    let k = w1.reshape((a, 1, c, 1))?.broadcast_mul(&w2)?;
    (k.reshape((a * b, c * d))? * scale)?.reshape(shape)
}

/// LyCORIS' split of `dimension` into `(m, n)`, `m ≤ n`, `m·n = dimension`: with
/// `factor > 0` dividing it, `(factor, dimension/factor)` (ordered); otherwise the
/// pair closest to a square with `m ≤ factor` (no bound for `factor ≤ 0`).
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        let m = factor as usize;
        let n = dimension / m;
        return (m.min(n), m.max(n));
    }
    let bound = if factor <= 0 {
        dimension
    } else {
        factor as usize
    };
    let (mut m, mut n) = (1usize, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > bound {
            break;
        }
        m = new_m;
        n = new_n;
    }
    (m.min(n), m.max(n))
}

/// One LoKr factor: stored whole or as a low-rank product `a·b`.
#[derive(Debug, Clone)]
pub enum KronFactor {
    /// `lokr_w1` / `lokr_w2`.
    Full(Tensor),
    /// `lokr_w1_a`·`lokr_w1_b` (or `_w2_`): `a: [rows, rank]`, `b: [rank, cols]`.
    LowRank { a: Tensor, b: Tensor },
}

impl KronFactor {
    /// The factor as one tensor (`a·b` for a low-rank one).
    pub fn tensor(&self) -> Result<Tensor> {
        match self {
            KronFactor::Full(t) => Ok(t.clone()),
            KronFactor::LowRank { a, b } => a.matmul(b),
        }
    }

    /// The inner dimension of a low-rank factor.
    pub fn rank(&self) -> Option<usize> {
        match self {
            KronFactor::Full(_) => None,
            KronFactor::LowRank { b, .. } => b.dims().first().copied(),
        }
    }

    /// `(rows, columns)` of the factor flattened to 2-D (`None` if malformed).
    fn flat_dims(&self) -> Option<(usize, usize)> {
        match self {
            KronFactor::Full(t) => {
                let d = t.dims();
                (d.len() >= 2).then(|| (d[0], d[1..].iter().product()))
            }
            KronFactor::LowRank { a, b } => match (a.dims(), b.dims()) {
                ([r, ra], [rb, c]) if ra == rb => Some((*r, *c)),
                _ => None,
            },
        }
    }

    /// The tensors, with their key suffixes for `w1` or `w2` (`which` = 1 or 2).
    pub fn named(&self, which: u8) -> Vec<(String, &Tensor)> {
        match self {
            KronFactor::Full(t) => vec![(format!("lokr_w{which}"), t)],
            KronFactor::LowRank { a, b } => vec![
                (format!("lokr_w{which}_a"), a),
                (format!("lokr_w{which}_b"), b),
            ],
        }
    }

    fn map(&self, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<KronFactor> {
        Ok(match self {
            KronFactor::Full(t) => KronFactor::Full(f(t)?),
            KronFactor::LowRank { a, b } => KronFactor::LowRank { a: f(a)?, b: f(b)? },
        })
    }
}

/// A LyCORIS LoHa or LoKr module as stored in a file (f32 tensors).
#[derive(Debug, Clone)]
pub enum LycorisModule {
    /// LoHa: `hada_w1_a [out, r]`, `hada_w1_b [r, in·k]`, `hada_w2_a`, `hada_w2_b`.
    Hada {
        w1_a: Tensor,
        w1_b: Tensor,
        w2_a: Tensor,
        w2_b: Tensor,
        alpha: f32,
    },
    /// LoKr: `w1 [a, c]` and `w2 [b, d(, kh, kw)]`, either possibly low-rank.
    Kron {
        w1: KronFactor,
        w2: KronFactor,
        alpha: f32,
    },
}

impl LycorisModule {
    /// `loha` or `lokr`.
    pub fn network_type(&self) -> NetworkType {
        match self {
            LycorisModule::Hada { .. } => NetworkType::Loha,
            LycorisModule::Kron { .. } => NetworkType::Lokr,
        }
    }

    /// The stored alpha.
    pub fn alpha(&self) -> f32 {
        match self {
            LycorisModule::Hada { alpha, .. } | LycorisModule::Kron { alpha, .. } => *alpha,
        }
    }

    /// The rank users set (`dim`): LoHa's inner dimension; LoKr's low-rank
    /// factor's (the large one's first), `None` when both factors are full.
    pub fn rank(&self) -> Option<usize> {
        match self {
            LycorisModule::Hada { w1_b, .. } => w1_b.dims().first().copied(),
            LycorisModule::Kron { w1, w2, .. } => w2.rank().or(w1.rank()),
        }
    }

    /// The factor on the update: `alpha / rank` (1 for a LoKr with both factors full).
    pub fn scale(&self) -> f64 {
        match self.rank() {
            Some(r) if r > 0 => self.alpha() as f64 / r as f64,
            _ => 1.0,
        }
    }

    /// The tensors with their key suffixes (`hada_w1_a`, `lokr_w2`, …), in a
    /// fixed order.
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        match self {
            LycorisModule::Hada {
                w1_a,
                w1_b,
                w2_a,
                w2_b,
                ..
            } => vec![
                ("hada_w1_a".to_string(), w1_a),
                ("hada_w1_b".to_string(), w1_b),
                ("hada_w2_a".to_string(), w2_a),
                ("hada_w2_b".to_string(), w2_b),
            ],
            LycorisModule::Kron { w1, w2, .. } => {
                let mut v = w1.named(1);
                v.extend(w2.named(2));
                v
            }
        }
    }

    /// Number of stored values.
    pub fn parameter_count(&self) -> usize {
        self.named_tensors()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum()
    }

    /// `(rows, columns)` of the update flattened to 2-D, or what is wrong with
    /// the module's shapes.
    pub fn update_dims(&self) -> std::result::Result<(usize, usize), String> {
        match self {
            LycorisModule::Hada {
                w1_a,
                w1_b,
                w2_a,
                w2_b,
                ..
            } => {
                let dims = |a: &Tensor, b: &Tensor| match (a.dims(), b.dims()) {
                    ([o, ra], [rb, i]) if ra == rb && *ra > 0 => Some((*o, *i)),
                    _ => None,
                };
                match (dims(w1_a, w1_b), dims(w2_a, w2_b)) {
                    (Some(p1), Some(p2)) if p1 == p2 => Ok(p1),
                    _ => Err(format!(
                        "LoHa shapes do not form two equal products: w1_a {:?}, w1_b {:?}, \
                         w2_a {:?}, w2_b {:?}",
                        w1_a.dims(),
                        w1_b.dims(),
                        w2_a.dims(),
                        w2_b.dims()
                    )),
                }
            }
            LycorisModule::Kron { w1, w2, .. } => match (w1.flat_dims(), w2.flat_dims()) {
                (Some((a, c)), Some((b, d))) if w1_is_2d(w1) => Ok((a * b, c * d)),
                _ => Err(format!(
                    "LoKr factors are malformed: {}",
                    self.named_tensors()
                        .iter()
                        .map(|(n, t)| format!("{n} {:?}", t.dims()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            },
        }
    }

    /// The update `ΔW` shaped like the weight (`shape`), in f32, without any
    /// inference multiplier.
    pub fn delta(&self, shape: &[usize]) -> Result<Tensor> {
        let scale = self.scale();
        match self {
            LycorisModule::Hada {
                w1_a,
                w1_b,
                w2_a,
                w2_b,
                ..
            } => hada_delta([w1_a, w1_b, w2_a, w2_b], scale, shape),
            LycorisModule::Kron { w1, w2, .. } => {
                kron_delta(&w1.tensor()?, &w2.tensor()?, scale, shape)
            }
        }
    }

    /// The module with every tensor passed through `f` (dtype or device changes).
    pub fn map(&self, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<LycorisModule> {
        Ok(match self {
            LycorisModule::Hada {
                w1_a,
                w1_b,
                w2_a,
                w2_b,
                alpha,
            } => LycorisModule::Hada {
                w1_a: f(w1_a)?,
                w1_b: f(w1_b)?,
                w2_a: f(w2_a)?,
                w2_b: f(w2_b)?,
                alpha: *alpha,
            },
            LycorisModule::Kron { w1, w2, alpha } => LycorisModule::Kron {
                w1: w1.map(f)?,
                w2: w2.map(f)?,
                alpha: *alpha,
            },
        })
    }

    /// The module in f32 on the CPU.
    pub fn to_f32_cpu(&self) -> Result<LycorisModule> {
        self.map(&|t| t.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu))
    }
}

/// `w1` must be a matrix: LoKr's small factor never carries the kernel.
fn w1_is_2d(w1: &KronFactor) -> bool {
    match w1 {
        KronFactor::Full(t) => t.rank() == 2,
        KronFactor::LowRank { .. } => true,
    }
}

/// Checks that an update of `(rows, cols)` fits a layer with `out` outputs,
/// `in_` inputs and `kernel` elements per kernel.
pub fn check_update_dims(
    (rows, cols): (usize, usize),
    out: usize,
    in_: usize,
    kernel: usize,
) -> std::result::Result<(), String> {
    if (rows, cols) == (out, in_ * kernel) {
        Ok(())
    } else {
        Err(format!(
            "the update is {rows}×{cols}, the layer needs {out}×{}",
            in_ * kernel
        ))
    }
}

/// The shapes LyCORIS gives a fresh LoKr module on a layer (`out`, `in_`,
/// `kernel` = `[kh, kw]` or none) of rank `rank` with `factor`: `w1 [a, c]` full;
/// `w2` full `[b, d(, kh, kw)]` when `rank ≥ max(b, d)/2`, else `[b, rank]·[rank, d·k]`.
pub fn lokr_shapes(
    out: usize,
    in_: usize,
    kernel: Option<[usize; 2]>,
    rank: usize,
    factor: i64,
) -> (Vec<usize>, LokrW2Shape) {
    let (in_m, in_n) = factorization(in_, factor);
    let (out_l, out_k) = factorization(out, factor);
    let w1 = vec![out_l, in_m];
    let k: usize = kernel.map(|[h, w]| h * w).unwrap_or(1);
    let w2 = if rank as f64 >= out_k.max(in_n) as f64 / 2.0 {
        let mut s = vec![out_k, in_n];
        if let Some([h, w]) = kernel {
            s.extend([h, w]);
        }
        LokrW2Shape::Full(s)
    } else {
        LokrW2Shape::LowRank([out_k, rank], [rank, in_n * k])
    };
    (w1, w2)
}

/// The names and shapes of the trainable tensors of a fresh module of
/// `network` with rank `rank` on a layer with `out` outputs, `in_` inputs and
/// `kernel` (`None` for a Linear layer), in the order the adapters list them.
pub fn fresh_shapes(
    network: NetworkType,
    out: usize,
    in_: usize,
    kernel: Option<[usize; 2]>,
    rank: usize,
    lokr_factor: i64,
) -> Vec<(&'static str, Vec<usize>)> {
    let k: usize = kernel.map(|[h, w]| h * w).unwrap_or(1);
    match network {
        NetworkType::Lora | NetworkType::Dora => {
            let (down, up) = match kernel {
                None => (vec![rank, in_], vec![out, rank]),
                Some([h, w]) => (vec![rank, in_, h, w], vec![out, rank, 1, 1]),
            };
            let mut v = vec![("down", down), ("up", up)];
            if network == NetworkType::Dora {
                // Either axis has the same size class; the output one is shown.
                let mut m = vec![out, 1];
                if kernel.is_some() {
                    m.extend([1, 1]);
                }
                v.push(("dora_scale", m));
            }
            v
        }
        NetworkType::Loha => vec![
            ("hada_w1_a", vec![out, rank]),
            ("hada_w1_b", vec![rank, in_ * k]),
            ("hada_w2_a", vec![out, rank]),
            ("hada_w2_b", vec![rank, in_ * k]),
        ],
        NetworkType::Lokr => {
            let (w1, w2) = lokr_shapes(out, in_, kernel, rank, lokr_factor);
            let mut v = vec![("lokr_w1", w1)];
            match w2 {
                LokrW2Shape::Full(s) => v.push(("lokr_w2", s)),
                LokrW2Shape::LowRank(a, b) => {
                    v.push(("lokr_w2_a", a.to_vec()));
                    v.push(("lokr_w2_b", b.to_vec()));
                }
            }
            v
        }
    }
}

/// The shape of a fresh LoKr `w2` (see [`lokr_shapes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LokrW2Shape {
    Full(Vec<usize>),
    LowRank([usize; 2], [usize; 2]),
}

/// Checks a DoRA magnitude's shape against a weight of `weight_shape` on `axis`.
pub fn check_magnitude(
    magnitude: &[usize],
    weight_shape: &[usize],
) -> std::result::Result<DoraAxis, String> {
    if weight_shape.len() < 2 || magnitude.len() != weight_shape.len() {
        return Err(format!(
            "dora_scale {magnitude:?} does not fit a weight {weight_shape:?}"
        ));
    }
    DoraAxis::of_shape(magnitude, weight_shape[0], weight_shape[1]).ok_or_else(|| {
        format!(
            "dora_scale {magnitude:?} fits neither axis of a weight {weight_shape:?} \
             (expected {:?} or {:?})",
            DoraAxis::Output.magnitude_shape(weight_shape),
            DoraAxis::Input.magnitude_shape(weight_shape)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn factorization_matches_lycoris_table() {
        // What LyCORIS 4.1.3's `factorization` returns (its docstring's table is
        // older: it gives 360 → 8×45).
        for (dim, factor, want) in [
            (127, -1, (1, 127)),
            (128, -1, (8, 16)),
            (128, 2, (2, 64)),
            (128, 8, (8, 16)),
            (250, -1, (10, 25)),
            (250, 4, (2, 125)),
            (360, -1, (18, 20)),
            (360, 16, (15, 24)),
            (512, -1, (16, 32)),
            (1024, -1, (32, 32)),
            (1024, 16, (16, 64)),
            (320, -1, (16, 20)),
            (768, -1, (24, 32)),
        ] {
            assert_eq!(factorization(dim, factor), want, "{dim} factor {factor}");
        }
    }

    #[test]
    fn kron_matches_definition() -> Result<()> {
        let dev = Device::Cpu;
        let w1 = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev)?;
        let w2 = Tensor::new(&[[0f32, 5., 1.]], &dev)?;
        let k = kron_delta(&w1, &w2, 1.0, &[2, 6])?.to_vec2::<f32>()?;
        assert_eq!(
            k,
            vec![
                vec![0., 5., 1., 0., 10., 2.],
                vec![0., 15., 3., 0., 20., 4.]
            ]
        );
        Ok(())
    }

    #[test]
    fn dora_axis_from_shape() {
        assert_eq!(DoraAxis::of_shape(&[8, 1], 8, 8), Some(DoraAxis::Output));
        assert_eq!(DoraAxis::of_shape(&[1, 8], 8, 8), Some(DoraAxis::Input));
        assert_eq!(
            DoraAxis::of_shape(&[4, 1, 1, 1], 4, 3),
            Some(DoraAxis::Output)
        );
        assert_eq!(DoraAxis::of_shape(&[4, 2], 4, 2), None);
    }
}
