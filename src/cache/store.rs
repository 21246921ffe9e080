//! The content-addressed store: objects by blake3, and one record per stage key.
//!
//! ```text
//! cache/objects/ab/cdef…   file contents and folder manifests, read-only
//! cache/records/ab/KEY.json   what a stage key produced (written last, atomically)
//! cache/records/ab/KEY.log    the log of the run that made it
//! cache/tmp/                  writes in flight (removed by gc)
//! cache/corrupt/              objects that failed verification, kept for inspection
//! ```
//!
//! Every write goes to a temp name, is fsynced, then renamed. Every restore re-hashes what it
//! copies, so a corrupted object is caught and the stage runs again instead.

use super::hash::{hash_file, Entry, Snapshot};
use crate::atomic;
use anyhow::{anyhow, Context, Result};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub key: String,
    pub stage: String,
    /// Everything the key was computed from, by name: the basis of `repro status` reasons.
    pub parts: BTreeMap<String, String>,
    pub outs: Vec<OutRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<serde_json::Value>,
    /// Unix seconds when the stage finished.
    pub created: u64,
    pub duration_s: f64,
}

impl Record {
    /// The metrics as flat columns (see [`flatten_metrics`]); empty if the stage has none.
    pub fn flat_metrics(&self) -> IndexMap<String, serde_json::Value> {
        self.metrics
            .as_ref()
            .map(flatten_metrics)
            .unwrap_or_default()
    }
}

/// Nested metrics as flat columns, in order: `{"a": {"b": 1}, "c": 2}` becomes `a.b = 1`,
/// `c = 2`. How `repro show` and the `table` kind both read a stage's metrics.
pub fn flatten_metrics(metrics: &serde_json::Value) -> IndexMap<String, serde_json::Value> {
    fn walk(
        prefix: &str,
        value: &serde_json::Value,
        out: &mut IndexMap<String, serde_json::Value>,
    ) {
        match value {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let mut out = IndexMap::new();
    walk("", metrics, &mut out);
    out
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutRecord {
    pub path: String,
    pub hash: String,
    #[serde(flatten)]
    pub kind: OutKind,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum OutKind {
    File { size: u64, exec: bool },
    Dir { files: u64, size: u64 },
    Link { target: String },
}

/// An object that is missing or whose bytes no longer match its name.
#[derive(Debug, thiserror::Error)]
#[error("cache object {hash} is {problem}")]
pub struct BadObject {
    pub hash: String,
    pub problem: &'static str,
}

pub struct Store {
    root: PathBuf,
    tmp_counter: AtomicU64,
}

impl Store {
    pub fn open(root: &Path) -> Result<Store> {
        for sub in ["objects", "records", "tmp"] {
            fs::create_dir_all(root.join(sub)).with_context(|| {
                format!("cannot create cache folder {}", root.join(sub).display())
            })?;
        }
        Ok(Store {
            root: root.to_path_buf(),
            tmp_counter: AtomicU64::new(0),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn object_path(&self, hash: &str) -> PathBuf {
        self.root.join("objects").join(&hash[..2]).join(&hash[2..])
    }

    fn record_base(&self, key: &str) -> PathBuf {
        self.root.join("records").join(&key[..2]).join(key)
    }

    pub fn record_path(&self, key: &str) -> PathBuf {
        self.record_base(key).with_extension("json")
    }

    pub fn log_path(&self, key: &str) -> PathBuf {
        self.record_base(key).with_extension("log")
    }

    pub fn has_record(&self, key: &str) -> bool {
        self.record_path(key).is_file()
    }

    /// A record, or `None` if absent or unreadable (an unreadable record is as good as none:
    /// the stage runs again and writes a new one).
    pub fn record(&self, key: &str) -> Option<Record> {
        let bytes = fs::read(self.record_path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn put_record(&self, record: &Record) -> Result<()> {
        let path = self.record_path(&record.key);
        let bytes = serde_json::to_vec_pretty(record)?;
        self.write_atomic(&path, true, |f| f.write_all(&bytes))
            .with_context(|| format!("cannot write record {}", path.display()))
    }

    pub fn put_log(&self, key: &str, log: &Path) -> Result<()> {
        let dest = self.log_path(key);
        // A log is not a result: losing it in a power cut costs nothing, so no fsync.
        self.write_atomic(&dest, false, |f| {
            io::copy(&mut File::open(log)?, f).map(|_| ())
        })
        .with_context(|| format!("cannot store log {}", dest.display()))
    }

    /// Stores a workspace out (already hashed as `snap`) and returns its record entry.
    pub fn put_out(&self, workspace: &Path, rel: &str, snap: &Snapshot) -> Result<OutRecord> {
        let full = workspace.join(rel);
        let hash = snap.hash().to_hex().to_string();
        let kind = match snap {
            Snapshot::File { size, exec, .. } => {
                self.put_file(&full, &hash)?;
                OutKind::File {
                    size: *size,
                    exec: *exec,
                }
            }
            Snapshot::Dir {
                entries, manifest, ..
            } => {
                let mut files = 0;
                for e in entries {
                    if let Entry::File { path, hash, .. } = e {
                        self.put_file(&full.join(path), hash)?;
                        files += 1;
                    }
                }
                self.put_bytes(manifest, &hash)?;
                OutKind::Dir {
                    files,
                    size: snap.size(),
                }
            }
            Snapshot::Link { target, .. } => OutKind::Link {
                target: target.clone(),
            },
        };
        Ok(OutRecord {
            path: rel.to_string(),
            hash,
            kind,
        })
    }

    fn put_file(&self, src: &Path, hash: &str) -> Result<()> {
        let dest = self.object_path(hash);
        if dest.exists() {
            return Ok(());
        }
        self.write_atomic(&dest, true, |f| {
            io::copy(&mut File::open(src)?, f).map(|_| ())
        })
        .with_context(|| format!("cannot store {} in the cache", src.display()))
    }

    fn put_bytes(&self, bytes: &[u8], hash: &str) -> Result<()> {
        let dest = self.object_path(hash);
        if dest.exists() {
            return Ok(());
        }
        self.write_atomic(&dest, true, |f| f.write_all(bytes))
            .with_context(|| format!("cannot store object {hash}"))
    }

    /// A write into the store: through `tmp/`, fsynced if `durable`, read-only, renamed in.
    fn write_atomic(
        &self,
        dest: &Path,
        durable: bool,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> io::Result<()> {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()));
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        atomic::write_via(&tmp, dest, durable, |f| {
            fill(f)?;
            f.set_permissions(fs::Permissions::from_mode(0o444))
        })
    }

    /// Copies an out back into the workspace, re-hashing it on the way. A file is put in place
    /// by rename, a folder is built beside its destination and swapped in, so the workspace
    /// never holds half an output.
    pub fn restore_out(&self, workspace: &Path, out: &OutRecord) -> Result<()> {
        let dest = workspace.join(&out.path);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        let staging = sibling_temp(&dest);
        remove_path(&staging)?;
        if let Err(e) = self.fill_staging(out, &staging) {
            let _ = remove_path(&staging);
            return Err(e);
        }
        remove_path(&dest)?;
        fs::rename(&staging, &dest).with_context(|| format!("cannot restore {}", out.path))?;
        Ok(())
    }

    /// Builds an out at `staging`, verifying every file it copies.
    fn fill_staging(&self, out: &OutRecord, staging: &Path) -> Result<()> {
        match &out.kind {
            OutKind::File { exec, .. } => self.restore_file(&out.hash, staging, *exec)?,
            OutKind::Dir { .. } => {
                let manifest = self.read_object(&out.hash)?;
                let entries: Vec<Entry> =
                    serde_json::from_slice(&manifest).map_err(|_| BadObject {
                        hash: out.hash.clone(),
                        problem: "not a folder manifest",
                    })?;
                fs::create_dir_all(staging)?;
                for e in &entries {
                    let target = staging.join(e.path());
                    if let Some(parent) = target.parent() {
                        fs::create_dir_all(parent)?;
                    }
                    match e {
                        Entry::File { hash, exec, .. } => {
                            self.restore_file(hash, &target, *exec)?
                        }
                        Entry::Link { target: to, .. } => std::os::unix::fs::symlink(to, &target)?,
                    }
                }
            }
            OutKind::Link { target } => std::os::unix::fs::symlink(target, staging)?,
        }
        Ok(())
    }

    fn restore_file(&self, hash: &str, dest: &Path, exec: bool) -> Result<()> {
        let src = self.object_path(hash);
        let bad = |problem| {
            anyhow!(BadObject {
                hash: hash.to_string(),
                problem
            })
        };
        if !src.is_file() {
            return Err(bad("missing"));
        }
        let size = fs::copy(&src, dest)?;
        fs::set_permissions(
            dest,
            fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 }),
        )?;
        if hash_file(dest, size)?.to_hex().as_str() != hash {
            let _ = fs::remove_file(dest);
            self.quarantine(hash);
            return Err(bad("corrupt"));
        }
        Ok(())
    }

    fn read_object(&self, hash: &str) -> Result<Vec<u8>> {
        let bytes = fs::read(self.object_path(hash)).map_err(|_| BadObject {
            hash: hash.to_string(),
            problem: "missing",
        })?;
        if blake3::hash(&bytes).to_hex().as_str() != hash {
            self.quarantine(hash);
            return Err(BadObject {
                hash: hash.to_string(),
                problem: "corrupt",
            }
            .into());
        }
        Ok(bytes)
    }

    /// Moves a bad object aside so it can never be restored again.
    pub fn quarantine(&self, hash: &str) {
        let dir = self.root.join("corrupt");
        let _ = fs::create_dir_all(&dir);
        let _ = fs::rename(self.object_path(hash), dir.join(hash));
    }

    /// Every object hash an out refers to (its folder manifest's files included).
    pub fn objects_of(&self, out: &OutRecord) -> Vec<String> {
        match &out.kind {
            OutKind::File { .. } => vec![out.hash.clone()],
            OutKind::Dir { .. } => {
                let mut all = vec![out.hash.clone()];
                if let Ok(bytes) = fs::read(self.object_path(&out.hash)) {
                    if let Ok(entries) = serde_json::from_slice::<Vec<Entry>>(&bytes) {
                        all.extend(entries.into_iter().filter_map(|e| match e {
                            Entry::File { hash, .. } => Some(hash),
                            Entry::Link { .. } => None,
                        }));
                    }
                }
                all
            }
            OutKind::Link { .. } => Vec::new(),
        }
    }

    /// All record keys in the store.
    pub fn record_keys(&self) -> Vec<String> {
        list_two_level(&self.root.join("records"))
            .into_iter()
            .filter_map(|(_, name)| name.strip_suffix(".json").map(str::to_string))
            .collect()
    }

    /// All objects: (hash, path).
    pub fn objects(&self) -> Vec<(String, PathBuf)> {
        list_two_level(&self.root.join("objects"))
            .into_iter()
            .map(|(dir, name)| {
                (
                    format!("{dir}{name}"),
                    self.root.join("objects").join(&dir).join(&name),
                )
            })
            .collect()
    }
}

/// (first-level folder, file name) pairs of a two-level fan-out folder.
fn list_two_level(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for sub in fs::read_dir(dir).into_iter().flatten().flatten() {
        let d = sub.file_name().to_string_lossy().into_owned();
        for f in fs::read_dir(sub.path()).into_iter().flatten().flatten() {
            out.push((d.clone(), f.file_name().to_string_lossy().into_owned()));
        }
    }
    out.sort();
    out
}

/// `dir/.name.repro-tmp`: a staging name beside `path`, on the same filesystem.
pub fn sibling_temp(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.repro-tmp"))
}

/// Removes a file, link or folder if present.
pub fn remove_path(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::hash::Hasher;
    use crate::cache::statcache::StatCache;

    #[test]
    fn metrics_flatten_in_order() {
        let m = serde_json::json!({"loss": 2.5, "eval": {"ppl": 12, "by": {"x": "a"}}, "n": 3});
        let flat = flatten_metrics(&m);
        let keys: Vec<&str> = flat.keys().map(String::as_str).collect();
        assert_eq!(keys, ["loss", "eval.ppl", "eval.by.x", "n"]);
        assert_eq!(flat["eval.by.x"], "a");
    }

    #[test]
    fn outs_round_trip_and_corruption_is_caught() {
        let ws = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let store = Store::open(cache.path()).unwrap();
        let root = ws.path();
        fs::create_dir_all(root.join("out/sub")).unwrap();
        fs::write(root.join("out/a"), b"first").unwrap();
        fs::write(root.join("out/sub/b"), b"second").unwrap();
        fs::write(root.join("single"), b"solo").unwrap();
        let stats = StatCache::default();
        let h = Hasher {
            root,
            stats: &stats,
        };
        let dir = store
            .put_out(root, "out", &h.snapshot("out").unwrap().unwrap())
            .unwrap();
        let file = store
            .put_out(root, "single", &h.snapshot("single").unwrap().unwrap())
            .unwrap();

        // The user edits the workspace copy in place: the stored object is untouched.
        fs::write(root.join("single"), b"edited").unwrap();
        fs::remove_dir_all(root.join("out")).unwrap();
        store.restore_out(root, &dir).unwrap();
        store.restore_out(root, &file).unwrap();
        assert_eq!(fs::read(root.join("out/sub/b")).unwrap(), b"second");
        assert_eq!(fs::read(root.join("single")).unwrap(), b"solo");

        // Corrupt the object behind `single`: restoring fails and the object is set aside.
        let obj = store.object_path(&file.hash);
        fs::set_permissions(&obj, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&obj, b"sol0").unwrap();
        let err = store.restore_out(root, &file).unwrap_err();
        assert!(err.downcast_ref::<BadObject>().is_some(), "{err}");
        assert!(!obj.exists());
        assert_eq!(
            fs::read(root.join("single")).unwrap(),
            b"solo",
            "a failed restore leaves the workspace as it was"
        );
    }
}
