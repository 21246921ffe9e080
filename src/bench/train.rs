//! `repro bench train`: training throughput (forward + backward + AdamW) and peak memory of
//! each feedforward kind at two sizes, against the same models in PyTorch on the CPU
//! (`bench/torch_train.py`), run side by side in one command. Every measurement runs in a
//! child process of its own, so peak memory (VmHWM / ru_maxrss) is measured the same way.

use crate::nn::{bench_train, FfnKind, ModelConfig};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Ladder scales to measure (SPEC §6).
    #[arg(long, value_delimiter = ',', default_value = "0.5,1")]
    pub scales: Vec<f64>,
    /// Feedforward kinds (default: all six).
    #[arg(long, value_delimiter = ',')]
    pub kinds: Vec<String>,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 4096)]
    pub vocab: usize,
    /// Timed steps per measurement (after one warm-up step).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Threads for both engines (default: the number of cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Python with PyTorch (default: bench/.venv/bin/python; "none" skips PyTorch).
    #[arg(long)]
    pub python: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct TrainOneArgs {
    #[arg(long)]
    pub config: String,
    #[arg(long)]
    pub batch: usize,
    #[arg(long)]
    pub steps: usize,
}

/// The child process: one measurement, printed as JSON.
pub fn one(args: &TrainOneArgs) -> Result<()> {
    let cfg: ModelConfig = serde_json::from_str(&args.config).context("bad --config")?;
    cfg.validate().map_err(anyhow::Error::msg)?;
    let (tokens_per_s, _) = bench_train(&cfg, args.batch, args.steps)?;
    let out = json!({"tokens_per_s": tokens_per_s, "peak_rss_bytes": peak_rss_bytes(), "total_params": cfg.total_params()});
    println!("{out}");
    Ok(())
}

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let kinds: Vec<FfnKind> = if args.kinds.is_empty() {
        FfnKind::ALL.to_vec()
    } else {
        args.kinds
            .iter()
            .map(|k| k.parse().map_err(anyhow::Error::msg))
            .collect::<Result<_>>()?
    };
    let python = python(args.python.as_deref());
    let exe = std::env::current_exe()?;
    println!(
        "repro bench train: batch {}x{}, vocab {}, {} timed steps, {threads} threads; PyTorch: {}",
        args.batch,
        args.seq_len,
        args.vocab,
        args.steps,
        python.as_ref().map_or(
            "not found (bench/install-peers.sh installs it)".to_string(),
            |p| p.display().to_string()
        )
    );
    println!(
        "{:<13} {:>5} {:>6} {:>10} {:>12} {:>12} {:>7} {:>9} {:>9}",
        "ffn",
        "scale",
        "d",
        "params",
        "repro tok/s",
        "torch tok/s",
        "ratio",
        "repro MB",
        "torch MB"
    );
    for &scale in &args.scales {
        for &kind in &kinds {
            let cfg = ModelConfig::ladder(kind, scale, args.vocab, args.seq_len);
            let cfg_json = serde_json::to_string(&cfg)?;
            let (b, s) = (args.batch.to_string(), args.steps.to_string());
            let ours = measure(
                Command::new(&exe)
                    .args([
                        "bench",
                        "train-one",
                        "--config",
                        &cfg_json,
                        "--batch",
                        &b,
                        "--steps",
                        &s,
                    ])
                    .env("RAYON_NUM_THREADS", threads.to_string()),
            )?;
            let torch = match &python {
                Some(py) => Some(measure(Command::new(py).arg(script()).args([
                    "--config",
                    &cfg_json,
                    "--batch",
                    &b,
                    "--steps",
                    &s,
                    "--threads",
                    &threads.to_string(),
                ]))?),
                None => None,
            };
            let get = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            let (ours_tps, ours_mb) = (
                get(&ours, "tokens_per_s"),
                get(&ours, "peak_rss_bytes") / 1e6,
            );
            let (torch_tps, torch_mb) = torch.as_ref().map_or((f64::NAN, f64::NAN), |t| {
                (get(t, "tokens_per_s"), get(t, "peak_rss_bytes") / 1e6)
            });
            println!(
                "{:<13} {:>5} {:>6} {:>10} {:>12.0} {:>12.0} {:>6.2}x {:>9.0} {:>9.0}",
                kind.as_str(),
                scale,
                cfg.d_model,
                cfg.total_params(),
                ours_tps,
                torch_tps,
                ours_tps / torch_tps,
                ours_mb,
                torch_mb
            );
        }
    }
    Ok(())
}

fn script() -> PathBuf {
    PathBuf::from("bench/torch_train.py")
}

fn python(given: Option<&str>) -> Option<PathBuf> {
    let candidate = match given {
        Some("none") => return None,
        Some(p) => PathBuf::from(p),
        None => PathBuf::from("bench/.venv/bin/python"),
    };
    let ok = Command::new(&candidate)
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|o| o.status.success());
    (ok && Path::new(&script()).is_file()).then_some(candidate)
}

fn measure(cmd: &mut Command) -> Result<Value> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no JSON result")?;
    Ok(serde_json::from_str(line)?)
}
