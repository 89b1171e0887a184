//! The generate view: `sd-lora generate` as a job into the app's
//! `output/generate` folder, and the gallery of what is there with each
//! image's A1111 parameters (read from the PNG, as A1111's PNG Info does).

use crate::Shared;
use crate::api_lora::{WeightedLora, lora_arg};
use crate::error::{ApiError, ApiJson};
use crate::jobs::JobKind;
use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
pub struct GenerateBody {
    model: String,
    #[serde(default)]
    loras: Vec<WeightedLora>,
    prompt: String,
    #[serde(default)]
    negative: String,
    sampler: Option<String>,
    steps: Option<u32>,
    cfg: Option<f64>,
    seed: Option<u64>,
    width: Option<u32>,
    height: Option<u32>,
    num_images: Option<u32>,
}

/// The folder generated images go to.
fn gallery_dir(st: &Shared) -> PathBuf {
    st.output_dir.join("generate")
}

/// PNG files in `dir`.
fn pngs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
                .collect()
        })
        .unwrap_or_default()
}

/// POST /api/generate: starts `sd-lora generate` as the job.
pub async fn generate(
    State(st): State<Shared>,
    ApiJson(b): ApiJson<GenerateBody>,
) -> Result<Json<Value>, ApiError> {
    if b.prompt.trim().is_empty() {
        return Err(ApiError::bad("write a prompt").with_key("prompt"));
    }
    if b.model.trim().is_empty() {
        return Err(ApiError::bad("choose a base model").with_key("model"));
    }
    let model = crate::api_lora::model(&st, &b.model)?;
    let out = gallery_dir(&st);
    let mut args: Vec<OsString> = vec![
        "generate".into(),
        "--model".into(),
        model,
        // `--flag=VALUE`: a prompt that starts with `-` stays a value.
        format!("--prompt={}", b.prompt).into(),
        format!("--negative-prompt={}", b.negative).into(),
    ];
    for l in &b.loras {
        args.push("--lora".into());
        args.push(lora_arg(&st, l)?);
    }
    let mut flag = |name: &str, v: Option<String>| {
        if let Some(v) = v {
            args.push(name.into());
            args.push(v.into());
        }
    };
    flag("--sampler", b.sampler);
    flag("--steps", b.steps.map(|v| v.to_string()));
    flag("--cfg", b.cfg.map(|v| v.to_string()));
    flag("--seed", b.seed.map(|v| v.to_string()));
    flag("--width", b.width.map(|v| v.to_string()));
    flag("--height", b.height.map(|v| v.to_string()));
    flag("--num-images", b.num_images.map(|v| v.to_string()));
    args.push("--output".into());
    args.push(out.clone().into_os_string());
    let before: HashSet<PathBuf> = pngs(&out).into_iter().collect();
    let on_exit = Box::new(move |dir: &Path| {
        let mut new: Vec<PathBuf> = pngs(dir)
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        new.sort();
        if new.is_empty() {
            Vec::new()
        } else {
            vec![json!({"type": "images", "files": new})]
        }
    });
    st.jobs
        .start(
            JobKind::Generate,
            &st.exe,
            args,
            st.roots.base(),
            out,
            on_exit,
        )
        .map(Json)
}

/// GET /api/gallery: the generated images, newest first (at most 200),
/// with their parameters.
pub async fn gallery(State(st): State<Shared>) -> Result<Json<Value>, ApiError> {
    // Reading PNGs and hashing LoRA files is blocking work.
    tokio::task::spawn_blocking(move || Json(gallery_json(&st)))
        .await
        .map_err(|e| ApiError::internal(format!("the gallery task failed: {e}")))
}

/// The gallery's JSON (see [`gallery`]).
fn gallery_json(st: &Shared) -> Value {
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = pngs(&gallery_dir(st))
        .into_iter()
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    files.sort_by(|a, b| b.cmp(a));
    let images: Vec<Value> = files
        .into_iter()
        .take(200)
        .map(|(_, p)| {
            let text = sd_lora_train::png_meta::read_parameters(&p).ok().flatten();
            let settings = text
                .as_deref()
                .and_then(|t| sd_lora_train::png_meta::parse_a1111(t).ok())
                .map(|g| {
                    json!({
                        "prompt": g.prompt,
                        "negative": g.negative_prompt,
                        "steps": g.steps,
                        "sampler": g.sampler,
                        "cfg": g.cfg_scale,
                        "seed": g.seed,
                        "width": g.width,
                        "height": g.height,
                        "model": g.model_name.as_deref().and_then(|m| find_model(st, m)),
                        "model_name": g.model_name,
                        "loras": g.loras.iter().map(|l| json!({
                            "name": l.name,
                            "weight": l.scale,
                            "path": find_lora(st, &l.name, &l.hash),
                        })).collect::<Vec<_>>(),
                    })
                });
            json!({"path": p, "parameters": text, "settings": settings})
        })
        .collect();
    json!({"images": images})
}

/// The file of a LoRA a PNG names (A1111 keeps only the file's stem and a
/// short hash of its tensors): among the `NAME.safetensors` files under the
/// output folder and the first root (a few folders deep), the one whose
/// hash matches — or the first, when the PNG has no hash.
fn find_lora(st: &Shared, name: &str, hash: &str) -> Option<PathBuf> {
    let file = format!("{name}.safetensors");
    let mut found = Vec::new();
    for dir in [st.output_dir.as_path(), st.roots.base()] {
        find_files(dir, &file, 4, &mut found);
    }
    if hash.is_empty() {
        return found.into_iter().next();
    }
    found
        .into_iter()
        .find(|p| st.lora_hash(p).as_deref() == Some(hash))
}

/// The model a PNG names: a built-in one as it is, else a checkpoint file
/// (`NAME.safetensors` / `.ckpt`) or a diffusers folder named NAME under the
/// first root, a few folders deep. None when there is no such thing (the
/// page then keeps its model).
fn find_model(st: &Shared, name: &str) -> Option<String> {
    if name.starts_with("builtin:") {
        return Some(name.to_string());
    }
    let mut found = Vec::new();
    for file in [
        format!("{name}.safetensors"),
        format!("{name}.ckpt"),
        name.to_string(),
    ] {
        find_files(st.roots.base(), &file, 4, &mut found);
    }
    found
        .into_iter()
        .find(|p| p.is_file() || p.join("model_index.json").is_file())
        .map(|p| p.to_string_lossy().into_owned())
}

/// Every `name` in `dir` or its sub-folders down to `depth` levels (hidden
/// folders and symlinks left out, so nothing outside the roots is found).
fn find_files(dir: &Path, name: &str, depth: usize, out: &mut Vec<PathBuf>) {
    let here = dir.join(name);
    if here.exists() && !out.contains(&here) {
        out.push(here);
    }
    if depth == 0 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut subdirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    subdirs.sort();
    for d in subdirs {
        find_files(&d, name, depth - 1, out);
    }
}
