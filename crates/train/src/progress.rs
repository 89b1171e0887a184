//! Showing training progress: an indicatif bar (step/total, it/s, ETA,
//! smoothed loss, learning rate) when stderr is a terminal, otherwise one
//! plain log line every N steps and at the end, so a log file or CI output
//! stays readable (no carriage returns, no escape codes).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A live bar on stderr.
    Bar,
    /// A log line every `log_every` steps (and at the end).
    Log,
    /// Nothing but notes.
    Quiet,
}

/// Smoothing of the displayed loss (an EMA over about 20 steps).
const LOSS_BETA: f64 = 0.95;

/// The progress reporter the `train` command passes to the training loop.
pub struct ProgressReporter {
    mode: ProgressMode,
    log_every: usize,
    out: Box<dyn Write + Send>,
    bar: Option<ProgressBar>,
    total: usize,
    start: usize,
    step: usize,
    began: Instant,
    ema: f64,
    ema_n: i32,
    lr: f64,
    skipped: usize,
    /// The last validation loss, once there is one.
    val: Option<f64>,
}

impl ProgressReporter {
    /// A bar when stderr is a terminal, else log lines every `log_every` steps.
    pub fn new(log_every: usize) -> Self {
        let mode = if std::io::stderr().is_terminal() {
            ProgressMode::Bar
        } else {
            ProgressMode::Log
        };
        Self::with_output(mode, log_every, Box::new(std::io::stderr()))
    }

    /// A reporter in `mode` writing log lines and notes to `out` (the bar
    /// always draws on stderr).
    pub fn with_output(mode: ProgressMode, log_every: usize, out: Box<dyn Write + Send>) -> Self {
        ProgressReporter {
            mode,
            log_every: log_every.max(1),
            out,
            bar: None,
            total: 0,
            start: 0,
            step: 0,
            began: Instant::now(),
            ema: 0.0,
            ema_n: 0,
            lr: 0.0,
            skipped: 0,
            val: None,
        }
    }

    /// The mode in use.
    pub fn mode(&self) -> ProgressMode {
        self.mode
    }

    /// Training starts at step `start` (0, or the resumed step) of `total`.
    pub fn begin(&mut self, total: usize, start: usize) {
        self.total = total;
        self.start = start;
        self.step = start;
        self.began = Instant::now();
        if self.mode == ProgressMode::Bar {
            let bar =
                ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar:.cyan/blue}] {pos}/{len} {per_sec} ETA {eta} {msg}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_position(start as u64);
            // The bar's rate and ETA must count only this run's steps.
            bar.reset_eta();
            bar.enable_steady_tick(Duration::from_millis(250));
            self.bar = Some(bar);
        }
    }

    /// A step finished: `step` steps done (1-based), its loss (NaN when the
    /// step was skipped) and learning rate.
    pub fn step(&mut self, step: usize, loss: f64, lr: f64, skipped: bool) {
        self.step = step;
        self.lr = lr;
        if skipped || !loss.is_finite() {
            self.skipped += 1;
        } else {
            self.ema = LOSS_BETA * self.ema + (1.0 - LOSS_BETA) * loss;
            self.ema_n += 1;
        }
        match self.mode {
            ProgressMode::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_position(step as u64);
                    bar.set_message(self.status());
                }
            }
            ProgressMode::Log => {
                if step.is_multiple_of(self.log_every) || step == self.total {
                    let line = self.log_line();
                    let _ = writeln!(self.out, "{line}");
                }
            }
            ProgressMode::Quiet => {}
        }
    }

    /// A message worth showing (checkpoint written, step skipped, ...),
    /// printed above the bar.
    pub fn note(&mut self, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(message),
            None => {
                let _ = writeln!(self.out, "{message}");
            }
        }
    }

    /// Training ended (normally or not): the bar is finished in place, and
    /// the log gets a last line if the last step was not logged.
    pub fn end(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.set_message(self.status());
            bar.finish();
        } else if self.mode == ProgressMode::Log
            && self.step > self.start
            && !(self.step.is_multiple_of(self.log_every) || self.step == self.total)
        {
            let line = self.log_line();
            let _ = writeln!(self.out, "{line}");
        }
        let _ = self.out.flush();
    }

    /// The smoothed loss so far (None before the first finite loss).
    pub fn smoothed_loss(&self) -> Option<f64> {
        (self.ema_n > 0).then(|| self.ema / (1.0 - LOSS_BETA.powi(self.ema_n)))
    }

    /// A validation loss was evaluated: shown with the loss from now on.
    pub fn validation(&mut self, loss: f64) {
        self.val = Some(loss);
    }

    /// Steps per second of this run's steps.
    fn rate(&self) -> f64 {
        let done = self.step.saturating_sub(self.start) as f64;
        let secs = self.began.elapsed().as_secs_f64();
        if secs > 0.0 { done / secs } else { 0.0 }
    }

    fn status(&self) -> String {
        let mut s = format!(
            "loss {} lr {:.2e}",
            self.smoothed_loss()
                .map_or("-".to_string(), |l| format!("{l:.4}")),
            self.lr
        );
        if let Some(v) = self.val {
            s.push_str(&format!(" val {v:.4}"));
        }
        if self.skipped > 0 {
            s.push_str(&format!(" skipped {}", self.skipped));
        }
        s
    }

    /// Seconds left at this run's rate (None before a step has finished).
    pub fn eta_seconds(&self) -> Option<f64> {
        let rate = self.rate();
        (rate > 0.0).then(|| self.total.saturating_sub(self.step) as f64 / rate)
    }

    /// `step 20/200 (10%)  loss 0.1234  lr 1.00e-4  2.31 it/s  ETA 1m18s`.
    fn log_line(&self) -> String {
        let rate = self.rate();
        let eta = self.eta_seconds().map_or("-".to_string(), fmt_duration);
        let pct = (100 * self.step).checked_div(self.total).unwrap_or(100);
        format!(
            "step {}/{} ({pct}%)  {}  {:.2} it/s  ETA {eta}",
            self.step,
            self.total,
            self.status()
                .replace(" lr ", "  lr ")
                .replace(" val ", "  val "),
            rate
        )
    }
}

/// `1h02m`, `3m05s`, `42s`.
pub fn fmt_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

impl ProgressReporter {
    /// Progress of a preparation pass (`what`: "caching latents", ...): its own
    /// bar with an ETA, or a log line at the start, every tenth and the end.
    pub fn prepare(&mut self, what: &str, done: usize, total: usize) {
        match self.mode {
            ProgressMode::Bar => {
                if done == 0 {
                    let bar = ProgressBar::with_draw_target(
                        Some(total as u64),
                        ProgressDrawTarget::stderr(),
                    );
                    let style = ProgressStyle::with_template(
                        "{msg} [{wide_bar:.green/blue}] {pos}/{len} {elapsed_precise} ETA {eta}",
                    )
                    .map(|s| s.progress_chars("=> "))
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
                    bar.set_style(style);
                    bar.set_message(what.to_string());
                    bar.enable_steady_tick(Duration::from_millis(250));
                    self.bar = Some(bar);
                    self.began = Instant::now();
                } else if let Some(bar) = &self.bar {
                    bar.set_position(done as u64);
                }
                if done >= total
                    && let Some(bar) = self.bar.take()
                {
                    bar.finish();
                }
            }
            ProgressMode::Log => {
                if done == 0 {
                    self.began = Instant::now();
                }
                let tenth = total.div_ceil(10).max(1);
                if done == 0 || done >= total || done.is_multiple_of(tenth) {
                    let secs = self.began.elapsed().as_secs_f64();
                    let eta = if done > 0 && done < total {
                        format!(
                            "  ETA {}",
                            fmt_duration(secs / done as f64 * (total - done) as f64)
                        )
                    } else {
                        String::new()
                    };
                    let _ = writeln!(
                        self.out,
                        "{what}: {done}/{total}  {}{eta}",
                        fmt_duration(secs)
                    );
                }
            }
            ProgressMode::Quiet => {}
        }
    }
}

impl crate::trainer::TrainProgress for ProgressReporter {
    fn prepare(&mut self, what: &str, done: usize, total: usize) {
        ProgressReporter::prepare(self, what, done, total);
    }
    fn begin(&mut self, total: usize, start: usize) {
        ProgressReporter::begin(self, total, start);
    }
    fn step(&mut self, r: &crate::trainer::StepReport) {
        if let Some(v) = r.val_loss {
            self.validation(v);
        }
        ProgressReporter::step(self, r.step, r.loss, r.lr, r.skipped);
    }
    fn note(&mut self, m: &str) {
        ProgressReporter::note(self, m);
    }
    fn end(&mut self) {
        ProgressReporter::end(self);
    }
}
