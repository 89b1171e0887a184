//! Machine-readable training progress: one JSON object per line on standard
//! output (`sd-lora train --events`), read by the web app (`sd-lora ui`),
//! which runs training as a child process so that a crash of the run never
//! takes the app down. Every event has a `type`; the fields of each are
//! documented on [`JsonEvents`]. Human-readable notes still go to stderr as
//! plain log lines, so the same run can be read in a terminal.

use crate::progress::ProgressReporter;
use crate::trainer::{StepReport, TrainProgress};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes training progress as JSON lines:
///
/// - `{"type":"prepare","what":"caching latents","done":3,"total":8}`
/// - `{"type":"loaded"}`
/// - `{"type":"begin","total":200,"start":0}`
/// - `{"type":"step","step":5,"total":200,"loss":0.12,"loss_ema":0.13,"lr":1e-3,
///   "seconds":0.2,"eta_seconds":40.1,"val_loss":null,"skipped":false}`
/// - `{"type":"preview","step":100,"files":[…],"grid":"…"|null}`
/// - `{"type":"note","message":"…"}`
/// - `{"type":"end"}`
///
/// A non-finite loss is written as `null` (JSON has no NaN).
pub struct JsonEvents {
    out: Box<dyn Write + Send>,
    /// Keeps the log lines, the smoothed loss and the ETA the terminal
    /// display shows.
    log: ProgressReporter,
}

impl JsonEvents {
    /// Events on standard output; log lines every `log_every` steps on stderr.
    pub fn stdout(log_every: usize) -> Self {
        Self::with_output(Box::new(std::io::stdout()), log_every)
    }

    /// Events written to `out`.
    pub fn with_output(out: Box<dyn Write + Send>, log_every: usize) -> Self {
        let log = ProgressReporter::with_output(
            crate::progress::ProgressMode::Log,
            log_every,
            Box::new(std::io::stderr()),
        );
        JsonEvents { out, log }
    }

    /// Writes one event. A reader that went away (the app stopped) must not
    /// stop the run: write errors are ignored, and the run still saves.
    fn emit(&mut self, event: Value) {
        let _ = writeln!(self.out, "{event}").and_then(|()| self.out.flush());
    }
}

/// A float as JSON: `null` when not finite.
fn num(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

impl TrainProgress for JsonEvents {
    fn prepare(&mut self, what: &str, done: usize, total: usize) {
        self.log.prepare(what, done, total);
        self.emit(json!({"type": "prepare", "what": what, "done": done, "total": total}));
    }
    fn loaded(&mut self) {
        self.emit(json!({"type": "loaded"}));
    }
    fn begin(&mut self, total: usize, start: usize) {
        self.log.begin(total, start);
        self.emit(json!({"type": "begin", "total": total, "start": start}));
    }
    fn step(&mut self, r: &StepReport) {
        TrainProgress::step(&mut self.log, r);
        let eta = self.log.eta_seconds();
        let event = json!({
            "type": "step",
            "step": r.step,
            "total": r.total,
            "loss": num(r.loss),
            "loss_ema": self.log.smoothed_loss().map_or(Value::Null, num),
            "lr": num(r.lr),
            "seconds": num(r.seconds),
            "eta_seconds": eta.map_or(Value::Null, num),
            "val_loss": r.val_loss.map_or(Value::Null, num),
            "skipped": r.skipped,
        });
        self.emit(event);
    }
    fn note(&mut self, message: &str) {
        self.log.note(message);
        self.emit(json!({"type": "note", "message": message}));
    }
    fn previews(&mut self, step: usize, files: &[PathBuf], grid: Option<&Path>) {
        self.emit(json!({
            "type": "preview",
            "step": step,
            "files": files,
            "grid": grid,
        }));
    }
    fn end(&mut self) {
        self.log.end();
        self.emit(json!({"type": "end"}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer whose bytes the test can read afterwards.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Each event is one line of valid JSON; a NaN loss becomes null.
    #[test]
    fn events_are_json_lines() {
        let buf = Shared::default();
        let mut ev = JsonEvents::with_output(Box::new(buf.clone()), 1000);
        ev.begin(10, 0);
        let mut r = StepReport {
            step: 1,
            total: 10,
            loss: 0.5,
            lr: 1e-3,
            seconds: 0.1,
            skipped: false,
            grad_norm: 1.0,
            ops: Default::default(),
            graph_nodes: 0,
            val_loss: None,
        };
        ev.step(&r);
        r.step = 2;
        r.loss = f64::NAN;
        r.skipped = true;
        ev.step(&r);
        ev.previews(2, &[PathBuf::from("/o/a.png")], Some(Path::new("/o/g.png")));
        ev.note("saved \"x\"");
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0]["type"], "begin");
        assert_eq!(lines[1]["loss"], 0.5);
        assert_eq!(lines[1]["loss_ema"], 0.5);
        assert!(lines[1]["eta_seconds"].is_number());
        assert!(lines[2]["loss"].is_null());
        assert_eq!(lines[2]["skipped"], true);
        assert_eq!(lines[3]["grid"], "/o/g.png");
        assert_eq!(lines[3]["files"][0], "/o/a.png");
        assert_eq!(lines[4]["message"], "saved \"x\"");
    }
}
