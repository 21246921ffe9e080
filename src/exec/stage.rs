//! One stage whose upstreams are done: skip it, restore it from the store, or run it and
//! store what it wrote, writing its record last.

use super::plan::{self, Decision};
use super::runner::{Exit, Job};
use super::{stage_params, Executor};
use crate::cache::store::{remove_path, BadObject};
use crate::cache::{OutRecord, Record};
use crate::pipeline::{Action, Stage};
use crate::workspace::State;
use anyhow::{anyhow, Context, Result};
use serde_json::json;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// How a stage ended.
pub(super) enum Outcome {
    Ran(Record),
    Restored(Record),
    Skipped(Record),
    Failed(String),
}

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
