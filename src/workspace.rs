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

use crate::cache::{atomic, lock::WorkspaceLock, Hasher, Record, StatCache, Store};
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
        let store = Store::open(&store_location(&root, cache_dir))?;
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

/// The store: `cache_dir`, else `$REPRO_CACHE`, else `cache/` in the workspace `root`.
pub fn store_location(root: &Path, cache_dir: Option<&Path>) -> PathBuf {
    match cache_dir
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("REPRO_CACHE").map(PathBuf::from))
    {
        Some(dir) if dir.is_absolute() => dir,
        Some(dir) => root.join(dir),
        None => root.join("cache"),
    }
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
