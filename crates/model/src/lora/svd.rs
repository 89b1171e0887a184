//! The factorisations behind `resize`, `merge --rank` and `extract`: thin QR,
//! the SVD of a small square matrix, and a rank-k SVD of a large dense matrix.
//!
//! Everything small is done in f64 on plain vectors: the matrices decomposed
//! here are at most a few dozen columns wide (a LoRA's rank, plus
//! oversampling), so a one-sided Jacobi SVD is exact to rounding and fast.
//! The products with a large matrix (a layer's `ΔW`, up to 1280 × 11520)
//! go through candle's f32 matmul.

use candle_core::{DType, Device, Result, Tensor};

/// A row-major matrix in f64.
#[derive(Debug, Clone)]
pub(crate) struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub v: Vec<f64>,
}

impl Mat {
    pub fn at(&self, r: usize, c: usize) -> f64 {
        self.v[r * self.cols + c]
    }

    /// A 2-D tensor's values (any float dtype).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let (rows, cols) = t.dims2()?;
        Ok(Self {
            rows,
            cols,
            v: t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
        })
    }

    /// As an f32 tensor on the CPU.
    pub fn to_tensor(&self) -> Result<Tensor> {
        let v: Vec<f32> = self.v.iter().map(|&x| x as f32).collect();
        Tensor::from_vec(v, (self.rows, self.cols), &Device::Cpu)
    }

    /// `self · other`.
    pub fn matmul(&self, other: &Mat) -> Mat {
        debug_assert_eq!(self.cols, other.rows);
        let mut v = vec![0.0; self.rows * other.cols];
        for r in 0..self.rows {
            let out = &mut v[r * other.cols..(r + 1) * other.cols];
            for k in 0..self.cols {
                let a = self.at(r, k);
                if a == 0.0 {
                    continue;
                }
                let row = &other.v[k * other.cols..(k + 1) * other.cols];
                for (o, b) in out.iter_mut().zip(row) {
                    *o += a * b;
                }
            }
        }
        Mat {
            rows: self.rows,
            cols: other.cols,
            v,
        }
    }

    /// The transpose.
    pub fn t(&self) -> Mat {
        let mut v = vec![0.0; self.v.len()];
        for r in 0..self.rows {
            for c in 0..self.cols {
                v[c * self.rows + r] = self.at(r, c);
            }
        }
        Mat {
            rows: self.cols,
            cols: self.rows,
            v,
        }
    }

    /// The first `k` columns.
    pub fn first_cols(&self, k: usize) -> Mat {
        let k = k.min(self.cols);
        Mat {
            rows: self.rows,
            cols: k,
            v: (0..self.rows)
                .flat_map(|r| self.v[r * self.cols..r * self.cols + k].iter().copied())
                .collect(),
        }
    }
}

/// Thin QR of `a` (`rows × cols`) by modified Gram–Schmidt with one
/// re-orthogonalisation pass: `a = Q R`, `Q` `rows × cols` with orthonormal
/// (or zero, for dependent columns) columns, `R` `cols × cols` upper
/// triangular.
pub(crate) fn thin_qr(a: &Mat) -> (Mat, Mat) {
    let (m, n) = (a.rows, a.cols);
    // Columns of Q, built in place.
    let mut q: Vec<Vec<f64>> = (0..n)
        .map(|c| (0..m).map(|r| a.at(r, c)).collect())
        .collect();
    let mut r = vec![0.0; n * n];
    let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
    let scale = (0..n).map(|c| norm(&q[c])).fold(0.0, f64::max).max(1e-300);
    for j in 0..n {
        let (done, rest) = q.split_at_mut(j);
        let qj = &mut rest[0];
        for _pass in 0..2 {
            for (i, qi) in done.iter().enumerate() {
                let d: f64 = qi.iter().zip(qj.iter()).map(|(a, b)| a * b).sum();
                r[i * n + j] += d;
                for (x, y) in qj.iter_mut().zip(qi) {
                    *x -= d * y;
                }
            }
        }
        let nj = norm(qj);
        if nj > 1e-13 * scale {
            r[j * n + j] = nj;
            qj.iter_mut().for_each(|x| *x /= nj);
        } else {
            // A dependent column: it adds nothing to the span.
            r[j * n + j] = 0.0;
            qj.iter_mut().for_each(|x| *x = 0.0);
        }
    }
    let mut qm = vec![0.0; m * n];
    for (c, col) in q.iter().enumerate() {
        for (row, &x) in col.iter().enumerate() {
            qm[row * n + c] = x;
        }
    }
    (
        Mat {
            rows: m,
            cols: n,
            v: qm,
        },
        Mat {
            rows: n,
            cols: n,
            v: r,
        },
    )
}

/// SVD of a small matrix by one-sided Jacobi rotations: `a = U S Vᵀ` with
/// the singular values sorted, largest first. Returns (U, S, V), `U` and
/// `V` as lists of columns.
pub(crate) fn jacobi_svd(a: &Mat) -> (Vec<Vec<f64>>, Vec<f64>, Vec<Vec<f64>>) {
    let n = a.cols;
    let m = a.rows;
    let mut cols: Vec<Vec<f64>> = (0..n)
        .map(|c| (0..m).map(|r| a.at(r, c)).collect())
        .collect();
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|c| (0..n).map(|r| f64::from(u8::from(r == c))).collect())
        .collect();
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let alpha: f64 = cols[p].iter().map(|x| x * x).sum();
                let beta: f64 = cols[q].iter().map(|x| x * x).sum();
                let gamma: f64 = cols[p].iter().zip(&cols[q]).map(|(x, y)| x * y).sum();
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() || gamma == 0.0 {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let t = if zeta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                rotate(&mut cols, p, q, c, s);
                rotate(&mut v, p, q, c, s);
            }
        }
        if !rotated {
            break;
        }
    }
    let mut order: Vec<(f64, usize)> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| (c.iter().map(|x| x * x).sum::<f64>().sqrt(), i))
        .collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut u = Vec::with_capacity(n);
    let mut s = Vec::with_capacity(n);
    let mut vv = Vec::with_capacity(n);
    for (sigma, i) in order {
        s.push(sigma);
        u.push(if sigma > 0.0 {
            cols[i].iter().map(|x| x / sigma).collect()
        } else {
            vec![0.0; m]
        });
        vv.push(v[i].clone());
    }
    (u, s, vv)
}

/// Rotates columns `p < q` in their plane: `(x, y) ← (c·x − s·y, s·x + c·y)`.
fn rotate(cols: &mut [Vec<f64>], p: usize, q: usize, c: f64, s: f64) {
    let (lo, hi) = cols.split_at_mut(q);
    for (x, y) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
        let (a, b) = (*x, *y);
        *x = c * a - s * b;
        *y = s * a + c * b;
    }
}

/// A list of columns (each `rows` long) as a row-major matrix.
fn from_columns(cols: &[Vec<f64>], rows: usize) -> Mat {
    let n = cols.len();
    let mut v = vec![0.0; rows * n];
    for (c, col) in cols.iter().enumerate() {
        for (r, &x) in col.iter().enumerate() {
            v[r * n + c] = x;
        }
    }
    Mat { rows, cols: n, v }
}

/// A rank-k factorisation of a dense matrix.
#[derive(Debug, Clone)]
pub struct LowRank {
    /// `U_k · S_k`, `rows × k` (f32, CPU).
    pub up: Tensor,
    /// `V_kᵀ`, `k × cols` (f32, CPU), orthonormal rows.
    pub down: Tensor,
    /// The leading singular values found (at least `k` of them, largest first).
    pub singular_values: Vec<f64>,
    /// `‖A‖_F`, for the share of it kept.
    pub frobenius: f64,
}

impl LowRank {
    /// `‖U_k S_k V_kᵀ‖_F / ‖A‖_F`.
    pub fn fro_kept(&self, k: usize) -> f64 {
        if self.frobenius <= 0.0 {
            return 1.0;
        }
        let kept: f64 = self.singular_values.iter().take(k).map(|s| s * s).sum();
        (kept.sqrt() / self.frobenius).min(1.0)
    }
}

/// Oversampling of the randomized range finder: the subspace searched is
/// `k + OVERSAMPLE` wide.
const OVERSAMPLE: usize = 10;
/// Power (subspace) iterations: each sharpens the gap between the kept and
/// dropped singular values; 3 make the result the best rank-k approximation
/// to a few parts in 10⁴ even for slowly decaying spectra.
const POWER_ITERATIONS: usize = 3;

/// The best rank-`k` approximation of the 2-D matrix `a` (any float dtype,
/// CPU), by randomized subspace iteration (Halko, Martinsson & Tropp 2011)
/// with a fixed seed, so the same input always gives the same factors. A
/// matrix of rank ≤ k is recovered exactly (to f32 rounding).
pub fn low_rank(a: &Tensor, k: usize, seed: u64) -> Result<LowRank> {
    if k == 0 {
        candle_core::bail!("a rank-0 factorisation was asked for");
    }
    let a = a.to_dtype(DType::F32)?;
    let (rows, cols) = a.dims2()?;
    let width = (k + OVERSAMPLE).min(rows).min(cols).max(1);
    let frobenius = f64::from(a.sqr()?.sum_all()?.to_scalar::<f32>()?).sqrt();
    // Gaussian test matrix (xorshift + Box–Muller).
    let mut state = seed | 1;
    let mut uniform = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let omega: Vec<f32> = (0..cols * width)
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    let omega = Tensor::from_vec(omega, (cols, width), &Device::Cpu)?;
    let at = a.t()?.contiguous()?;
    let orthonormal =
        |t: Tensor| -> Result<Tensor> { thin_qr(&Mat::from_tensor(&t)?).0.to_tensor() };
    let mut q = orthonormal(a.matmul(&omega)?)?;
    for _ in 0..POWER_ITERATIONS {
        let z = orthonormal(at.matmul(&q)?)?;
        q = orthonormal(a.matmul(&z)?)?;
    }
    // B = Qᵀ A (width × cols); Bᵀ = Q_b R_b, so B = R_bᵀ Q_bᵀ and, with
    // R_bᵀ = U S Vᵀ, A ≈ Q B = (Q U) S (Q_b V)ᵀ.
    let bt = at.matmul(&q)?;
    let (qb, rb) = thin_qr(&Mat::from_tensor(&bt)?);
    let (u, s, v) = jacobi_svd(&rb.t());
    let k = k.min(width);
    let qm = Mat::from_tensor(&q)?;
    let left = qm.matmul(&from_columns(&u, width)).first_cols(k);
    let right = qb.matmul(&from_columns(&v, width)).first_cols(k);
    let mut up = left;
    for row in up.v.chunks_mut(k) {
        for (x, sigma) in row.iter_mut().zip(&s) {
            *x *= sigma;
        }
    }
    Ok(LowRank {
        up: up.to_tensor()?,
        down: right.t().to_tensor()?,
        singular_values: s,
        frobenius,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) - 0.5
    }

    #[test]
    fn jacobi_svd_reconstructs_and_orders() {
        let mut seed = 7;
        let n = 6;
        let a = Mat {
            rows: n,
            cols: n,
            v: (0..n * n).map(|_| lcg(&mut seed)).collect(),
        };
        let (u, s, v) = jacobi_svd(&a);
        assert!(s.windows(2).all(|w| w[0] >= w[1]));
        for (r, c) in (0..n).flat_map(|r| (0..n).map(move |c| (r, c))) {
            let x: f64 = (0..n).map(|k| u[k][r] * s[k] * v[k][c]).sum();
            assert!((x - a.at(r, c)).abs() < 1e-12, "{x} vs {}", a.at(r, c));
        }
    }

    /// A matrix of rank 3 comes back exactly at rank 3; at rank 2 the error
    /// is the dropped singular value (Eckart–Young), and the singular values
    /// match the exact ones from the Jacobi SVD of the full matrix.
    #[test]
    fn low_rank_recovers_low_rank_matrices_and_is_optimal() {
        let mut seed = 11;
        let (rows, cols, r) = (40, 70, 3);
        let mut rand = |n: usize| (0..n).map(|_| lcg(&mut seed)).collect::<Vec<_>>();
        let x = Mat {
            rows,
            cols: r,
            v: rand(rows * r),
        };
        let y = Mat {
            rows: r,
            cols,
            v: rand(r * cols),
        };
        let a = x.matmul(&y);
        let t = a.to_tensor().unwrap();
        let got = low_rank(&t, 3, 1).unwrap();
        let back = got.up.matmul(&got.down).unwrap();
        let err = (back - &t)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err < 1e-5, "rank-3 reconstruction error {err}");
        assert!((got.fro_kept(3) - 1.0).abs() < 1e-6);

        let (_, exact, _) = jacobi_svd(&a.t());
        let two = low_rank(&t, 2, 1).unwrap();
        for (i, (got, want)) in two.singular_values.iter().zip(&exact).take(3).enumerate() {
            let rel = (got - want).abs() / want;
            assert!(rel < 1e-5, "σ{i}: {got} vs {want}");
        }
        let residual = (two.up.matmul(&two.down).unwrap() - &t)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let rel = (f64::from(residual).sqrt() - exact[2]).abs() / exact[2];
        assert!(
            rel < 1e-4,
            "rank-2 residual {residual} vs σ3² {}",
            exact[2] * exact[2]
        );
    }
}
