//! The Python scripts the benchmarks run (bench/*.py), built into the binary so that a bench
//! runs from any directory, written to a temporary file for as long as they are needed.

use std::path::{Path, PathBuf};

/// One embedded script on disk; removed when dropped.
pub struct Script {
    path: PathBuf,
}

impl Script {
    /// Writes `text` to a file of the temporary directory named after `name` and this process.
    pub fn write(name: &str, text: &str) -> std::io::Result<Script> {
        let path = std::env::temp_dir().join(format!("repro-{}-{name}", std::process::id()));
        std::fs::write(&path, text)?;
        Ok(Script { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
