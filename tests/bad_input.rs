//! Every kind of bad pipeline is refused before anything runs, with a one-line error that says
//! where, a non-zero exit, and nothing written to the store.

mod common;
use common::*;

fn refused(pipeline: &str, expect: &[&str]) {
    let ws = Ws::new(pipeline);
    ws.write("exists.txt", "x");
    std::os::unix::fs::symlink(ws.dir.path(), ws.root().join("outside")).unwrap();
    let out = ws.repro(&["run"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(err.trim().lines().count(), 1, "one line:\n{err}");
    for e in expect {
        assert!(err.contains(e), "expected `{e}` in:\n{err}");
    }
    assert_eq!(ws.records(), 0);
    assert!(walk(&ws.root().join("cache/objects")).is_empty());
    assert!(ws.calls().is_empty());
}

#[test]
fn malformed_yaml() {
    refused("stages:\n  a: {cmd: 'true'\n  b: [", &["repro.yaml:"]);
}

#[test]
fn unknown_key_names_line_and_column() {
    refused(
        "stages:\n  a:\n    cmd: 'true'\n    depz: [x]\n",
        &["repro.yaml:4:5", "unknown field `depz`"],
    );
}

#[test]
fn unknown_kind() {
    refused(
        "stages:\n  a:\n    uses: trian\n",
        &["repro.yaml:3: stage `a`", "unknown stage kind", "table"],
    );
}

#[test]
fn cycle_names_its_stages() {
    refused(
        "stages:\n  a: {cmd: 'true', deps: [c.txt], outs: [a.txt]}\n  b: {cmd: 'true', deps: [a.txt], outs: [b.txt]}\n  c: {cmd: 'true', deps: [b.txt], outs: [c.txt]}\n",
        &["repro.yaml:2: stage `a`", "cycle: a → b → c → a"],
    );
}

#[test]
fn two_stages_one_out() {
    refused(
        "stages:\n  a: {cmd: 'true', outs: [o.txt]}\n  b: {cmd: 'true', outs: [./o.txt]}\n",
        &[
            "repro.yaml:3: stage `b`",
            "writes `o.txt` and so does stage `a`",
        ],
    );
}

#[test]
fn out_outside_the_workspace() {
    refused(
        "stages:\n  a: {cmd: 'true', outs: [../x]}\n",
        &[":2: stage `a`", "leaves the workspace"],
    );
    refused(
        "stages:\n  a: {cmd: 'true', outs: [/tmp/x]}\n",
        &[":2: stage `a`", "absolute"],
    );
    refused(
        "stages:\n  a: {cmd: 'true', outs: [outside/x]}\n",
        &[":2: stage `a`", "symlink `outside`"],
    );
}

#[test]
fn missing_dep() {
    refused(
        "stages:\n  a: {cmd: 'true', deps: [nowhere.txt]}\n",
        &[
            ":2: stage `a`",
            "dep `nowhere.txt` does not exist and no stage writes it",
        ],
    );
}

#[test]
fn missing_param() {
    refused(
        "params: {seed: 1}\nstages:\n  a: {cmd: 'echo ${params.sed}'}\n",
        &[":3: stage `a`", "params.sed", "known: seed"],
    );
}

#[test]
fn empty_matrix() {
    refused(
        "params: {xs: []}\nstages:\n  a:\n    matrix: {x: '${params.xs}'}\n    cmd: 'true'\n",
        &[":4: stage `a`", "matrix.x", "empty list"],
    );
}

#[test]
fn unknown_needs_and_bad_override() {
    refused(
        "stages:\n  a: {cmd: 'true', needs: [b]}\n",
        &[":2: stage `a`", "needs `b`"],
    );
    let ws = Ws::new("params: {seed: 1}\nstages:\n  a: {cmd: 'true'}\n");
    let out = ws.repro(&["run", "-S", "sede=2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("no param `sede` (known: seed)"),
        "{}",
        text(&out)
    );
}

#[test]
fn failing_command_is_one_clear_line() {
    let ws = Ws::new("stages:\n  a: {cmd: 'exit 7', outs: [a.txt]}\n");
    let out = ws.repro(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    let s = text(&out);
    assert_eq!(
        stage_lines(&s),
        [StageLine {
            state: "failed".into(),
            stage: "a".into(),
            detail: "exit code 7; log: .repro/logs/a.log".into()
        }],
        "{s}"
    );
    assert_eq!(ws.records(), 0);
}

#[test]
fn bad_runner_sections_and_time_limits() {
    let stage = "stages:\n  a: {cmd: 'true', outs: [a.txt]}\n";
    for (runner, expect) in [
        (
            "runner: {kind: pbs}\n",
            &["repro.yaml:1", "unknown variant `pbs`"][..],
        ),
        (
            "runner:\n  partiton: gpu\n",
            &["repro.yaml:2", "unknown field `partiton`"],
        ),
        (
            "runner:\n  time: soon\n",
            &["repro.yaml:2: runner.time:", "not a time limit"],
        ),
        (
            "runner:\n  time: 0\n",
            &["repro.yaml:2: runner.time:", "lets nothing run"],
        ),
        (
            "runner:\n  partition: a b\n",
            &["repro.yaml:2: runner.partition:"],
        ),
        (
            "runner:\n  sbatch:\n    - --qos=a\n    - --output=cache/objects/x\n",
            &[
                "repro.yaml:4: runner.sbatch.1:",
                "--output",
                "repro sets itself",
            ],
        ),
        (
            "runner:\n  sbatch: [-J, x]\n",
            &["repro.yaml:2: runner.sbatch.0:", "--job-name"],
        ),
    ] {
        refused(&format!("{runner}{stage}"), expect);
    }
    refused(
        "stages:\n  a:\n    cmd: 'true'\n    resources:\n      time: 2 weeks\n",
        &["repro.yaml:5: stage `a`", "not a time limit"],
    );
    // The same checks hold for the flags, which win over the file.
    let ws = Ws::new(stage);
    for (flags, expect) in [
        (&["--time-limit=-1"][..], "--time-limit:"),
        (&["--sbatch-flag=--chdir=/"], "--sbatch-flag:"),
        (&["--sbatch-flag", "qos"], "--sbatch-flag:"),
    ] {
        let mut args = vec!["run"];
        args.extend_from_slice(flags);
        let out = ws.repro(&args);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {}", text(&out));
        assert!(stderr(&out).contains(expect), "{flags:?}: {}", text(&out));
        assert_eq!(ws.records(), 0);
    }
}
