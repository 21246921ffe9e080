//! Commands that look at a workspace rather than run it: dag, log, show, verify, gc.

use crate::exec::stage_params;
use crate::pipeline::{Action, Pipeline};
use crate::workspace::{Workspace, STATE_LOST_CONSEQUENCE};
use anyhow::{bail, Result};
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
        let loaded = ws.load_state(&p.file);
        match loaded.state.stages.get(stage) {
            Some(r) if ws.store.log_path(&r.key).is_file() => ws.store.log_path(&r.key),
            _ => match &loaded.problem {
                Some(bad) => bail!(
                    "stage `{stage}` has no log in .repro/logs, and {} so its last run is unknown",
                    bad.describe(ws)
                ),
                None => bail!("stage `{stage}` has no log yet (it has not run in this workspace)"),
            },
        }
    };
    std::io::stdout().write_all(&std::fs::read(&path)?)?;
    Ok(ExitCode::SUCCESS)
}

/// Params and metrics of every stage that has a result, one row each.
pub fn show(ws: &Workspace, p: &Pipeline, csv_out: bool) -> Result<ExitCode> {
    let loaded = ws.load_state(&p.file);
    if let Some(bad) = &loaded.problem {
        eprintln!(
            "warning: {}; no results are shown until `repro run` moves it aside and rebuilds it \
             (restoring finished work from the run cache)",
            bad.describe(ws)
        );
    }
    let state = loaded.state;
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

/// Re-hashes every object and reads every record and state file; prints what was wrong and
/// what repro did about it. Exit 1 if anything was.
pub fn verify(ws: &Workspace) -> Result<ExitCode> {
    let t0 = std::time::Instant::now();
    let report = ws.store.verify();
    let states: Vec<(std::path::PathBuf, String)> = ws
        .state_files()
        .into_iter()
        .filter_map(|(path, state)| state.err().map(|e| (path, e)))
        .collect();
    let set_aside = |r: &Result<std::path::PathBuf, String>| match r {
        Ok(dest) => format!("moved to {}", ws.shown(dest)),
        Err(e) => format!("could not be moved aside: {e}"),
    };
    let mut out = String::new();
    for b in &report.bad_objects {
        out += &format!(
            "{}: object {}: {}; a stage that needs it runs again\n",
            b.problem,
            b.hash,
            set_aside(&b.set_aside)
        );
    }
    for r in &report.incomplete {
        out += &format!(
            "incomplete: record {} (stage `{}`) lacks {} object(s); it will run again\n",
            r.key, r.stage, r.missing
        );
    }
    for u in &report.unreadable {
        out += &format!(
            "unreadable: record {} is {}: {}; its stage runs again and writes a new one\n",
            u.record.key,
            u.record.problem,
            set_aside(&u.set_aside)
        );
    }
    for (path, problem) in &states {
        out += &format!(
            "unreadable: state file {} is {problem}: left in place; the next `repro run` of its \
             pipeline moves it aside, and {STATE_LOST_CONSEQUENCE}\n",
            ws.shown(path)
        );
    }
    out += &format!(
        "checked {} objects ({:.1} MB) in {:.2}s: {} corrupt, {} records incomplete, {} records \
         unreadable, {} state files unreadable\n",
        report.objects,
        report.bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64(),
        report.bad_objects.len(),
        report.incomplete.len(),
        report.unreadable.len(),
        states.len()
    );
    print!("{out}");
    Ok(if report.is_clean() && states.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Removes objects that no kept record references, and leftovers; with `workspace_only`, first
/// drops the records that no pipeline state of this workspace uses.
pub fn gc(ws: &Workspace, workspace_only: bool) -> Result<ExitCode> {
    let _lock = ws.lock(true, |holder| {
        eprintln!("waiting for the workspace lock: {holder}")
    })?;
    let keep = if workspace_only {
        Some(ws.keys_in_use()?)
    } else {
        None
    };
    let report = ws.store.gc(keep.as_ref())?;
    let mut out = String::new();
    for u in &report.unreadable {
        out += &format!(
            "unreadable: record {} is {}; kept, but objects only it refers to were removed \
             (`repro verify` sets it aside)\n",
            u.key, u.problem
        );
    }
    let dropped = if workspace_only {
        format!(", dropped {} no pipeline here uses", report.records_removed)
    } else {
        String::new()
    };
    out += &format!(
        "kept {} records{dropped}; removed {} objects ({:.1} MB) and {} leftover files\n",
        report.records_kept,
        report.objects_removed,
        report.bytes_freed as f64 / 1e6,
        report.leftovers_removed
    );
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}
