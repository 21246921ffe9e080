//! `table`: gathers the params and metrics of upstream stages (every expansion of a matrix
//! stage) into one CSV file, one row per stage.
//!
//! ```text
//! results:
//!   uses: table
//!   needs: [train]
//!   with: {from: [train], columns: [ffn, budget, loss], sort: [budget, loss]}
//!   outs: [results/isoflop.csv]
//! ```
//!
//! Without `columns`, the columns are `stage`, then every param, then every metric (nested
//! metrics flattened as `a.b`), in order of first appearance. With `best: loss` and
//! `group: [budget, ffn]`, only the row with the lowest `loss` of each group is kept.

use super::{check_keys, StageContext, StageKind};
use crate::cache::metric_columns;
use anyhow::{bail, Context, Result};
use indexmap::IndexMap;
use serde_json::{Map, Value};
use std::cmp::Ordering;

pub struct Table;

impl StageKind for Table {
    fn name(&self) -> &'static str {
        "table"
    }

    fn version(&self) -> &'static str {
        // 2: an upstream's input paths are no longer params, so a metric of the same name
        // (train's `tokens`) keeps its name.
        "2"
    }

    fn inputs(&self, with: &Map<String, Value>) -> Result<Vec<String>, String> {
        check_keys(with, &["from", "columns", "sort", "group", "best"])?;
        if with.get("best").is_some_and(|b| !b.is_string()) {
            return Err("`with.best` must be a column name".into());
        }
        for key in ["from", "columns", "sort", "group"] {
            if let Some(v) = with.get(key) {
                if !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
                    return Err(format!("`with.{key}` must be a list of names"));
                }
            }
        }
        Ok(Vec::new())
    }

    fn run(&self, ctx: &StageContext) -> Result<()> {
        let names = |key: &str| -> Vec<String> {
            ctx.with
                .get(key)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let from = names("from");
        let csv_out = ctx
            .outs
            .iter()
            .find(|o| o.ends_with(".csv"))
            .context("a table stage needs an out ending in .csv")?;
        let mut rows: Vec<IndexMap<String, Value>> = Vec::new();
        for up in ctx
            .upstream
            .iter()
            .filter(|u| from.is_empty() || from.contains(&u.base) || from.contains(&u.name))
        {
            let mut row = IndexMap::new();
            row.insert("stage".to_string(), Value::String(up.name.clone()));
            for (k, v) in &up.params {
                row.insert(k.clone(), v.clone());
            }
            if let Some(m) = &up.metrics {
                let cols = metric_columns(m, &row);
                row.extend(cols);
            }
            rows.push(row);
        }
        if rows.is_empty() {
            bail!("no upstream stages to tabulate (add them to `needs`)");
        }
        if let Some(best) = ctx.with.get("best").and_then(Value::as_str) {
            rows = best_per_group(rows, &names("group"), best);
        }
        let mut columns = names("columns");
        if columns.is_empty() {
            for row in &rows {
                for k in row.keys() {
                    if !columns.contains(k) {
                        columns.push(k.clone());
                    }
                }
            }
        }
        // A column (or sort key) no row has is a typo, not an empty column.
        for c in columns.iter().chain(names("sort").iter()) {
            if !rows.iter().any(|r| r.contains_key(c)) {
                let mut known: Vec<&String> = rows.iter().flat_map(|r| r.keys()).collect();
                known.sort();
                known.dedup();
                let known: Vec<&str> = known.iter().map(|k| k.as_str()).collect();
                bail!(
                    "no upstream row has a column `{c}` (columns: {})",
                    known.join(", ")
                );
            }
        }
        let sort = names("sort");
        rows.sort_by(|a, b| {
            sort.iter()
                .map(|k| compare(a.get(k), b.get(k)))
                .find(|o| o.is_ne())
                .unwrap_or(Ordering::Equal)
        });

        let path = ctx.workspace.join(csv_out);
        let mut w = csv::Writer::from_path(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        w.write_record(&columns)?;
        for row in &rows {
            w.write_record(
                columns
                    .iter()
                    .map(|c| row.get(c).map(cell).unwrap_or_default()),
            )?;
        }
        w.flush()?;
        Ok(())
    }
}

/// For each combination of the `group` columns, the row with the lowest `best` value.
fn best_per_group(
    rows: Vec<IndexMap<String, Value>>,
    group: &[String],
    best: &str,
) -> Vec<IndexMap<String, Value>> {
    let mut winners: IndexMap<Vec<String>, IndexMap<String, Value>> = IndexMap::new();
    for row in rows {
        let Some(score) = row.get(best).and_then(Value::as_f64) else {
            continue;
        };
        let key: Vec<String> = group
            .iter()
            .map(|g| row.get(g).map(cell).unwrap_or_default())
            .collect();
        let better = winners
            .get(&key)
            .and_then(|w| w.get(best))
            .and_then(Value::as_f64)
            .is_none_or(|old| score < old);
        if better {
            winners.insert(key, row);
        }
    }
    winners.into_values().collect()
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        other => crate::pipeline::template::display(other),
    }
}

/// Numbers numerically, then text; missing values last.
fn compare(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x
            .as_f64()
            .partial_cmp(&y.as_f64())
            .unwrap_or(Ordering::Equal),
        (Some(x), Some(y)) => cell(x).cmp(&cell(y)),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}
