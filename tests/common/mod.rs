//! A scratch workspace and the real `repro` binary, for integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Ws {
    pub dir: tempfile::TempDir,
    /// Each stage appends its name here (via $CALLS), so tests see exactly what ran.
    pub calls: PathBuf,
}

impl Ws {
    pub fn new(pipeline: &str) -> Ws {
        let dir = tempfile::tempdir().unwrap();
        let calls = dir.path().join("calls.log");
        let ws = Ws { dir, calls };
        std::fs::create_dir_all(ws.root()).unwrap();
        ws.write("repro.yaml", pipeline);
        ws
    }

    /// The workspace (a subfolder, so `calls.log` and friends stay outside it).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("ws")
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.root().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_repro"));
        c.args(args)
            .current_dir(self.root())
            .env("CALLS", &self.calls)
            .env_remove("REPRO_CACHE");
        c
    }

    pub fn repro(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs, asserts success, and returns the sorted names of the stages that executed.
    pub fn run_ok(&self, args: &[&str]) -> Vec<String> {
        let _ = std::fs::remove_file(&self.calls);
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        let out = self.repro(&all);
        assert!(
            out.status.success(),
            "repro {all:?} failed:\n{}",
            text(&out)
        );
        self.calls()
    }

    pub fn calls(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect();
        v.sort();
        v
    }

    pub fn records(&self) -> usize {
        count_files(&self.root().join("cache/records"), "json")
    }
}

pub fn count_files(dir: &Path, ext: &str) -> usize {
    walk(dir)
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .count()
}

pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
