//! Problems found while reading a dataset.
//!
//! Nothing a user puts in a dataset folder may stop a scan or panic: each
//! broken file becomes one [`Problem`] naming the file, how bad it is, and
//! what to do about it, and the scan goes on with the good files.

use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// How much a problem matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The file is used, but something about it is probably not what the user meant.
    Warning,
    /// The file (or folder) is not used.
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// Serialises a path as text even when it is not valid UTF-8 (file names on
/// Linux may be any bytes; a report must never fail because of one).
pub fn serialize_path_lossy<S: serde::Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string_lossy())
}

/// One problem with one file or folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The file or folder concerned.
    #[serde(serialize_with = "serialize_path_lossy")]
    pub path: PathBuf,
    /// Whether the file is still used.
    pub severity: Severity,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl Problem {
    pub(crate) fn error(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Problem {
            path: path.into(),
            severity: Severity::Error,
            message: message.into(),
        }
    }

    pub(crate) fn warning(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Problem {
            path: path.into(),
            severity: Severity::Warning,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.severity,
            self.path.display(),
            self.message
        )
    }
}
