//! The content-addressed store: objects by blake3, and one record per stage key.
//!
//! ```text
//! cache/objects/ab/cdef…   file contents and folder manifests, read-only
//! cache/records/ab/KEY.json   what a stage key produced (written last, atomically)
//! cache/records/ab/KEY.log    the log of the run that made it
//! cache/tmp/                  writes in flight (removed by gc)
//! cache/corrupt/              objects that failed verification, kept for inspection
//! cache/corrupt/records/      record files that could not be read, kept for inspection
//! ```
//!
//! The store checks and collects itself: [`Store::verify`] and [`Store::gc`] return reports
//! that say what was found and what was done; the command line only prints them.
//!
//! Every write goes to a temp name, is fsynced, then renamed. Every restore re-hashes what it
//! copies, so a corrupted object is caught and the stage runs again instead.

use super::hash::{hash_file, Entry, Snapshot};
use crate::atomic;
use anyhow::{anyhow, Context, Result};
use indexmap::IndexMap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
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
    /// The metrics as flat columns beside `beside` (see [`metric_columns`]); empty if the
    /// stage has none.
    pub fn flat_metrics(
        &self,
        beside: &IndexMap<String, serde_json::Value>,
    ) -> IndexMap<String, serde_json::Value> {
        self.metrics
            .as_ref()
            .map(|m| metric_columns(m, beside))
            .unwrap_or_default()
    }
}

/// Metrics as columns of a row that already holds `beside` (the stage, its params): a metric
/// named like one of those, with another value, becomes `metrics.NAME`, so that it can never
/// hide the param (a matrix value, say) that tells two rows apart.
pub fn metric_columns(
    metrics: &serde_json::Value,
    beside: &IndexMap<String, serde_json::Value>,
) -> IndexMap<String, serde_json::Value> {
    flatten_metrics(metrics)
        .into_iter()
        .map(|(k, v)| match beside.get(&k) {
            Some(b) if *b != v => (format!("metrics.{k}"), v),
            _ => (k, v),
        })
        .collect()
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

/// A record file that exists but cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("record {key} is {problem}")]
pub struct UnreadableRecord {
    pub key: String,
    /// What is wrong with it, e.g. "not valid JSON (truncated?)".
    pub problem: String,
}

/// What is wrong with a JSON file that failed to parse, in a few words.
pub fn json_problem(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match e.classify() {
        Category::Eof => "not valid JSON (truncated?)".into(),
        Category::Syntax => format!("not valid JSON (line {}, column {})", e.line(), e.column()),
        Category::Data => format!("valid JSON of the wrong shape ({e})"),
        Category::Io => format!("unreadable ({e})"),
    }
}

/// What `Store::verify` found and did.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub objects: usize,
    pub bytes: u64,
    /// Objects whose bytes do not match their name, or that could not be read.
    pub bad_objects: Vec<BadObjectFound>,
    /// Readable records that refer to objects no longer in the store.
    pub incomplete: Vec<IncompleteRecord>,
    /// Record files that cannot be read or parsed.
    pub unreadable: Vec<UnreadableFound>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.bad_objects.is_empty() && self.incomplete.is_empty() && self.unreadable.is_empty()
    }
}

#[derive(Debug)]
pub struct BadObjectFound {
    pub hash: String,
    /// "corrupt" (its bytes no longer match its name) or "unreadable".
    pub problem: &'static str,
    /// Where it was moved (so it is never restored), or why it could not be.
    pub set_aside: Result<PathBuf, String>,
}

/// A record that can no longer be restored: its stage runs again when its outs are needed.
#[derive(Debug)]
pub struct IncompleteRecord {
    pub key: String,
    pub stage: String,
    /// How many of its objects are missing.
    pub missing: usize,
}

#[derive(Debug)]
pub struct UnreadableFound {
    pub record: UnreadableRecord,
    /// Where the record file was moved (its stage runs again and writes a new one), or why it
    /// could not be.
    pub set_aside: Result<PathBuf, String>,
}

/// What `Store::gc` removed and kept.
#[derive(Debug, Default)]
pub struct GcReport {
    pub records_kept: usize,
    /// Records (and their logs) dropped because no pipeline of the workspace uses them.
    pub records_removed: usize,
    pub objects_removed: usize,
    pub bytes_freed: u64,
    /// Logs whose record is gone, and leftover writes from `tmp/`.
    pub leftovers_removed: usize,
    /// Kept records that cannot be read: the objects only they refer to are collected, since
    /// nothing could restore them. `repro verify` sets such records aside.
    pub unreadable: Vec<UnreadableRecord>,
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
    /// What a store folder holds (`.gitkeep` keeps an empty `cache/` in a repository).
    pub const ENTRIES: [&'static str; 5] = ["objects", "records", "tmp", "corrupt", ".gitkeep"];

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

    /// Whether a record file exists for `key` (it may still be unreadable: see `read_record`).
    pub fn has_record(&self, key: &str) -> bool {
        self.record_path(key).is_file()
    }

    /// The record of `key`: `Ok(None)` if there is none, an error if its file exists but cannot
    /// be read, is not a record, or is the record of another key.
    pub fn read_record(&self, key: &str) -> Result<Option<Record>, UnreadableRecord> {
        let unreadable = |problem: String| UnreadableRecord {
            key: key.to_string(),
            problem,
        };
        let bytes = match fs::read(self.record_path(key)) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(unreadable(format!("unreadable ({e})"))),
        };
        let record: Record =
            serde_json::from_slice(&bytes).map_err(|e| unreadable(json_problem(&e)))?;
        if record.key != key {
            return Err(unreadable(format!(
                "the record of another key ({})",
                record.key
            )));
        }
        Ok(Some(record))
    }

    /// A readable record, or `None` (see `read_record` for why there is none).
    pub fn record(&self, key: &str) -> Option<Record> {
        self.read_record(key).ok().flatten()
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
            let _ = self.quarantine(hash);
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
            let _ = self.quarantine(hash);
            return Err(BadObject {
                hash: hash.to_string(),
                problem: "corrupt",
            }
            .into());
        }
        Ok(bytes)
    }

    /// Moves a bad object to `corrupt/` so it can never be restored again; returns where.
    pub fn quarantine(&self, hash: &str) -> io::Result<PathBuf> {
        let dir = self.root.join("corrupt");
        fs::create_dir_all(&dir)?;
        let dest = dir.join(hash);
        fs::rename(self.object_path(hash), &dest)?;
        Ok(dest)
    }

    /// Moves a record file that cannot be read to `corrupt/records/`; returns where.
    fn quarantine_record(&self, key: &str) -> io::Result<PathBuf> {
        let dir = self.root.join("corrupt").join("records");
        fs::create_dir_all(&dir)?;
        let dest = dir.join(format!("{key}.json"));
        fs::rename(self.record_path(key), &dest)?;
        Ok(dest)
    }

    /// Re-hashes every object and reads every record. Bad objects and unreadable records are
    /// moved to `corrupt/` (never deleted), so they are never restored; records whose objects
    /// are gone are reported (their stages run again when their outs are needed).
    pub fn verify(&self) -> VerifyReport {
        let objects = self.objects();
        let checked: Vec<(u64, Option<&'static str>)> = objects
            .par_iter()
            .map(|(hash, path)| {
                let size = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                let problem = match hash_file(path, size) {
                    Ok(h) if h.to_hex().as_str() == hash => None,
                    Ok(_) => Some("corrupt"),
                    Err(_) => Some("unreadable"),
                };
                (size, problem)
            })
            .collect();
        let mut report = VerifyReport {
            objects: objects.len(),
            bytes: checked.iter().map(|(size, _)| size).sum(),
            ..VerifyReport::default()
        };
        for ((hash, _), (_, problem)) in objects.iter().zip(&checked) {
            if let Some(problem) = problem {
                report.bad_objects.push(BadObjectFound {
                    hash: hash.clone(),
                    problem,
                    set_aside: self.quarantine(hash).map_err(|e| e.to_string()),
                });
            }
        }
        for key in self.record_keys() {
            match self.read_record(&key) {
                Ok(Some(r)) => {
                    let missing = r
                        .outs
                        .iter()
                        .flat_map(|o| self.objects_of(o))
                        .filter(|h| !self.object_path(h).is_file())
                        .count();
                    if missing > 0 {
                        report.incomplete.push(IncompleteRecord {
                            key,
                            stage: r.stage,
                            missing,
                        });
                    }
                }
                Ok(None) => {}
                Err(record) => report.unreadable.push(UnreadableFound {
                    set_aside: self.quarantine_record(&key).map_err(|e| e.to_string()),
                    record,
                }),
            }
        }
        report
    }

    /// Removes every object that no kept record refers to, and leftovers (logs without a
    /// record, writes in flight in `tmp/`). `keep: Some(keys)` also drops the records (and
    /// logs) not in `keys`; `None` keeps every record. The caller holds the workspace lock.
    pub fn gc(&self, keep: Option<&HashSet<String>>) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut referenced: HashSet<String> = HashSet::new();
        for key in self.record_keys() {
            if keep.is_some_and(|k| !k.contains(&key)) {
                for path in [self.record_path(&key), self.log_path(&key)] {
                    match fs::remove_file(&path) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => {
                            return Err(e)
                                .with_context(|| format!("cannot remove {}", path.display()))
                        }
                        _ => {}
                    }
                }
                report.records_removed += 1;
                continue;
            }
            report.records_kept += 1;
            match self.read_record(&key) {
                Ok(Some(r)) => referenced.extend(r.outs.iter().flat_map(|o| self.objects_of(o))),
                Ok(None) => {}
                Err(e) => report.unreadable.push(e),
            }
        }
        for (hash, path) in self.objects() {
            if !referenced.contains(&hash) {
                report.bytes_freed += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
                report.objects_removed += 1;
            }
        }
        let orphan_logs = list_two_level(&self.root.join("records"))
            .into_iter()
            .filter_map(|(_, name)| name.strip_suffix(".log").map(str::to_string))
            .filter(|key| !self.has_record(key))
            .map(|key| self.log_path(&key));
        let in_flight = fs::read_dir(self.root.join("tmp"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path());
        for path in orphan_logs.chain(in_flight) {
            if fs::remove_file(&path).is_ok() {
                report.leftovers_removed += 1;
            }
        }
        Ok(report)
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

    /// All record keys in the store (every `records/ab/KEY.json`, readable or not).
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

    /// A store holding one file out per name (`NAME` containing NAME), each with a record
    /// keyed `kNAME`.
    fn store_with(names: &[&str]) -> (tempfile::TempDir, tempfile::TempDir, Store) {
        let ws = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let store = Store::open(cache.path()).unwrap();
        let stats = StatCache::default();
        let h = Hasher {
            root: ws.path(),
            stats: &stats,
        };
        for name in names {
            fs::write(ws.path().join(name), name.as_bytes()).unwrap();
            let snap = h.snapshot(name).unwrap().unwrap();
            let out = store.put_out(ws.path(), name, &snap).unwrap();
            let key = format!("k{name}");
            store
                .put_record(&Record {
                    key: key.clone(),
                    stage: name.to_string(),
                    parts: BTreeMap::new(),
                    outs: vec![out],
                    metrics: None,
                    created: 0,
                    duration_s: 0.0,
                })
                .unwrap();
            store.put_log(&key, &ws.path().join(name)).unwrap();
        }
        (ws, cache, store)
    }

    fn hash_of(store: &Store, key: &str) -> String {
        store.record(key).unwrap().outs[0].hash.clone()
    }

    fn overwrite(path: &Path, bytes: &[u8]) {
        fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn unreadable_records_are_told_apart_from_missing_ones() {
        let (_ws, _cache, store) = store_with(&["a", "b", "c"]);
        assert!(store.read_record("kzz").unwrap().is_none());
        overwrite(&store.record_path("ka"), b"{\"key\": \"ka\", \"sta");
        overwrite(&store.record_path("kb"), b"[1, 2]");
        let c = fs::read(store.record_path("kc")).unwrap();
        fs::create_dir_all(store.record_path("kd").parent().unwrap()).unwrap();
        fs::write(store.record_path("kd"), c).unwrap();
        let problem = |k| store.read_record(k).unwrap_err().problem;
        assert_eq!(problem("ka"), "not valid JSON (truncated?)");
        assert!(
            problem("kb").starts_with("valid JSON of the wrong shape"),
            "{}",
            problem("kb")
        );
        assert_eq!(problem("kd"), "the record of another key (kc)");
        assert!(store.record("ka").is_none() && store.record("kc").is_some());
    }

    #[test]
    fn verify_sets_aside_bad_objects_and_unreadable_records() {
        let (_ws, cache, store) = store_with(&["a", "b", "c"]);
        let (ha, hb) = (hash_of(&store, "ka"), hash_of(&store, "kb"));
        assert!(store.verify().is_clean());

        overwrite(&store.object_path(&ha), b"A");
        overwrite(&store.record_path("kc"), b"garbage");
        let report = store.verify();
        assert_eq!(report.objects, 3);
        assert_eq!(report.bad_objects.len(), 1);
        let bad = &report.bad_objects[0];
        assert_eq!((bad.hash.as_str(), bad.problem), (ha.as_str(), "corrupt"));
        let moved = bad.set_aside.as_ref().unwrap();
        assert_eq!(moved, &cache.path().join("corrupt").join(&ha));
        assert_eq!(fs::read(moved).unwrap(), b"A", "set aside, not deleted");
        assert!(!store.object_path(&ha).exists());

        let inc: Vec<_> = report
            .incomplete
            .iter()
            .map(|r| (r.key.as_str(), r.missing))
            .collect();
        assert_eq!(inc, [("ka", 1)]);
        assert_eq!(report.unreadable.len(), 1);
        let u = &report.unreadable[0];
        assert_eq!(u.record.key, "kc");
        assert!(
            u.record.problem.starts_with("not valid JSON"),
            "{}",
            u.record.problem
        );
        let moved = u.set_aside.as_ref().unwrap();
        assert_eq!(fs::read(moved).unwrap(), b"garbage");
        assert!(!store.has_record("kc"));

        // What was set aside is not found again; the record that lost its object still is.
        let again = store.verify();
        assert!(again.bad_objects.is_empty() && again.unreadable.is_empty());
        assert_eq!(again.incomplete.len(), 1);
        assert!(
            store.object_path(&hb).is_file(),
            "good objects are untouched"
        );
    }

    #[test]
    fn gc_keeps_what_kept_records_use_and_removes_leftovers() {
        let (_ws, _cache, store) = store_with(&["a", "b", "c"]);
        let (ha, hb, hc) = (
            hash_of(&store, "ka"),
            hash_of(&store, "kb"),
            hash_of(&store, "kc"),
        );
        store
            .put_bytes(b"stray", &blake3::hash(b"stray").to_hex())
            .unwrap();
        fs::write(store.root().join("tmp/123-0"), b"in flight").unwrap();
        fs::remove_file(store.record_path("kc")).unwrap();

        let report = store.gc(None).unwrap();
        assert_eq!(report.records_kept, 2);
        assert_eq!(report.records_removed, 0);
        assert_eq!(report.objects_removed, 2, "the stray object and c's");
        assert_eq!(report.bytes_freed, 6);
        assert_eq!(
            report.leftovers_removed, 2,
            "c's log and the write in flight"
        );
        assert!(!store.object_path(&hc).exists() && !store.log_path("kc").exists());
        assert!(store.object_path(&ha).is_file() && store.log_path("ka").is_file());

        // Keeping only `ka` drops `kb`'s record, log and object.
        let keep: HashSet<String> = ["ka".to_string()].into();
        let report = store.gc(Some(&keep)).unwrap();
        assert_eq!((report.records_kept, report.records_removed), (1, 1));
        assert_eq!(report.objects_removed, 1);
        assert!(!store.has_record("kb") && !store.log_path("kb").exists());
        assert!(!store.object_path(&hb).exists() && store.object_path(&ha).is_file());

        // An unreadable record is reported, not silently treated as absent.
        overwrite(&store.record_path("ka"), b"{");
        let report = store.gc(None).unwrap();
        assert_eq!(report.unreadable.len(), 1);
        assert_eq!(report.unreadable[0].key, "ka");
    }

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
