//! One stage whose upstreams are done: skip it, restore it from the store, or run it and
//! store what it wrote, writing its record last.

use super::plan::{self, Decision};
use super::runner::{Exit, Job};
use super::{stage_params, Executor};
use crate::cache::store::{remove_path, BadObject};
use crate::cache::{OutRecord, Record};
use crate::pipeline::{Action, Stage};
use crate::workspace::State;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// How a stage ended.
pub(super) enum Outcome {
    Ran(Record),
    Restored(Record),
    /// Up to date: its record is the one in the state.
    Skipped,
    /// Why, and the log whose last lines say more.
    Failed {
        why: String,
        log: Option<PathBuf>,
    },
}

/// A metrics file larger than this is not a handful of numbers.
const MAX_METRICS_BYTES: u64 = 16 << 20;

pub(super) struct Shared {
    pub(super) records: Mutex<Vec<Option<Record>>>,
}

impl Executor<'_> {
    /// Decides and carries out one stage whose upstreams are done.
    pub(super) fn execute(
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
        // An upstream that was up to date has its record in the state, not in `records`.
        let upstream = |u: usize| match &shared.records.lock().expect("records")[u] {
            Some(r) => Some(plan::outs_digest(plan::record_ids(&r.outs))),
            None => state
                .get(&p.stages[u].name)
                .map(|e| plan::outs_digest(plan::ids(&e.outs))),
        };
        let parts = plan::key_parts(p, i, self.kinds, &dep_hash, &upstream)?;
        let key = parts.key();
        if !forced {
            match plan::decide(self.ws, &parts, &key, state, &stage.name) {
                Decision::Skip => return Ok(Outcome::Skipped),
                Decision::Restore(_) => match self.restore(&key) {
                    Ok(rec) => return Ok(Outcome::Restored(rec)),
                    Err(e) if e.downcast_ref::<BadObject>().is_some() => {}
                    Err(e) => return Err(e),
                },
                _ => {}
            }
        }
        self.run_stage(i, key, parts, state, shared, token)
    }

    /// Puts a recorded result back in the workspace (only the outs that differ).
    fn restore(&self, key: &str) -> Result<Record> {
        let record = self.ws.store.record(key).ok_or_else(|| {
            anyhow!(BadObject {
                hash: key.into(),
                problem: "missing"
            })
        })?;
        let stale: Vec<&str> = plan::stale_outs(self.ws, plan::record_ids(&record.outs))
            .iter()
            .map(|s| s.path)
            .collect();
        for out in record
            .outs
            .iter()
            .filter(|o| stale.contains(&o.path.as_str()))
        {
            if let Some(why) = self.pipeline.own.refuse_out(&out.path) {
                bail!("will not restore `{}`: {why}", out.path);
            }
            self.ws.store.restore_out(&self.ws.root, out)?;
        }
        Ok(record)
    }

    /// Runs a stage and stores what it wrote. Whatever a stage that did not succeed left in its
    /// outs is moved aside, so that no partial file can pass for a result.
    fn run_stage(
        &self,
        i: usize,
        key: String,
        parts: crate::cache::KeyParts,
        state: &State,
        shared: &Shared,
        token: &str,
    ) -> Result<Outcome> {
        let stage = &self.pipeline.stages[i];
        // Checked at load, and again now: an upstream may have made a symlink since.
        for out in &stage.outs {
            if let Some(why) = self.pipeline.own.refuse_out(out) {
                bail!("{why}; repro will not clear or write it");
            }
        }
        let outcome = self
            .run_and_store(i, key, parts, state, shared, token)
            .unwrap_or_else(|e| Outcome::Failed {
                why: format!("{e:#}"),
                log: None,
            });
        Ok(match outcome {
            Outcome::Failed { why, log } => match self.set_aside(stage) {
                Some(moved) => Outcome::Failed {
                    why: format!("{why}; {moved}"),
                    log,
                },
                None => Outcome::Failed { why, log },
            },
            done => done,
        })
    }

    /// Moves what a failed stage left in its outs to `.repro/failed/STAGE/`; says where.
    fn set_aside(&self, stage: &Stage) -> Option<String> {
        let root = &self.ws.root;
        let left: Vec<&String> = stage
            .outs
            .iter()
            .filter(|o| std::fs::symlink_metadata(root.join(o)).is_ok())
            .collect();
        if left.is_empty() {
            return None;
        }
        let dir = self
            .ws
            .state_dir
            .join("failed")
            .join(crate::workspace::file_safe(&stage.name));
        let _ = remove_path(&dir);
        for out in left {
            let dest = dir.join(out);
            let moved = dest
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|_| std::fs::rename(root.join(out), &dest));
            if moved.is_err() {
                let _ = remove_path(&root.join(out));
            }
        }
        let shown = dir.strip_prefix(root).unwrap_or(&dir).display().to_string();
        Some(format!("what it wrote is not a result: moved to {shown}/"))
    }

    fn run_and_store(
        &self,
        i: usize,
        key: String,
        parts: crate::cache::KeyParts,
        state: &State,
        shared: &Shared,
        token: &str,
    ) -> Result<Outcome> {
        let stage = &self.pipeline.stages[i];
        let root = &self.ws.root;
        // Outs are cleared first, so nothing stale or partial can pass for this run's output;
        // an adopted job's outs are what it wrote, and stay.
        let adopted = self.runner.adopted(&stage.name, &key);
        if !adopted {
            for out in &stage.outs {
                let path = root.join(out);
                remove_path(&path).with_context(|| format!("cannot clear out `{out}`"))?;
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
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
                let context = self.stage_context(i, kind, with, state, shared);
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
            key: key.clone(),
            argv,
            env,
            cwd: root.clone(),
            log: log.clone(),
            resources: stage.resources.clone(),
        };
        let t0 = Instant::now();
        let exit = match adopted {
            true => Exit::Success,
            false => self
                .runner
                .run(&job)
                .with_context(|| format!("cannot start stage `{}`", stage.name))?,
        };
        let shown_log = log.strip_prefix(root).unwrap_or(&log).display().to_string();
        let failed = |why: String| {
            Ok(Outcome::Failed {
                why: format!("{why}; log: {shown_log}"),
                log: Some(log.clone()),
            })
        };
        match exit {
            Exit::Success => {}
            Exit::Code(c) => return failed(format!("exit code {c}")),
            Exit::Signal(s) => return failed(format!("killed by signal {s}")),
            Exit::Failed(why) => return failed(why),
            Exit::Interrupted => {
                return Ok(Outcome::Failed {
                    why: "interrupted".into(),
                    log: None,
                })
            }
            Exit::Cancelled => {
                return Ok(Outcome::Failed {
                    why: "cancelled: another stage failed (--keep-going lets the others run)"
                        .into(),
                    log: None,
                })
            }
        }
        let duration_s = t0.elapsed().as_secs_f64();

        // An out the stage made a link into the store or the state would be restored as one.
        for out in &stage.outs {
            if let Some(why) = self.pipeline.own.refuse_out(out) {
                return failed(format!("{why}: a result may not lead there"));
            }
        }
        // Everything is checked before anything is stored: a stage that exits 0 without all
        // its outs, or with metrics that are not a JSON object, stores nothing.
        let hasher = self.ws.hasher();
        let mut snaps = Vec::new();
        for out in &stage.outs {
            let snap = hasher
                .snapshot(out)
                .with_context(|| format!("cannot hash out `{out}`"))?;
            let Some(snap) = snap else {
                return failed(format!("exited 0 but did not write `{out}`"));
            };
            snaps.push((out, snap));
        }
        let metrics = match &stage.metrics {
            None => None,
            Some(m) => match read_metrics(&root.join(m)) {
                Ok(v) => Some(v),
                Err(e) => return failed(format!("metrics file `{m}` {e}")),
            },
        };
        let mut outs: Vec<OutRecord> = Vec::new();
        for (out, snap) in &snaps {
            outs.push(self.ws.store.put_out(root, out, snap)?);
        }
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
        super::failpoint("stored-objects");
        self.ws.store.put_record(&record)?;
        super::failpoint("stored-record");
        let _ = std::fs::remove_dir_all(&scratch);
        Ok(Outcome::Ran(record))
    }

    /// What a built-in kind is told: its parameters, outs, and its upstream stages' params and
    /// metrics (what a `table` gathers).
    fn stage_context(
        &self,
        i: usize,
        kind: &str,
        with: &serde_json::Map<String, serde_json::Value>,
        state: &State,
        shared: &Shared,
    ) -> serde_json::Value {
        let p = self.pipeline;
        let stage = &p.stages[i];
        let records = shared.records.lock().expect("records");
        let upstream: Vec<serde_json::Value> = p.dag.upstream[i]
            .iter()
            .map(|&u| {
                let up = &p.stages[u];
                let metrics = match &records[u] {
                    Some(r) => r.metrics.clone(),
                    None => state.record(&up.name).and_then(|r| r.metrics),
                };
                json!({
                    "name": up.name,
                    "base": up.base,
                    "params": stage_params(up),
                    "metrics": metrics,
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

/// A metrics file: a JSON object of modest size.
fn read_metrics(path: &std::path::Path) -> Result<serde_json::Value, String> {
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_METRICS_BYTES + 1).read_to_end(&mut text))
        .map_err(|e| format!("cannot be read: {e}"))?;
    if text.len() as u64 > MAX_METRICS_BYTES {
        return Err(format!("is larger than {} MiB", MAX_METRICS_BYTES >> 20));
    }
    match serde_json::from_slice::<serde_json::Value>(&text) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err("is JSON but not an object (`{\"loss\": 1.2, …}`)".into()),
        Err(e) => Err(format!("is not JSON: {e}")),
    }
}
