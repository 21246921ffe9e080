//! Damaged state and record files: said by `status`, `verify` and `run` (what the file was,
//! what repro does), set aside rather than deleted, and never taken as "never run" in silence:
//! the run cache still restores finished work.

mod common;
use common::*;
use std::path::PathBuf;

const STATE: &str = ".repro/state/repro.yaml.jsonl";

fn ran() -> Ws {
    let ws = diamond();
    assert_eq!(ws.run_ok(&[]), ["bottom", "left", "right", "top"]);
    ws
}

/// Files in `.repro/state/` whose name starts with `repro.yaml.jsonl.corrupt-`.
fn set_aside_states(ws: &Ws) -> Vec<PathBuf> {
    walk(&ws.root().join(".repro/state"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("repro.yaml.jsonl.corrupt-")
        })
        .collect()
}

fn damaged_state_is_said_set_aside_and_nothing_reruns(damage: &[u8], what: &str) {
    let ws = ran();
    let state = ws.root().join(STATE);
    let damaged = damage.to_vec();
    std::fs::write(&state, &damaged).unwrap();
    let warning = format!("warning: {STATE} is {what}");

    // status: the problem and its consequence, on stderr; every stage comes from the run cache.
    let out = ws.repro(&["status"]);
    assert!(out.status.success(), "{}", text(&out));
    let err = stderr(&out);
    assert!(err.contains(&warning), "{err}");
    assert!(
        err.contains("finished work is restored, not re-run")
            && err.contains("`repro run` moves the file aside"),
        "{err}"
    );
    assert!(
        stdout(&out).contains("0 up to date, 4 to restore, 0 to run"),
        "{}",
        stdout(&out)
    );

    // verify names the file and what repro will do, and fails.
    let out = ws.repro(&["verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stdout(&out).contains(&format!("unreadable: state file {STATE} is {what}"))
            && stdout(&out).contains("left in place; the next `repro run`"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("1 state files unreadable"));

    // run: moves the file aside (same bytes), says so, and runs nothing.
    let _ = std::fs::remove_file(&ws.calls);
    let out = ws.repro(&["run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(ws.calls().is_empty(), "nothing re-ran: {:?}", ws.calls());
    let err = stderr(&out);
    assert!(
        err.contains(&warning)
            && err.contains(&format!("moved aside to {STATE}.corrupt-"))
            && err.contains("finished work is restored, not re-run"),
        "{err}"
    );
    let aside = set_aside_states(&ws);
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        std::fs::read(&aside[0]).unwrap(),
        damaged,
        "kept, not deleted"
    );

    // The new state is whole: no warning, everything up to date, verify clean.
    let out = ws.repro(&["status"]);
    assert!(!stderr(&out).contains("warning"), "{}", text(&out));
    assert!(stdout(&out).contains("4 up to date"), "{}", text(&out));
    assert!(ws.run_ok(&[]).is_empty());
    assert!(ws.repro(&["verify"]).status.success());
}

/// A state log cut anywhere (a crash mid-append, a full disk) is not damaged: the stages of
/// its whole lines are up to date, those of the cut ones come back from the run cache, and
/// nothing runs or is set aside.
#[test]
fn a_cut_state_log_loses_only_its_last_lines() {
    let ws = ran();
    let state = ws.root().join(STATE);
    let full = std::fs::read(&state).unwrap();
    let header = full.iter().position(|&b| b == b'\n').unwrap() + 1;
    for cut in [header, header + 10, full.len() / 2, full.len() - 1] {
        std::fs::write(&state, &full[..cut]).unwrap();
        let whole = full[header..cut].iter().filter(|&&b| b == b'\n').count();
        let out = ws.repro(&["status"]);
        assert!(stderr(&out).is_empty(), "{}", text(&out));
        assert!(
            stdout(&out).contains(&format!(
                "{whole} up to date, {} to restore, 0 to run",
                4 - whole
            )),
            "cut at {cut}: {}",
            text(&out)
        );
        let _ = std::fs::remove_file(&ws.calls);
        assert!(ws.run_ok(&[]).is_empty(), "cut at {cut}: nothing ran");
        assert!(ws.calls().is_empty(), "{:?}", ws.calls());
        assert!(set_aside_states(&ws).is_empty());
        let out = ws.repro(&["status"]);
        assert!(stdout(&out).contains("4 up to date"), "{}", text(&out));
    }
}

#[test]
fn garbage_state_file() {
    damaged_state_is_said_set_aside_and_nothing_reruns(
        b"\x00\x01 not json at all",
        "not a repro state log (line 1 is not",
    );
}

#[test]
fn state_file_of_the_wrong_shape() {
    damaged_state_is_said_set_aside_and_nothing_reruns(
        b"{\"repro_state\":1}\n{\"stages\": [1, 2, 3]}\n",
        "valid JSON of the wrong shape",
    );
}

#[test]
fn a_damaged_line_in_the_middle_of_the_state_log() {
    let ws = ran();
    let text = std::fs::read_to_string(ws.root().join(STATE)).unwrap();
    let damaged = text.replacen("\"key\":", "\"key\" ", 2);
    damaged_state_is_said_set_aside_and_nothing_reruns(
        damaged.as_bytes(),
        "not valid JSON (line 1, column",
    );
}

#[test]
fn empty_state_file() {
    damaged_state_is_said_set_aside_and_nothing_reruns(b" ", "not valid JSON (truncated?)");
}

#[test]
fn show_and_log_say_the_state_file_is_damaged() {
    let ws = ran();
    std::fs::write(ws.root().join(STATE), "{").unwrap();
    let out = ws.repro(&["show"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stderr(&out).contains(&format!("warning: {STATE} is not valid JSON (truncated?)")),
        "{}",
        text(&out)
    );
    std::fs::remove_file(ws.root().join(".repro/logs/top.log")).unwrap();
    let out = ws.repro(&["log", "top"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&format!("{STATE} is not valid JSON")),
        "{}",
        text(&out)
    );
}

#[test]
fn gc_workspace_only_refuses_while_a_state_file_is_damaged() {
    let ws = ran();
    ws.write("data/side.txt", "v2\n");
    ws.run_ok(&[]);
    let records = ws.records();
    std::fs::write(ws.root().join(STATE), "{").unwrap();
    let out = ws.repro(&["gc", "--workspace-only"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains(&format!("{STATE} is not valid JSON (truncated?)"))
            && stderr(&out).contains("nothing was collected"),
        "{}",
        text(&out)
    );
    assert_eq!(ws.records(), records, "no record was dropped");
    // Once a run has rebuilt the state, it collects the old result.
    assert!(ws.run_ok(&[]).is_empty());
    let out = ws.repro(&["gc", "--workspace-only"]);
    assert!(
        stdout(&out).contains("kept 4 records; removed 2 records no pipeline here uses, "),
        "{}",
        text(&out)
    );
}

/// The record file written for stage `stage` (the only one: call before re-running it).
fn record_of(ws: &Ws, stage: &str) -> PathBuf {
    let found: Vec<PathBuf> = walk(&ws.root().join("cache/records"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .filter(|p| {
            let r: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
            r["stage"] == stage
        })
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

fn damage(path: &std::path::Path, bytes: &[u8]) {
    let mut perm = std::fs::metadata(path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(path, perm).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn damaged_record_runs_its_stage_and_the_run_cache_restores_the_rest() {
    let ws = ran();
    let right = record_of(&ws, "right");
    let key = right.file_stem().unwrap().to_string_lossy().into_owned();
    damage(&right, b"{\"key\": \"");

    // Switch to another input and back: `right` would be restored, but its record is bad.
    ws.write("data/side.txt", "v2\n");
    assert_eq!(ws.run_ok(&[]), ["bottom", "right"]);
    ws.write("data/side.txt", "side\n");
    let out = ws.repro(&["status"]);
    let s = stdout(&out);
    let line = s.lines().find(|l| l.starts_with("right ")).unwrap();
    assert!(
        line.contains("run ")
            && line.contains(
                "its record in the cache is not valid JSON (truncated?): it runs again and a new \
                 record replaces the bad one"
            ),
        "{s}"
    );
    assert!(
        s.contains("bottom  run         after upstream `right`"),
        "{s}"
    );

    // Only `right` runs; its output is the same as before, so `bottom` is restored.
    let _ = std::fs::remove_file(&ws.calls);
    let out = ws.repro(&["run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(ws.calls(), ["right"]);
    assert!(stderr(&out).contains("restored  bottom"), "{}", text(&out));
    assert_eq!(ws.read("bottom.txt"), "HELLO\none\nHELLO\nside\n");
    assert!(
        ws.repro(&["verify"]).status.success(),
        "the new record replaced the bad one"
    );

    // verify sets a bad record aside (kept for inspection) and says what happens next.
    damage(&right, b"[]");
    let out = ws.repro(&["verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let moved = format!("cache/corrupt/records/{key}.json");
    assert!(
        stdout(&out).contains(&format!(
            "unreadable: record {key} is valid JSON of the wrong shape"
        )) && stdout(&out).contains(&format!(
            "moved to {moved}; its stage runs again and writes a new one"
        )),
        "{}",
        text(&out)
    );
    assert!(
        stdout(&out).contains(": 0 corrupt, 0 records incomplete, 1 records unreadable\n"),
        "{}",
        text(&out)
    );
    assert_eq!(ws.read(&moved), "[]");
    assert!(!right.exists());
    assert!(ws.repro(&["verify"]).status.success());
}
