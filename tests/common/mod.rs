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

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One per-stage line of `repro run` (src/exec/report.rs:
/// `{state:>9}  {stage:<w}  {time:>8}  {detail}`, trimmed at the end).
#[derive(Debug, Clone, PartialEq)]
pub struct StageLine {
    pub state: String,
    pub stage: String,
    pub detail: String,
}

/// Every state a run line can carry.
pub const RUN_STATES: [&str; 7] = [
    "up to date",
    "unchanged",
    "restored",
    "ran",
    "failed",
    "stopped",
    "blocked",
];

/// The per-stage lines of a run's output, in order. Only lines in the exact format count: the
/// summary line (`N ran, N restored, N up to date`) and notes are never taken for a stage.
pub fn stage_lines(output: &str) -> Vec<StageLine> {
    let mut lines = Vec::new();
    for line in output.lines() {
        for state in RUN_STATES {
            let Some(rest) = line.strip_prefix(&format!("{state:>9}  ")) else {
                continue;
            };
            let stage = rest.split_whitespace().next().unwrap_or_default();
            assert!(
                !stage.is_empty() && rest.starts_with(stage),
                "malformed stage line `{line}`"
            );
            let mut detail = rest[stage.len()..].trim_start();
            // States of stages that were carried out show an elapsed time (`0.01s`).
            if !matches!(state, "up to date" | "blocked") {
                let time = detail.split_whitespace().next().unwrap_or_default();
                assert!(
                    time.strip_suffix('s')
                        .is_some_and(|t| t.parse::<f64>().is_ok()),
                    "no elapsed time in `{line}`"
                );
                detail = detail[time.len()..].trim_start();
            }
            lines.push(StageLine {
                state: state.to_string(),
                stage: stage.to_string(),
                detail: detail.to_string(),
            });
            break;
        }
    }
    lines
}

/// The sorted names of the stages a run's output shows in `state`.
pub fn stages_in(output: &str, state: &str) -> Vec<String> {
    let mut v: Vec<String> = stage_lines(output)
        .into_iter()
        .filter(|l| l.state == state)
        .map(|l| l.stage)
        .collect();
    v.sort();
    v
}

/// The (label, reason) that `repro status` prints for `stage`
/// (`{name:<w}  {label:<10}  {why}`); panics unless exactly one line names it.
pub fn status_of(output: &str, stage: &str) -> (String, String) {
    let found: Vec<(String, String)> = output
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(stage)?;
            if !rest.starts_with("  ") {
                return None;
            }
            let rest = rest.trim_start();
            ["up to date", "restore", "run"].iter().find_map(|label| {
                let why = rest.strip_prefix(label)?;
                (why.is_empty() || why.starts_with(' '))
                    .then(|| (label.to_string(), why.trim().to_string()))
            })
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one status line for `{stage}` in:\n{output}"
    );
    found.into_iter().next().unwrap()
}

/// Waits up to 20 s for `path` to appear.
pub fn wait_for(path: &Path) {
    let t0 = std::time::Instant::now();
    while !path.exists() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The token of the run in progress (or of a run that crashed) in this workspace: every stage
/// process it starts carries `REPRO_RUN=token` in its environment.
pub fn run_token(ws: &Ws) -> String {
    let marker = ws.root().join(".repro/running");
    std::fs::read_to_string(&marker)
        .unwrap_or_else(|e| panic!("no run marker {}: {e}", marker.display()))
        .trim()
        .to_string()
}

/// The pids listed in /proc, with the content of their `/proc/PID/FILE`; `None` where it could
/// not be read. Strict: panics if /proc cannot be listed.
fn proc_files(file: &str) -> Vec<(i32, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("cannot list /proc") {
        let entry = entry.expect("cannot list /proc");
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        out.push((pid, std::fs::read(entry.path().join(file)).ok()));
    }
    assert!(
        out.iter().any(|(pid, _)| *pid == std::process::id() as i32),
        "/proc does not list this test's own process"
    );
    out
}

/// The live processes whose environment holds `REPRO_RUN=token`, read from /proc/*/environ.
/// Processes whose environment cannot be read (another user's, or a sandbox's init) are
/// passed over, so callers first show that the scan sees the run's stages while they run.
pub fn processes_of_run(token: &str) -> Vec<i32> {
    let needle = format!("REPRO_RUN={token}");
    assert!(
        std::fs::read("/proc/self/environ").is_ok(),
        "cannot read /proc/self/environ"
    );
    proc_files("environ")
        .into_iter()
        .filter(|(_, env)| {
            env.as_ref()
                .is_some_and(|e| e.split(|&b| b == 0).any(|v| v == needle.as_bytes()))
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// The live processes whose command line is exactly `argv`, read from /proc/*/cmdline
/// (readable for every process). Strict: a process that is still there but whose command line
/// cannot be read makes it panic.
pub fn processes_running(argv: &[&str]) -> Vec<i32> {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    proc_files("cmdline")
        .into_iter()
        .filter(|(pid, cmdline)| match cmdline {
            Some(c) => *c == want,
            None => {
                assert!(
                    !Path::new(&format!("/proc/{pid}")).exists(),
                    "cannot read /proc/{pid}/cmdline"
                );
                false
            }
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// Waits up to `secs` for every process of the run `token` to be gone (a killed process can
/// take a moment to be reaped); panics naming the survivors.
pub fn assert_run_gone(token: &str, secs: u64) {
    let t0 = std::time::Instant::now();
    loop {
        let left = processes_of_run(token);
        if left.is_empty() {
            return;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(secs),
            "processes of run {token} outlived it: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Four shell stages in a diamond over two input files; each appends its name to $CALLS.
pub const DIAMOND: &str = r#"
params: {suffix: one, unused: 5}
stages:
  top:
    cmd: echo top >> "$CALLS" && tr a-z A-Z < data/in.txt > top.txt
    deps: [data/in.txt]
    outs: [top.txt]
  left:
    cmd: echo left >> "$CALLS" && (cat top.txt; echo ${params.suffix}) > left.txt
    deps: [top.txt]
    outs: [left.txt]
  right:
    cmd: echo right >> "$CALLS" && (cat top.txt; cat data/side.txt) > right.txt
    deps: [top.txt, data/side.txt]
    outs: [right.txt]
  bottom:
    cmd: echo bottom >> "$CALLS" && cat left.txt right.txt > bottom.txt
    deps: [left.txt, right.txt]
    outs: [bottom.txt]
"#;

/// A workspace holding DIAMOND and its inputs, not yet run.
pub fn diamond() -> Ws {
    let ws = Ws::new(DIAMOND);
    ws.write("data/in.txt", "hello\n");
    ws.write("data/side.txt", "side\n");
    ws
}

/// A pipeline that makes a corpus of `stories.txt` (see [`stories`]), a 300-token BPE, and a
/// model `models/tiny` trained with `train_with` (the `with:` entries after `tokens`); `extra`
/// is added to the train stage as written (e.g. its `resources:` line).
pub fn corpus_and_train(train_with: &str, extra: &str) -> String {
    format!(
        "stages:
  corpus:
    uses: corpus
    with: {{text_file: stories.txt, heldout_fraction: 0.1}}
    outs: [data/prose]
  tokenise:
    uses: tokenise
    with: {{input: data/prose, vocab: 300}}
    outs: [data/tokens]
  train:
    uses: train
    with: {{tokens: data/tokens, {train_with}}}
    outs: [models/tiny]
{extra}"
    )
}

/// 200 tiny stories, separated as TinyStories' files are.
pub fn stories() -> String {
    let names = ["Tom", "Lily", "Ben", "Mia"];
    let things = ["ball", "cat", "tree", "boat", "cake"];
    let mut text = String::new();
    for i in 0..200 {
        let (n, t) = (names[i % 4], things[(i * 7) % 5]);
        text.push_str(&format!(
            "{n} had a {t}. The {t} was big. {n} was happy with the {t}.\n<|endoftext|>\n"
        ));
    }
    text
}
