//! Loss masks on the latent grid, per sample.
//!
//! A mask comes from the data crate at the sample's pixel size, cut and
//! mirrored like its pixels ([`sd_lora_data::Dataset::load_mask`]); here it is
//! averaged over each latent cell (the VAE's 8×8 pixels, kohya's `area`
//! interpolation) and kept, so an image's mask is decoded once per crop and
//! flip however many epochs see it. Samples without a mask get ones; a batch
//! in which no sample has one gets no mask at all, so runs without masks
//! compute exactly what they did before masks existed.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use sd_lora_data::{Dataset, Sample};

/// What identifies a sample's mask: image, crop and flip.
type Key = (usize, [u32; 2], [u32; 2], bool);

/// The masks of the samples seen so far, on the latent grid.
#[derive(Debug, Default)]
pub struct MaskCache {
    /// Whether any image of the dataset has a mask.
    enabled: bool,
    masks: HashMap<Key, Option<Arc<Vec<f32>>>>,
}

impl MaskCache {
    /// A cache for `ds`.
    pub fn new(ds: &Dataset) -> Self {
        Self {
            enabled: ds.images.iter().any(|e| e.mask.is_some()),
            masks: HashMap::new(),
        }
    }

    /// The `[b, 1, lh, lw]` mask of a batch whose latents are `lh × lw`, or
    /// `None` when no sample of it has a mask.
    pub fn batch_mask(
        &mut self,
        ds: &Dataset,
        samples: &[Sample],
        latent_hw: (usize, usize),
        device: &Device,
    ) -> anyhow::Result<Option<Tensor>> {
        if !self.enabled {
            return Ok(None);
        }
        let (lh, lw) = latent_hw;
        let mut any = false;
        let mut out = Vec::with_capacity(samples.len() * lh * lw);
        for s in samples {
            let key = (s.image, s.crop.offset, s.crop.resized, s.flipped);
            let mask = match self.masks.get(&key) {
                Some(m) => m.clone(),
                None => {
                    let m = ds
                        .load_mask(s)
                        .map_err(|p| anyhow::anyhow!("{p}"))?
                        .map(|px| {
                            Arc::new(area_average(
                                &px,
                                s.width as usize,
                                s.height as usize,
                                lw,
                                lh,
                            ))
                        });
                    self.masks.insert(key, m.clone());
                    m
                }
            };
            match mask {
                Some(m) => {
                    any = true;
                    out.extend_from_slice(&m);
                }
                None => out.extend(std::iter::repeat_n(1.0f32, lh * lw)),
            }
        }
        if !any {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(
            out,
            (samples.len(), 1, lh, lw),
            device,
        )?))
    }
}

/// The mean of `mask` (`h × w`, row major) over each of the `lh × lw` cells
/// it is divided into (sizes need not divide evenly: a cell takes the pixels
/// whose centres fall in it).
pub fn area_average(mask: &[f32], w: usize, h: usize, lw: usize, lh: usize) -> Vec<f32> {
    let mut sum = vec![0.0f32; lw * lh];
    let mut count = vec![0u32; lw * lh];
    for y in 0..h {
        let cy = (y * lh / h.max(1)).min(lh.saturating_sub(1));
        for x in 0..w {
            let cx = (x * lw / w.max(1)).min(lw.saturating_sub(1));
            sum[cy * lw + cx] += mask[y * w + x];
            count[cy * lw + cx] += 1;
        }
    }
    sum.iter()
        .zip(&count)
        .map(|(s, &c)| if c > 0 { s / c as f32 } else { 1.0 })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::area_average;

    #[test]
    fn area_average_means_each_cell() {
        // 4×2 pixels into 2×1 cells.
        let m = [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0];
        assert_eq!(area_average(&m, 4, 2, 2, 1), vec![0.25, 0.75]);
    }
}
