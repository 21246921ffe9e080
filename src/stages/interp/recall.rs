//! `patch` and `ablate`: factual recall in a story model (SPEC §7), probed with the prompts
//! "<bos> The {noun} was" and read at "was".
//!
//! ```text
//! patch:
//!   uses: patch
//!   with: {models: [models/stories/sgatlin, models/stories/dense], tokens: data/stories/tokens}
//!   outs: [results/stories/patch]
//! ablate:
//!   uses: ablate
//!   with: {model: models/stories/sgatlin, tokens: data/stories/tokens}
//!   outs: [results/stories/ablate]
//! ```
//!
//! `facts` (default: the eight of SPEC §7) maps each noun to its adjective; a noun must be one
//! token. An answer's spellings are " adj" and " Adj", those that are one token (else the first
//! token of " adj"). `layer_sets` defaults to each layer alone and then all layers.
//!
//! `patch` writes `probe.csv` (each model's answer to each fact), `patching.csv` (every ordered
//! pair of facts × layer set: LD clean, counterfactual and patched, recovered effect, rank
//! flip), `summary.csv` (per model and layer set: mean recovered effect and rank-flip rate),
//! `patching.svg` and `summary.json`. A product-key model is patched at its gating, a dense
//! `mlp` at its hidden activations (the nearest analogue). `ablate` writes `ablation.csv` (per
//! layer set, m and fact: log p of the answer clean, without the m experts of largest gate in
//! every channel, and without m random selected ones, averaged over `draws`) and `summary.csv`.

use super::super::{charts, check_keys, out_dir, parse_with, within, StageContext, StageKind};
use super::{cell, corpus_record, load_model, tokenizer, vocabulary_texts, write_csv};
use crate::data::stories::FACTS;
use crate::data::tokenize::TextTokenizer;
use crate::interp::recall::{
    ablate, answer_log_prob, clean_logits, patch, AblationRow, Method, PatchRow, Probe,
};
use crate::nn::Model;
use anyhow::{anyhow, bail, Context, Result};
use indexmap::IndexMap;
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// The parameters of both kinds (each checks that it is given only its own: `PATCH`, `ABLATE`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Common {
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    model: Option<String>,
    /// Experts removed per channel: whole numbers or `all`.
    #[serde(default = "default_ms")]
    m: Vec<Value>,
    #[serde(default = "default_draws")]
    draws: usize,
    #[serde(default)]
    seed: u64,
    tokens: String,
    #[serde(default)]
    facts: Option<IndexMap<String, String>>,
    #[serde(default)]
    layer_sets: Option<Vec<Vec<usize>>>,
    #[serde(default)]
    corpus: Option<String>,
}

impl Common {
    fn check(&self) -> Result<(), String> {
        if self.facts.as_ref().is_some_and(|f| f.len() < 2) {
            return Err("with.facts needs at least two facts (pairs of them are compared)".into());
        }
        if let Some(sets) = &self.layer_sets {
            if sets.is_empty() || sets.iter().any(|s| s.is_empty()) {
                return Err(
                    "with.layer_sets: give non-empty lists of layers, e.g. [[0], [0, 1]]".into(),
                );
            }
        }
        Ok(())
    }

    fn facts(&self) -> Vec<(String, String)> {
        match &self.facts {
            Some(f) => f.iter().map(|(n, a)| (n.clone(), a.clone())).collect(),
            None => FACTS
                .iter()
                .map(|(n, a)| (n.to_string(), a.to_string()))
                .collect(),
        }
    }

    /// The layer sets and their names ("0", "1+2", "all").
    fn layer_sets(&self, layers: usize) -> (Vec<Vec<usize>>, Vec<String>) {
        let all: Vec<usize> = (0..layers).collect();
        let sets = self.layer_sets.clone().unwrap_or_else(|| {
            let mut s: Vec<Vec<usize>> = (0..layers).map(|l| vec![l]).collect();
            if layers > 1 {
                s.push(all.clone());
            }
            s
        });
        let names = sets
            .iter()
            .map(|s| {
                if *s == all && layers > 1 {
                    "all".to_string()
                } else {
                    s.iter()
                        .map(|l| l.to_string())
                        .collect::<Vec<_>>()
                        .join("+")
                }
            })
            .collect();
        (sets, names)
    }
}

/// The probe prompts `[bos] The {noun} was` and the answers' spellings.
fn build_probe(tok: &TextTokenizer, bos: u32, facts: &[(String, String)]) -> Result<Probe> {
    let one = |text: &str| -> Result<Vec<u32>> { tok.encode(text) };
    let (the, was) = (one("The")?, one(" was")?);
    let mut prompts = Vec::new();
    let mut answers: Vec<Vec<u32>> = Vec::new();
    for (noun, adjective) in facts {
        let n = one(&format!(" {noun}"))?;
        if n.len() != 1 {
            bail!(
                "with.facts: the noun `{noun}` is {} tokens; patching needs nouns of one token",
                n.len()
            );
        }
        prompts.push([&[bos][..], &the, &n, &was].concat());
        let capital = adjective[..1].to_uppercase() + &adjective[1..];
        let spellings: Vec<Vec<u32>> = [format!(" {adjective}"), format!(" {capital}")]
            .iter()
            .map(|s| one(s))
            .collect::<Result<_>>()?;
        let mut ids: Vec<u32> = spellings
            .iter()
            .filter(|s| s.len() == 1)
            .map(|s| s[0])
            .collect();
        if ids.is_empty() {
            ids.extend(spellings[0].first());
        }
        ids.dedup();
        if let Some((other, _)) = facts
            .iter()
            .zip(&answers)
            .find(|(_, a)| a.iter().any(|x| ids.contains(x)))
        {
            bail!(
                "with.facts: the answers of `{noun}` and `{}` share a token",
                other.0
            );
        }
        answers.push(ids);
    }
    Ok(Probe {
        prompts,
        noun: 1 + the.len(),
        answers,
    })
}

/// A model rebuilt for the probe's prompt length, and the probe.
fn setup(ctx: &StageContext, common: &Common, model: &str) -> Result<(Model, Probe, Vec<String>)> {
    let tokens = ctx.workspace.join(&common.tokens);
    let (tok, manifest) = tokenizer(&tokens)?;
    let facts = common.facts();
    let probe = build_probe(&tok, manifest.eos_id, &facts)?;
    let model = load_model(&ctx.workspace.join(model), Some(probe.prompts[0].len()))?;
    let texts = vocabulary_texts(&tok, model.cfg.vocab);
    Ok((model, probe, texts))
}

const SHARED: [&str; 4] = ["tokens", "facts", "layer_sets", "corpus"];

/// `with`, given only the fields of `own` and the shared ones.
fn parse_own(with: &Map<String, Value>, own: &[&str]) -> Result<Common, String> {
    check_keys(with, &[own, &SHARED[..]].concat())?;
    let w: Common = parse_with(with)?;
    w.check()?;
    Ok(w)
}

pub struct Patch;
const PATCH: [&str; 1] = ["models"];

impl StageKind for Patch {
    fn name(&self) -> &'static str {
        "patch"
    }

    fn version(&self) -> &'static str {
        "1"
    }

    fn inputs(&self, with: &Map<String, Value>) -> Result<Vec<String>, String> {
        let w = parse_own(with, &PATCH)?;
        if w.models.is_empty() {
            return Err("with.models is empty: name at least one trained model".into());
        }
        let mut inputs = w.models;
        inputs.push(w.tokens);
        inputs.extend(w.corpus);
        Ok(inputs)
    }

    fn run(&self, ctx: &StageContext) -> Result<()> {
        let w = parse_own(&ctx.with, &PATCH).map_err(anyhow::Error::msg)?;
        let out = out_dir(ctx)?;
        let facts = w.facts();
        let (mut probe_rows, mut pair_rows, mut summary_rows) = (vec![], vec![], vec![]);
        let mut chart: Vec<(String, Vec<String>, Vec<Option<f64>>)> = Vec::new();
        let mut accuracy = Map::new();
        for name in &w.models {
            let (mut model, probe, texts) = setup(ctx, &w, name)?;
            let method = Method::for_model(&model).map_err(|e| anyhow!("{name}: {e}"))?;
            let label = format!("{} ({})", model.cfg.ffn.as_str(), method.as_str());
            // The probe: each fact's clean answer.
            let (correct, among) =
                probe_answers(&mut model, &probe, &facts, &texts, name, &mut probe_rows)?;
            accuracy.insert(
                name.clone(),
                json!({"ffn": model.cfg.ffn.as_str(), "top1": correct, "among_facts": among, "facts": facts.len()}),
            );
            println!("{name}: the probe's top answer is right for {correct} of {} facts ({among} rank it first among the facts' answers)", facts.len());
            let (sets, set_names) = w.layer_sets(model.cfg.n_layers);
            let rows =
                patch(&mut model, method, &probe, &sets).map_err(|e| anyhow!("{name}: {e}"))?;
            for r in &rows {
                pair_rows.push(pair_row(name, method, &facts, &set_names, r));
            }
            let mut means = Vec::new();
            for (s, set_name) in set_names.iter().enumerate() {
                let of_set: Vec<&PatchRow> = rows.iter().filter(|r| r.layers == s).collect();
                let recovered: Vec<f64> = of_set.iter().filter_map(|r| r.recovered).collect();
                let mean = (!recovered.is_empty())
                    .then(|| recovered.iter().sum::<f64>() / recovered.len() as f64);
                let flips = of_set.iter().filter(|r| r.rank_flip).count() as f64
                    / of_set.len().max(1) as f64;
                println!(
                    "  layers {set_name:>5}: mean recovered effect {}, rank flips {:.0}%",
                    cell(mean),
                    100.0 * flips
                );
                summary_rows.push(vec![
                    name.clone(),
                    model.cfg.ffn.as_str().into(),
                    method.as_str().into(),
                    set_name.clone(),
                    of_set.len().to_string(),
                    cell(mean),
                    cell(median(&recovered)),
                    cell(Some(flips)),
                ]);
                means.push(mean);
            }
            chart.push((label, set_names, means));
        }
        write_csv(
            &out.join("probe.csv"),
            &[
                "model",
                "noun",
                "answer",
                "top1",
                "top1_correct",
                "first_among_facts",
                "logp_answer",
            ],
            &probe_rows,
        )?;
        write_csv(
            &out.join("patching.csv"),
            &[
                "model",
                "method",
                "layers",
                "clean",
                "counterfactual",
                "ld_clean",
                "ld_counterfactual",
                "ld_patched",
                "recovered_effect",
                "rank_flip",
            ],
            &pair_rows,
        )?;
        write_csv(
            &out.join("summary.csv"),
            &[
                "model",
                "ffn",
                "method",
                "layers",
                "pairs",
                "mean_recovered_effect",
                "median_recovered_effect",
                "rank_flip_rate",
            ],
            &summary_rows,
        )?;
        // One group per layer-set name, in first-seen order; a model without it shows n/a.
        let mut groups: Vec<String> = Vec::new();
        for (_, names, _) in &chart {
            groups.extend(
                names
                    .iter()
                    .filter(|n| !groups.contains(n))
                    .cloned()
                    .collect::<Vec<_>>(),
            );
        }
        let values: Vec<Vec<Option<f64>>> = chart
            .iter()
            .map(|(_, names, means)| {
                groups
                    .iter()
                    .map(|g| names.iter().position(|n| n == g).and_then(|i| means[i]))
                    .collect()
            })
            .collect();
        let series: Vec<String> = chart.iter().map(|c| c.0.clone()).collect();
        let group_labels: Vec<String> = groups.iter().map(|g| format!("layers {g}")).collect();
        let svg = charts::bars(
            "Recall under patching at the noun: mean recovered effect",
            "recovered effect",
            &group_labels,
            &series,
            &values,
        );
        std::fs::write(out.join("patching.svg"), svg)?;
        let summary = json!({
            "facts": facts.iter().map(|(n, a)| json!([n, a])).collect::<Vec<_>>(),
            "probe_accuracy": accuracy,
            "corpus": corpus_record(&ctx.workspace, w.corpus.as_deref())?,
        });
        std::fs::write(
            out.join("summary.json"),
            serde_json::to_vec_pretty(&summary)?,
        )?;
        Ok(())
    }
}

/// Each fact's clean answer: rows for `probe.csv`, and how many facts the model gets right as
/// its top token and as the first among the facts' answers.
fn probe_answers(
    model: &mut Model,
    probe: &Probe,
    facts: &[(String, String)],
    texts: &[String],
    name: &str,
    rows: &mut Vec<Vec<String>>,
) -> Result<(usize, usize)> {
    let clean = clean_logits(model, probe).map_err(|e| anyhow!("{name}: {e}"))?;
    let (mut correct, mut among) = (0, 0);
    for (f, (noun, adjective)) in facts.iter().enumerate() {
        let logits = &clean[f];
        let top = crate::interp::gating::top_log_probs(logits, 1)[0].0;
        let mine = answer_log_prob(logits, &probe.answers[f]);
        let first = probe
            .answers
            .iter()
            .enumerate()
            .all(|(g, a)| g == f || answer_log_prob(logits, a) < mine);
        let right = probe.answers[f].contains(&top);
        correct += right as usize;
        among += first as usize;
        rows.push(vec![
            name.to_string(),
            noun.clone(),
            adjective.clone(),
            texts[top as usize].clone(),
            right.to_string(),
            first.to_string(),
            cell(Some(mine)),
        ]);
    }
    Ok((correct, among))
}

fn pair_row(
    name: &str,
    method: Method,
    facts: &[(String, String)],
    sets: &[String],
    r: &PatchRow,
) -> Vec<String> {
    vec![
        name.to_string(),
        method.as_str().to_string(),
        sets[r.layers].clone(),
        facts[r.clean].0.clone(),
        facts[r.counterfactual].0.clone(),
        cell(Some(r.ld_clean)),
        cell(Some(r.ld_counterfactual)),
        cell(Some(r.ld_patched)),
        cell(r.recovered),
        r.rank_flip.to_string(),
    ]
}

fn median(xs: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

pub struct Ablate;
const ABLATE: [&str; 4] = ["model", "m", "draws", "seed"];

fn default_ms() -> Vec<Value> {
    vec![json!(1), json!(2), json!(4), json!("all")]
}
fn default_draws() -> usize {
    16
}

/// `with.m` as counts (`all` is the model's top-k).
fn ms(values: &[Value], topk: Option<usize>) -> Result<Vec<usize>, String> {
    values
        .iter()
        .map(|v| match (v, v.as_u64()) {
            (_, Some(m)) if m >= 1 => Ok(topk.map_or(m as usize, |k| (m as usize).min(k))),
            (Value::String(s), _) if s == "all" => Ok(topk.unwrap_or(1)),
            _ => Err(format!(
                "with.m: {v} is neither a whole number of experts (at least 1) nor `all`"
            )),
        })
        .collect()
}

impl StageKind for Ablate {
    fn name(&self) -> &'static str {
        "ablate"
    }

    fn version(&self) -> &'static str {
        "1"
    }

    fn inputs(&self, with: &Map<String, Value>) -> Result<Vec<String>, String> {
        let w = parse_own(with, &ABLATE)?;
        let model = w.model.ok_or("with.model is missing (it is required)")?;
        ms(&w.m, None)?;
        within("draws", w.draws as u64, 1, 10_000, "a sanity bound")?;
        Ok([Some(model), Some(w.tokens), w.corpus]
            .into_iter()
            .flatten()
            .collect())
    }

    fn run(&self, ctx: &StageContext) -> Result<()> {
        let w = parse_own(&ctx.with, &ABLATE).map_err(anyhow::Error::msg)?;
        let name = w.model.clone().context("with.model is missing")?;
        let out = out_dir(ctx)?;
        let facts = w.facts();
        let (mut model, probe, _) = setup(ctx, &w, &name)?;
        if !model.cfg.ffn.is_product_key() {
            bail!(
                "{name}: ablation removes selected experts; a {} model has none",
                model.cfg.ffn.as_str()
            );
        }
        let mut m = ms(&w.m, Some(model.cfg.topk)).map_err(anyhow::Error::msg)?;
        m.dedup();
        let (sets, set_names) = w.layer_sets(model.cfg.n_layers);
        let rows = ablate(&mut model, &probe, &sets, &m, w.draws, w.seed)
            .map_err(|e| anyhow!("{name}: {e}"))?;
        let m_name = |m: usize| {
            if m == model.cfg.topk {
                format!("{m} (all)")
            } else {
                m.to_string()
            }
        };
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|r: &AblationRow| {
                vec![
                    set_names[r.layers].clone(),
                    m_name(r.m),
                    facts[r.fact].0.clone(),
                    cell(Some(r.logp_clean)),
                    cell(Some(r.logp_top)),
                    cell(Some(r.logp_random)),
                    cell(Some(r.logp_clean - r.logp_top)),
                    cell(Some(r.logp_clean - r.logp_random)),
                ]
            })
            .collect();
        write_csv(
            &out.join("ablation.csv"),
            &[
                "layers",
                "m",
                "noun",
                "logp_clean",
                "logp_top_removed",
                "logp_random_removed",
                "drop_top",
                "drop_random",
            ],
            &table,
        )?;
        let mut summary = Vec::new();
        for (s, set_name) in set_names.iter().enumerate() {
            for &mm in &m {
                let of: Vec<&AblationRow> =
                    rows.iter().filter(|r| r.layers == s && r.m == mm).collect();
                let mean = |f: &dyn Fn(&AblationRow) -> f64| {
                    of.iter().map(|r| f(r)).sum::<f64>() / of.len().max(1) as f64
                };
                let top = mean(&|r| r.logp_clean - r.logp_top);
                let random = mean(&|r| r.logp_clean - r.logp_random);
                println!("layers {set_name:>5}, m = {:>7}: log p(answer) drops {top:.3} without the top experts, {random:.3} without random ones", m_name(mm));
                summary.push(vec![
                    set_name.clone(),
                    m_name(mm),
                    of.len().to_string(),
                    cell(Some(top)),
                    cell(Some(random)),
                ]);
            }
        }
        write_csv(
            &out.join("summary.csv"),
            &["layers", "m", "facts", "mean_drop_top", "mean_drop_random"],
            &summary,
        )?;
        Ok(())
    }
}
