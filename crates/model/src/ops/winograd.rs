//! 3×3 stride-1 convolutions on the CPU (f32) by Winograd's minimal filtering
//! F(2×2, 3×3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural
//! Networks", 2015).
//!
//! Each 2×2 block of output pixels of one output channel is
//! `Aᵀ·[Σ_c (G·g_c·Gᵀ) ⊙ (Bᵀ·d_c·B)]·A`, where `d_c` is the 4×4 input tile of
//! channel `c` under the block and `g_c` the channel's 3×3 kernel. The sum over
//! input channels of the 16 element-wise products is 16 matrix products
//! `U_ξ·V_ξ` (`[out, in]·[in, tiles]`), so a 3×3 conv costs 16 multiply-adds per
//! (tile, in, out) where im2col + one product costs 36: 2.25× fewer, and the
//! transformed input is 4× the input's size where im2col's columns are 9×.
//! The transforms' coefficients are 0, ±1 and ½, exact in binary floating point
//! (unlike the larger F(4×4, 3×3), whose inexact constants cost accuracy): the
//! only rounding is that of the sums and products themselves, and the unit
//! test in `ops::conv` holds the result to the direct conv computed in f64.
//!
//! Worth it only where the products stay large: on a small image the 16
//! products have few columns and the transformed kernel (16/9 of the kernel)
//! is read for little work — see [`worthwhile`].

use candle_core::{Result, bail};
use rayon::prelude::*;

use super::matmul::raw_product;

/// Output pixels from which the Winograd path beats im2col: below 32×32
/// (256 tiles) the products get too thin and reading the transformed kernel
/// dominates.
const MIN_OUTPUT_PIXELS: usize = 32 * 32;

/// Whether a 3×3 stride-1 conv with output `oh × ow` should take this path.
pub(crate) fn worthwhile(oh: usize, ow: usize) -> bool {
    oh >= 2 && ow >= 2 && oh * ow >= MIN_OUTPUT_PIXELS
}

/// A 3×3 kernel transformed to `U_ξ = G·g·Gᵀ`, stored `[out, 16, in]` (each
/// output channel's block written by one task; `U_ξ` is read with row stride
/// `16·in`).
pub(crate) struct Kernel3x3 {
    u: Vec<f32>,
    out: usize,
    inp: usize,
}

impl Kernel3x3 {
    /// The transform of `weight` (`[co, ci, 3, 3]`, contiguous): a conv from
    /// `ci` to `co` channels.
    pub(crate) fn new(weight: &[f32], co: usize, ci: usize) -> Result<Self> {
        Self::build(weight, co, ci, false)
    }

    /// The transform of the kernel of the input gradient of `weight`'s conv
    /// (stride 1): each 3×3 kernel flipped in both axes, input and output
    /// channels swapped — a conv from `co` to `ci` channels.
    pub(crate) fn flipped_transposed(weight: &[f32], co: usize, ci: usize) -> Result<Self> {
        Self::build(weight, co, ci, true)
    }

    fn build(weight: &[f32], co: usize, ci: usize, flip: bool) -> Result<Self> {
        if weight.len() != co * ci * 9 {
            bail!(
                "winograd: kernel of {} values for {co}×{ci}×3×3",
                weight.len()
            )
        }
        let (out, inp) = if flip { (ci, co) } else { (co, ci) };
        let mut u = vec![0f32; out * 16 * inp];
        // One task per output channel `o`, writing its `[16, inp]` block.
        u.par_chunks_mut(16 * inp)
            .enumerate()
            .for_each(|(o, block)| {
                for i in 0..inp {
                    let (oc, ic) = if flip { (i, o) } else { (o, i) };
                    let k = &weight[(oc * ci + ic) * 9..(oc * ci + ic + 1) * 9];
                    let g: [f32; 9] = std::array::from_fn(|t| if flip { k[8 - t] } else { k[t] });
                    for (xi, v) in kernel_tile(&g).into_iter().enumerate() {
                        block[xi * inp + i] = v;
                    }
                }
            });
        Ok(Self { u, out, inp })
    }
}

/// `G·g·Gᵀ` for a 3×3 kernel `g` (row-major), with
/// `G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]`; row-major 4×4.
fn kernel_tile(g: &[f32; 9]) -> [f32; 16] {
    // t = G·g (4×3)
    let mut t = [0f32; 12];
    for j in 0..3 {
        let (a, b, c) = (g[j], g[3 + j], g[6 + j]);
        t[j] = a;
        t[3 + j] = 0.5 * (a + b + c);
        t[6 + j] = 0.5 * (a - b + c);
        t[9 + j] = c;
    }
    // u = t·Gᵀ (4×4)
    let mut u = [0f32; 16];
    for i in 0..4 {
        let (a, b, c) = (t[3 * i], t[3 * i + 1], t[3 * i + 2]);
        u[4 * i] = a;
        u[4 * i + 1] = 0.5 * (a + b + c);
        u[4 * i + 2] = 0.5 * (a - b + c);
        u[4 * i + 3] = c;
    }
    u
}

/// `Bᵀ·d·B` for a 4×4 input tile `d` (row-major), with
/// `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]`.
#[inline(always)]
fn input_tile(d: &[f32; 16]) -> [f32; 16] {
    let mut t = [0f32; 16];
    for j in 0..4 {
        let (d0, d1, d2, d3) = (d[j], d[4 + j], d[8 + j], d[12 + j]);
        t[j] = d0 - d2;
        t[4 + j] = d1 + d2;
        t[8 + j] = d2 - d1;
        t[12 + j] = d1 - d3;
    }
    let mut v = [0f32; 16];
    for i in 0..4 {
        let (t0, t1, t2, t3) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        v[4 * i] = t0 - t2;
        v[4 * i + 1] = t1 + t2;
        v[4 * i + 2] = t2 - t1;
        v[4 * i + 3] = t1 - t3;
    }
    v
}

/// `Aᵀ·m·A` for a 4×4 product tile, with `Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]`:
/// the 2×2 output block, row-major.
#[inline(always)]
fn output_tile(m: &[f32; 16]) -> [f32; 4] {
    let mut t = [0f32; 8];
    for j in 0..4 {
        let (m0, m1, m2, m3) = (m[j], m[4 + j], m[8 + j], m[12 + j]);
        t[j] = m0 + m1 + m2;
        t[4 + j] = m1 - m2 - m3;
    }
    let mut y = [0f32; 4];
    for i in 0..2 {
        let (t0, t1, t2, t3) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        y[2 * i] = t0 + t1 + t2;
        y[2 * i + 1] = t1 - t2 - t3;
    }
    y
}

/// The 3×3 stride-1 conv of `x` (`[b, c, h, w]`, contiguous, `c` = the
/// kernel's input channels) with zero padding `pad` (at most 2): `[b, out, oh,
/// ow]` with `oh = h + 2·pad − 2`. Per batch item, bands of tile rows whose
/// transformed input or products hold at most `max_values` values: transform
/// the band's input (one task per channel), the 16 products (one task each,
/// single-threaded products — independent products keep both cores busy
/// better than one product shared), the output transform (one task per
/// output channel).
pub(crate) fn conv(
    x: &[f32],
    (b, c, h, w): (usize, usize, usize, usize),
    kernel: &Kernel3x3,
    pad: usize,
    max_values: usize,
) -> Result<Vec<f32>> {
    if c != kernel.inp || x.len() != b * c * h * w {
        bail!(
            "winograd: input [{b}, {c}, {h}, {w}] ({} values) for a kernel with {} input channels",
            x.len(),
            kernel.inp
        )
    }
    if pad > 2 || h + 2 * pad < 3 || w + 2 * pad < 3 {
        bail!("winograd: padding {pad} on a {h}×{w} input")
    }
    let co = kernel.out;
    let (oh, ow) = (h + 2 * pad - 2, w + 2 * pad - 2);
    let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
    let per_tile_row = 16 * c.max(co) * tw;
    let band_rows = (max_values / per_tile_row).clamp(1, th);
    let mut out = vec![0f32; b * co * oh * ow];
    // The band buffers, allocated once for the largest band: every value a
    // band uses is written before it is read.
    let mut v = vec![0f32; c * 16 * band_rows * tw];
    let mut m = vec![0f32; 16 * co * band_rows * tw];
    for bi in 0..b {
        let input = &x[bi * c * h * w..(bi + 1) * c * h * w];
        let output = &mut out[bi * co * oh * ow..(bi + 1) * co * oh * ow];
        for ty0 in (0..th).step_by(band_rows) {
            let rows = ty0..(ty0 + band_rows).min(th);
            let tiles = rows.len() * tw;
            // V: [c, 16, tiles].
            let v = &mut v[..c * 16 * tiles];
            v.par_chunks_mut(16 * tiles)
                .zip(input.par_chunks(h * w))
                .for_each(|(vc, plane)| {
                    transform_plane(plane, (h, w), pad, rows.clone(), tw, vc, tiles)
                });
            // M: [16, co, tiles], M_ξ = U_ξ·V_ξ.
            let v = &*v;
            let m = &mut m[..16 * co * tiles];
            m.par_chunks_mut(co * tiles)
                .enumerate()
                .for_each(|(xi, mx)| {
                    // SAFETY: U_ξ is `[co, c]` with row stride 16·c starting at
                    // `xi·c` inside `kernel.u` (co·16·c values); V_ξ is `[c, tiles]` with row
                    // stride 16·tiles starting at `xi·tiles` inside `v`
                    // (c·16·tiles values); `mx` holds `co·tiles` values, all
                    // overwritten (`read_dst` false).
                    unsafe {
                        raw_product(
                            (co, tiles, c),
                            (mx.as_mut_ptr(), tiles),
                            false,
                            (kernel.u.as_ptr().add(xi * c), 16 * c, 1),
                            (v.as_ptr().add(xi * tiles), 16 * tiles, 1),
                            1.0,
                            gemm::Parallelism::None,
                        )
                    }
                });
            let m = &*m;
            output
                .par_chunks_mut(oh * ow)
                .enumerate()
                .for_each(|(o, plane)| {
                    let mut t = [0f32; 16];
                    for (r, ty) in rows.clone().enumerate() {
                        for tx in 0..tw {
                            let at = o * tiles + r * tw + tx;
                            for (xi, tv) in t.iter_mut().enumerate() {
                                *tv = m[xi * co * tiles + at];
                            }
                            let y = output_tile(&t);
                            for dy in 0..2 {
                                let oy = 2 * ty + dy;
                                if oy >= oh {
                                    break;
                                }
                                for dx in 0..2 {
                                    let ox = 2 * tx + dx;
                                    if ox < ow {
                                        plane[oy * ow + ox] = y[2 * dy + dx];
                                    }
                                }
                            }
                        }
                    }
                });
        }
    }
    Ok(out)
}

/// The transformed input tiles of one channel `plane` (`h·w`) for the tile
/// rows `rows`: `vc[ξ·tiles + r·tw + tx]` for tile `(rows.start + r, tx)`,
/// whose 4×4 input window starts at `(2·ty − pad, 2·tx − pad)` (zeros outside
/// the image).
fn transform_plane(
    plane: &[f32],
    (h, w): (usize, usize),
    pad: usize,
    rows: std::ops::Range<usize>,
    tw: usize,
    vc: &mut [f32],
    tiles: usize,
) {
    let mut d = [0f32; 16];
    for (r, ty) in rows.enumerate() {
        let y0 = (2 * ty) as isize - pad as isize;
        let lines: [Option<&[f32]>; 4] = std::array::from_fn(|i| {
            let y = y0 + i as isize;
            (y >= 0 && (y as usize) < h).then(|| &plane[y as usize * w..(y as usize + 1) * w])
        });
        let all_rows = lines.iter().all(Option::is_some);
        for tx in 0..tw {
            let x0 = (2 * tx) as isize - pad as isize;
            if all_rows && x0 >= 0 && x0 as usize + 4 <= w {
                let x0 = x0 as usize;
                for (i, line) in lines.iter().enumerate() {
                    if let Some(line) = line {
                        d[4 * i..4 * i + 4].copy_from_slice(&line[x0..x0 + 4]);
                    }
                }
            } else {
                for (i, line) in lines.iter().enumerate() {
                    for j in 0..4 {
                        let x = x0 + j as isize;
                        d[4 * i + j] = match line {
                            Some(line) if x >= 0 && (x as usize) < w => line[x as usize],
                            _ => 0.0,
                        };
                    }
                }
            }
            let t = r * tw + tx;
            for (xi, v) in input_tile(&d).into_iter().enumerate() {
                vc[xi * tiles + t] = v;
            }
        }
    }
}
