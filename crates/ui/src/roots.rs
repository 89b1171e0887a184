//! The folders the web app may touch, and the confinement of every path the
//! page sends to them: a path is made absolute (relative paths start at the
//! first root), any `..` is refused outright, and the deepest part that
//! exists is canonicalised (following symlinks) before it is compared with
//! the canonical roots — so neither `..` nor a symlink can lead outside.

use crate::error::ApiError;
use anyhow::{Context, Result};
use std::path::{Component, Path, PathBuf};

/// The allowed folders, canonical.
#[derive(Debug, Clone)]
pub struct Roots {
    roots: Vec<PathBuf>,
}

impl Roots {
    /// Roots from folders that exist (a missing one other than the output
    /// folder, which is made when first needed, is an error).
    pub fn new(dirs: &[PathBuf]) -> Result<Self> {
        let mut roots: Vec<PathBuf> = Vec::new();
        for d in dirs {
            let canon = match d.canonicalize() {
                Ok(c) => c,
                Err(_) if d.file_name().is_some_and(|n| n == "output") => {
                    canonical_prefix(d).with_context(|| format!("--root {}", d.display()))?
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "--root {}: no such folder; give a folder that exists",
                            d.display()
                        )
                    });
                }
            };
            if !roots.iter().any(|r| canon.starts_with(r)) {
                roots.retain(|r| !r.starts_with(&canon));
                roots.push(canon);
            }
        }
        anyhow::ensure!(!roots.is_empty(), "no root folder");
        Ok(Roots { roots })
    }

    /// The roots, the first being where relative paths start.
    pub fn list(&self) -> &[PathBuf] {
        &self.roots
    }

    /// The folder relative paths start from.
    pub fn base(&self) -> &Path {
        &self.roots[0]
    }

    /// `path` made absolute and checked to lie inside a root. `what` names
    /// the value in messages ("dataset folder", "model.path").
    pub fn resolve(&self, path: &str, what: &str) -> Result<PathBuf, ApiError> {
        let trimmed = path.trim();
        if trimmed.is_empty() {
            return Err(ApiError::bad(format!("{what}: no path given")));
        }
        if trimmed.contains('\0') {
            return Err(ApiError::bad(format!(
                "{what}: the path holds a NUL character"
            )));
        }
        let p = Path::new(trimmed);
        if p.components().any(|c| c == Component::ParentDir) {
            return Err(ApiError::forbidden(format!(
                "{what}: {trimmed}: paths with `..` are refused; give the folder itself"
            )));
        }
        let joined = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base().join(p)
        };
        let canon = canonical_prefix(&joined)
            .map_err(|e| ApiError::bad(format!("{what}: {trimmed}: {e:#}")))?;
        if self.roots.iter().any(|r| canon.starts_with(r)) {
            Ok(canon)
        } else {
            Err(ApiError::forbidden(format!(
                "{what}: {trimmed} is outside the folders this app may use ({}); start `sd-lora ui --root DIR` to allow another folder",
                self.roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }
}

/// `p` with its deepest existing ancestor canonicalised and the rest (which
/// does not exist, so holds no symlink) appended. `p` is absolute and has
/// no `..`.
fn canonical_prefix(p: &Path) -> Result<PathBuf> {
    let mut existing = p.to_path_buf();
    let mut rest = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(c) => {
                let mut out = c;
                for part in rest.iter().rev() {
                    out.push(part);
                }
                return Ok(out);
            }
            Err(_) => {
                let name = existing
                    .file_name()
                    .map(|n| n.to_os_string())
                    .context("no part of the path exists")?;
                rest.push(name);
                if !existing.pop() {
                    anyhow::bail!("no part of the path exists");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Roots) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("data/sub")).unwrap();
        std::fs::create_dir_all(t.path().join("secret")).unwrap();
        std::fs::write(t.path().join("secret/key.txt"), "x").unwrap();
        let roots = Roots::new(&[root]).unwrap();
        (t, roots)
    }

    /// Inside paths resolve; relative ones start at the first root; a path
    /// that does not exist yet (an output file) resolves through its parent.
    #[test]
    fn inside_paths_resolve() {
        let (t, roots) = setup();
        let base = t.path().join("root").canonicalize().unwrap();
        assert_eq!(roots.resolve("data", "x").unwrap(), base.join("data"));
        assert_eq!(
            roots
                .resolve(&base.join("data/sub").to_string_lossy(), "x")
                .unwrap(),
            base.join("data/sub")
        );
        assert_eq!(
            roots.resolve("data/new/out.safetensors", "x").unwrap(),
            base.join("data/new/out.safetensors")
        );
    }

    /// `..`, absolute paths elsewhere and symlinks out are refused with 403.
    #[test]
    fn escapes_are_refused() {
        let (t, roots) = setup();
        for p in ["../secret", "data/../../secret/key.txt", "/etc/passwd"] {
            let e = roots.resolve(p, "dataset folder").unwrap_err();
            assert_eq!(
                e.status,
                axum::http::StatusCode::FORBIDDEN,
                "{p}: {}",
                e.message
            );
        }
        let abs = t.path().join("secret").to_string_lossy().into_owned();
        assert!(
            roots
                .resolve(&abs, "x")
                .unwrap_err()
                .message
                .contains("outside the folders")
        );
        #[cfg(unix)]
        {
            let link = t.path().join("root/data/link");
            std::os::unix::fs::symlink(t.path().join("secret"), &link).unwrap();
            let e = roots.resolve("data/link/key.txt", "x").unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::FORBIDDEN);
            let e = roots.resolve("data/link/new.txt", "x").unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::FORBIDDEN);
        }
        assert_eq!(
            roots.resolve("", "x").unwrap_err().status,
            axum::http::StatusCode::BAD_REQUEST
        );
    }
}
