//! GroupNorm on the CPU in one parallel pass per direction.
//!
//! The portable [`super::norm::group_norm`] is built from broadcasting tensor
//! ops: five passes over the activation in the forward and about ten in the
//! backward, each allocating its output and most of them single-threaded in
//! candle's strided binary-op path. A UNet runs some sixty group norms per
//! step, so on the CPU the statistics, normalisation and affine transform are
//! computed here directly on the contiguous storage, one `(batch, group)`
//! block per task. Statistics are accumulated in f64 whatever the dtype.

use candle_core::{Result, Storage, Tensor, WithDType, bail};
use rayon::prelude::*;

/// A contiguous CPU tensor's storage, borrowed for reading.
struct CpuSlice<G> {
    guard: G,
    range: (usize, usize),
}

/// Borrows the storage of `t`, a contiguous CPU tensor.
fn cpu_slice(t: &Tensor) -> Result<CpuSlice<impl std::ops::Deref<Target = Storage> + '_>> {
    let (guard, layout) = t.storage_and_layout();
    let Some(range) = layout.contiguous_offsets() else {
        bail!("group_norm (CPU path): expected a contiguous tensor")
    };
    Ok(CpuSlice { guard, range })
}

impl<G: std::ops::Deref<Target = Storage>> CpuSlice<G> {
    fn get<T: WithDType>(&self) -> Result<&[T]> {
        let Storage::Cpu(cpu) = &*self.guard else {
            bail!("group_norm (CPU path): expected a CPU tensor")
        };
        Ok(&cpu.as_slice::<T>()?[self.range.0..self.range.1])
    }
}

/// Shape of a group norm: batch, channels, spatial size, groups.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub c: usize,
    pub spatial: usize,
    pub groups: usize,
}

impl Dims {
    fn per_group(&self) -> usize {
        self.c / self.groups * self.spatial
    }
}

/// Forward: `y` (same dtype as `x`) and, per `(batch, group)`, the mean and
/// `1/sqrt(var + eps)`.
pub(crate) fn forward<T: WithDType>(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    d: Dims,
    eps: f64,
) -> Result<(Tensor, Vec<f64>, Vec<f64>)> {
    let (x, gamma, beta) = (x.contiguous()?, gamma.contiguous()?, beta.contiguous()?);
    let (xg, gg, bg) = (cpu_slice(&x)?, cpu_slice(&gamma)?, cpu_slice(&beta)?);
    let (xs, gs, bs) = (xg.get::<T>()?, gg.get::<T>()?, bg.get::<T>()?);
    let n = d.per_group();
    let cpg = d.c / d.groups;
    let mut y = vec![T::zero(); xs.len()];
    let stats: Vec<(f64, f64)> = y
        .par_chunks_mut(n)
        .zip(xs.par_chunks(n))
        .enumerate()
        .map(|(row, (yb, xb))| {
            let mean = xb.iter().map(|v| v.to_f64()).sum::<f64>() / n as f64;
            let var = xb
                .iter()
                .map(|v| {
                    let e = v.to_f64() - mean;
                    e * e
                })
                .sum::<f64>()
                / n as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            let group = row % d.groups;
            for (k, (yc, xc)) in yb
                .chunks_mut(d.spatial)
                .zip(xb.chunks(d.spatial))
                .enumerate()
            {
                let ch = group * cpg + k;
                let (g, b) = (gs[ch].to_f64(), bs[ch].to_f64());
                for (o, v) in yc.iter_mut().zip(xc) {
                    *o = T::from_f64((v.to_f64() - mean) * rstd * g + b);
                }
            }
            (mean, rstd)
        })
        .collect();
    let (mean, rstd) = stats.into_iter().unzip();
    drop((xg, gg, bg));
    Ok((Tensor::from_vec(y, x.shape(), x.device())?, mean, rstd))
}

/// Backward: `dx` (when `need_x`), `dγ` and `dβ` (each `[c]`), from the
/// output gradient `g` and the forward's statistics.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: WithDType>(
    x: &Tensor,
    g: &Tensor,
    gamma: &Tensor,
    mean: &[f64],
    rstd: &[f64],
    d: Dims,
    need_x: bool,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let (x, g, gamma) = (x.contiguous()?, g.contiguous()?, gamma.contiguous()?);
    let (xg, gg, gammag) = (cpu_slice(&x)?, cpu_slice(&g)?, cpu_slice(&gamma)?);
    let (xs, gs, gamma_s) = (xg.get::<T>()?, gg.get::<T>()?, gammag.get::<T>()?);
    let n = d.per_group();
    let cpg = d.c / d.groups;
    let mut dx = vec![T::zero(); if need_x { xs.len() } else { 0 }];
    // Per (batch, channel): Σ g·x̂ and Σ g, reduced over the batch below.
    let per_row = |row: usize, dxb: Option<&mut [T]>| -> Vec<(f64, f64)> {
        let (xb, gb) = (&xs[row * n..(row + 1) * n], &gs[row * n..(row + 1) * n]);
        let (mu, r) = (mean[row], rstd[row]);
        let group = row % d.groups;
        let mut sums = Vec::with_capacity(cpg);
        let (mut s_dxhat, mut s_dxhat_xhat) = (0.0, 0.0);
        for k in 0..cpg {
            let ch = group * cpg + k;
            let gam = gamma_s[ch].to_f64();
            let (mut s_gx, mut s_g) = (0.0, 0.0);
            for i in k * d.spatial..(k + 1) * d.spatial {
                let xhat = (xb[i].to_f64() - mu) * r;
                let gv = gb[i].to_f64();
                s_gx += gv * xhat;
                s_g += gv;
            }
            s_dxhat += gam * s_g;
            s_dxhat_xhat += gam * s_gx;
            sums.push((s_gx, s_g));
        }
        if let Some(dxb) = dxb {
            let (m1, m2) = (s_dxhat / n as f64, s_dxhat_xhat / n as f64);
            for k in 0..cpg {
                let gam = gamma_s[group * cpg + k].to_f64();
                for i in k * d.spatial..(k + 1) * d.spatial {
                    let xhat = (xb[i].to_f64() - mu) * r;
                    let dxhat = gb[i].to_f64() * gam;
                    dxb[i] = T::from_f64(r * (dxhat - m1 - xhat * m2));
                }
            }
        }
        sums
    };
    let rows = d.b * d.groups;
    let sums: Vec<Vec<(f64, f64)>> = if need_x {
        dx.par_chunks_mut(n)
            .enumerate()
            .map(|(row, dxb)| per_row(row, Some(dxb)))
            .collect()
    } else {
        (0..rows)
            .into_par_iter()
            .map(|row| per_row(row, None))
            .collect()
    };
    let (mut dgamma, mut dbeta) = (vec![0f64; d.c], vec![0f64; d.c]);
    for (row, s) in sums.iter().enumerate() {
        let group = row % d.groups;
        for (k, (gx, gsum)) in s.iter().enumerate() {
            dgamma[group * cpg + k] += gx;
            dbeta[group * cpg + k] += gsum;
        }
    }
    let to_t = |v: Vec<f64>| -> Result<Tensor> {
        let v: Vec<T> = v.into_iter().map(T::from_f64).collect();
        Tensor::from_vec(v, d.c, x.device())
    };
    let dx = if need_x {
        Some(Tensor::from_vec(dx, x.shape(), x.device())?)
    } else {
        None
    };
    Ok((dx, to_t(dgamma)?, to_t(dbeta)?))
}
