//! The interpretability stage kinds (SPEC §7): `gating` collects every token's router outputs
//! over held-out stories; `neighbours` and `cluster` read them; `patch` and `ablate` probe
//! the facts a story model recalls. The analyses themselves live in `crate::interp`.

pub mod cluster;
pub mod gating;
pub mod neighbours;
pub mod recall;

use super::evaluate::{model_from, read_model_config};
use super::train::read_tokens_manifest;
use crate::data::tokenize::{TextTokenizer, TokensManifest};
use crate::nn::Model;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// The tokenizer of a `tokenise` output folder, and its manifest.
fn tokenizer(dir: &Path) -> Result<(TextTokenizer, TokensManifest)> {
    let manifest = read_tokens_manifest(dir)?;
    let tokenizer = match &manifest.tokenizer_file {
        Some(file) => TextTokenizer::load(&dir.join(file))?,
        None => TextTokenizer::gpt2(),
    };
    Ok((tokenizer, manifest))
}

/// The first `count` held-out stories (documents between end-of-text tokens), non-empty.
fn heldout_stories(dir: &Path, manifest: &TokensManifest, count: usize) -> Result<Vec<Vec<u32>>> {
    let shard = crate::data::shards::TokenShard::open(&dir.join(&manifest.heldout.file))?;
    let stories: Vec<Vec<u32>> = shard
        .tokens()
        .split(|&t| t == manifest.eos_id)
        .filter(|s| !s.is_empty())
        .take(count)
        .map(|s| s.to_vec())
        .collect();
    if stories.is_empty() {
        bail!("{}: the held-out split holds no stories", dir.display());
    }
    Ok(stories)
}

/// A trained model (a `train` output folder), rebuilt for sequences of `seq_len` tokens if
/// given (its weights do not depend on it).
fn load_model(dir: &Path, seq_len: Option<usize>) -> Result<Model> {
    let file = dir.join("model.safetensors");
    let mut cfg = read_model_config(&file)?;
    if let Some(t) = seq_len {
        cfg.seq_len = t;
    }
    model_from(&file, &cfg)
}

/// Each token id's text, for tables people read.
fn vocabulary_texts(tokenizer: &TextTokenizer, vocab: usize) -> Vec<String> {
    (0..vocab as u32)
        .map(|id| tokenizer.decode(&[id]).unwrap_or_else(|_| format!("#{id}")))
        .collect()
}

/// Which corpus a run used: the `sources` of a `corpus` output's manifest, if one is named.
fn corpus_record(workspace: &Path, corpus: Option<&str>) -> Result<Value> {
    let Some(dir) = corpus else {
        return Ok(Value::Null);
    };
    let path = workspace.join(dir).join(crate::data::corpus::MANIFEST_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let manifest: Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    Ok(manifest.get("sources").cloned().unwrap_or(manifest))
}

/// Writes `rows` as CSV with a header.
fn write_csv(path: &Path, header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("cannot write {}", path.display()))?;
    w.write_record(header)?;
    for r in rows {
        w.write_record(r)?;
    }
    w.flush()?;
    Ok(())
}

/// A float for a table (empty when absent or not finite).
fn cell(v: Option<f64>) -> String {
    match v {
        // Rounded first, so that a tiny negative value is not printed as "-0.000000".
        Some(x) if x.is_finite() => format!("{:.6}", (x * 1e6).round() / 1e6 + 0.0),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{assert_names_field, StageKind};
    use serde_json::{json, Value};

    /// `base` with `changes` applied must be refused, naming `field`.
    fn refused(kind: &dyn StageKind, base: &Value, changes: Value, field: &str) {
        let mut w = base.as_object().unwrap().clone();
        for (k, v) in changes.as_object().unwrap() {
            w.insert(k.clone(), v.clone());
        }
        let err = kind
            .inputs(&w)
            .expect_err(&format!("{}: {changes} was accepted", kind.name()));
        assert_names_field(&err, field, &format!("{}: {changes}", kind.name()));
    }

    #[test]
    fn every_interpretability_kind_checks_its_fields() {
        use super::recall::{Ablate, Patch};
        use super::{cluster::Cluster, gating::GatingKind, neighbours::Neighbours};
        let gating = json!({"model": "m", "tokens": "t", "corpus": "c"});
        assert_eq!(
            GatingKind.inputs(gating.as_object().unwrap()).unwrap(),
            ["m", "t", "c"]
        );
        for (field, bad) in [
            ("stories", json!(0)),
            ("stories", json!(-1)),
            ("batch", json!(0)),
            ("stories", json!("all")),
            ("model", json!(3)),
            ("modle", json!("m")),
        ] {
            refused(&GatingKind, &gating, json!({ field: bad }), field);
        }
        let neighbours =
            json!({"gating": "g", "targets": [0, 3], "channels": [0, 1], "layers": [1]});
        assert_eq!(
            Neighbours.inputs(neighbours.as_object().unwrap()).unwrap(),
            ["g"]
        );
        for (field, bad) in [
            ("targets", json!([])),
            ("targets", json!([-1])),
            ("top", json!(0)),
            ("context", json!(101)),
            ("channels", json!([])),
            ("layers", json!("all")),
            ("gating", Value::Null),
        ] {
            refused(&Neighbours, &neighbours, json!({ field: bad }), field);
        }
        let cluster = json!({"gating": "g", "classes": "c.yaml", "tokens": 50, "k": 10});
        assert_eq!(
            Cluster.inputs(cluster.as_object().unwrap()).unwrap(),
            ["g", "c.yaml"]
        );
        for (field, bad) in [
            ("tokens", json!(0)),
            ("k", json!(0)),
            ("k", json!(1000)),
            ("max_points", json!(1)),
            ("channels", json!([])),
            ("seed", json!(-2)),
        ] {
            refused(&Cluster, &cluster, json!({ field: bad }), field);
        }
        let patch = json!({"models": ["a", "b"], "tokens": "t", "facts": {"cat": "soft", "dog": "loud"}, "layer_sets": [[0], [0, 1]]});
        assert_eq!(
            Patch.inputs(patch.as_object().unwrap()).unwrap(),
            ["a", "b", "t"]
        );
        for (field, bad) in [
            ("models", json!([])),
            ("facts", json!({"cat": "soft"})),
            ("facts", json!(["cat"])),
            ("layer_sets", json!([[]])),
            ("layer_sets", json!([])),
            ("layer_sets", json!([[-1]])),
            ("tokenz", json!("t")),
        ] {
            refused(&Patch, &patch, json!({ field: bad }), field);
        }
        let ablate = json!({"model": "a", "tokens": "t", "m": [1, "all"], "draws": 4});
        assert_eq!(
            Ablate.inputs(ablate.as_object().unwrap()).unwrap(),
            ["a", "t"]
        );
        for (field, bad) in [
            ("m", json!([0])),
            ("m", json!(["most"])),
            ("m", json!([1.5])),
            ("draws", json!(0)),
            ("model", json!(["a"])),
            ("mm", json!(1)),
        ] {
            refused(&Ablate, &ablate, json!({ field: bad }), field);
        }
    }
}
