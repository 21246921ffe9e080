//! A workspace: the folder a pipeline runs in, its `.repro/` state and its cache store.
//!
//! ```text
//! .repro/lock                 the writer lock (see cache::lock)
//! .repro/running              the token of a run in progress (left behind by a crash)
//! .repro/statcache            the stat fast path
//! .repro/plans/PIPELINE.json  the pipeline as last loaded (see pipeline::compiled)
//! .repro/state/PIPELINE.jsonl the last record of every stage of a pipeline (see state)
//! .repro/state/PIPELINE.jsonl.corrupt-TIME  a state file that could not be read, set aside
//! .repro/logs/STAGE.log       the latest log of each stage
//! .repro/scratch/STAGE/       a stage's scratch space (kept across interruptions)
//! ```

mod state;

use crate::cache::{lock::WorkspaceLock, Hasher, StatCache, Store};
use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

pub use state::{Entry, OutId, State, StateLog};

pub struct Workspace {
    pub root: PathBuf,
    pub state_dir: PathBuf,
    pub store: Store,
    pub stats: StatCache,
}

/// A pipeline's state as loaded: empty if it has never run here, and also empty, with the
/// problem said, if its file exists but cannot be used. Stages are then matched by the run
/// cache alone, so finished work is restored rather than re-run.
#[derive(Debug, Default)]
pub struct LoadedState {
    pub state: State,
    pub problem: Option<StateProblem>,
    /// There is no log to append to yet (a new pipeline, or a state in the layout before it).
    pub fresh: bool,
    /// The files it was read from, as they were just before: a state read before the workspace
    /// lock was taken is read again if another run has written it since.
    seen: Vec<(PathBuf, Option<FileId>)>,
}

/// (length, modification time, inode) of a file.
type FileId = (u64, i64, i64, u64);

fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.mtime(), m.mtime_nsec(), m.ino()))
}

impl LoadedState {
    /// Whether the state files are still as they were when this was read.
    pub fn unchanged(&self) -> bool {
        self.seen.iter().all(|(path, id)| file_id(path) == *id)
    }
}

/// A state file that exists but cannot be read or parsed.
#[derive(Debug, Clone)]
pub struct StateProblem {
    pub path: PathBuf,
    /// What is wrong with it, e.g. "not valid JSON (truncated?)".
    pub problem: String,
}

impl StateProblem {
    /// `.repro/state/FILE.json is not valid JSON (truncated?)`
    pub fn describe(&self, ws: &Workspace) -> String {
        format!("{} is {}", ws.shown(&self.path), self.problem)
    }
}

/// What happens to the stages of a pipeline whose state file could not be used.
pub const STATE_LOST_CONSEQUENCE: &str =
    "stages are matched by the run cache instead, so finished work is restored, not re-run";

impl Workspace {
    /// Opens (creating if needed) the state folder and the store. The store is `cache_dir`,
    /// else `$REPRO_CACHE`, else `cache/` in the workspace.
    pub fn open(root: &Path, cache_dir: Option<&Path>) -> Result<Workspace> {
        let root = root
            .canonicalize()
            .with_context(|| format!("no workspace folder {}", root.display()))?;
        let store_dir = store_location(&root, cache_dir)?;
        let state_dir = root.join(".repro");
        for sub in ["state", "logs", "scratch"] {
            std::fs::create_dir_all(state_dir.join(sub))
                .with_context(|| format!("cannot create {}", state_dir.join(sub).display()))?;
        }
        let store = Store::open(&store_dir)?;
        let stats = StatCache::load(&state_dir.join("statcache"));
        Ok(Workspace {
            root,
            state_dir,
            store,
            stats,
        })
    }

    pub fn lock(&self, wait: bool, on_wait: impl FnOnce(&str)) -> Result<WorkspaceLock> {
        WorkspaceLock::acquire(&self.state_dir.join("lock"), wait, on_wait)
    }

    pub fn hasher(&self) -> Hasher<'_> {
        Hasher {
            root: &self.root,
            stats: &self.stats,
        }
    }

    /// The state of a pipeline: see [`load_state`].
    pub fn load_state(&self, pipeline_file: &Path) -> LoadedState {
        load_state(&self.state_dir, pipeline_file)
    }

    /// The log that a run appends its finished stages to; `fresh` writes it whole first (and
    /// retires a state file of the layout before the log).
    pub fn state_log(&self, pipeline_file: &Path, state: &State, fresh: bool) -> Result<StateLog> {
        let path = state_path(&self.state_dir, pipeline_file);
        let log = StateLog::open(&path, state, fresh)
            .with_context(|| format!("cannot write {}", path.display()))?;
        if fresh {
            let _ = std::fs::remove_file(path.with_extension("json"));
        }
        Ok(log)
    }

    /// Moves an unusable state file aside (`NAME.corrupt-UNIXTIME`, never deleted) so that a
    /// new one can be written; returns where it went.
    pub fn set_aside_state(&self, bad: &StateProblem) -> Result<PathBuf> {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let name = bad.path.file_name().unwrap_or_default().to_string_lossy();
        let mut dest = bad.path.with_file_name(format!("{name}.corrupt-{secs}"));
        let mut n = 1;
        while dest.exists() {
            dest = bad
                .path
                .with_file_name(format!("{name}.corrupt-{secs}-{n}"));
            n += 1;
        }
        std::fs::rename(&bad.path, &dest).with_context(|| {
            format!(
                "cannot move the unreadable {} aside to {}",
                bad.path.display(),
                dest.display()
            )
        })?;
        Ok(dest)
    }

    /// Every pipeline state file here (`.repro/state/*.jsonl`, and `*.json` of the layout
    /// before the log) and what it holds, or what is wrong with it.
    pub fn state_files(&self) -> Vec<(PathBuf, Result<State, String>)> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(self.state_dir.join("state"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json" || e == "jsonl"))
            .collect();
        paths.sort();
        paths
            .into_iter()
            .filter_map(|p| match read_state_file(&p) {
                Ok(Some(s)) => Some((p, Ok(s))),
                Ok(None) => None,
                Err(e) => Some((p, Err(e))),
            })
            .collect()
    }

    /// The stage keys that some pipeline state here refers to (what `gc --workspace-only`
    /// keeps). Fails, naming them, if a state file cannot be read: its keys are unknown, and
    /// collecting their records would lose finished work.
    pub fn keys_in_use(&self) -> Result<HashSet<String>> {
        let mut keys = HashSet::new();
        let mut bad = Vec::new();
        for (path, state) in self.state_files() {
            match state {
                Ok(s) => keys.extend(s.keys().map(str::to_string)),
                Err(problem) => bad.push(format!("{} is {problem}", self.shown(&path))),
            }
        }
        if !bad.is_empty() {
            bail!(
                "{}; the records its stages use are unknown, so nothing was collected (run its \
                 pipeline once: `repro run` sets the file aside and rebuilds the state from the \
                 run cache)",
                bad.join("; ")
            );
        }
        Ok(keys)
    }

    /// A path as shown to the user: relative to the workspace when inside it.
    pub fn shown(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    /// Saves the stat cache if it learnt anything.
    pub fn save_stats(&self) -> Result<()> {
        if self.stats.is_dirty() {
            self.stats
                .save(&self.state_dir.join("statcache"))
                .context("cannot save the stat cache")?;
        }
        Ok(())
    }

    pub fn log_path(&self, stage: &str) -> PathBuf {
        self.state_dir
            .join("logs")
            .join(format!("{}.log", file_safe(stage)))
    }

    pub fn scratch_dir(&self, stage: &str) -> PathBuf {
        self.state_dir.join("scratch").join(file_safe(stage))
    }
}

/// One state log per pipeline file, however its path is spelt (`./p.yaml`, `x//p.yaml`).
fn state_path(state_dir: &Path, pipeline_file: &Path) -> PathBuf {
    let given = pipeline_file.to_string_lossy();
    let name = crate::pipeline::normalize(&given).unwrap_or_else(|_| given.into_owned());
    state_dir
        .join("state")
        .join(format!("{}.jsonl", file_safe(&name)))
}

/// The state of a pipeline, from the workspace's `state_dir` (`.repro/`), which it only reads:
/// empty if it has never run here; empty with the problem if its file cannot be used (never
/// silently: callers say so, and `repro run` sets it aside). A state in the layout before the
/// log (`PIPELINE.json`) is read if there is no log.
pub fn load_state(state_dir: &Path, pipeline_file: &Path) -> LoadedState {
    let log = state_path(state_dir, pipeline_file);
    let legacy = log.with_extension("json");
    let seen = [&log, &legacy]
        .into_iter()
        .map(|p| (p.clone(), file_id(p)))
        .collect();
    let (path, read) = match State::read(&log) {
        Ok(None) => (legacy.clone(), State::read_legacy(&legacy)),
        other => (log, other),
    };
    match read {
        Ok(state) => LoadedState {
            fresh: state.is_none() || path == legacy,
            state: state.unwrap_or_default(),
            problem: None,
            seen,
        },
        Err(problem) => LoadedState {
            state: State::default(),
            problem: Some(StateProblem { path, problem }),
            fresh: true,
            seen,
        },
    }
}

/// A state file's content (a log, or a legacy `.json`): `None` if there is no such file.
fn read_state_file(path: &Path) -> std::result::Result<Option<State>, String> {
    if path.extension().is_some_and(|e| e == "json") {
        State::read_legacy(path)
    } else {
        State::read(path)
    }
}

/// The store: `cache_dir`, else `$REPRO_CACHE`, else `cache/` in the workspace `root` (which
/// is canonical). It may not be the workspace or hold it: it would hold every output.
pub fn store_location(root: &Path, cache_dir: Option<&Path>) -> Result<PathBuf> {
    let dir = match cache_dir
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("REPRO_CACHE").map(PathBuf::from))
    {
        Some(dir) if dir.is_absolute() => dir,
        Some(dir) => root.join(dir),
        None => root.join("cache"),
    };
    let real = dir.canonicalize().unwrap_or_else(|_| dir.clone());
    let refuse = |why: &str| {
        anyhow::anyhow!(
            "the cache store {} {why}; give the store a folder of its own (--cache DIR)",
            dir.display()
        )
    };
    if root.starts_with(&real) {
        return Err(refuse("is the workspace or a folder holding it"));
    }
    for own in [".repro", ".git"] {
        if real.starts_with(root.join(own)) {
            return Err(refuse(&format!("is inside the workspace's `{own}`")));
        }
    }
    // gc and verify delete and move what they do not recognise: never in someone else's folder.
    if let Ok(entries) = std::fs::read_dir(&real) {
        let foreign: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !Store::ENTRIES.contains(&n.as_str()))
            .take(3)
            .collect();
        if !foreign.is_empty() {
            return Err(refuse(&format!(
                "is not a repro store (it holds `{}`)",
                foreign.join("`, `")
            )));
        }
    }
    Ok(dir)
}

/// A stage or pipeline name as one file name, injectively: two names that differ never share a
/// file. Letters, digits and `@=,._-` stay as they are (so `train@ffn=moe,scale=1` reads as
/// itself); every other byte, `%` itself, and a leading `.` are written `%XX`. A long result
/// keeps a readable head and ends in `~` and the blake3 of the whole name (`~` is always
/// escaped otherwise, so such names cannot collide with short ones).
pub fn file_safe(name: &str) -> String {
    const MAX: usize = 200;
    let mut out = String::with_capacity(name.len());
    for (i, b) in name.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric() || b"@=,_-".contains(&b) || (b == b'.' && i > 0);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.len() > MAX {
        let hash = blake3::hash(name.as_bytes()).to_hex();
        out.truncate(MAX - 65);
        // Never end the head inside a `%XX` escape.
        if let Some(cut) = out[out.len().saturating_sub(2)..].find('%') {
            out.truncate(out.len() - 2 + cut);
        }
        out.push('~');
        out.push_str(&hash);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn file_names_are_injective_and_bounded() {
        let long = "x".repeat(500);
        let names = [
            "a",
            "a_b",
            "a/b",
            "a b",
            "a%2Fb",
            "a%b",
            ".",
            "..",
            "%2E",
            ".hidden",
            "train@ffn=moe,scale=1",
            "train@path=data/x.txt",
            "train@path=data_x.txt",
            "s@v=line\nbreak",
            "s@v=line\nbreak\n",
            "é",
            "~",
            &long,
            &format!("{long}y"),
            &format!("{long}%"),
        ];
        let mut seen: HashMap<String, &str> = HashMap::new();
        for name in names {
            let f = file_safe(name);
            assert!(f.len() <= 200, "{name}: {} bytes", f.len());
            assert!(
                !f.contains('/') && f != "." && f != ".." && !f.starts_with('.'),
                "{f}"
            );
            if let Some(other) = seen.insert(f.clone(), name) {
                panic!("`{name}` and `{other}` share the file name `{f}`");
            }
        }
        assert_eq!(file_safe("train@ffn=moe,scale=1"), "train@ffn=moe,scale=1");
        assert_eq!(file_safe("a/b"), "a%2Fb");
        assert_eq!(file_safe(".."), "%2E.");
    }
}
