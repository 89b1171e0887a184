//! # sd-lora-ui
//!
//! The local web app behind `sd-lora ui`: an HTTP server (axum on tokio)
//! serving a single page embedded in the binary, over the same commands the
//! CLI offers. Training and generation run as child processes of the same
//! `sd-lora` binary (`train --events`, `generate`), so a crash of a run never
//! takes the app down and closing the browser never stops a run; the page
//! follows a run over Server-Sent Events and reattaches after a reload.
//!
//! Safe by default: it listens on 127.0.0.1 only; another address needs a
//! token; every request's `Host` is checked (no DNS rebinding) and every
//! state-changing request's `Origin` and content type (no CSRF); every path
//! the page sends is resolved and confined to the allowed roots
//! ([`roots::Roots`]); no endpoint runs anything but fixed `sd-lora`
//! sub-commands; request bodies are limited to [`MAX_BODY_BYTES`].

mod api_dataset;
mod api_files;
mod api_generate;
mod api_lora;
mod api_train;
mod assets;
mod cli;
mod config_doc;
mod error;
mod guard;
mod jobs;
mod roots;

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

/// The largest request body accepted (configs and captions are a few KB).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// How `sd-lora ui` was started.
#[derive(Debug, Clone)]
pub struct UiOptions {
    /// Address to listen on (127.0.0.1 unless `--listen`).
    pub listen: IpAddr,
    /// Port; 0 picks a free one.
    pub port: u16,
    /// Token every request must carry; required (generated when not given)
    /// for an address other than loopback.
    pub token: Option<String>,
    /// Folders the page may read and write in (the first is where relative
    /// paths start and runs are started); the output folder is added.
    pub roots: Vec<PathBuf>,
    /// Open the default browser at start.
    pub open_browser: bool,
    /// The `sd-lora` binary runs are started with.
    pub exe: PathBuf,
}

/// Shared state of the server.
pub(crate) struct AppState {
    pub roots: roots::Roots,
    pub guard: guard::Guard,
    pub exe: PathBuf,
    pub jobs: Arc<jobs::JobSlot>,
    pub thumbs: api_files::ThumbCache,
    /// Short hashes of LoRA files (A1111's), by path and modification time.
    pub lora_hashes: std::sync::Mutex<std::collections::HashMap<LoraHashKey, String>>,
    /// Where the app writes what it makes (generated images, run configs).
    pub output_dir: PathBuf,
    /// Scratch folder for the configs of dry-run checks.
    pub scratch: PathBuf,
}

pub(crate) type Shared = Arc<AppState>;

/// A LoRA file and its modification time.
type LoraHashKey = (PathBuf, Option<std::time::SystemTime>);

impl AppState {
    /// A1111's short hash of the LoRA at `path`, computed once per version
    /// of the file.
    pub fn lora_hash(&self, path: &std::path::Path) -> Option<String> {
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let key = (path.to_path_buf(), mtime);
        if let Some(h) = self.lora_hashes.lock().ok()?.get(&key) {
            return Some(h.clone());
        }
        let h = sd_lora_train::png_meta::lora_short_hash(path).ok()?;
        self.lora_hashes.lock().ok()?.insert(key, h.clone());
        Some(h)
    }
}

/// The app's routes over `state` (the tests build it without a socket).
fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/app.js", get(assets::script))
        .route("/app.css", get(assets::style))
        .route("/api/info", get(api_train::info))
        .route("/api/fs", get(api_files::list))
        .route("/api/thumb", get(api_files::thumb))
        .route("/api/file", get(api_files::file))
        .route("/api/caption", post(api_files::caption))
        .route("/api/dataset", get(api_dataset::dataset))
        .route("/api/identifier", get(api_dataset::identifier))
        .route("/api/schema", get(api_train::schema))
        .route("/api/presets/{id}", get(api_train::preset))
        .route("/api/config/check", post(api_train::check))
        .route("/api/config/load", post(api_train::load))
        .route("/api/config/save", post(api_train::save))
        .route("/api/train/start", post(api_train::start))
        .route("/api/job", get(jobs::current))
        .route("/api/job/stop", post(jobs::stop))
        .route("/api/job/events", get(jobs::events))
        .route("/api/generate", post(api_generate::generate))
        .route("/api/gallery", get(api_generate::gallery))
        .route("/api/lora/inspect", post(api_lora::inspect))
        .route("/api/lora/convert", post(api_lora::convert))
        .route("/api/lora/resize", post(api_lora::resize))
        .route("/api/lora/merge", post(api_lora::merge))
        .route("/api/lora/extract", post(api_lora::extract))
        .fallback(error::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::check_request,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// A random token: 128 bits from the OS, as hex.
fn random_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("cannot draw a random token: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Runs the app until Ctrl-C. Prints the URL (with the token when one is
/// needed) on stdout as `sd-lora ui: http://…` before serving.
pub fn serve(opts: UiOptions) -> Result<()> {
    let token = match (&opts.token, opts.listen.is_loopback()) {
        (Some(t), _) if t.len() < 8 => bail!("--token must be at least 8 characters"),
        (Some(t), _) => Some(t.clone()),
        (None, true) => None,
        (None, false) => Some(random_token()?),
    };
    let first = opts
        .roots
        .first()
        .cloned()
        .context("no root folder given")?;
    let output_dir = first.join("output");
    let mut root_list = opts.roots.clone();
    root_list.push(output_dir.clone());
    let roots = roots::Roots::new(&root_list)?;
    let scratch = std::env::temp_dir().join(format!("sd-lora-ui-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create the scratch folder {}", scratch.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        let addr = SocketAddr::new(opts.listen, opts.port);
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} (is another program using the port? try --port N)")
        })?;
        let bound = listener.local_addr()?;
        let state = Arc::new(AppState {
            roots,
            guard: guard::Guard::new(bound, token.clone()),
            exe: opts.exe.clone(),
            jobs: Arc::new(jobs::JobSlot::default()),
            thumbs: api_files::ThumbCache::default(),
            lora_hashes: Default::default(),
            output_dir,
            scratch: scratch.clone(),
        });
        let url = state.guard.url();
        println!("sd-lora ui: {url}");
        println!(
            "  folders it may use: {}",
            state
                .roots
                .list()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if opts.listen.is_unspecified() || !opts.listen.is_loopback() {
            println!(
                "  reachable from other machines at this machine's address, port {}, with the token above",
                bound.port()
            );
        }
        println!("  press Ctrl-C to stop");
        if opts.open_browser {
            open_browser(&url);
        }
        let app = router(state.clone());
        let shutdown_state = state.clone();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = tokio::signal::ctrl_c().await;
                // A second Ctrl-C stops waiting for the run to save.
                tokio::select! {
                    () = shutdown_state.jobs.shut_down() => {}
                    _ = tokio::signal::ctrl_c() => {
                        println!("second Ctrl-C: not waiting for the run any longer");
                    }
                }
            })
            .await
            .context("the web server stopped with an error")
    });
    let _ = std::fs::remove_dir_all(&scratch);
    if result.is_ok() {
        println!("sd-lora ui stopped");
    }
    result
}

/// Opens `url` in the default browser; failing is not an error (the URL is
/// printed).
fn open_browser(url: &str) {
    let mut cmd = if cfg!(target_os = "macos") {
        std::process::Command::new("open")
    } else if cfg!(windows) {
        let mut c = std::process::Command::new("cmd");
        c.args(["/C", "start", ""]);
        c
    } else {
        std::process::Command::new("xdg-open")
    };
    cmd.arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if cmd.spawn().is_err() {
        println!("  (could not open a browser; open the URL above yourself)");
    }
}
