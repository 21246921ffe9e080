//! Collected gating: every token's router outputs (scores and expert indices, per layer and
//! channel) over a set of stories, captured through the model's routing hooks from the same
//! forward pass that training uses, and the file they are kept in.
//!
//! # `gating.safetensors`
//! Readable with `safetensors.numpy.load_file`. T = tokens collected, C = channels, k = top-k.
//! - `story` u32 [T], `position` u32 [T] (0 is the start-of-story token), `token` u32 [T];
//! - `layer{L}.scores` f32 [T, C, k] (raw product-key scores g) and `layer{L}.indices`
//!   u32 [T, C, k] (expert ids in 0..N), one pair per layer;
//! - `top5` u32 [T, 5] and `top5_logprob` f32 [T, 5]: the model's five likeliest next tokens;
//! - metadata `gating`: JSON `{"layers", "channels", "topk", "experts"}`.

use super::neighbours::Circuits;
use crate::nn::Model;
use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::Path;

pub const TOP: usize = 5;

#[derive(Debug, Clone, PartialEq)]
pub struct Gating {
    pub layers: usize,
    pub channels: usize,
    pub topk: usize,
    pub experts: usize,
    pub story: Vec<u32>,
    pub position: Vec<u32>,
    pub token: Vec<u32>,
    /// Per layer, [T, C, k].
    pub scores: Vec<Vec<f32>>,
    pub indices: Vec<Vec<u32>>,
    pub top5: Vec<u32>,
    pub top5_logprob: Vec<f32>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Shape {
    layers: usize,
    channels: usize,
    topk: usize,
    experts: usize,
}

impl Gating {
    /// Runs `stories` (token ids, without the start token) through `model`, `batch` stories at
    /// a time, each as one row `[bos, story...]` cut to the model's `seq_len`, and keeps the
    /// router outputs of every real position.
    pub fn capture(
        model: &mut Model,
        stories: &[Vec<u32>],
        bos: u32,
        batch: usize,
    ) -> Result<Gating, String> {
        let cfg = model.cfg.clone();
        if !cfg.ffn.is_product_key() {
            return Err(format!(
                "the model's feedforward ({}) has no router to collect",
                cfg.ffn.as_str()
            ));
        }
        let (t, slots, vocab) = (cfg.seq_len, cfg.channels * cfg.topk, cfg.vocab);
        let mut g = Gating {
            layers: cfg.n_layers,
            channels: cfg.channels,
            topk: cfg.topk,
            experts: cfg.experts,
            story: vec![],
            position: vec![],
            token: vec![],
            scores: vec![vec![]; cfg.n_layers],
            indices: vec![vec![]; cfg.n_layers],
            top5: vec![],
            top5_logprob: vec![],
        };
        for (chunk_no, chunk) in stories.chunks(batch.max(1)).enumerate() {
            let mut inputs = vec![bos; chunk.len() * t];
            let mut lens = Vec::with_capacity(chunk.len());
            for (row, story) in chunk.iter().enumerate() {
                let len = (story.len() + 1).min(t);
                inputs[row * t + 1..row * t + len].copy_from_slice(&story[..len - 1]);
                lens.push(len);
            }
            model.forward_logits(&inputs)?;
            for (row, &len) in lens.iter().enumerate() {
                let id = (chunk_no * batch.max(1) + row) as u32;
                for p in 0..len {
                    g.story.push(id);
                    g.position.push(p as u32);
                    g.token.push(inputs[row * t + p]);
                    let logits = &model.logits()[(row * t + p) * vocab..(row * t + p + 1) * vocab];
                    for (i, lp) in top_log_probs(logits, TOP) {
                        g.top5.push(i);
                        g.top5_logprob.push(lp);
                    }
                }
            }
            for l in 0..cfg.n_layers {
                let (scores, indices) = model
                    .last_routing(l)
                    .ok_or_else(|| format!("layer {l} has no router"))?;
                for (row, &len) in lens.iter().enumerate() {
                    let span = row * t * slots..(row * t + len) * slots;
                    g.scores[l].extend_from_slice(&scores[span.clone()]);
                    g.indices[l].extend_from_slice(&indices[span]);
                }
            }
        }
        Ok(g)
    }

    pub fn len(&self) -> usize {
        self.token.len()
    }

    pub fn is_empty(&self) -> bool {
        self.token.is_empty()
    }

    /// The circuits of `rows` in `layer`: each row's gating in the chosen channels as one
    /// sparse vector over channels × experts (expert e of the i-th chosen channel is
    /// `i * experts + e`).
    pub fn circuits(&self, layer: usize, channels: &[usize], rows: &[usize]) -> Circuits {
        let (c, k) = (self.channels, self.topk);
        let mut out = Circuits {
            k: k * channels.len(),
            experts: Vec::with_capacity(rows.len() * k * channels.len()),
            scores: Vec::with_capacity(rows.len() * k * channels.len()),
        };
        for &r in rows {
            for (i, &ch) in channels.iter().enumerate() {
                let span = (r * c + ch) * k..(r * c + ch + 1) * k;
                out.experts.extend(
                    self.indices[layer][span.clone()]
                        .iter()
                        .map(|&e| e + (i * self.experts) as u32),
                );
                out.scores.extend_from_slice(&self.scores[layer][span]);
            }
        }
        out
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let t = self.len();
        let (c, k) = (self.channels, self.topk);
        let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![
            ("story".into(), Dtype::U32, vec![t], le_bytes(&self.story)),
            (
                "position".into(),
                Dtype::U32,
                vec![t],
                le_bytes(&self.position),
            ),
            ("token".into(), Dtype::U32, vec![t], le_bytes(&self.token)),
            (
                "top5".into(),
                Dtype::U32,
                vec![t, TOP],
                le_bytes(&self.top5),
            ),
            (
                "top5_logprob".into(),
                Dtype::F32,
                vec![t, TOP],
                le_bytes(&self.top5_logprob),
            ),
        ];
        for l in 0..self.layers {
            tensors.push((
                format!("layer{l}.scores"),
                Dtype::F32,
                vec![t, c, k],
                le_bytes(&self.scores[l]),
            ));
            tensors.push((
                format!("layer{l}.indices"),
                Dtype::U32,
                vec![t, c, k],
                le_bytes(&self.indices[l]),
            ));
        }
        let views = tensors
            .iter()
            .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let shape = Shape {
            layers: self.layers,
            channels: c,
            topk: k,
            experts: self.experts,
        };
        let meta = HashMap::from([("gating".to_string(), serde_json::to_string(&shape)?)]);
        let bytes = safetensors::serialize(views, Some(meta))?;
        crate::atomic::write(path, &bytes, true)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Reads a file written by [`Gating::save`], checking every tensor's type and shape.
    pub fn load(path: &Path) -> Result<Gating> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let what = || {
            format!(
                "{} (a gating file written by repro's `gating`)",
                path.display()
            )
        };
        let st = SafeTensors::deserialize(&bytes).with_context(what)?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).with_context(what)?;
        let shape: Shape = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("gating"))
            .map(|s| serde_json::from_str(s))
            .transpose()?
            .with_context(|| format!("{}: no `gating` metadata", what()))?;
        let t = st
            .tensor("token")
            .with_context(what)?
            .shape()
            .first()
            .copied()
            .unwrap_or(0);
        let (c, k) = (shape.channels, shape.topk);
        let u32s = |name: &str, dims: &[usize]| read::<u32>(&st, name, Dtype::U32, dims, path);
        let f32s = |name: &str, dims: &[usize]| read::<f32>(&st, name, Dtype::F32, dims, path);
        let mut g = Gating {
            layers: shape.layers,
            channels: c,
            topk: k,
            experts: shape.experts,
            story: u32s("story", &[t])?,
            position: u32s("position", &[t])?,
            token: u32s("token", &[t])?,
            scores: vec![],
            indices: vec![],
            top5: u32s("top5", &[t, TOP])?,
            top5_logprob: f32s("top5_logprob", &[t, TOP])?,
        };
        for l in 0..shape.layers {
            g.scores
                .push(f32s(&format!("layer{l}.scores"), &[t, c, k])?);
            let idx = u32s(&format!("layer{l}.indices"), &[t, c, k])?;
            if let Some(bad) = idx.iter().find(|&&e| e as usize >= shape.experts) {
                bail!(
                    "{}: layer{l}.indices holds expert {bad} of {}",
                    path.display(),
                    shape.experts
                );
            }
            g.indices.push(idx);
        }
        Ok(g)
    }
}

/// The `n` largest log-probabilities of `logits` (softmax), largest first, ties to the lower id.
pub fn top_log_probs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &x) in logits.iter().enumerate() {
        if best.len() < n || x > best[best.len() - 1].1 {
            let at = best.partition_point(|&(_, y)| y >= x);
            best.insert(at, (i as u32, x));
            best.truncate(n);
        }
    }
    best.into_iter()
        .map(|(i, x)| (i, (x as f64 - lse) as f32))
        .collect()
}

trait Pod: Copy {
    fn from_le(b: [u8; 4]) -> Self;
    fn to_le(self) -> [u8; 4];
}

impl Pod for u32 {
    fn from_le(b: [u8; 4]) -> Self {
        u32::from_le_bytes(b)
    }
    fn to_le(self) -> [u8; 4] {
        self.to_le_bytes()
    }
}

impl Pod for f32 {
    fn from_le(b: [u8; 4]) -> Self {
        f32::from_le_bytes(b)
    }
    fn to_le(self) -> [u8; 4] {
        self.to_le_bytes()
    }
}

fn le_bytes<T: Pod>(x: &[T]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le()).collect()
}

fn read<T: Pod>(
    st: &SafeTensors,
    name: &str,
    dtype: Dtype,
    dims: &[usize],
    path: &Path,
) -> Result<Vec<T>> {
    let view = st
        .tensor(name)
        .with_context(|| format!("{}: no tensor `{name}`", path.display()))?;
    ensure!(
        view.dtype() == dtype && view.shape() == dims,
        "{}: tensor `{name}` is {:?} {:?}, expected {dtype:?} {dims:?}",
        path.display(),
        view.dtype(),
        view.shape()
    );
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|b| T::from_le([b[0], b[1], b[2], b[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::testing::fresh_seed;
    use crate::nn::rng::Rng;
    use crate::nn::{FfnKind, ModelConfig};

    fn story_model(seed: u64) -> Model {
        let cfg = ModelConfig {
            vocab: 50,
            d_model: 16,
            n_layers: 2,
            seq_len: 12,
            ffn: FfnKind::Sgatlin,
            channels: 2,
            experts: 16,
            topk: 3,
            d_key: 8,
            d_ffw: 32,
        };
        Model::new(&cfg, seed).unwrap()
    }

    fn stories(rng: &mut Rng, n: usize) -> Vec<Vec<u32>> {
        (0..n)
            .map(|_| {
                let len = 1 + (rng.next_u64() % 20) as usize;
                (0..len).map(|_| 1 + (rng.next_u64() % 49) as u32).collect()
            })
            .collect()
    }

    #[test]
    fn captured_routing_is_what_the_training_forward_used() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        let mut model = story_model(seed);
        let stories = stories(&mut rng, 7);
        let g = Gating::capture(&mut model, &stories, 0, 3).unwrap();
        let t = model.cfg.seq_len;
        let slots = model.cfg.channels * model.cfg.topk;
        // Each story alone, through a training step's forward (forward_backward).
        for (s, story) in stories.iter().enumerate() {
            let mut inputs = vec![0u32; t];
            let len = (story.len() + 1).min(t);
            inputs[1..len].copy_from_slice(&story[..len - 1]);
            model.forward_backward(&inputs, &inputs, None).unwrap();
            let rows: Vec<usize> = (0..g.len()).filter(|&r| g.story[r] == s as u32).collect();
            assert_eq!(
                rows.len(),
                len,
                "seed {seed}: story {s} keeps its real positions"
            );
            for (p, &r) in rows.iter().enumerate() {
                assert_eq!(g.position[r], p as u32);
                assert_eq!(g.token[r], inputs[p]);
                for l in 0..model.cfg.n_layers {
                    let (scores, indices) = model.last_routing(l).unwrap();
                    let want = p * slots..(p + 1) * slots;
                    assert_eq!(
                        &g.indices[l][r * slots..(r + 1) * slots],
                        &indices[want.clone()],
                        "seed {seed}"
                    );
                    for (a, b) in g.scores[l][r * slots..(r + 1) * slots]
                        .iter()
                        .zip(&scores[want])
                    {
                        assert!(
                            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                            "seed {seed}: {a} vs {b}"
                        );
                    }
                }
            }
        }
        // The file keeps every tensor exactly.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gating.safetensors");
        g.save(&path).unwrap();
        assert_eq!(Gating::load(&path).unwrap(), g);
        // Circuits of two channels are disjoint ranges of expert ids.
        let c = g.circuits(1, &[0, 1], &[0, 1]);
        assert_eq!(c.len(), 2);
        assert!(c.get(0).0[..3].iter().all(|&e| e < 16));
        assert!(c.get(0).0[3..].iter().all(|&e| (16..32).contains(&e)));
    }

    #[test]
    fn top_log_probs_are_the_largest_normalised() {
        let logits = [1.0f32, 3.0, 3.0, -2.0, 0.5, 2.0];
        let top = top_log_probs(&logits, 3);
        let lse = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 2, 5], "ties go to the lower id");
        assert!((top[2].1 as f64 - (2.0 - lse)).abs() < 1e-6);
    }

    #[test]
    fn dense_models_have_no_gating_and_bad_files_are_named() {
        let mut cfg = story_model(1).cfg;
        cfg.ffn = FfnKind::Mlp;
        let mut dense = Model::new(&cfg, 1).unwrap();
        let err = Gating::capture(&mut dense, &[vec![1, 2]], 0, 1).unwrap_err();
        assert!(err.contains("no router"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.safetensors");
        std::fs::write(&path, b"not a safetensors file").unwrap();
        let err = format!("{:#}", Gating::load(&path).unwrap_err());
        assert!(err.contains("g.safetensors"), "{err}");
    }
}
