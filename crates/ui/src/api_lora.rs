//! The LoRA files view: `inspect`, `convert`, `resize`, `merge` and
//! `extract` of the CLI, run as they are, with confined paths.

use crate::Shared;
use crate::error::{ApiError, ApiJson};
use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};
use std::ffi::OsString;

/// Runs the sub-command; answers what it printed, or its error.
async fn run_tool(st: &Shared, args: Vec<OsString>) -> Result<Json<Value>, ApiError> {
    let run = crate::cli::run(st, &args).await?;
    if !run.ok() {
        return Err(run.error());
    }
    let text = format!("{}{}", run.stdout, run.stderr);
    Ok(Json(
        json!({"output": text.trim(), "command": crate::cli::command_line(&args)}),
    ))
}

/// A path value made absolute inside the roots.
fn path(st: &Shared, value: &str, what: &str) -> Result<OsString, ApiError> {
    Ok(st.roots.resolve(value, what)?.into_os_string())
}

/// A model: built-in, or a confined path to something that exists.
pub fn model(st: &Shared, value: &str) -> Result<OsString, ApiError> {
    let value = value.trim();
    if value.starts_with("builtin:") {
        return Ok(value.into());
    }
    let p = st.roots.resolve(value, "model")?;
    if !p.exists() {
        return Err(ApiError::bad(format!(
            "{}: no such model file or folder",
            p.display()
        )));
    }
    Ok(p.into_os_string())
}

#[derive(Deserialize)]
pub struct InspectBody {
    path: String,
    model: Option<String>,
}

/// POST /api/lora/inspect: `inspect FILE --json [--model M]`.
pub async fn inspect(
    State(st): State<Shared>,
    ApiJson(b): ApiJson<InspectBody>,
) -> Result<Json<Value>, ApiError> {
    let mut args = vec![
        "inspect".into(),
        path(&st, &b.path, "LoRA file")?,
        "--json".into(),
    ];
    if let Some(m) = b.model.as_deref().filter(|m| !m.trim().is_empty()) {
        args.push("--model".into());
        args.push(model(&st, m)?);
    }
    let run = crate::cli::run(&st, &args).await?;
    if !run.ok() {
        return Err(run.error());
    }
    serde_json::from_str(&run.stdout)
        .map(Json)
        .map_err(|e| ApiError::internal(format!("inspect printed no JSON: {e}")))
}

#[derive(Deserialize)]
pub struct ConvertBody {
    input: String,
    output: String,
    to: String,
}

/// POST /api/lora/convert: `convert IN OUT --to kohya|peft`.
pub async fn convert(
    State(st): State<Shared>,
    ApiJson(b): ApiJson<ConvertBody>,
) -> Result<Json<Value>, ApiError> {
    if b.to != "kohya" && b.to != "peft" {
        return Err(ApiError::bad("`to` must be kohya or peft"));
    }
    let args = vec![
        "convert".into(),
        path(&st, &b.input, "input")?,
        path(&st, &b.output, "output")?,
        "--to".into(),
        b.to.into(),
    ];
    run_tool(&st, args).await
}

#[derive(Deserialize)]
pub struct ResizeBody {
    input: String,
    output: String,
    rank: u32,
}

/// POST /api/lora/resize: `resize IN OUT --rank N`.
pub async fn resize(
    State(st): State<Shared>,
    ApiJson(b): ApiJson<ResizeBody>,
) -> Result<Json<Value>, ApiError> {
    let args = vec![
        "resize".into(),
        path(&st, &b.input, "input")?,
        path(&st, &b.output, "output")?,
        "--rank".into(),
        b.rank.to_string().into(),
    ];
    run_tool(&st, args).await
}

#[derive(Deserialize)]
pub struct WeightedLora {
    pub path: String,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// `FILE:WEIGHT` for the CLI's `--lora`, the file confined.
pub fn lora_arg(st: &Shared, l: &WeightedLora) -> Result<OsString, ApiError> {
    if !l.weight.is_finite() {
        return Err(ApiError::bad("a LoRA weight must be a number"));
    }
    let mut a = path(st, &l.path, "LoRA file")?;
    a.push(format!(":{}", l.weight));
    Ok(a)
}

#[derive(Deserialize)]
pub struct MergeBody {
    model: Option<String>,
    loras: Vec<WeightedLora>,
    output: String,
}

/// POST /api/lora/merge: `merge [--model M] --lora F:W … --output O`.
pub async fn merge(
    State(st): State<Shared>,
    ApiJson(b): ApiJson<MergeBody>,
) -> Result<Json<Value>, ApiError> {
    let mut args: Vec<OsString> = vec!["merge".into()];
    if let Some(m) = b.model.as_deref().filter(|m| !m.trim().is_empty()) {
        args.push("--model".into());
        args.push(model(&st, m)?);
    }
    if b.loras.is_empty() {
        return Err(ApiError::bad("give at least one LoRA file to merge"));
    }
    for l in &b.loras {
        args.push("--lora".into());
        args.push(lora_arg(&st, l)?);
    }
    args.push("--output".into());
    args.push(path(&st, &b.output, "output")?);
    run_tool(&st, args).await
}

#[derive(Deserialize)]
pub struct ExtractBody {
    base: String,
    tuned: String,
    rank: u32,
    output: String,
}

/// POST /api/lora/extract: `extract --base B --tuned T --rank N --output O`.
pub async fn extract(
    State(st): State<Shared>,
    ApiJson(b): ApiJson<ExtractBody>,
) -> Result<Json<Value>, ApiError> {
    let args = vec![
        "extract".into(),
        "--base".into(),
        model(&st, &b.base)?,
        "--tuned".into(),
        model(&st, &b.tuned)?,
        "--rank".into(),
        b.rank.to_string().into(),
        "--output".into(),
        path(&st, &b.output, "output")?,
    ];
    run_tool(&st, args).await
}
