//! Checks shared by the commands that write a file from other files
//! (`resize`, `merge`, `extract`): never overwrite an input, never replace an
//! existing output unless asked.

use anyhow::{Result, bail};
use std::path::{Path, PathBuf};

/// The absolute form of `p` (its canonical path when it exists; else its
/// parent's canonical path joined with its name).
fn absolute(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match (parent.canonicalize(), p.file_name()) {
        (Ok(d), Some(name)) => d.join(name),
        _ => p.to_path_buf(),
    }
}

/// Refuses `output` when it is one of `inputs` or inside an input folder,
/// when its folder does not exist, or when it exists and `force` is off.
pub fn check_output(output: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    let out = absolute(output);
    for input in inputs {
        let inp = absolute(input);
        if out == inp {
            bail!(
                "{}: the output is the input {}; write to another path",
                output.display(),
                input.display()
            );
        }
        if input.is_dir() && out.starts_with(&inp) {
            bail!(
                "{}: the output is inside the input folder {}; write it elsewhere",
                output.display(),
                input.display()
            );
        }
    }
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        bail!(
            "{}: the folder {} does not exist",
            output.display(),
            dir.display()
        );
    }
    if output.exists() && !force {
        bail!(
            "{} already exists; pass --force to replace it",
            output.display()
        );
    }
    Ok(())
}

/// Refuses an output path that does not end in `.safetensors`.
pub fn require_safetensors(output: &Path) -> Result<()> {
    if output.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!(
            "{}: the output must be a .safetensors file",
            output.display()
        );
    }
    Ok(())
}
