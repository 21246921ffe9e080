//! `gating`: every token's router scores and expert indices, per layer and channel, over the
//! first held-out stories, with the model's five likeliest next tokens.
//!
//! ```text
//! gating:
//!   uses: gating
//!   with: {model: models/stories/sgatlin, tokens: data/stories/tokens, stories: 128}
//!   outs: [results/stories/gating]
//! ```
//!
//! Writes `gating.safetensors` (layout in `crate::interp::gating`), `tokens.csv` (one row per
//! collected token: row, story, position, token id and text, top-5 predictions), `vocab.json`
//! (each token id's text) and `gating.json` (what was collected, from which corpus).

use super::super::{out_dir, parse_with, within, Progress, StageContext, StageKind};
use super::{corpus_record, heldout_stories, load_model, tokenizer, vocabulary_texts, write_csv};
use crate::interp::gating::{Gating, TOP};
use anyhow::{anyhow, Result};
use serde::Deserialize;
use serde_json::{json, Map, Value};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct With {
    model: String,
    tokens: String,
    #[serde(default = "default_stories")]
    stories: usize,
    #[serde(default = "default_batch")]
    batch: usize,
    /// The `corpus` output the tokens came from, named in the results.
    #[serde(default)]
    corpus: Option<String>,
}

fn default_stories() -> usize {
    128
}

fn default_batch() -> usize {
    8
}

pub struct GatingKind;

pub const GATING_FILE: &str = "gating.safetensors";
pub const VOCAB_FILE: &str = "vocab.json";

impl StageKind for GatingKind {
    fn name(&self) -> &'static str {
        "gating"
    }

    fn version(&self) -> &'static str {
        "1"
    }

    fn not_in_key(&self) -> &'static [&'static str] {
        &["batch"]
    }

    fn inputs(&self, with: &Map<String, Value>) -> Result<Vec<String>, String> {
        let w: With = parse_with(with)?;
        within("stories", w.stories as u64, 1, 1 << 20, "a sanity bound")?;
        within("batch", w.batch as u64, 1, 4096, "a sanity bound")?;
        Ok([Some(w.model), Some(w.tokens), w.corpus]
            .into_iter()
            .flatten()
            .collect())
    }

    fn run(&self, ctx: &StageContext) -> Result<()> {
        let w: With = parse_with(&ctx.with).map_err(anyhow::Error::msg)?;
        let out = out_dir(ctx)?;
        let tokens_dir = ctx.workspace.join(&w.tokens);
        let (tok, manifest) = tokenizer(&tokens_dir)?;
        let stories = heldout_stories(&tokens_dir, &manifest, w.stories)?;
        let mut model = load_model(&ctx.workspace.join(&w.model), None)?;
        let mut progress = Progress::from_env();
        progress.message(&format!(
            "collecting the gating of {} stories",
            stories.len()
        ));
        let g = Gating::capture(&mut model, &stories, manifest.eos_id, w.batch)
            .map_err(|e| anyhow!("{}: {e}", w.model))?;
        g.save(&out.join(GATING_FILE))?;
        let texts = vocabulary_texts(&tok, model.cfg.vocab);
        std::fs::write(out.join(VOCAB_FILE), serde_json::to_vec(&texts)?)?;
        let rows: Vec<Vec<String>> = (0..g.len())
            .map(|r| {
                let top: Vec<String> = (0..TOP)
                    .map(|i| {
                        let (id, lp) = (g.top5[r * TOP + i], g.top5_logprob[r * TOP + i]);
                        format!("{:?} {lp:.2}", texts[id as usize])
                    })
                    .collect();
                vec![
                    r.to_string(),
                    g.story[r].to_string(),
                    g.position[r].to_string(),
                    g.token[r].to_string(),
                    texts[g.token[r] as usize].clone(),
                    top.join(" | "),
                ]
            })
            .collect();
        write_csv(
            &out.join("tokens.csv"),
            &["row", "story", "position", "token", "text", "top5_next"],
            &rows,
        )?;
        let truncated = stories
            .iter()
            .filter(|s| s.len() + 1 > model.cfg.seq_len)
            .count();
        let summary = json!({
            "model": w.model,
            "ffn": model.cfg.ffn.as_str(),
            "stories": stories.len(),
            "stories_cut_to_seq_len": truncated,
            "tokens": g.len(),
            "layers": g.layers,
            "channels": g.channels,
            "topk": g.topk,
            "experts": g.experts,
            "corpus": corpus_record(&ctx.workspace, w.corpus.as_deref())?,
        });
        std::fs::write(
            out.join("gating.json"),
            serde_json::to_vec_pretty(&summary)?,
        )?;
        println!(
            "collected {} tokens of {} held-out stories ({} layers × {} channels × top-{})",
            g.len(),
            stories.len(),
            g.layers,
            g.channels,
            g.topk
        );
        Ok(())
    }
}
