//! repro's own files: the cache store, the state folder `.repro/` and the pipeline file being
//! run, and the workspace's `.git`. No stage may write them, write a folder that holds them, or
//! read the store or the state as an input, however the path is spelt (`./cache`,
//! `sub/../cache`, a symlink to either).
//!
//! Paths are compared after resolving symlinks in the part of the path that exists, so the
//! check holds for paths that are yet to be written.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OwnFiles {
    root: PathBuf,
    /// Resolved absolute path, what it is, and whether a stage may read it (the pipeline file).
    own: Vec<(PathBuf, String, bool)>,
}

impl OwnFiles {
    /// `store` and `pipeline` may be relative to `workspace` or absolute.
    pub fn new(workspace: &Path, store: &Path, pipeline: &Path) -> OwnFiles {
        let root = resolve(workspace);
        let shown = |p: &Path| {
            let abs = root.join(p);
            match abs.strip_prefix(&root) {
                Ok(rel) => rel.display().to_string(),
                Err(_) => abs.display().to_string(),
            }
        };
        let own = vec![
            (
                resolve(&root.join(store)),
                format!("the cache store `{}`", shown(store)),
                false,
            ),
            (
                resolve(&root.join(".repro")),
                "repro's state folder `.repro`".to_string(),
                false,
            ),
            (
                resolve(&root.join(pipeline)),
                format!("the pipeline file `{}`", shown(pipeline)),
                true,
            ),
            // Not repro's, but no result is worth the history of the project.
            (
                resolve(&root.join(".git")),
                "the git repository `.git`".to_string(),
                true,
            ),
        ];
        OwnFiles { root, own }
    }

    /// Why a stage may not write the workspace path `rel`, if it may not.
    pub fn refuse_out(&self, rel: &str) -> Option<String> {
        self.refuse_out_in(rel, &mut Folders::default())
    }

    /// [`Self::refuse_out`], resolving the folders of `rel` through `folders`.
    pub fn refuse_out_in(&self, rel: &str, folders: &mut Folders) -> Option<String> {
        let path = self.locate(rel, folders);
        let own = self.own.iter().find_map(|(own, what, _)| {
            if path == *own {
                Some(format!("`{rel}` is {what}"))
            } else if inside(&path, own) {
                Some(format!("`{rel}` is inside {what}"))
            } else if inside(own, &path) {
                Some(format!(
                    "`{rel}` holds {what} (a stage's outs are cleared before it runs)"
                ))
            } else {
                None
            }
        });
        // Outs are cleared before a stage runs: never anything outside the workspace.
        own.or_else(|| (!inside(&path, &self.root)).then(|| self.escape(rel)))
    }

    /// How `rel` leaves the workspace: the first of its folders that leads out.
    fn escape(&self, rel: &str) -> String {
        let mut prefix = String::new();
        for part in rel.split('/') {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if !inside(&self.resolve_folder(&prefix), &self.root) {
                break;
            }
        }
        format!("`{rel}` goes through symlink `{prefix}`, which points outside the workspace")
    }

    /// Why a stage may not read `rel`, if it may not: the store and the state change under a
    /// run, so an input among them could never be up to date.
    pub fn refuse_dep(&self, rel: &str) -> Option<String> {
        self.refuse_dep_in(rel, &mut Folders::default())
    }

    /// [`Self::refuse_dep`], resolving the folders of `rel` through `folders`.
    pub fn refuse_dep_in(&self, rel: &str, folders: &mut Folders) -> Option<String> {
        let path = self.locate(rel, folders);
        self.own
            .iter()
            .filter(|(_, _, readable)| !readable)
            .find_map(|(own, what, _)| {
                if path == *own || inside(&path, own) {
                    Some(format!(
                        "`{rel}` is inside {what}, which is repro's, not an input"
                    ))
                } else if inside(own, &path) {
                    Some(format!(
                        "`{rel}` holds {what}, which changes on every run, so it cannot be an input"
                    ))
                } else {
                    None
                }
            })
    }
}

/// Folders of the workspace already resolved, while a pipeline loads (not across a run, in
/// which stages make links): thousands of outs share a few folders.
#[derive(Debug, Default)]
pub struct Folders(HashMap<String, PathBuf>);

impl Folders {
    /// Each folder and where it led, sorted: what a compiled plan checks is still so.
    pub fn into_sorted(self) -> Vec<(String, PathBuf)> {
        let mut v: Vec<_> = self.0.into_iter().collect();
        v.sort_unstable();
        v
    }
}

impl OwnFiles {
    /// Where the workspace folder `dir` leads now.
    pub fn resolve_folder(&self, dir: &str) -> PathBuf {
        resolve_from(self.root.clone(), Path::new(dir))
    }

    /// The workspace path `rel` resolved, its folder looked up in `folders` first.
    fn locate(&self, rel: &str, folders: &mut Folders) -> PathBuf {
        match rel.rsplit_once('/') {
            None => resolve_from(self.root.clone(), Path::new(rel)),
            Some((dir, name)) => {
                let dir = match folders.0.get(dir) {
                    Some(d) => d.clone(),
                    None => {
                        let d = self.resolve_folder(dir);
                        folders.0.insert(dir.to_string(), d.clone());
                        d
                    }
                };
                resolve_from(dir, Path::new(name))
            }
        }
    }
}

/// `path` with every symlink in it resolved, as the kernel would when the path is opened,
/// including links whose targets do not exist yet; the part that does not exist is kept as
/// written, with `.` and `..` folded.
fn resolve(path: &Path) -> PathBuf {
    let start = match std::env::current_dir() {
        Ok(cwd) if path.is_relative() => cwd,
        _ => PathBuf::from("/"),
    };
    resolve_from(start, path)
}

/// `rel` resolved from `out`, a folder already resolved.
fn resolve_from(mut out: PathBuf, rel: &Path) -> PathBuf {
    const MAX_LINKS: usize = 40;
    let mut todo: Vec<OsString> = Vec::new();
    push_components(&mut todo, rel);
    let mut links = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            out.pop();
            continue;
        }
        let next = out.join(&part);
        match std::fs::read_link(&next) {
            Ok(target) if links < MAX_LINKS => {
                links += 1;
                if target.is_absolute() {
                    out = PathBuf::from("/");
                }
                push_components(&mut todo, &target);
            }
            _ => out = next,
        }
    }
    out
}

/// `path` lies below `dir` (both resolved, so plain byte prefixes with a `/` after them).
fn inside(path: &Path, dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let (p, d) = (path.as_os_str().as_bytes(), dir.as_os_str().as_bytes());
    p.len() > d.len() && p.starts_with(d) && (p[d.len()] == b'/' || d.ends_with(b"/"))
}

/// Pushes the parts of `path` so that popping yields them in order.
fn push_components(todo: &mut Vec<OsString>, path: &Path) {
    let parts: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect();
    todo.extend(parts.into_iter().rev());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_repros_files_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path();
        std::fs::create_dir_all(ws.join("cache/objects")).unwrap();
        std::fs::create_dir_all(ws.join("pipelines")).unwrap();
        std::fs::write(ws.join("pipelines/p.yaml"), "").unwrap();
        std::os::unix::fs::symlink(ws.join("cache"), ws.join("c")).unwrap();
        std::os::unix::fs::symlink(ws.join(".repro"), ws.join("state")).unwrap();
        let own = OwnFiles::new(ws, Path::new("cache"), Path::new("pipelines/p.yaml"));
        for bad in [
            "cache",
            "cache/objects",
            "cache/objects/ab/cd",
            "c",
            "c/records",
            ".repro",
            ".repro/state/x.json",
            "state/lock",
            "pipelines/p.yaml",
            "pipelines",
            ".git",
            ".git/HEAD",
        ] {
            assert!(own.refuse_out(bad).is_some(), "out `{bad}` allowed");
        }
        for fine in [
            "cache2",
            "results/cache",
            "pipelines/q.yaml",
            "x.repro",
            "sub/.repro",
        ] {
            assert_eq!(own.refuse_out(fine), None, "out `{fine}` refused");
        }
        assert!(own.refuse_dep("cache/objects").is_some());
        assert!(own.refuse_dep("state").is_some());
        assert_eq!(
            own.refuse_dep("pipelines/p.yaml"),
            None,
            "reading the pipeline is fine"
        );
        assert_eq!(own.refuse_dep("pipelines"), None);
    }

    #[test]
    fn a_store_elsewhere_is_protected_through_links() {
        let dir = tempfile::tempdir().unwrap();
        let store = tempfile::tempdir().unwrap();
        let ws = dir.path();
        std::os::unix::fs::symlink(store.path(), ws.join("s")).unwrap();
        let own = OwnFiles::new(ws, store.path(), Path::new("repro.yaml"));
        assert!(own.refuse_out("s/objects").unwrap().contains("cache store"));
        assert!(own.refuse_out("s").is_some());
        assert_eq!(
            own.refuse_out("cache/x"),
            None,
            "`cache/` is not the store here"
        );
    }
}
