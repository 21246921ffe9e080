//! `repro bench engine`: the engine against the hardware and against DVC.
//!
//! Generates a workspace of `stages` shell stages in groups of ten (a chain of five over one
//! input file, a fan-out of four, a fan-in) over input files totalling `data_mb`, then times,
//! with the real binary: a full build, a no-op run and `status` with a warm stat cache, the
//! same with a cold one (hashing throughput), one edited input, the revert (run cache), and the
//! per-stage overhead of the scheduler on trivial stages against spawning the same shells
//! directly. If DVC is installed, its no-op `repro` and `status` on the same stages are timed
//! in the same run and the ratios printed.

use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct EngineArgs {
    /// Number of stages (a multiple of 10).
    #[arg(long, default_value_t = 1000)]
    pub stages: usize,
    /// Total size of the input files, in MB (split over stages/10 files).
    #[arg(long, default_value_t = 1000)]
    pub data_mb: usize,
    /// Where to build the benchmark workspace.
    #[arg(long, default_value = "target/bench-engine")]
    pub dir: PathBuf,
    /// Parallel jobs for the build (default: the number of cores).
    #[arg(short, long)]
    pub jobs: Option<usize>,
    /// Repetitions of each warm measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// The DVC executable (default: bench/.venv/bin/dvc, else `dvc` on PATH; "none" skips).
    #[arg(long)]
    pub dvc: Option<String>,
}

pub fn run(args: &EngineArgs) -> Result<()> {
    if args.stages == 0 || !args.stages.is_multiple_of(10) {
        bail!("--stages must be a positive multiple of 10");
    }
    let groups = args.stages / 10;
    let jobs = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let exe = std::env::current_exe()?;
    let ws = prepare(&args.dir, groups, args.data_mb)?;
    let repro = |argv: &[&str]| -> Result<Duration> {
        time(Command::new(&exe).args(argv).current_dir(&ws))
    };
    let jobs_s = jobs.to_string();
    let mut report = String::new();
    let bytes = (args.data_mb as f64) * 1e6;
    writeln!(
        report,
        "repro bench engine: {} stages in {groups} groups over {:.0} MB of input, --jobs {jobs}",
        args.stages,
        bytes / 1e6
    )?;

    let full = repro(&["run", "-j", &jobs_s])?;
    line(
        &mut report,
        "full build",
        full,
        &format!("{:.2} ms/stage", ms(full) / args.stages as f64),
    );
    let noop = median(args.repeat, || repro(&["run", "-j", &jobs_s]))?;
    line(&mut report, "no-op run (warm)", noop, "");
    let status = median(args.repeat, || repro(&["status"]))?;
    line(&mut report, "status (warm)", status, "");

    std::fs::remove_file(ws.join(".repro/statcache")).ok();
    let cold = repro(&["status"])?;
    line(
        &mut report,
        "status (cold stat cache)",
        cold,
        &format!(
            "{:.2} GB/s hashed from the page cache",
            bytes / cold.as_secs_f64() / 1e9
        ),
    );
    let in_process = hash_throughput(&ws)?;
    writeln!(
        report,
        "  {:<28} {:>9.2} GB/s (blake3 over every input, in process)",
        "hash throughput", in_process
    )?;

    let edited = ws.join("in/0.bin");
    let original = std::fs::read(&edited)?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&edited)?
        .write_all(b"x")?;
    let edit = repro(&["run", "-j", &jobs_s])?;
    line(
        &mut report,
        "one input edited",
        edit,
        "re-runs its group of 10",
    );
    std::fs::write(&edited, &original)?;
    let revert = repro(&["run", "-j", &jobs_s])?;
    line(
        &mut report,
        "edit reverted",
        revert,
        "restored from the run cache",
    );

    let (sched, spawn) = scheduler_overhead(&exe, &args.dir, args.stages, jobs)?;
    let per_stage = (ms(sched) - ms(spawn)) / args.stages as f64;
    line(
        &mut report,
        "trivial stages (forced)",
        sched,
        &format!(
            "{per_stage:.2} ms/stage over spawning `sh -c true` ({:.0} ms)",
            ms(spawn)
        ),
    );

    match dvc_executable(args.dvc.as_deref()) {
        Some(dvc) => {
            std::fs::write(ws.join("dvc.yaml"), stages_yaml(groups))?;
            let run_dvc = |argv: &[&str]| time(Command::new(&dvc).args(argv).current_dir(&ws));
            if !ws.join(".dvc").exists() {
                run_dvc(&["init", "--no-scm", "-q"])?;
            }
            let commit = run_dvc(&["commit", "-f", "-q"])?;
            writeln!(
                report,
                "DVC ({dvc}): lock written by `dvc commit -f` in {:.1} s",
                commit.as_secs_f64()
            )?;
            run_dvc(&["repro", "-q"])?;
            let dvc_noop = median(args.repeat.min(3), || run_dvc(&["repro", "-q"]))?;
            line(
                &mut report,
                "DVC no-op repro",
                dvc_noop,
                &format!("repro is {:.0}x faster", ratio(dvc_noop, noop)),
            );
            let dvc_status = median(args.repeat.min(3), || run_dvc(&["status", "-q"]))?;
            line(
                &mut report,
                "DVC status",
                dvc_status,
                &format!("repro is {:.0}x faster", ratio(dvc_status, status)),
            );
        }
        None => writeln!(
            report,
            "DVC skipped (--dvc none) or not found (bench/install-peers.sh installs it)"
        )?,
    }
    print!("{report}");
    Ok(())
}

fn line(report: &mut String, what: &str, d: Duration, note: &str) {
    let _ = writeln!(report, "  {what:<28} {:>9.3} s  {note}", d.as_secs_f64());
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ratio(slow: Duration, fast: Duration) -> f64 {
    slow.as_secs_f64() / fast.as_secs_f64().max(1e-9)
}

fn time(cmd: &mut Command) -> Result<Duration> {
    let t0 = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let took = t0.elapsed();
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

fn median(n: usize, mut f: impl FnMut() -> Result<Duration>) -> Result<Duration> {
    let mut v = (0..n.max(1)).map(|_| f()).collect::<Result<Vec<_>>>()?;
    v.sort();
    Ok(v[v.len() / 2])
}

/// The workspace: input files (kept between invocations when the sizes match) and repro.yaml.
fn prepare(dir: &Path, groups: usize, data_mb: usize) -> Result<PathBuf> {
    let file_bytes = data_mb * 1_000_000 / groups;
    let stamp = format!("{groups} {file_bytes}");
    if std::fs::read_to_string(dir.join("inputs.stamp"))
        .ok()
        .as_deref()
        != Some(stamp.as_str())
    {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("in"))?;
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut buf = vec![0u8; file_bytes];
        for g in 0..groups {
            for chunk in buf.chunks_mut(8) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                chunk.copy_from_slice(&rng.to_le_bytes()[..chunk.len()]);
            }
            std::fs::write(dir.join(format!("in/{g}.bin")), &buf)?;
        }
        std::fs::write(dir.join("inputs.stamp"), &stamp)?;
    }
    for stale in [".repro", "cache", "o", ".dvc", "dvc.lock", "dvc.yaml"] {
        let _ = crate::cache::store::remove_path(&dir.join(stale));
    }
    std::fs::create_dir_all(dir.join("o"))?;
    std::fs::write(dir.join("repro.yaml"), stages_yaml(groups))?;
    Ok(dir.canonicalize()?)
}

type StageDef = (String, String, Vec<String>, Vec<String>);

/// Per group: a chain of five over the group's input, four fanning out, one fan-in.
fn stages(groups: usize) -> Vec<StageDef> {
    let mut out = Vec::new();
    for g in 0..groups {
        let o = |s: &str| format!("o/g{g}_{s}.txt");
        out.push((
            format!("g{g}_c0"),
            format!("wc -c < in/{g}.bin > {}", o("c0")),
            vec![format!("in/{g}.bin")],
            vec![o("c0")],
        ));
        for k in 1..5 {
            let (prev, cur) = (o(&format!("c{}", k - 1)), o(&format!("c{k}")));
            out.push((
                format!("g{g}_c{k}"),
                format!("(cat {prev}; echo {k}) > {cur}"),
                vec![prev],
                vec![cur],
            ));
        }
        for f in 0..4 {
            let cur = o(&format!("f{f}"));
            out.push((
                format!("g{g}_f{f}"),
                format!("(cat {}; echo f{f}) > {cur}", o("c4")),
                vec![o("c4")],
                vec![cur],
            ));
        }
        let fans: Vec<String> = (0..4).map(|f| o(&format!("f{f}"))).collect();
        out.push((
            format!("g{g}_all"),
            format!("cat {} > {}", fans.join(" "), o("all")),
            fans,
            vec![o("all")],
        ));
    }
    out
}

/// The stages as a pipeline file; with only `cmd`, `deps` and `outs`, it is a dvc.yaml too.
fn stages_yaml(groups: usize) -> String {
    let mut yaml = String::from("stages:\n");
    for (name, cmd, deps, outs) in stages(groups) {
        let _ = writeln!(
            yaml,
            "  {name}:\n    cmd: {cmd}\n    deps: [{}]\n    outs: [{}]",
            deps.join(", "),
            outs.join(", ")
        );
    }
    yaml
}

fn dvc_executable(given: Option<&str>) -> Option<String> {
    match given {
        Some("none") => None,
        Some(p) => Some(p.to_string()),
        None => {
            let venv = Path::new("bench/.venv/bin/dvc");
            if venv.exists() {
                return venv.canonicalize().ok().map(|p| p.display().to_string());
            }
            let found = Command::new("dvc")
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            found.is_ok_and(|s| s.success()).then(|| "dvc".to_string())
        }
    }
}

/// GB/s of blake3 over every input file with an empty stat cache, in this process.
fn hash_throughput(ws: &Path) -> Result<f64> {
    let stats = crate::cache::StatCache::default();
    let hasher = crate::cache::Hasher {
        root: ws,
        stats: &stats,
    };
    let t0 = Instant::now();
    let snap = hasher.snapshot("in")?.context("no inputs")?;
    Ok(snap.size() as f64 / t0.elapsed().as_secs_f64() / 1e9)
}

/// (repro running `stages` forced trivial stages, spawning the same shells directly), both
/// with `jobs` at a time.
fn scheduler_overhead(
    exe: &Path,
    dir: &Path,
    stages: usize,
    jobs: usize,
) -> Result<(Duration, Duration)> {
    let ws = dir.join("trivial");
    let _ = std::fs::remove_dir_all(&ws);
    std::fs::create_dir_all(&ws)?;
    let mut yaml = String::from("stages:\n");
    for i in 0..stages {
        writeln!(yaml, "  t{i}: {{cmd: 'true'}}")?;
    }
    std::fs::write(ws.join("repro.yaml"), yaml)?;
    let jobs_s = jobs.to_string();
    time(
        Command::new(exe)
            .args(["run", "-j", &jobs_s])
            .current_dir(&ws),
    )?;
    let sched = time(
        Command::new(exe)
            .args(["run", "--force-all", "-j", &jobs_s])
            .current_dir(&ws),
    )?;
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for w in 0..jobs {
            s.spawn(move || {
                for _ in (w..stages).step_by(jobs) {
                    let _ = Command::new("sh").args(["-c", "true"]).status();
                }
            });
        }
    });
    Ok((sched, t0.elapsed()))
}
