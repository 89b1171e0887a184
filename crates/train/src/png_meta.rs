//! Generated images as AUTOMATIC1111 writes them: a PNG with a `parameters`
//! text chunk holding the generation settings, so that an image dropped into
//! A1111's "PNG Info", ComfyUI or Civitai shows (and reuses) its prompt, seed,
//! sampler, model and LoRAs. Plus [`grid`] for preview sheets.
//!
//! The text follows A1111's `create_infotext`:
//!
//! ```text
//! a photo of zwx dog <lora:zwx:0.8>
//! Negative prompt: blurry
//! Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: abcdef1234, Model: v1-5, Lora hashes: "zwx: 0123456789ab"
//! ```
//!
//! - The negative-prompt line is left out when there is none, like A1111.
//! - Fields in A1111's order (Steps, Sampler, CFG scale, Seed, Size, Model
//!   hash, Model, Clip skip, then the extra fields such as Lora hashes); a
//!   value holding `,`, `:` or a newline is JSON-quoted (A1111's `quote`).
//! - LoRA scales are not a field in A1111: they live in the prompt as
//!   `<lora:NAME:SCALE>` tags. [`GenerationParams::to_a1111_string`] appends a
//!   tag per LoRA to the prompt line, and [`parse_a1111`] takes the trailing
//!   tags off again, so a round trip gives back the prompt as it was.
//! - Hashes: the model's is A1111's short hash, the first 10 hex digits of the
//!   file's SHA-256 ([`model_short_hash`]); a LoRA's is the first 12 hex digits
//!   of the "addnet" hash, the SHA-256 of a safetensors file *after* its header
//!   ([`lora_short_hash`]), which is what A1111's Lora extension writes.
//!
//! The text goes into a `tEXt` chunk when it is Latin-1 (as PIL writes it) and
//! into an `iTXt` (UTF-8) chunk otherwise; [`read_parameters`] reads either.
//! Files are written to a temporary name and renamed, so a reader never sees a
//! half-written image.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use image::RgbImage;
use sha2::{Digest, Sha256};

/// The PNG text keyword A1111 stores its settings under.
pub const PARAMETERS_KEY: &str = "parameters";

/// Errors of this module; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum PngMetaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot encode PNG {path}: {message}")]
    Encode { path: PathBuf, message: String },
    #[error("cannot decode PNG {path}: {message}")]
    Decode { path: PathBuf, message: String },
    #[error("not A1111 generation parameters: {0}")]
    Parse(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PngMetaError + '_ {
    move |source| PngMetaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A LoRA used for an image.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraInfo {
    /// The name A1111 would show (the file stem).
    pub name: String,
    pub scale: f64,
    /// [`lora_short_hash`] of the file (12 hex digits); may be empty when
    /// unknown, in which case the LoRA has no entry in `Lora hashes`.
    pub hash: String,
}

/// The settings of one generated image.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub prompt: String,
    /// Empty for none.
    pub negative_prompt: String,
    pub steps: u32,
    /// A1111's display name: `Euler a`, `Euler`, `DDIM`, `DPM++ 2M`,
    /// `DPM++ 2M Karras`.
    pub sampler: String,
    pub cfg_scale: f64,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    /// The model's name (file or folder stem).
    pub model_name: Option<String>,
    /// [`model_short_hash`] (10 hex digits).
    pub model_hash: Option<String>,
    /// Written only when above 1, like A1111.
    pub clip_skip: Option<usize>,
    pub loras: Vec<LoraInfo>,
    /// Other `Key: value` fields, written after the known ones in this order
    /// (and where [`parse_a1111`] keeps the fields it does not know).
    pub extra: Vec<(String, String)>,
}

/// A1111's `quote`: a value holding `,`, `:` or a newline becomes a JSON
/// string.
fn quote(value: &str) -> String {
    if value.contains([',', ':', '\n']) {
        serde_json::to_string(value).unwrap_or_else(|_| value.to_string())
    } else {
        value.to_string()
    }
}

/// Formats a number as Python prints A1111's values: `7` for 7.0, `7.5`.
fn number(x: f64) -> String {
    format!("{x}")
}

impl GenerationParams {
    /// The prompt with a `<lora:NAME:SCALE>` tag per LoRA appended, as it
    /// appears in A1111's text.
    pub fn prompt_with_lora_tags(&self) -> String {
        let mut prompt = self.prompt.clone();
        for lora in &self.loras {
            if !prompt.is_empty() {
                prompt.push(' ');
            }
            prompt.push_str(&format!("<lora:{}:{}>", lora.name, number(lora.scale)));
        }
        prompt
    }

    /// The `Lora hashes` value: `name: hash, name: hash` (names without `:`
    /// and `,`, as A1111 writes them), or `None` when no LoRA has a hash.
    fn lora_hashes(&self) -> Option<String> {
        let entries: Vec<String> = self
            .loras
            .iter()
            .filter(|l| !l.hash.is_empty())
            .map(|l| format!("{}: {}", l.name.replace([':', ','], ""), l.hash))
            .collect();
        (!entries.is_empty()).then(|| entries.join(", "))
    }

    /// The `parameters` text exactly as A1111 lays it out (see the module docs).
    pub fn to_a1111_string(&self) -> String {
        let mut fields: Vec<(String, String)> = vec![
            ("Steps".into(), self.steps.to_string()),
            ("Sampler".into(), self.sampler.clone()),
            ("CFG scale".into(), number(self.cfg_scale)),
            ("Seed".into(), self.seed.to_string()),
            ("Size".into(), format!("{}x{}", self.width, self.height)),
        ];
        if let Some(hash) = &self.model_hash {
            fields.push(("Model hash".into(), hash.clone()));
        }
        if let Some(name) = &self.model_name {
            fields.push(("Model".into(), name.clone()));
        }
        if let Some(skip) = self.clip_skip.filter(|&s| s > 1) {
            fields.push(("Clip skip".into(), skip.to_string()));
        }
        if let Some(hashes) = self.lora_hashes() {
            fields.push(("Lora hashes".into(), hashes));
        }
        fields.extend(self.extra.iter().cloned());
        let line = fields
            .iter()
            .map(|(k, v)| format!("{k}: {}", quote(v)))
            .collect::<Vec<_>>()
            .join(", ");
        let negative = if self.negative_prompt.is_empty() {
            String::new()
        } else {
            format!("\nNegative prompt: {}", self.negative_prompt)
        };
        format!("{}{negative}\n{line}", self.prompt_with_lora_tags())
            .trim()
            .to_string()
    }
}

/// Splits a parameter line into `(key, value)` pairs, unquoting JSON strings
/// (A1111's `re_param`: `\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)`).
fn parse_fields(line: &str) -> Vec<(String, String)> {
    let chars: Vec<char> = line.chars().collect();
    let mut fields = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        while i < chars.len() && (chars[i].is_whitespace() || chars[i] == ',') {
            i += 1;
        }
        let key_start = i;
        while i < chars.len() && chars[i] != ':' && chars[i] != ',' {
            i += 1;
        }
        if i >= chars.len() || chars[i] == ',' {
            continue;
        }
        let key: String = chars[key_start..i].iter().collect();
        i += 1;
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let value = if chars.get(i) == Some(&'"') {
            let start = i;
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i = (i + 1).min(chars.len());
            let raw: String = chars[start..i].iter().collect();
            serde_json::from_str::<String>(&raw).unwrap_or(raw)
        } else {
            let start = i;
            while i < chars.len() && chars[i] != ',' {
                i += 1;
            }
            chars[start..i]
                .iter()
                .collect::<String>()
                .trim()
                .to_string()
        };
        fields.push((key.trim().to_string(), value));
    }
    fields
}

/// Takes trailing `<lora:NAME:SCALE>` tags (the ones
/// [`GenerationParams::to_a1111_string`] appends) off `prompt`.
fn strip_lora_tags(prompt: &str) -> (String, Vec<(String, f64)>) {
    let mut rest = prompt.trim_end().to_string();
    let mut tags = Vec::new();
    while rest.ends_with('>') {
        let Some(open) = rest.rfind("<lora:") else {
            break;
        };
        let inner = &rest[open + "<lora:".len()..rest.len() - 1];
        let Some((name, scale)) = inner.rsplit_once(':') else {
            break;
        };
        let Ok(scale) = scale.trim().parse::<f64>() else {
            break;
        };
        tags.push((name.to_string(), scale));
        rest.truncate(open);
        if rest.ends_with(' ') {
            rest.pop();
        }
    }
    tags.reverse();
    (rest, tags)
}

/// Parses A1111's `parameters` text back into [`GenerationParams`] (the inverse
/// of [`GenerationParams::to_a1111_string`]). The last line holds the fields;
/// lines before it are the prompt, then from `Negative prompt:` on the
/// negative prompt. Unknown fields go into `extra`.
pub fn parse_a1111(text: &str) -> Result<GenerationParams, PngMetaError> {
    let text = text.trim();
    let (head, line) = match text.rsplit_once('\n') {
        Some((head, line)) => (head, line),
        None => ("", text),
    };
    let fields = parse_fields(line);
    let get = |key: &str| {
        fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let steps_text = get("Steps").ok_or_else(|| {
        PngMetaError::Parse(format!("no `Steps:` field in the last line {line:?}"))
    })?;
    let bad =
        |key: &str, v: &str| PngMetaError::Parse(format!("field `{key}: {v}` is not a number"));
    let steps = steps_text.parse().map_err(|_| bad("Steps", steps_text))?;

    let (prompt, negative_prompt) = match head.strip_prefix("Negative prompt:") {
        Some(n) => (String::new(), n.trim_start().to_string()),
        None => match head.split_once("\nNegative prompt:") {
            Some((p, n)) => (p.to_string(), n.trim_start().to_string()),
            None => (head.to_string(), String::new()),
        },
    };
    let (prompt, tags) = strip_lora_tags(&prompt);

    let mut hashes: Vec<(String, String)> = Vec::new();
    if let Some(v) = get("Lora hashes") {
        for entry in v.split(',') {
            if let Some((name, hash)) = entry.split_once(':') {
                hashes.push((name.trim().to_string(), hash.trim().to_string()));
            }
        }
    }
    let loras = tags
        .into_iter()
        .map(|(name, scale)| {
            let key = name.replace([':', ','], "");
            let hash = hashes
                .iter()
                .find(|(n, _)| *n == key)
                .map(|(_, h)| h.clone())
                .unwrap_or_default();
            LoraInfo { name, scale, hash }
        })
        .collect();

    let num = |key: &str| -> Result<Option<f64>, PngMetaError> {
        get(key)
            .map(|v| v.parse::<f64>().map_err(|_| bad(key, v)))
            .transpose()
    };
    let seed = match get("Seed") {
        Some(v) => v.parse().map_err(|_| bad("Seed", v))?,
        None => 0,
    };
    let (width, height) = match get("Size") {
        Some(v) => {
            let (w, h) = v
                .split_once('x')
                .ok_or_else(|| PngMetaError::Parse(format!("field `Size: {v}` is not WxH")))?;
            (
                w.parse().map_err(|_| bad("Size", v))?,
                h.parse().map_err(|_| bad("Size", v))?,
            )
        }
        None => (0, 0),
    };
    const KNOWN: &[&str] = &[
        "Steps",
        "Sampler",
        "CFG scale",
        "Seed",
        "Size",
        "Model hash",
        "Model",
        "Clip skip",
        "Lora hashes",
    ];
    Ok(GenerationParams {
        prompt,
        negative_prompt,
        steps,
        sampler: get("Sampler").unwrap_or_default().to_string(),
        cfg_scale: num("CFG scale")?.unwrap_or(7.0),
        seed,
        width,
        height,
        model_name: get("Model").map(str::to_string),
        model_hash: get("Model hash").map(str::to_string),
        clip_skip: num("Clip skip")?.map(|v| v as usize),
        loras,
        extra: fields
            .iter()
            .filter(|(k, _)| !KNOWN.contains(&k.as_str()))
            .cloned()
            .collect(),
    })
}

/// Writes `image` as a PNG at `path` with `parameters` as its text chunk,
/// atomically (a temporary file in the same folder, then a rename).
pub fn write_png_with_parameters(
    path: &Path,
    image: &RgbImage,
    parameters: &str,
) -> Result<(), PngMetaError> {
    let encode_err = |e: png::EncodingError| PngMetaError::Encode {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        // tEXt is Latin-1 only; PIL (so A1111) falls back to iTXt otherwise.
        if parameters.chars().all(|c| (c as u32) < 256) {
            encoder.add_text_chunk(PARAMETERS_KEY.into(), parameters.into())
        } else {
            encoder.add_itxt_chunk(PARAMETERS_KEY.into(), parameters.into())
        }
        .map_err(encode_err)?;
        let mut writer = encoder.write_header().map_err(encode_err)?;
        writer
            .write_image_data(image.as_raw())
            .map_err(encode_err)?;
        writer.finish().map_err(encode_err)?;
    }
    crate::outputs::write_atomic(path, &bytes).map_err(io_err(path))
}

/// Writes `image` with `params` (see [`write_png_with_parameters`]).
pub fn write_png(
    path: &Path,
    image: &RgbImage,
    params: &GenerationParams,
) -> Result<(), PngMetaError> {
    write_png_with_parameters(path, image, &params.to_a1111_string())
}

/// The `parameters` text of a PNG (tEXt, zTXt or iTXt), if it has one.
pub fn read_parameters(path: &Path) -> Result<Option<String>, PngMetaError> {
    let decode_err = |e: png::DecodingError| PngMetaError::Decode {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let file = File::open(path).map_err(io_err(path))?;
    let reader = png::Decoder::new(BufReader::new(file))
        .read_info()
        .map_err(decode_err)?;
    let info = reader.info();
    if let Some(chunk) = info
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == PARAMETERS_KEY)
    {
        return Ok(Some(chunk.text.clone()));
    }
    if let Some(chunk) = info
        .compressed_latin1_text
        .iter()
        .find(|c| c.keyword == PARAMETERS_KEY)
    {
        return chunk.get_text().map(Some).map_err(decode_err);
    }
    if let Some(chunk) = info.utf8_text.iter().find(|c| c.keyword == PARAMETERS_KEY) {
        return chunk.get_text().map(Some).map_err(decode_err);
    }
    Ok(None)
}

/// Reads and parses the `parameters` of a PNG.
pub fn read_png_params(path: &Path) -> Result<Option<GenerationParams>, PngMetaError> {
    read_parameters(path)?.map(|t| parse_a1111(&t)).transpose()
}

fn sha256_hex(reader: &mut impl Read, path: &Path) -> Result<String, PngMetaError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A1111's short model hash: the first 10 hex digits of the file's SHA-256.
pub fn model_short_hash(path: &Path) -> Result<String, PngMetaError> {
    let mut file = BufReader::new(File::open(path).map_err(io_err(path))?);
    Ok(sha256_hex(&mut file, path)?[..10].to_string())
}

/// A1111's LoRA hash: the first 12 hex digits of the SHA-256 of a
/// `.safetensors` file's data after its header (the "addnet" hash; other files
/// are hashed whole).
pub fn lora_short_hash(path: &Path) -> Result<String, PngMetaError> {
    let mut file = BufReader::new(File::open(path).map_err(io_err(path))?);
    let is_safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if is_safetensors {
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(io_err(path))?;
        let header = u64::from_le_bytes(len);
        file.seek(SeekFrom::Start(8 + header))
            .map_err(io_err(path))?;
    }
    Ok(sha256_hex(&mut file, path)?[..12].to_string())
}

/// Lays `images` out left to right, top to bottom, `cols` per row, in cells
/// the size of the largest image (smaller ones top-left in their cell, the rest
/// black). No images give a 0×0 image; `cols` 0 is taken as 1.
pub fn grid(images: &[RgbImage], cols: usize) -> RgbImage {
    if images.is_empty() {
        return RgbImage::new(0, 0);
    }
    let cols = cols.clamp(1, images.len());
    let rows = images.len().div_ceil(cols);
    let cell_w = images.iter().map(|i| i.width()).max().unwrap_or(0);
    let cell_h = images.iter().map(|i| i.height()).max().unwrap_or(0);
    let mut out = RgbImage::new(cell_w * cols as u32, cell_h * rows as u32);
    for (n, img) in images.iter().enumerate() {
        let x = (n % cols) as i64 * cell_w as i64;
        let y = (n / cols) as i64 * cell_h as i64;
        image::imageops::replace(&mut out, img, x, y);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> GenerationParams {
        GenerationParams {
            prompt: "a photo of zwx dog".into(),
            negative_prompt: "blurry".into(),
            steps: 20,
            sampler: "Euler a".into(),
            cfg_scale: 7.0,
            seed: 1,
            width: 512,
            height: 512,
            model_name: Some("name".into()),
            model_hash: Some("abcdef1234".into()),
            clip_skip: None,
            loras: vec![
                LoraInfo {
                    name: "a".into(),
                    scale: 0.8,
                    hash: "0123456789ab".into(),
                },
                LoraInfo {
                    name: "b".into(),
                    scale: 1.0,
                    hash: "ba9876543210".into(),
                },
            ],
            extra: vec![],
        }
    }

    #[test]
    fn exact_a1111_string() {
        assert_eq!(
            params().to_a1111_string(),
            "a photo of zwx dog <lora:a:0.8> <lora:b:1>\n\
             Negative prompt: blurry\n\
             Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, \
             Model hash: abcdef1234, Model: name, \
             Lora hashes: \"a: 0123456789ab, b: ba9876543210\""
        );
        let mut p = params();
        p.negative_prompt.clear();
        p.loras.clear();
        p.cfg_scale = 7.5;
        p.clip_skip = Some(2);
        p.model_name = Some("v1-5, pruned".into());
        assert_eq!(
            p.to_a1111_string(),
            "a photo of zwx dog\n\
             Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 512x512, \
             Model hash: abcdef1234, Model: \"v1-5, pruned\", Clip skip: 2"
        );
    }

    #[test]
    fn string_round_trip() {
        let p = params();
        assert_eq!(parse_a1111(&p.to_a1111_string()).unwrap(), p);
        let mut q = params();
        q.prompt = "line one\n(line:1.2) two".into();
        q.negative_prompt = "bad, ugly\nworse".into();
        q.loras.clear();
        q.model_name = None;
        q.model_hash = None;
        q.clip_skip = Some(2);
        q.extra = vec![("Version".into(), "sd-lora 0.1".into())];
        q.seed = u64::from(u32::MAX) + 7;
        assert_eq!(parse_a1111(&q.to_a1111_string()).unwrap(), q);
        assert!(parse_a1111("just a prompt").is_err());
    }

    #[test]
    fn png_round_trip_and_readable_by_image_crate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        let img = RgbImage::from_fn(16, 8, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 7]));
        let p = params();
        write_png(&path, &img, &p).unwrap();
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert_eq!(read_png_params(&path).unwrap().unwrap(), p);
        // The pixels, through the image crate.
        let back = image::open(&path).unwrap().to_rgb8();
        assert_eq!(back, img);
        // The chunk is a plain tEXt for a Latin-1 text.
        let reader = png::Decoder::new(BufReader::new(File::open(&path).unwrap()))
            .read_info()
            .unwrap();
        let text = &reader.info().uncompressed_latin1_text;
        assert_eq!(text.len(), 1);
        assert_eq!(text[0].keyword, "parameters");
        assert_eq!(text[0].text, p.to_a1111_string());

        // Non-Latin-1 text goes to iTXt and still round-trips.
        let mut q = params();
        q.prompt = "猫の写真".into();
        let path2 = dir.path().join("utf8.png");
        write_png(&path2, &img, &q).unwrap();
        assert_eq!(read_png_params(&path2).unwrap().unwrap(), q);
    }

    #[test]
    fn grid_size_and_placement() {
        let red = RgbImage::from_pixel(4, 3, image::Rgb([255, 0, 0]));
        let blue = RgbImage::from_pixel(4, 3, image::Rgb([0, 0, 255]));
        let images = vec![red.clone(), blue.clone(), red.clone(), blue, red];
        let g = grid(&images, 2);
        assert_eq!(g.dimensions(), (8, 9));
        assert_eq!(g.get_pixel(5, 0), &image::Rgb([0, 0, 255]));
        assert_eq!(g.get_pixel(0, 6), &image::Rgb([255, 0, 0]));
        assert_eq!(g.get_pixel(5, 7), &image::Rgb([0, 0, 0]));
        assert_eq!(grid(&images, 10).dimensions(), (20, 3));
        assert_eq!(grid(&[], 3).dimensions(), (0, 0));
    }

    #[test]
    fn hashes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.ckpt");
        std::fs::write(&path, b"abc").unwrap();
        // sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a3...
        assert_eq!(model_short_hash(&path).unwrap(), "ba7816bf8f");
        let st = dir.path().join("l.safetensors");
        let mut bytes = 2u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}abc");
        std::fs::write(&st, bytes).unwrap();
        assert_eq!(lora_short_hash(&st).unwrap(), "ba7816bf8f01");
    }
}
