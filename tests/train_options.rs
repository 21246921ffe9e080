//! Training options are checked when the pipeline loads, before anything runs: a bad field of
//! a `train` stage is one line naming the stage and the field, exit code 2, nothing stored.

mod common;
use common::*;

/// A pipeline of one `train` stage whose `with` is `fields` (YAML lines, one field each).
fn pipeline(fields: &[&str]) -> String {
    let mut s = String::from("stages:\n  train:\n    uses: train\n    with:\n");
    for f in fields {
        s.push_str(&format!("      {f}\n"));
    }
    s.push_str("    outs: [models/m]\n");
    s
}

fn workspace(fields: &[&str]) -> Ws {
    let ws = Ws::new(&pipeline(fields));
    // The tokens dep must exist for loading to reach the stage's own checks.
    std::fs::create_dir_all(ws.root().join("data/tokens")).unwrap();
    ws
}

const GOOD: [&str; 4] = ["tokens: data/tokens", "ffn: mlp", "scale: 0.5", "steps: 10"];

/// GOOD with `replace`'s fields set (a field's name is what comes before its colon), minus
/// the fields named in `remove`.
fn with(replace: &[&str], remove: &[&str]) -> Vec<String> {
    let name = |f: &str| f.split(':').next().unwrap().trim().to_string();
    let mut out: Vec<String> = GOOD
        .iter()
        .filter(|f| {
            let n = name(f);
            !remove.contains(&n.as_str()) && !replace.iter().any(|r| name(r) == n)
        })
        .map(|f| f.to_string())
        .collect();
    out.extend(replace.iter().map(|f| f.to_string()));
    out
}

fn refused(replace: &[&str], remove: &[&str], field: &str, also: &[&str]) {
    let fields = with(replace, remove);
    let refs: Vec<&str> = fields.iter().map(|s| s.as_str()).collect();
    let ws = workspace(&refs);
    let out = ws.repro(&["run"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{replace:?}: {}", text(&out));
    assert_eq!(err.trim().lines().count(), 1, "one line:\n{err}");
    // The error is reported at the field's own line (fields start on line 5), or at `with:`
    // (line 4) for a field that is missing.
    let line = fields
        .iter()
        .position(|f| f.split(':').next().unwrap().trim() == field)
        .map_or(4, |i| 5 + i);
    let at = format!("repro.yaml:{line}: stage `train`");
    for e in [at.as_str(), &format!("with.{field}")].iter().chain(also) {
        assert!(err.contains(e), "{replace:?}: expected `{e}` in:\n{err}");
    }
    assert_eq!(ws.records(), 0);
    assert!(walk(&ws.root().join("cache/objects")).is_empty());
    assert!(!ws.root().join("models").exists());
}

#[test]
fn good_options_load() {
    let ws = workspace(&GOOD);
    let out = ws.repro(&["status"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn non_positive_learning_rate() {
    refused(&["lr: -1"], &[], "lr", &["finite and positive"]);
    refused(&["lr: 0"], &[], "lr", &[]);
}

#[test]
fn nan_and_infinite_values() {
    refused(&["clip: .nan"], &[], "clip", &[".nan"]);
    refused(&["lr: .inf"], &[], "lr", &[]);
    refused(&["scale: -.inf"], &[], "scale", &[]);
}

#[test]
fn zero_batch_and_huge_seq_len() {
    refused(&["batch: 0"], &[], "batch", &["at least 1"]);
    refused(&["seq_len: 100000000"], &[], "seq_len", &["at most"]);
}

#[test]
fn budget_too_small_for_one_step() {
    refused(
        &["flops: 1000"],
        &["steps"],
        "flops",
        &["buys no step", "costs"],
    );
}

#[test]
fn absurd_model_sizes() {
    refused(
        &["d_model: 1000000000000", "layers: 2"],
        &["scale"],
        "d_model",
        &["at most"],
    );
    refused(&["d_model: 1e12", "layers: 2"], &["scale"], "d_model", &[]);
    refused(
        &["ffn: sgatlin", "experts: 780"],
        &[],
        "experts",
        &["perfect square"],
    );
}

#[test]
fn max_memory_too_small() {
    refused(
        &["max_memory: 1M"],
        &[],
        "max_memory",
        &["needs about", "MiB", "activations", "lower with.batch"],
    );
}
