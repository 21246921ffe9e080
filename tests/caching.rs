//! Re-running only what changed: the diamond pipeline of the engine issue.

mod common;
use common::*;
use std::process::Command;

#[test]
fn diamond_runs_only_what_changed() {
    let ws = diamond();
    assert_eq!(ws.run_ok(&[]), ["bottom", "left", "right", "top"]);
    assert_eq!(ws.read("bottom.txt"), "HELLO\none\nHELLO\nside\n");
    assert!(ws.run_ok(&[]).is_empty(), "a second run runs nothing");

    // An edit re-runs exactly what is downstream of it.
    ws.write("data/side.txt", "other\n");
    assert_eq!(ws.run_ok(&[]), ["bottom", "right"]);
    assert_eq!(ws.read("bottom.txt"), "HELLO\none\nHELLO\nother\n");

    // Reverting the edit restores from the run cache without running anything.
    ws.write("data/side.txt", "side\n");
    assert!(ws.run_ok(&[]).is_empty());
    assert_eq!(ws.read("bottom.txt"), "HELLO\none\nHELLO\nside\n");

    // A param re-runs only the stages that use it (and what depends on their outputs).
    assert_eq!(ws.run_ok(&["-S", "suffix=two"]), ["bottom", "left"]);
    assert_eq!(ws.read("left.txt"), "HELLO\ntwo\n");
    assert!(
        ws.run_ok(&["-S", "unused=6", "-S", "suffix=two"])
            .is_empty(),
        "an unreferenced param changes nothing"
    );

    // Touching a dep without changing it re-runs nothing.
    let f = std::fs::File::options()
        .append(true)
        .open(ws.root().join("data/in.txt"))
        .unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    assert!(ws.run_ok(&["-S", "suffix=two"]).is_empty());
}

/// (path, size, modification time, inode) of every file under `.repro/` and `cache/`, but the
/// stat cache (a run may learn file stats even when nothing runs) and the lock (whose holder
/// names itself in it, unsynced, for a second run to report).
fn metadata_of_repros_files(ws: &Ws) -> Vec<(String, u64, std::time::SystemTime, u64)> {
    use std::os::unix::fs::MetadataExt;
    let root = ws.root();
    let mut all: Vec<_> = [".repro", "cache"]
        .iter()
        .flat_map(|d| walk(&root.join(d)))
        .filter(|p| !p.ends_with(".repro/statcache") && !p.ends_with(".repro/lock"))
        .map(|p| {
            let m = std::fs::metadata(&p).unwrap();
            let rel = p.strip_prefix(&root).unwrap().display().to_string();
            (rel, m.len(), m.modified().unwrap(), m.ino())
        })
        .collect();
    all.sort();
    all
}

#[test]
fn a_no_op_run_writes_nothing() {
    let ws = diamond();
    ws.run_ok(&[]);
    let before = metadata_of_repros_files(&ws);
    assert!(
        before.iter().any(|f| f.0.starts_with(".repro/state/")),
        "{before:?}"
    );
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(ws.run_ok(&[]), Vec::<String>::new());
    assert_eq!(
        before,
        metadata_of_repros_files(&ws),
        "a no-op run rewrote a file"
    );
    assert!(!ws.root().join(".repro/running").exists());
    // A run that does something still records it.
    ws.write("data/in.txt", "changed\n");
    assert!(!ws.run_ok(&[]).is_empty());
    assert_ne!(before, metadata_of_repros_files(&ws));
}

#[test]
fn upstream_rerun_with_identical_output_stops_there() {
    let ws = diamond();
    ws.run_ok(&[]);
    // Same letters in another case: `top` re-runs and writes the same bytes.
    ws.write("data/in.txt", "HELLO\n");
    assert_eq!(ws.run_ok(&[]), ["top"]);
}

#[test]
fn status_explains_every_decision() {
    let ws = diamond();
    ws.run_ok(&[]);
    ws.write("data/side.txt", "changed\n");
    std::fs::remove_file(ws.root().join("left.txt")).unwrap();
    std::fs::remove_file(&ws.calls).unwrap();
    let out = ws.repro(&["status", "-S", "suffix=three"]);
    let s = text(&out);
    assert!(out.status.success(), "{s}");
    let line = |name: &str| status_of(&s, name);
    assert_eq!(line("top"), ("up to date".into(), "".into()));
    assert_eq!(
        line("left"),
        ("run".into(), "param.suffix: one → three".into())
    );
    assert_eq!(
        line("right"),
        ("run".into(), "dep `data/side.txt` changed".into())
    );
    assert_eq!(
        line("bottom"),
        ("run".into(), "after upstream `left`, `right`".into())
    );
    assert!(ws.calls().is_empty(), "status runs nothing");

    // A deleted out of an unchanged stage is restored, not re-run.
    let out = ws.repro(&["status"]);
    assert_eq!(
        status_of(&text(&out), "left"),
        ("restore".into(), "out `left.txt` is missing".into())
    );
    ws.write("data/side.txt", "side\n");
    assert!(ws.run_ok(&[]).is_empty());
    assert_eq!(ws.read("left.txt"), "HELLO\none\n");
}

#[test]
fn outputs_edited_in_place_never_corrupt_the_cache() {
    let ws = diamond();
    ws.run_ok(&[]);
    ws.write("top.txt", "vandalised\n");
    assert!(
        ws.run_ok(&[]).is_empty(),
        "the edited out is restored from the cache"
    );
    assert_eq!(ws.read("top.txt"), "HELLO\n");
}

#[test]
fn force_only_and_dry_run() {
    let ws = diamond();
    ws.run_ok(&[]);
    assert_eq!(ws.run_ok(&["--force", "left"]), ["left"]);
    assert_eq!(
        ws.run_ok(&["--force-all"]),
        ["bottom", "left", "right", "top"]
    );
    ws.write("data/in.txt", "again\n");
    std::fs::remove_file(&ws.calls).unwrap();
    let out = ws.repro(&["run", "--dry-run"]);
    assert_eq!(
        status_of(&text(&out), "top"),
        ("run".into(), "dep `data/in.txt` changed".into())
    );
    assert!(ws.calls().is_empty(), "a dry run runs nothing");
    assert_eq!(ws.run_ok(&["--only", "left"]), ["left", "top"]);
    assert_eq!(ws.run_ok(&[]), ["bottom", "right"]);
}

#[test]
fn matrix_expands_and_table_gathers_metrics() {
    let ws = Ws::new(
        r#"
params: {sizes: [1, 2, 3]}
stages:
  train:
    matrix: {kind: [a, b], size: "${params.sizes}"}
    cmd: >-
      printf '{"loss": %d, "nested": {"x": 1}}' $((${matrix.size} * 10))
      > m-${matrix.kind}-${matrix.size}.json
    metrics: m-${matrix.kind}-${matrix.size}.json
  results:
    uses: table
    needs: [train]
    with: {sort: [kind, size]}
    outs: [results/table.csv]
"#,
    );
    ws.run_ok(&["-j", "2"]);
    let csv = ws.read("results/table.csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "stage,kind,size,loss,nested.x");
    assert_eq!(lines.len(), 7, "{csv}");
    assert_eq!(lines[1], "\"train@kind=a,size=1\",a,1,10,1");
    assert_eq!(lines[6], "\"train@kind=b,size=3\",b,3,30,1");
    let show = text(&ws.repro(&["show", "--csv"]));
    assert!(show.contains("\"train@kind=b,size=2\""), "{show}");
    assert!(
        show.lines()
            .any(|l| l.contains("size=2") && l.ends_with(",20,1")),
        "{show}"
    );
}

#[test]
fn corrupt_objects_are_named_and_never_restored() {
    let ws = diamond();
    ws.run_ok(&[]);
    // Corrupt every stored object by one byte.
    for obj in walk(&ws.root().join("cache/objects")) {
        let mut perm = std::fs::metadata(&obj).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(&obj, perm).unwrap();
        let mut bytes = std::fs::read(&obj).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&obj, bytes).unwrap();
    }
    let out = ws.repro(&["verify"]);
    let s = text(&out);
    assert_eq!(out.status.code(), Some(1), "{s}");
    assert_eq!(s.matches("corrupt: object").count(), 4, "{s}");

    // The out is gone from the workspace and its object is bad: the stage runs again.
    std::fs::remove_file(ws.root().join("top.txt")).unwrap();
    assert_eq!(ws.run_ok(&[]), ["top"]);
    assert_eq!(ws.read("top.txt"), "HELLO\n");
    // The quarantined objects of left, right and bottom are gone: their records are incomplete.
    let out = ws.repro(&["verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out)
            .lines()
            .any(|l| l.ends_with(": 0 corrupt, 3 records incomplete")),
        "{}",
        text(&out)
    );
}

#[test]
fn gc_keeps_what_records_need() {
    let ws = diamond();
    ws.run_ok(&[]);
    ws.write("data/side.txt", "v2\n");
    ws.run_ok(&[]);
    let out = ws.repro(&["gc"]);
    assert!(
        text(&out)
            .lines()
            .any(|l| l.starts_with("kept 6 records; removed 0 objects ")),
        "{}",
        text(&out)
    );
    let out = ws.repro(&["gc", "--workspace-only"]);
    assert!(
        text(&out)
            .lines()
            .any(|l| l.starts_with("kept 4 records; removed ")),
        "{}",
        text(&out)
    );
    ws.write("data/side.txt", "side\n");
    assert_eq!(
        ws.run_ok(&[]),
        ["bottom", "right"],
        "the old result was collected, so it runs"
    );
    assert!(ws.repro(&["verify"]).status.success());
}

#[test]
fn a_metric_named_like_a_param_never_hides_it() {
    let ws = Ws::new(
        "stages:\n  tr:\n    matrix: {m: [a, b]}\n    cmd: 'echo \"{\\\"m\\\": \\\"shadow\\\", \\\"loss\\\": 1}\" > m-${matrix.m}.json'\n    metrics: 'm-${matrix.m}.json'\n  t:\n    uses: table\n    needs: [tr]\n    outs: [t.csv]\n",
    );
    ws.run_ok(&[]);
    let csv = ws.read("t.csv");
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let m = header.iter().position(|c| *c == "m").expect("column m");
    let shadow = header
        .iter()
        .position(|c| *c == "metrics.m")
        .expect("column metrics.m");
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let mut ms: Vec<&str> = rows.iter().map(|r| r[m]).collect();
    ms.sort();
    assert_eq!(ms, ["a", "b"], "{csv}");
    assert!(rows.iter().all(|r| r[shadow] == "shadow"), "{csv}");
    let show = ws.repro(&["show"]);
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(show.contains("metrics.m"), "{show}");
}

/// When `.repro/plans/repro.yaml.json` was last written (and its inode), or None.
fn plan_written(ws: &Ws) -> Option<(std::time::SystemTime, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(ws.root().join(".repro/plans/repro.yaml.json")).ok()?;
    Some((m.modified().unwrap(), m.ino()))
}

const PLANNED: &str = r#"
params: {p: one}
stages:
  a:
    cmd: echo a >> "$CALLS" && echo ${params.p} > o/a.txt
    outs: [o/a.txt]
  b:
    cmd: echo b >> "$CALLS" && (cat o/a.txt; echo "$FOO") > o/b.txt
    deps: [o/a.txt]
    outs: [o/b.txt]
    env: [FOO]
"#;

/// A run that is expected to load the pipeline afresh (and so write a new plan).
fn reparsed(ws: &Ws, before: &mut Option<(std::time::SystemTime, u64)>, cmd: &mut Command) {
    std::thread::sleep(std::time::Duration::from_millis(10));
    let _ = std::fs::remove_file(&ws.calls);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let now = plan_written(ws);
    assert!(
        now.is_some() && now != *before,
        "the plan was not made again"
    );
    *before = now;
}

#[test]
fn the_compiled_plan_is_reused_until_anything_it_was_made_from_changes() {
    let ws = Ws::new(PLANNED);
    assert_eq!(ws.run_ok(&[]), ["a", "b"]);
    let mut plan = plan_written(&ws);
    assert!(plan.is_some(), "the first run saves the plan");
    std::thread::sleep(std::time::Duration::from_millis(10));
    assert!(ws.run_ok(&[]).is_empty());
    assert!(ws.repro(&["status"]).status.success());
    assert_eq!(plan_written(&ws), plan, "reused, not rewritten");

    // The file: any byte of it.
    let file = ws.read("repro.yaml");
    ws.write("repro.yaml", &format!("{file}# a comment\n"));
    reparsed(&ws, &mut plan, &mut ws.cmd(&["run"]));
    ws.write("repro.yaml", &file.replace("echo a >>", "echo a  >>"));
    reparsed(&ws, &mut plan, &mut ws.cmd(&["run"]));
    assert_eq!(ws.calls(), ["a"], "the edited command ran");

    // An override, and its removal.
    reparsed(&ws, &mut plan, &mut ws.cmd(&["run", "-S", "p=two"]));
    assert_eq!(ws.read("o/a.txt"), "two\n");
    reparsed(&ws, &mut plan, &mut ws.cmd(&["run"]));
    assert_eq!(ws.read("o/a.txt"), "one\n");

    // A variable the stages pass through.
    reparsed(&ws, &mut plan, ws.cmd(&["run"]).env("FOO", "bar"));
    assert_eq!(ws.calls(), ["b"]);
    assert_eq!(ws.read("o/b.txt"), "one\nbar\n");
    reparsed(&ws, &mut plan, ws.cmd(&["run"]).env_remove("FOO"));
    assert_eq!(ws.read("o/b.txt"), "one\n\n");

    // Another repro binary (a rebuild, an upgrade): its kinds may read the file differently.
    let other = ws.dir.path().join("repro-copy");
    std::fs::copy(env!("CARGO_BIN_EXE_repro"), &other).unwrap();
    let mut cmd = ws.cmd(&["run"]);
    let mut copy = Command::new(&other);
    copy.args(cmd.get_args())
        .current_dir(ws.root())
        .env("CALLS", &ws.calls);
    reparsed(&ws, &mut plan, &mut copy);
    reparsed(&ws, &mut plan, &mut cmd);

    // A damaged plan is only a cache miss.
    std::fs::write(ws.root().join(".repro/plans/repro.yaml.json"), "{").unwrap();
    plan = plan_written(&ws);
    reparsed(&ws, &mut plan, &mut ws.cmd(&["run"]));
    assert!(ws.calls().is_empty());

    // A folder of an out that now leads outside the workspace: refused as a fresh load would.
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::rename(ws.root().join("o"), elsewhere.path().join("o")).unwrap();
    std::os::unix::fs::symlink(elsewhere.path().join("o"), ws.root().join("o")).unwrap();
    let out = ws.repro(&["run"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("goes through symlink `o`, which points outside the workspace"),
        "{}",
        text(&out)
    );
    assert!(ws.calls().is_empty());
}

#[test]
fn stages_sharing_a_key_each_keep_their_own_state() {
    // Same command, no deps or outs: one key, so one runs and the other is restored from it.
    let ws = Ws::new(
        "stages:\n  a: {cmd: 'echo run >> \"$CALLS\"'}\n  b: {cmd: 'echo run >> \"$CALLS\"'}\n",
    );
    assert_eq!(ws.run_ok(&["-j", "1"]), ["run"]);
    let out = ws.repro(&["run"]);
    assert!(
        stderr(&out).contains("0 ran, 0 restored, 2 up to date"),
        "{}",
        text(&out)
    );
    let s = text(&ws.repro(&["status"]));
    assert!(s.contains("2 up to date"), "{s}");
}
