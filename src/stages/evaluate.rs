//! `evaluate`: held-out loss and perplexity of a trained model, and for sparse kinds the
//! expert usage (fraction of experts ever selected, unevenness of the gate mass). Its metrics
//! also carry the model's training metrics, so one row says everything about a run.
//!
//! ```text
//! evaluate:
//!   uses: evaluate
//!   with: {model: models/sgatlin-0.5, tokens: data/tokens, max_tokens: 200000}
//!   metrics: results/eval-sgatlin-0.5.json
//! ```

use super::train::read_tokens_manifest;
use super::{parse_with, Progress, StageContext, StageKind};
use crate::data::shards::{eval_batches, TokenShard};
use crate::nn::{checkpoint, Model, ModelConfig};
use anyhow::{anyhow, Context, Result};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::path::Path;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct With {
    model: String,
    tokens: String,
    #[serde(default = "default_batch")]
    batch: usize,
    /// Evaluate on at most this many held-out tokens (default: all of them).
    #[serde(default)]
    max_tokens: Option<usize>,
}

fn default_batch() -> usize {
    16
}

pub struct Evaluate;

impl StageKind for Evaluate {
    fn name(&self) -> &'static str {
        "evaluate"
    }

    fn version(&self) -> &'static str {
        "1"
    }

    fn inputs(&self, with: &Map<String, Value>) -> Result<Vec<String>, String> {
        let w: With = parse_with(with)?;
        if w.batch == 0 {
            return Err("with.batch must be positive".into());
        }
        Ok(vec![w.model, w.tokens])
    }

    fn run(&self, ctx: &StageContext) -> Result<()> {
        let w: With = parse_with(&ctx.with).map_err(anyhow::Error::msg)?;
        let metrics_path = ctx
            .metrics
            .as_ref()
            .context("an evaluate stage needs `metrics:` (a JSON file to write)")?;
        let model_dir = ctx.workspace.join(&w.model);
        let mut model = load_model(&model_dir.join("model.safetensors"))?;
        let tokens_dir = ctx.workspace.join(&w.tokens);
        let manifest = read_tokens_manifest(&tokens_dir)?;
        let shard = TokenShard::open(&tokens_dir.join(&manifest.heldout.file))?;
        let t = model.cfg.seq_len;
        let usable = w.max_tokens.map_or(shard.len(), |m| m.min(shard.len()));
        let tokens = &shard.tokens()[..usable];
        anyhow::ensure!(
            tokens.len() > t,
            "held-out split has {} tokens, fewer than one window of {}",
            tokens.len(),
            t + 1
        );

        model.collect_gate_stats = true;
        model.reset_gate_stats();
        let (mut sum, mut count) = (0.0f64, 0usize);
        let total = tokens.len() / (w.batch * t).max(1) + 1;
        let mut progress = Progress::from_env();
        for (i, batch) in eval_batches(tokens, w.batch, t).enumerate() {
            let out = model
                .loss(&batch.inputs, &batch.targets, manifest.pad_id)
                .map_err(|e| anyhow!(e))?;
            sum += out.loss * out.tokens as f64;
            count += out.tokens;
            progress.update(
                i as u64 + 1,
                total as u64,
                &format!("loss {:.3}", sum / count.max(1) as f64),
            );
        }
        let loss = sum / count.max(1) as f64;
        anyhow::ensure!(loss.is_finite(), "held-out loss is {loss}");
        let usage: Vec<Value> = model
            .gate_stats()
            .iter()
            .enumerate()
            .filter_map(|(layer, s)| s.map(|s| json!({"layer": layer, "fraction_used": s.fraction_used(), "unevenness": s.unevenness()})))
            .collect();
        let mean = |key: &str| -> Option<f64> {
            (!usage.is_empty()).then(|| {
                usage.iter().filter_map(|u| u[key].as_f64()).sum::<f64>() / usage.len() as f64
            })
        };
        let mut metrics = std::fs::read(model_dir.join("train.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Map<String, Value>>(&b).ok())
            .unwrap_or_default();
        metrics.remove("model_config");
        metrics.insert("heldout_loss".into(), json!(loss));
        metrics.insert("perplexity".into(), json!(loss.exp()));
        metrics.insert("heldout_tokens".into(), json!(count));
        metrics.insert("experts_used".into(), json!(mean("fraction_used")));
        metrics.insert("unevenness".into(), json!(mean("unevenness")));
        metrics.insert("usage_by_layer".into(), Value::Array(usage));
        println!(
            "held-out loss {loss:.4} (perplexity {:.2}) over {count} tokens",
            loss.exp()
        );
        std::fs::write(
            ctx.workspace.join(metrics_path),
            serde_json::to_vec_pretty(&metrics)?,
        )?;
        Ok(())
    }
}

/// A model from weights exported by `train` (its config travels in the file's metadata).
pub fn load_model(path: &Path) -> Result<Model> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not safetensors", path.display()))?;
    let cfg_text = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("model_config").cloned())
        .with_context(|| {
            format!(
                "{} has no model_config metadata (not written by repro's train)",
                path.display()
            )
        })?;
    let cfg: ModelConfig = serde_json::from_str(&cfg_text)?;
    let mut model = Model::new(&cfg, 0).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let (mut bufs, _) = checkpoint::load(path, &model.table, &[""])?;
    model.params = bufs.remove(0);
    Ok(model)
}
