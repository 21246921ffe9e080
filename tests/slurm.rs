//! Stages through a real single-node Slurm (`tests/slurm/setup.sh` brings one up on this
//! machine, or says in one line why it cannot, and then these tests skip, saying so).

mod common;
use common::*;
use std::io::Write;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// The single-node cluster, one test at a time (a test's jobs would otherwise take the CPUs
/// another test's jobs need at once), or `None` if Slurm cannot be had here. Says once, past the
/// test harness's capture, whether these tests run or why they skip.
fn slurm() -> Option<MutexGuard<'static, ()>> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    ready().then(|| ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner()))
}

fn ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/slurm/setup.sh");
        let out = std::process::Command::new("bash").arg(script).output();
        let (ready, said) = match out {
            Ok(o) if o.status.success() => (true, String::from_utf8_lossy(&o.stdout).into()),
            Ok(o) => (false, String::from_utf8_lossy(&o.stderr).into()),
            Err(e) => (false, format!("slurm unavailable: cannot run bash: {e}")),
        };
        let verdict = if ready { "run" } else { "SKIPPED" };
        let _ = writeln!(std::io::stderr(), "slurm tests {verdict}: {}", said.trim());
        ready
    })
}

/// The diamond's files after a run with `args`, and what the run said.
fn diamond_run(args: &[&str]) -> (Vec<(String, String)>, String) {
    let ws = diamond();
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    let out = ws.repro(&all);
    assert!(out.status.success(), "{}", text(&out));
    let files = ["top.txt", "left.txt", "right.txt", "bottom.txt"]
        .iter()
        .map(|f| (f.to_string(), ws.read(f)))
        .collect();
    (files, text(&out))
}

#[test]
fn a_pipeline_through_slurm_equals_the_local_run() {
    let Some(_cluster) = slurm() else {
        return;
    };
    let (local, _) = diamond_run(&[]);
    let (cluster, said) = diamond_run(&["--runner", "slurm"]);
    assert_eq!(cluster, local, "{said}");
    assert!(said.contains("4 ran"), "{said}");
}

#[test]
fn independent_stages_run_at_the_same_time_as_jobs() {
    let Some(_cluster) = slurm() else {
        return;
    };
    // Each stage notes when it starts and ends; both must be running at once.
    let ws = Ws::new(
        "stages:\n  a:\n    cmd: date +%s.%N > a.txt; sleep 3; date +%s.%N >> a.txt\n    outs: [a.txt]\n    resources: {cores: 1, memory: 100M}\n  b:\n    cmd: date +%s.%N > b.txt; sleep 3; date +%s.%N >> b.txt\n    outs: [b.txt]\n    resources: {cores: 1, memory: 100M}\n",
    );
    let out = ws.repro(&["run", "--runner", "slurm"]);
    assert!(out.status.success(), "{}", text(&out));
    let span = |f: &str| -> (f64, f64) {
        let t: Vec<f64> = ws.read(f).lines().map(|l| l.parse().unwrap()).collect();
        (t[0], t[1])
    };
    let ((a0, a1), (b0, b1)) = (span("a.txt"), span("b.txt"));
    assert!(
        a0 < b1 && b0 < a1,
        "a ran {a0}..{a1}, b ran {b0}..{b1}: one after the other"
    );
}

#[test]
fn a_failing_job_fails_its_stage_with_its_log() {
    let Some(_cluster) = slurm() else {
        return;
    };
    let ws = Ws::new("stages:\n  bad:\n    cmd: echo oops; exit 3\n    outs: [x.txt]\n");
    let out = ws.repro(&["run", "--runner", "slurm"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let s = text(&out);
    assert!(s.contains("exit code 3") && s.contains("oops"), "{s}");
    assert_eq!(ws.records(), 0);
}

/// Submits `sleep SECS` under the job name a killed earlier run in `ws` would have left.
fn orphan(ws: &Ws, secs: u32) -> String {
    let root = ws.root().canonicalize().unwrap();
    let name = format!("{}999999", repro::exec::slurm::run_prefix(&root));
    let out = std::process::Command::new("sbatch")
        .args([
            "--parsable",
            &format!("--job-name={name}"),
            "--output=/dev/null",
        ])
        .args(["--cpus-per-task=1", "--mem=50M"])
        .arg(format!("--wrap=sleep {secs}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn job_state(id: &str) -> String {
    let out = std::process::Command::new("squeue")
        .args(["--states=all", "--noheader", "--format=%T", "--jobs", id])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn jobs_a_killed_run_left_are_refused_cancelled_or_waited_for() {
    let Some(_cluster) = slurm() else {
        return;
    };
    let ws = Ws::new("stages:\n  a:\n    cmd: echo a > a.txt\n    outs: [a.txt]\n");
    let id = orphan(&ws, 60);
    let out = ws.repro(&["run", "--runner", "slurm"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("still in the queue") && stderr(&out).contains(&id),
        "{}",
        text(&out)
    );
    let out = ws.repro(&["run", "--runner", "slurm", "--cancel-orphans"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("cancelled jobs of an earlier run"));
    assert_eq!(job_state(&id), "CANCELLED");

    let id = orphan(&ws, 3);
    let out = ws.repro(&["run", "--runner", "slurm", "--adopt", "--force-all"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("waiting for jobs of an earlier run"));
    assert_eq!(job_state(&id), "COMPLETED");
}

#[test]
fn a_stages_progress_line_names_its_job_and_state() {
    let Some(_cluster) = slurm() else {
        return;
    };
    let ws = Ws::new(
        "stages:\n  wait:\n    cmd: while [ ! -e \"$GO\" ]; do sleep 0.1; done; echo w > w.txt\n    outs: [w.txt]\n",
    );
    let go = ws.dir.path().join("go");
    let run = ws
        .cmd(&["run", "--runner", "slurm"])
        .env("GO", &go)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let progress = ws.root().join(".repro/scratch/wait/progress");
    let t0 = std::time::Instant::now();
    let mut seen = String::new();
    while !seen.contains(": RUNNING") && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        seen = std::fs::read_to_string(&progress).unwrap_or_default();
    }
    std::fs::write(&go, "").unwrap();
    let out = run.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        seen.starts_with("Slurm job ") && seen.ends_with(": RUNNING"),
        "{seen:?}"
    );
}
