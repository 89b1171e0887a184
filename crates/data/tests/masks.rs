//! Loss masks: `NAME-masklabel.png` files are masks, not images; a mask of
//! the wrong size skips its image with an error; the alpha channel with
//! `alpha_mask`; a sample's mask is cut and mirrored exactly like its pixels.

mod common;
use common::*;
use image::{GrayImage, Luma, Rgba, RgbaImage};
use sd_lora_data::rng::Rng;
use sd_lora_data::{Dataset, DatasetConfig, MaskSource, SubsetConfig, SubsetKind};

fn config(dir: &std::path::Path) -> DatasetConfig {
    DatasetConfig {
        subsets: vec![SubsetConfig::new(dir, SubsetKind::Instance)],
        resolution: 64,
        bucketing: false,
        min_image_side: 16,
        ..Default::default()
    }
}

/// A mask whose left half is white.
fn left_half(w: u32, h: u32) -> GrayImage {
    GrayImage::from_fn(w, h, |x, _| Luma([if x < w / 2 { 255 } else { 0 }]))
}

#[test]
fn mask_files_are_masks_and_follow_crop_and_flip() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    save_png(&d.join("a.png"), &gradient(64, 64));
    left_half(64, 64).save(d.join("a-masklabel.png")).unwrap();
    save_png(&d.join("b.png"), &gradient(64, 64));
    left_half(32, 32).save(d.join("b-masklabel.png")).unwrap();
    save_png(&d.join("c.png"), &gradient(64, 64));
    left_half(64, 64)
        .save(d.join("orphan-masklabel.png"))
        .unwrap();

    let ds = Dataset::scan(&config(d)).unwrap();
    let names: Vec<String> = ds
        .images
        .iter()
        .map(|e| e.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["a.png", "c.png"],
        "masks are not images; b is skipped"
    );
    assert_eq!(
        ds.images[0].mask,
        Some(MaskSource::File(d.join("a-masklabel.png")))
    );
    assert_eq!(ds.images[1].mask, None);
    let text: Vec<String> = ds.problems.iter().map(|p| p.to_string()).collect();
    let text = text.join("\n");
    assert!(
        text.contains("b.png") && text.contains("32×32 px and the image 64×64"),
        "{text}"
    );
    assert!(text.contains("mask has no image named orphan"), "{text}");

    // Centre crop of a square image: the mask as drawn; mirrored: the right half.
    let plain = ds.load_variant(0, false).unwrap();
    let m = ds.load_mask(&plain).unwrap().unwrap();
    assert_eq!(m.len(), 64 * 64);
    assert_eq!((m[0], m[63]), (1.0, 0.0));
    let flipped = ds.load_variant(0, true).unwrap();
    let m = ds.load_mask(&flipped).unwrap().unwrap();
    assert_eq!((m[0], m[63]), (0.0, 1.0));
    let mut rng = Rng::new(1);
    let unmasked = ds.load_sample(1, &mut rng).unwrap();
    assert_eq!(ds.load_mask(&unmasked).unwrap(), None);
}

#[test]
fn alpha_masks_come_from_the_alpha_channel_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let rgba = RgbaImage::from_fn(64, 64, |_, y| {
        Rgba([200, 10, 10, if y < 16 { 0 } else { 255 }])
    });
    std::fs::write(d.join("a.png"), png_bytes_rgba(&rgba)).unwrap();
    save_png(&d.join("opaque.png"), &gradient(64, 64));
    let ds = Dataset::scan(&config(d)).unwrap();
    assert!(ds.images.iter().all(|e| e.mask.is_none()), "off by default");

    let mut c = config(d);
    c.alpha_mask = true;
    let ds = Dataset::scan(&c).unwrap();
    assert_eq!(ds.images[0].mask, Some(MaskSource::Alpha));
    assert_eq!(ds.images[1].mask, None, "no alpha channel: trained whole");
    let s = ds.load_variant(0, false).unwrap();
    let m = ds.load_mask(&s).unwrap().unwrap();
    assert_eq!((m[0], m[64 * 16]), (0.0, 1.0));
}
