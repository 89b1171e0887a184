//! Block-wise 8-bit quantisation with the dynamic map of Dettmers et al.
//! ("8-bit Optimizers via Block-wise Quantization", 2022), as bitsandbytes
//! builds and applies it.
//!
//! The map's 256 values are, for each decade `10⁻⁶ … 10⁰`, the midpoints of an
//! even split of `[0.1, 1]` scaled into that decade — finer the larger the
//! decade — plus 0 and 1 (and the negatives in the signed map). A block of
//! 256 values is stored as its absolute maximum (f32) and, per value, the
//! index of the map entry nearest to `value / absmax` (ties to the lower).
//!
//! Two details follow bitsandbytes' CPU kernels: the signed map's lowest
//! entry is −1 (bitsandbytes' CPU quantiser sets it so before searching; the
//! formula gives −0.99297), so a block's largest negative value is kept as
//! exactly as its largest positive one; and the split of `[0.1, 1]` is the
//! correctly rounded one (PyTorch's vectorised `linspace` may round an entry
//! one unit in the last place differently, depending on the CPU).

/// Values per block (bitsandbytes' block size for optimizer state).
pub const BLOCK: usize = 256;

/// `steps` evenly spaced values from `start` to `end`, each rounded once
/// from f64 to f32.
fn linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f64;
    (0..steps)
        .map(|i| (start + step * i as f64) as f32)
        .collect()
}

/// The 256 sorted entries of the dynamic map (bitsandbytes'
/// `create_dynamic_map(signed)` with 7 exponent bits; the signed map starts
/// at −1, see the module docs).
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    const EXPONENT_BITS: i32 = 7;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..EXPONENT_BITS {
        let items = if signed {
            (1usize << i) + 1
        } else {
            (1usize << (i + 1)) + 1
        };
        let bounds = linspace_f32(0.1f32.into(), 1.0, items);
        // The decade as Python writes `10 ** -k`: the correctly rounded
        // double, used as an f32 factor.
        let decade: f64 = format!("1e{}", -(EXPONENT_BITS - 1) + i)
            .parse()
            .unwrap_or(1.0);
        let decade = decade as f32;
        let means: Vec<f32> = bounds.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        data.extend(means.iter().map(|m| decade * m));
        if signed {
            data.extend(means.iter().map(|m| -decade * m));
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    if signed {
        data[0] = -1.0;
    }
    let mut out = [0.0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// A map with the midpoints between its neighbours, for quantising.
#[derive(Debug, Clone)]
pub struct Codebook {
    /// The map's entries, sorted.
    pub values: [f32; 256],
    /// `mid[i]` = halfway between entries `i` and `i + 1`.
    mid: [f32; 255],
}

impl Codebook {
    /// The codebook of [`dynamic_map`].
    pub fn dynamic(signed: bool) -> Self {
        let values = dynamic_map(signed);
        let mut mid = [0.0f32; 255];
        for (i, m) in mid.iter_mut().enumerate() {
            *m = (values[i] + values[i + 1]) / 2.0;
        }
        Codebook { values, mid }
    }

    /// Index of the entry nearest to `x` (a value already divided by its
    /// block's absolute maximum); halfway cases go to the lower entry.
    pub fn nearest(&self, x: f32) -> u8 {
        // Number of midpoints below x: the first i with x ≤ mid[i].
        self.mid.partition_point(|&m| m < x) as u8
    }

    /// Quantises `x` block by block into `codes` and `absmax` (one per
    /// [`BLOCK`] values, the last block possibly shorter). A block of zeros
    /// gets absmax 0 and the code of the entry 0.
    pub fn quantize(&self, x: &[f32], codes: &mut [u8], absmax: &mut [f32]) {
        for ((xb, cb), am) in x
            .chunks(BLOCK)
            .zip(codes.chunks_mut(BLOCK))
            .zip(absmax.iter_mut())
        {
            let m = xb.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
            *am = m;
            let inv = if m > 0.0 { 1.0 / m } else { 0.0 };
            for (c, &v) in cb.iter_mut().zip(xb) {
                *c = self.nearest((v * inv).clamp(-1.0, 1.0));
            }
        }
    }

    /// The values `codes` and `absmax` stand for.
    pub fn dequantize(&self, codes: &[u8], absmax: &[f32], out: &mut [f32]) {
        for ((ob, cb), &am) in out.chunks_mut(BLOCK).zip(codes.chunks(BLOCK)).zip(absmax) {
            for (o, &c) in ob.iter_mut().zip(cb) {
                *o = self.values[c as usize] * am;
            }
        }
    }
}

/// Number of blocks for `n` values.
pub fn blocks(n: usize) -> usize {
    n.div_ceil(BLOCK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_sorted_and_span_the_range() {
        let s = dynamic_map(true);
        let u = dynamic_map(false);
        assert_eq!((s[0], s[255]), (-1.0, 1.0));
        // −1 took the place of the formula's −0.99297.
        assert!((s[1] + 0.978_906_3).abs() < 1e-6, "{}", s[1]);
        assert_eq!((u[0], u[255]), (0.0, 1.0));
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(u.windows(2).all(|w| w[0] < w[1]));
        // The smallest non-zero magnitudes are in the 1e-6 decade.
        assert!(u[1] > 1e-7 && u[1] < 1e-6);
    }

    #[test]
    fn quantize_round_trip_error_is_bounded_by_the_map_spacing() {
        let cb = Codebook::dynamic(true);
        let x: Vec<f32> = (0..700).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let mut codes = vec![0u8; x.len()];
        let mut absmax = vec![0.0f32; blocks(x.len())];
        cb.quantize(&x, &mut codes, &mut absmax);
        let mut y = vec![0.0f32; x.len()];
        cb.dequantize(&codes, &absmax, &mut y);
        for (b, (xb, yb)) in x.chunks(BLOCK).zip(y.chunks(BLOCK)).enumerate() {
            let am = absmax[b];
            // Near the block maximum the map's entries are 0.9/64 apart in
            // the signed map, and −1 is 0.021 from its neighbour: half of
            // that at most.
            for (a, c) in xb.iter().zip(yb) {
                assert!((a - c).abs() <= am * 0.0106 + 1e-7, "{a} vs {c}");
            }
            // The maximum itself is exact.
            let i = xb
                .iter()
                .enumerate()
                .max_by(|p, q| p.1.abs().total_cmp(&q.1.abs()))
                .map(|p| p.0)
                .unwrap_or(0);
            assert_eq!(yb[i].abs(), am);
        }
        // All-zero block.
        let z = [0.0f32; 10];
        let mut c = [7u8; 10];
        let mut am = [1.0f32];
        cb.quantize(&z, &mut c, &mut am);
        let mut back = [1.0f32; 10];
        cb.dequantize(&c, &am, &mut back);
        assert_eq!(back, [0.0; 10]);
    }
}
