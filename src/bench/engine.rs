//! `repro bench engine`: the engine against the hardware and against Snakemake and DVC.
//!
//! Generates a workspace of `stages` shell stages in groups of ten (a chain of five over one
//! input file, a fan-out of four, a fan-in) over one input file per group (at least 1 MB each
//! by default), then times, with the real binary: a full build, a no-op run and `status` with a
//! warm stat cache, the same with a cold one (hashing throughput), one edited input, the revert
//! (run cache), and the per-stage overhead of the scheduler on trivial stages against spawning
//! the same shells directly. Every timed command is a child process reaped with `wait4`, which
//! gives its peak resident memory. If Snakemake is installed, the same stages as generic rules
//! (outputs under `sm/`, the same inputs) get a full build, a no-op, a dry run and one edit; if
//! DVC is, its no-op `repro` and `status` on the same stages; each up to a size limit, and the
//! ratios are printed. `--stages` takes a list of sizes: each runs in a workspace of its own
//! (`DIR/N`) and a markdown growth table closes the report.

use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct EngineArgs {
    /// Numbers of stages, each a multiple of 10; a comma-separated list (1000,10000,100000)
    /// runs each size in turn, smallest first, and ends with a growth table.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    pub stages: Vec<usize>,
    /// Total size of the input files, in MB, split over one file per group of 10 stages
    /// (default: the larger of 1000 and the number of groups, so each file is at least 1 MB).
    #[arg(long)]
    pub data_mb: Option<usize>,
    /// Where to build the benchmark workspaces (one per size, in DIR/N).
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
    /// The Snakemake executable (default: bench/.venv/bin/snakemake, else `snakemake` on PATH;
    /// "none" skips).
    #[arg(long)]
    pub snakemake: Option<String>,
    /// The largest size at which the peer tools (Snakemake, DVC) are run.
    #[arg(long, default_value_t = 10_000)]
    pub peers_max_stages: usize,
    /// The largest size at which DVC is run (`dvc commit -f` grows slow).
    #[arg(long, default_value_t = 1000)]
    pub dvc_max_stages: usize,
}

/// A peer tool found on this machine.
struct Peer {
    exe: String,
    version: String,
}

/// One timed command: its wall time and peak resident memory (`ru_maxrss` from `wait4`: the
/// largest of the process and the descendants it reaped, which for the tools timed here are
/// small shells, so in practice the tool's own; at least the anonymous memory this process had
/// when it forked the child, a few MB, since the child starts as a copy of it).
#[derive(Clone, Copy, Debug, Default)]
struct Measured {
    took: Duration,
    peak_kib: u64,
}

impl Measured {
    fn peak_mb(&self) -> f64 {
        self.peak_kib as f64 * 1024.0 / 1e6
    }
}

/// One tool's figures at one size; a peer leaves out what it does not measure.
#[derive(Debug, Default)]
struct Row {
    full: Option<Measured>,
    noop: Option<Measured>,
    status: Option<Measured>,
    edit: Option<Measured>,
    /// The largest peak of every command timed at this size.
    peak_kib: u64,
}

impl Row {
    fn note_peak(&mut self, m: Measured) -> Measured {
        self.peak_kib = self.peak_kib.max(m.peak_kib);
        m
    }
}

/// Every tool's figures at one size.
struct Size {
    stages: usize,
    repro: Row,
    snakemake: Option<Row>,
    dvc: Option<Row>,
}

pub fn run(args: &EngineArgs) -> Result<()> {
    let mut sizes = args.stages.clone();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.is_empty() || sizes.iter().any(|&n| n == 0 || !n.is_multiple_of(10)) {
        bail!("--stages must be positive multiples of 10");
    }
    let jobs = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let exe = std::env::current_exe()?;
    let snakemake = peer("snakemake", args.snakemake.as_deref());
    let dvc = peer("dvc", args.dvc.as_deref());
    remove_single_workspace_layout(&args.dir);
    let mut done = Vec::new();
    for &stages in &sizes {
        let size = one_size(args, &exe, stages, jobs, snakemake.as_ref(), dvc.as_ref())
            .with_context(|| format!("at {stages} stages"))?;
        done.push(size);
    }
    print!(
        "{}",
        growth_table(&done, jobs, snakemake.as_ref(), dvc.as_ref())
    );
    Ok(())
}

/// Every measurement at one size; prints that size's report.
fn one_size(
    args: &EngineArgs,
    exe: &Path,
    stages: usize,
    jobs: usize,
    snakemake: Option<&Peer>,
    dvc: Option<&Peer>,
) -> Result<Size> {
    let groups = stages / 10;
    let data_mb = args.data_mb.unwrap_or(groups.max(1000));
    let ws = prepare(&args.dir.join(stages.to_string()), groups, data_mb)?;
    // Each run's figures, and what it says it did ("N ran, N restored, N up to date").
    let repro_said = |argv: &[&str]| -> Result<(Measured, String)> {
        let (m, err) = time_stderr(Command::new(exe).args(argv).current_dir(&ws))?;
        let said = err.lines().rev().find(|l| l.contains(" ran, "));
        Ok((m, said.unwrap_or("").trim().to_string()))
    };
    let repro = |argv: &[&str]| Ok(repro_said(argv)?.0);
    let jobs_s = jobs.to_string();
    let mut report = String::new();
    let bytes = (data_mb as f64) * 1e6;
    writeln!(
        report,
        "repro bench engine: {stages} stages in {groups} groups over {data_mb} MB of input \
         ({groups} files of {:.1} MB), --jobs {jobs}",
        bytes / groups as f64 / 1e6
    )?;
    let mut row = Row::default();

    let (full, said) = repro_said(&["run", "-j", &jobs_s])?;
    let full = row.note_peak(full);
    line(
        &mut report,
        "full build",
        full,
        &format!("{:.2} ms/stage; {said}", ms(full.took) / stages as f64),
    );
    // Files written less than 2 s before they were hashed are hashed again (their stat could
    // hide a later edit in the same clock tick); past that window one run learns them all.
    std::thread::sleep(Duration::from_millis(2100));
    repro(&["run", "-j", &jobs_s])?;
    let noop = row.note_peak(median(args.repeat, || repro(&["run", "-j", &jobs_s]))?);
    line(&mut report, "no-op run (warm)", noop, "");
    let status = row.note_peak(median(args.repeat, || repro(&["status"]))?);
    line(&mut report, "status (warm)", status, "");

    std::fs::remove_file(ws.join(".repro/statcache")).ok();
    let cold = row.note_peak(repro(&["status"])?);
    line(
        &mut report,
        "status (cold stat cache)",
        cold,
        &format!(
            "{:.2} GB/s hashed from the page cache",
            bytes / cold.took.as_secs_f64() / 1e9
        ),
    );
    let in_process = hash_throughput(&ws)?;
    writeln!(
        report,
        "  {:<28} {:>9.2} GB/s (blake3 over every input, in process)",
        "hash throughput", in_process
    )?;

    let edited = ws.join("in/0.bin");
    let restore = append_byte(&edited)?;
    let (edit, said) = repro_said(&["run", "-j", &jobs_s])?;
    let edit = row.note_peak(edit);
    line(&mut report, "one input edited", edit, &said);
    restore()?;
    let (revert, said) = repro_said(&["run", "-j", &jobs_s])?;
    let revert = row.note_peak(revert);
    line(&mut report, "edit reverted", revert, &said);

    let (sched, spawn) = scheduler_overhead(exe, &ws, stages, jobs)?;
    let per_stage = (ms(sched.took) - ms(spawn)) / stages as f64;
    line(
        &mut report,
        "trivial stages (forced)",
        sched,
        &format!(
            "{per_stage:.2} ms/stage over spawning `sh -c true` ({:.0} ms)",
            ms(spawn)
        ),
    );
    row.full = Some(full);
    row.noop = Some(noop);
    row.status = Some(status);
    row.edit = Some(edit);

    let snakemake = match snakemake {
        None => {
            writeln!(
                report,
                "Snakemake skipped (--snakemake none) or not found (pip install snakemake into \
                 bench/.venv)"
            )?;
            None
        }
        Some(_) if stages > args.peers_max_stages => {
            writeln!(
                report,
                "Snakemake skipped at {stages} stages: above --peers-max-stages {}",
                args.peers_max_stages
            )?;
            None
        }
        Some(sm) => Some(snakemake_side(
            sm,
            &ws,
            stages,
            jobs,
            args.repeat,
            &row,
            &mut report,
        )?),
    };
    let dvc_max = args.dvc_max_stages.min(args.peers_max_stages);
    let dvc = match dvc {
        None => {
            writeln!(
                report,
                "DVC skipped (--dvc none) or not found (bench/install-peers.sh installs it)"
            )?;
            None
        }
        Some(_) if stages > dvc_max => {
            writeln!(
                report,
                "DVC skipped at {stages} stages: above --dvc-max-stages {} / --peers-max-stages \
                 {} (`dvc commit -f`, which writes its lock, grows slow)",
                args.dvc_max_stages, args.peers_max_stages
            )?;
            None
        }
        Some(dvc) => Some(dvc_side(dvc, &ws, groups, args.repeat, &row, &mut report)?),
    };
    print!("{report}");
    std::io::stdout().flush()?;
    Ok(Size {
        stages,
        repro: row,
        snakemake,
        dvc,
    })
}

/// Snakemake on the same stages: full build, no-op, dry run and one edited input.
fn snakemake_side(
    sm: &Peer,
    ws: &Path,
    stages: usize,
    jobs: usize,
    repeat: usize,
    repro: &Row,
    report: &mut String,
) -> Result<Row> {
    let jobs_s = jobs.to_string();
    let build = ["--cores", &jobs_s, "--quiet"];
    let dry = ["--cores", &jobs_s, "--dry-run", "--quiet"];
    let run = |argv: &[&str]| time_stderr(Command::new(&sm.exe).args(argv).current_dir(ws));
    writeln!(
        report,
        "Snakemake {} ({}): the same stages as generic rules, outputs under sm/, --cores {jobs}",
        sm.version, sm.exe
    )?;
    let mut row = Row::default();
    let (full, err) = run(&build)?;
    let full = row.note_peak(full);
    let ran = jobs_executed(&err);
    line(
        report,
        "Snakemake full build",
        full,
        &format!(
            "{:.2} ms/stage, {}; repro is {}",
            ms(full.took) / stages as f64,
            jobs_note(ran),
            faster(full, repro.full)
        ),
    );
    let mut noop_ran = Some(0);
    let noop = row.note_peak(median(repeat.min(3), || {
        let (m, err) = run(&build)?;
        noop_ran = noop_ran.max(jobs_executed(&err));
        Ok(m)
    })?);
    line(
        report,
        "Snakemake no-op",
        noop,
        &format!(
            "{}repro is {}",
            match noop_ran {
                Some(0) | None => String::new(),
                Some(n) => format!("re-ran {n} jobs! "),
            },
            faster(noop, repro.noop)
        ),
    );
    let status = row.note_peak(median(repeat.min(3), || Ok(run(&dry)?.0))?);
    line(
        report,
        "Snakemake dry run (-n)",
        status,
        &format!("repro status is {}", faster(status, repro.status)),
    );
    let restore = append_byte(&ws.join("in/0.bin"))?;
    let (edit, err) = run(&build)?;
    restore()?;
    let edit = row.note_peak(edit);
    line(
        report,
        "Snakemake one input edited",
        edit,
        &format!(
            "{}; repro is {}",
            jobs_note(jobs_executed(&err)),
            faster(edit, repro.edit)
        ),
    );
    row.full = Some(full);
    row.noop = Some(noop);
    row.status = Some(status);
    row.edit = Some(edit);
    Ok(row)
}

/// DVC on the same stages: its lock written by `dvc commit -f`, then no-op and status.
fn dvc_side(
    dvc: &Peer,
    ws: &Path,
    groups: usize,
    repeat: usize,
    repro: &Row,
    report: &mut String,
) -> Result<Row> {
    std::fs::write(ws.join("dvc.yaml"), stages_yaml(groups))?;
    let run_dvc = |argv: &[&str]| time(Command::new(&dvc.exe).args(argv).current_dir(ws));
    if !ws.join(".dvc").exists() {
        run_dvc(&["init", "--no-scm", "-q"])?;
    }
    let mut row = Row::default();
    let commit = row.note_peak(run_dvc(&["commit", "-f", "-q"])?);
    writeln!(
        report,
        "DVC {} ({}): lock written by `dvc commit -f` in {:.1} s (peak {:.0} MB)",
        dvc.version,
        dvc.exe,
        commit.took.as_secs_f64(),
        commit.peak_mb()
    )?;
    row.note_peak(run_dvc(&["repro", "-q"])?);
    let noop = row.note_peak(median(repeat.min(3), || run_dvc(&["repro", "-q"]))?);
    line(
        report,
        "DVC no-op repro",
        noop,
        &format!("repro is {}", faster(noop, repro.noop)),
    );
    let status = row.note_peak(median(repeat.min(3), || run_dvc(&["status", "-q"]))?);
    line(
        report,
        "DVC status",
        status,
        &format!("repro is {}", faster(status, repro.status)),
    );
    row.noop = Some(noop);
    row.status = Some(status);
    Ok(row)
}

/// The markdown growth table: repro at every size, per-stage cost against the smallest size;
/// then each peer that ran, against repro at the same size.
fn growth_table(
    done: &[Size],
    jobs: usize,
    snakemake: Option<&Peer>,
    dvc: Option<&Peer>,
) -> String {
    let mut t = String::new();
    let Some(first) = done.first() else {
        return t;
    };
    let n0 = first.stages;
    let _ = writeln!(
        t,
        "\nGrowth, repro, --jobs {jobs} (×: cost per stage against {n0} stages; 1.00× is \
         linear growth in the stages, below 1.00× less than linear):\n"
    );
    let _ = writeln!(
        t,
        "| stages | full build | per stage | no-op | status | one edit | peak MB |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let base = &first.repro;
    for s in done {
        let r = &s.repro;
        let g = |m: Option<Measured>, m0: Option<Measured>| match (m, m0) {
            (Some(m), Some(m0)) => format!(
                "{} ({:.2}×)",
                secs(m.took),
                growth(m.took.as_secs_f64(), s.stages, m0.took.as_secs_f64(), n0)
            ),
            _ => "-".into(),
        };
        let per_stage = match (r.full, base.full) {
            (Some(m), Some(m0)) => format!(
                "{} ({:.2}×)",
                per_stage(m.took, s.stages),
                growth(m.took.as_secs_f64(), s.stages, m0.took.as_secs_f64(), n0)
            ),
            _ => "-".into(),
        };
        let _ = writeln!(
            t,
            "| {} | {} | {per_stage} | {} | {} | {} | {:.0} ({:.2}×) |",
            thousands(s.stages),
            r.full.map_or("-".into(), |m| secs(m.took)),
            g(r.noop, base.noop),
            g(r.status, base.status),
            g(r.edit, base.edit),
            mb(r.peak_kib),
            growth(r.peak_kib as f64, s.stages, base.peak_kib as f64, n0),
        );
    }
    let ran = |pick: fn(&Size) -> Option<&Row>| -> Vec<(&Size, &Row)> {
        done.iter().filter_map(|s| Some((s, pick(s)?))).collect()
    };
    let peers = [
        ("Snakemake", snakemake, ran(|s| s.snakemake.as_ref())),
        ("DVC", dvc, ran(|s| s.dvc.as_ref())),
    ];
    for (name, peer, rows) in peers {
        let Some(peer) = peer.filter(|_| !rows.is_empty()) else {
            continue;
        };
        let _ = writeln!(
            t,
            "\n{name} {}, against repro at the same size (×: its time or memory over repro's):\n",
            peer.version
        );
        let _ = writeln!(
            t,
            "| stages | full build | no-op | status | one edit | peak MB |\n\
             | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for (s, p) in rows {
            let r = &s.repro;
            let vs = |m: Option<Measured>, m0: Option<Measured>| match (m, m0) {
                (Some(m), Some(m0)) => format!("{} ({})", secs(m.took), times(ratio(m, m0))),
                (Some(m), None) => secs(m.took),
                _ => "-".into(),
            };
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {:.0} ({:.1}×) |",
                thousands(s.stages),
                vs(p.full, r.full),
                vs(p.noop, r.noop),
                vs(p.status, r.status),
                vs(p.edit, r.edit),
                mb(p.peak_kib),
                p.peak_kib as f64 / (r.peak_kib as f64).max(1.0),
            );
        }
    }
    t
}

fn line(report: &mut String, what: &str, m: Measured, note: &str) {
    let _ = writeln!(
        report,
        "  {what:<28} {:>9.3} s  peak {:>5.0} MB  {note}",
        m.took.as_secs_f64(),
        m.peak_mb()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

fn ratio(slow: Measured, fast: Measured) -> f64 {
    slow.took.as_secs_f64() / fast.took.as_secs_f64().max(1e-9)
}

/// "12x faster" (or "0.5x as fast", where the peer is quicker).
fn faster(peer: Measured, repro: Option<Measured>) -> String {
    match repro {
        Some(r) if ratio(peer, r) >= 1.0 => format!("{:.1}x faster", ratio(peer, r)),
        Some(r) => format!("{:.2}x as fast", ratio(peer, r)),
        None => "-".into(),
    }
}

/// A cost per stage at `n` stages against the same at `n0` stages.
fn growth(v: f64, n: usize, v0: f64, n0: usize) -> f64 {
    (v / n as f64) / (v0 / n0 as f64).max(1e-12)
}

/// A ratio: "3.2×", "190×".
fn times(r: f64) -> String {
    if r < 10.0 {
        format!("{r:.1}×")
    } else {
        format!("{r:.0}×")
    }
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else if s < 100.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.0} s")
    }
}

fn per_stage(d: Duration, stages: usize) -> String {
    let m = ms(d) / stages as f64;
    if m < 0.1 {
        format!("{m:.3} ms")
    } else {
        format!("{m:.2} ms")
    }
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn time(cmd: &mut Command) -> Result<Measured> {
    Ok(time_stderr(cmd)?.0)
}

/// Runs `cmd` to the end (stdout to null, stderr read whole before the child is reaped, so a
/// full pipe cannot block it) and reaps it with `wait4` for its peak memory.
fn time_stderr(cmd: &mut Command) -> Result<(Measured, String)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: the closure does nothing. Having one makes std fork and exec instead of
    // posix_spawn, a vfork: a vforked child execs from this process's memory and the kernel
    // carries that memory's peak RSS (this process's largest ever) into the child's ru_maxrss.
    // A forked child's starts at what it shares with this process now.
    unsafe {
        cmd.pre_exec(|| Ok(()));
    }
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    let mut err = Vec::new();
    let read = child.stderr.take().map(|mut e| e.read_to_end(&mut err));
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data, all zeroes is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 only writes the status and the struct it is given; the child is ours
        // and not yet reaped (std's Child does not wait on its own, nor on drop).
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).with_context(|| format!("cannot wait for {cmd:?}"));
        }
    }
    let took = t0.elapsed();
    drop(child);
    if let Some(Err(e)) = read {
        return Err(e).with_context(|| format!("cannot read the stderr of {cmd:?}"));
    }
    let stderr = String::from_utf8_lossy(&err).into_owned();
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        let how = if libc::WIFSIGNALED(status) {
            format!("killed by signal {}", libc::WTERMSIG(status))
        } else {
            format!("exit status {}", libc::WEXITSTATUS(status))
        };
        bail!("{cmd:?} failed ({how}): {stderr}");
    }
    let peak_kib = u64::try_from(ru.ru_maxrss).unwrap_or(0);
    Ok((Measured { took, peak_kib }, stderr))
}

/// The median time of `n` runs, and the largest peak memory of them.
fn median(n: usize, mut f: impl FnMut() -> Result<Measured>) -> Result<Measured> {
    let mut v = (0..n.max(1)).map(|_| f()).collect::<Result<Vec<_>>>()?;
    let peak_kib = v.iter().map(|m| m.peak_kib).max().unwrap_or(0);
    v.sort_by_key(|m| m.took);
    Ok(Measured {
        took: v[v.len() / 2].took,
        peak_kib,
    })
}

/// Appends a byte to `path`; the closure returned truncates it back (this process holds no
/// copy of the file, which would count in its children's peak memory).
fn append_byte(path: &Path) -> Result<impl FnOnce() -> Result<()>> {
    let path = path.to_path_buf();
    let len = std::fs::metadata(&path)?.len();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)?
        .write_all(b"x")?;
    Ok(move || {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)?
            .set_len(len)?;
        Ok(())
    })
}

/// Jobs Snakemake says it executed ("Execute N jobs..." lines), less its `all` target; 0 where
/// it says there was nothing to do, None where it says neither.
fn jobs_executed(stderr: &str) -> Option<usize> {
    let mut total = None;
    for l in stderr.lines().map(str::trim) {
        if l.starts_with("Nothing to be done") {
            total = Some(total.unwrap_or(0));
        }
        let n = l
            .strip_prefix("Execute ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(n) = n {
            total = Some(total.unwrap_or(0) + n);
        }
    }
    total.map(|n: usize| n.saturating_sub(1))
}

fn jobs_note(ran: Option<usize>) -> String {
    match ran {
        Some(n) => format!("ran {n} jobs"),
        None => "job count not in its output".into(),
    }
}

/// Earlier versions built one workspace in DIR itself; its inputs would linger beside DIR/N.
fn remove_single_workspace_layout(dir: &Path) {
    if dir.join("inputs.stamp").exists() {
        for stale in [
            "inputs.stamp",
            "in",
            ".repro",
            "cache",
            "o",
            "trivial",
            ".dvc",
            "dvc.lock",
            "dvc.yaml",
            "repro.yaml",
        ] {
            let _ = crate::cache::store::remove_path(&dir.join(stale));
        }
    }
}

/// The workspace: input files (kept between invocations when the sizes match), repro.yaml and
/// a Snakefile; every tool's outputs and state from an earlier invocation are removed.
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
    for stale in [
        ".repro",
        "cache",
        "o",
        ".dvc",
        "dvc.lock",
        "dvc.yaml",
        ".snakemake",
        "sm",
        "Snakefile",
    ] {
        let _ = crate::cache::store::remove_path(&dir.join(stale));
    }
    std::fs::create_dir_all(dir.join("o"))?;
    std::fs::write(dir.join("repro.yaml"), stages_yaml(groups))?;
    std::fs::write(dir.join("Snakefile"), snakefile(groups))?;
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

/// The same stages for Snakemake, as a user would write them: one generic rule per kind of
/// stage, with wildcards, the same shell commands over the same inputs, outputs under sm/.
fn snakefile(groups: usize) -> String {
    const RULES: &str = r#"# Generated by `repro bench engine`: the stages of repro.yaml as generic rules.
GROUPS = @GROUPS@

wildcard_constraints:
    g=r"\d+",


rule all:
    input:
        expand("sm/g{g}_all.txt", g=range(GROUPS)),


rule head:
    input:
        "in/{g}.bin",
    output:
        "sm/g{g}_c0.txt",
    shell:
        "wc -c < {input} > {output}"


rule chain:
    input:
        lambda w: f"sm/g{w.g}_c{int(w.k) - 1}.txt",
    output:
        "sm/g{g}_c{k}.txt",
    wildcard_constraints:
        k="[1-4]",
    shell:
        "(cat {input}; echo {wildcards.k}) > {output}"


rule fan_out:
    input:
        "sm/g{g}_c4.txt",
    output:
        "sm/g{g}_f{f}.txt",
    shell:
        "(cat {input}; echo f{wildcards.f}) > {output}"


rule fan_in:
    input:
        expand("sm/g{{g}}_f{f}.txt", f=range(4)),
    output:
        "sm/g{g}_all.txt",
    shell:
        "cat {input} > {output}"
"#;
    RULES.replace("@GROUPS@", &groups.to_string())
}

/// A peer tool: `given`, or bench/.venv/bin/NAME, or NAME on PATH; "none" skips it.
fn peer(name: &str, given: Option<&str>) -> Option<Peer> {
    let exe = match given {
        Some("none") => return None,
        Some(p) if p.contains('/') => std::path::absolute(p).ok()?.display().to_string(),
        Some(p) => p.to_string(),
        None => {
            let venv = Path::new("bench/.venv/bin").join(name);
            if venv.exists() {
                std::path::absolute(venv).ok()?.display().to_string()
            } else {
                name.to_string()
            }
        }
    };
    let out = Command::new(&exe)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success());
    if out.is_none() && given.is_none() {
        return None;
    }
    let version = out
        .and_then(|o| {
            let s = String::from_utf8_lossy(&o.stdout);
            s.lines().next().map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "(version unknown)".into());
    Some(Peer { exe, version })
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
) -> Result<(Measured, Duration)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snakemake_job_counts() {
        let built = "Building DAG of jobs...\nSelect jobs to execute...\nExecute 2 jobs...\n\
                     Select jobs to execute...\nExecute 9 jobs...\n";
        assert_eq!(jobs_executed(built), Some(10));
        assert_eq!(
            jobs_executed("Building DAG of jobs...\nNothing to be done (all requested ...)."),
            Some(0)
        );
        assert_eq!(jobs_executed("Building DAG of jobs...\n"), None);
    }

    #[test]
    fn snakefile_mirrors_the_stages() {
        let sm = snakefile(3);
        assert!(sm.contains("GROUPS = 3\n"));
        for (_, cmd, _, _) in stages(1) {
            let shape = cmd.split(' ').next().unwrap();
            assert!(sm.contains(&format!("\"{shape}")), "{shape}");
        }
        assert_eq!(stages(3).len(), 30);
    }

    #[test]
    fn wait4_reports_peak_memory_and_failures() {
        let m = time(Command::new("sh").args(["-c", "true"])).unwrap();
        assert!(m.peak_kib > 0);
        let e = time(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("exit status 3") && msg.contains("oops"),
            "{msg}"
        );
    }

    #[test]
    fn growth_and_thousands() {
        assert_eq!(thousands(100), "100");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(100000), "100,000");
        assert!((growth(20.0, 2000, 1.0, 100) - 1.0).abs() < 1e-12);
    }
}
