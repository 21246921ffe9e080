//! The commit point: a stage's objects are stored first and its record last, so a crash between
//! the two leaves a stage that runs again, and a crash after the record leaves a result that is
//! restored. A corrupt object met during a restore makes the stage run again.

mod common;
use common::*;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;

const TWO: &str = r#"
stages:
  a:
    cmd: echo a >> "$CALLS" && echo A > a.txt
    outs: [a.txt]
  b:
    cmd: echo b >> "$CALLS" && tr A-Z a-z < a.txt > b.txt
    deps: [a.txt]
    outs: [b.txt]
"#;

/// Writes in flight anywhere in the workspace (the store's included): staging names beside
/// outs, temp names beside state files, anything in the store's `tmp/`.
fn temp_files(ws: &Ws) -> Vec<PathBuf> {
    let root = ws.root();
    let store_tmp = root.join("cache/tmp");
    walk(&root)
        .into_iter()
        .filter(|p| {
            p.starts_with(&store_tmp)
                || p.iter().any(|c| {
                    let c = c.to_string_lossy();
                    c.ends_with(".repro-tmp") || c.ends_with(".tmp")
                })
        })
        .collect()
}

fn verify_clean(ws: &Ws) {
    let out = ws.repro(&["verify"]);
    let s = text(&out);
    assert!(out.status.success(), "{s}");
    assert!(
        s.lines()
            .any(|l| l.ends_with(": 0 corrupt, 0 records incomplete")),
        "{s}"
    );
}

/// Runs TWO with `REPRO_FAILPOINT=point`: repro kills itself in stage a, before b starts.
fn crash_at(point: &str) -> Ws {
    let ws = Ws::new(TWO);
    let out = ws
        .cmd(&["run"])
        .env("REPRO_FAILPOINT", point)
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "repro should die by SIGKILL at {point}: {:?}\n{}",
        out.status,
        text(&out)
    );
    assert_eq!(ws.calls(), ["a"], "b never started");
    assert_eq!(ws.read("a.txt"), "A\n");
    assert_eq!(temp_files(&ws), Vec::<PathBuf>::new());
    ws
}

#[test]
fn killed_after_storing_objects_before_the_record_runs_again() {
    let ws = crash_at("stored-objects");
    assert_eq!(walk(&ws.root().join("cache/objects")).len(), 1, "a's out");
    assert_eq!(count_files(&ws.root().join("cache/records"), "log"), 1);
    assert_eq!(ws.records(), 0, "no record was written");
    let s = text(&ws.repro(&["status"]));
    assert_eq!(
        status_of(&s, "a"),
        ("run".into(), "never run in this workspace".into())
    );

    std::fs::remove_file(&ws.calls).unwrap();
    let out = ws.repro(&["run"]);
    let s = text(&out);
    assert!(out.status.success(), "{s}");
    assert_eq!(ws.calls(), ["a", "b"], "a ran again:\n{s}");
    assert_eq!(stages_in(&s, "ran"), ["a", "b"], "{s}");
    assert_eq!(ws.read("b.txt"), "a\n");
    assert_eq!(ws.records(), 2);
    assert_eq!(temp_files(&ws), Vec::<PathBuf>::new());
    verify_clean(&ws);
}

#[test]
fn killed_after_the_record_restores_the_stage() {
    let ws = crash_at("stored-record");
    assert_eq!(ws.records(), 1, "a's record was written");
    let s = text(&ws.repro(&["status"]));
    assert_eq!(
        status_of(&s, "a"),
        (
            "restore".into(),
            "never run in this workspace; this exact input was run before".into()
        ),
        "{s}"
    );
    assert_eq!(
        status_of(&s, "b"),
        ("run".into(), "never run in this workspace".into())
    );

    a_is_restored_and_b_runs(&ws);
    assert_eq!(ws.read("a.txt"), "A\n");
    assert_eq!(ws.read("b.txt"), "a\n");
    assert_eq!(ws.records(), 2);
    assert_eq!(temp_files(&ws), Vec::<PathBuf>::new());
    verify_clean(&ws);
}

/// After a crash in stage a's commit: the next run restores a and runs b only.
fn a_is_restored_and_b_runs(ws: &Ws) {
    std::fs::remove_file(&ws.calls).unwrap();
    let out = ws.repro(&["run"]);
    let s = text(&out);
    assert!(out.status.success(), "{s}");
    assert_eq!(ws.calls(), ["b"], "a was not run again:\n{s}");
    assert_eq!(stages_in(&s, "restored"), ["a"], "{s}");
    assert_eq!(stages_in(&s, "ran"), ["b"], "{s}");
}

const SWITCH: &str = r#"
params: {p: one}
stages:
  a:
    cmd: echo a >> "$CALLS" && echo ${params.p} > a.txt
    outs: [a.txt]
"#;

#[test]
fn a_corrupt_object_met_during_a_restore_runs_the_stage_again() {
    let ws = Ws::new(SWITCH);
    assert_eq!(ws.run_ok(&[]), ["a"]);
    // The object of a.txt = "one", named by the only record.
    let records: Vec<PathBuf> = walk(&ws.root().join("cache/records"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert_eq!(records.len(), 1);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&records[0]).unwrap()).unwrap();
    assert_eq!(record["outs"][0]["path"], "a.txt", "{record}");
    let hash = record["outs"][0]["hash"].as_str().unwrap().to_string();
    let object = ws
        .root()
        .join("cache/objects")
        .join(&hash[..2])
        .join(&hash[2..]);
    assert_eq!(std::fs::read_to_string(&object).unwrap(), "one\n");

    assert_eq!(ws.run_ok(&["-S", "p=two"]), ["a"]);
    // Same size, other bytes; objects are read-only.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&object, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&object, "on3\n").unwrap();

    // Status reads no objects: it expects a restore.
    let s = text(&ws.repro(&["status"]));
    assert_eq!(
        status_of(&s, "a"),
        (
            "restore".into(),
            "param.p: two → one; this exact input was run before".into()
        ),
        "{s}"
    );
    // No `verify` first: the restore meets the corrupt object, and the stage runs instead.
    std::fs::remove_file(&ws.calls).unwrap();
    let out = ws.repro(&["run"]);
    let s = text(&out);
    assert!(out.status.success(), "{s}");
    assert_eq!(ws.calls(), ["a"], "{s}");
    assert_eq!(stages_in(&s, "ran"), ["a"], "{s}");
    assert_eq!(stages_in(&s, "restored"), Vec::<String>::new(), "{s}");
    assert_eq!(ws.read("a.txt"), "one\n");
    let corrupt = ws.root().join("cache/corrupt").join(&hash);
    assert_eq!(
        std::fs::read_to_string(&corrupt).unwrap(),
        "on3\n",
        "the corrupt object is set aside"
    );
    assert_eq!(
        std::fs::read_to_string(&object).unwrap(),
        "one\n",
        "the run stored a good copy"
    );
    assert_eq!(temp_files(&ws), Vec::<PathBuf>::new());
    verify_clean(&ws);
}

/// The lines of the state log (the header first).
fn state_lines(ws: &Ws) -> Vec<String> {
    let text = std::fs::read_to_string(ws.root().join(".repro/state/repro.yaml.jsonl")).unwrap();
    text.split_inclusive('\n').map(String::from).collect()
}

#[test]
fn killed_while_appending_to_the_state_restores_the_stage() {
    let ws = crash_at("state-append");
    let lines = state_lines(&ws);
    assert!(
        !lines.last().unwrap().ends_with('\n'),
        "half of a's line: {lines:?}"
    );
    let s = text(&ws.repro(&["status"]));
    assert!(
        !s.contains("warning"),
        "a torn last line is not damage: {s}"
    );
    assert_eq!(status_of(&s, "a").0, "restore", "{s}");

    a_is_restored_and_b_runs(&ws);
    let lines = state_lines(&ws);
    assert_eq!(
        lines.len(),
        3,
        "header, a, b: the torn half is gone: {lines:?}"
    );
    assert!(lines.iter().all(|l| l.ends_with("}\n")), "{lines:?}");
    assert!(ws.run_ok(&[]).is_empty());
    verify_clean(&ws);
}

#[test]
fn killed_while_compacting_the_state_loses_nothing() {
    let ws = Ws::new(TWO);
    assert_eq!(ws.run_ok(&[]), ["a", "b"]);
    // The log as 600 runs of both stages would leave it: past twice its stages, due for
    // compaction at the next append.
    let lines = state_lines(&ws);
    let padded = lines[0].clone() + &lines[1..].concat().repeat(600);
    let log = ws.root().join(".repro/state/repro.yaml.jsonl");
    std::fs::write(&log, &padded).unwrap();

    std::fs::remove_file(&ws.calls).unwrap();
    let out = ws
        .cmd(&["run", "--force", "a"])
        .env("REPRO_FAILPOINT", "state-compacting")
        .output()
        .unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{}", text(&out));
    assert_eq!(ws.calls(), ["a"]);
    let after = std::fs::read_to_string(&log).unwrap();
    assert!(
        after.starts_with(&padded) && after.len() > padded.len(),
        "the long log, with a's new line, is still the state"
    );
    let s = text(&ws.repro(&["status"]));
    assert!(!s.contains("warning"), "{s}");
    assert!(s.contains("2 up to date"), "{s}");
    assert!(ws.run_ok(&[]).is_empty(), "nothing runs again");

    // The next append compacts: one line per stage, and no temp file left.
    assert_eq!(ws.run_ok(&["--force", "a"]), ["a"]);
    assert_eq!(state_lines(&ws).len(), 3, "header, a, b");
    let state_dir: Vec<PathBuf> = walk(&ws.root().join(".repro/state"));
    assert_eq!(state_dir, [log], "{state_dir:?}");
    assert!(ws.run_ok(&[]).is_empty());
    verify_clean(&ws);
}
