//! Commands that look at a workspace rather than run it: dag, log, show, verify, gc.

use crate::exec::stage_params;
use crate::pipeline::{Action, Pipeline};
use crate::workspace::Workspace;
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::process::ExitCode;

pub fn dag_text(p: &Pipeline) -> String {
    let mut out = String::new();
    for (i, s) in p.stages.iter().enumerate() {
        let what = match &s.action {
            Action::Cmd { resolved, .. } => format!("$ {}", resolved.lines().next().unwrap_or("")),
            Action::Uses { kind, .. } => format!("uses {kind}"),
        };
        out.push_str(&format!("{}  ({what})\n", s.name));
        if let Some(d) = &s.desc {
            out.push_str(&format!("    {d}\n"));
        }
        for &u in &p.dag.upstream[i] {
            out.push_str(&format!("    after {}\n", p.stages[u].name));
        }
    }
    out
}

pub fn log(ws: &Workspace, p: &Pipeline, name: &str) -> Result<ExitCode> {
    let hits = p.select(&[name.to_string()])?;
    if hits.len() > 1 {
        let names: Vec<&str> = hits.iter().map(|&i| p.stages[i].name.as_str()).collect();
        bail!(
            "`{name}` has {} expansions; name one: {}",
            hits.len(),
            names.join(", ")
        );
    }
    let stage = &p.stages[hits[0]].name;
    let latest = ws.log_path(stage);
    let path = if latest.is_file() {
        latest
    } else {
        match ws.load_state(&p.file).stages.get(stage) {
            Some(r) if ws.store.log_path(&r.key).is_file() => ws.store.log_path(&r.key),
            _ => bail!("stage `{stage}` has no log yet (it has not run in this workspace)"),
        }
    };
    std::io::stdout().write_all(&std::fs::read(&path)?)?;
    Ok(ExitCode::SUCCESS)
}

/// Params and metrics of every stage that has a result, one row each.
pub fn show(ws: &Workspace, p: &Pipeline, csv_out: bool) -> Result<ExitCode> {
    let state = ws.load_state(&p.file);
    let mut columns: Vec<String> = vec!["stage".into(), "seconds".into()];
    let mut rows = Vec::new();
    for s in &p.stages {
        let mut row = indexmap::IndexMap::new();
        row.insert("stage".to_string(), s.name.clone());
        let record = state.stages.get(&s.name);
        if let Some(r) = record {
            row.insert("seconds".into(), format!("{:.2}", r.duration_s));
        }
        for (k, v) in stage_params(s) {
            row.insert(k, crate::pipeline::template::display(&v));
        }
        if let Some(r) = record {
            row.extend(
                r.flat_metrics()
                    .iter()
                    .map(|(k, v)| (k.clone(), crate::pipeline::template::display(v))),
            );
        }
        for k in row.keys() {
            if !columns.contains(k) {
                columns.push(k.clone());
            }
        }
        rows.push(row);
    }
    let mut out = std::io::stdout().lock();
    if csv_out {
        let mut w = csv::Writer::from_writer(out);
        w.write_record(&columns)?;
        for r in &rows {
            w.write_record(
                columns
                    .iter()
                    .map(|c| r.get(c).cloned().unwrap_or_default()),
            )?;
        }
        w.flush()?;
    } else {
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                columns
                    .iter()
                    .map(|c| r.get(c).cloned().unwrap_or_else(|| "-".into()))
                    .collect()
            })
            .collect();
        let widths: Vec<usize> = (0..columns.len())
            .map(|j| {
                cells
                    .iter()
                    .map(|r| r[j].len())
                    .chain([columns[j].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |vals: &[String]| {
            vals.iter()
                .zip(&widths)
                .map(|(v, w)| format!("{v:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
        };
        writeln!(out, "{}", line(&columns).trim_end())?;
        for r in &cells {
            writeln!(out, "{}", line(r).trim_end())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Re-hashes every object; corrupt ones are named and set aside, so they are never restored.
pub fn verify(ws: &Workspace) -> Result<ExitCode> {
    let t0 = std::time::Instant::now();
    let objects = ws.store.objects();
    let bad: Vec<(String, &'static str)> = objects
        .par_iter()
        .filter_map(|(hash, path)| {
            let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            match crate::cache::hash::hash_file(path, size) {
                Ok(h) if h.to_hex().as_str() == hash => None,
                Ok(_) => Some((hash.clone(), "corrupt")),
                Err(_) => Some((hash.clone(), "unreadable")),
            }
        })
        .collect();
    let bytes: u64 = objects
        .iter()
        .filter_map(|(_, p)| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    for (hash, problem) in &bad {
        ws.store.quarantine(hash);
        println!(
            "{problem}: object {hash} (moved to {})",
            ws.store.root().join("corrupt").display()
        );
    }
    // Records whose objects are gone can no longer be restored; their stages will run again.
    let mut broken = 0;
    for key in ws.store.record_keys() {
        match ws.store.record(&key) {
            Some(r) => {
                let missing = r
                    .outs
                    .iter()
                    .flat_map(|o| ws.store.objects_of(o))
                    .any(|h| !ws.store.object_path(&h).is_file());
                if missing {
                    broken += 1;
                    println!(
                        "incomplete: record {key} (stage `{}`) lacks objects; it will run again",
                        r.stage
                    );
                }
            }
            None => {
                broken += 1;
                println!("unreadable: record {key}");
            }
        }
    }
    println!(
        "checked {} objects ({:.1} MB) in {:.2}s: {} corrupt, {} records incomplete",
        objects.len(),
        bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64(),
        bad.len(),
        broken
    );
    Ok(if bad.is_empty() && broken == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Removes objects that no kept record references, and writes left in flight.
pub fn gc(ws: &Workspace, workspace_only: bool) -> Result<ExitCode> {
    let _lock = ws.lock(true, |holder| {
        eprintln!("waiting for the workspace lock: {holder}")
    })?;
    let mut keep_records: HashSet<String> = ws.store.record_keys().into_iter().collect();
    if workspace_only {
        let current: HashSet<String> = std::fs::read_dir(ws.state_dir.join("state"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice::<crate::workspace::State>(&b).ok())
            .flat_map(|s| s.stages.into_values().map(|r| r.key))
            .collect();
        for key in keep_records.iter().filter(|k| !current.contains(*k)) {
            let _ = std::fs::remove_file(ws.store.record_path(key));
            let _ = std::fs::remove_file(ws.store.log_path(key));
        }
        keep_records.retain(|k| current.contains(k));
    }
    let referenced: BTreeSet<String> = keep_records
        .iter()
        .filter_map(|k| ws.store.record(k))
        .flat_map(|r| {
            r.outs
                .iter()
                .flat_map(|o| ws.store.objects_of(o))
                .collect::<Vec<_>>()
        })
        .collect();
    let (mut removed, mut freed) = (0, 0u64);
    for (hash, path) in ws.store.objects() {
        if !referenced.contains(&hash) {
            freed += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(&path)?;
            removed += 1;
        }
    }
    for e in std::fs::read_dir(ws.store.root().join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = std::fs::remove_file(e.path());
    }
    println!(
        "kept {} records; removed {removed} objects ({:.1} MB)",
        keep_records.len(),
        freed as f64 / 1e6
    );
    Ok(ExitCode::SUCCESS)
}
