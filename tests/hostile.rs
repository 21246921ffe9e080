//! Pipeline files written to do harm, by class: each is refused with file:line and a reason,
//! and the store, the state and the pipeline file come out of it exactly as they went in.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// A workspace that has run once, so there is a store, a state and logs to lose.
fn seasoned() -> Ws {
    let ws = Ws::new("stages:\n  seed: {cmd: 'echo kept > kept.txt', outs: [kept.txt]}\n");
    ws.run_ok(&[]);
    assert!(ws.records() == 1);
    ws
}

/// Every file under repro's own folders and the pipeline file, with its content.
fn snapshot(ws: &Ws, pipeline: &str) -> BTreeMap<String, Vec<u8>> {
    let root = ws.root();
    let mut all = BTreeMap::new();
    for dir in ["cache", ".repro/state", ".repro/logs"] {
        for p in walk(&root.join(dir)) {
            let rel = p.strip_prefix(&root).unwrap().display().to_string();
            all.insert(rel, std::fs::read(&p).unwrap());
        }
    }
    all.insert(
        pipeline.to_string(),
        std::fs::read(root.join(pipeline)).unwrap(),
    );
    all
}

/// Runs `pipeline` (written to `file`) in a seasoned workspace: refused with exit 2, one line
/// per problem naming `file:line`, every `expect` present, and nothing of repro's changed.
fn refused_in(ws: &Ws, file: &str, pipeline: &str, args: &[&str], expect: &[&str]) {
    ws.write(file, pipeline);
    let before = snapshot(ws, file);
    let mut all = vec!["run", file];
    all.extend_from_slice(args);
    let out = ws.repro(&all);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{pipeline}\n{}", text(&out));
    for line in err.lines() {
        let at = line.trim_start_matches("error: ");
        let located = at
            .strip_prefix(&format!("{file}:"))
            .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()));
        assert!(located, "no {file}:LINE in `{line}`");
    }
    for e in expect {
        assert!(err.contains(e), "expected `{e}` in:\n{err}");
    }
    assert_eq!(
        before,
        snapshot(ws, file),
        "repro's files changed:\n{pipeline}"
    );
    assert!(ws.calls().is_empty(), "something ran: {:?}", ws.calls());
}

fn refused(pipeline: &str, expect: &[&str]) {
    refused_in(&seasoned(), "repro.yaml", pipeline, &[], expect);
}

#[test]
fn outs_may_not_touch_the_store_however_spelt() {
    for out in [
        "cache",
        "./cache",
        "cache/",
        "cache/objects",
        "sub/../cache",
        "cache/records/x.json",
        "a/b/../../cache/tmp",
    ] {
        refused(
            &format!("stages:\n  a:\n    cmd: 'true'\n    outs: [ok.txt, '{out}']\n"),
            &["repro.yaml:4: stage `a`", "cache store `cache`"],
        );
    }
    // Through a param, a matrix value, and the metrics file.
    refused(
        "params: {dir: cache}\nstages:\n  a:\n    cmd: 'true'\n    outs:\n      - ok.txt\n      - '${params.dir}/objects'\n",
        &["repro.yaml:7: stage `a`", "`cache/objects` is inside the cache store"],
    );
    refused(
        "stages:\n  a:\n    matrix: {d: [results, cache]}\n    cmd: 'true'\n    outs: ['${matrix.d}/objects']\n",
        &["stage `a`: a@d=cache: outs", "inside the cache store"],
    );
    refused(
        "stages:\n  a: {cmd: 'true', metrics: cache/m.json}\n",
        &["repro.yaml:2: stage `a`", "inside the cache store"],
    );
}

#[test]
fn outs_may_not_reach_the_store_through_symlinks() {
    let ws = seasoned();
    std::os::unix::fs::symlink("cache", ws.root().join("lnk")).unwrap();
    std::os::unix::fs::symlink(".", ws.root().join("self")).unwrap();
    for out in ["lnk/objects", "lnk", "self/cache", "self/self/.repro/state"] {
        refused_in(
            &ws,
            "repro.yaml",
            &format!("stages:\n  a: {{cmd: 'true', outs: ['{out}']}}\n"),
            &[],
            &["repro.yaml:2: stage `a`", "no stage may write it"],
        );
    }
}

#[test]
fn a_store_chosen_elsewhere_is_protected_too() {
    let ws = seasoned();
    let store = ws.dir.path().join("store");
    std::os::unix::fs::symlink(&store, ws.root().join("st")).unwrap();
    ws.write(
        "repro.yaml",
        "stages:\n  s: {cmd: 'echo x > x.txt', outs: [x.txt]}\n",
    );
    let out = ws.repro(&["--cache", "mystore", "run"]);
    assert!(out.status.success(), "{}", text(&out));
    for (args, out) in [
        (vec!["--cache", "mystore"], "mystore/objects"),
        (vec!["--cache", store.to_str().unwrap()], "st/records"),
    ] {
        std::fs::create_dir_all(&store).unwrap();
        let file = "p.yaml";
        ws.write(
            file,
            &format!("stages:\n  a: {{cmd: 'true', outs: ['{out}']}}\n"),
        );
        let mut all = args.clone();
        all.extend(["run", file]);
        let res = ws.repro(&all);
        assert_eq!(res.status.code(), Some(2), "{}", text(&res));
        assert!(text(&res).contains("cache store"), "{}", text(&res));
    }
    // $REPRO_CACHE is the store when no --cache is given.
    ws.write(
        "e.yaml",
        "stages:\n  a: {cmd: 'true', outs: [envstore/x]}\n",
    );
    let res = ws
        .cmd(&["run", "e.yaml"])
        .env("REPRO_CACHE", "envstore")
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(2), "{}", text(&res));
    assert!(
        text(&res).contains("cache store `envstore`"),
        "{}",
        text(&res)
    );
}

#[test]
fn the_store_cannot_be_the_workspace_or_hold_it() {
    let ws = seasoned();
    for store in [".", "./", "..", ws.root().to_str().unwrap()] {
        let out = ws.repro(&["--cache", store, "run"]);
        assert_eq!(out.status.code(), Some(2), "{store}: {}", text(&out));
        assert!(text(&out).contains("a folder of its own"), "{}", text(&out));
    }
    assert!(!ws.root().join("objects").exists());
    assert!(!ws.dir.path().join("objects").exists());

    // Nor a folder that is someone else's: gc and verify would delete or move its files.
    ws.write(".git/HEAD", "ref: refs/heads/main\n");
    ws.write(".git/objects/ab/cdef", "a git object");
    ws.write("photos/cat.jpg", "meow");
    for (store, why) in [
        (".git", "inside the workspace's `.git`"),
        (".git/objects", "inside the workspace's `.git`"),
        (".repro", "inside the workspace's `.repro`"),
        (".repro/store", "inside the workspace's `.repro`"),
        ("photos", "is not a repro store (it holds `cat.jpg`)"),
    ] {
        for cmd in [&["run"][..], &["gc"], &["verify"]] {
            let mut args = vec!["--cache", store];
            args.extend_from_slice(cmd);
            let out = ws.repro(&args);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
            assert!(text(&out).contains(why), "{args:?}: {}", text(&out));
        }
    }
    assert_eq!(ws.read(".git/objects/ab/cdef"), "a git object");
    assert_eq!(ws.read("photos/cat.jpg"), "meow");
    assert!(!ws.root().join(".repro/store").exists());
}

#[test]
fn the_state_folder_and_the_pipeline_file_are_not_outs() {
    for (out, what) in [
        (".repro", "state folder"),
        ("./.repro/state", "state folder"),
        (".repro/lock", "state folder"),
        ("x/../.repro/logs/seed.log", "state folder"),
        ("repro.yaml", "pipeline file `repro.yaml`"),
        ("./repro.yaml", "pipeline file"),
        (".git", "git repository"),
        ("sub/../.git/config", "git repository"),
    ] {
        refused(
            &format!("stages:\n  a: {{cmd: 'true', outs: ['{out}']}}\n"),
            &["repro.yaml:2: stage `a`", what],
        );
    }
    // A pipeline in a folder: neither it nor the folder holding it.
    let ws = seasoned();
    for out in ["pipelines/p.yaml", "pipelines", "./pipelines/../pipelines"] {
        refused_in(
            &ws,
            "pipelines/p.yaml",
            &format!("stages:\n  a: {{cmd: 'true', outs: ['{out}']}}\n"),
            &[],
            &[
                "pipelines/p.yaml:2: stage `a`",
                "pipeline file `pipelines/p.yaml`",
            ],
        );
    }
}

#[test]
fn repros_environment_variables_are_not_a_stages_to_set() {
    for env in [
        "{REPRO_RUN: x}",
        "{REPRO_SCRATCH: /tmp}",
        "[REPRO_STAGE]",
        "{'A=B': 1}",
    ] {
        refused(
            &format!("stages:\n  a:\n    cmd: 'true'\n    env: {env}\n"),
            &["repro.yaml:4: stage `a`", "env"],
        );
    }
}

#[test]
fn deps_may_not_be_repros_own_folders() {
    for dep in ["cache/objects", ".repro/state", "./cache"] {
        refused(
            &format!("stages:\n  a: {{cmd: 'true', deps: ['{dep}']}}\n"),
            &["repro.yaml:2: stage `a`", "not an input"],
        );
    }
}

#[test]
fn a_symlink_made_during_the_run_cannot_lead_an_out_into_the_store() {
    let ws = seasoned();
    ws.write(
        "repro.yaml",
        "stages:\n  a: {cmd: 'ln -s cache lnk && echo a > a.txt', outs: [a.txt]}\n  b: {cmd: 'echo b > lnk/objects', deps: [a.txt], outs: [lnk/objects]}\n",
    );
    let objects_before = walk(&ws.root().join("cache/objects"));
    let out = ws.repro(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let failed = stages_in(&text(&out), "failed");
    assert_eq!(failed, vec!["b"], "{}", text(&out));
    assert!(
        text(&out).contains("inside the cache store"),
        "{}",
        text(&out)
    );
    let objects_after: Vec<_> = walk(&ws.root().join("cache/objects"));
    assert!(
        objects_before.iter().all(|p| objects_after.contains(p)),
        "an object was removed"
    );
    let out = ws.repro(&["verify"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn stage_names_are_checked() {
    for (name, expect) in [
        ("'..'", "`..` cannot be a stage name"),
        ("'.'", "`.` cannot be a stage name"),
        ("'a/b'", "only letters, digits"),
        ("'-x'", "may not start with `-`"),
        ("\"a\\tb\"", "only letters, digits"),
        ("\"\"", "a stage needs a name"),
        ("'a b'", "only letters, digits"),
    ] {
        refused(
            &format!("stages:\n  {name}: {{cmd: 'echo x > x.txt', outs: [x.txt]}}\n"),
            &["repro.yaml:2: stage `", expect],
        );
    }
    refused(
        "stages:\n  a:\n    matrix: {v: [\"ok\", \"line\\nbreak\"]}\n    cmd: 'true'\n",
        &["repro.yaml:3: stage `a`", "control character"],
    );
    let long = "x".repeat(1100);
    refused(
        &format!("stages:\n  a:\n    matrix: {{v: [{long}]}}\n    cmd: 'true'\n"),
        &["repro.yaml:3: stage `a`", "longer than 1024 bytes"],
    );
}

#[test]
fn stages_whose_names_differ_never_share_a_log_or_scratch_folder() {
    let ws = Ws::new("stages: {}\n");
    ws.write(
        "repro.yaml",
        "stages:\n  a:\n    matrix: {v: ['p/q', 'p_q', 'p q', 'p%2Fq', '..', '.', '~', 'x/../..']}\n    cmd: 'echo \"log of ${matrix.v}\"; echo \"$REPRO_SCRATCH\" >> scratches.txt'\n",
    );
    let out = ws.repro(&["run", "-j", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    let names = ["p/q", "p_q", "p q", "p%2Fq", "..", ".", "~", "x/../.."];
    let scratches = ws.read("scratches.txt");
    let mut distinct: Vec<&str> = scratches.lines().collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), names.len(), "{scratches}");
    for s in &distinct {
        let p = Path::new(s);
        assert!(
            p.starts_with(ws.root().canonicalize().unwrap().join(".repro/scratch")),
            "scratch outside .repro/scratch: {s}"
        );
        assert_eq!(
            p.parent().unwrap(),
            ws.root().canonicalize().unwrap().join(".repro/scratch"),
            "scratch not directly in .repro/scratch: {s}"
        );
    }
    for v in names {
        let stage = format!("a@v={v}");
        let out = ws.repro(&["log", &stage]);
        assert!(out.status.success(), "{stage}: {}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("log of {v}\n"),
            "`repro log {stage}` shows another stage's log"
        );
    }
    assert!(ws.root().join(".repro/state").is_dir());
    assert!(ws.root().join(".repro/logs").is_dir());
}

#[test]
fn matrix_blow_ups_are_refused_before_anything_is_built() {
    let ten = "[0,1,2,3,4,5,6,7,8,9]";
    for (matrix, count) in [
        (
            format!("{{a: {ten}, b: {ten}, c: {ten}, d: {ten}, e: {ten}}}"),
            "100000 stages",
        ),
        (
            {
                let keys: Vec<String> = "abcdefghij"
                    .chars()
                    .map(|k| format!("{k}: '${{params.l}}'"))
                    .collect();
                format!("{{{}}}", keys.join(", "))
            },
            "10000000000 stages",
        ),
    ] {
        let t0 = Instant::now();
        refused(
            &format!(
                "params: {{l: {ten}}}\nstages:\n  m:\n    matrix: {matrix}\n    cmd: 'true'\n"
            ),
            &["repro.yaml:4: stage `m`", count, "--max-expansions"],
        );
        assert!(t0.elapsed() < Duration::from_secs(20), "hang detector");
    }
    // 30 keys of 10 values: more than 2^64 combinations.
    let keys: Vec<String> = (0..30).map(|i| format!("k{i}: {ten}")).collect();
    refused(
        &format!(
            "stages:\n  m:\n    matrix: {{{}}}\n    cmd: 'true'\n",
            keys.join(", ")
        ),
        &["repro.yaml:3: stage `m`", "more than 2^64"],
    );
    // The limit can be raised, and the whole pipeline is bounded too.
    let ws = Ws::new(&format!(
        "stages:\n  m:\n    matrix: {{a: {ten}, b: {ten}, c: {ten}, d: [0, 1]}}\n    cmd: 'true'\n"
    ));
    let out = ws.repro(&["status", "--max-expansions", "1000"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("2000 stages"), "{}", text(&out));
    let out = ws.repro(&["status"]);
    assert!(out.status.success(), "{}", text(&out));
    let many: Vec<String> = (0..25)
        .map(|i| format!("  m{i}:\n    matrix: {{a: {ten}, b: {ten}}}\n    cmd: 'true'\n"))
        .collect();
    let ws = Ws::new(&format!("stages:\n{}", many.concat()));
    let out = ws.repro(&["status", "--max-expansions", "100"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("stages in all"), "{}", text(&out));
}

#[test]
fn deep_nesting_huge_values_and_alias_bombs_fail_fast_with_a_line() {
    let n = 200_000;
    let bomb = {
        let mut b = String::from("params:\n  a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            b.push_str(&format!("  a{i}: &a{i} [{refs}]\n"));
        }
        b + "stages:\n  a: {cmd: 'echo ${params.a8}'}\n"
    };
    for (pipeline, expect) in [
        (
            format!(
                "stages:\n  a: {{cmd: 'true', desc: {}{}}}\n",
                "[".repeat(n),
                "]".repeat(n)
            ),
            "repro.yaml:2:",
        ),
        (
            format!(
                "stages:\n  a:\n    cmd: 'true'\n    desc: {}\n",
                "{a: ".repeat(n)
            ),
            "repro.yaml:4:",
        ),
        (
            {
                let mut s = String::from("stages:\n  a:\n    cmd: 'true'\n    desc:\n");
                for d in 0..100 {
                    s.push_str(&format!("{}k:\n", " ".repeat(6 + 2 * d)));
                }
                s
            },
            "nested more than 64",
        ),
        (
            format!("stages:\n  a: {{cmd: '{}'}}\n", "x".repeat(2 << 20)),
            "values are limited",
        ),
        (bomb, "aliases"),
    ] {
        let t0 = Instant::now();
        refused(&pipeline, &[expect]);
        assert!(t0.elapsed() < Duration::from_secs(20), "hang detector");
    }
}

#[test]
fn a_large_param_pasted_into_many_stages_is_bounded() {
    let big = "y".repeat(600_000);
    refused(
        &format!(
            "params: {{big: '{big}'}}\nstages:\n  m:\n    matrix: {{a: [0,1,2,3,4,5,6,7,8,9], b: [0,1,2,3,4,5,6,7,8,9], c: [0,1,2,3,4,5,6,7,8,9]}}\n    cmd: 'echo ${{params.big}}'\n"
        ),
        &["repro.yaml:5: stage `m`", "templates expand to more than"],
    );
}

#[test]
fn duplicate_keys_are_errors_with_both_lines() {
    for (pipeline, expect) in [
        (
            "stages:\n  a: {cmd: 'echo 1'}\n  a: {cmd: 'echo 2'}\n",
            "repro.yaml:3:3: duplicate key `a` (first given on line 2)",
        ),
        (
            "stages:\n  a:\n    cmd: 'echo 1'\n    outs: [x]\n    cmd: 'echo 2'\n",
            "repro.yaml:5:5: duplicate key `cmd` (first given on line 3)",
        ),
        (
            "params: {s: 1, s: 2}\nstages:\n  a: {cmd: 'echo ${params.s}'}\n",
            "repro.yaml:1:16: duplicate key `s` (first given on line 1)",
        ),
        (
            "stages:\n  \"a\": {cmd: 'echo 1'}\n  'a': {cmd: 'echo 2'}\n",
            "duplicate key `a` (first given on line 2)",
        ),
        (
            "stages:\n  a: {cmd: 'true'}\nstages:\n  b: {cmd: 'true'}\n",
            "repro.yaml:3:1: duplicate key `stages` (first given on line 1)",
        ),
    ] {
        refused(pipeline, &[expect]);
    }
}

#[test]
fn empty_and_malformed_overrides_are_errors() {
    let p = "params:\n  seed: 1\n  xs: [1, 2]\nstages:\n  a: {cmd: 'echo ${params.seed}'}\n";
    for (arg, expect) in [
        ("seed=", "repro.yaml:2: -S seed=: no value after `=`"),
        ("seed=  ", "no value after `=`"),
        ("xs=", "repro.yaml:3: -S xs=: no value"),
        ("seed", "expected key=value"),
        ("sede=2", "no param `sede` (known: seed, xs)"),
    ] {
        refused_in(&seasoned(), "repro.yaml", p, &["-S", arg], &[expect]);
    }
}

#[test]
fn a_failed_stage_shows_its_log_and_leaves_no_partial_result() {
    let ws = Ws::new(
        "stages:\n  a: {cmd: 'for i in $(seq 1 40); do echo line $i; done; echo half > o.txt; mkdir -p d; echo x > d/f; exit 3', outs: [o.txt, d]}\n  b: {cmd: 'echo $CALLS; echo b >> \"$CALLS\"', deps: [o.txt]}\n",
    );
    let out = ws.repro(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    let all = text(&out);
    let lines: Vec<&str> = all.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim_start().starts_with("failed  a"))
        .unwrap_or_else(|| panic!("{all}"));
    assert!(
        lines[at].contains("exit code 3; log: .repro/logs/a.log"),
        "{all}"
    );
    assert!(lines[at].contains("moved to .repro/failed/a/"), "{all}");
    let tail: Vec<&str> = lines[at + 1..]
        .iter()
        .take_while(|l| l.contains('│'))
        .map(|l| l.split('│').nth(1).unwrap().trim())
        .collect();
    let want: Vec<String> = (21..=40).map(|i| format!("line {i}")).collect();
    assert_eq!(tail, want, "{all}");
    assert!(
        !ws.root().join("o.txt").exists(),
        "a partial out was left in place"
    );
    assert!(
        !ws.root().join("d").exists(),
        "a partial out folder was left in place"
    );
    assert_eq!(ws.read(".repro/failed/a/o.txt"), "half\n");
    assert_eq!(ws.read(".repro/failed/a/d/f"), "x\n");
    assert_eq!(ws.records(), 0);
    assert!(walk(&ws.root().join("cache/objects")).is_empty());

    // --log-lines picks how many; 0 shows none.
    for (n, want) in [("3", 3), ("0", 0)] {
        let out = ws.repro(&["run", "--log-lines", n]);
        let shown = text(&out).lines().filter(|l| l.contains('│')).count();
        assert_eq!(shown, want, "{}", text(&out));
    }
}

#[test]
fn bad_metrics_fail_the_stage_before_anything_is_stored() {
    for (metrics, expect) in [
        ("not json", "is not JSON"),
        ("[1, 2]", "not an object"),
        ("3", "not an object"),
        ("{\"loss\": ", "is not JSON"),
    ] {
        let ws = Ws::new(
            "stages:\n  a: {cmd: 'echo kept > o.txt; cp m.src m.json', outs: [o.txt], metrics: m.json}\n",
        );
        ws.write("m.src", metrics);
        let out = ws.repro(&["run"]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let line = stage_lines(&text(&out))
            .into_iter()
            .find(|l| l.stage == "a")
            .unwrap();
        assert_eq!(line.state, "failed");
        assert!(line.detail.contains(expect), "{metrics}: {}", line.detail);
        assert_eq!(ws.records(), 0, "{metrics}");
        assert!(
            walk(&ws.root().join("cache/objects")).is_empty(),
            "{metrics}: objects were stored"
        );
        assert!(!ws.root().join("o.txt").exists());
    }
}

#[test]
fn dot_and_mermaid_escape_every_name() {
    let values = [
        "plain",
        "with space",
        "q\"uote",
        "back\\slash\\",
        "ünïcode ✓",
        "<b>html</b>",
        "hash#35;",
        "tick`",
    ];
    let list: Vec<String> = values
        .iter()
        .map(|v| format!("'{}'", v.replace('\'', "''")))
        .collect();
    let ws = Ws::new(&format!(
        "stages:\n  a:\n    matrix: {{v: [{}]}}\n    cmd: 'true'\n  z: {{cmd: 'true', needs: [a]}}\n",
        list.join(", ")
    ));
    let dot = ws.repro(&["dag", "--dot"]);
    assert!(dot.status.success(), "{}", text(&dot));
    let dot = String::from_utf8_lossy(&dot.stdout).to_string();
    // Every quoted ID in the dot output unescapes to a real stage name.
    let mut ids = Vec::new();
    let mut chars = dot.chars();
    while let Some(c) = chars.next() {
        if c == '"' {
            let mut id = String::new();
            loop {
                match chars.next().expect("unterminated quoted ID") {
                    '\\' => id.push(chars.next().expect("dangling escape")),
                    '"' => break,
                    c => id.push(c),
                }
            }
            ids.push(id);
        }
    }
    let unescaped: Vec<String> = values.iter().map(|v| format!("a@v={v}")).collect();
    for name in &unescaped {
        assert_eq!(
            ids.iter().filter(|i| *i == name).count(),
            2,
            "`{name}` should appear as a node and in its edge:\n{dot}"
        );
    }
    // Graphviz itself, where it is installed, must accept the file.
    match std::process::Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(dot.as_bytes())
                .unwrap();
            let res = child.wait_with_output().unwrap();
            assert!(
                res.status.success(),
                "dot: {}",
                String::from_utf8_lossy(&res.stderr)
            );
        }
        Err(_) => eprintln!("graphviz is not installed: dot output checked by parsing only"),
    }
    let mermaid = ws.repro(&["dag", "--mermaid"]);
    let mermaid = String::from_utf8_lossy(&mermaid.stdout).to_string();
    for line in mermaid.lines().skip(1) {
        if let Some(label) = line.split_once("[\"") {
            let inner = label.1.strip_suffix("\"]").expect("label closes the line");
            assert!(
                !inner.contains(['"', '<', '>', '`']),
                "unescaped character in mermaid label: {line}"
            );
        }
    }
    assert!(mermaid.contains("q#quot;uote"), "{mermaid}");
    assert!(mermaid.contains("#lt;b#gt;html#lt;/b#gt;"), "{mermaid}");
    assert!(mermaid.contains("hash#35;35;"), "{mermaid}");
}

#[test]
fn fifos_and_devices_are_refused_never_waited_on() {
    let mkfifo = |ws: &Ws, rel: &str| {
        let path = ws.root().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a plain mkfifo on a path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    };
    // As a dep, a dep folder's file, or a device.
    for (setup, deps) in [("ff", "ff"), ("dd/f", "dd"), ("", "/dev/zero")] {
        let ws = Ws::new(&format!(
            "stages:\n  a: {{cmd: 'echo a > o', deps: ['{deps}'], outs: [o]}}\n"
        ));
        if !setup.is_empty() {
            mkfifo(&ws, setup);
        }
        let t0 = Instant::now();
        let out = ws.repro(&["status"]);
        assert_eq!(out.status.code(), Some(2), "{deps}: {}", text(&out));
        assert!(t0.elapsed() < Duration::from_secs(20), "hang detector");
    }
    // As an out, a metrics file, or inside an out folder: the stage fails, nothing is stored.
    for (cmd, outs) in [
        ("mkfifo o", "[o]"),
        ("mkdir d && mkfifo d/f", "[d]"),
        ("mkfifo m.json", "[]\n    metrics: m.json"),
    ] {
        let ws = Ws::new(&format!(
            "stages:\n  a:\n    cmd: '{cmd}'\n    outs: {outs}\n"
        ));
        let t0 = Instant::now();
        let out = ws.repro(&["run"]);
        assert!(t0.elapsed() < Duration::from_secs(20), "hang detector");
        assert_eq!(out.status.code(), Some(1), "{cmd}: {}", text(&out));
        let line = &stage_lines(&text(&out))[0];
        assert_eq!(line.state, "failed", "{cmd}");
        assert!(
            line.detail.contains("fifo") || line.detail.contains("cannot be read"),
            "{cmd}: {}",
            line.detail
        );
        assert_eq!(ws.records(), 0);
    }
}

#[test]
fn an_out_made_a_link_into_the_store_is_not_a_result() {
    let ws = seasoned();
    ws.write(
        "repro.yaml",
        "stages:\n  a: {cmd: 'ln -s cache/objects out', outs: [out]}\n",
    );
    let out = ws.repro(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let line = &stage_lines(&text(&out))[0];
    assert!(
        line.detail.contains("a result may not lead there"),
        "{}",
        line.detail
    );
    assert_eq!(ws.records(), 1, "only the seed's record");
    assert!(
        !ws.root().join("out").exists(),
        "the link was left in place"
    );
    // The pipeline is not stuck: the next run tries again and says the same.
    let out = ws.repro(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[test]
fn more_hostile_inputs_are_refused_at_their_line() {
    for (pipeline, expect) in [
        (
            "stages:\n  a: {cmd: \"echo \\0 > x\"}\n",
            "repro.yaml:2: stage `a`: cmd: holds a NUL byte",
        ),
        (
            "stages:\n  a:\n    cmd: 'true'\n    env: {A: \"x\\0y\"}\n",
            "repro.yaml:4: stage `a`",
        ),
        ("stages:\n  a: {cmd: ''}\n", "cmd: is empty"),
        (
            "stages:\n  a: {cmd: 'true'}\n---\nstages: {}\n",
            "repro.yaml:3:",
        ),
        (
            "stages:\n  a: {cmd: 'true'}\n\0\n",
            "repro.yaml:3: a NUL byte",
        ),
    ] {
        refused(pipeline, &[expect]);
    }
    let ws = seasoned();
    for bad in ["0", "99999999999", "-1", "x"] {
        let out = ws.repro(&["run", "--max-expansions", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", text(&out));
        assert!(ws.calls().is_empty());
    }
}

#[test]
fn overrides_that_yaml_reads_as_null_keep_their_text() {
    let ws = Ws::new("params: {x: a}\nstages:\n  a: {cmd: 'printf \"%s\" \"${params.x}\" > o.txt', outs: [o.txt]}\n");
    for (given, want) in [
        ("#ff0000", "#ff0000"),
        ("---", "---"),
        ("red", "red"),
        ("null", "null"),
    ] {
        ws.run_ok(&["-S", &format!("x={given}")]);
        assert_eq!(ws.read("o.txt"), want, "-S x={given}");
    }
}

#[test]
fn one_pipeline_one_state_file_however_its_path_is_spelt() {
    let ws = Ws::new("stages: {}\n");
    ws.write(
        "x/p.yaml",
        "stages:\n  a: {cmd: 'echo a >> \"$CALLS\"; echo a > a.txt', outs: [a.txt]}\n",
    );
    assert_eq!(ws.run_ok(&["x/p.yaml"]), ["a"]);
    for spelling in ["./x/p.yaml", "x//p.yaml", "x/./p.yaml"] {
        let out = ws.repro(&["status", spelling]);
        assert_eq!(status_of(&text(&out), "a").0, "up to date", "{spelling}");
    }
    let states = walk(&ws.root().join(".repro/state"));
    assert_eq!(states.len(), 1, "{states:?}");
}

#[test]
fn a_table_column_no_stage_has_is_an_error_and_descriptions_stay_under_their_stage() {
    let ws = Ws::new(
        "stages:\n  a:\n    desc: \"first\\nsecond\\u001b[31m\"\n    cmd: 'echo \"{\\\"loss\\\": 1}\" > m.json'\n    metrics: m.json\n  t:\n    uses: table\n    needs: [a]\n    with: {columns: [stage, lsos]}\n    outs: [t.csv]\n",
    );
    let out = ws.repro(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("no upstream row has a column `lsos`"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("loss"), "{}", text(&out));
    let dag = stdout(&ws.repro(&["dag"]));
    assert!(dag.contains("    first\n    second�[31m\n"), "{dag:?}");
}
