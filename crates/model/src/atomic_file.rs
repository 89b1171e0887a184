//! Writing a file so that readers, and a crash, never see it half-written:
//! the bytes go to a temporary file beside it (same folder, so the same file
//! system), are synced, and the temporary file is renamed over the target.
//! On failure the temporary file is removed. Every file sd-lora writes
//! (LoRAs, merged checkpoints, training state, logs, images) goes through
//! here.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// A fresh temporary path beside `path`: `.NAME.tmp-PID-NANOS` in its folder.
pub fn temporary_beside(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    dir.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()))
}

/// Writes `path` atomically with what `write` puts into the (buffered)
/// writer. I/O failures become errors through `io_error`, which is given
/// `path` (the file the user asked for, not the temporary one).
pub fn write_with<E>(
    path: &Path,
    io_error: impl Fn(&Path, io::Error) -> E,
    write: impl FnOnce(&mut dyn Write) -> Result<(), E>,
) -> Result<(), E> {
    let tmp = temporary_beside(path);
    let result = (|| {
        let file = File::create(&tmp).map_err(|e| io_error(path, e))?;
        let mut w = BufWriter::new(file);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| io_error(path, e.into_error()))?;
        file.sync_all().map_err(|e| io_error(path, e))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(|e| io_error(path, e))
    })();
    if result.is_err() {
        // Best effort: do not leave the partial temporary file behind.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_with(path, |_, e| e, |w| w.write_all(bytes))
}
