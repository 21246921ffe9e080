//! The Slurm runner: the job script a stage runs as, the `sbatch` arguments its resources map
//! to, how a job's end is judged from the batched `squeue` listing and the exit-code file the
//! script writes, the jobs a killed run left behind, and the runner that follows a run's jobs.
//!
//! A job is judged by its state AND by that file, never by Slurm's exit code alone: a job that
//! hit its time limit shows `ExitCode=0:0` with state TIMEOUT (../shared/SLURM.md).

use super::runner::{Exit, Job, Runner};
pub use crate::pipeline::runner::SlurmSettings;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// `text` as one shell word: single-quoted, with each `'` written `'\''`.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The batch script of a stage: it runs the stage's command in its folder with its
/// environment, then writes the command's exit code to `exit_file` through a temp name and a
/// rename, so that the file is whole or absent, and exits with that code. Fails for a variable
/// whose name the shell cannot export.
pub fn job_script(job: &Job, exit_file: &Path) -> Result<String, String> {
    let exit = exit_file.display().to_string();
    let mut s = String::from("#!/bin/sh\n");
    s += &format!("# repro stage {}\n", job.stage.escape_debug());
    s += &format!("cd {} || exit 111\n", quote(&job.cwd.display().to_string()));
    for (k, v) in &job.env {
        let exportable = k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !exportable {
            return Err(format!(
                "`{}` is not a name a Slurm job script can export",
                k.escape_debug()
            ));
        }
        s += &format!("export {k}={}\n", quote(v));
    }
    let argv: Vec<String> = job.argv.iter().map(|a| quote(a)).collect();
    s += &argv.join(" ");
    s += "\ncode=$?\n";
    s += &format!(
        "printf '%s\\n' \"$code\" > {tmp} && mv -f {tmp} {exit}\nexit \"$code\"\n",
        tmp = quote(&format!("{exit}.tmp")),
        exit = quote(&exit)
    );
    Ok(s)
}

/// `sbatch` arguments for a stage: one job name for every job of the run (so that one
/// `squeue --name` lists them all), its log, its folder, the cluster settings, and its
/// resources (`gpu` → `--gres=gpu:N`, `cores` → `--cpus-per-task`, `memory` in MiB → `--mem`,
/// `time` in minutes → `--time`, in place of the run's time limit).
pub fn sbatch_args(
    run_name: &str,
    job: &Job,
    resources: &BTreeMap<String, u64>,
    opts: &SlurmSettings,
) -> Vec<String> {
    let mut args = vec![
        "--parsable".to_string(),
        format!("--job-name={run_name}"),
        format!("--output={}", job.log.display()),
        format!("--chdir={}", job.cwd.display()),
    ];
    if let Some(p) = &opts.partition {
        args.push(format!("--partition={p}"));
    }
    if let Some(a) = &opts.account {
        args.push(format!("--account={a}"));
    }
    if let Some(t) = resources.get("time").or(opts.time.as_ref()) {
        args.push(format!("--time={t}"));
    }
    for (r, &n) in resources {
        match r.as_str() {
            "gpu" if n > 0 => args.push(format!("--gres=gpu:{n}")),
            "cores" => args.push(format!("--cpus-per-task={n}")),
            "memory" => args.push(format!("--mem={n}M")),
            _ => {}
        }
    }
    args.extend(opts.extra.iter().cloned());
    args
}

/// The job id `sbatch --parsable` printed (`ID` or `ID;CLUSTER`).
pub fn parse_job_id(stdout: &str) -> Option<u64> {
    stdout.trim().split(';').next()?.trim().parse().ok()
}

/// Every job of a run as one `squeue --states=all --name RUN --noheader --format='%i|%T|%r'`
/// lists it: id → (state, reason).
pub fn parse_squeue(stdout: &str) -> HashMap<u64, (String, String)> {
    rows(stdout)
        .map(|(id, state, reason)| (id, (state.to_string(), reason.to_string())))
        .collect()
}

/// The rows of a `squeue --format=%i|A|B` listing: (job id, A, B); lines that are not such a
/// row are skipped.
fn rows(listing: &str) -> impl Iterator<Item = (u64, &str, &str)> {
    listing.lines().filter_map(|line| {
        let mut f = line.trim().splitn(3, '|');
        let id = f.next()?.trim().parse().ok()?;
        let a = f.next()?.trim();
        Some((id, a, f.next().unwrap_or("").trim()))
    })
}

/// Where a job stands, from its Slurm state and the exit-code file.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Queued or running: ask again later.
    Active,
    /// Done, with the command's exit code from the file.
    Exited(i32),
    /// Ended without a usable exit code: the state (TIMEOUT, OUT_OF_MEMORY, …) and why.
    Failed(String),
}

/// States in which a job may still run (or run again).
const ACTIVE: [&str; 9] = [
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
];

/// The job-name prefix of every run in the workspace at `root`: `repro-` and 8 hex digits of
/// its path, so that a later run finds the jobs a killed run left in the queue.
pub fn run_prefix(root: &Path) -> String {
    let hash = blake3::hash(root.as_os_str().as_encoded_bytes()).to_hex();
    format!("repro-{}-", &hash[..8])
}

/// The job name of a run by this process in the workspace at `root`.
pub fn run_name(root: &Path) -> String {
    format!("{}{}", run_prefix(root), std::process::id())
}

/// Jobs of earlier runs in the workspace at `root` that are still queued or running, as
/// `squeue --noheader --format=%i|%j|%T` lists them: (id, job name, state).
pub fn orphans(root: &Path, listing: &str) -> Vec<(u64, String, String)> {
    let prefix = run_prefix(root);
    let own = run_name(root);
    rows(listing)
        .filter(|&(_, name, state)| {
            ACTIVE.contains(&state) && name.starts_with(&prefix) && name != own
        })
        .map(|(id, name, state)| (id, name.to_string(), state.to_string()))
        .collect()
}

/// The user's jobs as `orphans` reads them.
pub fn list_queue() -> io::Result<String> {
    squeue(&[
        "--me".into(),
        "--noheader".into(),
        "--format=%i|%j|%T".into(),
    ])
}

/// The jobs `which` selects (`--me`, `--name=RUN`), ended ones too: id → (state, reason).
fn list_states(which: &str) -> io::Result<HashMap<u64, (String, String)>> {
    let args = [which, "--states=all", "--noheader", "--format=%i|%T|%r"];
    Ok(parse_squeue(&squeue(&args.map(String::from))?))
}

/// A submitted job, as the file `.repro/slurm/jobs/STAGE.job` keeps it until the job's end is
/// judged: what `repro status` shows and what `--adopt` takes over from a killed run. Job
/// files have a folder of their own, so that `repro status` reads only them, not the scripts
/// and exit-code files of every stage ever submitted.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobFile {
    pub id: u64,
    pub stage: String,
    /// The stage key the job computes the outs of.
    pub key: String,
}

impl JobFile {
    fn folder(dir: &Path) -> PathBuf {
        dir.join("jobs")
    }

    fn path(dir: &Path, stage: &str) -> PathBuf {
        Self::folder(dir).join(format!("{}.job", crate::workspace::file_safe(stage)))
    }

    fn exit_path(dir: &Path, stage: &str) -> PathBuf {
        dir.join(format!("{}.exit", crate::workspace::file_safe(stage)))
    }

    /// Every job file of the runner folder `dir` (none if there are none); unreadable ones are
    /// skipped.
    pub fn all(dir: &Path) -> Vec<JobFile> {
        let Ok(entries) = std::fs::read_dir(Self::folder(dir)) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect()
    }
}

/// For each stage with a job file in `dir`, a line saying where its job stands
/// (`Slurm job 42: RUNNING`), from one listing of the queue; empty if there are none.
pub fn job_lines(dir: &Path) -> HashMap<String, String> {
    let files = JobFile::all(dir);
    if files.is_empty() {
        return HashMap::new();
    }
    let listed = list_states("--me");
    files
        .into_iter()
        .map(|f| {
            let state = match &listed {
                Err(e) => format!("state unknown ({e})"),
                Ok(l) => match l.get(&f.id) {
                    None => "no longer in the queue".to_string(),
                    Some((state, reason)) => state_line(state, reason),
                },
            };
            (f.stage, format!("Slurm job {}: {state}", f.id))
        })
        .collect()
}

/// `STATE` or `STATE (reason)`.
fn state_line(state: &str, reason: &str) -> String {
    match reason {
        "" | "None" => state.to_string(),
        r => format!("{state} ({r})"),
    }
}

/// What became of the jobs a killed earlier run left in the queue, once none of them runs.
#[derive(Debug, Default)]
pub struct Settled {
    /// Stages whose job succeeded and whose outs this run stores as they are: stage → key.
    pub adopted: HashMap<String, String>,
    /// What happened, one line per job that had a job file.
    pub notes: Vec<String>,
}

/// Waits until none of the jobs `ids` is queued or running (listing the queue every `poll`),
/// then judges those of them that have a job file in `dir`: a job that succeeded is adopted,
/// every other job file is removed (the stage simply runs again).
pub fn settle(ids: &[u64], dir: &Path, poll: Duration) -> io::Result<Settled> {
    let mut last: HashMap<u64, (String, String)> = HashMap::new();
    while !ids.is_empty() {
        let listed = list_states("--me")?;
        let active = ids.iter().filter(|id| match listed.get(id) {
            Some((state, _)) => ACTIVE.contains(&state.as_str()),
            None => false,
        });
        let still = active.count();
        for id in ids {
            match listed.get(id) {
                Some(l) => last.insert(*id, l.clone()),
                None => last.remove(id),
            };
        }
        if still == 0 {
            break;
        }
        std::thread::sleep(poll);
    }
    let mut settled = Settled::default();
    for f in JobFile::all(dir) {
        let _ = std::fs::remove_file(JobFile::path(dir, &f.stage));
        if !ids.contains(&f.id) {
            continue;
        }
        let code = std::fs::read_to_string(JobFile::exit_path(dir, &f.stage)).ok();
        let listed = last.get(&f.id).map(|(s, r)| (s.as_str(), r.as_str()));
        let stage = f.stage.escape_debug().to_string();
        match verdict(listed, code.as_deref()) {
            Verdict::Exited(0) => {
                settled.notes.push(format!(
                    "stage `{stage}`: keeping what Slurm job {} of the earlier run wrote",
                    f.id
                ));
                settled.adopted.insert(f.stage, f.key);
            }
            Verdict::Exited(c) => settled.notes.push(format!(
                "stage `{stage}`: Slurm job {} of the earlier run exited {c}; it runs again",
                f.id
            )),
            Verdict::Failed(why) => settled.notes.push(format!(
                "stage `{stage}`: Slurm job {} of the earlier run: {why}; it runs again",
                f.id
            )),
            Verdict::Active => settled.notes.push(format!(
                "stage `{stage}`: Slurm job {} of the earlier run is queued again; it runs again",
                f.id
            )),
        }
    }
    Ok(settled)
}

/// What `squeue ARGS` prints, or why it could not.
fn squeue(args: &[String]) -> io::Result<String> {
    let out = Command::new("squeue")
        .args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run squeue: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "squeue failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Cancels the jobs `ids`.
pub fn scancel(ids: &[u64]) -> io::Result<()> {
    let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
    let status = Command::new("scancel").args(&ids).status()?;
    if !status.success() {
        return Err(io::Error::other(format!(
            "scancel {} failed",
            ids.join(" ")
        )));
    }
    Ok(())
}

/// Judges a job: `listed` is its `(state, reason)` in the last listing, or `None` if it has
/// left the listing; `exit_code` is the content of its exit-code file, if it is there.
pub fn verdict(listed: Option<(&str, &str)>, exit_code: Option<&str>) -> Verdict {
    let code = exit_code.and_then(|c| c.trim().parse::<i32>().ok());
    match listed {
        Some((state, _)) if ACTIVE.contains(&state) => Verdict::Active,
        // The only state in which the file is the whole truth.
        Some(("COMPLETED", _)) | None if code.is_some() => Verdict::Exited(code.unwrap_or(0)),
        Some(("COMPLETED", _)) => Verdict::Failed(
            "COMPLETED, but its exit-code file is missing: the job script did not finish".into(),
        ),
        Some((state, reason)) => {
            let what = match state {
                "TIMEOUT" => "TIMEOUT: it ran past its time limit",
                "OUT_OF_MEMORY" => "OUT_OF_MEMORY: it used more memory than it asked for",
                "NODE_FAIL" => "NODE_FAIL: its node failed",
                "PREEMPTED" => "PREEMPTED: a job of higher priority took its place",
                "CANCELLED" => "CANCELLED",
                "BOOT_FAIL" => "BOOT_FAIL: its node did not boot",
                "DEADLINE" => "DEADLINE: it could not finish by its deadline",
                "FAILED" => match code {
                    Some(c) => return Verdict::Exited(c),
                    None => "FAILED before its command ran",
                },
                _ => state,
            };
            Verdict::Failed(state_line(what, reason))
        }
        None => Verdict::Failed(
            "left the queue without an exit-code file (cancelled outside repro, or its node lost)"
                .into(),
        ),
    }
}

/// Runs each stage as a Slurm batch job, on a filesystem the cluster's nodes share with this
/// machine. The DAG stays in repro: a stage is submitted when its upstreams are done. Every job
/// of a run carries one job name, and ONE `squeue` per interval lists them all for every
/// waiting stage (the per-job polling that cluster admins ban never happens).
pub struct SlurmRunner {
    shared: Arc<Shared>,
    opts: SlurmSettings,
    /// Job scripts, job files and exit-code files (`.repro/slurm/`).
    dir: PathBuf,
    /// Stages whose outs a killed run's job wrote, to be stored as they are: stage → key.
    adopted: HashMap<String, String>,
}

struct Shared {
    run_name: String,
    jobs: Mutex<HashMap<u64, Watched>>,
    /// Signalled after every listing, and when a job is submitted (to list soon).
    changed: Condvar,
    interrupted: AtomicBool,
    /// Another stage failed and the run stops: its jobs were cancelled.
    cancelled: AtomicBool,
    stop: AtomicBool,
}

/// A submitted job as the listings have shown it.
struct Watched {
    listed: Option<(String, String)>,
    /// Whether a listing has shown it yet, and when it was submitted (a job may appear in
    /// `squeue` a moment after `sbatch` returns).
    seen: bool,
    submitted: Instant,
    /// The file its script writes its exit code to, and whether it was there at last look.
    exit_file: PathBuf,
    exited: bool,
}

/// How long a job may be absent from the listings before it was ever listed, and still be on
/// its way.
const GRACE: Duration = Duration::from_secs(10);
/// Time between listings: short after a job was submitted, its state changed or its script
/// ended; then doubled while nothing changes, up to the longest.
const LIST_SOONEST: Duration = Duration::from_millis(250);
const LIST_LATEST: Duration = Duration::from_secs(5);
/// Time between looks at the exit-code files, so that a job's end is seen at once: a stat
/// each, no load on slurmctld, but on the shared filesystem's metadata server, so that with
/// many jobs the looks are spread out to about 50 stats a second.
const LOOK: Duration = Duration::from_millis(100);
const LOOK_PER_JOB: Duration = Duration::from_millis(20);

impl SlurmRunner {
    /// A runner for one run, named `run_name` in the queue; scripts go to `dir`. `adopted`:
    /// stages whose outs jobs of a killed run wrote (see `settle`).
    pub fn new(
        run_name: String,
        opts: SlurmSettings,
        dir: PathBuf,
        adopted: HashMap<String, String>,
    ) -> io::Result<SlurmRunner> {
        std::fs::create_dir_all(JobFile::folder(&dir))?;
        let shared = Arc::new(Shared {
            run_name,
            jobs: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            interrupted: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let poller = Arc::clone(&shared);
        std::thread::spawn(move || poller.poll_until_stopped());
        Ok(SlurmRunner {
            shared,
            opts,
            dir,
            adopted,
        })
    }

    /// Submits the job and writes its job file; returns its id and exit-code file.
    fn submit(&self, job: &Job) -> io::Result<(u64, PathBuf)> {
        let name = crate::workspace::file_safe(&job.stage);
        let script = self.dir.join(format!("{name}.sh"));
        let exit_file = JobFile::exit_path(&self.dir, &job.stage);
        let _ = std::fs::remove_file(&exit_file);
        let text = job_script(job, &exit_file).map_err(io::Error::other)?;
        crate::atomic::write(&script, text.as_bytes(), false)?;
        let out = Command::new("sbatch")
            .args(sbatch_args(
                &self.shared.run_name,
                job,
                &job.resources,
                &self.opts,
            ))
            .arg(&script)
            .output()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot run sbatch: {e}")))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        match parse_job_id(&stdout) {
            Some(id) if out.status.success() => {
                let file = JobFile {
                    id,
                    stage: job.stage.clone(),
                    key: job.key.clone(),
                };
                let text = serde_json::to_vec(&file).map_err(io::Error::other)?;
                crate::atomic::write(&JobFile::path(&self.dir, &job.stage), &text, false)?;
                Ok((id, exit_file))
            }
            _ => Err(io::Error::other(format!(
                "sbatch failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
        }
    }
}

impl Shared {
    /// How the run's jobs end if it is stopping: interrupted, or cancelled after a failure.
    fn stopped(&self) -> Option<Exit> {
        if self.interrupted.load(Ordering::SeqCst) {
            Some(Exit::Interrupted)
        } else if self.cancelled.load(Ordering::SeqCst) {
            Some(Exit::Cancelled)
        } else {
            None
        }
    }

    /// Cancels every job of the run still being followed.
    fn cancel_all(&self) {
        let ids: Vec<u64> = self.jobs.lock().expect("jobs").keys().copied().collect();
        if !ids.is_empty() {
            let _ = scancel(&ids);
        }
    }

    fn poll_until_stopped(&self) {
        let mut interval = LIST_SOONEST;
        let mut listed_at: Option<Instant> = None;
        let mut looked_at = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            let (any, fresh) = {
                let mut jobs = self.jobs.lock().expect("jobs");
                let mut fresh = false;
                let look = looked_at.elapsed() >= LOOK.max(LOOK_PER_JOB * jobs.len() as u32);
                if look {
                    looked_at = Instant::now();
                }
                for w in jobs.values_mut() {
                    fresh |= !w.seen && listed_at.is_none_or(|t| t < w.submitted);
                    if look && !w.exited && w.exit_file.exists() {
                        w.exited = true;
                        fresh = true;
                    }
                }
                (!jobs.is_empty(), fresh)
            };
            if fresh {
                interval = LIST_SOONEST;
            }
            let due = listed_at.is_none_or(|t| fresh || t.elapsed() >= interval);
            if any && due {
                listed_at = Some(Instant::now());
                // A failed listing changes nothing: the jobs are as last seen.
                if let Ok(listed) = list_states(&format!("--name={}", self.run_name)) {
                    let mut jobs = self.jobs.lock().expect("jobs");
                    let mut changed = false;
                    for (id, w) in jobs.iter_mut() {
                        let now = listed.get(id).cloned();
                        changed |= now != w.listed;
                        w.seen |= now.is_some();
                        w.listed = now;
                    }
                    interval = match changed {
                        true => LIST_SOONEST,
                        false => (interval * 2).min(LIST_LATEST),
                    };
                    self.changed.notify_all();
                }
            }
            let jobs = self.jobs.lock().expect("jobs");
            let _ = self.changed.wait_timeout(jobs, LOOK);
        }
    }
}

impl Runner for SlurmRunner {
    fn run(&self, job: &Job) -> io::Result<Exit> {
        if let Some(stopped) = self.shared.stopped() {
            return Ok(stopped);
        }
        let (id, exit_file) = self.submit(job)?;
        // The stage's progress line says where its job stands until the stage writes its own.
        let progress = job
            .env
            .iter()
            .find(|(k, _)| k == "REPRO_PROGRESS")
            .map(|(_, v)| PathBuf::from(v));
        let mut said = format!("Slurm job {id}: submitted");
        if let Some(p) = &progress {
            let _ = std::fs::write(p, &said);
        }
        let mut jobs = self.shared.jobs.lock().expect("jobs");
        jobs.insert(
            id,
            Watched {
                listed: None,
                seen: false,
                submitted: Instant::now(),
                exit_file: exit_file.clone(),
                exited: false,
            },
        );
        self.shared.changed.notify_all();
        // A stop that came while this job was being submitted did not see it.
        if self.shared.stopped().is_some() {
            let _ = scancel(&[id]);
        }
        let judged = loop {
            let w = &jobs[&id];
            let listed = w.listed.as_ref().map(|(s, r)| (s.as_str(), r.as_str()));
            // Files on the shared filesystem are read only when they can matter: the exit code
            // once the job is no longer active, the progress line when the state changed.
            let active = listed.is_some_and(|(state, _)| ACTIVE.contains(&state));
            let code = match active {
                true => None,
                false => std::fs::read_to_string(&exit_file).ok(),
            };
            if let (Some(p), Some((state, reason))) = (&progress, listed) {
                let now = format!("Slurm job {id}: {}", state_line(state, reason));
                let ours = || std::fs::read_to_string(p).map_or(true, |t| t == said);
                if now != said && ours() {
                    let _ = std::fs::write(p, &now);
                    said = now;
                }
            }
            let on_its_way = !w.seen && w.submitted.elapsed() < GRACE;
            match verdict(listed, code.as_deref()) {
                Verdict::Failed(_) if listed.is_none() && on_its_way => {}
                Verdict::Active => {}
                done => break done,
            }
            jobs = self.shared.changed.wait(jobs).expect("jobs");
        };
        jobs.remove(&id);
        drop(jobs);
        let _ = std::fs::remove_file(JobFile::path(&self.dir, &job.stage));
        if let (Some(stopped), false) = (self.shared.stopped(), judged == Verdict::Exited(0)) {
            return Ok(stopped);
        }
        Ok(match judged {
            Verdict::Exited(0) => Exit::Success,
            Verdict::Exited(c) => Exit::Code(c),
            Verdict::Failed(why) => Exit::Failed(format!("Slurm job {id}: {why}")),
            Verdict::Active => unreachable!("the loop ends on a final verdict"),
        })
    }

    fn adopted(&self, stage: &str, key: &str) -> bool {
        self.adopted.get(stage).is_some_and(|k| k == key)
    }

    fn interrupt(&self) {
        self.shared.interrupted.store(true, Ordering::SeqCst);
        self.shared.cancel_all();
    }

    fn stop_after_failure(&self) {
        self.shared.cancelled.store(true, Ordering::SeqCst);
        self.shared.cancel_all();
    }
}

impl Drop for SlurmRunner {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn job() -> Job {
        Job {
            stage: "train@ffn=moe,scale=1".into(),
            key: "k".into(),
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo 'it''s' \"$X\" > out.txt".into(),
            ],
            env: vec![
                ("REPRO_STAGE".into(), "train@ffn=moe,scale=1".into()),
                ("X".into(), "a 'quoted' $value\nwith a line".into()),
            ],
            cwd: PathBuf::from("/work space/ws"),
            log: PathBuf::from("/work space/ws/.repro/logs/t.log"),
            resources: BTreeMap::new(),
        }
    }

    #[test]
    fn the_job_script_runs_the_command_as_given_and_writes_its_exit_code_whole() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("work space");
        std::fs::create_dir_all(&ws).unwrap();
        let exit_file = dir.path().join("exit code");
        for (cmd, want) in [("exit 0", 0), ("exit 3", 3)] {
            let mut j = job();
            j.cwd = ws.clone();
            j.argv[2] = format!("printf '%s|%s' \"$X\" \"$(pwd)\" > out.txt; {cmd}");
            let script = dir.path().join("job.sh");
            std::fs::write(&script, job_script(&j, &exit_file).unwrap()).unwrap();
            let status = std::process::Command::new("sh")
                .arg(&script)
                .env_clear()
                .env("PATH", "/usr/bin:/bin")
                .status()
                .unwrap();
            assert_eq!(status.code(), Some(want));
            assert_eq!(
                std::fs::read_to_string(ws.join("out.txt")).unwrap(),
                format!("a 'quoted' $value\nwith a line|{}", ws.display()),
                "the environment and folder reach the command unchanged"
            );
            assert_eq!(
                std::fs::read_to_string(&exit_file).unwrap(),
                format!("{want}\n")
            );
            assert!(!dir.path().join("exit code.tmp").exists());
        }
        for bad in ["a;b", "1x", "a-b", "", "$(x)"] {
            let mut j = job();
            j.env.push((bad.into(), "v".into()));
            let err = job_script(&j, &exit_file).unwrap_err();
            assert!(err.contains("can export"), "{bad}: {err}");
        }
    }

    #[test]
    fn resources_and_settings_map_to_sbatch_flags() {
        let resources: BTreeMap<String, u64> = [
            ("gpu".to_string(), 1),
            ("cores".to_string(), 4),
            ("memory".to_string(), 8192),
            ("licence".to_string(), 1),
        ]
        .into();
        let opts = SlurmSettings {
            partition: Some("gpu".into()),
            account: Some("lab".into()),
            time: Some(120),
            extra: vec!["--qos=short".into()],
        };
        let args = sbatch_args("repro-123", &job(), &resources, &opts);
        assert_eq!(
            args,
            [
                "--parsable",
                "--job-name=repro-123",
                "--output=/work space/ws/.repro/logs/t.log",
                "--chdir=/work space/ws",
                "--partition=gpu",
                "--account=lab",
                "--time=120",
                "--cpus-per-task=4",
                "--gres=gpu:1",
                "--mem=8192M",
                "--qos=short",
            ]
        );
        let own_time: BTreeMap<String, u64> = [("time".to_string(), 15)].into();
        let args = sbatch_args("r", &job(), &own_time, &opts);
        assert!(
            args.contains(&"--time=15".to_string()),
            "the stage's limit wins: {args:?}"
        );
        assert!(!args.contains(&"--time=120".to_string()), "{args:?}");
        let none = sbatch_args("r", &job(), &BTreeMap::new(), &SlurmSettings::default());
        assert_eq!(none.len(), 4, "{none:?}");
    }

    #[test]
    fn orphans_are_the_active_jobs_of_other_runs_in_this_workspace() {
        let root = Path::new("/work/ws");
        let (prefix, own) = (run_prefix(root), run_name(root));
        assert_ne!(prefix, run_prefix(Path::new("/work/other")));
        let listing = format!(
            "1|{prefix}77|RUNNING\n2|{prefix}78|PENDING\n3|{own}|RUNNING\n\
             4|{prefix}79|COMPLETED\n5|repro-00000000-1|RUNNING\n6|someone|RUNNING\n"
        );
        let found: Vec<u64> = orphans(root, &listing).iter().map(|o| o.0).collect();
        assert_eq!(found, [1, 2]);
    }

    #[test]
    fn job_ids_and_listings_parse_as_slurm_prints_them() {
        assert_eq!(parse_job_id("1234\n"), Some(1234));
        assert_eq!(parse_job_id("1234;cluster\n"), Some(1234));
        assert_eq!(parse_job_id("sbatch: error: x"), None);
        let listed = parse_squeue(
            "101|RUNNING|None\n102|PENDING|Resources\n\n103|TIMEOUT|TimeLimit\nnoise\n",
        );
        assert_eq!(listed.len(), 3);
        assert_eq!(listed[&102], ("PENDING".into(), "Resources".into()));
        assert_eq!(listed[&103].0, "TIMEOUT");
    }

    #[test]
    fn a_job_is_judged_by_its_state_and_its_exit_code_file() {
        use Verdict::*;
        for state in ACTIVE {
            assert_eq!(verdict(Some((state, "")), None), Active, "{state}");
            assert_eq!(verdict(Some((state, "")), Some("0\n")), Active, "{state}");
        }
        assert_eq!(verdict(Some(("COMPLETED", "None")), Some("0\n")), Exited(0));
        assert_eq!(
            verdict(Some(("FAILED", "NonZeroExitCode")), Some("3\n")),
            Exited(3)
        );
        assert_eq!(verdict(None, Some("0\n")), Exited(0), "gone from squeue");
        // TIMEOUT shows exit code 0 in Slurm: never a success, even with a file.
        let Failed(why) = verdict(Some(("TIMEOUT", "TimeLimit")), Some("0\n")) else {
            panic!("TIMEOUT passed")
        };
        assert!(
            why.starts_with("TIMEOUT") && why.contains("(TimeLimit)"),
            "{why}"
        );
        for state in [
            "OUT_OF_MEMORY",
            "NODE_FAIL",
            "PREEMPTED",
            "CANCELLED",
            "BOOT_FAIL",
            "DEADLINE",
        ] {
            let Failed(why) = verdict(Some((state, "None")), None) else {
                panic!("{state} passed")
            };
            assert!(why.starts_with(state) && !why.contains("None"), "{why}");
        }
        assert!(matches!(verdict(Some(("COMPLETED", "")), None), Failed(_)));
        assert!(matches!(verdict(Some(("FAILED", "")), None), Failed(_)));
        assert!(matches!(verdict(None, None), Failed(_)));
        assert!(matches!(verdict(None, Some("garbage")), Failed(_)));
    }
}
