//! Files for the page: folder listings for the picker, image thumbnails and
//! images, and writing a caption back to its `.txt` file.

use crate::Shared;
use crate::error::{ApiError, ApiJson, ApiQuery};
use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use sd_lora_train::outputs::write_atomic;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// Image types the page may fetch.
const IMAGE_TYPES: &[(&str, &str)] = &[
    ("png", "image/png"),
    ("jpg", "image/jpeg"),
    ("jpeg", "image/jpeg"),
    ("webp", "image/webp"),
    ("bmp", "image/bmp"),
    ("gif", "image/gif"),
];

fn image_type(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    IMAGE_TYPES.iter().find(|(e, _)| *e == ext).map(|(_, t)| *t)
}

#[derive(Deserialize)]
pub struct PathQuery {
    #[serde(default)]
    path: String,
    size: Option<u32>,
}

/// GET /api/fs?path=DIR: the folder's entries (folders first, hidden ones
/// left out); without a path, the roots.
pub async fn list(
    State(st): State<Shared>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Result<Json<Value>, ApiError> {
    if q.path.trim().is_empty() {
        let entries: Vec<Value> = st
            .roots
            .list()
            .iter()
            .map(|r| json!({"name": r.display().to_string(), "path": r, "dir": true, "size": 0}))
            .collect();
        return Ok(Json(
            json!({"path": null, "parent": null, "entries": entries}),
        ));
    }
    let dir = st.roots.resolve(&q.path, "folder")?;
    let read = std::fs::read_dir(&dir)
        .map_err(|e| ApiError::bad(format!("{}: cannot list the folder ({e})", dir.display())))?;
    let mut entries: Vec<(bool, String, PathBuf, u64)> = Vec::new();
    for entry in read.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Only a symlink can lead outside a confined folder: one that does is
        // not listed. `metadata` follows it.
        let link = entry.file_type().is_ok_and(|t| t.is_symlink());
        if link && st.roots.resolve(&path.to_string_lossy(), "entry").is_err() {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        entries.push((!meta.is_dir(), name, path, meta.len()));
    }
    entries.sort_by_key(|e| (e.0, e.1.to_lowercase()));
    let parent = dir
        .parent()
        .filter(|p| st.roots.resolve(&p.to_string_lossy(), "parent").is_ok());
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|(file, name, path, size)| json!({"name": name, "path": path, "dir": !file, "size": size}))
        .collect();
    Ok(Json(
        json!({"path": dir, "parent": parent, "entries": entries}),
    ))
}

/// An image path the page may read: inside the roots, an image type, a file.
fn image_path(st: &Shared, path: &str) -> Result<(PathBuf, &'static str), ApiError> {
    let p = st.roots.resolve(path, "image")?;
    let Some(mime) = image_type(&p) else {
        return Err(ApiError::bad(format!(
            "{}: not an image (PNG, JPEG, WebP, BMP or GIF)",
            p.display()
        )));
    };
    if !p.is_file() {
        return Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            format!("{}: no such image", p.display()),
        ));
    }
    Ok((p, mime))
}

/// GET /api/file?path=IMG: the image itself.
pub async fn file(
    State(st): State<Shared>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Result<Response, ApiError> {
    let (p, mime) = image_path(&st, &q.path)?;
    let bytes = tokio::fs::read(&p)
        .await
        .map_err(|e| ApiError::internal(format!("{}: {e}", p.display())))?;
    Ok((
        [
            (header::CONTENT_TYPE, mime),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        bytes,
    )
        .into_response())
}

/// A thumbnail's key: the image, its modification time, the size asked.
type ThumbKey = (PathBuf, Option<SystemTime>, u32);

/// Thumbnails made so far (JPEG bytes).
#[derive(Default)]
pub struct ThumbCache {
    map: Mutex<HashMap<ThumbKey, Vec<u8>>>,
}

/// Entries kept before the cache is emptied (thumbnails are ~10 KB).
const THUMB_CACHE_ENTRIES: usize = 4000;

/// GET /api/thumb?path=IMG&size=N: a JPEG at most N pixels on its longer
/// side (default 256), decoded as training decodes it (EXIF orientation,
/// transparency on white).
pub async fn thumb(
    State(st): State<Shared>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Result<Response, ApiError> {
    let (p, _) = image_path(&st, &q.path)?;
    let size = q.size.unwrap_or(256).clamp(16, 1024);
    let mtime = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
    let key = (p.clone(), mtime, size);
    let cached = st.thumbs.map.lock().ok().and_then(|m| m.get(&key).cloned());
    let bytes = match cached {
        Some(b) => b,
        None => {
            let path = p.clone();
            let bytes = tokio::task::spawn_blocking(move || make_thumb(&path, size))
                .await
                .map_err(|e| ApiError::internal(format!("thumbnail task failed: {e}")))??;
            if let Ok(mut m) = st.thumbs.map.lock() {
                if m.len() >= THUMB_CACHE_ENTRIES {
                    m.clear();
                }
                m.insert(key, bytes.clone());
            }
            bytes
        }
    };
    Ok((
        [
            (header::CONTENT_TYPE, "image/jpeg"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        bytes,
    )
        .into_response())
}

fn make_thumb(path: &Path, size: u32) -> Result<Vec<u8>, ApiError> {
    let decoded = sd_lora_data::decode::decode_image(path, [255, 255, 255])
        .map_err(|e| ApiError::bad(format!("{}: {e}", path.display())))?;
    let img = image::DynamicImage::ImageRgb8(decoded.rgb).thumbnail(size, size);
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg)
        .map_err(|e| ApiError::internal(format!("cannot encode the thumbnail: {e}")))?;
    Ok(out.into_inner())
}

#[derive(Deserialize)]
pub struct CaptionBody {
    image: String,
    text: String,
}

/// POST /api/caption {image, text}: writes the caption to the image's
/// `.txt` file (atomically), creating it if the image had none.
pub async fn caption(
    State(st): State<Shared>,
    ApiJson(body): ApiJson<CaptionBody>,
) -> Result<Json<Value>, ApiError> {
    let (img, _) = image_path(&st, &body.image)?;
    let txt = img.with_extension("txt");
    let text = body.text.trim();
    if text.contains('\0') {
        return Err(ApiError::bad("the caption holds a NUL character"));
    }
    write_atomic(&txt, format!("{text}\n").as_bytes())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(json!({"caption_file": txt})))
}
