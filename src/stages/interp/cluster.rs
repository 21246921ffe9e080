//! `cluster`: a 2-D map (UMAP from the exact cosine kNN graph) of the circuits of the most
//! frequent tokens, per layer, and how well circuits cluster by input token and by semantic
//! class, in the circuit space and in the map, against shuffled labels.
//!
//! ```text
//! cluster:
//!   uses: cluster
//!   with: {gating: results/stories/gating, classes: pipelines/stories-classes.yaml}
//!   outs: [results/stories/cluster]
//! ```
//!
//! `classes` is a YAML mapping from a class name to its words (`animal: [dog, cat]`); a token
//! belongs to the class of its text without surrounding spaces, compared in lower case. Writes
//! `layer{L}.svg` (the map coloured by input token), `map-layer{L}.csv` (the points) and
//! `clusters.csv`: per layer, space (`circuits` or `map`) and label (`token` or `class`), the
//! mean fraction of each circuit's `k` nearest neighbours sharing its label, and the same with
//! the labels shuffled. Class agreement counts only tokens that have a class; a neighbour
//! without one never agrees.

use super::super::{charts, out_dir, parse_with, within, Progress, StageContext, StageKind};
use super::neighbours::{check_choice, default_channels, read_gating};
use super::{cell, write_csv};
use crate::interp::cluster::{agreement, nearest_2d, shuffled_agreement};
use crate::interp::neighbours::InvertedIndex;
use crate::interp::umap;
use anyhow::{bail, Context, Result};
use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct With {
    gating: String,
    /// A YAML file of classes, or the mapping itself.
    classes: Value,
    /// The most frequent input tokens whose circuits are mapped.
    #[serde(default = "default_tokens")]
    tokens: usize,
    /// Neighbours of the kNN graph (UMAP's n_neighbors) and of the agreement measures.
    #[serde(default = "default_k")]
    k: usize,
    /// At most this many circuits per layer (an even, deterministic subsample).
    #[serde(default = "default_max_points")]
    max_points: usize,
    #[serde(default = "default_channels")]
    channels: Vec<usize>,
    #[serde(default)]
    layers: Option<Vec<usize>>,
    #[serde(default)]
    seed: u64,
}

fn default_tokens() -> usize {
    100
}
fn default_k() -> usize {
    15
}
fn default_max_points() -> usize {
    6000
}

pub struct Cluster;

impl StageKind for Cluster {
    fn name(&self) -> &'static str {
        "cluster"
    }

    fn version(&self) -> &'static str {
        "1"
    }

    fn inputs(&self, with: &Map<String, Value>) -> Result<Vec<String>, String> {
        let w: With = parse_with(with)?;
        within("tokens", w.tokens as u64, 1, 100_000, "a sanity bound")?;
        within("k", w.k as u64, 1, 200, "a sanity bound")?;
        within(
            "max_points",
            w.max_points as u64,
            2,
            200_000,
            "the 2-D neighbour search is quadratic",
        )?;
        if w.channels.is_empty() {
            return Err("with.channels is empty: name at least one channel".into());
        }
        match &w.classes {
            Value::String(path) => Ok(vec![w.gating, path.clone()]),
            inline => {
                parse_classes(&serde_json::to_string(inline).unwrap_or_default())
                    .map_err(|e| format!("with.classes: {e}"))?;
                Ok(vec![w.gating])
            }
        }
    }

    fn run(&self, ctx: &StageContext) -> Result<()> {
        let w: With = parse_with(&ctx.with).map_err(anyhow::Error::msg)?;
        let out = out_dir(ctx)?;
        let (g, texts) = read_gating(&ctx.workspace.join(&w.gating))?;
        let layers = w.layers.clone().unwrap_or_else(|| (0..g.layers).collect());
        check_choice(&g, &layers, &w.channels)?;
        let (class_names, class_of) = match &w.classes {
            Value::String(path) => {
                let path = ctx.workspace.join(path);
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                parse_classes(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            }
            inline => parse_classes(&serde_json::to_string(inline)?)
                .map_err(|e| anyhow::anyhow!("with.classes: {e}"))?,
        };

        // The most frequent input tokens (start tokens left out), ties to the lower id.
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for r in (0..g.len()).filter(|&r| g.position[r] > 0) {
            *counts.entry(g.token[r]).or_default() += 1;
        }
        let mut frequent: Vec<(u32, usize)> = counts.into_iter().collect();
        frequent.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        frequent.truncate(w.tokens);
        let rank: HashMap<u32, u32> = frequent
            .iter()
            .enumerate()
            .map(|(i, &(t, _))| (t, i as u32))
            .collect();
        let all: Vec<usize> = (0..g.len())
            .filter(|&r| g.position[r] > 0 && rank.contains_key(&g.token[r]))
            .collect();
        let step = all.len().div_ceil(w.max_points).max(1);
        let rows: Vec<usize> = all.iter().copied().step_by(step).collect();
        if rows.len() <= w.k {
            bail!(
                "only {} circuits of frequent tokens: fewer than k + 1 = {}",
                rows.len(),
                w.k + 1
            );
        }
        let token_label: Vec<u32> = rows.iter().map(|&r| rank[&g.token[r]]).collect();
        let class_id = |r: usize| {
            class_of
                .get(texts[g.token[r] as usize].trim().to_lowercase().as_str())
                .copied()
        };
        // Tokens without a class get labels of their own, so that they agree with nothing.
        let class_label: Vec<u32> = rows
            .iter()
            .enumerate()
            .map(|(i, &r)| class_id(r).unwrap_or((class_names.len() + i) as u32))
            .collect();
        let classified: Vec<bool> = rows.iter().map(|&r| class_id(r).is_some()).collect();
        let names: Vec<String> = frequent
            .iter()
            .map(|&(t, _)| texts[t as usize].clone())
            .collect();

        let mut table = Vec::new();
        let mut progress = Progress::from_env();
        for (i, &layer) in layers.iter().enumerate() {
            progress.update(i as u64, layers.len() as u64, &format!("layer {layer}"));
            let circuits = g.circuits(layer, &w.channels, &rows);
            let index = InvertedIndex::new(&circuits, g.experts * w.channels.len())
                .map_err(anyhow::Error::msg)?;
            let near = index.nearest(&circuits, w.k, Some);
            // UMAP wants k neighbours each: circuits sharing no expert are at distance 1.
            let (mut idx, mut dist) = (Vec::new(), Vec::new());
            for (q, n) in near.iter().enumerate() {
                idx.extend(n.iter().map(|x| x.index as u32));
                dist.extend(n.iter().map(|x| 1.0 - x.cosine));
                let mut fill =
                    (0..rows.len()).filter(|&j| j != q && !n.iter().any(|x| x.index == j));
                for _ in n.len()..w.k {
                    idx.push(fill.next().expect("more than k circuits") as u32);
                    dist.push(1.0);
                }
            }
            let params = umap::Params {
                seed: w.seed,
                ..Default::default()
            };
            let points = umap::embed(rows.len(), w.k, &idx, &dist, &params);
            let in_space: Vec<Vec<usize>> = near
                .iter()
                .map(|n| n.iter().map(|x| x.index).collect())
                .collect();
            let in_map = nearest_2d(&points, w.k);
            for (space, lists) in [("circuits", &in_space), ("map", &in_map)] {
                let only_classified: Vec<Vec<usize>> = lists
                    .iter()
                    .enumerate()
                    .map(|(q, l)| if classified[q] { l.clone() } else { vec![] })
                    .collect();
                for (label, labels, lists) in [
                    ("token", &token_label, lists),
                    ("class", &class_label, &only_classified),
                ] {
                    let items = lists.iter().filter(|l| !l.is_empty()).count();
                    table.push(vec![
                        layer.to_string(),
                        space.to_string(),
                        label.to_string(),
                        w.k.to_string(),
                        items.to_string(),
                        cell(agreement(lists, labels)),
                        cell(shuffled_agreement(lists, labels, w.seed, 10)),
                    ]);
                }
            }
            let title = format!(
                "layer {layer}: circuits of the {} most frequent tokens ({} contexts), coloured by token",
                frequent.len(),
                rows.len()
            );
            let svg = charts::scatter(&title, &points, &token_label, &names, 20);
            std::fs::write(out.join(format!("layer{layer}.svg")), svg)?;
            let map_rows: Vec<Vec<String>> = rows
                .iter()
                .zip(&points)
                .map(|(&r, p)| {
                    vec![
                        format!("{:.4}", p[0]),
                        format!("{:.4}", p[1]),
                        texts[g.token[r] as usize].clone(),
                        class_id(r).map_or(String::new(), |c| class_names[c as usize].clone()),
                        g.story[r].to_string(),
                        g.position[r].to_string(),
                    ]
                })
                .collect();
            write_csv(
                &out.join(format!("map-layer{layer}.csv")),
                &["x", "y", "token", "class", "story", "position"],
                &map_rows,
            )?;
        }
        write_csv(
            &out.join("clusters.csv"),
            &[
                "layer",
                "space",
                "label",
                "k",
                "items",
                "agreement",
                "shuffled",
            ],
            &table,
        )?;
        for r in &table {
            println!(
                "layer {} {:>8} by {:<5}: {} of {} neighbours agree (shuffled: {})",
                r[0], r[1], r[2], r[5], r[3], r[6]
            );
        }
        Ok(())
    }
}

/// The class names in order, and each word's class, from YAML (or JSON) text.
fn parse_classes(text: &str) -> Result<(Vec<String>, HashMap<String, u32>), String> {
    let classes: IndexMap<String, Vec<String>> = serde_yaml_ng::from_str(text)
        .map_err(|e| format!("expected a mapping from class name to a list of words ({e})"))?;
    let mut of = HashMap::new();
    for (i, (class, words)) in classes.iter().enumerate() {
        for word in words {
            if let Some(prev) = of.insert(word.trim().to_lowercase(), i as u32) {
                let first = classes
                    .get_index(prev as usize)
                    .map_or("", |c| c.0.as_str());
                return Err(format!(
                    "`{word}` is in two classes, `{first}` and `{class}`"
                ));
            }
        }
    }
    if of.is_empty() {
        return Err("no classes".into());
    }
    Ok((classes.keys().cloned().collect(), of))
}
