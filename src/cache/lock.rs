//! One writer per workspace: an exclusive `flock` on `.repro/lock`, held for the whole run.
//! The kernel drops the lock when its holder dies, however it dies, so a lock is never stale.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::Path;

pub struct WorkspaceLock {
    _file: File,
}

impl WorkspaceLock {
    /// Takes the lock. If another run holds it: with `wait`, calls `on_wait` with a description
    /// of the holder and blocks; without, fails naming the holder.
    pub fn acquire(path: &Path, wait: bool, on_wait: impl FnOnce(&str)) -> Result<WorkspaceLock> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        if !try_flock(&file, libc::LOCK_EX | libc::LOCK_NB)? {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() {
                "another repro run"
            } else {
                holder
            };
            if !wait {
                bail!(
                    "the workspace is busy: {holder} holds {} (omit --no-wait to wait for it)",
                    path.display()
                );
            }
            on_wait(holder);
            try_flock(&file, libc::LOCK_EX)?;
        }
        file.set_len(0)?;
        file.rewind()?;
        let args: Vec<String> = std::env::args().collect();
        write!(file, "pid {} ({})", std::process::id(), args.join(" "))?;
        Ok(WorkspaceLock { _file: file })
    }
}

fn try_flock(file: &File, op: libc::c_int) -> Result<bool> {
    loop {
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(err).context("cannot lock the workspace"),
        }
    }
}
