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

#[test]
fn a_failure_cancels_the_other_jobs_unless_told_to_keep_going() {
    let Some(_cluster) = slurm() else {
        return;
    };
    let pipeline = |secs: u32| {
        format!(
            "stages:\n  bad:\n    cmd: sleep 2; exit 3\n    resources: {{cores: 1, memory: 100M}}\n  \
             long:\n    cmd: echo begun > long.txt; sleep {secs}; echo done >> long.txt\n    \
             outs: [long.txt]\n    resources: {{cores: 1, memory: 100M}}\n"
        )
    };
    let ws = Ws::new(&pipeline(600));
    let t0 = std::time::Instant::now();
    let out = ws.repro(&["run", "--runner", "slurm"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        t0.elapsed().as_secs() < 60,
        "it waited for the long job: {said}"
    );
    assert!(said.contains("cancelled: another stage failed"), "{said}");
    assert!(live_jobs(&ws).is_empty(), "{:?}", live_jobs(&ws));
    assert_eq!(ws.records(), 0);
    assert!(
        !ws.root().join("long.txt").exists(),
        "a cancelled job's out is no result"
    );

    let ws = Ws::new(&pipeline(3));
    let out = ws.repro(&["run", "--runner", "slurm", "--keep-going"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(ws.read("long.txt"), "begun\ndone\n");
    assert_eq!(ws.records(), 1);
}

/// Waits up to `secs` for `done`, checking every 100 ms; panics saying `what`.
fn wait_until(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !done() {
        assert!(t0.elapsed().as_secs() < secs, "{what}: not after {secs} s");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The jobs of runs in `ws` that are queued or running: `id|name|state` lines.
fn live_jobs(ws: &Ws) -> Vec<String> {
    let root = ws.root().canonicalize().unwrap();
    let prefix = repro::exec::slurm::run_prefix(&root);
    let out = std::process::Command::new("squeue")
        .args(["--noheader", "--format=%i|%j|%T"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&prefix))
        .map(String::from)
        .collect()
}

/// `repro run --runner slurm ARGS` in the background, its output captured, with `$GO` set to a
/// file that stages may wait for.
fn spawn_run(ws: &Ws, args: &[&str]) -> std::process::Child {
    let mut all = vec!["run", "--runner", "slurm"];
    all.extend_from_slice(args);
    ws.cmd(&all)
        .env("GO", ws.dir.path().join("go"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn progress(ws: &Ws, stage: &str) -> String {
    std::fs::read_to_string(ws.root().join(format!(".repro/scratch/{stage}/progress")))
        .unwrap_or_default()
}

/// A stage that waits for `$GO` and notes each time it ran, and one downstream of it.
const WAITS_FOR_GO: &str = "stages:\n  a:\n    cmd: while [ ! -e \"$GO\" ]; do sleep 0.1; done; echo ran >> runs.txt; echo a > a.txt\n    outs: [a.txt]\n  b:\n    cmd: tr a b < a.txt > b.txt\n    deps: [a.txt]\n    outs: [b.txt]\n";

#[test]
fn jobs_a_killed_run_left_are_refused_waited_for_and_kept_or_cancelled() {
    let Some(_cluster) = slurm() else {
        return;
    };
    let ws = Ws::new(WAITS_FOR_GO);
    let mut killed = spawn_run(&ws, &[]);
    wait_until(60, "stage a's job runs", || {
        progress(&ws, "a").ends_with(": RUNNING")
    });
    killed.kill().unwrap();
    killed.wait().unwrap();
    let job = progress(&ws, "a");
    let id = job
        .trim_start_matches("Slurm job ")
        .split(':')
        .next()
        .unwrap()
        .to_string();

    // `repro status` names the job; a plain run refuses to start beside it.
    let status = ws.repro(&["status"]);
    assert!(
        stdout(&status).contains(&format!("Slurm job {id}: RUNNING")),
        "{}",
        text(&status)
    );
    let out = ws.repro(&["run", "--runner", "slurm"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("still in the queue") && stderr(&out).contains(&id),
        "{}",
        text(&out)
    );

    // --adopt waits for the job and keeps what it wrote: stage a ran once, b after it.
    let adopting = spawn_run(&ws, &["--adopt"]);
    std::thread::sleep(std::time::Duration::from_secs(2));
    std::fs::write(ws.dir.path().join("go"), "").unwrap();
    let out = adopting.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("waiting for jobs of an earlier run"),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "keeping what Slurm job {id} of the earlier run wrote"
        )),
        "{said}"
    );
    assert_eq!(
        ws.read("runs.txt"),
        "ran\n",
        "the adopted stage did not run again"
    );
    assert_eq!(ws.read("b.txt"), "b\n");
    assert_eq!(ws.records(), 2);
    let again = ws.repro(&["run", "--runner", "slurm"]);
    assert!(
        text(&again).contains("0 ran, 0 restored, 2 up to date"),
        "{}",
        text(&again)
    );
    assert!(
        !stdout(&ws.repro(&["status"])).contains("Slurm job"),
        "job files are gone"
    );

    // --cancel-orphans: the job is cancelled and the stage runs anew.
    std::fs::remove_file(ws.dir.path().join("go")).unwrap();
    let mut killed = spawn_run(&ws, &["--force", "a"]);
    wait_until(60, "stage a's job runs again", || {
        progress(&ws, "a").ends_with(": RUNNING")
    });
    killed.kill().unwrap();
    killed.wait().unwrap();
    let orphan = progress(&ws, "a");
    let cancelling = spawn_run(&ws, &["--cancel-orphans", "--force", "a"]);
    wait_until(60, "a new job runs", || {
        let now = progress(&ws, "a");
        now != orphan && now.ends_with(": RUNNING")
    });
    std::fs::write(ws.dir.path().join("go"), "").unwrap();
    let out = cancelling.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("cancelled jobs of an earlier run"),
        "{}",
        text(&out)
    );
    assert!(live_jobs(&ws).is_empty(), "{:?}", live_jobs(&ws));
    assert_eq!(
        ws.read("runs.txt"),
        "ran\nran\n",
        "the cancelled job never ran"
    );
}

#[test]
fn a_job_past_its_time_limit_fails_as_timeout_with_its_log() {
    let Some(_cluster) = slurm() else {
        return;
    };
    let ws = Ws::new(
        "stages:\n  slow:\n    cmd: echo started; sleep 600; echo done > x.txt\n    outs: [x.txt]\n    resources: {time: 1}\n",
    );
    let out = ws.repro(&["run", "--runner", "slurm"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("TIMEOUT: it ran past its time limit"),
        "{said}"
    );
    assert!(said.contains("started"), "the log is shown: {said}");
    assert_eq!(ws.records(), 0);
    assert!(live_jobs(&ws).is_empty());
}

#[test]
fn ctrl_c_cancels_every_job_and_records_nothing() {
    let Some(_cluster) = slurm() else {
        return;
    };
    let ws = Ws::new(
        "stages:\n  a:\n    cmd: echo a > a.txt; sleep 600\n    outs: [a.txt]\n    resources: {cores: 1, memory: 100M}\n  b:\n    cmd: echo b > b.txt; sleep 600\n    outs: [b.txt]\n    resources: {cores: 1, memory: 100M}\n  c:\n    cmd: cat a.txt b.txt > c.txt\n    deps: [a.txt, b.txt]\n    outs: [c.txt]\n",
    );
    let run = spawn_run(&ws, &[]);
    wait_until(60, "both jobs run", || {
        progress(&ws, "a").ends_with(": RUNNING") && progress(&ws, "b").ends_with(": RUNNING")
    });
    assert_eq!(live_jobs(&ws).len(), 2, "{:?}", live_jobs(&ws));
    // SAFETY: kill has no preconditions.
    assert_eq!(unsafe { libc::kill(run.id() as i32, libc::SIGINT) }, 0);
    let t0 = std::time::Instant::now();
    let out = run.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    assert!(
        t0.elapsed().as_secs() < 30,
        "it stopped in {:?}",
        t0.elapsed()
    );
    assert!(live_jobs(&ws).is_empty(), "{:?}", live_jobs(&ws));
    assert_eq!(ws.records(), 0);
    for out in ["a.txt", "b.txt", "c.txt"] {
        assert!(!ws.root().join(out).exists(), "{out} is not a result");
    }
    assert!(!stdout(&ws.repro(&["status"])).contains("Slurm job"));
}

#[test]
fn the_runner_section_chooses_slurm_and_sizes_its_jobs() {
    let Some(_cluster) = slurm() else {
        return;
    };
    // Each stage notes its job, its time limit and the GPU Slurm gave it.
    let note = "echo \"$SLURM_JOB_ID $(squeue --noheader --format=%l --jobs=$SLURM_JOB_ID) gpu=$SLURM_JOB_GPUS\"";
    let ws = Ws::new(&format!(
        "runner:\n  kind: slurm\n  time: 2h\n  sbatch: [--comment=from-the-file]\n\
         stages:\n  plain:\n    cmd: {note} > plain.txt\n    outs: [plain.txt]\n  \
         gpu:\n    cmd: {note} > gpu.txt\n    outs: [gpu.txt]\n    resources: {{gpu: 1, time: 3}}\n"
    ));
    let out = ws.repro(&["run"]);
    assert!(out.status.success(), "{}", text(&out));
    let plain = ws.read("plain.txt");
    let gpu = ws.read("gpu.txt");
    assert!(plain.contains(" 2:00:00 gpu=\n"), "{plain}");
    assert!(gpu.contains(" 3:00 gpu=0\n"), "{gpu}");
    let id = plain.split(' ').next().unwrap();
    let job = std::process::Command::new("scontrol")
        .args(["show", "job", id])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&job.stdout).contains("Comment=from-the-file"));
    // The flag wins over the file.
    let out = ws.repro(&["run", "--runner", "local", "--force-all"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        ws.read("plain.txt").starts_with(' '),
        "no Slurm job: {}",
        ws.read("plain.txt")
    );
}

/// `scontrol show job` of each job Slurm still lists for a run in `ws` (ended ones stay listed
/// for MinJobAge, 300 s here).
fn jobs_shown(ws: &Ws) -> Vec<String> {
    let root = ws.root().canonicalize().unwrap();
    let prefix = repro::exec::slurm::run_prefix(&root);
    let out = std::process::Command::new("squeue")
        .args(["--states=all", "--noheader", "--format=%i|%j"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&prefix))
        .map(|l| {
            let id = l.split('|').next().unwrap().trim();
            let shown = std::process::Command::new("scontrol")
                .args(["show", "job", id])
                .output()
                .unwrap();
            String::from_utf8_lossy(&shown.stdout).into_owned()
        })
        .collect()
}

#[test]
fn a_built_in_train_stage_asks_slurm_for_its_gpu() {
    let Some(_cluster) = slurm() else {
        return;
    };
    let ws = Ws::new(&corpus_and_train(
        "ffn: sgatlin, d_model: 16, layers: 1, channels: 2, experts: 16, topk: 2, d_key: 8, \
         seq_len: 16, batch: 4, steps: 20, seed: 1",
        "    resources: {gpu: 1, cores: 1}\n",
    ));
    ws.write("stories.txt", &stories());
    let out = ws.repro(&["run", "--runner", "slurm"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(ws.root().join("models/tiny").is_dir());
    let jobs = jobs_shown(&ws);
    assert_eq!(jobs.len(), 3, "one job per stage: {jobs:?}");
    for job in jobs {
        let train = job.contains("/.repro/slurm/train.sh");
        assert_eq!(
            job.contains("gres:gpu:1"),
            train,
            "only train asks for a GPU: {job}"
        );
    }
}

#[test]
fn the_isoflop_smoke_pipeline_through_slurm_equals_the_local_run() {
    let Some(_cluster) = slurm() else {
        return;
    };
    let smoke = concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/isoflop-smoke.yaml");
    let run = |args: &[&str]| {
        let ws = Ws::new("stages: {}\n");
        let mut all = vec!["run", smoke];
        all.extend_from_slice(args);
        let out = ws.repro(&all);
        assert!(out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("29 ran"), "{}", text(&out));
        ws
    };
    let (local, cluster) = (run(&[]), run(&["--runner", "slurm"]));
    // Everything but the wall-clock columns, and every model's weights, byte for byte.
    let science = |ws: &Ws| -> Vec<String> {
        ws.read("results/isoflop-smoke.csv")
            .lines()
            .map(|l| l.split(',').take(14).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(science(&cluster), science(&local));
    assert_eq!(
        cluster.read("results/isoflop-smoke-best.csv"),
        local.read("results/isoflop-smoke-best.csv")
    );
    let models = walk(&local.root().join("models"));
    assert_eq!(
        models
            .iter()
            .filter(|m| m.ends_with("model.safetensors"))
            .count(),
        12
    );
    for m in models {
        let rel = m.strip_prefix(local.root()).unwrap();
        if rel.ends_with("model.safetensors") {
            let (a, b) = (
                std::fs::read(&m).unwrap(),
                std::fs::read(cluster.root().join(rel)).unwrap(),
            );
            assert!(a == b, "{} differs", rel.display());
        }
    }
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
