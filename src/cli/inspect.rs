//! Commands that look at a workspace rather than run it: dag, log, show, verify, gc.

use crate::exec::stage_params;
use crate::pipeline::{Action, Pipeline};
use crate::workspace::{Workspace, STATE_LOST_CONSEQUENCE};
use anyhow::{bail, Result};
use indexmap::{IndexMap, IndexSet};
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
        // Every line of a description under the stage, terminal escapes made visible.
        for line in s.desc.iter().flat_map(|d| d.lines()) {
            out.push_str(&format!("    {}\n", crate::exec::report::visible(line)));
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
        match loaded.state.get(stage) {
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
    super::emit(&std::fs::read(&path)?)?;
    Ok(ExitCode::SUCCESS)
}

/// One stage's row in `repro show`: the stage of the file it expands (the table it goes in),
/// its kind, and its cells by column.
struct Row {
    base: String,
    kind: String,
    cells: IndexMap<String, String>,
}

/// Params and metrics of every stage, one row each: one table per stage of the pipeline file
/// (a matrix stage's expansions share one), or one table of the `columns` asked for, or
/// (`csv_out`) one CSV of every column or of those asked for.
///
/// Grouped by stage rather than by kind: the expansions of one stage have the same params and
/// metrics by construction, so each table is exactly as wide as its stage needs, whereas all
/// shell stages share the kind `cmd` and would again make one table of everyone's columns.
pub fn show(ws: &Workspace, p: &Pipeline, columns: &[String], csv_out: bool) -> Result<ExitCode> {
    let loaded = ws.load_state(&p.file);
    if let Some(bad) = &loaded.problem {
        eprintln!(
            "warning: {}; no results are shown until `repro run` moves it aside and rebuilds it \
             (restoring finished work from the run cache)",
            bad.describe(ws)
        );
    }
    let state = loaded.state;
    let rows: Vec<Row> = p
        .stages
        .iter()
        .map(|s| {
            let mut cells = IndexMap::new();
            cells.insert("stage".to_string(), s.name.clone());
            let record = state.record(&s.name);
            if let Some(r) = &record {
                cells.insert("seconds".into(), format!("{:.2}", r.duration_s));
            }
            let mut beside: IndexMap<String, serde_json::Value> =
                stage_params(s).into_iter().collect();
            beside.insert("stage".into(), s.name.clone().into());
            for (k, v) in &beside {
                cells.insert(k.clone(), crate::pipeline::template::display(v));
            }
            if let Some(r) = record {
                beside.insert("seconds".into(), cells["seconds"].clone().into());
                cells.extend(
                    r.flat_metrics(&beside)
                        .iter()
                        .map(|(k, v)| (k.clone(), crate::pipeline::template::display(v))),
                );
            }
            let kind = match &s.action {
                Action::Cmd { .. } => "cmd".to_string(),
                Action::Uses { kind, .. } => format!("uses {kind}"),
            };
            Row {
                base: s.base.clone(),
                kind,
                cells,
            }
        })
        .collect();
    let all: Vec<&Row> = rows.iter().collect();

    let mut out = Vec::new();
    if !columns.is_empty() {
        let known = union_of_columns(&all);
        let unknown: Vec<&str> = columns
            .iter()
            .filter(|c| !known.contains(c))
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            bail!(
                "--columns: no stage has {}; the columns here are: {}",
                unknown
                    .iter()
                    .map(|c| format!("`{c}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                known.join(", ")
            );
        }
        let mut chosen = vec!["stage".to_string()];
        chosen.extend(columns.iter().filter(|c| *c != "stage").cloned());
        // The stages that have any of the columns asked for (besides their name).
        let picked: Vec<&Row> = rows
            .iter()
            .filter(|r| chosen[1..].iter().any(|c| r.cells.contains_key(c)))
            .collect();
        if csv_out {
            write_csv(&mut out, &chosen, &picked)?;
        } else {
            write_table(&mut out, &chosen, &picked)?;
        }
    } else if csv_out {
        write_csv(&mut out, &union_of_columns(&all), &all)?;
    } else {
        // Stages of the file in order of first appearance.
        let bases: IndexSet<&str> = rows.iter().map(|r| r.base.as_str()).collect();
        for (n, base) in bases.iter().enumerate() {
            let group: Vec<&Row> = rows.iter().filter(|r| r.base == *base).collect();
            if n > 0 {
                writeln!(out)?;
            }
            let plural = if group.len() == 1 { "" } else { "s" };
            let kind = &group[0].kind;
            writeln!(out, "{base} ({kind}, {} stage{plural})", group.len())?;
            write_table(&mut out, &union_of_columns(&group), &group)?;
        }
    }
    super::emit(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// Every column of `rows`, in order of first appearance.
fn union_of_columns(rows: &[&Row]) -> Vec<String> {
    let mut columns: IndexSet<String> = IndexSet::new();
    for r in rows {
        columns.extend(r.cells.keys().cloned());
    }
    columns.into_iter().collect()
}

/// An aligned text table; `-` where a stage has no value.
fn write_table(out: &mut Vec<u8>, columns: &[String], rows: &[&Row]) -> Result<()> {
    let cells: Vec<Vec<&str>> = rows
        .iter()
        .map(|r| {
            columns
                .iter()
                .map(|c| r.cells.get(c).map_or("-", String::as_str))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|j| {
            cells
                .iter()
                .map(|r| r[j].chars().count())
                .chain([columns[j].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |vals: &mut dyn Iterator<Item = &str>| {
        vals.zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{}", line(&mut columns.iter().map(String::as_str)))?;
    for r in &cells {
        writeln!(out, "{}", line(&mut r.iter().copied()))?;
    }
    Ok(())
}

/// CSV; an empty cell where a stage has no value.
fn write_csv(out: &mut Vec<u8>, columns: &[String], rows: &[&Row]) -> Result<()> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record(columns)?;
    for r in rows {
        w.write_record(
            columns
                .iter()
                .map(|c| r.cells.get(c).map_or("", String::as_str)),
        )?;
    }
    w.flush()?;
    Ok(())
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
    // Unreadable records and state files are counted only when there are some, so the line of
    // a clean store stays short.
    let mut summary = format!(
        "checked {} objects ({:.1} MB) in {:.2}s: {} corrupt, {} records incomplete",
        report.objects,
        report.bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64(),
        report.bad_objects.len(),
        report.incomplete.len(),
    );
    if !report.unreadable.is_empty() {
        summary += &format!(", {} records unreadable", report.unreadable.len());
    }
    if !states.is_empty() {
        summary += &format!(", {} state files unreadable", states.len());
    }
    out += &summary;
    out.push('\n');
    super::emit(out.as_bytes())?;
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
        format!("{} records no pipeline here uses, ", report.records_removed)
    } else {
        String::new()
    };
    out += &format!(
        "kept {} records; removed {dropped}{} objects ({:.1} MB) and {} leftover files\n",
        report.records_kept,
        report.objects_removed,
        report.bytes_freed as f64 / 1e6,
        report.leftovers_removed
    );
    super::emit(out.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}
