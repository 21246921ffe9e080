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
use super::train::MAX_SIZE;
use super::{
    check_memory, parse_max_memory, parse_with, within, MemoryCheck, Progress, StageContext,
    StageKind,
};
use crate::data::shards::{eval_batches, TokenShard};
use crate::nn::{checkpoint, memory, Model, ModelConfig};
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
    /// Refuse to start when the estimated peak memory exceeds this size (`8G`, `512M`; a bare
    /// number is MiB). Without it, the limit is the memory available when the stage starts.
    #[serde(default)]
    max_memory: Option<Value>,
}

const LOWER: &str = "with.batch";

impl With {
    fn check(&self) -> Result<(), String> {
        within(
            "batch",
            self.batch as u64,
            1,
            MAX_SIZE as u64,
            "a sanity bound",
        )?;
        if let Some(m) = self.max_tokens {
            within("max_tokens", m as u64, 1, u64::MAX, "")?;
        }
        parse_max_memory(self.max_memory.as_ref())?;
        Ok(())
    }
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

    fn not_in_key(&self) -> &'static [&'static str] {
        &["max_memory"]
    }

    fn inputs(&self, with: &Map<String, Value>) -> Result<Vec<String>, String> {
        let w: With = parse_with(with)?;
        w.check()?;
        Ok(vec![w.model, w.tokens])
    }

    fn run(&self, ctx: &StageContext) -> Result<()> {
        let w: With = parse_with(&ctx.with).map_err(anyhow::Error::msg)?;
        let metrics_path = ctx
            .metrics
            .as_ref()
            .context("an evaluate stage needs `metrics:` (a JSON file to write)")?;
        w.check().map_err(anyhow::Error::msg)?;
        let model_dir = ctx.workspace.join(&w.model);
        let model_file = model_dir.join("model.safetensors");
        let cfg = read_model_config(&model_file)?;
        let tokens_dir = ctx.workspace.join(&w.tokens);
        let manifest = read_tokens_manifest(&tokens_dir)?;
        let shard = TokenShard::open(&tokens_dir.join(&manifest.heldout.file))?;
        let t = cfg.seq_len;
        let usable = w.max_tokens.map_or(shard.len(), |m| m.min(shard.len()));
        let tokens = &shard.tokens()[..usable];
        anyhow::ensure!(
            tokens.len() > t,
            "held-out split has {} tokens, fewer than one window of {}",
            tokens.len(),
            t.saturating_add(1)
        );
        // Before the model is allocated: it and one batch's activations must fit.
        let windows = (tokens.len() - 1) / t;
        check_memory(
            "evaluation",
            &memory::eval_estimate(&cfg, w.batch.min(windows)),
            parse_max_memory(w.max_memory.as_ref()).map_err(anyhow::Error::msg)?,
            MemoryCheck::Run,
            LOWER,
        )
        .map_err(anyhow::Error::msg)?;
        let mut model = model_from(&model_file, &cfg)?;

        model.collect_gate_stats = true;
        model.reset_gate_stats();
        let (mut sum, mut count) = (0.0f64, 0usize);
        let total = windows.div_ceil(w.batch);
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

/// The model config of weights exported by `train` (it travels in the file's metadata).
pub(super) fn read_model_config(path: &Path) -> Result<ModelConfig> {
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
    let cfg: ModelConfig = serde_json::from_str(&cfg_text)
        .with_context(|| format!("{}: bad model_config metadata", path.display()))?;
    cfg.validate()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(cfg)
}

/// The model of `cfg` with the weights of `path`.
pub(super) fn model_from(path: &Path, cfg: &ModelConfig) -> Result<Model> {
    let mut model = Model::new(cfg, 0).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let (bufs, _) = checkpoint::load(path, &model.table, &[""])?;
    model.set_params(&bufs[0]).map_err(|e| anyhow!(e))?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(changes: Value, field: &str) -> String {
        let mut w = json!({"model": "models/m", "tokens": "data/tokens"})
            .as_object()
            .unwrap()
            .clone();
        for (k, v) in changes.as_object().unwrap() {
            w.insert(k.clone(), v.clone());
        }
        let err = Evaluate
            .inputs(&w)
            .expect_err(&format!("{changes} was accepted"));
        crate::stages::assert_names_field(&err, field, &changes.to_string());
        err
    }

    #[test]
    fn every_field_is_checked() {
        let ok = json!({"model": "m", "tokens": "t", "batch": 4, "max_tokens": 1000, "max_memory": "2G"});
        assert_eq!(
            Evaluate.inputs(ok.as_object().unwrap()).unwrap(),
            vec!["m".to_string(), "t".to_string()]
        );
        for bad in [
            json!(0),
            json!(-1),
            json!((1u64 << 20) + 1),
            json!(u64::MAX),
            json!(1e6),
            Value::Null,
            json!("8"),
        ] {
            refused(json!({ "batch": bad }), "batch");
        }
        for bad in [json!(0), json!(-1), json!(2.5), Value::Null] {
            refused(json!({ "max_tokens": bad }), "max_tokens");
        }
        for bad in [
            json!(0),
            json!("0M"),
            json!("-2G"),
            json!("much"),
            Value::Null,
        ] {
            refused(json!({ "max_memory": bad }), "max_memory");
        }
        refused(json!({"model": 3}), "model");
        refused(json!({"modle": "m"}), "modle");
    }
}
