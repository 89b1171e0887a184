//! The files a run writes besides the LoRA: `logs/loss.csv`, `loss.png`
//! and `train_summary.json`, and the atomic write they all go through.
//!
//! - [`LossLog`] appends one CSV row per optimizer step and flushes it at
//!   once, so the log is complete up to the last step even if the process is
//!   killed; on resume it drops the rows after the resumed step.
//! - [`plot_loss_png`] draws the loss curve: the raw per-step loss in a light
//!   colour, an exponential moving average in a strong one, axes with tick
//!   labels, and the min/max in the title line (a built-in 5×7 bitmap font,
//!   so no font files or crates are needed).
//! - [`TrainSummary`] is the machine-readable result of a run.

use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through a temporary file in the same folder and
/// a rename, so readers (and a crash) never leave a half-written file
/// ([`sd_lora_model::atomic_file`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    sd_lora_model::atomic_file::write_with(
        path,
        |p, e| io::Error::new(e.kind(), format!("cannot write {}: {e}", p.display())),
        |w| w.write_all(bytes),
    )
}

/// One row of `loss.csv`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossRow {
    /// Optimizer step (1-based).
    pub step: usize,
    /// Loss of the step (NaN for a skipped, non-finite step).
    pub loss: f64,
    /// UNet learning rate at the step.
    pub lr: f64,
    /// Wall-clock seconds the step took.
    pub seconds: f64,
    /// Validation loss evaluated after this step (None on other steps and
    /// without a validation set).
    #[serde(default)]
    pub val_loss: Option<f64>,
}

/// The header line of `loss.csv`.
pub const LOSS_CSV_HEADER: &str = "step,loss,lr,seconds,val_loss";

/// Appends per-step rows to `logs/loss.csv`.
#[derive(Debug)]
pub struct LossLog {
    path: PathBuf,
    file: std::fs::File,
}

impl LossLog {
    /// Opens the log at `path` (creating its folder). A fresh run
    /// (`start_step` 0) starts a new file; a resumed run keeps the rows up to
    /// `start_step` and drops later ones (written after the state it resumes
    /// from), so the log matches the run.
    pub fn open(path: &Path, start_step: usize) -> io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let kept: Vec<LossRow> = if start_step > 0 && path.exists() {
            read_loss_csv(path)?
                .into_iter()
                .filter(|r| r.step <= start_step)
                .collect()
        } else {
            Vec::new()
        };
        let mut text = format!("{LOSS_CSV_HEADER}\n");
        for r in &kept {
            text.push_str(&format_row(r));
        }
        write_atomic(path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
            })?;
        Ok(LossLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one row; it reaches the file before this returns (one
    /// unbuffered write per row).
    pub fn append(&mut self, row: &LossRow) -> io::Result<()> {
        let row = format_row(row);
        self.file
            .write_all(row.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot write {}: {e}", self.path.display()),
                )
            })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn format_row(r: &LossRow) -> String {
    // `{}` prints the shortest text that parses back to the same f64; the
    // validation column is empty on steps without an evaluation.
    let val = r.val_loss.map(|v| v.to_string()).unwrap_or_default();
    format!("{},{},{},{:.4},{val}\n", r.step, r.loss, r.lr, r.seconds)
}

/// Reads a `loss.csv` written by [`LossLog`] (the header and malformed lines
/// are skipped; files from before the validation column read with none).
pub fn read_loss_csv(path: &Path) -> io::Result<Vec<LossRow>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display())))?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut f = line.split(',').map(str::trim);
            Some(LossRow {
                step: f.next()?.parse().ok()?,
                loss: f.next()?.parse().ok()?,
                lr: f.next()?.parse().ok()?,
                seconds: f.next()?.parse().ok()?,
                val_loss: f.next().and_then(|v| v.parse().ok()),
            })
        })
        .collect())
}

/// Exponential moving average of the finite values of `values` (a
/// non-finite value repeats the previous average), bias-corrected like
/// Adam's moments so the start is not pulled towards 0.
pub fn ema(values: &[f64], beta: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(values.len());
    let (mut m, mut n) = (0.0, 0i32);
    for &v in values {
        if v.is_finite() {
            m = beta * m + (1.0 - beta) * v;
            n += 1;
        }
        out.push(if n == 0 {
            f64::NAN
        } else {
            m / (1.0 - beta.powi(n))
        });
    }
    out
}

/// Smoothing of the plotted average: about a twentieth of the run, at most 0.99.
pub fn plot_smoothing(len: usize) -> f64 {
    (1.0 - 20.0 / len.max(1) as f64).clamp(0.0, 0.99)
}

/// Plot size in pixels.
pub const PLOT_WIDTH: u32 = 800;
/// Plot size in pixels.
pub const PLOT_HEIGHT: u32 = 400;
/// Colour of the raw per-step loss.
pub const RAW_COLOUR: Rgb<u8> = Rgb([170, 200, 235]);
/// Colour of the smoothed loss.
pub const EMA_COLOUR: Rgb<u8> = Rgb([20, 60, 190]);
/// Colour of the validation loss.
pub const VAL_COLOUR: Rgb<u8> = Rgb([220, 90, 20]);
const AXIS_COLOUR: Rgb<u8> = Rgb([40, 40, 40]);
const GRID_COLOUR: Rgb<u8> = Rgb([232, 232, 232]);
const TEXT_COLOUR: Rgb<u8> = Rgb([30, 30, 30]);

// Plot area inside the image.
const LEFT: i64 = 90;
const RIGHT: i64 = 20;
const TOP: i64 = 40;
const BOTTOM: i64 = 45;

/// Draws the loss curve of `rows` into a PNG at `path` (written atomically):
/// raw loss light, its EMA strong, y axis from the smallest to the largest
/// finite loss, x axis over the steps, min/max and final smoothed loss in the
/// title. Rows with a non-finite loss are left out of the curve.
pub fn plot_loss_png(rows: &[LossRow], path: &Path) -> io::Result<()> {
    let img = render_loss_plot(rows);
    let mut bytes = Vec::new();
    img.write_to(&mut io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| io::Error::other(format!("cannot encode {}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// The plot as an image (see [`plot_loss_png`]).
pub fn render_loss_plot(rows: &[LossRow]) -> RgbImage {
    let (w, h) = (PLOT_WIDTH as i64, PLOT_HEIGHT as i64);
    let mut img = RgbImage::from_pixel(PLOT_WIDTH, PLOT_HEIGHT, Rgb([255, 255, 255]));
    let (x0, x1, y0, y1) = (LEFT, w - RIGHT, TOP, h - BOTTOM);

    let finite: Vec<&LossRow> = rows.iter().filter(|r| r.loss.is_finite()).collect();
    let smoothed = ema(
        &rows.iter().map(|r| r.loss).collect::<Vec<_>>(),
        plot_smoothing(rows.len()),
    );
    if finite.is_empty() {
        text(
            &mut img,
            x0,
            TOP / 2 - 7,
            "loss: no finite values",
            2,
            TEXT_COLOUR,
        );
        axes(&mut img, x0, x1, y0, y1);
        return img;
    }
    let val: Vec<(usize, f64)> = rows
        .iter()
        .filter_map(|r| r.val_loss.filter(|v| v.is_finite()).map(|v| (r.step, v)))
        .collect();
    let range = |it: &mut dyn Iterator<Item = f64>| {
        it.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        })
    };
    // The title reports the training loss; the axis also spans the
    // validation points.
    let (lo, hi) = range(&mut finite.iter().map(|r| r.loss));
    let (axis_lo, axis_hi) =
        range(&mut finite.iter().map(|r| r.loss).chain(val.iter().map(|v| v.1)));
    let (s_lo, s_hi) = (
        rows.first().map_or(0, |r| r.step) as f64,
        rows.last().map_or(1, |r| r.step) as f64,
    );
    // Degenerate ranges (one row, a constant loss) still get a visible span.
    let (y_lo, y_hi) = if axis_hi > axis_lo {
        (axis_lo, axis_hi)
    } else {
        (
            axis_lo - 0.5 * axis_lo.abs().max(1e-3),
            axis_hi + 0.5 * axis_hi.abs().max(1e-3),
        )
    };
    let (x_lo, x_hi) = if s_hi > s_lo {
        (s_lo, s_hi)
    } else {
        (s_lo - 1.0, s_lo + 1.0)
    };
    let px = |step: f64| x0 + ((step - x_lo) / (x_hi - x_lo) * (x1 - x0) as f64).round() as i64;
    let py = |loss: f64| y1 - ((loss - y_lo) / (y_hi - y_lo) * (y1 - y0) as f64).round() as i64;

    // Grid and tick labels: 5 levels on each axis.
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let v = y_lo + f * (y_hi - y_lo);
        let y = py(v);
        line(&mut img, x0, y, x1, y, GRID_COLOUR, 1);
        let label = fmt_num(v);
        let tw = text_width(&label, 2);
        text(&mut img, x0 - 8 - tw, y - 7, &label, 2, TEXT_COLOUR);
        line(&mut img, x0 - 5, y, x0, y, AXIS_COLOUR, 1);

        let s = x_lo + f * (x_hi - x_lo);
        let x = px(s);
        line(&mut img, x, y0, x, y1, GRID_COLOUR, 1);
        line(&mut img, x, y1, x, y1 + 5, AXIS_COLOUR, 1);
        let label = format!("{}", s.round() as i64);
        let tw = text_width(&label, 2);
        text(
            &mut img,
            (x - tw / 2).clamp(0, w - tw),
            y1 + 9,
            &label,
            2,
            TEXT_COLOUR,
        );
    }
    axes(&mut img, x0, x1, y0, y1);

    // Raw loss, then the EMA over it.
    let pts: Vec<(i64, i64)> = finite
        .iter()
        .map(|r| (px(r.step as f64), py(r.loss)))
        .collect();
    polyline(&mut img, &pts, RAW_COLOUR, 1);
    let sm: Vec<(i64, i64)> = rows
        .iter()
        .zip(&smoothed)
        .filter(|(_, s)| s.is_finite())
        .map(|(r, s)| (px(r.step as f64), py(*s)))
        .collect();
    polyline(&mut img, &sm, EMA_COLOUR, 2);
    // Validation: a line through its evaluations, a dot at each.
    let vp: Vec<(i64, i64)> = val.iter().map(|&(s, v)| (px(s as f64), py(v))).collect();
    polyline(&mut img, &vp, VAL_COLOUR, 2);
    for &(x, y) in &vp {
        for d in -2..=2 {
            line(&mut img, x - 2, y + d, x + 2, y + d, VAL_COLOUR, 1);
        }
    }

    let last = smoothed
        .iter()
        .rev()
        .find(|v| v.is_finite())
        .copied()
        .unwrap_or(f64::NAN);
    let title = format!(
        "loss  min {}  max {}  ema {}",
        fmt_num(lo),
        fmt_num(hi),
        fmt_num(last)
    );
    text(&mut img, x0, 12, &title, 2, TEXT_COLOUR);
    // Legend, top right: a swatch of each colour.
    let lx = w - RIGHT - if val.is_empty() { 150 } else { 230 };
    line(&mut img, lx, 19, lx + 20, 19, RAW_COLOUR, 2);
    text(&mut img, lx + 26, 12, "raw", 2, TEXT_COLOUR);
    line(&mut img, lx + 80, 19, lx + 100, 19, EMA_COLOUR, 2);
    text(&mut img, lx + 106, 12, "ema", 2, TEXT_COLOUR);
    if !val.is_empty() {
        line(&mut img, lx + 160, 19, lx + 180, 19, VAL_COLOUR, 2);
        text(&mut img, lx + 186, 12, "val", 2, TEXT_COLOUR);
    }
    text(
        &mut img,
        x1 - text_width("step", 2),
        h - 16,
        "step",
        2,
        TEXT_COLOUR,
    );
    img
}

fn axes(img: &mut RgbImage, x0: i64, x1: i64, y0: i64, y1: i64) {
    line(img, x0, y0, x0, y1, AXIS_COLOUR, 1);
    line(img, x0, y1, x1, y1, AXIS_COLOUR, 1);
}

/// A short label: 3 significant digits, scientific below 0.001 or from 10 000.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "nan".to_string();
    }
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e4).contains(&a) {
        return format!("{v:.2e}");
    }
    let decimals = if a == 0.0 {
        1
    } else {
        (2 - a.log10().floor() as i64).clamp(0, 5) as usize
    };
    format!("{v:.decimals$}")
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// A `thickness`-pixel line (Bresenham, with a square pen).
fn line(img: &mut RgbImage, xa: i64, ya: i64, xb: i64, yb: i64, c: Rgb<u8>, thickness: i64) {
    let (dx, dy) = ((xb - xa).abs(), -(yb - ya).abs());
    let (sx, sy) = (if xa < xb { 1 } else { -1 }, if ya < yb { 1 } else { -1 });
    let (mut x, mut y, mut err) = (xa, ya, dx + dy);
    loop {
        for ox in 0..thickness {
            for oy in 0..thickness {
                put(img, x + ox, y + oy, c);
            }
        }
        if x == xb && y == yb {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

fn polyline(img: &mut RgbImage, pts: &[(i64, i64)], c: Rgb<u8>, thickness: i64) {
    match pts {
        [] => {}
        [(x, y)] => line(img, *x, *y, *x, *y, c, thickness + 1),
        _ => {
            for w in pts.windows(2) {
                line(img, w[0].0, w[0].1, w[1].0, w[1].1, c, thickness);
            }
        }
    }
}

/// Rows of a 5×7 glyph, most significant of the 5 bits on the left.
fn glyph(ch: char) -> [u8; 7] {
    match ch {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        'a' => [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'c' => [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'e' => [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'i' => [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'r' => [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        _ => [0; 7],
    }
}

fn text_width(s: &str, scale: i64) -> i64 {
    s.chars().count() as i64 * 6 * scale
}

/// Draws `s` with its top-left corner at (x, y), each font pixel `scale` wide.
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, scale: i64, c: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let gx = x + i as i64 * 6 * scale;
        for (row, bits) in glyph(ch).iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) != 0 {
                    for ox in 0..scale {
                        for oy in 0..scale {
                            put(img, gx + col * scale + ox, y + row as i64 * scale + oy, c);
                        }
                    }
                }
            }
        }
    }
}

/// `OUTPUT/train_summary.json`: the result of a run, for scripts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Optimizer steps completed (including resumed ones).
    pub steps: usize,
    /// Median wall-clock seconds per step of this process's steps (None if none ran).
    pub median_seconds_per_step: Option<f64>,
    /// Peak resident memory of the process in bytes (Linux `VmHWM`; None elsewhere).
    /// GPU memory is not included.
    pub peak_memory_bytes: Option<u64>,
    /// Loss of the last completed step.
    pub final_loss: Option<f64>,
    /// Validation loss of the last evaluation (None without a validation set).
    #[serde(default)]
    pub final_validation_loss: Option<f64>,
    /// Steps skipped for a non-finite loss or gradient.
    pub skipped_steps: usize,
    /// The run was stopped early (Ctrl-C); `--resume` continues it.
    pub interrupted: bool,
    /// Every file the run wrote: LoRA files, logs, plot.
    pub files: Vec<PathBuf>,
}

impl TrainSummary {
    /// Writes the summary as pretty JSON to `path`, atomically.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let json = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        write_atomic(path, (json + "\n").as_bytes())
    }
}

/// The median of the finite values (None when there are none).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Peak resident set size of this process in bytes, from `VmHWM` in
/// `/proc/self/status` (Linux only; None elsewhere or if unreadable).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

/// The `VmHWM:  1234 kB` line of a `/proc/PID/status` text, in bytes.
pub fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut f = line["VmHWM:".len()..].split_whitespace();
    let n: u64 = f.next()?.parse().ok()?;
    let unit = match f.next().unwrap_or("kB") {
        "kB" | "KB" | "kb" => 1024,
        "mB" | "MB" => 1024 * 1024,
        _ => 1,
    };
    Some(n * unit)
}
