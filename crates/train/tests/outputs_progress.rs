//! The non-terminal progress log: one clean line every N steps and at the
//! end, notes in between, no escape codes.

use sd_lora_train::progress::{ProgressMode, ProgressReporter, fmt_duration};
use std::io::Write;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn log_mode_prints_a_line_every_n_steps_and_at_the_end() {
    let buf = Shared::default();
    let mut p = ProgressReporter::with_output(ProgressMode::Log, 5, Box::new(buf.clone()));
    p.begin(12, 0);
    for step in 1..=12 {
        let loss = if step == 3 {
            f64::NAN
        } else {
            1.0 / step as f64
        };
        if step == 8 {
            p.validation(0.25);
        }
        p.step(step, loss, 1e-4, step == 3);
        if step == 6 {
            p.note("saved checkpoint");
        }
    }
    p.end();
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].starts_with("step 5/12 (41%)"), "{text}");
    assert_eq!(lines[1], "saved checkpoint");
    assert!(lines[2].starts_with("step 10/12 (83%)"), "{text}");
    assert!(lines[3].starts_with("step 12/12 (100%)"), "{text}");
    for l in [lines[0], lines[2], lines[3]] {
        assert!(
            l.contains("loss 0.") && l.contains("lr 1.00e-4") && l.contains("it/s"),
            "{l}"
        );
        assert!(l.contains("ETA"), "{l}");
    }
    assert!(lines[3].contains("skipped 1"), "{text}");
    // The validation loss shows from its first evaluation on.
    assert!(!lines[0].contains("val"), "{text}");
    assert!(lines[2].contains("  val 0.2500"), "{text}");
    assert!(!text.contains('\r') && !text.contains('\x1b'), "{text:?}");
    let s = p.smoothed_loss().unwrap();
    assert!(s > 1.0 / 12.0 && s < 1.0, "{s}");
}

#[test]
fn end_logs_an_unlogged_last_step_once() {
    let buf = Shared::default();
    let mut p = ProgressReporter::with_output(ProgressMode::Log, 10, Box::new(buf.clone()));
    p.begin(100, 40); // a resumed run, stopped early at step 47
    for step in 41..=47 {
        p.step(step, 0.5, 1e-4, false);
    }
    p.end();
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.starts_with("step 47/100 (47%)"), "{text}");
    assert_eq!(fmt_duration(42.4), "42s");
    assert_eq!(fmt_duration(185.0), "3m05s");
    assert_eq!(fmt_duration(3720.0), "1h02m");
}
