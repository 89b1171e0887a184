//! The run's side files: loss.csv (appended, flushed, truncated on resume),
//! loss.png (decodes, has both curves), train_summary.json, atomic writes.

use sd_lora_train::outputs::{
    EMA_COLOUR, LossLog, LossRow, PLOT_HEIGHT, PLOT_WIDTH, RAW_COLOUR, TrainSummary, VAL_COLOUR,
    ema, fmt_num, median, parse_vm_hwm, plot_loss_png, read_loss_csv, write_atomic,
};
use std::path::PathBuf;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("sd-lora-out-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn row(step: usize, loss: f64, lr: f64, seconds: f64) -> LossRow {
    LossRow {
        step,
        loss,
        lr,
        seconds,
        val_loss: None,
    }
}

#[test]
fn loss_log_appends_flushed_rows_and_truncates_on_resume() {
    let dir = TempDir::new("csv");
    let path = dir.0.join("logs").join("loss.csv");
    let mut log = LossLog::open(&path, 0).unwrap();
    for step in 1..=10 {
        log.append(&row(step, 0.5 / step as f64, 1e-4, 0.25))
            .unwrap();
        // Flushed per row: readable while the log is still open.
        assert_eq!(read_loss_csv(&path).unwrap().len(), step);
    }
    log.append(&row(11, f64::NAN, 1e-4, 0.25)).unwrap();
    drop(log);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("step,loss,lr,seconds,val_loss\n"),
        "{text}"
    );
    let rows = read_loss_csv(&path).unwrap();
    assert_eq!(rows.len(), 11);
    assert_eq!(rows[2].loss, 0.5 / 3.0, "loss round-trips exactly");
    assert!(rows[10].loss.is_nan());

    // A validation loss round-trips; other rows read as None.
    assert!(rows.iter().all(|r| r.val_loss.is_none()));
    let mut log = LossLog::open(&path, 11).unwrap();
    log.append(&LossRow {
        val_loss: Some(0.375),
        ..row(12, 0.3, 1e-4, 0.25)
    })
    .unwrap();
    drop(log);
    let rows = read_loss_csv(&path).unwrap();
    assert_eq!(rows[11].val_loss, Some(0.375));
    assert_eq!(rows[10].val_loss, None);
    // A log written before the validation column still reads.
    let old = dir.0.join("old.csv");
    std::fs::write(&old, "step,loss,lr,seconds\n1,0.5,0.0001,0.2500\n").unwrap();
    assert_eq!(read_loss_csv(&old).unwrap(), vec![row(1, 0.5, 1e-4, 0.25)]);

    // Resuming at step 6 drops the rows written after that state.
    let mut log = LossLog::open(&path, 6).unwrap();
    log.append(&row(7, 0.1, 1e-4, 0.3)).unwrap();
    let rows = read_loss_csv(&path).unwrap();
    assert_eq!(
        rows.iter().map(|r| r.step).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
    // A fresh run starts over.
    LossLog::open(&path, 0).unwrap();
    assert!(read_loss_csv(&path).unwrap().is_empty());
}

fn count(img: &image::RgbImage, c: image::Rgb<u8>) -> usize {
    img.pixels().filter(|p| **p == c).count()
}

#[test]
fn loss_plot_is_a_png_with_both_curves() {
    let dir = TempDir::new("png");
    let rows: Vec<LossRow> = (1..=300)
        .map(|s| LossRow {
            step: s,
            // A decaying, noisy loss with one skipped step.
            loss: if s == 150 {
                f64::NAN
            } else {
                0.05 + 0.3 / (1.0 + s as f64 / 30.0) + 0.04 * ((s * 7919 % 101) as f64 / 101.0)
            },
            lr: 1e-4,
            seconds: 0.2,
            // An evaluation every 50 steps.
            val_loss: (s % 50 == 0).then_some(0.2 + 0.1 / (1.0 + s as f64 / 50.0)),
        })
        .collect();
    let path = dir.0.join("loss.png");
    plot_loss_png(&rows, &path).unwrap();
    let img = image::open(&path).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (PLOT_WIDTH, PLOT_HEIGHT));
    let (raw, smooth) = (count(&img, RAW_COLOUR), count(&img, EMA_COLOUR));
    assert!(raw > 500, "raw curve pixels: {raw}");
    assert!(smooth > 800, "smoothed curve pixels: {smooth}");
    let val = count(&img, VAL_COLOUR);
    assert!(val > 300, "validation line pixels: {val}");
    // The smoothed curve decays: its pixels in the left tenth of the plot
    // are higher (smaller y) than in the right tenth.
    let mean_y = |x_range: std::ops::Range<u32>| {
        let ys: Vec<u32> = img
            .enumerate_pixels()
            .filter(|(x, y, p)| x_range.contains(x) && *y > 40 && **p == EMA_COLOUR)
            .map(|(_, y, _)| y)
            .collect();
        ys.iter().sum::<u32>() as f64 / ys.len().max(1) as f64
    };
    assert!(mean_y(100..170) < mean_y(700..770));
    // Text was drawn (dark pixels in the title band).
    let dark = img
        .enumerate_pixels()
        .filter(|(_, y, p)| *y < 35 && p.0[0] < 60)
        .count();
    assert!(dark > 100, "title text pixels: {dark}");

    // Degenerate inputs still give a valid image.
    for rows in [
        vec![],
        vec![row(1, 0.2, 1e-4, 1.0)],
        vec![row(1, f64::NAN, 1e-4, 1.0)],
    ] {
        plot_loss_png(&rows, &path).unwrap();
        assert_eq!(image::open(&path).unwrap().width(), PLOT_WIDTH);
    }
}

#[test]
fn summary_round_trips_and_helpers() {
    let dir = TempDir::new("summary");
    let s = TrainSummary {
        steps: 20,
        median_seconds_per_step: median(&[0.3, 0.1, 0.2, f64::NAN]),
        peak_memory_bytes: parse_vm_hwm("Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t1 kB\n"),
        final_loss: Some(0.125),
        final_validation_loss: Some(0.25),
        skipped_steps: 1,
        interrupted: false,
        files: vec![dir.0.join("lora.safetensors")],
    };
    assert_eq!(s.median_seconds_per_step, Some(0.2));
    assert_eq!(s.peak_memory_bytes, Some(2048 * 1024));
    let path = dir.0.join("train_summary.json");
    s.write(&path).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for key in [
        "steps",
        "median_seconds_per_step",
        "peak_memory_bytes",
        "final_loss",
        "files",
    ] {
        assert!(v.get(key).is_some(), "{key} missing: {v}");
    }
    let back: TrainSummary = serde_json::from_value(v).unwrap();
    assert_eq!(back, s);

    assert_eq!(median(&[]), None);
    assert_eq!(median(&[1.0, 4.0]), Some(2.5));
    let e = ema(&[1.0, 1.0, f64::NAN, 1.0], 0.9);
    assert!(e.iter().all(|v| (v - 1.0).abs() < 1e-12), "{e:?}");
    assert_eq!(fmt_num(0.12345), "0.123");
    assert_eq!(fmt_num(12.345), "12.3");
    assert_eq!(fmt_num(0.00012), "1.20e-4");
    if cfg!(target_os = "linux") {
        assert!(sd_lora_train::outputs::peak_rss_bytes().unwrap() > 1 << 20);
    }

    // Atomic write: replaces the file and leaves no temporary behind.
    let p = dir.0.join("a.txt");
    write_atomic(&p, b"one").unwrap();
    write_atomic(&p, b"two").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"two");
    let leftovers: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
    assert!(write_atomic(&dir.0.join("missing").join("x"), b"x").is_err());
}
