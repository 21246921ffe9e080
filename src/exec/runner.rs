//! Runners start a stage's process and wait for it. `LocalRunner` runs on this machine; a
//! cluster runner (Slurm) implements the same trait.

use super::spawn;
use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A process to run for a stage.
#[derive(Debug, Clone)]
pub struct Job {
    pub stage: String,
    /// The stage key the job computes the outs of.
    pub key: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// stdout and stderr go here.
    pub log: PathBuf,
    /// What the stage asked for (`gpu`, `cores`, `memory` in MiB, …): a cluster runner asks
    /// the cluster for it.
    pub resources: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Success,
    Code(i32),
    Signal(i32),
    /// Ended without an exit code, for the reason given (a cluster job's TIMEOUT, …).
    Failed(String),
    /// Stopped because the run was interrupted.
    Interrupted,
    /// Cancelled because another stage failed and the run stops (no `--keep-going`).
    Cancelled,
}

pub trait Runner: Send + Sync {
    /// Runs `job` to completion.
    fn run(&self, job: &Job) -> io::Result<Exit>;
    /// Stops every job of this run (Ctrl-C): nothing they did will be recorded.
    fn interrupt(&self);
    /// Another stage failed and the run stops (no `--keep-going`). A cluster runner cancels
    /// the jobs it submitted, which could otherwise hold the queue for hours; stages running
    /// here finish, and what they make is kept.
    fn stop_after_failure(&self) {}
    /// Whether the stage already ran to success with this key outside this run, its outs left
    /// in place to be stored as they are (a Slurm job of a killed run, waited for with
    /// `--adopt`).
    fn adopted(&self, _stage: &str, _key: &str) -> bool {
        false
    }
}

/// Runs each job in its own process group, so that stopping a stage stops everything it
/// started. The job's leader gets SIGKILL if repro dies, and leftovers of a crashed run are
/// found by the token in their environment (see `kill_leftovers`).
#[derive(Default)]
pub struct LocalRunner {
    groups: Arc<Mutex<HashSet<i32>>>,
    interrupted: AtomicBool,
}

/// Grace period between SIGTERM and SIGKILL on interrupt.
const GRACE: Duration = Duration::from_secs(3);

impl Runner for LocalRunner {
    fn run(&self, job: &Job) -> io::Result<Exit> {
        let log = File::create(&job.log)?;
        // Not std's Command: its pre_exec closure (for PR_SET_PDEATHSIG) makes it fork, whose
        // cost grows with repro's memory; `spawn` clones without copying it and does the same.
        // Prepared outside the lock; its errors count only if the run was not interrupted.
        let prepared = spawn::prepare(&job.argv, &job.env, &job.cwd, log.as_fd());
        drop(log);
        let pid = {
            let mut groups = self.groups.lock().expect("runner lock");
            if self.interrupted.load(Ordering::SeqCst) {
                return Ok(Exit::Interrupted);
            }
            let pid = prepared?.spawn()?;
            groups.insert(pid);
            pid
        };
        let status = spawn::wait(pid);
        self.groups.lock().expect("runner lock").remove(&pid);
        let status = status?;
        if self.interrupted.load(Ordering::SeqCst) && !status.success() {
            return Ok(Exit::Interrupted);
        }
        Ok(match (status.code(), status.signal()) {
            (Some(0), _) => Exit::Success,
            (Some(c), _) => Exit::Code(c),
            (None, Some(s)) => Exit::Signal(s),
            (None, None) => Exit::Code(-1),
        })
    }

    fn interrupt(&self) {
        let groups: Vec<i32> = {
            let guard = self.groups.lock().expect("runner lock");
            self.interrupted.store(true, Ordering::SeqCst);
            guard.iter().copied().collect()
        };
        for &g in &groups {
            // SAFETY: signalling a process group we created.
            unsafe { libc::kill(-g, libc::SIGTERM) };
        }
        let live = Arc::clone(&self.groups);
        std::thread::spawn(move || {
            std::thread::sleep(GRACE);
            for g in live.lock().expect("runner lock").iter() {
                unsafe { libc::kill(-g, libc::SIGKILL) };
            }
        });
    }
}

/// Kills the process groups of processes whose environment carries `REPRO_RUN=token`: what a
/// crashed run left behind. Returns how many processes were found.
pub fn kill_leftovers(token: &str) -> usize {
    let needle = format!("REPRO_RUN={token}");
    let mut found = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|&b| b == 0)
            .any(|var| var == needle.as_bytes())
        {
            found += 1;
            // SAFETY: getpgid/kill on a pid we just found; a vanished pid only makes them fail.
            unsafe {
                let pgid = libc::getpgid(pid);
                if pgid > 1 {
                    libc::kill(-pgid, libc::SIGKILL);
                }
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    found
}
