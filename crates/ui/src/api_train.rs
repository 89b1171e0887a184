//! The train view: the config schema the form is generated from, presets,
//! checking a config as `train --dry-run` does (the CLI's messages, the
//! memory estimate), loading and saving TOML files, and starting a run as a
//! child process (`train --events`).

use crate::Shared;
use crate::config_doc::{self, confine_paths, document, output_dir};
use crate::error::{ApiError, ApiJson};
use crate::jobs::JobKind;
use axum::Json;
use axum::extract::{Path as UrlPath, State};
use sd_lora_train::outputs::write_atomic;
use serde::Deserialize;
use serde_json::{Value, json};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use toml::Table;

/// A preset: id, label, description, TOML.
struct Preset {
    id: &'static str,
    label: &'static str,
    description: &'static str,
    toml: &'static str,
}

const PRESETS: &[Preset] = &[
    Preset {
        id: "quickstart",
        label: "Quickstart (built-in tiny model)",
        description: "The README's quickstart: a minute on a CPU with the built-in tiny SD1-layout model; tries the whole pipeline, draws nothing useful.",
        toml: include_str!("../../../configs/quickstart.toml"),
    },
    Preset {
        id: "quickstart-sdxl",
        label: "Quickstart SDXL (built-in tiny model)",
        description: "The quickstart on a tiny model with SDXL's layout (two text encoders).",
        toml: include_str!("../../../configs/quickstart-sdxl.toml"),
    },
    Preset {
        id: "subject-sd15",
        label: "Subject on SD1.5 (person, pet, object)",
        description: "DreamBooth-style LoRA of one subject with a rare identifier, text encoder trained, 1500 steps, f16 + checkpointing for 8 GB GPUs.",
        toml: include_str!("../presets/subject-sd15.toml"),
    },
    Preset {
        id: "style-sd15",
        label: "Style on SD1.5 (LoCon)",
        description: "An art style from many captioned images: attention and convolution layers, 3000 steps, noise offset.",
        toml: include_str!("../presets/style-sd15.toml"),
    },
    Preset {
        id: "sdxl",
        label: "SDXL subject or style (1024 px)",
        description: "SDXL at 1024 px with f16 weights and gradient checkpointing (about 7 GB).",
        toml: include_str!("../presets/sdxl.toml"),
    },
];

/// GET /api/info.
pub async fn info(State(st): State<Shared>) -> Json<Value> {
    let presets: Vec<Value> = PRESETS
        .iter()
        .map(|p| json!({"id": p.id, "label": p.label, "description": p.description}))
        .collect();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "cwd": st.roots.base(),
        "roots": st.roots.list(),
        "output_dir": st.output_dir,
        "presets": presets,
        "job": st.jobs.state(),
    }))
}

/// GET /api/schema: the JSON schema of each config section (the one
/// docs/config.md is generated from).
pub async fn schema() -> Json<Value> {
    let sections: Vec<Value> = sd_lora_train::config::section_schemas()
        .into_iter()
        .map(|s| json!({"table": s.table, "schema": s.schema.as_value()}))
        .collect();
    Json(json!({"sections": sections}))
}

/// GET /api/presets/ID: the preset's settings as the page's config. Its
/// dataset and output folder are the user's to choose, so they are left
/// out (the built-in quickstarts write under `output/`).
pub async fn preset(UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    let p = PRESETS.iter().find(|p| p.id == id).ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            format!("no preset {id:?}"),
        )
    })?;
    let mut doc: Table = p
        .toml
        .parse()
        .map_err(|e| ApiError::internal(format!("preset {id}: {e}")))?;
    if let Some(d) = doc.get_mut("dataset").and_then(|d| d.as_table_mut()) {
        d.remove("subsets");
    }
    if let Some(o) = doc.get_mut("output").and_then(|o| o.as_table_mut()) {
        o.remove("dir");
        if p.id.starts_with("quickstart") {
            o.insert("dir".into(), format!("output/{}", p.id).into());
        }
    }
    Ok(Json(
        json!({"config": config_doc::to_json(&toml::Value::Table(doc))}),
    ))
}

/// Numbers the scratch config files.
static SCRATCH: AtomicU64 = AtomicU64::new(0);

/// `doc` as TOML text.
fn toml_text(doc: &Table) -> Result<String, ApiError> {
    toml::to_string(doc).map_err(|e| ApiError::bad(format!("cannot write the config: {e}")))
}

/// Writes `doc` to a new file `KIND-N.toml` in the scratch folder.
fn write_scratch(st: &Shared, kind: &str, doc: &Table) -> Result<PathBuf, ApiError> {
    let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
    let file = st.scratch.join(format!("{kind}-{n}.toml"));
    write_atomic(&file, toml_text(doc)?.as_bytes())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(file)
}

/// What `train --dry-run` said of a config.
struct DryRun {
    /// Its warnings and notes.
    warnings: Vec<String>,
    /// Its report, or its error (naming the config key when there is one).
    outcome: Result<String, ApiError>,
}

/// Runs `train --config DOC --dry-run [--resume DIR]`: every check the CLI
/// makes before training, with its messages.
async fn dry_run(st: &Shared, doc: &Table, resume: Option<&Path>) -> Result<DryRun, ApiError> {
    let file = write_scratch(st, "check", doc)?;
    let mut args: Vec<OsString> = vec![
        "train".into(),
        "--config".into(),
        file.clone().into(),
        "--dry-run".into(),
    ];
    if let Some(r) = resume {
        args.push("--resume".into());
        args.push(r.into());
    }
    let run = crate::cli::run(st, &args).await;
    let _ = std::fs::remove_file(&file);
    let run = run?;
    let warnings = run
        .stderr
        .lines()
        .filter_map(|l| {
            l.strip_prefix("warning: ")
                .or_else(|| l.strip_prefix("note: "))
        })
        .map(str::to_string)
        .collect();
    let outcome = if run.ok() {
        Ok(run.stdout)
    } else {
        // The CLI names the config file; here that is the form.
        let mut e = run.error();
        e.message = e.message.replace(&file.display().to_string(), "the form");
        Err(e)
    };
    Ok(DryRun { warnings, outcome })
}

#[derive(Deserialize)]
pub struct ConfigBody {
    config: Value,
    #[serde(default)]
    resume: bool,
}

/// POST /api/config/check: the config as TOML, its command line, and what
/// `train --dry-run` says of it (errors with their keys, the estimate).
pub async fn check(
    State(st): State<Shared>,
    ApiJson(b): ApiJson<ConfigBody>,
) -> Result<Json<Value>, ApiError> {
    let doc = document(&b.config)?;
    let text = toml_text(&doc)?;
    let command = config_doc::command_line(&doc);
    let mut confined = doc.clone();
    let dry = match confine_paths(&mut confined, &st.roots) {
        Ok(()) => {
            let resume = b.resume.then(|| output_dir(&confined, st.roots.base()));
            dry_run(&st, &confined, resume.as_deref()).await?
        }
        Err(e) => DryRun {
            warnings: Vec::new(),
            outcome: Err(e),
        },
    };
    let (report, errors) = match &dry.outcome {
        Ok(report) => (report.as_str(), Vec::new()),
        Err(e) => (
            "",
            vec![
                json!({"key": e.key, "field": e.key.as_deref().map(crate::error::field_of), "message": e.message}),
            ],
        ),
    };
    // The estimate is the dry run's "total:" line.
    let estimate = report.lines().find_map(|l| l.strip_prefix("total: "));
    Ok(Json(json!({
        "ok": dry.outcome.is_ok(),
        "errors": errors,
        "warnings": dry.warnings,
        "report": report,
        "estimate": estimate,
        "toml": text,
        "command": command,
    })))
}

/// POST /api/train/start {config, resume}: checks the config as the CLI
/// does (refusing with its message, nothing started), then runs
/// `train --events` as the job.
pub async fn start(
    State(st): State<Shared>,
    ApiJson(b): ApiJson<ConfigBody>,
) -> Result<Json<Value>, ApiError> {
    // Refused before the dry run; `JobSlot::start` checks again.
    st.jobs.ensure_idle()?;
    let mut doc = document(&b.config)?;
    confine_paths(&mut doc, &st.roots)?;
    let out = output_dir(&doc, st.roots.base());
    // The output folder must be inside the roots too (the default one is).
    st.roots
        .resolve(&out.to_string_lossy(), "`output.dir`")
        .map_err(|e| e.with_key("output.dir"))?;
    let resume = b.resume.then(|| out.clone());
    dry_run(&st, &doc, resume.as_deref()).await?.outcome?;
    let file = write_scratch(&st, "run", &doc)?;
    let mut args: Vec<OsString> = vec![
        "train".into(),
        "--config".into(),
        file.into(),
        "--events".into(),
    ];
    if let Some(r) = &resume {
        args.push("--resume".into());
        args.push(r.into());
    }
    st.jobs
        .start(
            JobKind::Train,
            &st.exe,
            args,
            st.roots.base(),
            out,
            Box::new(|_| Vec::new()),
        )
        .map(Json)
}

#[derive(Deserialize)]
pub struct LoadBody {
    path: String,
}

/// A `.toml` path inside the roots.
fn toml_path(st: &Shared, path: &str) -> Result<PathBuf, ApiError> {
    let p = st.roots.resolve(path, "config file")?;
    if p.extension().is_none_or(|e| e != "toml") {
        return Err(ApiError::bad(format!(
            "{}: a config file ends in .toml",
            p.display()
        )));
    }
    Ok(p)
}

/// POST /api/config/load {path}: a TOML config as the page's config, its
/// relative paths made absolute (they are relative to the file). A kohya
/// dataset config becomes `dataset.kohya_config`, as the CLI reads it.
pub async fn load(
    State(st): State<Shared>,
    ApiJson(b): ApiJson<LoadBody>,
) -> Result<Json<Value>, ApiError> {
    let p = toml_path(&st, &b.path)?;
    let text = std::fs::read_to_string(&p)
        .map_err(|e| ApiError::bad(format!("cannot read {}: {e}", p.display())))?;
    let mut doc: Table = text
        .parse()
        .map_err(|e| ApiError::bad(format!("{} is not valid TOML: {e}", p.display())))?;
    if sd_lora_train::kohya_dataset::is_kohya_dataset_config(&doc) {
        let config = json!({"dataset": {"kohya_config": p}});
        return Ok(Json(json!({"config": config, "path": p})));
    }
    let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
    sd_lora_train::config::resolve_paths(&mut doc, &dir);
    Ok(Json(
        json!({"config": config_doc::to_json(&toml::Value::Table(doc)), "path": p}),
    ))
}

#[derive(Deserialize)]
pub struct SaveBody {
    path: String,
    config: Value,
}

/// POST /api/config/save {path, config}: writes the config as TOML
/// (atomically), paths under the file's folder written relative to it.
pub async fn save(
    State(st): State<Shared>,
    ApiJson(b): ApiJson<SaveBody>,
) -> Result<Json<Value>, ApiError> {
    let p = toml_path(&st, &b.path)?;
    let mut doc = document(&b.config)?;
    confine_paths(&mut doc, &st.roots)?;
    let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
    config_doc::relative_to(&mut doc, &dir);
    let text = toml_text(&doc)?;
    let text = format!(
        "# Written by sd-lora ui; run it with: sd-lora train --config {}\n\n{text}",
        p.display()
    );
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)
            .map_err(|e| ApiError::internal(format!("cannot create {}: {e}", d.display())))?;
    }
    write_atomic(&p, text.as_bytes()).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(json!({"path": p})))
}
