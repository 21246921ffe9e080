//! A workspace: the folder a pipeline runs in, its `.repro/` state and its cache store.
//!
//! ```text
//! .repro/lock                 the writer lock (see cache::lock)
//! .repro/running              the token of a run in progress (left behind by a crash)
//! .repro/statcache            the stat fast path
//! .repro/state/PIPELINE.json  the last record of every stage of a pipeline
//! .repro/logs/STAGE.log       the latest log of each stage
//! .repro/scratch/STAGE/       a stage's scratch space (kept across interruptions)
//! ```

use crate::atomic;
use crate::cache::{lock::WorkspaceLock, Hasher, Record, StatCache, Store};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct Workspace {
    pub root: PathBuf,
    pub state_dir: PathBuf,
    pub store: Store,
    pub stats: StatCache,
}

/// The last record of each stage of one pipeline in this workspace.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub stages: BTreeMap<String, Record>,
}

impl Workspace {
    /// Opens (creating if needed) the state folder and the store. The store is `cache_dir`,
    /// else `$REPRO_CACHE`, else `cache/` in the workspace.
    pub fn open(root: &Path, cache_dir: Option<&Path>) -> Result<Workspace> {
        let root = root
            .canonicalize()
            .with_context(|| format!("no workspace folder {}", root.display()))?;
        let state_dir = root.join(".repro");
        for sub in ["state", "logs", "scratch"] {
            std::fs::create_dir_all(state_dir.join(sub))
                .with_context(|| format!("cannot create {}", state_dir.join(sub).display()))?;
        }
        let cache = match cache_dir
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("REPRO_CACHE").map(PathBuf::from))
        {
            Some(dir) if dir.is_absolute() => dir,
            Some(dir) => root.join(dir),
            None => root.join("cache"),
        };
        let store = Store::open(&cache)?;
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

    fn state_path(&self, pipeline_file: &Path) -> PathBuf {
        self.state_dir.join("state").join(format!(
            "{}.json",
            file_safe(&pipeline_file.to_string_lossy())
        ))
    }

    pub fn load_state(&self, pipeline_file: &Path) -> State {
        std::fs::read(self.state_path(pipeline_file))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save_state(&self, pipeline_file: &Path, state: &State) -> Result<()> {
        let path = self.state_path(pipeline_file);
        atomic::write(&path, &serde_json::to_vec(state)?, true)
            .with_context(|| format!("cannot write {}", path.display()))?;
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

/// A stage or file name made safe to use as one path component.
pub fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "@=,._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}
