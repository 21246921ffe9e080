//! Parallel stages, resource slots, failures, locks and interruption.

mod common;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn independent_stages_run_in_parallel() {
    let ws = Ws::new(
        r#"
stages:
  a: {cmd: sleep 2 && echo a > a.txt, outs: [a.txt]}
  b: {cmd: sleep 2 && echo b > b.txt, outs: [b.txt]}
"#,
    );
    let t0 = Instant::now();
    ws.run_ok(&["--jobs", "2"]);
    let wall = t0.elapsed();
    // The timing only means something if both stages did run.
    assert_eq!(
        (ws.read("a.txt"), ws.read("b.txt")),
        ("a\n".into(), "b\n".into())
    );
    assert!(
        wall < Duration::from_millis(3800),
        "two 2 s stages took {wall:?} with --jobs 2"
    );
}

/// Each stage logs its start and end time; returns (start, end) per stage.
fn intervals(ws: &Ws) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    for name in ["g1", "g2", "cpu"] {
        let t = ws.read(&format!("{name}.txt"));
        let v: Vec<f64> = t.split_whitespace().map(|x| x.parse().unwrap()).collect();
        out.push((v[0], v[1]));
    }
    out
}

#[test]
fn a_gpu_slot_keeps_gpu_stages_apart() {
    let stage = |name: &str, res: &str| {
        format!("  {name}:\n    cmd: (date +%s.%N; sleep 1; date +%s.%N) > {name}.txt\n    outs: [{name}.txt]\n    resources: {res}\n")
    };
    let ws = Ws::new(&format!(
        "stages:\n{}{}{}",
        stage("g1", "{gpu: 1}"),
        stage("g2", "{gpu: 1}"),
        stage("cpu", "{}")
    ));
    ws.run_ok(&["--jobs", "3", "--resources", "gpu=1"]);
    let iv = intervals(&ws);
    let (g1, g2, cpu) = (iv[0], iv[1], iv[2]);
    assert!(
        g1.1 <= g2.0 || g2.1 <= g1.0,
        "GPU stages overlapped: {g1:?} {g2:?}"
    );
    let overlaps = |a: (f64, f64), b: (f64, f64)| a.0 < b.1 && b.0 < a.1;
    assert!(
        overlaps(cpu, g1) || overlaps(cpu, g2),
        "the CPU stage should run beside a GPU stage"
    );

    let out = ws.repro(&["run", "--resources", "gpu=1", "--force-all", "-S", "x=1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let ws2 = Ws::new("stages:\n  big: {cmd: 'true', resources: {gpu: 2}}\n");
    let out = ws2.repro(&["run", "--resources", "gpu=1"]);
    assert!(
        text(&out).contains("needs gpu=2, but only 1"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_failure_stops_descendants_not_siblings() {
    let pipeline = r#"
stages:
  bad: {cmd: echo bad >> "$CALLS" && echo oops >&2 && exit 3, outs: [bad.txt]}
  child: {cmd: echo child >> "$CALLS" && cat bad.txt > child.txt, deps: [bad.txt], outs: [child.txt]}
  slow: {cmd: sleep 0.5 && echo slow >> "$CALLS" && echo ok > slow.txt, outs: [slow.txt]}
  after_slow: {cmd: echo after_slow >> "$CALLS" && cp slow.txt after.txt, deps: [slow.txt], outs: [after.txt]}
"#;
    let ws = Ws::new(pipeline);
    let out = ws.repro(&["run", "--jobs", "2", "--keep-going"]);
    let s = text(&out);
    assert_eq!(out.status.code(), Some(1), "{s}");
    let line = |stage: &str| {
        stage_lines(&s)
            .into_iter()
            .find(|l| l.stage == stage)
            .map(|l| (l.state, l.detail))
            .unwrap_or_else(|| panic!("no line for `{stage}`:\n{s}"))
    };
    assert_eq!(
        line("bad"),
        (
            "failed".into(),
            "exit code 3; log: .repro/logs/bad.log".into()
        )
    );
    assert_eq!(
        line("child"),
        ("blocked".into(), "upstream `bad` failed".into())
    );
    assert_eq!(ws.calls(), ["after_slow", "bad", "slow"]);
    assert_eq!(text(&ws.repro(&["log", "bad"])).trim(), "oops");
    assert_eq!(
        ws.records(),
        2,
        "only the stages that succeeded are recorded"
    );

    // Without --keep-going, nothing new starts after the failure (a running sibling finishes).
    let ws = Ws::new(pipeline);
    let out = ws.repro(&["run", "--jobs", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        !ws.calls().contains(&"after_slow".to_string()),
        "{:?}",
        ws.calls()
    );
}

#[test]
fn a_stage_that_writes_no_output_fails() {
    let ws = Ws::new("stages:\n  lazy: {cmd: 'true', outs: [never.txt]}\n");
    let out = ws.repro(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("did not write `never.txt`"),
        "{}",
        text(&out)
    );
    assert_eq!(ws.records(), 0);
}

const SLOW: &str = r#"
stages:
  slow:
    cmd: echo slow >> "$CALLS" && echo partial > out.txt && if [ ! -e "$FAST" ]; then sleep "$NAP"; fi && echo done >> out.txt
    outs: [out.txt]
"#;

/// `nap` seconds identify this test's sleeping stage among concurrent tests.
fn interrupted_run_recovers(signal: i32, nap: &str) {
    let ws = Ws::new(SLOW);
    let fast = ws.dir.path().join("fast");
    let mut child = ws
        .cmd(&["run"])
        .env("FAST", &fast)
        .env("NAP", nap)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&ws.root().join("out.txt"));
    // The stage's processes carry the run's token: the check below can see them.
    let token = run_token(&ws);
    assert!(
        !processes_of_run(&token).is_empty(),
        "the stage of run {token} is not found in /proc"
    );
    unsafe { libc::kill(child.id() as i32, signal) };
    let status = child.wait().unwrap();
    if signal == libc::SIGINT {
        assert_eq!(status.code(), Some(130), "Ctrl-C exits 130");
    } else {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(signal), "{status:?}");
    }
    assert_eq!(
        ws.records(),
        0,
        "nothing is recorded for an interrupted stage"
    );
    let status_out = text(&ws.repro(&["status"]));
    assert_eq!(
        status_of(&status_out, "slow"),
        ("run".into(), "never run in this workspace".into()),
        "{status_out}"
    );

    std::fs::write(&fast, "").unwrap();
    let out = ws.cmd(&["run"]).env("FAST", &fast).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(ws.read("out.txt"), "partial\ndone\n");
    assert_eq!(ws.calls(), ["slow", "slow"], "the stage ran again");
    assert_eq!(ws.records(), 1);
    // A killed repro leaves its stage's sleep behind; the next run stops it.
    assert_eq!(
        text(&out).contains("leftover process(es) of a run that crashed"),
        signal == libc::SIGKILL,
        "{}",
        text(&out)
    );
    // No process of the first run survives it.
    assert_run_gone(&token, 5);
}

#[test]
fn sigkill_mid_stage_then_rerun() {
    interrupted_run_recovers(libc::SIGKILL, "31");
}

#[test]
fn sigint_mid_stage_then_rerun() {
    interrupted_run_recovers(libc::SIGINT, "32");
}

#[test]
fn ctrl_c_kills_a_stage_that_ignores_sigterm() {
    // Ignoring TERM is inherited by the sleep; its length marks this test's process.
    let nap = format!("60.{}", std::process::id());
    let ws = Ws::new(&format!(
        "stages:\n  stubborn:\n    cmd: trap '' TERM; echo started > started.txt; sleep {nap}; echo done > out.txt\n    outs: [out.txt]\n"
    ));
    let child = ws
        .cmd(&["run"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&ws.root().join("started.txt"));
    let token = run_token(&ws);
    let sleep = ["sleep", nap.as_str()];
    // Positive control: both scans below see the stage's sleep while it runs.
    let t0 = Instant::now();
    while {
        let sleeping = processes_running(&sleep);
        sleeping.is_empty() || !processes_of_run(&token).contains(&sleeping[0])
    } {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the stage's `sleep {nap}` is not found in /proc"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let t0 = Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let took = t0.elapsed();
    let s = text(&out);
    assert_eq!(out.status.code(), Some(130), "Ctrl-C exits 130:\n{s}");
    assert!(
        took < Duration::from_secs(15),
        "repro took {took:?} to stop a stage that ignores SIGTERM"
    );
    assert!(
        took >= Duration::from_secs(2),
        "stopped after {took:?}: SIGTERM was not ignored, so SIGKILL was never needed"
    );
    assert_run_gone(&token, 2);
    assert_eq!(processes_running(&sleep), Vec::<i32>::new());
    assert_eq!(
        stage_lines(&s)
            .into_iter()
            .map(|l| (l.state, l.stage, l.detail))
            .collect::<Vec<_>>(),
        [("stopped".into(), "stubborn".into(), "interrupted".into())],
        "{s}"
    );
    assert_eq!(ws.records(), 0, "nothing is recorded for a stopped stage");
    assert!(!ws.root().join("out.txt").exists());
    let status = text(&ws.repro(&["status"]));
    assert_eq!(
        status_of(&status, "stubborn"),
        ("run".into(), "never run in this workspace".into()),
        "{status}"
    );
}

#[test]
fn one_writer_per_workspace() {
    let ws = Ws::new(SLOW);
    let fast = ws.dir.path().join("fast");
    let mut first = ws
        .cmd(&["run"])
        .env("FAST", &fast)
        .env("NAP", "33")
        .spawn()
        .unwrap();
    wait_for(&ws.root().join("out.txt"));
    let out = ws.repro(&["run", "--no-wait"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("the workspace is busy: pid"),
        "{}",
        text(&out)
    );
    // A waiting run proceeds once the holder is gone, even if it was killed.
    let second = ws
        .cmd(&["run"])
        .env("FAST", &fast)
        .env("NAP", "33")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The first run's stage is already asleep; the second run's must not be.
    std::fs::write(&fast, "").unwrap();
    unsafe { libc::kill(first.id() as i32, libc::SIGKILL) };
    first.wait().unwrap();
    let out = second.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("waiting for the workspace lock"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_run_waiting_for_the_lock_sees_what_the_holder_recorded() {
    // `slow` waits for a file, so the second run reads the state while the first still runs.
    let ws = Ws::new(
        "stages:\n  slow:\n    cmd: echo slow >> \"$CALLS\"; while [ ! -e \"$GO\" ]; do sleep 0.05; done; echo s > s.txt\n    outs: [s.txt]\n",
    );
    let go = ws.dir.path().join("go");
    let first = ws.cmd(&["run"]).env("GO", &go).spawn().unwrap();
    wait_for(&ws.calls);
    let second = ws
        .cmd(&["run"])
        .env("GO", &go)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&go, "").unwrap();
    assert!(first.wait_with_output().unwrap().status.success());
    let out = second.wait_with_output().unwrap();
    let s = text(&out);
    assert!(out.status.success(), "{s}");
    assert!(s.contains("waiting for the workspace lock"), "{s}");
    assert!(s.contains("0 ran, 0 restored, 1 up to date"), "{s}");
    assert_eq!(ws.calls(), ["slow"]);
    let log = ws.read(".repro/state/repro.yaml.jsonl");
    assert_eq!(log.lines().count(), 2, "header and one record: {log}");
}
