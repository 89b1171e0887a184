//! Resumable training state: everything needed to continue a run so that
//! N steps + resume + M steps equals N + M steps in one go.
//!
//! Randomness is derived from `(seed, step, micro-batch)` and the data order
//! from `(seed, epoch, batch)`, so the state is only: the step, the LoRA
//! parameters (f32, exact), the optimizer moments, and a few counters. Each
//! state is written into a fresh folder that is renamed into place when
//! complete, and `latest.json` (written atomically) names the newest one —
//! an interruption at any moment leaves the previous state intact.

use crate::outputs::write_atomic;
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Format version of the state folder.
const VERSION: u32 = 1;
/// How many state folders to keep.
const KEEP: usize = 2;

/// The scalar part of the state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateInfo {
    /// Format version.
    pub version: u32,
    /// Optimizer steps completed.
    pub step: usize,
    /// Steps skipped for a non-finite loss or gradient, in total.
    pub skipped_steps: usize,
    /// Non-finite steps in a row at the time of saving.
    pub consecutive_nonfinite: usize,
    /// Unix time the run started (kept across resumes for the metadata).
    pub started_at: f64,
    /// Fingerprint of the options that must not change on resume.
    pub fingerprint: String,
}

/// A saved state: scalars plus named tensors.
pub struct SavedState {
    /// The scalars.
    pub info: StateInfo,
    /// LoRA parameters by name (`{component}:{path}.down` / `.up`).
    pub lora: HashMap<String, Tensor>,
    /// Optimizer state by name.
    pub optimizer: HashMap<String, Tensor>,
}

#[derive(Serialize, Deserialize)]
struct Latest {
    folder: String,
    step: usize,
}

fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, path)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Saves a state under `dir` (normally `OUTPUT/state`) and points `latest.json` at it.
pub fn save(
    dir: &Path,
    info: &StateInfo,
    lora: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let folder = format!("step-{:06}", info.step);
    let final_dir = dir.join(&folder);
    let tmp_dir = dir.join(format!(".{folder}.tmp-{}", std::process::id()));
    if tmp_dir.exists() {
        std::fs::remove_dir_all(&tmp_dir).ok();
    }
    let written = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp_dir)
            .with_context(|| format!("cannot create {}", tmp_dir.display()))?;
        save_tensors(&tmp_dir.join("lora.safetensors"), lora)?;
        save_tensors(&tmp_dir.join("optimizer.safetensors"), optimizer)?;
        let state_json = tmp_dir.join("state.json");
        std::fs::write(&state_json, serde_json::to_vec_pretty(info)?)
            .with_context(|| format!("cannot write {}", state_json.display()))?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir)
                .with_context(|| format!("cannot replace {}", final_dir.display()))?;
        }
        std::fs::rename(&tmp_dir, &final_dir)
            .with_context(|| format!("cannot move the state into {}", final_dir.display()))
    })();
    if let Err(e) = written {
        // A full disk or a failed rename: leave no half-written folder behind
        // (the previous state and `latest.json` are untouched).
        let _ = std::fs::remove_dir_all(&tmp_dir);
        return Err(e);
    }
    let latest = Latest {
        folder: folder.clone(),
        step: info.step,
    };
    write_atomic(
        &dir.join("latest.json"),
        &serde_json::to_vec_pretty(&latest)?,
    )?;
    prune(dir, &folder);
    Ok(final_dir)
}

/// Keeps the newest `KEEP` state folders (never the one just written).
fn prune(dir: &Path, keep_folder: &str) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut folders: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    folders.sort();
    let excess = folders.len().saturating_sub(KEEP);
    for f in folders.into_iter().take(excess) {
        if f != keep_folder {
            std::fs::remove_dir_all(dir.join(f)).ok();
        }
    }
}

/// Whether `dir` holds a state to resume from.
pub fn exists(dir: &Path) -> bool {
    dir.join("latest.json").is_file()
}

/// Loads the newest complete state under `dir`.
pub fn load(dir: &Path, device: &Device) -> Result<SavedState> {
    let latest_path = dir.join("latest.json");
    let latest: Latest =
        serde_json::from_slice(&std::fs::read(&latest_path).with_context(|| {
            format!(
                "no training state to resume: {} is missing",
                latest_path.display()
            )
        })?)
        .with_context(|| format!("{} is damaged", latest_path.display()))?;
    let folder = dir.join(&latest.folder);
    let info: StateInfo = serde_json::from_slice(
        &std::fs::read(folder.join("state.json"))
            .with_context(|| format!("cannot read {}", folder.join("state.json").display()))?,
    )
    .with_context(|| format!("{} is damaged", folder.join("state.json").display()))?;
    if info.version != VERSION {
        bail!(
            "{}: state format {} is not supported by this version (expects {VERSION})",
            folder.display(),
            info.version
        );
    }
    let read = |name: &str| {
        let p = folder.join(name);
        candle_core::safetensors::load(&p, device)
            .with_context(|| format!("cannot read {}", p.display()))
    };
    Ok(SavedState {
        info,
        lora: read("lora.safetensors")?,
        optimizer: read("optimizer.safetensors")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_and_prune() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let t = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        for step in [10, 20, 30] {
            let info = StateInfo {
                version: VERSION,
                step,
                skipped_steps: 1,
                consecutive_nonfinite: 0,
                started_at: 5.0,
                fingerprint: "f".into(),
            };
            save(
                &dir,
                &info,
                &[("a".into(), t.clone())],
                &[("m".into(), t.clone())],
            )
            .unwrap();
        }
        let s = load(&dir, &Device::Cpu).unwrap();
        assert_eq!(s.info.step, 30);
        assert_eq!(s.lora["a"].to_vec1::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
        let mut left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["latest.json", "step-000020", "step-000030"]);
        assert!(load(&tmp.path().join("nope"), &Device::Cpu).is_err());
    }

    /// A save that fails midway (here: the step's folder name is taken by a
    /// file, so it cannot be replaced) leaves no temporary folder behind and
    /// the previous state in place.
    #[test]
    fn a_failed_save_leaves_no_temporary_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        let info = |step| StateInfo {
            version: VERSION,
            step,
            skipped_steps: 0,
            consecutive_nonfinite: 0,
            started_at: 0.0,
            fingerprint: "f".into(),
        };
        let tensors = [("a".to_string(), t.clone())];
        save(&dir, &info(1), &tensors, &tensors).unwrap();
        std::fs::write(dir.join("step-000002"), b"in the way").unwrap();
        assert!(save(&dir, &info(2), &tensors, &tensors).is_err());
        let mut left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["latest.json", "step-000001", "step-000002"]);
        assert_eq!(load(&dir, &Device::Cpu).unwrap().info.step, 1);
    }
}
