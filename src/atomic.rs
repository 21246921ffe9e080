//! Atomic file writes: fill a temp file, optionally fsync it, rename it over the destination.
//! A reader sees the old file or the new one, never half of one.
//!
//! Shared by both halves (the store and workspace state, and the stage kinds' checkpoints,
//! shards and downloads), so there is one way to do it.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `dest` through `tmp` (same filesystem). `fill` writes the content and may set the
/// file's permissions; `durable` fsyncs before the rename. The temp file is removed on failure.
pub fn write_via(
    tmp: &Path,
    dest: &Path,
    durable: bool,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let result = (|| {
        let mut f = File::create(tmp)?;
        fill(&mut f)?;
        if durable {
            f.sync_all()?;
        }
        drop(f);
        std::fs::rename(tmp, dest)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// Writes `bytes` to `path` through a temp file beside it.
pub fn write(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    write_via(&temp_beside(path), path, durable, |f| f.write_all(bytes))
}

/// Puts a file that is already complete at `tmp` (written by another program, such as a
/// download) in place at `dest` (same filesystem), fsyncing it first if `durable`.
pub fn rename_into(tmp: &Path, dest: &Path, durable: bool) -> io::Result<()> {
    if durable {
        File::open(tmp)?.sync_all()?;
    }
    std::fs::rename(tmp, dest)
}

/// `dir/.name.PID-N.tmp`: unique per process and call, on the destination's filesystem.
fn temp_beside(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}-{n}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_cleans_up_after_a_failed_fill() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("state.json");
        write(&dest, b"first", true).unwrap();
        write(&dest, b"second", false).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"second");
        let tmp = dir.path().join("t");
        let err = write_via(&tmp, &dest, true, |_| Err(io::Error::other("disk full")));
        assert!(err.is_err());
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            b"second",
            "a failed write leaves the old file"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("state.json")],
            "no temp file is left behind"
        );
    }

    #[test]
    fn rename_into_replaces_the_destination() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, dest) = (dir.path().join("download"), dir.path().join("pkg.tgz"));
        std::fs::write(&dest, b"old").unwrap();
        std::fs::write(&tmp, b"new").unwrap();
        rename_into(&tmp, &dest, true).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert!(!tmp.exists());
        assert!(
            rename_into(&tmp, &dest, true).is_err(),
            "a missing source is an error"
        );
    }
}
