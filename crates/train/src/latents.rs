//! Caches of what the frozen parts of the model compute: VAE latents of the
//! training images and text-encoder outputs of their captions.
//!
//! # Latents: the mean, not a sample
//!
//! A latent here is `(mean − shift) · scaling_factor` of the VAE's latent
//! distribution — the *mean*, never a sample. kohya's scripts cache
//! `latent_dist.sample()` (one draw, frozen for the whole run) and diffusers'
//! DreamBooth LoRA script draws a fresh sample every step. The VAE's standard
//! deviation is tiny next to the diffusion noise (SD's VAE: ≈ 0.01 against
//! latents of scale ≈ 5), so the three train the same model, and the mean keeps
//! a cache entry a pure function of the image: the same file, crop and model
//! give the same bits in every run, which the disk cache and bit-identical
//! reruns rely on.
//!
//! # The disk cache
//!
//! With a cache folder, every latent is also one `.safetensors` file there
//! (tensor `latents`, f32 `[c, h, w]`), named by a SHA-256 of everything it
//! depends on: the image's absolute path, size and modification time, the
//! bucket, the crop (resized size and offset), the flip, the model id, the VAE's
//! dtype and the scaling. A later run with the same images and settings reads
//! them instead of running the VAE; an edited image (new size or mtime), another
//! crop or another model simply misses. Files are written to a temporary name
//! and renamed, so an interrupted run never leaves a half-written entry; an
//! unreadable or mis-shaped file is ignored and rewritten, and a folder that
//! cannot be written degrades to the in-memory cache with a warning.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use candle_core::{DType, Device, Result, Tensor};
use sd_lora_data::Sample;
use sd_lora_model::conditioning::TextConditioning;
use sd_lora_model::pipeline::StableDiffusion;
use sd_lora_model::vae::AutoencoderKL;
use sha2::{Digest, Sha256};

/// Bumped when the cache file layout or the meaning of an entry changes, so old
/// files are never misread.
const CACHE_FORMAT: &str = "sd-lora-latents-v1";
/// Name of the tensor in a cache file.
const TENSOR_NAME: &str = "latents";

/// What identifies one sample's latent within a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct MemoryKey {
    image: usize,
    resized: [u32; 2],
    offset: [u32; 2],
    size: [u32; 2],
    flipped: bool,
}

impl MemoryKey {
    fn of(sample: &Sample) -> Self {
        Self {
            image: sample.image,
            resized: sample.crop.resized,
            offset: sample.crop.offset,
            size: sample.crop.size,
            flipped: sample.flipped,
        }
    }
}

/// VAE latents of training samples, cached in memory and optionally on disk
/// (see the module docs).
#[derive(Debug)]
pub struct LatentCache {
    disk_dir: Option<PathBuf>,
    model_id: String,
    memory: HashMap<MemoryKey, Tensor>,
    hits: usize,
    misses: usize,
    disk_hits: usize,
    warnings: Vec<String>,
}

impl LatentCache {
    /// A cache for the model named `model_id` (its path, or
    /// [`sd_lora_model::builtin::BUILTIN_TINY`]; it is part of every disk key).
    /// With `disk_dir`, entries are also read from and written to that folder,
    /// which is created when the first entry is written.
    pub fn new(disk_dir: Option<PathBuf>, model_id: &str) -> Self {
        Self {
            disk_dir,
            model_id: model_id.to_string(),
            memory: HashMap::new(),
            hits: 0,
            misses: 0,
            disk_hits: 0,
            warnings: Vec::new(),
        }
    }

    /// The latent of `sample` (f32 `[latent_channels, h/8, w/8]` for SD, on
    /// `device`): from memory, else from the disk cache, else encoded with
    /// `vae` (and stored in both). `image_path` is the sample's image file
    /// (`dataset.images[sample.image].path`); `scaling` the VAE's scaling
    /// factor.
    pub fn get_or_encode(
        &mut self,
        vae: &AutoencoderKL,
        scaling: f64,
        sample: &Sample,
        image_path: &Path,
        device: &Device,
    ) -> Result<Tensor> {
        let key = MemoryKey::of(sample);
        if let Some(t) = self.memory.get(&key) {
            self.hits += 1;
            return Ok(t.clone());
        }
        let expected = expected_shape(vae, sample);
        let disk_path = self.disk_dir.as_ref().map(|dir| {
            dir.join(format!(
                "{}.safetensors",
                self.disk_key(vae, scaling, sample, image_path)
            ))
        });
        if let Some(path) = &disk_path
            && let Some(t) = read_entry(path, &expected, device)
        {
            self.hits += 1;
            self.disk_hits += 1;
            self.memory.insert(key, t.clone());
            return Ok(t);
        }
        self.misses += 1;
        if sample.pixels.is_empty() {
            candle_core::bail!(
                "{}: no cached latent for this crop, and the sample was drawn without its pixels",
                image_path.display()
            )
        }
        let latents = encode_image_latents(vae, scaling, sample, image_path, device)?;
        if let Some(path) = &disk_path
            && let Err(e) = write_entry(path, &latents)
        {
            self.warnings.push(format!(
                "cannot write the latent cache file {}: {e}; latents stay in memory only",
                path.display()
            ));
            // One warning is enough: stop trying the folder for this run.
            self.disk_dir = None;
        }
        self.memory.insert(key, latents.clone());
        Ok(latents)
    }

    /// Lookups answered from memory or disk.
    pub fn hits(&self) -> usize {
        self.hits
    }

    /// Lookups that ran the VAE.
    pub fn misses(&self) -> usize {
        self.misses
    }

    /// Of the [`Self::hits`], those read from the disk cache.
    pub fn disk_hits(&self) -> usize {
        self.disk_hits
    }

    /// Problems the cache worked around (an unwritable cache folder), for the
    /// run's log.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Number of latents held in memory.
    pub fn len(&self) -> usize {
        self.memory.len()
    }

    /// Whether no latent is held in memory.
    pub fn is_empty(&self) -> bool {
        self.memory.is_empty()
    }

    /// The file stem of a sample's disk entry: SHA-256 (hex) of everything the
    /// latent depends on.
    fn disk_key(
        &self,
        vae: &AutoencoderKL,
        scaling: f64,
        sample: &Sample,
        image_path: &Path,
    ) -> String {
        let abs = std::path::absolute(image_path).unwrap_or_else(|_| image_path.to_path_buf());
        let (size, mtime) = match std::fs::metadata(image_path) {
            Ok(m) => {
                let mtime = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                (m.len(), mtime)
            }
            // An unreadable file cannot have been encoded before; any key will do.
            Err(_) => (u64::MAX, 0),
        };
        let mut h = Sha256::new();
        let mut field = |name: &str, value: &[u8]| {
            // Length-prefixed, so no two different field lists hash the same bytes.
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((value.len() as u64).to_le_bytes());
            h.update(value);
        };
        field("format", CACHE_FORMAT.as_bytes());
        field("path", abs.as_os_str().as_encoded_bytes());
        field("size", &size.to_le_bytes());
        field("mtime", &mtime.to_le_bytes());
        let c = &sample.crop;
        let geometry: Vec<u8> = [c.size, c.resized, c.offset]
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        field("bucket+crop", &geometry);
        field("flipped", &[u8::from(sample.flipped)]);
        field("model", self.model_id.as_bytes());
        field("vae_dtype", vae.dtype().as_str().as_bytes());
        field("scaling", &scaling.to_le_bytes());
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The latent of one sample without any cache (for `cache_latents = "none"`):
/// `(mean − shift) · scaling` of the VAE's distribution, f32 `[c, h/8, w/8]`.
pub fn encode_latents(
    vae: &AutoencoderKL,
    scaling: f64,
    sample: &Sample,
    device: &Device,
) -> Result<Tensor> {
    let [c, h, w] = sample.shape();
    let pixels = Tensor::from_slice(&sample.pixels, (1, c, h, w), device)?;
    let dist = vae.encode(&pixels)?;
    let shift = vae.config.shift_factor.unwrap_or(0.0);
    let latents = ((dist.mode().to_dtype(DType::F32)? - shift)? * scaling)?;
    latents.squeeze(0)
}

/// [`encode_latents`] for the image at `image_path`, refusing non-finite latents: a VAE that
/// overflows (SDXL's in f16) gives NaN, and training on NaN latents would only waste the run.
pub fn encode_image_latents(
    vae: &AutoencoderKL,
    scaling: f64,
    sample: &Sample,
    image_path: &Path,
    device: &Device,
) -> Result<Tensor> {
    let latents = encode_latents(vae, scaling, sample, device)?;
    let finite = latents
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|x| x.is_finite());
    if !finite {
        candle_core::bail!(
            "{}: the VAE ({:?}) gave non-finite latents (NaN or infinity); SDXL's VAE overflows \
             in f16: set model.vae_dtype = \"f32\" (or \"auto\"), or give an fp16-safe VAE \
             with model.vae",
            image_path.display(),
            vae.dtype()
        );
    }
    Ok(latents)
}

/// `[latent_channels, h / f, w / f]` with `f = 2^(levels − 1)`, the VAE's downsampling.
fn expected_shape(vae: &AutoencoderKL, sample: &Sample) -> Vec<usize> {
    let f = 1usize << vae.config.block_out_channels.len().saturating_sub(1);
    let [_, h, w] = sample.shape();
    vec![vae.config.latent_channels, h.div_ceil(f), w.div_ceil(f)]
}

/// A cache entry, if the file exists and holds a finite f32 tensor of the
/// expected shape; anything else (absent, truncated, foreign) is a miss.
fn read_entry(path: &Path, expected: &[usize], device: &Device) -> Option<Tensor> {
    let mut tensors = candle_core::safetensors::load(path, device).ok()?;
    let t = tensors.remove(TENSOR_NAME)?;
    if t.dims() != expected || t.dtype() != DType::F32 {
        return None;
    }
    let finite = t
        .flatten_all()
        .ok()?
        .to_vec1::<f32>()
        .ok()?
        .iter()
        .all(|x| x.is_finite());
    finite.then_some(t)
}

/// Writes an entry atomically: a unique temporary file in the same folder,
/// renamed over the final name.
fn write_entry(path: &Path, latents: &Tensor) -> std::result::Result<(), String> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().ok_or("the cache path has no folder")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tensors = HashMap::from([(
        TENSOR_NAME.to_string(),
        latents.to_dtype(DType::F32).map_err(|e| e.to_string())?,
    )]);
    let result = candle_core::safetensors::save(&tensors, &tmp)
        .map_err(|e| e.to_string())
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Text-encoder outputs of captions, for runs that do not train the text
/// encoder (its output is then a fixed function of the caption).
#[derive(Debug, Default)]
pub struct TextEmbeddingCache {
    memory: HashMap<(String, usize), TextConditioning>,
    hits: usize,
    misses: usize,
}

impl TextEmbeddingCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The conditioning of `caption` (see [`encode_caption`]).
    pub fn get_or_encode(
        &mut self,
        sd: &StableDiffusion,
        caption: &str,
        clip_skip: usize,
    ) -> Result<TextConditioning> {
        let key = (caption.to_string(), clip_skip);
        if let Some(t) = self.memory.get(&key) {
            self.hits += 1;
            return Ok(t.clone());
        }
        self.misses += 1;
        let t = encode_caption(sd, caption, clip_skip)?;
        self.memory.insert(key, t.clone());
        Ok(t)
    }

    /// Lookups answered from the cache.
    pub fn hits(&self) -> usize {
        self.hits
    }

    /// Lookups that ran the text encoder.
    pub fn misses(&self) -> usize {
        self.misses
    }
}

/// The conditioning of one caption without a cache — context `[1, 77, width]`
/// in the text encoder's dtype (plus SDXL's pooled `[1, width]`): the caption
/// tokenized and padded as the model expects, then the text encoder(s) with
/// `clip_skip` (1 = the family's default layer).
pub fn encode_caption(
    sd: &StableDiffusion,
    caption: &str,
    clip_skip: usize,
) -> Result<TextConditioning> {
    sd.encode_captions(&[caption], clip_skip)
}
