//! Content hashes of workspace paths with blake3.
//!
//! A file is the hash of its bytes (memory-mapped, and multi-threaded when large). A folder is
//! the hash of its manifest: the sorted list of relative paths with each file's hash, size and
//! executable bit. Symlinks are deliberate: a link that resolves to a file inside the workspace
//! is hashed by the file's content; any other link is recorded by its target text and never
//! followed, so nothing outside the workspace is read and no link cycle can loop.

use super::statcache::{now_ns, FileStamp, StatCache};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Files this large are hashed on several threads.
const PARALLEL_HASH_BYTES: u64 = 4 << 20;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Entry {
    File {
        path: String,
        hash: String,
        size: u64,
        exec: bool,
    },
    Link {
        path: String,
        target: String,
    },
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::File { path, .. } | Entry::Link { path, .. } => path,
        }
    }
}

/// What a workspace path holds, with its content hash.
#[derive(Clone, Debug)]
pub enum Snapshot {
    File {
        hash: blake3::Hash,
        size: u64,
        exec: bool,
    },
    /// `manifest` is the canonical JSON of `entries`; `hash` is its blake3.
    Dir {
        hash: blake3::Hash,
        entries: Vec<Entry>,
        manifest: Vec<u8>,
    },
    Link {
        hash: blake3::Hash,
        target: String,
    },
}

impl Snapshot {
    pub fn hash(&self) -> blake3::Hash {
        match self {
            Snapshot::File { hash, .. }
            | Snapshot::Dir { hash, .. }
            | Snapshot::Link { hash, .. } => *hash,
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Snapshot::File { size, .. } => *size,
            Snapshot::Dir { entries, .. } => entries
                .iter()
                .map(|e| {
                    if let Entry::File { size, .. } = e {
                        *size
                    } else {
                        0
                    }
                })
                .sum(),
            Snapshot::Link { .. } => 0,
        }
    }
}

pub struct Hasher<'a> {
    pub root: &'a Path,
    pub stats: &'a StatCache,
}

impl Hasher<'_> {
    /// Snapshot of a workspace-relative path; `Ok(None)` if nothing is there.
    pub fn snapshot(&self, rel: &str) -> io::Result<Option<Snapshot>> {
        let full = self.root.join(rel);
        let meta = match std::fs::symlink_metadata(&full) {
            Ok(m) => m,
            // `o/x` where `o` is a file is as absent as a path that is not there.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        if meta.file_type().is_symlink() {
            return match self.link_target_inside(&full)? {
                Some(target) if target.is_file() => self.file_snapshot(rel, &target).map(Some),
                _ => Ok(Some(link_snapshot(&full)?)),
            };
        }
        if meta.is_dir() {
            return self.dir_snapshot(rel, &full).map(Some);
        }
        // Not a link: what lstat said is what stat would say.
        self.file_snapshot_of(rel, &full, meta).map(Some)
    }

    /// The hash alone, as a dep contributes it to a key.
    pub fn hash(&self, rel: &str) -> io::Result<Option<blake3::Hash>> {
        Ok(self.snapshot(rel)?.map(|s| s.hash()))
    }

    fn file_snapshot(&self, rel: &str, full: &Path) -> io::Result<Snapshot> {
        self.file_snapshot_of(rel, full, std::fs::metadata(full)?)
    }

    /// [`Self::file_snapshot`] given the file's metadata.
    fn file_snapshot_of(
        &self,
        rel: &str,
        full: &Path,
        meta: std::fs::Metadata,
    ) -> io::Result<Snapshot> {
        if !meta.is_file() {
            // Opening a fifo would block for ever, and a device may never end.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "`{rel}` is a {}: only files, folders and links can be hashed",
                    special_kind(&meta)
                ),
            ));
        }
        let stamp = FileStamp::of(&meta);
        let exec = meta.permissions().mode() & 0o111 != 0;
        let hash = match self.stats.get(rel, &stamp) {
            Some(h) => h,
            None => {
                let started = now_ns();
                let h = hash_file(full, stamp.size)?;
                // Only a file that did not change while being read may enter the cache.
                if FileStamp::of(&std::fs::metadata(full)?) == stamp {
                    self.stats.put(rel, stamp, started, h);
                }
                h
            }
        };
        Ok(Snapshot::File {
            hash,
            size: stamp.size,
            exec,
        })
    }

    fn dir_snapshot(&self, rel: &str, full: &Path) -> io::Result<Snapshot> {
        let mut found = Vec::new();
        walk(full, "", &mut found)?;
        let mut entries: Vec<Entry> = found
            .par_iter()
            .map(|(sub, is_link)| {
                let abs = full.join(sub);
                let rel_path = format!("{rel}/{sub}");
                let target = if *is_link {
                    self.link_target_inside(&abs)?.filter(|t| t.is_file())
                } else {
                    Some(abs.clone())
                };
                match target {
                    Some(file) => match self.file_snapshot(&rel_path, &file)? {
                        Snapshot::File { hash, size, exec } => Ok(Entry::File {
                            path: sub.clone(),
                            hash: hash.to_hex().to_string(),
                            size,
                            exec,
                        }),
                        _ => unreachable!("file_snapshot returns files"),
                    },
                    None => Ok(Entry::Link {
                        path: sub.clone(),
                        target: read_link_text(&abs)?,
                    }),
                }
            })
            .collect::<io::Result<_>>()?;
        entries.sort_by(|a, b| a.path().cmp(b.path()));
        let manifest = serde_json::to_vec(&entries).expect("manifest serialises");
        Ok(Snapshot::Dir {
            hash: blake3::hash(&manifest),
            entries,
            manifest,
        })
    }

    /// The canonical target of a link if it lies inside the workspace.
    fn link_target_inside(&self, link: &Path) -> io::Result<Option<PathBuf>> {
        let root = self.root.canonicalize()?;
        Ok(link.canonicalize().ok().filter(|t| t.starts_with(&root)))
    }
}

fn link_snapshot(full: &Path) -> io::Result<Snapshot> {
    let target = read_link_text(full)?;
    let hash = blake3::hash(format!("symlink:{target}").as_bytes());
    Ok(Snapshot::Link { hash, target })
}

fn read_link_text(path: &Path) -> io::Result<String> {
    Ok(std::fs::read_link(path)?.to_string_lossy().into_owned())
}

/// Relative paths of files and symlinks below `dir`, in no particular order.
fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, bool)>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let sub = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(&entry.path(), &sub, out)?;
        } else {
            out.push((sub, kind.is_symlink()));
        }
    }
    Ok(())
}

fn special_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() || t.is_char_device() {
        "device"
    } else {
        "special file"
    }
}

pub fn hash_file(path: &Path, size: u64) -> io::Result<blake3::Hash> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is a {}, not a file",
                path.display(),
                special_kind(&meta)
            ),
        ));
    }
    let mut hasher = blake3::Hasher::new();
    if size >= PARALLEL_HASH_BYTES {
        hasher.update_mmap_rayon(path)?;
    } else {
        hasher.update_mmap(path)?;
    }
    Ok(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_hash_by_content_and_layout_not_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("d/sub")).unwrap();
        std::fs::write(root.join("d/a.txt"), b"alpha").unwrap();
        std::fs::write(root.join("d/sub/b.txt"), b"beta").unwrap();
        let stats = StatCache::default();
        let h = Hasher {
            root,
            stats: &stats,
        };
        let first = h.hash("d").unwrap().unwrap();

        // Rewriting the same bytes (a new mtime) keeps the hash.
        std::fs::write(root.join("d/a.txt"), b"alpha").unwrap();
        assert_eq!(h.hash("d").unwrap().unwrap(), first);
        // A changed byte, a renamed file, or a new empty file changes it.
        std::fs::write(root.join("d/a.txt"), b"alphA").unwrap();
        let edited = h.hash("d").unwrap().unwrap();
        assert_ne!(edited, first);
        std::fs::rename(root.join("d/a.txt"), root.join("d/c.txt")).unwrap();
        assert_ne!(h.hash("d").unwrap().unwrap(), edited);
        std::fs::write(root.join("d/sub/empty"), b"").unwrap();
        let with_empty = h.hash("d").unwrap().unwrap();
        std::fs::remove_file(root.join("d/sub/empty")).unwrap();
        assert_ne!(h.hash("d").unwrap().unwrap(), with_empty);
        assert!(h.hash("missing").unwrap().is_none());
    }

    #[test]
    fn links_inside_are_followed_links_outside_are_not() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s1").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("real"), b"content").unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("inside")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("away")).unwrap();
        let stats = StatCache::default();
        let h = Hasher {
            root,
            stats: &stats,
        };
        assert_eq!(h.hash("inside").unwrap(), h.hash("real").unwrap());
        let away = h.hash("away").unwrap().unwrap();
        std::fs::write(outside.path().join("secret"), b"s2").unwrap();
        assert_eq!(
            h.hash("away").unwrap().unwrap(),
            away,
            "the target outside is never read"
        );
    }

    #[test]
    fn large_files_hash_like_small_ones() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(PARALLEL_HASH_BYTES as usize + 12345))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        std::fs::write(dir.path().join("big"), &data).unwrap();
        let got = hash_file(&dir.path().join("big"), data.len() as u64).unwrap();
        assert_eq!(got, blake3::hash(&data));
    }
}
