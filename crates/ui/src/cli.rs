//! Running `sd-lora` sub-commands as child processes: the app offers what
//! the CLI does, with the CLI's own checks and messages, and nothing else —
//! the sub-command and every flag are fixed here, only values come from the
//! page (and paths among them were confined to the roots first).

use crate::AppState;
use crate::error::ApiError;
use std::ffi::OsString;
use std::process::Stdio;

/// What a finished sub-command printed.
#[derive(Debug)]
pub struct CliRun {
    /// Exit code (None when killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// The CLI's error messages (its `error: …` lines), else its whole
    /// stderr, else a note of the exit status.
    pub fn message(&self) -> String {
        // The error is the last thing the CLI prints; it may span lines.
        if let Some(at) = self.stderr.find("error: ") {
            self.stderr[at + "error: ".len()..].trim_end().to_string()
        } else if !self.stderr.trim().is_empty() {
            self.stderr.trim().to_string()
        } else {
            format!("sd-lora stopped with status {:?}", self.code)
        }
    }

    /// The failure as a 400 naming the config key the CLI named, if any.
    pub fn error(&self) -> ApiError {
        let message = self.message();
        let key = key_of(&message);
        let e = ApiError::bad(message);
        match key {
            Some(k) => e.with_key(k),
            None => e,
        }
    }
}

/// The config key a CLI message starts with: the CLI writes errors about a
/// key as `` `train.steps` … ``.
pub fn key_of(message: &str) -> Option<String> {
    let rest = message.strip_prefix('`')?;
    let key = &rest[..rest.find('`')?];
    let section = key.split('.').next()?;
    (sd_lora_train::config::SECTIONS.contains(&section) && key.contains('.'))
        .then(|| key.to_string())
}

/// Runs `sd-lora ARGS` in the first root and waits for it.
pub async fn run(state: &AppState, args: &[OsString]) -> Result<CliRun, ApiError> {
    let out = tokio::process::Command::new(&state.exe)
        .args(args)
        .current_dir(state.roots.base())
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| ApiError::internal(format!("cannot run {}: {e}", state.exe.display())))?;
    Ok(CliRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `args` as a shell command line, for showing (single-quoted where needed).
pub fn command_line(args: &[OsString]) -> String {
    let mut parts = vec!["sd-lora".to_string()];
    for a in args {
        parts.push(shell_quote(&a.to_string_lossy()));
    }
    parts.join(" ")
}

/// `s` quoted for a POSIX shell when it holds anything but plain characters.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_from_cli_messages() {
        assert_eq!(
            key_of("`train.steps` in the command line: invalid value").as_deref(),
            Some("train.steps")
        );
        assert_eq!(
            key_of("`dataset.subsets[0].path` = \"x\": no such folder").as_deref(),
            Some("dataset.subsets[0].path")
        );
        assert_eq!(key_of("no usable images found"), None);
        assert_eq!(key_of("`foo` is odd"), None);
    }

    #[test]
    fn command_lines_are_quoted() {
        let args: Vec<OsString> = ["train", "--set", "model.path=\"builtin:tiny\"", "it's"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(
            command_line(&args),
            "sd-lora train --set 'model.path=\"builtin:tiny\"' 'it'\\''s'"
        );
    }
}
