//! Running a pipeline: stages start as soon as their upstreams are done and a job slot and their
//! resources are free; each is skipped, restored from the cache or run; a failure stops only its
//! descendants; Ctrl-C stops everything and records nothing for what was stopped.
//!
//! `schedule` decides when each stage starts; `stage` carries out one stage (skip, restore or
//! run, then store and record).

pub mod plan;
pub mod report;
pub mod runner;
mod schedule;
pub mod signals;
pub mod slurm;
pub mod spawn;
mod stage;

use crate::pipeline::{Action, Pipeline, Stage};
use crate::workspace::Workspace;
use plan::KindVersion;
use runner::Runner;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub jobs: usize,
    /// Capacity of each resource; a resource not named here has the default of `capacity`.
    pub resources: BTreeMap<String, u64>,
    pub keep_going: bool,
    pub selected: Vec<bool>,
    pub forced: Vec<bool>,
    /// List stages that were already up to date.
    pub verbose: bool,
    /// Lines of a failed stage's log to print under its status line.
    pub log_lines: usize,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub ran: usize,
    pub restored: usize,
    pub skipped: usize,
    pub failed: Vec<String>,
    pub blocked: usize,
    pub interrupted: bool,
}

/// Default capacity of a resource the user did not size: GPUs are counted, memory and cores
/// are the machine's, a time limit is no slot, anything else is one at a time.
pub fn default_capacity(resource: &str) -> u64 {
    match resource {
        "gpu" => std::fs::read_dir("/proc/driver/nvidia/gpus")
            .map(|d| d.count() as u64)
            .unwrap_or(0)
            .max(1),
        "memory" => physical_memory_mib(),
        // A time limit, which every stage may have.
        "time" => u64::MAX,
        "cores" => std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1),
        _ => 1,
    }
}

fn physical_memory_mib() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages.max(0) as u64 * size.max(0) as u64) >> 20
}

pub struct Executor<'a> {
    pub ws: &'a Workspace,
    pub pipeline: &'a Pipeline,
    pub kinds: &'a (dyn KindVersion + Sync),
    pub runner: &'a dyn Runner,
    /// The program that runs built-in kinds (`repro __stage`).
    pub stage_program: Vec<String>,
}

/// A crash point for tests: with `REPRO_FAILPOINT=NAME` the process kills itself at the point
/// named NAME, as a power cut or `kill -9` would, so tests can show that a crash between any two
/// writes leaves the store and the workspace valid.
pub(crate) fn failpoint(name: &str) {
    if std::env::var_os("REPRO_FAILPOINT").is_some_and(|v| v == name) {
        // SAFETY: signalling our own process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// [`failpoint`] for a write: with `REPRO_FAILPOINT=NAME` the first half of `bytes` is written
/// to `file` before the process kills itself, as a crash in the middle of the write would.
pub(crate) fn failpoint_torn(name: &str, file: &mut std::fs::File, bytes: &[u8]) {
    if std::env::var_os("REPRO_FAILPOINT").is_some_and(|v| v == name) {
        use std::io::Write;
        let _ = file.write_all(&bytes[..bytes.len() / 2]);
        failpoint(name);
    }
}

/// The parameters that describe a stage in tables: its matrix values, its `with` scalars and
/// the params it references. A `with` value that names one of its inputs (`tokens:
/// data/tokens`) is left out: an input is described by its content, which is in the key, and
/// its name would hide a metric of the same name (a train stage's `tokens` count).
pub fn stage_params(stage: &Stage) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    for (k, v) in &stage.used_params {
        out.insert(k.clone(), v.clone());
    }
    if let Action::Uses { with, .. } = &stage.action {
        let is_input = |v: &serde_json::Value| {
            v.as_str()
                .and_then(|p| crate::pipeline::normalize(p).ok())
                .is_some_and(|p| stage.deps.contains(&p))
        };
        for (k, v) in with {
            if !v.is_object() && !v.is_array() && !is_input(v) {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    for (k, v) in &stage.matrix {
        out.insert(k.clone(), v.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{Kinds, Pipeline};
    use serde_json::{json, Map, Value};

    /// A kind whose `tokens` parameter is an input path.
    struct ReadsTokens;

    impl Kinds for ReadsTokens {
        fn inputs(&self, _: &str, with: &Map<String, Value>) -> Result<Vec<String>, String> {
            Ok(with
                .get("tokens")
                .and_then(Value::as_str)
                .map(String::from)
                .into_iter()
                .collect())
        }
    }

    #[test]
    fn a_stages_input_paths_are_not_among_its_table_params() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data/tokens")).unwrap();
        let source =
            "params: {lr: 0.1}\nstages:\n  t:\n    uses: train\n    matrix: {s: [1]}\n    \
                      with: {tokens: ./data/tokens, lr: '${params.lr}', steps: 5, label: data}\n";
        let p = Pipeline::parse(
            source,
            std::path::Path::new("repro.yaml"),
            dir.path(),
            &Default::default(),
            &ReadsTokens,
        )
        .unwrap();
        let params = stage_params(&p.stages[0]);
        assert_eq!(p.stages[0].deps, ["data/tokens"]);
        assert_eq!(
            Value::Object(params),
            json!({"lr": 0.1, "steps": 5, "label": "data", "s": 1}),
            "every scalar but the input path"
        );
    }
}
