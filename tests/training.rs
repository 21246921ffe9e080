//! The ML stage kinds through the real binary: the isoflop smoke pipeline end to end, a killed
//! training stage resuming to bitwise-identical weights, and bad training configurations.

mod common;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn repo_file(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(rel)
        .display()
        .to_string()
}

#[test]
fn isoflop_smoke_pipeline_end_to_end() {
    let ws = Ws::new("stages: {}\n");
    let smoke = repo_file("pipelines/isoflop-smoke.yaml");
    let out = ws.repro(&["run", &smoke]);
    assert!(out.status.success(), "{}", text(&out));

    let csv = ws.read("results/isoflop-smoke.csv");
    let mut rows = csv.lines();
    let header: Vec<&str> = rows.next().unwrap().split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no column {name}"))
    };
    let rows: Vec<Vec<String>> = rows
        .map(|r| r.split(',').map(String::from).collect())
        .collect();
    assert_eq!(rows.len(), 12, "3 kinds x 2 scales x 2 budgets:\n{csv}");
    let uniform = (512f64).ln();
    for r in &rows {
        let loss: f64 = r[col("heldout_loss")].parse().unwrap();
        let counted: f64 = r[col("counted_flops")].parse().unwrap();
        let budget: f64 = r[col("budget")].parse().unwrap();
        let real: f64 = r[col("real_flops")].parse().unwrap();
        assert!(
            loss.is_finite() && loss < uniform,
            "a trained model beats the uniform guess ({uniform:.3}): {r:?}"
        );
        assert!(
            counted <= budget && counted > 0.5 * budget,
            "steps fill the budget: {r:?}"
        );
        assert!(real > counted, "real FLOPs include the unembedding: {r:?}");
        // The metric: tokens trained on, steps × batch × sequence (not the input path).
        let tokens: f64 = r[col("tokens")].parse().unwrap();
        let steps: f64 = r[col("steps")].parse().unwrap();
        assert!(tokens > 0.0 && tokens % steps == 0.0, "{r:?}");
        if r[col("ffn")] == "sgatlin" {
            let used: f64 = r[col("experts_used")].parse().unwrap();
            assert!(used > 0.0 && used <= 1.0, "{r:?}");
        }
    }
    let best = ws.read("results/isoflop-smoke-best.csv");
    assert_eq!(
        best.lines().count(),
        1 + 6,
        "one row per budget and kind:\n{best}"
    );
    let svg = ws.read("results/isoflop-smoke.svg");
    assert!(
        svg.starts_with("<svg") && svg.matches("<polyline").count() == 6,
        "3 curves x 2 panels"
    );

    // Nothing runs the second time.
    let out = ws.repro(&["run", &smoke]);
    assert_eq!(
        text(&out).lines().last(),
        Some("0 ran, 0 restored, 29 up to date"),
        "{}",
        text(&out)
    );
}

#[test]
fn full_isoflop_pipelines_are_valid() {
    let ws = Ws::new("stages: {}\n");
    for (file, trains) in [
        ("pipelines/isoflop.yaml", 27),
        ("pipelines/isoflop-ablation.yaml", 36),
    ] {
        let out = ws.repro(&["dag", &repo_file(file)]);
        assert!(out.status.success(), "{file}: {}", text(&out));
        let listed = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("train@"))
            .count();
        assert_eq!(listed, trains, "{file}");
    }
}

/// A tiny sgatlin model trained for long enough to be killed mid-way.
fn corpus_train() -> String {
    corpus_and_train(
        "ffn: sgatlin, d_model: 32, layers: 1, channels: 2, experts: 16, topk: 2, d_key: 8, \
         seq_len: 16, batch: 4, steps: 3000, checkpoint_s: 0, seed: 3",
        "",
    )
}

#[test]
fn killed_training_resumes_to_identical_weights() {
    let reference = Ws::new(&corpus_train());
    reference.write("stories.txt", &stories());
    let out = reference.repro(&["run"]);
    assert!(out.status.success(), "{}", text(&out));

    let ws = Ws::new(&corpus_train());
    ws.write("stories.txt", &stories());
    let mut child = ws
        .cmd(&["run"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ckpt = ws.root().join(".repro/scratch/train/resume.safetensors");
    let t0 = Instant::now();
    while !ckpt.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Kill once the stage reports a step well past the first checkpoint, but far from the end.
    let progress = ws.root().join(".repro/scratch/train/progress");
    let step = || -> u64 {
        let text = std::fs::read_to_string(&progress).unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["pos"].as_u64())
            .unwrap_or(0)
    };
    while step() < 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "training never reached step 200"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    assert!(
        !ws.root().join("models/tiny/model.safetensors").exists(),
        "killed before the end"
    );

    let out = ws.repro(&["run"]);
    assert!(out.status.success(), "{}", text(&out));
    let log = text(&ws.repro(&["log", "train"]));
    assert!(log.contains("resuming at step"), "{log}");
    let a = std::fs::read(reference.root().join("models/tiny/model.safetensors")).unwrap();
    let b = std::fs::read(ws.root().join("models/tiny/model.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from an uninterrupted run");
    assert_eq!(
        reference.read("models/tiny/loss.csv"),
        ws.read("models/tiny/loss.csv")
    );
    assert!(
        !ws.root().join(".repro/scratch/train").exists(),
        "scratch is removed after success"
    );
}

#[test]
fn bad_training_configs_are_refused_before_running() {
    let cases = [
        ("ffn: dense", "unknown variant `dense`"),
        (
            "ffn: sgatlin, scale: 0.5, steps: 10, experts: 50",
            "perfect square",
        ),
        ("ffn: mlp, scale: 0.5, flops: 1e9, steps: 10", "not both"),
        ("ffn: mlp, scale: 0.5", "give with.flops"),
        (
            "ffn: mlp, scale: 0.5, steps: 10, device: tpu",
            "unknown device `tpu`",
        ),
        (
            "ffn: mlp, scale: 0.5, steps: 10, lr0: 1",
            "unknown field `lr0`",
        ),
    ];
    for (with, expect) in cases {
        let ws = Ws::new(&format!(
            "stages:\n  t:\n    uses: train\n    with: {{tokens: exists, {with}}}\n    outs: [m]\n"
        ));
        ws.write("exists/tokens.json", "{}");
        let out = ws.repro(&["run"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{with}: {err}");
        assert!(
            err.contains("repro.yaml:4: stage `t`") && err.contains(expect),
            "{with}: expected `{expect}` in {err}"
        );
    }
}
