//! One test per part of the stage key (src/exec/plan.rs `key_parts`): changing exactly that
//! part of exactly one stage re-runs exactly that stage (and what reads its outputs, if they
//! change), and `repro status` names the part beforehand. Dropping the part from the key makes
//! the matching test fail. The built-in kind's version is a compile-time constant, so its test
//! is a unit test in src/exec/plan.rs. Then: a skip, a restore and a run told apart.

mod common;
use common::*;

/// What a run did: the stages that logged a call, and its output.
struct Run {
    calls: Vec<String>,
    out: String,
}

impl Run {
    /// The sorted names of the stages the run's output shows as `ran`.
    fn ran(&self) -> Vec<String> {
        stages_in(&self.out, "ran")
    }

    /// The state the run's output shows for `stage`, if it shows one.
    fn state_of(&self, stage: &str) -> Option<String> {
        let lines: Vec<StageLine> = stage_lines(&self.out)
            .into_iter()
            .filter(|l| l.stage == stage)
            .collect();
        assert!(lines.len() <= 1, "two lines for `{stage}`:\n{}", self.out);
        lines.into_iter().next().map(|l| l.state)
    }

    /// The run's last line: `N ran, N restored, N up to date`.
    fn summary(&self) -> &str {
        self.out.lines().last().unwrap_or_default()
    }

    /// Exactly these stages executed: by the calls they logged and by the lines of the run.
    #[track_caller]
    fn expect(&self, calls: &[&str], ran: &[&str]) {
        assert_eq!(self.calls, calls, "calls logged; output:\n{}", self.out);
        assert_eq!(
            self.ran(),
            ran,
            "stages shown as ran; output:\n{}",
            self.out
        );
    }
}

/// `repro run ARGS` with `env` set (`None`: removed), asserting success.
fn run(ws: &Ws, args: &[&str], env: &[(&str, Option<&str>)]) -> Run {
    if ws.calls.exists() {
        std::fs::remove_file(&ws.calls).unwrap();
    }
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    let mut cmd = ws.cmd(&all);
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().unwrap();
    let s = text(&out);
    assert!(out.status.success(), "repro {all:?} failed:\n{s}");
    Run {
        calls: ws.calls(),
        out: s,
    }
}

/// `repro status ARGS` with `env` set, asserting success and that nothing ran.
fn status(ws: &Ws, args: &[&str], env: &[(&str, Option<&str>)]) -> String {
    if ws.calls.exists() {
        std::fs::remove_file(&ws.calls).unwrap();
    }
    let mut all = vec!["status"];
    all.extend_from_slice(args);
    let mut cmd = ws.cmd(&all);
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "repro {all:?} failed:\n{}",
        text(&out)
    );
    assert!(ws.calls().is_empty(), "status ran a stage");
    s
}

/// Asserts the status line of each stage: (stage, label, reason).
#[track_caller]
fn expect_status(s: &str, expected: &[(&str, &str, &str)]) {
    for (stage, label, why) in expected {
        assert_eq!(
            status_of(s, stage),
            (label.to_string(), why.to_string()),
            "status of `{stage}`:\n{s}"
        );
    }
}

/// a writes a.txt with `a_cmd`; b reads a.txt; c stands apart.
fn three(a_cmd: &str) -> String {
    format!(
        r#"
stages:
  a:
    cmd: echo a >> "$CALLS" && {a_cmd}
    outs: [a.txt]
  b:
    cmd: echo b >> "$CALLS" && tr a-z A-Z < a.txt > b.txt
    deps: [a.txt]
    outs: [b.txt]
  c:
    cmd: echo c >> "$CALLS" && echo c > c.txt
    outs: [c.txt]
"#
    )
}

#[test]
fn the_command_is_in_the_key() {
    let ws = Ws::new(&three("echo one > a.txt"));
    run(&ws, &[], &[]).expect(&["a", "b", "c"], &["a", "b", "c"]);
    run(&ws, &[], &[]).expect(&[], &[]);

    ws.write("repro.yaml", &three("echo two > a.txt"));
    expect_status(
        &status(&ws, &[], &[]),
        &[
            ("a", "run", "cmd changed"),
            ("b", "run", "after upstream `a`"),
            ("c", "up to date", ""),
        ],
    );
    run(&ws, &[], &[]).expect(&["a", "b"], &["a", "b"]);
    assert_eq!(ws.read("b.txt"), "TWO\n");

    // Another spelling of the same command: it runs, writes the same bytes, b is not run.
    ws.write("repro.yaml", &three("echo 'two' > a.txt"));
    expect_status(&status(&ws, &[], &[]), &[("a", "run", "cmd changed")]);
    let r = run(&ws, &[], &[]);
    r.expect(&["a"], &["a"]);
    assert_eq!(r.state_of("b").as_deref(), Some("unchanged"), "{}", r.out);
}

/// m writes metrics; t1 and t2 are identical tables of them; `after` reads t1's CSV.
fn tables(t1_with: &str) -> String {
    format!(
        r#"
stages:
  m:
    cmd: echo m >> "$CALLS" && printf '{{"loss":3,"acc":1}}' > m.json
    metrics: m.json
  t1:
    uses: table
    needs: [m]
    with: {t1_with}
    outs: [t1.csv]
  t2:
    uses: table
    needs: [m]
    with: {{columns: [stage, loss], sort: [loss]}}
    outs: [t2.csv]
  after:
    cmd: echo after >> "$CALLS" && cat t1.csv > after.txt
    deps: [t1.csv]
    outs: [after.txt]
"#
    )
}

#[test]
fn every_with_value_is_in_the_key() {
    let ws = Ws::new(&tables("{columns: [stage, loss], sort: [loss]}"));
    run(&ws, &[], &[]).expect(&["after", "m"], &["after", "m", "t1", "t2"]);
    assert_eq!(ws.read("after.txt"), "stage,loss\nm,3\n");
    run(&ws, &[], &[]).expect(&[], &[]);

    // One value of one table changes what it writes: it and its reader run.
    ws.write(
        "repro.yaml",
        &tables("{columns: [loss, stage], sort: [loss]}"),
    );
    expect_status(
        &status(&ws, &[], &[]),
        &[
            ("m", "up to date", ""),
            (
                "t1",
                "run",
                r#"with.columns: ["stage","loss"] → ["loss","stage"]"#,
            ),
            ("t2", "up to date", ""),
            ("after", "run", "after upstream `t1`"),
        ],
    );
    run(&ws, &[], &[]).expect(&["after"], &["after", "t1"]);
    assert_eq!(ws.read("after.txt"), "loss,stage\n3,m\n");

    // Another value, and one added: the table runs and writes the same bytes (one row to sort,
    // one upstream to pick), so its reader does not run.
    for (with, why) in [
        (
            "{columns: [loss, stage], sort: [stage]}",
            r#"with.sort: ["loss"] → ["stage"]"#,
        ),
        (
            "{columns: [loss, stage], sort: [stage], from: [m]}",
            "with.from added",
        ),
    ] {
        ws.write("repro.yaml", &tables(with));
        expect_status(
            &status(&ws, &[], &[]),
            &[("t1", "run", why), ("t2", "up to date", "")],
        );
        let r = run(&ws, &[], &[]);
        r.expect(&[], &["t1"]);
        assert_eq!(
            r.state_of("after").as_deref(),
            Some("unchanged"),
            "{}",
            r.out
        );
        assert_eq!(ws.read("t1.csv"), "loss,stage\n3,m\n");
    }
}

/// a and b set X for themselves; c reads a.txt.
fn env_map(a_x: &str) -> String {
    format!(
        r#"
stages:
  a:
    cmd: echo a >> "$CALLS" && echo "$X" > a.txt
    env: {{X: {a_x}}}
    outs: [a.txt]
  b:
    cmd: echo b >> "$CALLS" && echo "$X" > b.txt
    env: {{X: 1}}
    outs: [b.txt]
  c:
    cmd: echo c >> "$CALLS" && cat a.txt > c.txt
    deps: [a.txt]
    outs: [c.txt]
"#
    )
}

#[test]
fn a_declared_env_value_is_in_the_key() {
    let ws = Ws::new(&env_map("1"));
    run(&ws, &[], &[]).expect(&["a", "b", "c"], &["a", "b", "c"]);
    run(&ws, &[], &[]).expect(&[], &[]);

    ws.write("repro.yaml", &env_map("2"));
    expect_status(
        &status(&ws, &[], &[]),
        &[
            ("a", "run", "env.X: 1 → 2"),
            ("b", "up to date", ""),
            ("c", "run", "after upstream `a`"),
        ],
    );
    run(&ws, &[], &[]).expect(&["a", "c"], &["a", "c"]);
    assert_eq!(ws.read("c.txt"), "2\n");
    assert_eq!(ws.read("b.txt"), "1\n");
}

const VAR: &str = "REPRO_KEY_TEST_PASSED";

#[test]
fn a_passed_through_env_value_is_in_the_key() {
    let ws = Ws::new(&format!(
        r#"
stages:
  a:
    cmd: echo a >> "$CALLS" && echo "${{{VAR}:-none}}" > a.txt
    env: [{VAR}]
    outs: [a.txt]
  b:
    cmd: echo b >> "$CALLS" && echo b > b.txt
    outs: [b.txt]
"#
    ));
    let one = [(VAR, Some("one"))];
    run(&ws, &[], &one).expect(&["a", "b"], &["a", "b"]);
    run(&ws, &[], &one).expect(&[], &[]);

    let two = [(VAR, Some("two"))];
    expect_status(
        &status(&ws, &[], &two),
        &[
            ("a", "run", &format!("env.{VAR}: one → two")),
            ("b", "up to date", ""),
        ],
    );
    run(&ws, &[], &two).expect(&["a"], &["a"]);
    assert_eq!(ws.read("a.txt"), "two\n");

    let unset = [(VAR, None)];
    expect_status(
        &status(&ws, &[], &unset),
        &[("a", "run", &format!("env.{VAR}: two → <unset>"))],
    );
    run(&ws, &[], &unset).expect(&["a"], &["a"]);
    assert_eq!(ws.read("a.txt"), "none\n");

    // The caller's first value again: that exact input ran before.
    expect_status(
        &status(&ws, &[], &one),
        &[(
            "a",
            "restore",
            &format!("env.{VAR}: <unset> → one; this exact input was run before"),
        )],
    );
    let r = run(&ws, &[], &one);
    r.expect(&[], &[]);
    assert_eq!(stages_in(&r.out, "restored"), ["a"], "{}", r.out);
    assert_eq!(ws.read("a.txt"), "one\n");
}

#[test]
fn the_outs_list_is_in_the_key() {
    let cmd = "echo a > a.txt && echo extra > extra.txt";
    let ws = Ws::new(&three(cmd));
    run(&ws, &[], &[]).expect(&["a", "b", "c"], &["a", "b", "c"]);
    run(&ws, &[], &[]).expect(&[], &[]);

    // The command is the same; only the list of what it writes grows.
    ws.write(
        "repro.yaml",
        &three(cmd).replace("outs: [a.txt]", "outs: [a.txt, extra.txt]"),
    );
    expect_status(
        &status(&ws, &[], &[]),
        &[
            ("a", "run", "outs: a.txt → a.txt, extra.txt"),
            ("b", "run", "after upstream `a`"),
            ("c", "up to date", ""),
        ],
    );
    let r = run(&ws, &[], &[]);
    r.expect(&["a"], &["a"]);
    assert_eq!(r.state_of("b").as_deref(), Some("unchanged"), "{}", r.out);

    // The new out was stored with the stage's result: deleted, it is restored, not re-run.
    std::fs::remove_file(ws.root().join("extra.txt")).unwrap();
    expect_status(
        &status(&ws, &[], &[]),
        &[("a", "restore", "out `extra.txt` is missing")],
    );
    let r = run(&ws, &[], &[]);
    r.expect(&[], &[]);
    assert_eq!(stages_in(&r.out, "restored"), ["a"], "{}", r.out);
    assert_eq!(ws.read("extra.txt"), "extra\n");
}

/// b needs a and reads a.txt without declaring it as a dep.
const NEEDS: &str = r#"
stages:
  a:
    cmd: echo a >> "$CALLS" && tr a-z A-Z < data/in.txt > a.txt
    deps: [data/in.txt]
    outs: [a.txt]
  b:
    cmd: echo b >> "$CALLS" && cat a.txt > b.txt
    needs: [a]
    outs: [b.txt]
  c:
    cmd: echo c >> "$CALLS" && echo c > c.txt
    outs: [c.txt]
"#;

#[test]
fn an_upstream_output_reached_through_needs_is_in_the_key() {
    let ws = Ws::new(NEEDS);
    ws.write("data/in.txt", "hello\n");
    run(&ws, &[], &[]).expect(&["a", "b", "c"], &["a", "b", "c"]);
    run(&ws, &[], &[]).expect(&[], &[]);

    // a's output changes: b runs though it names no file of a's.
    ws.write("data/in.txt", "world\n");
    expect_status(
        &status(&ws, &[], &[]),
        &[
            ("a", "run", "dep `data/in.txt` changed"),
            ("b", "run", "after upstream `a`"),
            ("c", "up to date", ""),
        ],
    );
    run(&ws, &[], &[]).expect(&["a", "b"], &["a", "b"]);
    assert_eq!(ws.read("b.txt"), "WORLD\n");

    // a runs again and writes the same bytes: b is not run.
    ws.write("data/in.txt", "WORLD\n");
    let r = run(&ws, &[], &[]);
    r.expect(&["a"], &["a"]);
    assert_eq!(r.state_of("b").as_deref(), Some("unchanged"), "{}", r.out);

    // Back to the first input: a is restored, and b's key, through a's restored output, is
    // the one of its first run.
    ws.write("data/in.txt", "hello\n");
    expect_status(
        &status(&ws, &[], &[]),
        &[
            (
                "a",
                "restore",
                "dep `data/in.txt` changed; this exact input was run before",
            ),
            (
                "b",
                "restore",
                "upstream `a` produced new outputs; this exact input was run before",
            ),
        ],
    );
    let r = run(&ws, &[], &[]);
    r.expect(&[], &[]);
    assert_eq!(stages_in(&r.out, "restored"), ["a", "b"], "{}", r.out);
    assert_eq!(ws.read("b.txt"), "HELLO\n");
}

fn matrix(xs: &str) -> String {
    format!(
        r#"
stages:
  a:
    matrix: {{x: {xs}}}
    cmd: echo "a ${{matrix.x}}" >> "$CALLS"
"#
    )
}

#[test]
fn matrix_values_are_in_the_key() {
    // Expansions share the command as written and (here) their outs: only the matrix value
    // tells their keys apart.
    let ws = Ws::new(&matrix("[1, 2]"));
    run(&ws, &[], &[]).expect(&["a 1", "a 2"], &["a@x=1", "a@x=2"]);
    ws.write("repro.yaml", &matrix("[1, 3]"));
    expect_status(
        &status(&ws, &[], &[]),
        &[
            ("a@x=1", "up to date", ""),
            ("a@x=3", "run", "never run in this workspace"),
        ],
    );
    run(&ws, &[], &[]).expect(&["a 3"], &["a@x=3"]);
}

const SWITCH: &str = r#"
params: {p: one}
stages:
  a:
    cmd: echo a >> "$CALLS" && echo ${params.p} > a.txt
    outs: [a.txt]
  b:
    cmd: echo b >> "$CALLS" && echo b > b.txt
    outs: [b.txt]
"#;

#[test]
fn skip_restore_and_run_are_told_apart() {
    let ws = Ws::new(SWITCH);
    let r = run(&ws, &[], &[]);
    r.expect(&["a", "b"], &["a", "b"]);
    assert_eq!(r.summary(), "2 ran, 0 restored, 0 up to date");

    // Unchanged: skipped. Nothing runs, nothing is restored, no stage line unless asked for.
    expect_status(
        &status(&ws, &[], &[]),
        &[("a", "up to date", ""), ("b", "up to date", "")],
    );
    let r = run(&ws, &[], &[]);
    r.expect(&[], &[]);
    assert_eq!(stage_lines(&r.out), [], "{}", r.out);
    assert_eq!(r.summary(), "0 ran, 0 restored, 2 up to date");
    let r = run(&ws, &["-v"], &[]);
    r.expect(&[], &[]);
    assert_eq!(stages_in(&r.out, "up to date"), ["a", "b"], "{}", r.out);

    // A new param value: run.
    expect_status(
        &status(&ws, &["-S", "p=two"], &[]),
        &[("a", "run", "param.p: one → two"), ("b", "up to date", "")],
    );
    let r = run(&ws, &["-S", "p=two"], &[]);
    r.expect(&["a"], &["a"]);
    assert_eq!(r.summary(), "1 ran, 0 restored, 1 up to date");
    assert_eq!(ws.read("a.txt"), "two\n");

    // Back to the old value: restored, not run.
    expect_status(
        &status(&ws, &[], &[]),
        &[
            (
                "a",
                "restore",
                "param.p: two → one; this exact input was run before",
            ),
            ("b", "up to date", ""),
        ],
    );
    let r = run(&ws, &[], &[]);
    r.expect(&[], &[]);
    assert_eq!(
        stage_lines(&r.out)
            .into_iter()
            .map(|l| (l.state, l.stage))
            .collect::<Vec<_>>(),
        [("restored".to_string(), "a".to_string())],
        "{}",
        r.out
    );
    assert_eq!(r.summary(), "0 ran, 1 restored, 1 up to date");
    assert_eq!(ws.read("a.txt"), "one\n");

    // An out deleted, or edited in place, under an unchanged key: restored, not run.
    for (edit, why) in [
        (None, "out `a.txt` is missing"),
        (Some("vandalised\n"), "out `a.txt` was modified"),
    ] {
        match edit {
            None => std::fs::remove_file(ws.root().join("a.txt")).unwrap(),
            Some(text) => ws.write("a.txt", text),
        }
        expect_status(
            &status(&ws, &[], &[]),
            &[("a", "restore", why), ("b", "up to date", "")],
        );
        let r = run(&ws, &[], &[]);
        r.expect(&[], &[]);
        assert_eq!(stages_in(&r.out, "restored"), ["a"], "{}", r.out);
        assert_eq!(r.summary(), "0 ran, 1 restored, 1 up to date");
        assert_eq!(ws.read("a.txt"), "one\n");
    }
}
