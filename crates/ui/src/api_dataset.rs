//! The dataset view: `check-data`'s report of a folder and its class images
//! (subsets, repeats, captions, buckets, problems per image) plus rare-token
//! advice on the identifier.

use crate::Shared;
use crate::error::{ApiError, ApiQuery};
use axum::Json;
use axum::extract::State;
use sd_lora_model::clip::ClipTokenizer;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::OnceLock;

#[derive(Deserialize)]
pub struct DatasetQuery {
    path: String,
    resolution: Option<u32>,
    /// Caption of images without a caption file.
    instance_prompt: Option<String>,
    /// A folder of class (prior-preservation) images.
    class_path: Option<String>,
    class_prompt: Option<String>,
}

/// GET /api/dataset?path=DIR[&resolution=N]: `sd-lora check-data DIR
/// --json` with `advice` added for each instance subset's caption.
pub async fn dataset(
    State(st): State<Shared>,
    ApiQuery(q): ApiQuery<DatasetQuery>,
) -> Result<Json<Value>, ApiError> {
    let dir = st.roots.resolve(&q.path, "dataset folder")?;
    if !dir.is_dir() {
        return Err(ApiError::bad(format!(
            "{}: no such folder; choose the folder that holds the images",
            dir.display()
        )));
    }
    let mut args = vec![
        "check-data".into(),
        dir.clone().into_os_string(),
        "--json".into(),
    ];
    if let Some(r) = q.resolution {
        args.push("--resolution".into());
        args.push(r.to_string().into());
    }
    let given = |v: &Option<String>| {
        v.as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    if let Some(p) = given(&q.instance_prompt) {
        args.push("--instance-prompt".into());
        args.push(p.into());
    }
    if let Some(c) = given(&q.class_path) {
        args.push("--class-data".into());
        args.push(st.roots.resolve(&c, "class folder")?.into_os_string());
        if let Some(p) = given(&q.class_prompt) {
            args.push("--class-prompt".into());
            args.push(p.into());
        }
    }
    let run = crate::cli::run(&st, &args).await?;
    // check-data exits 1 when no image is usable, and still prints the report.
    let mut report: Value = match serde_json::from_str(&run.stdout) {
        Ok(v) => v,
        Err(_) => return Err(run.error()),
    };
    let mut advice = Vec::new();
    if let Some(subsets) = report["subsets"].as_array() {
        for s in subsets.iter().filter(|s| s["kind"] == "instance") {
            if let Some(prompt) = s["fallback_caption"].as_str() {
                advice.extend(advice_for(prompt));
            }
        }
    }
    report["advice"] = Value::Array(advice);
    Ok(Json(report))
}

/// Rare-token advice on the identifier words of `prompt`.
fn advice_for(prompt: &str) -> Vec<Value> {
    // Built once: the page asks on every change of the trigger-word box.
    static TOKENIZER: OnceLock<Option<ClipTokenizer>> = OnceLock::new();
    let Some(tok) = TOKENIZER.get_or_init(|| ClipTokenizer::embedded().ok()) else {
        return Vec::new();
    };
    sd_lora_train::rare_token::check_identifier(tok, prompt)
        .into_iter()
        .map(|a| json!({"word": a.word, "prompt": prompt, "problem": a.problem, "suggestions": a.suggestions}))
        .collect()
}

#[derive(Deserialize)]
pub struct PromptQuery {
    prompt: String,
}

/// GET /api/identifier?prompt=TEXT: advice on the identifier in a caption.
pub async fn identifier(ApiQuery(q): ApiQuery<PromptQuery>) -> Json<Value> {
    Json(json!({"advice": advice_for(&q.prompt)}))
}
