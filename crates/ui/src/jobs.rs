//! The one run the app may have going at a time (training or generating:
//! on one GPU two would only fight for memory), as a child process of the
//! `sd-lora` binary. Its output becomes a list of events — the child's JSON
//! progress lines (`train --events`), its other lines as `log` events, and
//! `started` / `images` / `exit` from here — numbered by one sequence over
//! all runs, so a page that reconnects or reloads asks for the events after
//! the last one it saw and misses nothing (reattaching to a running job).
//! The child is not tied to any page: closing the browser stops nothing.

use crate::Shared;
use crate::error::{ApiError, ApiQuery};
use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Train,
    Generate,
}

impl JobKind {
    fn name(self) -> &'static str {
        match self {
            JobKind::Train => "train",
            JobKind::Generate => "generate",
        }
    }
}

/// A run, going or ended.
#[derive(Debug)]
struct Job {
    id: u64,
    kind: JobKind,
    /// "running", "finished", "failed" or "stopped".
    status: &'static str,
    command: String,
    started: f64,
    exit_code: Option<i32>,
    /// The run's output folder.
    output_dir: PathBuf,
    events: Vec<Value>,
    pid: Option<u32>,
    stop_requested: bool,
}

impl Job {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "kind": self.kind.name(),
            "status": self.status,
            "command": self.command,
            "started": self.started,
            "exit_code": self.exit_code,
            "output_dir": self.output_dir,
            "events": self.events,
        })
    }
}

#[derive(Debug, Default)]
struct Slot {
    next_id: u64,
    next_seq: u64,
    job: Option<Job>,
}

/// Called when the child has exited, before the `exit` event: may add
/// events (the images a generate run wrote).
pub type OnExit = Box<dyn FnOnce(&Path) -> Vec<Value> + Send>;

/// The job slot and the signal that wakes event streams.
pub struct JobSlot {
    slot: Mutex<Slot>,
    /// Bumped on every event; event streams wait on it.
    tick: watch::Sender<u64>,
    /// Set when the app stops: event streams end.
    closing: watch::Sender<bool>,
}

impl Default for JobSlot {
    fn default() -> Self {
        JobSlot {
            slot: Mutex::new(Slot::default()),
            tick: watch::channel(0).0,
            closing: watch::channel(false).0,
        }
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl JobSlot {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        // A panic while holding the lock leaves the data usable.
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current (or last) job as JSON, or null.
    pub fn state(&self) -> Value {
        self.lock().job.as_ref().map_or(Value::Null, Job::to_json)
    }

    /// Whether a job is running.
    fn running(&self) -> bool {
        self.lock()
            .job
            .as_ref()
            .is_some_and(|j| j.status == "running")
    }

    /// Refused while a job runs: the message says which.
    fn idle(s: &Slot) -> Result<(), ApiError> {
        match s.job.as_ref().filter(|j| j.status == "running") {
            Some(j) => Err(ApiError::busy(format!(
                "a {} run is already going (started as `{}`); stop it or wait for it to end before starting another",
                j.kind.name(),
                j.command
            ))),
            None => Ok(()),
        }
    }

    /// `Ok` when no job runs (checked again when one is started).
    pub fn ensure_idle(&self) -> Result<(), ApiError> {
        Self::idle(&self.lock())
    }

    /// Appends `event` to job `id` (ignored when another job has started).
    fn push(&self, id: u64, mut event: Value) {
        let mut s = self.lock();
        let seq = s.next_seq;
        let Some(job) = s.job.as_mut().filter(|j| j.id == id) else {
            return;
        };
        if let Some(obj) = event.as_object_mut() {
            obj.insert("seq".into(), json!(seq));
            obj.insert("job".into(), json!(id));
        }
        job.events.push(event);
        s.next_seq += 1;
        drop(s);
        self.tick.send_modify(|t| *t += 1);
    }

    /// Events of the current job numbered `from` or later.
    fn events_from(&self, from: u64) -> Vec<Value> {
        let s = self.lock();
        let Some(job) = &s.job else {
            return Vec::new();
        };
        job.events
            .iter()
            .filter(|e| e["seq"].as_u64().is_some_and(|q| q >= from))
            .cloned()
            .collect()
    }

    /// Starts `sd-lora ARGS` in `cwd` as the job; refused while one runs.
    pub fn start(
        self: &Arc<Self>,
        kind: JobKind,
        exe: &Path,
        args: Vec<OsString>,
        cwd: &Path,
        output_dir: PathBuf,
        on_exit: OnExit,
    ) -> Result<Value, ApiError> {
        let mut s = self.lock();
        Self::idle(&s)?;
        let command = crate::cli::command_line(&args);
        let mut child = tokio::process::Command::new(exe)
            .args(&args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| ApiError::internal(format!("cannot start {}: {e}", exe.display())))?;
        s.next_id += 1;
        let id = s.next_id;
        s.job = Some(Job {
            id,
            kind,
            status: "running",
            command: command.clone(),
            started: now(),
            exit_code: None,
            output_dir: output_dir.clone(),
            events: Vec::new(),
            pid: child.id(),
            stop_requested: false,
        });
        drop(s);
        self.push(
            id,
            json!({"type": "started", "kind": kind.name(), "command": command}),
        );
        let out = child
            .stdout
            .take()
            .map(|o| self.clone().read_lines(id, o, true));
        let err = child
            .stderr
            .take()
            .map(|e| self.clone().read_lines(id, e, false));
        let slot = self.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            // The readers end when the pipes close; take all their lines first.
            if let Some(o) = out {
                let _ = o.await;
            }
            if let Some(e) = err {
                let _ = e.await;
            }
            for event in on_exit(&output_dir) {
                slot.push(id, event);
            }
            let code = status.as_ref().ok().and_then(|s| s.code());
            let stop_requested = slot.lock().job.as_ref().is_some_and(|j| j.stop_requested);
            let outcome = match code {
                Some(0) => "finished",
                Some(130) => "stopped",
                _ if stop_requested => "stopped",
                _ => "failed",
            };
            slot.push(id, json!({"type": "exit", "status": outcome, "code": code}));
            let mut s = slot.lock();
            if let Some(j) = s.job.as_mut().filter(|j| j.id == id) {
                j.status = outcome;
                j.exit_code = code;
                j.pid = None;
            }
            drop(s);
            slot.tick.send_modify(|t| *t += 1);
        });
        Ok(self.state())
    }

    /// Turns each line of a child's stream into an event.
    fn read_lines(
        self: Arc<Self>,
        id: u64,
        stream: impl AsyncRead + Unpin + Send + 'static,
        json_lines: bool,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let event = json_lines
                    .then(|| serde_json::from_str::<Value>(&line).ok())
                    .flatten()
                    .filter(|v| v.get("type").is_some_and(Value::is_string));
                let event = event.unwrap_or_else(|| json!({"type": "log", "line": line}));
                self.push(id, event);
            }
        })
    }

    /// Asks the running job to stop (SIGINT, as Ctrl-C in a terminal: a
    /// training run finishes its step and saves a checkpoint and its state).
    pub fn stop(&self) -> Result<Value, ApiError> {
        let mut s = self.lock();
        let Some(job) = s.job.as_mut().filter(|j| j.status == "running") else {
            return Err(ApiError::busy("nothing is running"));
        };
        if let Some(pid) = job.pid {
            interrupt(pid);
        }
        job.stop_requested = true;
        let id = job.id;
        drop(s);
        self.push(
            id,
            json!({"type": "note", "message": "stopping after the current step (a checkpoint is saved)…"}),
        );
        Ok(self.state())
    }

    /// The app is stopping: event streams end; a running job is asked to
    /// stop and waited for (up to two minutes), so it saves its state.
    pub async fn shut_down(&self) {
        self.closing.send_replace(true);
        if !self.running() {
            return;
        }
        println!("stopping the running job (it saves a checkpoint first)…");
        let _ = self.stop();
        let mut tick = self.tick.subscribe();
        let wait = async {
            while self.running() {
                if tick.changed().await.is_err() {
                    break;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(120), wait)
            .await
            .is_err()
        {
            println!("the job did not stop within two minutes; leaving it running");
        }
    }
}

/// Sends SIGINT to `pid` (on Windows there is no such signal: nothing).
fn interrupt(pid: u32) {
    #[cfg(unix)]
    // SAFETY: kill(2) with a pid of our own child and a plain signal number.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGINT);
    }
    #[cfg(not(unix))]
    let _ = pid;
}

/// GET /api/job: the current or last job, or null.
pub async fn current(State(st): State<Shared>) -> Json<Value> {
    Json(st.jobs.state())
}

/// POST /api/job/stop.
pub async fn stop(State(st): State<Shared>) -> Result<Json<Value>, ApiError> {
    st.jobs.stop().map(Json)
}

#[derive(Deserialize)]
pub struct From {
    #[serde(default)]
    from: u64,
}

/// GET /api/job/events?from=N: the current job's events numbered N or
/// later, then each new one, as Server-Sent Events.
pub async fn events(
    State(st): State<Shared>,
    ApiQuery(q): ApiQuery<From>,
) -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    struct Cursor {
        st: Shared,
        next: u64,
        pending: std::collections::VecDeque<Value>,
        tick: watch::Receiver<u64>,
        closing: watch::Receiver<bool>,
    }
    let cursor = Cursor {
        tick: st.jobs.tick.subscribe(),
        closing: st.jobs.closing.subscribe(),
        st,
        next: q.from,
        pending: Default::default(),
    };
    let stream = futures_util::stream::unfold(cursor, |mut c| async move {
        loop {
            if *c.closing.borrow() {
                return None;
            }
            if let Some(e) = c.pending.pop_front() {
                let data = Event::default().data(e.to_string());
                return Some((Ok(data), c));
            }
            // Mark what is seen before reading, so no event slips between.
            c.tick.borrow_and_update();
            let fresh = c.st.jobs.events_from(c.next);
            if let Some(last) = fresh.last().and_then(|e| e["seq"].as_u64()) {
                c.next = last + 1;
                c.pending.extend(fresh);
                continue;
            }
            tokio::select! {
                r = c.tick.changed() => if r.is_err() { return None; },
                _ = c.closing.changed() => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
