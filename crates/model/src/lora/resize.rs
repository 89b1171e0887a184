//! Changing a LoRA's rank by SVD (kohya's `resize_lora.py`): each module's
//! update `ΔW = (alpha/rank) · up · down` is factored as `U·S·Vᵀ` and cut to
//! the largest singular values — the best approximation of that rank in the
//! Frobenius norm (Eckart–Young). The rank is fixed or chosen per module by
//! kohya's dynamic rules.
//!
//! The SVD never forms `ΔW` (up to 1280 × 11520 for a 3×3 conv): with
//! `up = Q_u R_u` and `downᵀ = Q_d R_d` (thin QR, `r` columns each),
//! `up · down = Q_u (R_u R_dᵀ) Q_dᵀ`, so only the `r × r` core is decomposed
//! (one-sided Jacobi, f64). The new module keeps `alpha/rank` of the old one
//! (`alpha' = rank' · alpha/rank`), carries the singular values in `up` and
//! the orthonormal rows in `down`, as kohya writes them.

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};

use super::format::{
    LoraFormat, LoraFormatError, Metadata, SaveDtype, WriteFormat, read_lora, write_lora,
};
use super::svd::{Mat, jacobi_svd, thin_qr};
use super::{LoraComponent, LoraModule, LoraWeights};

/// How the new rank of each module is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankRule {
    /// A fixed rank (at most the module's).
    Fixed(usize),
    /// Keep singular values above `σ₁ / ratio` (kohya's `sv_ratio`).
    SvRatio(f64),
    /// Keep the fewest values whose squared sum reaches `target²` of the
    /// total — `target` of the Frobenius norm (kohya's `sv_fro`).
    SvFro(f64),
    /// Keep the fewest values whose sum reaches `target` of their total
    /// (kohya's `sv_cumulative`).
    SvCumulative(f64),
}

/// What resizing one module did.
#[derive(Debug, Clone, PartialEq)]
pub struct ResizeStats {
    /// The rank before and after.
    pub old_rank: usize,
    pub new_rank: usize,
    /// `‖ΔW'‖_F / ‖ΔW‖_F`: the share of the update's Frobenius norm kept.
    pub fro_kept: f64,
    /// The singular values of `up · down` (largest first).
    pub singular_values: Vec<f64>,
}

/// The new rank for singular values `s` (largest first) under `rule`,
/// between 1 and the module's rank, as kohya's `rank_resize` picks it.
pub fn choose_rank(s: &[f64], rule: RankRule) -> usize {
    let n = s.len().max(1);
    // kohya's dynamic rules never keep every value (at most n − 1) unless
    // the module has rank 1.
    let cap = |i: usize| i.clamp(1, (n - 1).max(1));
    let total: f64 = s.iter().sum();
    let total_sq: f64 = s.iter().map(|x| x * x).sum();
    if s.first().is_none_or(|&x| x <= 1e-6) {
        return 1;
    }
    match rule {
        RankRule::Fixed(k) => k.clamp(1, n),
        RankRule::SvRatio(ratio) => cap(s.iter().filter(|&&x| x > s[0] / ratio).count()),
        RankRule::SvFro(target) => {
            let mut acc = 0.0;
            let below = s
                .iter()
                .take_while(|&&x| {
                    acc += x * x;
                    acc / total_sq < target * target
                })
                .count();
            cap(below + 1)
        }
        RankRule::SvCumulative(target) => {
            let mut acc = 0.0;
            let below = s
                .iter()
                .take_while(|&&x| {
                    acc += x;
                    acc / total < target
                })
                .count();
            cap(below + 1)
        }
    }
}

/// Resizes one module to the rank `rule` picks (`max_rank` caps a dynamic
/// rule). Conv modules keep their kernel in `down` (`[r, in, kh, kw]`) and
/// `[out, r, 1, 1]` in `up`. The tensors are written in `dtype`.
pub fn resize_module(
    m: &LoraModule,
    rule: RankRule,
    max_rank: Option<usize>,
    dtype: DType,
) -> Result<(LoraModule, ResizeStats)> {
    let rank = m.rank();
    let down_dims = m.down.dims().to_vec();
    let up_dims = m.up.dims().to_vec();
    if rank == 0 || up_dims.len() < 2 || up_dims[1] != rank {
        candle_core::bail!(
            "a module with down {:?} and up {:?} is not a LoRA pair",
            down_dims,
            up_dims
        );
    }
    let out = up_dims[0];
    let inner: usize = down_dims[1..].iter().product();
    let read = |t: &Tensor, rows: usize, cols: usize| -> Result<Mat> {
        Ok(Mat {
            rows,
            cols,
            v: t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
        })
    };
    let up = read(&m.up, out, rank)?;
    let down = read(&m.down, rank, inner)?;
    // downᵀ as a matrix of `inner` rows.
    let down_t = Mat {
        rows: inner,
        cols: rank,
        v: (0..inner)
            .flat_map(|i| (0..rank).map(move |r| (r, i)))
            .map(|(r, i)| down.at(r, i))
            .collect(),
    };
    let (qu, ru) = thin_qr(&up);
    let (qd, rd) = thin_qr(&down_t);
    // Core = R_u · R_dᵀ, scaled by alpha/rank so the values are ΔW's.
    let scale = f64::from(m.alpha) / rank as f64;
    let mut core = Mat {
        rows: rank,
        cols: rank,
        v: vec![0.0; rank * rank],
    };
    for i in 0..rank {
        for j in 0..rank {
            core.v[i * rank + j] =
                scale * (0..rank).map(|k| ru.at(i, k) * rd.at(j, k)).sum::<f64>();
        }
    }
    let (cu, s, cv) = jacobi_svd(&core);
    let mut k = choose_rank(&s, rule);
    if let Some(cap) = max_rank {
        k = k.min(cap.max(1));
    }
    let total_sq: f64 = s.iter().map(|x| x * x).sum();
    let kept_sq: f64 = s[..k].iter().map(|x| x * x).sum();
    let fro_kept = if total_sq > 0.0 {
        (kept_sq / total_sq).sqrt()
    } else {
        1.0
    };
    // up' = Q_u·U_k·S_k / scale' ; down' = (Q_d·V_k)ᵀ with scale' = scale
    // (alpha' = k·scale), so (alpha'/k)·up'·down' = U_k S_k V_kᵀ.
    let mut new_up = vec![0.0f64; out * k];
    for row in 0..out {
        for c in 0..k {
            let uval: f64 = (0..rank).map(|j| qu.at(row, j) * cu[c][j]).sum();
            new_up[row * k + c] = uval * s[c] / scale;
        }
    }
    let mut new_down = vec![0.0f64; k * inner];
    for c in 0..k {
        for i in 0..inner {
            new_down[c * inner + i] = (0..rank).map(|j| qd.at(i, j) * cv[c][j]).sum();
        }
    }
    let mut nd = down_dims.clone();
    nd[0] = k;
    let mut nu = up_dims.clone();
    nu[1] = k;
    let module = LoraModule {
        down: Tensor::from_vec(new_down, nd, &Device::Cpu)?.to_dtype(dtype)?,
        up: Tensor::from_vec(new_up, nu, &Device::Cpu)?.to_dtype(dtype)?,
        alpha: (k as f64 * scale) as f32,
        dora_scale: None,
    };
    Ok((
        module,
        ResizeStats {
            old_rank: rank,
            new_rank: k,
            fro_kept,
            singular_values: s,
        },
    ))
}

/// Why a file could not be resized.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    /// Reading or writing the file.
    #[error(transparent)]
    Format(#[from] LoraFormatError),
    /// A module that cannot be factored.
    #[error("{file}: module {module}: {source}")]
    Module {
        file: std::path::PathBuf,
        module: String,
        source: Box<candle_core::Error>,
    },
    /// A file of another network type than plain LoRA.
    #[error("{file}: {reason}")]
    NotPlain {
        file: std::path::PathBuf,
        reason: String,
    },
}

/// The same update as `m` with alpha `alpha`: the change of scale goes into
/// `up`.
pub fn with_alpha(m: &LoraModule, alpha: f32) -> Result<LoraModule> {
    if !(alpha.is_finite() && alpha > 0.0) {
        candle_core::bail!("alpha must be a positive number, got {alpha}");
    }
    let factor = f64::from(m.alpha) / f64::from(alpha);
    Ok(LoraModule {
        down: m.down.clone(),
        up: (m.up.to_dtype(DType::F64)? * factor)?.to_dtype(m.up.dtype())?,
        alpha,
        dora_scale: m.dora_scale.clone(),
    })
}

/// The alpha most modules of `w` have (None for an empty LoRA).
fn most_common_alpha(w: &LoraWeights) -> Option<f32> {
    let mut counts: std::collections::BTreeMap<u32, usize> = std::collections::BTreeMap::new();
    for m in w.modules.values() {
        *counts.entry(m.alpha.to_bits()).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|&(_, n)| n)
        .map(|(bits, _)| f32::from_bits(bits))
}

/// What [`resize_file`] did, module by module.
#[derive(Debug, Clone)]
pub struct ResizeReport {
    /// (component, module path) and its statistics, in file order.
    pub modules: Vec<((LoraComponent, String), ResizeStats)>,
    /// The format written (the input's; diffusers' old format is written as
    /// PEFT).
    pub format: WriteFormat,
}

/// Resizes every module of the LoRA file `input` and writes `output` in the
/// same format and precision, with kohya's `ss_network_dim` /
/// `ss_network_alpha` updated and `ss_training_comment` saying what was done.
/// A fixed rank keeps each module's alpha/rank (alpha = rank·scale, as
/// kohya); a dynamic rule keeps one alpha for all modules (see below).
pub fn resize_file(
    input: &Path,
    output: &Path,
    rule: RankRule,
    max_rank: Option<usize>,
) -> std::result::Result<ResizeReport, ResizeError> {
    let file = read_lora(input)?;
    // kohya's resize works on LoRA only; a DoRA's magnitude was trained for
    // its full-rank update, and LoHa/LoKr have no SVD of their own factors.
    file.weights
        .require_plain("resizing")
        .map_err(|reason| ResizeError::NotPlain {
            file: input.to_path_buf(),
            reason,
        })?;
    let save = SaveDtype::for_dtype(file.dtype);
    let mut weights = LoraWeights::default();
    let mut modules = Vec::with_capacity(file.weights.modules.len());
    // With per-module ranks, every module keeps one alpha (the input's most
    // common) and the scale goes into `up`: kohya's resize gives each module
    // alpha = rank·scale instead, which diffusers (0.42) misreads for SD1
    // attention modules (its alpha_pattern keys match no module, so they get
    // the default alpha). One alpha loads the same everywhere.
    let uniform_alpha = (!matches!(rule, RankRule::Fixed(_)))
        .then(|| most_common_alpha(&file.weights))
        .flatten();
    for (key, m) in &file.weights.modules {
        let (new, stats) =
            resize_module(m, rule, max_rank, DType::F32).map_err(|source| ResizeError::Module {
                file: input.to_path_buf(),
                module: key.1.clone(),
                source: Box::new(source),
            })?;
        let new = match uniform_alpha {
            Some(a) if a != new.alpha => {
                with_alpha(&new, a).map_err(|source| ResizeError::Module {
                    file: input.to_path_buf(),
                    module: key.1.clone(),
                    source: Box::new(source),
                })?
            }
            _ => new,
        };
        weights.modules.insert(key.clone(), new);
        modules.push((key.clone(), stats));
    }
    let format = match file.format {
        LoraFormat::Kohya => WriteFormat::Kohya,
        LoraFormat::Peft | LoraFormat::Diffusers => WriteFormat::Peft,
    };
    let old_ranks: std::collections::BTreeSet<usize> =
        modules.iter().map(|(_, s)| s.old_rank).collect();
    let comment = format!(
        "resized by sd-lora from rank {} with {}",
        old_ranks
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join("/"),
        match rule {
            RankRule::Fixed(k) => format!("rank {k}"),
            RankRule::SvRatio(x) => format!("sv_ratio {x}"),
            RankRule::SvFro(x) => format!("sv_fro {x}"),
            RankRule::SvCumulative(x) => format!("sv_cumulative {x}"),
        }
    );
    let mut meta = Metadata::from_map(&file.metadata);
    meta.extra
        .insert("ss_training_comment".to_string(), comment);
    let meta = meta.with_network_of(&weights);
    write_lora(output, &weights, format, &meta.to_map(), save)?;
    Ok(ResizeReport { modules, format })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_rules_follow_kohya() {
        let s = [10.0, 5.0, 2.0, 1.0, 0.5];
        assert_eq!(choose_rank(&s, RankRule::Fixed(3)), 3);
        assert_eq!(choose_rank(&s, RankRule::Fixed(9)), 5);
        // σ > 10/4 = 2.5: two values.
        assert_eq!(choose_rank(&s, RankRule::SvRatio(4.0)), 2);
        // cumulative sums / 18.5: 0.54, 0.81, 0.92, … → first ≥ 0.9 is the third.
        assert_eq!(choose_rank(&s, RankRule::SvCumulative(0.9)), 3);
        // squares 100, 25, 4, 1, .25 (130.25): 0.768, 0.960, … ≥ 0.95² = 0.9025 → 2.
        assert_eq!(choose_rank(&s, RankRule::SvFro(0.95)), 2);
        // Never all of them with a dynamic rule; at least one.
        assert_eq!(choose_rank(&s, RankRule::SvFro(1.0)), 4);
        assert_eq!(choose_rank(&[0.0, 0.0], RankRule::SvRatio(2.0)), 1);
    }
}
