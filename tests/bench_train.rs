//! `repro bench train` as a user runs it: from any directory, with or without PyTorch, and a
//! clear error naming the Python when the PyTorch side cannot run. Speed itself is measured by
//! the bench, never asserted here.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn bench(dir: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_repro"))
        .args(["bench", "train", "--scales", "0.5", "--steps", "1"])
        .args(extra)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Away from the checkout, without PyTorch: every kind asked for gets its rounds, in the table
/// and in the JSON, on the instruction set it reports.
#[test]
fn runs_anywhere_without_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("rounds.json");
    let out = bench(
        dir.path(),
        &[
            "--kinds",
            "mlp,moe",
            "--rounds",
            "2",
            "--python",
            "none",
            "--json",
            json.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("PyTorch: not run"), "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).expect("the JSON parses");
    let results = v["results"].as_array().unwrap();
    let kinds: Vec<&str> = results.iter().map(|r| r["ffn"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["mlp", "moe"]);
    for r in results {
        let rounds = r["repro"].as_array().unwrap();
        assert_eq!(rounds.len(), 2, "{r}");
        for m in rounds {
            assert!(m["tokens_per_s"].as_f64().unwrap() > 0.0, "{m}");
            assert!(m["peak_rss_bytes"].as_u64().unwrap() > 0, "{m}");
            assert_eq!(m["total_params"], r["total_params"], "{m}");
        }
        let line = stdout
            .lines()
            .find(|l| l.starts_with(r["ffn"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("no table row for {r}:\n{stdout}"));
        assert!(line.contains(&r["total_params"].to_string()), "{line}");
    }
    assert!(v["repro_isa"].as_array().is_some_and(|a| a.len() == 1));
}

/// A Python that is missing, cannot import torch, or prints no result: an error naming it,
/// at once for the first two, and never a table with made-up figures.
#[test]
fn a_python_that_cannot_run_the_pytorch_side_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let fake = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.to_str().unwrap().to_string()
    };
    let no_torch = fake("no-torch", "exit 1");
    // Imports anything (exit 0), then prints nothing for the measurement.
    let silent = fake("silent", "exit 0");
    let cases = [
        ("/nonexistent/python".to_string(), "cannot import torch"),
        (no_torch.clone(), "cannot import torch"),
        (silent.clone(), "printed no JSON result"),
    ];
    for (python, says) in cases {
        let out = bench(dir.path(), &["--kinds", "mlp", "--python", &python]);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{python}: {all}");
        assert!(
            all.contains(&python) && all.contains(says),
            "{python}: {all}"
        );
        assert!(!all.contains("panicked"), "{all}");
    }
}
