//! Running a pipeline: stages start as soon as their upstreams are done and a job slot and their
//! resources are free; each is skipped, restored from the cache or run; a failure stops only its
//! descendants; Ctrl-C stops everything and records nothing for what was stopped.

pub mod plan;
pub mod report;
pub mod runner;
pub mod signals;

use crate::cache::store::{remove_path, BadObject};
use crate::cache::{OutRecord, Record};
use crate::pipeline::{Action, Pipeline, Stage};
use crate::workspace::{State, Workspace};
use anyhow::{anyhow, bail, Context, Result};
use plan::{Decision, KindVersion};
use report::Reporter;
use runner::{Exit, Job, Runner};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub jobs: usize,
    /// Capacity of each resource; a resource not named here has the default of `capacity`.
    pub resources: BTreeMap<String, u64>,
    pub keep_going: bool,
    pub selected: Vec<bool>,
    pub forced: Vec<bool>,
    /// List stages that were already up to date.
    pub verbose: bool,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub ran: usize,
    pub restored: usize,
    pub skipped: usize,
    pub failed: Vec<String>,
    pub blocked: usize,
    pub interrupted: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Status {
    Pending,
    Running,
    Done,
    Failed,
    Blocked,
}

/// How a stage ended.
enum Outcome {
    Ran(Record),
    Restored(Record),
    Skipped(Record),
    Failed(String),
}

/// Default capacity of a resource the user did not size: GPUs are counted, memory and cores
/// are the machine's, anything else is one at a time.
pub fn default_capacity(resource: &str) -> u64 {
    match resource {
        "gpu" => std::fs::read_dir("/proc/driver/nvidia/gpus")
            .map(|d| d.count() as u64)
            .unwrap_or(0)
            .max(1),
        "memory" => physical_memory_mib(),
        "cores" => std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1),
        _ => 1,
    }
}

fn physical_memory_mib() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages.max(0) as u64 * size.max(0) as u64) >> 20
}

pub struct Executor<'a> {
    pub ws: &'a Workspace,
    pub pipeline: &'a Pipeline,
    pub kinds: &'a (dyn KindVersion + Sync),
    pub runner: &'a dyn Runner,
    /// The program that runs built-in kinds (`repro __stage`).
    pub stage_program: Vec<String>,
}

struct Shared {
    records: Mutex<Vec<Option<Record>>>,
}

impl Executor<'_> {
    pub fn run(&self, opts: &RunOptions, reporter: &mut Reporter) -> Result<Summary> {
        let p = self.pipeline;
        let n = p.stages.len();
        // Sized once: the scheduling loop asks for them at every turn, for every stage.
        let mut capacities: BTreeMap<&str, u64> = BTreeMap::new();
        for s in &p.stages {
            for (r, &need) in &s.resources {
                let have = *capacities.entry(r).or_insert_with(|| {
                    opts.resources
                        .get(r)
                        .copied()
                        .unwrap_or_else(|| default_capacity(r))
                });
                if need > have {
                    bail!("stage `{}` needs {r}={need}, but only {have} is available (set it with --resources {r}=N)", s.name);
                }
            }
        }
        let capacity = |r: &str| capacities[r];
        let state = self.ws.load_state(&p.file);
        let mut finished: Vec<(String, Record)> = Vec::new();
        let plan = plan::plan(self.ws, p, &state, self.kinds, &opts.selected, &opts.forced)?;
        let mut summary = Summary::default();
        let mut records = vec![None; n];
        let mut status = vec![Status::Pending; n];
        for (i, decision) in plan.decisions.iter().enumerate() {
            match decision {
                Decision::Excluded => status[i] = Status::Done,
                Decision::Skip => {
                    status[i] = Status::Done;
                    summary.skipped += 1;
                    records[i] = state.stages.get(&p.stages[i].name).cloned();
                    if opts.verbose {
                        reporter.finished(&p.stages[i].name, "up to date", None, "");
                    }
                }
                _ => {}
            }
        }
        let shared = Shared {
            records: Mutex::new(records),
        };

        let token = self.begin_run(reporter)?;
        let (tx, rx) = mpsc::channel::<(usize, Result<Outcome>, Duration)>();
        let mut in_use: BTreeMap<String, u64> = BTreeMap::new();
        let mut jobs_running = 0;
        let mut stopping = false;
        let mut interrupted_at = None;
        std::thread::scope(|scope| -> Result<()> {
            loop {
                if signals::received() > 0 && interrupted_at.is_none() {
                    interrupted_at = Some(Instant::now());
                    stopping = true;
                    summary.interrupted = true;
                    reporter.note(
                        "interrupted: stopping running stages (nothing they did is recorded)",
                    );
                    self.runner.interrupt();
                }
                if !stopping {
                    for i in 0..n {
                        if jobs_running >= opts.jobs {
                            break;
                        }
                        let ready = status[i] == Status::Pending
                            && p.dag.upstream[i].iter().all(|&u| status[u] == Status::Done);
                        let fits = p.stages[i].resources.iter().all(|(r, &need)| {
                            in_use.get(r).copied().unwrap_or(0) + need <= capacity(r)
                        });
                        if !(ready && fits) {
                            continue;
                        }
                        status[i] = Status::Running;
                        jobs_running += 1;
                        for (r, &need) in &p.stages[i].resources {
                            *in_use.entry(r.clone()).or_default() += need;
                        }
                        reporter.started(
                            &p.stages[i].name,
                            self.ws.scratch_dir(&p.stages[i].name).join("progress"),
                        );
                        let (tx, shared, token, forced) =
                            (tx.clone(), &shared, &token, opts.forced[i]);
                        let state = &state;
                        scope.spawn(move || {
                            let t0 = Instant::now();
                            let outcome = self.execute(i, state, shared, token, forced);
                            let _ = tx.send((i, outcome, t0.elapsed()));
                        });
                    }
                }
                if jobs_running == 0 {
                    break;
                }
                let Ok((i, outcome, elapsed)) = rx.recv_timeout(Duration::from_millis(100)) else {
                    reporter.tick();
                    continue;
                };
                jobs_running -= 1;
                for (r, &need) in &p.stages[i].resources {
                    *in_use.get_mut(r).expect("held") -= need;
                }
                let name = &p.stages[i].name;
                match outcome {
                    Ok(o) => {
                        let (label, rec) = match o {
                            Outcome::Ran(r) => {
                                summary.ran += 1;
                                ("ran", r)
                            }
                            Outcome::Restored(r) => {
                                summary.restored += 1;
                                ("restored", r)
                            }
                            Outcome::Skipped(r) => {
                                summary.skipped += 1;
                                ("unchanged", r)
                            }
                            Outcome::Failed(msg) => {
                                let label = if interrupted_at.is_some() {
                                    "stopped"
                                } else {
                                    "failed"
                                };
                                reporter.finished(name, label, Some(elapsed), &msg);
                                status[i] = Status::Failed;
                                if interrupted_at.is_none() {
                                    summary.failed.push(name.clone());
                                    self.block_descendants(i, &mut status, &mut summary, reporter);
                                    stopping |= !opts.keep_going;
                                }
                                continue;
                            }
                        };
                        reporter.finished(name, label, Some(elapsed), "");
                        finished.push((name.clone(), rec.clone()));
                        shared.records.lock().expect("records")[i] = Some(rec);
                        status[i] = Status::Done;
                    }
                    Err(e) => {
                        reporter.finished(name, "failed", Some(elapsed), &format!("{e:#}"));
                        status[i] = Status::Failed;
                        summary.failed.push(name.clone());
                        self.block_descendants(i, &mut status, &mut summary, reporter);
                        stopping |= !opts.keep_going;
                    }
                }
            }
            Ok(())
        })?;
        if stopping && !summary.interrupted {
            let not_started = (0..n).filter(|&i| status[i] == Status::Pending).count();
            if not_started > 0 {
                reporter.note(&format!(
                    "{not_started} stage(s) not started after the failure (--keep-going runs them)"
                ));
            }
        }
        let mut state = state;
        state.stages.extend(finished);
        self.ws.save_state(&p.file, &state)?;
        self.end_run();
        Ok(summary)
    }

    /// A failed stage's descendants can no longer run.
    fn block_descendants(
        &self,
        i: usize,
        status: &mut [Status],
        summary: &mut Summary,
        reporter: &mut Reporter,
    ) {
        let reach = self.pipeline.dag.with_descendants(&[i]);
        for (j, &hit) in reach.iter().enumerate() {
            if hit && j != i && status[j] == Status::Pending {
                status[j] = Status::Blocked;
                summary.blocked += 1;
                let why = format!("upstream `{}` failed", self.pipeline.stages[i].name);
                reporter.finished(&self.pipeline.stages[j].name, "blocked", None, &why);
            }
        }
    }

    /// Marks a run in progress; first cleans up after a run that crashed.
    fn begin_run(&self, reporter: &Reporter) -> Result<String> {
        let marker = self.ws.state_dir.join("running");
        if let Ok(old) = std::fs::read_to_string(&marker) {
            let killed = runner::kill_leftovers(old.trim());
            if killed > 0 {
                reporter.note(&format!(
                    "stopped {killed} leftover process(es) of a run that crashed"
                ));
            }
        }
        let token = format!(
            "{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        crate::cache::atomic::write(&marker, token.as_bytes(), true)?;
        signals::install();
        Ok(token)
    }

    fn end_run(&self) {
        let _ = std::fs::remove_file(self.ws.state_dir.join("running"));
    }

    /// Decides and carries out one stage whose upstreams are done.
    fn execute(
        &self,
        i: usize,
        state: &State,
        shared: &Shared,
        token: &str,
        forced: bool,
    ) -> Result<Outcome> {
        let p = self.pipeline;
        let stage = &p.stages[i];
        let hasher = self.ws.hasher();
        let dep_hash = |d: &str| {
            Ok(hasher
                .hash(d)
                .with_context(|| format!("cannot hash `{d}`"))?
                .map(|h| h.to_hex().to_string()))
        };
        let upstream = |u: usize| shared.records.lock().expect("records")[u].clone();
        let parts = plan::key_parts(p, i, self.kinds, &dep_hash, &upstream)?;
        let key = parts.key();
        if !forced {
            match plan::decide(self.ws, &parts, &key, state.stages.get(&stage.name)) {
                Decision::Skip => return Ok(Outcome::Skipped(state.stages[&stage.name].clone())),
                Decision::Restore(_) => match self.restore(&key) {
                    Ok(rec) => return Ok(Outcome::Restored(rec)),
                    Err(e) if e.downcast_ref::<BadObject>().is_some() => {}
                    Err(e) => return Err(e),
                },
                _ => {}
            }
        }
        self.run_stage(stage, key, parts, shared, token)
    }

    /// Puts a recorded result back in the workspace (only the outs that differ).
    fn restore(&self, key: &str) -> Result<Record> {
        let record = self.ws.store.record(key).ok_or_else(|| {
            anyhow!(BadObject {
                hash: key.into(),
                problem: "missing"
            })
        })?;
        for stale in plan::stale_outs(self.ws, &record) {
            self.ws.store.restore_out(&self.ws.root, stale.out)?;
        }
        Ok(record)
    }

    fn run_stage(
        &self,
        stage: &Stage,
        key: String,
        parts: crate::cache::KeyParts,
        shared: &Shared,
        token: &str,
    ) -> Result<Outcome> {
        let root = &self.ws.root;
        // Outs are cleared first, so nothing stale or partial can pass for this run's output.
        for out in &stage.outs {
            let path = root.join(out);
            remove_path(&path).with_context(|| format!("cannot clear out `{out}`"))?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
        }
        let scratch = self.ws.scratch_dir(&stage.name);
        std::fs::create_dir_all(&scratch)?;
        let progress = scratch.join("progress");
        let _ = std::fs::remove_file(&progress);
        let mut env = vec![
            ("REPRO_RUN".to_string(), token.to_string()),
            ("REPRO_STAGE".into(), stage.name.clone()),
            ("REPRO_SCRATCH".into(), scratch.display().to_string()),
            ("REPRO_PROGRESS".into(), progress.display().to_string()),
            ("REPRO_WORKSPACE".into(), root.display().to_string()),
        ];
        env.extend(
            stage
                .env
                .iter()
                .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v))),
        );
        let argv = match &stage.action {
            Action::Cmd { resolved, .. } => vec!["sh".into(), "-c".into(), resolved.clone()],
            Action::Uses { kind, with } => {
                let context = self.stage_context(stage, kind, with, shared);
                let file = scratch.join("context.json");
                std::fs::write(&file, serde_json::to_vec_pretty(&context)?)?;
                let mut argv = self.stage_program.clone();
                argv.push(file.display().to_string());
                argv
            }
        };
        let log = self.ws.log_path(&stage.name);
        let job = Job {
            stage: stage.name.clone(),
            argv,
            env,
            cwd: root.clone(),
            log: log.clone(),
        };
        let t0 = Instant::now();
        let exit = self
            .runner
            .run(&job)
            .with_context(|| format!("cannot start stage `{}`", stage.name))?;
        let shown_log = log.strip_prefix(root).unwrap_or(&log).display().to_string();
        match exit {
            Exit::Success => {}
            Exit::Code(c) => {
                return Ok(Outcome::Failed(format!("exit code {c}; log: {shown_log}")))
            }
            Exit::Signal(s) => {
                return Ok(Outcome::Failed(format!(
                    "killed by signal {s}; log: {shown_log}"
                )))
            }
            Exit::Interrupted => return Ok(Outcome::Failed("interrupted".into())),
        }
        let duration_s = t0.elapsed().as_secs_f64();

        let hasher = self.ws.hasher();
        let mut outs: Vec<OutRecord> = Vec::new();
        for out in &stage.outs {
            let snap = hasher
                .snapshot(out)
                .with_context(|| format!("cannot hash out `{out}`"))?;
            let Some(snap) = snap else {
                return Ok(Outcome::Failed(format!(
                    "exited 0 but did not write `{out}`; log: {shown_log}"
                )));
            };
            outs.push(self.ws.store.put_out(root, out, &snap)?);
        }
        let metrics = match &stage.metrics {
            None => None,
            Some(m) => {
                let text = std::fs::read(root.join(m))?;
                match serde_json::from_slice::<serde_json::Value>(&text) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        return Ok(Outcome::Failed(format!(
                            "metrics file `{m}` is not JSON: {e}"
                        )))
                    }
                }
            }
        };
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let record = Record {
            key: key.clone(),
            stage: stage.name.clone(),
            parts: parts.0,
            outs,
            metrics,
            created,
            duration_s,
        };
        self.ws.store.put_log(&key, &log)?;
        self.ws.store.put_record(&record)?;
        let _ = std::fs::remove_dir_all(&scratch);
        Ok(Outcome::Ran(record))
    }

    /// What a built-in kind is told: its parameters, outs, and its upstream stages' params and
    /// metrics (what a `table` gathers).
    fn stage_context(
        &self,
        stage: &Stage,
        kind: &str,
        with: &serde_json::Map<String, serde_json::Value>,
        shared: &Shared,
    ) -> serde_json::Value {
        let p = self.pipeline;
        let i = p.index_of(&stage.name).expect("stage of this pipeline");
        let records = shared.records.lock().expect("records");
        let upstream: Vec<serde_json::Value> = p.dag.upstream[i]
            .iter()
            .map(|&u| {
                let up = &p.stages[u];
                json!({
                    "name": up.name,
                    "base": up.base,
                    "params": stage_params(up),
                    "metrics": records[u].as_ref().and_then(|r| r.metrics.clone()),
                    "outs": up.outs,
                })
            })
            .collect();
        json!({
            "stage": stage.name,
            "kind": kind,
            "with": with,
            "deps": stage.deps,
            "outs": stage.outs,
            "metrics": stage.metrics,
            "workspace": self.ws.root,
            "scratch": self.ws.scratch_dir(&stage.name),
            "upstream": upstream,
        })
    }
}

/// The parameters that describe a stage in tables: its matrix values, its `with` scalars and
/// the params it references.
pub fn stage_params(stage: &Stage) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    for (k, v) in &stage.used_params {
        out.insert(k.clone(), v.clone());
    }
    if let Action::Uses { with, .. } = &stage.action {
        for (k, v) in with {
            if !v.is_object() && !v.is_array() {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    for (k, v) in &stage.matrix {
        out.insert(k.clone(), v.clone());
    }
    out
}
