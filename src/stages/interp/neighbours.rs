//! `neighbours`: for each token of chosen target stories, its nearest reference circuits
//! (exact cosine, through an inverted index over expert ids) among the other collected
//! stories, with ±`context` tokens around each.
//!
//! ```text
//! neighbours:
//!   uses: neighbours
//!   with: {gating: results/stories/gating, targets: [0, 1], top: 20, context: 5}
//!   outs: [results/stories/neighbours]
//! ```
//!
//! A circuit is a token's gating in one layer, over `channels` (default: channel 0, as SPEC §7
//! defines it; several channels are joined into one sparse vector). Writes `neighbours.csv`
//! and `neighbours.txt`, a readable view with the token marked `⟦ ⟧` in its context.

use super::super::{out_dir, parse_with, within, Progress, StageContext, StageKind};
use super::gating::{GATING_FILE, VOCAB_FILE};
use super::{cell, write_csv};
use crate::interp::gating::Gating;
use crate::interp::neighbours::InvertedIndex;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::fmt::Write;
use std::path::Path;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct With {
    gating: String,
    #[serde(default = "default_targets")]
    targets: Vec<u32>,
    #[serde(default = "default_top")]
    top: usize,
    #[serde(default = "default_context")]
    context: usize,
    #[serde(default = "default_channels")]
    channels: Vec<usize>,
    /// Default: every layer.
    #[serde(default)]
    layers: Option<Vec<usize>>,
}

fn default_targets() -> Vec<u32> {
    vec![0]
}
fn default_top() -> usize {
    20
}
fn default_context() -> usize {
    5
}
pub(super) fn default_channels() -> Vec<usize> {
    vec![0]
}

impl With {
    fn check(&self) -> Result<(), String> {
        within("top", self.top as u64, 1, 1000, "a sanity bound")?;
        within("context", self.context as u64, 0, 100, "a sanity bound")?;
        if self.targets.is_empty() {
            return Err("with.targets is empty: name at least one story".into());
        }
        if self.channels.is_empty() {
            return Err("with.channels is empty: name at least one channel".into());
        }
        Ok(())
    }
}

/// The collected gating and each token id's text.
pub(super) fn read_gating(dir: &Path) -> Result<(Gating, Vec<String>)> {
    let g = Gating::load(&dir.join(GATING_FILE))?;
    let path = dir.join(VOCAB_FILE);
    let texts: Vec<String> = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{} is not a JSON list of strings", path.display()))?;
    if let Some(&t) = g.token.iter().find(|&&t| t as usize >= texts.len()) {
        bail!(
            "{}: token {t} has no text in {}",
            dir.display(),
            path.display()
        );
    }
    Ok((g, texts))
}

/// Checks layer and channel choices against the collected gating.
pub(super) fn check_choice(g: &Gating, layers: &[usize], channels: &[usize]) -> Result<()> {
    if let Some(l) = layers.iter().find(|&&l| l >= g.layers) {
        bail!(
            "with.layers: layer {l} does not exist (the gating has {})",
            g.layers
        );
    }
    if let Some(c) = channels.iter().find(|&&c| c >= g.channels) {
        bail!(
            "with.channels: channel {c} does not exist (the gating has {})",
            g.channels
        );
    }
    Ok(())
}

pub struct Neighbours;

impl StageKind for Neighbours {
    fn name(&self) -> &'static str {
        "neighbours"
    }

    fn version(&self) -> &'static str {
        "1"
    }

    fn inputs(&self, with: &Map<String, Value>) -> Result<Vec<String>, String> {
        let w: With = parse_with(with)?;
        w.check()?;
        Ok(vec![w.gating])
    }

    fn run(&self, ctx: &StageContext) -> Result<()> {
        let w: With = parse_with(&ctx.with).map_err(anyhow::Error::msg)?;
        let out = out_dir(ctx)?;
        let (g, texts) = read_gating(&ctx.workspace.join(&w.gating))?;
        let layers = w.layers.clone().unwrap_or_else(|| (0..g.layers).collect());
        check_choice(&g, &layers, &w.channels)?;
        let stories = g.story.iter().max().map_or(0, |&s| s + 1);
        if let Some(t) = w.targets.iter().find(|&&t| t >= stories) {
            bail!("with.targets: story {t} was not collected ({stories} stories, numbered from 0)");
        }
        // Position 0 is the start token, the same in every story: not a circuit of interest.
        let (queries, refs): (Vec<usize>, Vec<usize>) = (0..g.len())
            .filter(|&r| g.position[r] > 0)
            .partition(|&r| w.targets.contains(&g.story[r]));
        let mut starts = vec![usize::MAX; stories as usize];
        for r in (0..g.len()).rev() {
            starts[g.story[r] as usize] = r;
        }
        let context = |r: usize| -> String {
            let (s, p) = (g.story[r], g.position[r] as usize);
            let first = starts[s as usize];
            let mut text = String::new();
            for q in p.saturating_sub(w.context)..=p + w.context {
                let row = first + q;
                if q == 0 || row >= g.len() || g.story[row] != s {
                    continue;
                }
                let t = texts[g.token[row] as usize].replace('\n', "⏎");
                if q == p {
                    let _ = write!(text, "⟦{t}⟧");
                } else {
                    text.push_str(&t);
                }
            }
            text
        };
        let mut rows = Vec::new();
        let mut view = String::new();
        let mut progress = Progress::from_env();
        for (i, &layer) in layers.iter().enumerate() {
            progress.update(i as u64, layers.len() as u64, &format!("layer {layer}"));
            let reference = g.circuits(layer, &w.channels, &refs);
            let index = InvertedIndex::new(&reference, g.experts * w.channels.len())
                .map_err(anyhow::Error::msg)?;
            let found = index.nearest(&g.circuits(layer, &w.channels, &queries), w.top, |_| None);
            let _ = writeln!(view, "# layer {layer}, channels {:?}\n", w.channels);
            for (&q, near) in queries.iter().zip(&found) {
                let _ = writeln!(
                    view,
                    "story {} position {}: {}",
                    g.story[q],
                    g.position[q],
                    context(q)
                );
                for (rank, n) in near.iter().enumerate() {
                    let r = refs[n.index];
                    let _ = writeln!(view, "  {:.3}  {}", n.cosine, context(r));
                    rows.push(vec![
                        layer.to_string(),
                        g.story[q].to_string(),
                        g.position[q].to_string(),
                        texts[g.token[q] as usize].clone(),
                        (rank + 1).to_string(),
                        cell(Some(n.cosine as f64)),
                        g.story[r].to_string(),
                        g.position[r].to_string(),
                        texts[g.token[r] as usize].clone(),
                        context(r),
                    ]);
                }
                view.push('\n');
            }
        }
        write_csv(
            &out.join("neighbours.csv"),
            &[
                "layer",
                "story",
                "position",
                "token",
                "rank",
                "cosine",
                "neighbour_story",
                "neighbour_position",
                "neighbour_token",
                "neighbour_context",
            ],
            &rows,
        )?;
        std::fs::write(out.join("neighbours.txt"), view)?;
        println!(
            "{} target tokens × {} layers: their {} nearest among {} reference circuits",
            queries.len(),
            layers.len(),
            w.top,
            refs.len()
        );
        Ok(())
    }
}
