//! Epoch order, batches within one bucket, and sample tensors.

mod common;
use common::*;
use sd_lora_data::rng::Rng;
use sd_lora_data::{CropMode, Dataset, DatasetConfig, SubsetConfig, SubsetKind};
use std::collections::BTreeMap;
use std::fs;

fn dataset(dir: &std::path::Path, tweak: impl FnOnce(&mut DatasetConfig)) -> Dataset {
    let mut c = DatasetConfig {
        subsets: vec![SubsetConfig::new(
            dir.join("2_ohwx, red, ball, grass"),
            SubsetKind::Instance,
        )],
        resolution: 64,
        min_bucket_side: Some(32),
        max_bucket_side: Some(128),
        bucket_step: 32,
        min_image_side: 16,
        ..Default::default()
    };
    tweak(&mut c);
    Dataset::scan(&c).unwrap()
}

fn make_images(dir: &std::path::Path) {
    let sub = dir.join("2_ohwx, red, ball, grass");
    fs::create_dir_all(&sub).unwrap();
    for (i, (w, h)) in [
        (64, 64),
        (64, 64),
        (64, 64),
        (192, 64),
        (192, 64),
        (64, 128),
        (80, 80),
    ]
    .iter()
    .enumerate()
    {
        save_png(&sub.join(format!("{i}.png")), &gradient(*w, *h));
    }
}

#[test]
fn epochs_honour_repeats_buckets_and_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    make_images(tmp.path());
    let ds = dataset(tmp.path(), |_| {});
    assert!(ds.problems.is_empty(), "{:#?}", ds.problems);
    let batches = ds.epoch_batches(0, 2, 42);
    assert_eq!(batches.len(), ds.batches_per_epoch(2));
    // Every image exactly `repeats` (2) times per epoch.
    let mut seen = BTreeMap::new();
    for b in &batches {
        assert!(!b.items.is_empty() && b.items.len() <= 2);
        for &i in &b.items {
            assert_eq!(ds.images[i].bucket, b.bucket, "batch mixes buckets");
            *seen.entry(i).or_insert(0) += 1;
        }
    }
    assert_eq!(seen.len(), 7);
    assert!(seen.values().all(|&n| n == 2));
    assert_eq!(ds.samples_per_epoch(), 14);
    // Seeded: same seed and epoch → same order; another epoch or seed → another order.
    assert_eq!(ds.epoch_batches(0, 2, 42), batches);
    assert_ne!(ds.epoch_batches(1, 2, 42), batches);
    assert_ne!(ds.epoch_batches(0, 2, 43), batches);
    // The unfiltered order is unchanged by the kind filter's existence, and a
    // kind filter keeps only that kind.
    assert_eq!(ds.epoch_batches_of(None, 0, 2, 42), batches);
    let inst = ds.epoch_batches_of(Some(SubsetKind::Instance), 0, 2, 42);
    assert_eq!(
        inst.len(),
        ds.batches_per_epoch_of(Some(SubsetKind::Instance), 2)
    );
    assert!(
        ds.epoch_batches_of(Some(SubsetKind::Class), 0, 2, 42)
            .is_empty()
    );
    // Buckets: squares, landscape, portrait.
    let hist = ds.bucket_histogram();
    assert_eq!(hist.get(&[64, 64]), Some(&8));
    assert_eq!(hist.get(&[96, 32]), Some(&4), "{hist:?}");
    assert_eq!(hist.get(&[32, 96]), Some(&2), "{hist:?}");
}

#[test]
fn samples_are_chw_in_unit_range_and_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    make_images(tmp.path());
    let ds = dataset(tmp.path(), |c| {
        c.crop = CropMode::Random;
        c.subsets[0].flip = true;
        c.subsets[0].shuffle_caption = true;
        c.subsets[0].keep_tokens = 1;
    });
    let plan = &ds.epoch_batches(0, 3, 1)[0];
    let a = ds.load_batch(plan, 1, 0, 0).unwrap();
    let b = ds.load_batch(plan, 1, 0, 0).unwrap();
    assert_eq!(a, b, "same seed, epoch and batch → identical samples");
    for s in &a {
        assert_eq!(s.pixels.len(), 3 * (s.width * s.height) as usize);
        assert_eq!([s.width, s.height], plan.bucket);
        assert!(s.pixels.iter().all(|v| (-1.0..=1.0).contains(v)));
        assert!(s.caption.starts_with("ohwx"), "{}", s.caption);
        assert_eq!(s.loss_weight, 1.0);
    }
    // The epoch iterator yields the same samples as loading the plans by hand,
    // and can resume mid-epoch.
    let all: Vec<_> = ds.iter_epoch(0, 3, 1, 0).collect();
    assert_eq!(all.len(), ds.batches_per_epoch(3));
    assert_eq!(all[0].1.as_ref().unwrap(), &a);
    let resumed: Vec<_> = ds.iter_epoch(0, 3, 1, 2).collect();
    assert_eq!(resumed.len(), all.len() - 2);
    assert_eq!(resumed[0].0, 2);
    assert_eq!(resumed[0].1.as_ref().unwrap(), all[2].1.as_ref().unwrap());
    // Over many draws, flips and caption orders vary.
    let draws: Vec<_> = (0..16)
        .map(|k| ds.load_sample(3, &mut Rng::new(k)).unwrap())
        .collect();
    assert!(draws.iter().any(|s| s.flipped) && draws.iter().any(|s| !s.flipped));
    let captions: std::collections::BTreeSet<_> = draws.iter().map(|s| s.caption.clone()).collect();
    assert!(captions.len() > 1);
}

#[test]
fn centre_crop_and_pixel_mapping() {
    let tmp = tempfile::tempdir().unwrap();
    let sub = tmp.path().join("2_ohwx, red, ball, grass");
    fs::create_dir_all(&sub).unwrap();
    // Left half black, right half white, 128×64 into a square 64×64 bucket:
    // resized to 128×64 (no change), centre crop keeps columns 32..96.
    let img = image::RgbImage::from_fn(128, 64, |x, _| {
        if x < 64 {
            image::Rgb([0, 0, 0])
        } else {
            image::Rgb([255, 255, 255])
        }
    });
    save_png(&sub.join("a.png"), &img);
    let ds = dataset(tmp.path(), |c| c.bucketing = false);
    let s = ds.load_sample(0, &mut Rng::new(0)).unwrap();
    assert_eq!((s.width, s.height), (64, 64));
    assert_eq!(s.crop.offset, [32, 0]);
    // Channel 0, row 0: first half −1 (black), second half +1 (white).
    assert_eq!(s.pixels[0], -1.0);
    assert_eq!(s.pixels[31], -1.0);
    assert_eq!(s.pixels[32], 1.0);
    assert_eq!(s.pixels[63], 1.0);
    // Channel 2 plane starts at 2·64·64 and is the same picture.
    assert_eq!(s.pixels[2 * 64 * 64 + 63], 1.0);
}
