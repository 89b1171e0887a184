//! Aspect-ratio buckets and crop geometry.
//!
//! The bucket list is the one kohya users know: for a resolution `R`, every
//! `(w, h)` with sides multiples of `step` between the minimum and maximum side
//! and area at most `R²`, taking for each width the tallest height that fits,
//! plus the square. An image goes to the bucket whose aspect ratio is closest
//! to its own, is resized to cover it and cropped to it.

use crate::config::{CropMode, DatasetConfig};

/// A bucket's size in pixels, `[width, height]`.
pub type Bucket = [u32; 2];

/// The rules that decide each image's bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucketing {
    /// Square side when bucketing is off; `R` of the `R²` area limit when on.
    pub resolution: u32,
    /// Buckets are on.
    pub enabled: bool,
    /// Sides are multiples of this.
    pub step: u32,
    /// Smallest side.
    pub min_side: u32,
    /// Largest side.
    pub max_side: u32,
    /// No bucket larger than its image.
    pub no_upscale: bool,
    /// The predefined buckets (empty unless enabled without `no_upscale`).
    pub buckets: Vec<Bucket>,
}

impl Bucketing {
    /// The bucketing described by a (validated) dataset config.
    pub fn from_config(c: &DatasetConfig) -> Self {
        let buckets = if c.bucketing && !c.bucket_no_upscale {
            bucket_list(
                c.resolution,
                c.min_bucket_side(),
                c.max_bucket_side(),
                c.bucket_step,
            )
        } else {
            Vec::new()
        };
        Bucketing {
            resolution: c.resolution,
            enabled: c.bucketing,
            step: c.bucket_step,
            min_side: c.min_bucket_side(),
            max_side: c.max_bucket_side(),
            no_upscale: c.bucket_no_upscale,
            buckets,
        }
    }

    /// The bucket for an image of `width` × `height` (after EXIF rotation).
    pub fn assign(&self, width: u32, height: u32) -> Bucket {
        if !self.enabled {
            return [self.resolution, self.resolution];
        }
        if self.no_upscale {
            return self.no_upscale_bucket(width, height);
        }
        let ar = f64::from(width) / f64::from(height);
        let mut best = self.buckets[0];
        let mut best_err = f64::INFINITY;
        // The list is sorted, so ties go to the narrower bucket, as in kohya.
        for &b in &self.buckets {
            let err = (f64::from(b[0]) / f64::from(b[1]) - ar).abs();
            if err < best_err {
                best = b;
                best_err = err;
            }
        }
        best
    }

    /// A bucket no larger than the image: if the image is over the area
    /// limit, scale it down to that area keeping its aspect ratio; then round
    /// both sides down to multiples of `step`, so the image is only cropped.
    fn no_upscale_bucket(&self, width: u32, height: u32) -> Bucket {
        let step = f64::from(self.step);
        let max_area = f64::from(self.resolution).powi(2);
        let (w, h) = (f64::from(width), f64::from(height));
        let (mut rw, mut rh) = (w, h);
        if w * h > max_area {
            let s = (max_area / (w * h)).sqrt();
            rw = w * s;
            rh = h * s;
        }
        let down = |x: f64| ((x.floor() / step).floor() * step).max(step) as u32;
        [down(rw), down(rh)]
    }
}

/// kohya's bucket list for `resolution` (sorted by width, then height).
pub fn bucket_list(resolution: u32, min_side: u32, max_side: u32, step: u32) -> Vec<Bucket> {
    let max_area = u64::from(resolution) * u64::from(resolution);
    let mut set = std::collections::BTreeSet::new();
    let square = ((max_area as f64).sqrt() as u32 / step) * step;
    set.insert([square, square]);
    let mut w = min_side;
    while w <= max_side {
        let h = max_side.min(((max_area / u64::from(w)) as u32 / step) * step);
        if h >= min_side {
            set.insert([w, h]);
            set.insert([h, w]);
        }
        w += step;
    }
    set.into_iter().collect()
}

/// Where an image is resized to and cropped from to fill its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropGeometry {
    /// Size the image is resized to (covers the bucket).
    pub resized: [u32; 2],
    /// Top-left corner of the crop in the resized image.
    pub offset: [u32; 2],
    /// The bucket (crop size).
    pub size: [u32; 2],
}

/// Resize-to-cover then crop: the image is scaled by the larger of the two
/// side ratios so it covers the bucket, then cropped in the middle (`Center`)
/// or at a window chosen by `pick(range)` in `0..=range` (`Random`).
pub fn crop_geometry(
    src: [u32; 2],
    bucket: Bucket,
    mode: CropMode,
    mut pick: impl FnMut(u32) -> u32,
) -> CropGeometry {
    let scale =
        (f64::from(bucket[0]) / f64::from(src[0])).max(f64::from(bucket[1]) / f64::from(src[1]));
    let resized = [
        ((f64::from(src[0]) * scale).round() as u32).max(bucket[0]),
        ((f64::from(src[1]) * scale).round() as u32).max(bucket[1]),
    ];
    let slack = [resized[0] - bucket[0], resized[1] - bucket[1]];
    let offset = match mode {
        CropMode::Center => [slack[0] / 2, slack[1] / 2],
        CropMode::Random => [pick(slack[0]), pick(slack[1])],
    };
    CropGeometry {
        resized,
        offset,
        size: bucket,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_list_512_matches_kohya() {
        let b = bucket_list(512, 256, 1024, 64);
        // kohya's make_bucket_resolutions((512, 512), 256, 1024, 64).
        let expected: Vec<Bucket> = vec![
            [256, 1024],
            [320, 768],
            [384, 640],
            [448, 576],
            [512, 512],
            [576, 448],
            [640, 384],
            [704, 320],
            [768, 320],
            [832, 256],
            [896, 256],
            [960, 256],
            [1024, 256],
            [256, 832],
            [256, 896],
            [256, 960],
            [320, 704],
        ];
        let mut expected_sorted = expected.clone();
        expected_sorted.sort();
        assert_eq!(b, expected_sorted);
        for [w, h] in &b {
            assert!(w * h <= 512 * 512 && w % 64 == 0 && h % 64 == 0);
        }
    }

    #[test]
    fn bucket_list_1024_contains_sdxl_favourites() {
        let b = bucket_list(1024, 512, 2048, 64);
        for want in [
            [1024, 1024],
            [1152, 896],
            [896, 1152],
            [1216, 832],
            [1344, 768],
            [1536, 640],
        ] {
            assert!(b.contains(&want), "{want:?} missing");
        }
    }

    fn cfg() -> DatasetConfig {
        DatasetConfig::default()
    }

    #[test]
    fn assignment_by_closest_aspect_ratio() {
        let bk = Bucketing::from_config(&cfg());
        assert_eq!(bk.assign(1000, 1000), [512, 512]);
        assert_eq!(bk.assign(4000, 3000), [576, 448]); // 1.333 → 1.286
        assert_eq!(bk.assign(3000, 4000), [448, 576]);
        assert_eq!(bk.assign(1920, 1080), [640, 384]); // 1.778 → 1.667
        assert_eq!(bk.assign(5000, 100), [1024, 256]);
        let off = Bucketing::from_config(&DatasetConfig {
            bucketing: false,
            ..cfg()
        });
        assert_eq!(off.assign(4000, 3000), [512, 512]);
    }

    #[test]
    fn no_upscale_buckets_never_exceed_the_image() {
        let bk = Bucketing::from_config(&DatasetConfig {
            bucket_no_upscale: true,
            ..cfg()
        });
        assert_eq!(bk.assign(300, 200), [256, 192]);
        assert_eq!(bk.assign(512, 512), [512, 512]);
        let [w, h] = bk.assign(4000, 3000);
        assert!(w * h <= 512 * 512 && w % 64 == 0 && h % 64 == 0, "{w}x{h}");
        assert_eq!([w, h], [576, 384]);
        for (iw, ih) in [(65, 900), (700, 300), (2000, 2000)] {
            let [w, h] = bk.assign(iw, ih);
            assert!(w <= iw.max(64) && h <= ih.max(64), "{iw}x{ih} -> {w}x{h}");
        }
    }

    #[test]
    fn crop_geometry_covers_and_centres() {
        let g = crop_geometry([4000, 3000], [576, 448], CropMode::Center, |_| 0);
        // Height ratio wins (448/3000 > 576/4000): 597×448, 21 px slack.
        assert_eq!(g.resized, [597, 448]);
        assert_eq!(g.offset, [10, 0]);
        let g = crop_geometry([100, 400], [256, 256], CropMode::Center, |_| 0);
        assert_eq!(g.resized, [256, 1024]);
        assert_eq!(g.offset, [0, 384]);
        let g = crop_geometry([512, 512], [512, 512], CropMode::Random, |r| r);
        assert_eq!((g.resized, g.offset), ([512, 512], [0, 0]));
        let g = crop_geometry([800, 600], [512, 512], CropMode::Random, |r| r);
        assert_eq!(g.resized, [683, 512]);
        assert_eq!(g.offset, [171, 0]);
    }
}
