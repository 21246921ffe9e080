//! The stat fast path: (path, size, mtime, ctime, inode) → content hash, so an unchanged file is
//! never read twice. The key is always the content hash; this only avoids recomputing it.
//!
//! An entry is trusted only when the file's mtime is older than the moment it was hashed by more
//! than the filesystem's timestamp granularity ("racily clean" entries, as git calls them, are
//! re-hashed), so an edit in the same clock tick as the hash is never missed.

use std::collections::HashMap;
use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

const MAGIC: &[u8; 8] = b"RPSTAT01";
/// Timestamps closer than this to the hashing moment are not trusted.
const RACY_NS: i64 = 2_000_000_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FileStamp {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
}

impl FileStamp {
    pub fn of(meta: &Metadata) -> FileStamp {
        FileStamp {
            size: meta.len(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            ino: meta.ino(),
        }
    }
}

#[derive(Clone, Copy)]
struct Entry {
    stamp: FileStamp,
    hashed_at_ns: i64,
    hash: [u8; 32],
}

#[derive(Default)]
pub struct StatCache {
    entries: Mutex<HashMap<String, Entry>>,
    dirty: std::sync::atomic::AtomicBool,
}

pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl StatCache {
    /// Loads the cache; a missing or unreadable file is an empty cache (it only costs hashing).
    pub fn load(path: &Path) -> StatCache {
        let mut bytes = Vec::new();
        let ok = std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .is_ok();
        let entries = if ok {
            parse(&bytes).unwrap_or_default()
        } else {
            HashMap::new()
        };
        StatCache {
            entries: Mutex::new(entries),
            dirty: Default::default(),
        }
    }

    pub fn get(&self, rel: &str, stamp: &FileStamp) -> Option<blake3::Hash> {
        let entries = self.entries.lock().expect("stat cache lock");
        let e = entries.get(rel)?;
        let trusted =
            e.stamp == *stamp && e.hashed_at_ns - stamp.mtime_ns.max(stamp.ctime_ns) > RACY_NS;
        trusted.then(|| blake3::Hash::from_bytes(e.hash))
    }

    pub fn put(&self, rel: &str, stamp: FileStamp, hashed_at_ns: i64, hash: blake3::Hash) {
        let entry = Entry {
            stamp,
            hashed_at_ns,
            hash: *hash.as_bytes(),
        };
        self.entries
            .lock()
            .expect("stat cache lock")
            .insert(rel.to_string(), entry);
        self.dirty.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes atomically (temp file, rename); entries for files that no longer exist are kept
    /// only if still plausible, which costs nothing: a stale entry can never match a new stamp.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let entries = self.entries.lock().expect("stat cache lock");
        let mut out = Vec::with_capacity(16 + entries.len() * 96);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for (rel, e) in entries.iter() {
            out.extend_from_slice(&(rel.len() as u32).to_le_bytes());
            out.extend_from_slice(rel.as_bytes());
            for v in [
                e.stamp.size,
                e.stamp.mtime_ns as u64,
                e.stamp.ctime_ns as u64,
                e.stamp.ino,
                e.hashed_at_ns as u64,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&e.hash);
        }
        // A cache, not a result: a lost write only costs re-hashing, so no fsync.
        crate::atomic::write(path, &out, false)
    }
}

fn parse(bytes: &[u8]) -> Option<HashMap<String, Entry>> {
    let mut r = bytes.strip_prefix(MAGIC.as_slice())?;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = r.split_at_checked(n)?;
        r = tail;
        Some(head)
    };
    let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let count = u64_at(take(8)?) as usize;
    let mut map = HashMap::with_capacity(count.min(1 << 20));
    for _ in 0..count {
        let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let rel = std::str::from_utf8(take(len)?).ok()?.to_string();
        let nums: Vec<u64> = (0..5).map(|_| take(8).map(u64_at)).collect::<Option<_>>()?;
        let hash: [u8; 32] = take(32)?.try_into().ok()?;
        let stamp = FileStamp {
            size: nums[0],
            mtime_ns: nums[1] as i64,
            ctime_ns: nums[2] as i64,
            ino: nums[3],
        };
        map.insert(
            rel,
            Entry {
                stamp,
                hashed_at_ns: nums[4] as i64,
                hash,
            },
        );
    }
    Some(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_racy_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = StatCache::default();
        let stamp = FileStamp {
            size: 10,
            mtime_ns: 1_000,
            ctime_ns: 1_000,
            ino: 7,
        };
        let h = blake3::hash(b"x");
        cache.put("a/b", stamp, 1_000 + RACY_NS + 1, h);
        cache.put("racy", stamp, 1_000 + 5, h);
        let path = dir.path().join("stat");
        cache.save(&path).unwrap();
        let back = StatCache::load(&path);
        assert_eq!(back.get("a/b", &stamp), Some(h));
        assert_eq!(
            back.get("racy", &stamp),
            None,
            "an entry hashed in the same tick is not trusted"
        );
        let touched = FileStamp {
            mtime_ns: 2_000,
            ..stamp
        };
        assert_eq!(back.get("a/b", &touched), None);
        std::fs::write(&path, b"garbage").unwrap();
        assert_eq!(StatCache::load(&path).get("a/b", &stamp), None);
    }
}
