//! What the commands print: quiet on a closed pipe, nothing created for a missing pipeline
//! file, and `repro show` as one table per stage of the file.

mod common;
use common::*;
use std::process::Stdio;

const PIPELINE: &str = r#"
params: {seed: 1}
stages:
  generate:
    matrix: {size: [10, 20]}
    cmd: seq ${matrix.size} > gen-${matrix.size}.txt && echo ${params.seed} > /dev/null
    outs: ["gen-${matrix.size}.txt"]
  stats:
    matrix: {size: [10, 20]}
    cmd: >-
      printf '{"lines": %d, "fit": {"loss": 0.5}}' $(wc -l < gen-${matrix.size}.txt)
      > stats-${matrix.size}.json
    deps: ["gen-${matrix.size}.txt"]
    metrics: stats-${matrix.size}.json
  results:
    uses: table
    needs: [stats]
    with: {sort: [size]}
    outs: [results.csv]
"#;

fn ran() -> Ws {
    let ws = Ws::new(PIPELINE);
    ws.run_ok(&[]);
    ws
}

/// Runs repro with stdout a pipe whose read end is already closed, so its first write fails
/// with EPIPE (repro, like every Rust program, ignores SIGPIPE).
fn into_closed_pipe(ws: &Ws, args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    ws.cmd(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn a_closed_pipe_ends_quietly() {
    let ws = ran();
    for args in [
        &["show"][..],
        &["show", "--csv"],
        &["show", "--columns", "lines"],
        &["dag"],
        &["dag", "--dot"],
        &["status"],
        &["run", "--dry-run"],
        &["log", "results"],
        &["verify"],
        &["gc"],
    ] {
        let out = into_closed_pipe(&ws, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "repro {args:?}: {err}");
        assert!(err.is_empty(), "repro {args:?} wrote to stderr: {err}");
    }
}

#[test]
fn a_missing_or_bad_pipeline_file_creates_nothing() {
    let ws = Ws::new("stages: {a: {cmd: true, outs: [x]}}\n");
    std::fs::remove_file(ws.root().join("repro.yaml")).unwrap();
    ws.write("bad.yaml", "stages: [\n");
    let commands: [&[&str]; 12] = [
        &["status"],
        &["show"],
        &["log", "a"],
        &["dag"],
        &["run"],
        &["run", "--dry-run"],
        &["status", "missing.yaml"],
        &["show", "missing.yaml"],
        &["log", "a", "missing.yaml"],
        &["dag", "missing.yaml"],
        &["run", "missing.yaml"],
        &["run", "bad.yaml"],
    ];
    for args in commands {
        let out = ws.repro(args);
        assert_eq!(out.status.code(), Some(2), "repro {args:?}: {}", text(&out));
        let left: Vec<_> = std::fs::read_dir(ws.root())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["bad.yaml"], "repro {args:?} left files behind");
    }
    let out = ws.repro(&["status", "missing.yaml"]);
    assert!(
        text(&out).contains("cannot read pipeline file missing.yaml"),
        "{}",
        text(&out)
    );
    // verify and gc in a folder with no store say so, and create none.
    for args in [&["verify"][..], &["gc"], &["gc", "--workspace-only"]] {
        let out = ws.repro(args);
        assert!(out.status.success(), "repro {args:?}: {}", text(&out));
        assert!(text(&out).contains("no cache store at"), "{}", text(&out));
        assert!(!ws.root().join("cache").exists() && !ws.root().join(".repro").exists());
    }
}

#[test]
fn show_prints_one_table_per_stage_of_the_file() {
    let ws = ran();
    let out = ws.repro(&["show"]);
    assert!(out.status.success(), "{}", text(&out));
    let s = stdout(&out);
    let tables: Vec<Vec<&str>> = s
        .split("\n\n")
        .map(|t| t.lines().collect::<Vec<_>>())
        .collect();
    assert_eq!(tables.len(), 3, "{s}");
    assert_eq!(tables[0][0], "generate (cmd, 2 stages)");
    let header = |t: &[&str]| t[1].split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(header(&tables[0]), "stage seconds seed size");
    assert_eq!(tables[0].len(), 4, "{s}");
    assert!(tables[0][2].starts_with("generate@size=10 "), "{s}");
    assert_eq!(tables[1][0], "stats (cmd, 2 stages)");
    assert_eq!(
        header(&tables[1]),
        "stage seconds size lines fit.loss",
        "only its own columns: {s}"
    );
    let row: Vec<&str> = tables[1][3].split_whitespace().collect();
    assert_eq!(row[0], "stats@size=20");
    assert_eq!(row[2..], ["20", "20", "0.5"]);
    assert_eq!(tables[2][0], "results (uses table, 1 stage)");
    assert_eq!(header(&tables[2]), "stage seconds");
    // Columns line up: every value starts where its header does.
    let at = tables[1][1].find("lines").unwrap();
    assert_eq!(&tables[1][3][at..at + 2], "20", "{s}");
}

#[test]
fn show_columns_picks_columns_and_stages() {
    let ws = ran();
    let out = ws.repro(&["show", "--columns", "lines,size"]);
    assert!(out.status.success(), "{}", text(&out));
    let lines: Vec<Vec<String>> = stdout(&out)
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect();
    assert_eq!(
        lines,
        [
            vec!["stage", "lines", "size"],
            vec!["generate@size=10", "-", "10"],
            vec!["generate@size=20", "-", "20"],
            vec!["stats@size=10", "10", "10"],
            vec!["stats@size=20", "20", "20"],
        ],
        "only the stages with any of the columns, `stage` first"
    );

    let out = ws.repro(&["show", "--columns", "fit.loss", "--csv"]);
    assert_eq!(
        stdout(&out),
        "stage,fit.loss\nstats@size=10,0.5\nstats@size=20,0.5\n"
    );

    let out = ws.repro(&["show", "--columns", "size,nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains(
            "--columns: no stage has `nope`; the columns here are: stage, seconds, seed, size, \
             lines, fit.loss"
        ),
        "{}",
        text(&out)
    );
}

#[test]
fn show_csv_is_one_table_of_every_column() {
    let ws = ran();
    let out = ws.repro(&["show", "--csv"]);
    let s = stdout(&out);
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines[0], "stage,seconds,seed,size,lines,fit.loss", "{s}");
    assert_eq!(lines.len(), 6, "{s}");
    assert!(lines[4].starts_with("stats@size=20,") && lines[4].ends_with(",,20,20,0.5"));
    assert!(lines[5].starts_with("results,"));
}
