//! `repro bench train`: training throughput (forward + backward + AdamW) and peak memory of
//! each feedforward kind at a few sizes, against the same models in PyTorch on the CPU
//! (`bench/torch_train.py`), run side by side in one command. Every measurement runs in a
//! child process of its own, so peak memory (VmHWM) is measured the same way, and the two
//! engines take turns (repro, PyTorch, repro, PyTorch, ...) for `--rounds` rounds, so that load
//! from elsewhere on a shared machine falls on both; the figures are medians over the rounds
//! and the ratio is the median of the per-round ratios, with their range beside it.

use super::script::Script;
use crate::nn::cpu::isa::{Isa, ISA_ENV};
use crate::nn::profile::Profile;
use crate::nn::{bench_train_with, FfnKind, ModelConfig};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The batch a training step of both benchmarks is measured on.
#[derive(clap::Args, Debug)]
pub struct StepShape {
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 4096)]
    pub vocab: usize,
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Ladder scales to measure (SPEC §6).
    #[arg(long, value_delimiter = ',', default_value = "0.5,1,2")]
    pub scales: Vec<f64>,
    /// Feedforward kinds (default: all six).
    #[arg(long, value_delimiter = ',')]
    pub kinds: Vec<String>,
    #[command(flatten)]
    pub shape: StepShape,
    /// Timed steps per measurement (after one warm-up step).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Measurements per engine for each size and kind, alternating repro and PyTorch.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Threads for both engines (default: the number of cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Python with PyTorch (default: bench/.venv/bin/python; "none" skips PyTorch).
    #[arg(long)]
    pub python: Option<String>,
    /// Profile repro's first round of each measurement per backend op and print the tables.
    #[arg(long)]
    pub profile: bool,
    /// Also write every per-round measurement, as JSON, to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Cap both engines at this instruction set (scalar, avx2, avx512), e.g. to measure the
    /// AVX2 path on an AVX-512 machine: repro through REPRO_ISA, PyTorch through
    /// ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS and ONEDNN_MAX_CPU_ISA.
    #[arg(long, value_parser = parse_isa)]
    pub isa: Option<Isa>,
}

#[derive(clap::Args, Debug)]
pub struct TrainOneArgs {
    #[arg(long)]
    pub config: String,
    #[arg(long)]
    pub batch: usize,
    #[arg(long)]
    pub steps: usize,
    /// Time every backend op: a table on stderr, and a `profile` field in the JSON.
    #[arg(long)]
    pub profile: bool,
}

/// The child process: one measurement, printed as JSON.
pub fn one(args: &TrainOneArgs) -> Result<()> {
    let cfg: ModelConfig = serde_json::from_str(&args.config).context("bad --config")?;
    cfg.validate().map_err(anyhow::Error::msg)?;
    let b = bench_train_with(&cfg, args.batch, args.steps, args.profile)?;
    let mut out = json!({
        "tokens_per_s": b.tokens_per_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "total_params": cfg.total_params(),
        "isa": Isa::process().name(),
    });
    if let Some(p) = &b.profile {
        eprint!("{}", p.render("", 10));
        out["profile"] = serde_json::to_value(p)?;
    }
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

/// The CPU's model name from /proc/cpuinfo, or "unknown".
fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let name = field("model name").unwrap_or_else(|| "unknown".to_string());
    // A virtual machine often hides the exact model; family and model still tell it.
    match (field("cpu family"), field("model")) {
        (Some(f), Some(m)) => format!("{name} (family {f}, model {m})"),
        _ => name,
    }
}

/// The 1-minute load average, where the system tells it.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Median of the finite values; NaN when there are none. An even count takes the mean of the
/// middle two.
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// What a table row shows for one size and kind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Summary {
    pub repro: f64,
    pub torch: f64,
    /// Median over rounds of repro_i / torch_i.
    pub ratio: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
}

/// Tokens/s of each round (torch empty when PyTorch did not run) to medians and the median,
/// min and max of the per-round ratios (NaN where there is nothing to take them of).
pub(crate) fn summarize(repro: &[f64], torch: &[f64]) -> Summary {
    let ratios: Vec<f64> = repro
        .iter()
        .zip(torch)
        .map(|(r, t)| r / t)
        .filter(|x| x.is_finite())
        .collect();
    let fold = |init: f64, f: fn(f64, f64) -> f64| {
        if ratios.is_empty() {
            f64::NAN
        } else {
            ratios.iter().copied().fold(init, f)
        }
    };
    Summary {
        repro: median(repro),
        torch: median(torch),
        ratio: median(&ratios),
        ratio_min: fold(f64::INFINITY, f64::min),
        ratio_max: fold(f64::NEG_INFINITY, f64::max),
    }
}

/// `x` with `prec` decimals right-aligned in `width`, or "-" when it is not a number.
fn num(x: f64, prec: usize, width: usize) -> String {
    if x.is_finite() {
        format!("{x:>width$.prec$}")
    } else {
        format!("{:>width$}", "-")
    }
}

fn get(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

/// One (scale, kind): the per-round child results.
struct Row {
    kind: FfnKind,
    scale: f64,
    cfg: ModelConfig,
    repro: Vec<Value>,
    torch: Vec<Value>,
}

impl Row {
    fn summary(&self) -> Summary {
        let tps = |v: &[Value]| v.iter().map(|x| get(x, "tokens_per_s")).collect::<Vec<_>>();
        summarize(&tps(&self.repro), &tps(&self.torch))
    }

    fn peak_mb(v: &[Value]) -> f64 {
        v.iter()
            .map(|x| get(x, "peak_rss_bytes") / 1e6)
            .filter(|x| x.is_finite())
            .fold(f64::NAN, f64::max)
    }

    /// Mean cores' worth of CPU other processes used during the measurements of one side.
    fn others(v: &[Value]) -> f64 {
        let x: Vec<f64> = v
            .iter()
            .map(|x| get(x, "others_cpu_cores"))
            .filter(|x| x.is_finite())
            .collect();
        if x.is_empty() {
            f64::NAN
        } else {
            x.iter().sum::<f64>() / x.len() as f64
        }
    }

    fn variant(&self) -> String {
        let set: BTreeSet<&str> = self
            .torch
            .iter()
            .filter_map(|t| t["variant"].as_str())
            .collect();
        if set.is_empty() {
            "-".into()
        } else {
            set.into_iter().collect::<Vec<_>>().join("/")
        }
    }

    fn line(&self) -> String {
        let s = self.summary();
        let range = if s.ratio_min.is_finite() {
            format!("{:.2}-{:.2}", s.ratio_min, s.ratio_max)
        } else {
            "-".into()
        };
        let ratio = if s.ratio.is_finite() {
            format!("{:.2}x", s.ratio)
        } else {
            "-".into()
        };
        let others = |v: &[Value]| num(Row::others(v), 1, 0);
        let load = format!("{}/{}", others(&self.repro), others(&self.torch));
        format!(
            "{:<13} {:>5} {:>5} {:>10} {} {} {ratio:>7} {range:>11} {} {} {load:>9} {}",
            self.kind.as_str(),
            self.scale,
            self.cfg.d_model,
            self.cfg.total_params(),
            num(s.repro, 0, 11),
            num(s.torch, 0, 11),
            num(Row::peak_mb(&self.repro), 0, 8),
            num(Row::peak_mb(&self.torch), 0, 8),
            self.variant(),
        )
    }

    fn json(&self) -> Value {
        let s = self.summary();
        let finite = |x: f64| if x.is_finite() { json!(x) } else { Value::Null };
        json!({
            "ffn": self.kind.as_str(),
            "scale": self.scale,
            "config": self.cfg,
            "total_params": self.cfg.total_params(),
            "repro": self.repro,
            "torch": self.torch,
            "summary": {
                "repro_tokens_per_s": finite(s.repro),
                "torch_tokens_per_s": finite(s.torch),
                "ratio": finite(s.ratio),
                "ratio_min": finite(s.ratio_min),
                "ratio_max": finite(s.ratio_max),
                "repro_peak_rss_bytes": finite(Row::peak_mb(&self.repro) * 1e6),
                "torch_peak_rss_bytes": finite(Row::peak_mb(&self.torch) * 1e6),
                "repro_others_cpu_cores": finite(Row::others(&self.repro)),
                "torch_others_cpu_cores": finite(Row::others(&self.torch)),
            },
        })
    }
}

/// Cores' worth of CPU taken by other processes during a measurement from which the run says
/// that the machine was not quiet.
const BUSY_NOTE: f64 = 0.2;

fn table_header() -> String {
    format!(
        "{:<13} {:>5} {:>5} {:>10} {:>11} {:>11} {:>7} {:>11} {:>8} {:>8} {:>9} {}",
        "ffn",
        "scale",
        "d",
        "params",
        "repro tok/s",
        "torch tok/s",
        "ratio",
        "ratio range",
        "repro MB",
        "torch MB",
        "busy r/t",
        "torch variant"
    )
}

pub fn run(args: &TrainArgs) -> Result<()> {
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
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
    let python = python(args.python.as_deref())?;
    let torch_train = Script::write("torch_train.py", TORCH_TRAIN)?;
    let exe = std::env::current_exe()?;
    let cpu = cpu_model();
    let load = load_average();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "repro bench train: batch {}x{}, vocab {}, {} timed steps (after 1 warm-up), {} rounds, {threads} threads",
        args.shape.batch, args.shape.seq_len, args.shape.vocab, args.steps, args.rounds,
    );
    println!(
        "CPU: {cpu}, {cores} logical cores; load average {} at start",
        load.map_or("unknown".to_string(), |l| format!("{l:.2}"))
    );
    println!(
        "PyTorch: {}",
        python.as_ref().map_or(
            "not run (--python none, or no bench/.venv/bin/python with torch: bench/install-peers.sh installs one)".to_string(),
            |p| p.display().to_string()
        )
    );
    if python.is_some() {
        println!(
            "each round runs repro then PyTorch, each in a process of its own. tok/s: median over \
             rounds; ratio: median of the\n  per-round repro/torch ratios (range: min-max); MB: \
             peak RSS, max over rounds; busy r/t: cores' worth of CPU that other\n  processes \
             used meanwhile, mean over the repro / torch runs (0.0 = quiet machine)"
        );
    } else {
        println!(
            "each round runs repro in a process of its own. tok/s: median over rounds; MB: peak \
             RSS, max over rounds;\n  busy r/t: cores' worth of CPU that other processes used \
             meanwhile (0.0 = quiet machine)"
        );
    }
    let mut rows: Vec<Row> = Vec::new();
    let (mut repro_isa, mut torch_isa) = (BTreeSet::new(), BTreeSet::new());
    let threads_s = threads.to_string();
    for &scale in &args.scales {
        for &kind in &kinds {
            let cfg = ModelConfig::ladder(kind, scale, args.shape.vocab, args.shape.seq_len);
            let cfg_json = serde_json::to_string(&cfg)?;
            let (b, s) = (args.shape.batch.to_string(), args.steps.to_string());
            let mut row = Row {
                kind,
                scale,
                cfg: cfg.clone(),
                repro: vec![],
                torch: vec![],
            };
            for round in 0..args.rounds {
                // What both engines' children are told: the model, the batch, the steps.
                let common = ["--config", &cfg_json, "--batch", &b, "--steps", &s];
                let mut cmd = Command::new(&exe);
                cmd.args(["bench", "train-one"])
                    .args(common)
                    .env("RAYON_NUM_THREADS", &threads_s);
                if let Some(isa) = args.isa {
                    cmd.env(ISA_ENV, isa.name());
                }
                if args.profile && round == 0 {
                    cmd.arg("--profile");
                }
                let ours = measure(&mut cmd)?;
                repro_isa.insert(ours["isa"].as_str().unwrap_or("?").to_string());
                row.repro.push(ours);
                if let Some(py) = &python {
                    let mut cmd = Command::new(py);
                    cmd.arg(torch_train.path())
                        .args(common)
                        .args(["--threads", &threads_s]);
                    if let Some(isa) = args.isa {
                        cmd.envs(torch_isa_env(isa));
                    }
                    let torch = measure(&mut cmd)?;
                    torch_isa.insert(torch["isa"].as_str().unwrap_or("?").to_string());
                    let tp = torch["total_params"].as_u64();
                    if round == 0 && tp != Some(cfg.total_params() as u64) {
                        eprintln!(
                            "warning: {} scale {scale}: PyTorch model has {tp:?} parameters, repro {}",
                            kind.as_str(),
                            cfg.total_params()
                        );
                    }
                    row.torch.push(torch);
                }
            }
            if rows.is_empty() {
                // The instruction sets the children reported, known once the first ran.
                let env = match args.isa {
                    Some(isa) => format!(", both capped at {} (--isa)", isa.name()),
                    None => std::env::var(ISA_ENV)
                        .map(|v| format!(", {ISA_ENV}={v}"))
                        .unwrap_or_default(),
                };
                println!(
                    "kernels: repro {}{env}; PyTorch {}",
                    join(&repro_isa),
                    if python.is_some() {
                        join(&torch_isa)
                    } else {
                        "-".into()
                    }
                );
                println!("{}", table_header());
            }
            println!("{}", row.line());
            rows.push(row);
        }
    }
    let busiest = rows
        .iter()
        .flat_map(|r| r.repro.iter().chain(&r.torch))
        .map(|v| get(v, "others_cpu_cores"))
        .filter(|x| x.is_finite())
        .fold(0.0, f64::max);
    if busiest >= BUSY_NOTE {
        println!(
            "note: the machine was not quiet: other processes took up to {busiest:.1} cores' worth \
             of CPU during a measurement\n  (busy r/t); engines suffer from that unequally, so \
             these figures do not show their speed on a quiet machine"
        );
    }
    if repro_isa.len() > 1 || torch_isa.len() > 1 {
        println!(
            "note: the instruction set varied between runs: repro {}; PyTorch {}",
            join(&repro_isa),
            join(&torch_isa)
        );
    }
    if args.profile {
        for row in &rows {
            let p = row
                .repro
                .first()
                .and_then(|v| serde_json::from_value::<Profile>(v.get("profile")?.clone()).ok());
            if let Some(p) = p {
                println!(
                    "\nrepro per-op profile, {} scale {} (round 1, {} steps, wall time inside each backend op):",
                    row.kind.as_str(),
                    row.scale,
                    p.steps
                );
                print!("{}", p.render("  ", 8));
            }
        }
    }
    if let Some(path) = &args.json {
        let doc = json!({
            "batch": args.shape.batch,
            "seq_len": args.shape.seq_len,
            "vocab": args.shape.vocab,
            "steps": args.steps,
            "rounds": args.rounds,
            "threads": threads,
            "cpu": cpu,
            "load_average_at_start": load,
            "python": python.as_ref().map(|p| p.display().to_string()),
            "repro_isa": repro_isa,
            "torch_isa": torch_isa,
            "results": rows.iter().map(Row::json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("raw per-round measurements written to {}", path.display());
    }
    Ok(())
}

fn join(set: &BTreeSet<String>) -> String {
    set.iter().cloned().collect::<Vec<_>>().join("/")
}

const TORCH_TRAIN: &str = include_str!("../../bench/torch_train.py");

/// The Python that runs the PyTorch side: `given` (an error if it cannot import torch), else
/// bench/.venv/bin/python where bench/install-peers.sh put it, else none.
fn python(given: Option<&str>) -> Result<Option<PathBuf>> {
    let has_torch = |p: &Path| {
        Command::new(p)
            .args(["-c", "import torch"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    match given {
        Some("none") => Ok(None),
        Some(p) if has_torch(Path::new(p)) => Ok(Some(PathBuf::from(p))),
        Some(p) => bail!("--python {p}: cannot run it, or it cannot import torch (bench/install-peers.sh installs one into bench/.venv)"),
        None => {
            let default = PathBuf::from("bench/.venv/bin/python");
            Ok(has_torch(&default).then_some(default))
        }
    }
}

/// CPU seconds the whole machine has been busy (all cores; steal counted as busy, as it is
/// time taken by others), from /proc/stat.
fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| busy as f64 / hz as f64)
}

/// CPU seconds used by this process's finished children.
fn children_cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Runs one measurement; adds `others_cpu_cores`: the cores' worth of CPU that processes other
/// than the child used meanwhile (0 on a quiet machine; coarse, at clock-tick resolution).
fn measure(cmd: &mut Command) -> Result<Value> {
    let (busy0, ours0, t0) = (
        machine_busy_secs(),
        children_cpu_secs(),
        std::time::Instant::now(),
    );
    let mut v = run_child(cmd)?;
    let wall = t0.elapsed().as_secs_f64();
    if let (Some(b0), Some(b1)) = (busy0, machine_busy_secs()) {
        let others = ((b1 - b0) - (children_cpu_secs() - ours0)).max(0.0) / wall.max(1e-9);
        if others.is_finite() {
            v["others_cpu_cores"] = json!(others);
        }
    }
    Ok(v)
}

fn parse_isa(s: &str) -> Result<Isa, String> {
    let isa = Isa::parse(s).ok_or_else(|| format!("`{s}` is not one of scalar, avx2, avx512"))?;
    if !isa.supported() {
        return Err(format!("this CPU cannot run {}", isa.name()));
    }
    Ok(isa)
}

/// The variables that cap PyTorch's ATen kernels, MKL and oneDNN at an instruction set.
fn torch_isa_env(isa: Isa) -> [(&'static str, &'static str); 3] {
    let (aten, mkl, onednn) = match isa {
        Isa::Scalar => ("default", "SSE4_2", "SSE41"),
        Isa::Avx2 => ("avx2", "AVX2", "AVX2"),
        Isa::Avx512 => ("avx512", "AVX512", "AVX512_CORE"),
    };
    [
        ("ATEN_CPU_CAPABILITY", aten),
        ("MKL_ENABLE_INSTRUCTIONS", mkl),
        ("ONEDNN_MAX_CPU_ISA", onednn),
    ]
}

fn run_child(cmd: &mut Command) -> Result<Value> {
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
        .with_context(|| format!("{cmd:?} printed no JSON result"))?;
    serde_json::from_str(line).with_context(|| format!("{cmd:?} printed a bad result: {line}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
        assert!(median(&[]).is_nan());
        // Non-numbers are left out rather than poisoning the sort.
        assert_eq!(median(&[f64::NAN, 5.0, 1.0]), 3.0);
    }

    #[test]
    fn ratio_is_the_median_of_per_round_ratios() {
        // Odd: ratios 2, 1, 4 -> median 2, range 1-4. The ratio of medians would be 20/10 = 2
        // here too, so the even case below tells them apart.
        let s = summarize(&[20.0, 10.0, 40.0], &[10.0, 10.0, 10.0]);
        assert_eq!(
            (s.repro, s.torch, s.ratio, s.ratio_min, s.ratio_max),
            (20.0, 10.0, 2.0, 1.0, 4.0)
        );
        // Even: ratios 1, 3, 2, 6 -> median (2 + 3) / 2 = 2.5, not the ratio of medians 45 / 10.
        let s = summarize(&[10.0, 30.0, 60.0, 60.0], &[10.0, 10.0, 30.0, 10.0]);
        assert_eq!((s.repro, s.torch), (45.0, 10.0));
        assert_eq!((s.ratio, s.ratio_min, s.ratio_max), (2.5, 1.0, 6.0));
        // Without PyTorch: medians of repro only, no ratio.
        let s = summarize(&[3.0, 1.0], &[]);
        assert_eq!(s.repro, 2.0);
        assert!(s.torch.is_nan() && s.ratio.is_nan() && s.ratio_min.is_nan());
    }

    #[test]
    fn cpu_model_is_never_empty() {
        assert!(!cpu_model().is_empty());
    }
}
