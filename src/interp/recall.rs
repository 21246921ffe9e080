//! Factual recall under intervention (SPEC §7): prompts "<bos> The {noun} was", read at their
//! last position. Gating patching replaces a clean prompt's router outputs at the noun with a
//! counterfactual prompt's, in chosen layers; ablation zeroes the gates of chosen experts at the
//! noun. A dense model gets the nearest analogue of patching: its MLP hidden activations.
//!
//! The model must be built with `seq_len` equal to the prompts' length (weights do not depend
//! on it), so that one row is one prompt.

use super::patching::{log_sum_exp, logit_difference, logsumexp, rank_flip, recovered_effect};
use crate::nn::ffn::{ActivationOverride, RoutingOverride};
use crate::nn::rng::Rng;
use crate::nn::Model;

/// The prompts of the facts, one per fact, all the same length, and each fact's answer
/// spellings (token ids whose logits stand for it).
#[derive(Debug, Clone)]
pub struct Probe {
    pub prompts: Vec<Vec<u32>>,
    /// Where the noun is (the same position in every prompt).
    pub noun: usize,
    pub answers: Vec<Vec<u32>>,
}

/// What is swapped at the noun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Router scores and indices of every channel (product-key kinds).
    Gating,
    /// The MLP's hidden activations (dense `mlp`).
    MlpActivation,
}

impl Method {
    pub fn for_model(model: &Model) -> Result<Method, String> {
        use crate::nn::FfnKind;
        match model.cfg.ffn {
            k if k.is_product_key() => Ok(Method::Gating),
            FfnKind::Mlp => Ok(Method::MlpActivation),
            k => Err(format!(
                "patching needs a product-key model (gating) or a dense mlp (activations), not {}",
                k.as_str()
            )),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Gating => "gating",
            Method::MlpActivation => "mlp-activation",
        }
    }
}

/// One position's intervened state in one layer.
#[derive(Debug, Clone)]
enum Site {
    Routing { scores: Vec<f32>, indices: Vec<u32> },
    Activation(Vec<f32>),
}

/// One ordered pair's patching result.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchRow {
    pub clean: usize,
    pub counterfactual: usize,
    /// Index into the layer sets.
    pub layers: usize,
    pub ld_clean: f64,
    pub ld_counterfactual: f64,
    pub ld_patched: f64,
    pub recovered: Option<f64>,
    pub rank_flip: bool,
}

/// One fact's ablation result for one layer set and m.
#[derive(Debug, Clone, PartialEq)]
pub struct AblationRow {
    pub fact: usize,
    pub layers: usize,
    /// Experts removed per channel (`topk` for all of them).
    pub m: usize,
    pub logp_clean: f64,
    /// log p(answer) with the m experts of largest gate removed in each channel.
    pub logp_top: f64,
    /// The mean of log p(answer) over draws of m random selected experts removed per channel.
    pub logp_random: f64,
}

impl Probe {
    fn check(&self, model: &Model) -> Result<(), String> {
        let t = model.cfg.seq_len;
        if self.prompts.len() < 2 || self.answers.len() != self.prompts.len() {
            return Err("a probe needs at least two facts, each with answers".into());
        }
        if let Some(p) = self.prompts.iter().find(|p| p.len() != t) {
            return Err(format!(
                "prompt of {} tokens for a model built with seq_len {t}",
                p.len()
            ));
        }
        if self.noun >= t {
            return Err(format!("noun position {} is past the prompt", self.noun));
        }
        Ok(())
    }

    fn rows(&self, which: impl Iterator<Item = usize>) -> Vec<u32> {
        which
            .flat_map(|i| self.prompts[i].iter().copied())
            .collect()
    }
}

/// Each prompt's logits at its last position, without intervention.
pub fn clean_logits(model: &mut Model, probe: &Probe) -> Result<Vec<Vec<f32>>, String> {
    probe.check(model)?;
    last_logits(model, &probe.rows(0..probe.prompts.len()))
}

/// The logits at the last position of each row of `inputs`.
fn last_logits(model: &mut Model, inputs: &[u32]) -> Result<Vec<Vec<f32>>, String> {
    model.forward_logits(inputs)?;
    let (t, v) = (model.cfg.seq_len, model.cfg.vocab);
    let rows = inputs.len() / t;
    Ok((0..rows)
        .map(|r| model.logits()[((r + 1) * t - 1) * v..(r + 1) * t * v].to_vec())
        .collect())
}

/// Each prompt's state at the noun, per layer: `[layer][prompt]`.
fn capture(model: &mut Model, method: Method, probe: &Probe) -> Result<Vec<Vec<Site>>, String> {
    let n = probe.prompts.len();
    model.forward_logits(&probe.rows(0..n))?;
    let t = model.cfg.seq_len;
    (0..model.cfg.n_layers)
        .map(|l| {
            (0..n)
                .map(|r| {
                    let at = r * t + probe.noun;
                    match method {
                        Method::Gating => {
                            let (s, i) = model.last_routing(l).ok_or("no router")?;
                            let w = s.len() / (n * t);
                            Ok(Site::Routing {
                                scores: s[at * w..(at + 1) * w].to_vec(),
                                indices: i[at * w..(at + 1) * w].to_vec(),
                            })
                        }
                        Method::MlpActivation => {
                            let a = model.last_activation(l).ok_or("no mlp")?;
                            let w = a.len() / (n * t);
                            Ok(Site::Activation(a[at * w..(at + 1) * w].to_vec()))
                        }
                    }
                })
                .collect()
        })
        .collect()
}

/// Forces `sites[row]` at the noun of each row in `layer` (an empty list clears it).
fn force(model: &mut Model, layer: usize, noun: usize, sites: &[Site]) -> Result<(), String> {
    let t = model.cfg.seq_len;
    let mut routing = Vec::new();
    let mut activation = Vec::new();
    for (row, site) in sites.iter().enumerate() {
        let token = row * t + noun;
        match site {
            Site::Routing { scores, indices } => routing.push(RoutingOverride {
                token,
                scores: scores.clone(),
                indices: indices.clone(),
            }),
            Site::Activation(values) => activation.push(ActivationOverride {
                token,
                values: values.clone(),
            }),
        }
    }
    if model.cfg.ffn.is_product_key() {
        model.set_routing_override(layer, routing)
    } else {
        model.set_activation_override(layer, activation)
    }
}

/// Runs `inputs` with `sites[l]` forced in each layer l of `layers`, then clears them.
fn forced_logits(
    model: &mut Model,
    inputs: &[u32],
    noun: usize,
    layers: &[usize],
    sites: &[Vec<Site>],
) -> Result<Vec<Vec<f32>>, String> {
    for (&l, s) in layers.iter().zip(sites) {
        force(model, l, noun, s)?;
    }
    let out = last_logits(model, inputs);
    for &l in layers {
        force(model, l, noun, &[])?;
    }
    out
}

fn check_layers(model: &Model, layer_sets: &[Vec<usize>]) -> Result<(), String> {
    let n = model.cfg.n_layers;
    match layer_sets.iter().flatten().find(|&&l| l >= n) {
        Some(l) => Err(format!("layer {l} does not exist (the model has {n})")),
        None => Ok(()),
    }
}

/// Gating (or activation) patching for every ordered pair of distinct facts and every layer
/// set.
pub fn patch(
    model: &mut Model,
    method: Method,
    probe: &Probe,
    layer_sets: &[Vec<usize>],
) -> Result<Vec<PatchRow>, String> {
    probe.check(model)?;
    check_layers(model, layer_sets)?;
    let n = probe.prompts.len();
    let clean = clean_logits(model, probe)?;
    let sites = capture(model, method, probe)?;
    let pairs: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
        .collect();
    let mut out = Vec::new();
    for (set, layers) in layer_sets.iter().enumerate() {
        let forced: Vec<Vec<Site>> = layers
            .iter()
            .map(|&l| pairs.iter().map(|&(_, j)| sites[l][j].clone()).collect())
            .collect();
        let inputs = probe.rows(pairs.iter().map(|&(i, _)| i));
        let patched = forced_logits(model, &inputs, probe.noun, layers, &forced)?;
        for (&(i, j), logits) in pairs.iter().zip(&patched) {
            let (a, b) = (&probe.answers[i], &probe.answers[j]);
            let ld_clean = logit_difference(&clean[i], a, b);
            let ld_counterfactual = logit_difference(&clean[j], a, b);
            let ld_patched = logit_difference(logits, a, b);
            out.push(PatchRow {
                clean: i,
                counterfactual: j,
                layers: set,
                ld_clean,
                ld_counterfactual,
                ld_patched,
                recovered: recovered_effect(ld_clean, ld_counterfactual, ld_patched),
                rank_flip: rank_flip(logits, a, b),
            });
        }
    }
    Ok(out)
}

/// log p of an answer: the logsumexp of its spellings' logits minus that of all logits.
pub fn answer_log_prob(logits: &[f32], answer: &[u32]) -> f64 {
    logsumexp(logits, answer) - log_sum_exp(logits.iter().copied())
}

/// The top-m experts by gate, and `draws` sets of m random selected experts, removed (gate set
/// to zero) in every channel at the noun, for each layer set and each m.
pub fn ablate(
    model: &mut Model,
    probe: &Probe,
    layer_sets: &[Vec<usize>],
    ms: &[usize],
    draws: usize,
    seed: u64,
) -> Result<Vec<AblationRow>, String> {
    probe.check(model)?;
    check_layers(model, layer_sets)?;
    let (c, k) = (model.cfg.channels, model.cfg.topk);
    if let Some(&m) = ms.iter().find(|&&m| m == 0 || m > k) {
        return Err(format!(
            "cannot remove {m} of the {k} experts a channel selects"
        ));
    }
    let n = probe.prompts.len();
    let clean = clean_logits(model, probe)?;
    let sites = capture(model, Method::Gating, probe)?;
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for (set, layers) in layer_sets.iter().enumerate() {
        for &m in ms {
            // Rows: each fact with its top-m removed, then each fact once per random draw.
            let choices: Vec<Vec<Vec<usize>>> = (0..n)
                .map(|_| (0..c).map(|_| vec![]).collect())
                .chain(
                    (0..n * draws).map(|_| (0..c).map(|_| random_subset(&mut rng, k, m)).collect()),
                )
                .collect();
            let forced: Vec<Vec<Site>> = layers
                .iter()
                .map(|&l| {
                    choices
                        .iter()
                        .enumerate()
                        .map(|(row, chosen)| {
                            let Site::Routing { scores, indices } = &sites[l][row % n] else {
                                unreachable!("gating sites")
                            };
                            let mut scores = scores.clone();
                            for ch in 0..c {
                                let gates = &mut scores[ch * k..(ch + 1) * k];
                                let drop = if row < n {
                                    top_by_gate(gates, m)
                                } else {
                                    chosen[ch].clone()
                                };
                                drop.into_iter().for_each(|s| gates[s] = 0.0);
                            }
                            Site::Routing {
                                scores,
                                indices: indices.clone(),
                            }
                        })
                        .collect()
                })
                .collect();
            let inputs = probe.rows((0..choices.len()).map(|r| r % n));
            let logits = forced_logits(model, &inputs, probe.noun, layers, &forced)?;
            for f in 0..n {
                let answer = &probe.answers[f];
                let random = (0..draws)
                    .map(|d| answer_log_prob(&logits[n + d * n + f], answer))
                    .sum::<f64>()
                    / draws.max(1) as f64;
                out.push(AblationRow {
                    fact: f,
                    layers: set,
                    m,
                    logp_clean: answer_log_prob(&clean[f], answer),
                    logp_top: answer_log_prob(&logits[f], answer),
                    logp_random: random,
                });
            }
        }
    }
    Ok(out)
}

/// The slots of the m largest gates (ties to the lower slot).
fn top_by_gate(gates: &[f32], m: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..gates.len()).collect();
    order.sort_by(|&a, &b| gates[b].total_cmp(&gates[a]).then(a.cmp(&b)));
    order.truncate(m);
    order
}

/// m distinct slots of 0..k, uniformly.
fn random_subset(rng: &mut Rng, k: usize, m: usize) -> Vec<usize> {
    let mut slots: Vec<usize> = (0..k).collect();
    for i in 0..m {
        let j = i + (rng.next_u64() % (k - i) as u64) as usize;
        slots.swap(i, j);
    }
    slots.truncate(m);
    slots
}

#[cfg(test)]
mod tests {
    //! A hand-built model whose answers depend on the noun only through layer 1's feedforward:
    //! the two nouns' embeddings differ by the sign of one coordinate that the answers'
    //! (tied) unembedding rows do not read and that leaves the norm unchanged; attention is
    //! off (wo = 0) and layer 0's feedforward writes nothing. Patching layer 1 at the noun must
    //! therefore recover all of the effect, and patching layer 0 none of it.
    use super::*;
    use crate::interp::testing::fresh_seed;
    use crate::nn::{FfnKind, ModelConfig};

    const D: usize = 8;

    fn set(model: &mut Model, name: &str, at: &[usize], value: f32) {
        let info = model.table.find(name).unwrap_or_else(|| panic!("{name}"));
        let mut flat = 0;
        for (&i, &n) in at.iter().zip(&info.shape) {
            flat = flat * n + i;
        }
        model.params.host_mut().expect("a cpu model")[info.offset + flat] = value;
    }

    fn zero(model: &mut Model, name: &str) {
        let info = model.table.find(name).unwrap().clone();
        model.params.host_mut().expect("a cpu model")[info.offset..info.offset + info.len]
            .fill(0.0);
    }

    /// Tokens: 0 bos, 1 and 2 the nouns, 3 and 4 their answers, 5..8 others.
    fn hand_built(ffn: FfnKind, seed: u64) -> Model {
        let cfg = ModelConfig {
            vocab: 8,
            d_model: D,
            n_layers: 2,
            seq_len: 2,
            ffn,
            channels: 1,
            experts: 4,
            topk: 1,
            d_key: 2,
            d_ffw: 4,
        };
        // Random weights everywhere else: only the construction may decide the answer.
        let mut m = Model::new(&cfg, seed).unwrap();
        zero(&mut m, "embed");
        for (tok, dims) in [
            (0, vec![(0, 1.0)]),
            (1, vec![(0, 1.0), (1, 1.0)]),
            (2, vec![(0, 1.0), (1, -1.0)]),
            (3, vec![(2, 1.0)]),
            (4, vec![(3, 1.0)]),
            (5, vec![(4, 1.0)]),
            (6, vec![(5, 1.0)]),
            (7, vec![(6, 1.0)]),
        ] {
            for (dim, v) in dims {
                set(&mut m, "embed", &[tok, dim], v);
            }
        }
        for l in 0..2 {
            zero(&mut m, &format!("blocks.{l}.attn.wo"));
        }
        match ffn {
            FfnKind::Mlp => {
                zero(&mut m, "blocks.0.ffn.w2");
                zero(&mut m, "blocks.1.ffn.w1");
                zero(&mut m, "blocks.1.ffn.w2");
                // Hidden unit 0 reads the sign coordinate and writes answer 1's direction.
                set(&mut m, "blocks.1.ffn.w1", &[1, 0], 1.0);
                set(&mut m, "blocks.1.ffn.w2", &[0, 2], 1.0);
            }
            _ => {
                zero(&mut m, "blocks.0.ffn.experts.v");
                for p in ["router.w_key", "router.w_sub", "experts.u", "experts.v"] {
                    zero(&mut m, &format!("blocks.1.ffn.{p}"));
                }
                // Noun 1 selects expert 0 and noun 2 expert 2, with equal scores; both
                // experts read the shared coordinate and write their answer's direction.
                set(&mut m, "blocks.1.ffn.router.w_key", &[1, 0], 1.0);
                set(&mut m, "blocks.1.ffn.router.w_sub", &[0, 0], 1.0);
                set(&mut m, "blocks.1.ffn.router.w_sub", &[0, 1], -1.0);
                for (e, answer_dim) in [(0, 2), (2, 3)] {
                    set(&mut m, "blocks.1.ffn.experts.u", &[0, e, 0], 1.0);
                    set(&mut m, "blocks.1.ffn.experts.v", &[0, e, answer_dim], 1.0);
                }
            }
        }
        m
    }

    fn probe() -> Probe {
        Probe {
            prompts: vec![vec![0, 1], vec![0, 2]],
            noun: 1,
            answers: vec![vec![3], vec![4]],
        }
    }

    #[test]
    fn patching_recovers_all_of_the_effect_where_it_lives_and_none_elsewhere() {
        let seed = fresh_seed();
        for ffn in [FfnKind::Sgatlin, FfnKind::Mlp] {
            let mut model = hand_built(ffn, seed);
            let method = Method::for_model(&model).unwrap();
            let rows = patch(
                &mut model,
                method,
                &probe(),
                &[vec![0], vec![1], vec![0, 1]],
            )
            .unwrap();
            assert_eq!(rows.len(), 6, "2 ordered pairs × 3 layer sets");
            for r in &rows {
                let case = format!("{ffn:?} seed {seed}: {r:?}");
                assert!(
                    r.ld_clean > 0.5 && r.ld_counterfactual < -0.0 || r.clean == 1,
                    "{case}"
                );
                let (want, flip) = if r.layers == 0 {
                    (0.0, false)
                } else {
                    (1.0, true)
                };
                let got = r.recovered.expect(&case);
                assert!((got - want).abs() < 1e-4, "{case}");
                assert_eq!(r.rank_flip, flip, "{case}");
            }
            // Overrides are cleared afterwards: the clean run is back.
            let again = patch(&mut model, method, &probe(), &[vec![0]]).unwrap();
            assert_eq!(again[0].ld_clean, rows[0].ld_clean, "{ffn:?} seed {seed}");
        }
    }

    #[test]
    fn ablation_removes_exactly_the_chosen_experts() {
        let seed = fresh_seed();
        let mut model = hand_built(FfnKind::Sgatlin, seed);
        let rows = ablate(&mut model, &probe(), &[vec![0], vec![1]], &[1], 3, seed).unwrap();
        assert_eq!(rows.len(), 4);
        // Without layer 1's expert the residual at noun 1 is e0 + e1, normalised to 2e0 + 2e1:
        // logits 2 (bos), 4 (noun 1), 0 elsewhere.
        let want = -(2f64.exp() + 4f64.exp() + 6.0).ln();
        for r in &rows {
            let case = format!("seed {seed}: {r:?}");
            if r.layers == 0 {
                assert!((r.logp_top - r.logp_clean).abs() < 1e-6, "{case}");
            } else if r.fact == 0 {
                assert!((r.logp_top - want).abs() < 1e-4, "{case}");
                assert!(r.logp_clean > r.logp_top + 1.0, "{case}");
            }
            // With one expert per channel, a random choice is the top one.
            assert!((r.logp_random - r.logp_top).abs() < 1e-6, "{case}");
        }
        assert!(ablate(&mut model, &probe(), &[vec![1]], &[2], 1, 0).is_err());
        assert!(ablate(&mut model, &probe(), &[vec![2]], &[1], 1, 0).is_err());
    }

    #[test]
    fn top_and_random_choices() {
        assert_eq!(top_by_gate(&[0.5, 2.0, -1.0, 2.0], 2), vec![1, 3]);
        let mut rng = Rng::new(fresh_seed());
        for _ in 0..100 {
            let mut s = random_subset(&mut rng, 8, 3);
            s.sort();
            s.dedup();
            assert_eq!(s.len(), 3);
            assert!(s.iter().all(|&x| x < 8));
        }
    }
}
