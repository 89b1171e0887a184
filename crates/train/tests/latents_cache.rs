//! The latent and text-embedding caches on the built-in tiny model: shapes,
//! determinism (mean, not a sample), memory hits, disk reuse across "runs",
//! key sensitivity (crop, flip, file change, model), corrupt files ignored and
//! rewritten, atomic writes, and an unwritable folder degrading to memory.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sd_lora_data::Sample;
use sd_lora_data::SubsetKind;
use sd_lora_data::bucket::CropGeometry;
use sd_lora_model::builtin::{BUILTIN_TINY, tiny_sd1};
use sd_lora_model::pipeline::StableDiffusion;
use sd_lora_train::latents::{LatentCache, TextEmbeddingCache, encode_caption, encode_latents};

/// A fresh, empty folder under the system temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!(
        "sd-lora-latents-{name}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sample(image: usize, flipped: bool, offset: [u32; 2], phase: f32) -> Sample {
    let (w, h) = (64u32, 48u32);
    let mut pixels = Vec::new();
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                pixels.push(((x as f32 * 0.13 + y as f32 * 0.05 + c as f32) + phase).sin());
            }
        }
    }
    Sample {
        image,
        pixels,
        width: w,
        height: h,
        caption: "a photo of ohwx dog".into(),
        kind: SubsetKind::Instance,
        loss_weight: 1.0,
        crop: CropGeometry {
            resized: [80, 48],
            offset,
            size: [w, h],
        },
        flipped,
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn cache_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn model() -> StableDiffusion {
    tiny_sd1(DType::F32, &Device::Cpu).unwrap()
}

fn image_file(dir: &Path, bytes: &[u8]) -> PathBuf {
    let p = dir.join("img.png");
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn memory_cache_hits_and_latents_are_the_scaled_mean() {
    let sd = model();
    let dev = Device::Cpu;
    let scaling = sd.vae_config.scaling_factor;
    let dir = temp_dir("mem");
    let img = image_file(&dir, b"not really a png");
    let mut cache = LatentCache::new(None, BUILTIN_TINY);
    let s = sample(0, false, [8, 0], 0.0);
    let a = cache
        .get_or_encode(&sd.vae, scaling, &s, &img, &dev)
        .unwrap();
    assert_eq!(a.dims(), &[4, 6, 8]);
    assert_eq!(a.dtype(), DType::F32);
    assert_eq!((cache.hits(), cache.misses()), (0, 1));
    let b = cache
        .get_or_encode(&sd.vae, scaling, &s, &img, &dev)
        .unwrap();
    assert_eq!((cache.hits(), cache.misses()), (1, 1));
    assert_eq!(bits(&a), bits(&b));
    // Deterministic: the uncached encoding is bit-identical (the mean, no sampling).
    let direct = encode_latents(&sd.vae, scaling, &s, &dev).unwrap();
    assert_eq!(bits(&a), bits(&direct));
    // And equals mean × scaling_factor.
    let px = Tensor::from_slice(&s.pixels, (1, 3, 48, 64), &dev).unwrap();
    let mean = sd.vae.encode(&px).unwrap().mean;
    let want = (mean * scaling).unwrap().squeeze(0).unwrap();
    let diff = (&a - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    // Another flip or crop is another entry.
    cache
        .get_or_encode(&sd.vae, scaling, &sample(0, true, [8, 0], 0.0), &img, &dev)
        .unwrap();
    cache
        .get_or_encode(&sd.vae, scaling, &sample(0, false, [0, 0], 0.0), &img, &dev)
        .unwrap();
    assert_eq!((cache.hits(), cache.misses(), cache.len()), (1, 3, 3));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn disk_cache_is_reused_across_runs_and_keyed_by_file_crop_flip_and_model() {
    let sd = model();
    let dev = Device::Cpu;
    let scaling = sd.vae_config.scaling_factor;
    let dir = temp_dir("disk");
    let cache_dir = dir.join("cache");
    let img = image_file(&dir, b"image bytes v1");
    let s = sample(0, false, [8, 0], 0.0);

    // Run 1 encodes and writes one file (no temp files left behind).
    let mut run1 = LatentCache::new(Some(cache_dir.clone()), BUILTIN_TINY);
    let a = run1
        .get_or_encode(&sd.vae, scaling, &s, &img, &dev)
        .unwrap();
    assert_eq!(run1.misses(), 1);
    let files = cache_files(&cache_dir);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].extension().unwrap() == "safetensors");

    // Run 2 reads it back bit-identically without encoding. The pixels are
    // deliberately different, to prove the VAE did not run.
    let mut run2 = LatentCache::new(Some(cache_dir.clone()), BUILTIN_TINY);
    let b = run2
        .get_or_encode(&sd.vae, scaling, &sample(0, false, [8, 0], 1.0), &img, &dev)
        .unwrap();
    assert_eq!((run2.hits(), run2.disk_hits(), run2.misses()), (1, 1, 0));
    assert_eq!(bits(&a), bits(&b));

    // Flip, crop, model and a changed file each miss and add an entry.
    let mut run3 = LatentCache::new(Some(cache_dir.clone()), BUILTIN_TINY);
    run3.get_or_encode(&sd.vae, scaling, &sample(0, true, [8, 0], 0.0), &img, &dev)
        .unwrap();
    run3.get_or_encode(
        &sd.vae,
        scaling,
        &sample(0, false, [16, 0], 0.0),
        &img,
        &dev,
    )
    .unwrap();
    assert_eq!(run3.misses(), 2);
    let mut other_model = LatentCache::new(Some(cache_dir.clone()), "other/model");
    other_model
        .get_or_encode(&sd.vae, scaling, &s, &img, &dev)
        .unwrap();
    assert_eq!(other_model.misses(), 1);
    std::fs::write(&img, b"image bytes v2, longer").unwrap();
    let mut run4 = LatentCache::new(Some(cache_dir.clone()), BUILTIN_TINY);
    run4.get_or_encode(&sd.vae, scaling, &s, &img, &dev)
        .unwrap();
    assert_eq!(run4.misses(), 1);
    assert_eq!(cache_files(&cache_dir).len(), 5);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn corrupt_cache_files_are_ignored_and_rewritten() {
    let sd = model();
    let dev = Device::Cpu;
    let scaling = sd.vae_config.scaling_factor;
    let dir = temp_dir("corrupt");
    let cache_dir = dir.join("cache");
    let img = image_file(&dir, b"bytes");
    let s = sample(3, false, [0, 0], 0.0);
    let a = LatentCache::new(Some(cache_dir.clone()), BUILTIN_TINY)
        .get_or_encode(&sd.vae, scaling, &s, &img, &dev)
        .unwrap();
    let file = cache_files(&cache_dir).remove(0);
    let good = std::fs::read(&file).unwrap();

    // Truncated, garbage, empty and a wrong-shaped tensor: all misses, then repaired.
    let wrong_shape = {
        let t = Tensor::zeros((4, 2, 2), DType::F32, &dev).unwrap();
        let p = dir.join("wrong.safetensors");
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("latents".to_string(), t)]),
            &p,
        )
        .unwrap();
        std::fs::read(p).unwrap()
    };
    for bad in [
        &good[..good.len() / 2],
        b"garbage".as_slice(),
        b"",
        &wrong_shape[..],
    ] {
        std::fs::write(&file, bad).unwrap();
        let mut c = LatentCache::new(Some(cache_dir.clone()), BUILTIN_TINY);
        let b = c.get_or_encode(&sd.vae, scaling, &s, &img, &dev).unwrap();
        assert_eq!((c.misses(), c.hits()), (1, 0));
        assert_eq!(bits(&a), bits(&b));
        assert!(c.warnings().is_empty());
        assert_eq!(
            std::fs::read(&file).unwrap(),
            good,
            "the entry was not rewritten"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_unwritable_cache_folder_degrades_to_memory_with_a_warning() {
    let sd = model();
    let dev = Device::Cpu;
    let dir = temp_dir("unwritable");
    let img = image_file(&dir, b"bytes");
    // A file where the folder should be: create_dir_all fails even as root.
    let blocker = dir.join("cache");
    std::fs::write(&blocker, b"i am a file").unwrap();
    let mut c = LatentCache::new(Some(blocker.join("sub")), BUILTIN_TINY);
    let s = sample(0, false, [0, 0], 0.0);
    c.get_or_encode(&sd.vae, sd.vae_config.scaling_factor, &s, &img, &dev)
        .unwrap();
    c.get_or_encode(&sd.vae, sd.vae_config.scaling_factor, &s, &img, &dev)
        .unwrap();
    assert_eq!((c.misses(), c.hits()), (1, 1));
    assert_eq!(c.warnings().len(), 1, "{:?}", c.warnings());
    assert!(c.warnings()[0].contains("latent cache"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn text_embeddings_are_cached_by_caption_and_clip_skip() {
    let sd = model();
    let mut cache = TextEmbeddingCache::new();
    let a = cache
        .get_or_encode(&sd, "a photo of ohwx dog", 1)
        .unwrap()
        .context;
    assert_eq!(a.dims(), &[1, 77, 64]);
    let b = cache
        .get_or_encode(&sd, "a photo of ohwx dog", 1)
        .unwrap()
        .context;
    assert_eq!(bits(&a), bits(&b));
    assert_eq!((cache.hits(), cache.misses()), (1, 1));
    let c = cache
        .get_or_encode(&sd, "a photo of ohwx dog", 2)
        .unwrap()
        .context;
    assert_ne!(bits(&a), bits(&c));
    cache.get_or_encode(&sd, "a photo of a dog", 1).unwrap();
    assert_eq!((cache.hits(), cache.misses()), (1, 3));
    assert_eq!(
        bits(&a),
        bits(
            &encode_caption(&sd, "a photo of ohwx dog", 1)
                .unwrap()
                .context
        )
    );
}
