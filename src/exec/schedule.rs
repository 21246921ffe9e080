//! The scheduling loop: starts every stage whose upstreams are done when a job slot and its
//! resources are free, collects outcomes, blocks the descendants of failures, and handles Ctrl-C.

use super::plan::{self, Decision};
use super::report::Reporter;
use super::stage::{Outcome, Shared};
use super::{default_capacity, runner, signals, Executor, RunOptions, Summary};
use crate::cache::Record;
use crate::workspace::LoadedState;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Stages whose upstreams are done, by what resources they need: choosing the next one to
/// start looks at the first of each group, so it costs the number of distinct needs, not the
/// number of stages waiting for a slot (a thousand GPU stages behind one GPU).
#[derive(Default)]
struct Ready<'p> {
    by_needs: BTreeMap<&'p BTreeMap<String, u64>, BTreeSet<usize>>,
}

impl<'p> Ready<'p> {
    fn insert(&mut self, stage: usize, needs: &'p BTreeMap<String, u64>) {
        self.by_needs.entry(needs).or_default().insert(stage);
    }

    /// Takes the first stage, in pipeline order, whose needs `fits` says are free now.
    fn take_first(&mut self, fits: impl Fn(&BTreeMap<String, u64>) -> bool) -> Option<usize> {
        let (needs, first) = self
            .by_needs
            .iter()
            .filter(|(needs, _)| fits(needs))
            .filter_map(|(needs, set)| set.first().map(|&i| (*needs, i)))
            .min_by_key(|&(_, i)| i)?;
        let set = self.by_needs.get_mut(needs).expect("just seen");
        set.remove(&first);
        if set.is_empty() {
            self.by_needs.remove(needs);
        }
        Some(first)
    }
}

/// Stage `i` is done: its downstreams wait on one stage fewer.
fn settle<'p>(
    p: &'p crate::pipeline::Pipeline,
    i: usize,
    status: &mut [Status],
    waiting_on: &mut [usize],
    ready: &mut Ready<'p>,
) {
    status[i] = Status::Done;
    for &d in &p.dag.downstream[i] {
        waiting_on[d] -= 1;
        if waiting_on[d] == 0 && status[d] == Status::Pending {
            ready.insert(d, &p.stages[d].resources);
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Status {
    Pending,
    Running,
    Done,
    Failed,
    Blocked,
}

impl Executor<'_> {
    /// After a failure: without `--keep-going`, nothing more starts, and the runner cancels
    /// what it queued.
    fn stop_after_failure(&self, opts: &RunOptions, stopping: &mut bool) {
        if !opts.keep_going && !*stopping {
            *stopping = true;
            self.runner.stop_after_failure();
        }
    }

    /// Runs the pipeline from `loaded`, its state as read before the run.
    pub fn run(
        &self,
        opts: &RunOptions,
        loaded: &LoadedState,
        reporter: &mut Reporter,
    ) -> Result<Summary> {
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
        // A state file that cannot be used is set aside (never overwritten) and said.
        if let Some(bad) = &loaded.problem {
            let dest = self.ws.set_aside_state(bad)?;
            reporter.note(&format!(
                "warning: {}: moved aside to {}; {}",
                bad.describe(self.ws),
                self.ws.shown(&dest),
                crate::workspace::STATE_LOST_CONSEQUENCE
            ));
        }
        let state_was_bad = loaded.problem.is_some();
        let state = &loaded.state;
        let plan = plan::plan(self.ws, p, state, self.kinds, &opts.selected, &opts.forced)?;
        let mut summary = Summary::default();
        // Results of this run; an up-to-date stage's stays in the state, read when asked for.
        let records: Vec<Option<Record>> = vec![None; n];
        let mut status = vec![Status::Pending; n];
        for (i, decision) in plan.decisions.iter().enumerate() {
            match decision {
                Decision::Excluded => status[i] = Status::Done,
                Decision::Skip => {
                    status[i] = Status::Done;
                    summary.skipped += 1;
                    if opts.verbose {
                        reporter.finished(&p.stages[i].name, "up to date", None, "");
                    }
                }
                _ => {}
            }
        }
        let crashed_before = self.ws.state_dir.join("running").exists();
        if status.iter().all(|s| *s == Status::Done) && !state_was_bad && !crashed_before {
            // Nothing to run or restore: a no-op writes nothing but what it learnt of file stats.
            self.ws.save_stats()?;
            return Ok(summary);
        }
        let shared = Shared {
            records: Mutex::new(records),
        };
        let mut log = self.ws.state_log(&p.file, state, loaded.fresh)?;

        // Stages whose upstreams are all done: the only ones the loop looks at, so a turn costs
        // what is ready, not what is in the pipeline.
        let mut waiting_on: Vec<usize> = (0..n)
            .map(|i| {
                p.dag.upstream[i]
                    .iter()
                    .filter(|&&u| status[u] != Status::Done)
                    .count()
            })
            .collect();
        let mut ready = Ready::default();
        for i in (0..n).filter(|&i| status[i] == Status::Pending && waiting_on[i] == 0) {
            ready.insert(i, &p.stages[i].resources);
        }

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
                    while jobs_running < opts.jobs {
                        let fits = |needs: &BTreeMap<String, u64>| {
                            needs.iter().all(|(r, &need)| {
                                in_use.get(r).copied().unwrap_or(0) + need <= capacity(r)
                            })
                        };
                        let Some(i) = ready.take_first(fits) else {
                            break;
                        };
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
                            Outcome::Skipped => {
                                summary.skipped += 1;
                                reporter.finished(name, "unchanged", Some(elapsed), "");
                                settle(p, i, &mut status, &mut waiting_on, &mut ready);
                                continue;
                            }
                            Outcome::Failed { why, log } => {
                                let label = if interrupted_at.is_some() {
                                    "stopped"
                                } else {
                                    "failed"
                                };
                                reporter.finished(name, label, Some(elapsed), &why);
                                if let (Some(log), None) = (log, interrupted_at) {
                                    reporter.log_tail(&log, opts.log_lines);
                                }
                                status[i] = Status::Failed;
                                if interrupted_at.is_none() {
                                    summary.failed.push(name.clone());
                                    self.block_descendants(i, &mut status, &mut summary, reporter);
                                    self.stop_after_failure(opts, &mut stopping);
                                }
                                continue;
                            }
                        };
                        reporter.finished(name, label, Some(elapsed), "");
                        log.append(name, &rec, state.get(name).is_none())
                            .with_context(|| format!("cannot record stage `{name}`"))?;
                        shared.records.lock().expect("records")[i] = Some(rec);
                        settle(p, i, &mut status, &mut waiting_on, &mut ready);
                    }
                    Err(e) => {
                        reporter.finished(name, "failed", Some(elapsed), &format!("{e:#}"));
                        status[i] = Status::Failed;
                        summary.failed.push(name.clone());
                        self.block_descendants(i, &mut status, &mut summary, reporter);
                        self.stop_after_failure(opts, &mut stopping);
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
        log.close().context("cannot write the state")?;
        self.ws.save_stats()?;
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
        // Only the pending descendants are walked (a blocked one's are blocked already), so
        // failures cost what they block, not the size of the pipeline.
        let mut blocked = Vec::new();
        let mut stack = vec![i];
        while let Some(j) = stack.pop() {
            for &d in &self.pipeline.dag.downstream[j] {
                if status[d] == Status::Pending {
                    status[d] = Status::Blocked;
                    blocked.push(d);
                    stack.push(d);
                }
            }
        }
        blocked.sort_unstable();
        summary.blocked += blocked.len();
        let why = format!("upstream `{}` failed", self.pipeline.stages[i].name);
        for j in blocked {
            reporter.finished(&self.pipeline.stages[j].name, "blocked", None, &why);
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
        crate::atomic::write(&marker, token.as_bytes(), true)?;
        signals::install();
        Ok(token)
    }

    fn end_run(&self) {
        let _ = std::fs::remove_file(self.ws.state_dir.join("running"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_stage_taken_is_the_first_in_pipeline_order_whose_needs_fit() {
        let none = BTreeMap::new();
        let gpu: BTreeMap<String, u64> = [("gpu".to_string(), 1)].into();
        let mut ready = Ready::default();
        for i in [5, 1, 3] {
            ready.insert(i, &none);
        }
        for i in [0, 4] {
            ready.insert(i, &gpu);
        }
        let any = |_: &BTreeMap<String, u64>| true;
        let no_gpu = |needs: &BTreeMap<String, u64>| !needs.contains_key("gpu");
        assert_eq!(ready.take_first(any), Some(0));
        assert_eq!(ready.take_first(no_gpu), Some(1));
        assert_eq!(ready.take_first(no_gpu), Some(3));
        assert_eq!(ready.take_first(any), Some(4));
        assert_eq!(ready.by_needs.len(), 1, "an empty group goes");
        assert_eq!(ready.take_first(|_| false), None);
        assert_eq!(ready.take_first(any), Some(5));
        assert_eq!(ready.take_first(any), None);
    }
}
