//! The trainer: model + AdamW + schedule + step counter + rng, one batch per `step`.

use super::backend::Backend;
use super::checkpoint;
use super::config::ModelConfig;
use super::model::{host_or_copy, Model};
use super::optim::{clip_scale, AdamW, AdamWConfig, Schedule};
use super::profile::{Profile, Profiled};
use super::rng::Rng;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Training hyper-parameters; fields left out of a serialised config take the SPEC §4 defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub lr: f64,
    pub adamw: AdamWConfig,
    /// Global-norm clip (1.0; 2.0 for the story model); 0 disables.
    pub clip: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// Targets equal to this id are masked out of the loss.
    pub pad_id: Option<u32>,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 1e-3,
            adamw: AdamWConfig::default(),
            clip: 1.0,
            warmup_steps: 1000,
            total_steps: 1000,
            pad_id: None,
            seed: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The step just taken (0-based).
    pub step: u64,
    pub loss: f64,
    /// Before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    /// Target tokens counted in the loss.
    pub tokens: usize,
}

pub struct Trainer {
    pub model: Model,
    pub opt: AdamW,
    pub schedule: Schedule,
    pub cfg: TrainConfig,
    /// Steps taken so far.
    pub step: u64,
    pub rng: Rng,
    inputs: Vec<u32>,
    targets: Vec<u32>,
}

impl Trainer {
    pub fn new(model_cfg: &ModelConfig, cfg: TrainConfig) -> Result<Trainer> {
        Trainer::with_backend(model_cfg, cfg, Arc::new(super::cpu::CpuBackend::default()))
    }

    /// Like `new`, on the given backend (e.g. a `profile::Profiled` one).
    pub fn with_backend(
        model_cfg: &ModelConfig,
        cfg: TrainConfig,
        backend: Arc<dyn Backend>,
    ) -> Result<Trainer> {
        let mut rng = Rng::new(cfg.seed);
        let model = Model::with_backend(model_cfg, backend, &mut rng).map_err(|e| anyhow!(e))?;
        // The moments are allocated fallibly: a model too large for memory is an error.
        let opt = AdamW::new(cfg.adamw.clone(), model.backend(), model.params.len())
            .map_err(|e| anyhow!(e))?;
        let schedule = Schedule::new(cfg.lr, cfg.total_steps, cfg.warmup_steps);
        Ok(Trainer {
            model,
            opt,
            schedule,
            cfg,
            step: 0,
            rng,
            inputs: vec![],
            targets: vec![],
        })
    }

    /// Splits rows of seq_len + 1 tokens into inputs and next-token targets.
    fn split_rows(&mut self, batch: &[u32]) -> Result<()> {
        let t = self.model.cfg.seq_len;
        if batch.is_empty() || !batch.len().is_multiple_of(t + 1) {
            bail!(
                "batch of {} tokens is not a positive multiple of seq_len + 1 = {}",
                batch.len(),
                t + 1
            );
        }
        self.inputs.clear();
        self.targets.clear();
        for row in batch.chunks(t + 1) {
            self.inputs.extend_from_slice(&row[..t]);
            self.targets.extend_from_slice(&row[1..]);
        }
        Ok(())
    }

    /// One optimisation step on `batch` (B rows of seq_len + 1 tokens).
    pub fn step(&mut self, batch: &[u32]) -> Result<StepStats> {
        self.split_rows(batch)?;
        let out = self
            .model
            .forward_backward(&self.inputs, &self.targets, self.cfg.pad_id)
            .map_err(|e| anyhow!("step {}: {e}", self.step))?;
        if !out.loss.is_finite() {
            bail!("step {}: loss is {} (diverged)", self.step, out.loss);
        }
        let norm = self
            .model
            .grad_norm()
            .map_err(|e| anyhow!("step {}: {e}", self.step))?;
        if !norm.is_finite() {
            bail!("step {}: gradient norm is {} (diverged)", self.step, norm);
        }
        let lr = self.schedule.lr(self.step);
        self.model
            .optimizer_step(&mut self.opt, lr as f32, clip_scale(norm, self.cfg.clip))
            .map_err(|e| anyhow!("step {}: {e}", self.step))?;
        let stats = StepStats {
            step: self.step,
            loss: out.loss,
            grad_norm: norm,
            lr,
            tokens: out.tokens,
        };
        self.step += 1;
        Ok(stats)
    }

    /// Token-weighted mean loss over held-out batches (rows of seq_len + 1 tokens).
    pub fn eval_loss(&mut self, batches: &[&[u32]]) -> Result<f64> {
        let (mut sum, mut count) = (0.0f64, 0usize);
        for b in batches {
            self.split_rows(b)?;
            let out = self
                .model
                .loss(&self.inputs, &self.targets, self.cfg.pad_id)
                .map_err(|e| anyhow!(e))?;
            sum += out.loss * out.tokens as f64;
            count += out.tokens;
        }
        if count == 0 {
            bail!("evaluation batches hold no counted tokens");
        }
        Ok(sum / count as f64)
    }

    fn metadata(&self) -> Result<HashMap<String, String>> {
        let mut m = HashMap::new();
        m.insert("format".into(), "repro-nn-checkpoint-1".into());
        m.insert(
            "model_config".into(),
            serde_json::to_string(&self.model.cfg)?,
        );
        m.insert("train_config".into(), serde_json::to_string(&self.cfg)?);
        m.insert("step".into(), self.step.to_string());
        m.insert("adam_t".into(), self.opt.t.to_string());
        let rng: Vec<String> = self.rng.state().iter().map(|x| x.to_string()).collect();
        m.insert("rng".into(), rng.join(","));
        Ok(m)
    }

    /// Weights, optimiser moments, step and rng state: enough to resume bit-exactly.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let (m, v) = (host_or_copy(&self.opt.m), host_or_copy(&self.opt.v));
        let bufs: [(&str, &[f32]); 3] = [
            ("", &self.model.param_values()),
            ("optim.m.", &m),
            ("optim.v.", &v),
        ];
        checkpoint::save(path, &self.model.table, &bufs, self.metadata()?)
    }

    /// Weights only, named like `blocks.0.attn.wq`, with the model config in the metadata.
    pub fn export_weights(&self, path: &Path) -> Result<()> {
        let mut m = HashMap::new();
        m.insert(
            "model_config".into(),
            serde_json::to_string(&self.model.cfg)?,
        );
        checkpoint::save(
            path,
            &self.model.table,
            &[("", &self.model.param_values())],
            m,
        )
    }

    pub fn load_checkpoint(path: &Path) -> Result<Trainer> {
        Trainer::load_checkpoint_on(path, Arc::new(super::cpu::CpuBackend::default()))
    }

    /// Resumes a checkpoint on the given backend (any device: checkpoints are host files).
    pub fn load_checkpoint_on(path: &Path, backend: Arc<dyn Backend>) -> Result<Trainer> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| anyhow!("checkpoint {} lacks metadata `{k}`", path.display()))
        };
        let model_cfg: ModelConfig = serde_json::from_str(get("model_config")?)?;
        let cfg: TrainConfig = serde_json::from_str(get("train_config")?)?;
        let mut tr = Trainer::with_backend(&model_cfg, cfg, backend)?;
        let (bufs, _) = checkpoint::load(path, &tr.model.table, &["", "optim.m.", "optim.v."])?;
        tr.model.set_params(&bufs[0]).map_err(|e| anyhow!(e))?;
        tr.opt.m.upload(&bufs[1]);
        tr.opt.v.upload(&bufs[2]);
        tr.step = get("step")?.parse()?;
        tr.opt.t = get("adam_t")?.parse()?;
        let words: Vec<u64> = get("rng")?
            .split(',')
            .map(|w| w.parse())
            .collect::<Result<_, _>>()?;
        let state: [u64; 4] = words
            .try_into()
            .map_err(|_| anyhow!("checkpoint rng state must be 4 words"))?;
        tr.rng = Rng::from_state(state);
        Ok(tr)
    }
}

/// Training throughput on random tokens: (tokens per second of forward + backward + AdamW,
/// bytes held by parameters, gradients, moments and activation buffers).
pub fn bench_train(cfg: &ModelConfig, batch: usize, steps: usize) -> Result<(f64, usize)> {
    let b = bench_train_with(cfg, batch, steps, false)?;
    Ok((b.tokens_per_s, b.bytes))
}

/// What `bench_train_with` measured.
#[derive(Clone, Debug)]
pub struct TrainBench {
    /// Tokens per second of forward + backward + AdamW over the timed steps.
    pub tokens_per_s: f64,
    /// Bytes held by parameters, gradients, moments and activation buffers.
    pub bytes: usize,
    /// Per-op times of the timed steps, when asked for.
    pub profile: Option<Profile>,
}

/// `bench_train`, optionally on a `Profiled` CPU backend (the timed steps only; the warm-up
/// step is left out of the profile). Without `profile` the trainer runs on the bare backend.
pub fn bench_train_with(
    cfg: &ModelConfig,
    batch: usize,
    steps: usize,
    profile: bool,
) -> Result<TrainBench> {
    let tc = TrainConfig {
        total_steps: (steps as u64 + 1).max(10),
        warmup_steps: 1,
        ..TrainConfig::default()
    };
    let (mut tr, times) = if profile {
        let be = Profiled::new(super::cpu::CpuBackend::default());
        let times = be.stats();
        (Trainer::with_backend(cfg, tc, Arc::new(be))?, Some(times))
    } else {
        (Trainer::new(cfg, tc)?, None)
    };
    let mut rng = Rng::new(12345);
    let data: Vec<u32> = (0..batch * (cfg.seq_len + 1))
        .map(|_| (rng.next_u64() % cfg.vocab as u64) as u32)
        .collect();
    tr.step(&data)?; // warm the buffers
    if let Some(t) = &times {
        t.reset();
    }
    let t0 = std::time::Instant::now();
    for _ in 0..steps {
        tr.step(&data)?;
    }
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    let tokens = (steps * batch * cfg.seq_len) as f64;
    let bytes = tr.model.allocated_bytes() + tr.opt.m.bytes() + tr.opt.v.bytes();
    Ok(TrainBench {
        tokens_per_s: tokens / secs,
        bytes,
        profile: times.map(|t| Profile {
            steps,
            step_secs: secs,
            ops: t.snapshot(),
        }),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::nn::config::FfnKind;

    /// A tiny model of each kind, small enough for exhaustive checks.
    pub(crate) fn tiny(ffn: FfnKind) -> ModelConfig {
        let (channels, experts, topk, d_ffw) = match ffn {
            FfnKind::Mlp | FfnKind::Swiglu => (1, 0, 0, 64),
            FfnKind::Moe => (1, 4, 2, 32),
            _ => (2, 16, 2, 0),
        };
        ModelConfig {
            vocab: 64,
            d_model: 32,
            n_layers: 2,
            seq_len: 8,
            ffn,
            channels,
            experts,
            topk,
            d_key: 8,
            d_ffw,
        }
    }

    /// Rows of a periodic pattern at shifting offsets.
    pub(crate) fn pattern_batch(step: usize, rows: usize, seq: usize) -> Vec<u32> {
        let period = [3u32, 14, 15, 9, 2, 6, 5, 35, 8, 9, 7];
        let mut out = Vec::new();
        for r in 0..rows {
            for t in 0..=seq {
                out.push(period[(step * 7 + r * 3 + t) % period.len()]);
            }
        }
        out
    }

    pub(crate) fn train_cfg(total: u64) -> TrainConfig {
        TrainConfig {
            lr: 1e-2,
            warmup_steps: 5,
            total_steps: total,
            seed: 7,
            ..TrainConfig::default()
        }
    }

    #[test]
    fn training_decreases_loss_on_a_repeated_pattern() {
        for kind in FfnKind::ALL {
            let mut tr = Trainer::new(&tiny(kind), train_cfg(50)).unwrap();
            let first = tr.step(&pattern_batch(0, 4, 8)).unwrap().loss;
            let mut last = first;
            for s in 1..50 {
                last = tr.step(&pattern_batch(s, 4, 8)).unwrap().loss;
            }
            assert!(
                last < 0.3 * first,
                "{}: loss {first} -> {last}",
                kind.as_str()
            );
        }
    }

    #[test]
    fn training_is_deterministic_and_resumes_bitwise() {
        let dir = tempfile::tempdir().unwrap();
        for kind in [FfnKind::Sgatlin, FfnKind::Peer, FfnKind::Moe] {
            let cfg = tiny(kind);
            let run = |steps: usize| {
                let mut tr = Trainer::new(&cfg, train_cfg(8)).unwrap();
                let losses: Vec<f64> = (0..steps)
                    .map(|s| tr.step(&pattern_batch(s, 3, 8)).unwrap().loss)
                    .collect();
                (tr, losses)
            };
            let (a, la) = run(8);
            let (b, lb) = run(8);
            assert_eq!(la, lb, "{}: losses differ between runs", kind.as_str());
            assert!(
                a.model.param_values() == b.model.param_values(),
                "{}: weights differ between runs",
                kind.as_str()
            );

            let (c, _) = run(4);
            let path = dir.path().join(format!("{}.safetensors", kind.as_str()));
            c.save_checkpoint(&path).unwrap();
            drop(c);
            let mut r = Trainer::load_checkpoint(&path).unwrap();
            assert_eq!(r.step, 4);
            let lr: Vec<f64> = (4..8)
                .map(|s| r.step(&pattern_batch(s, 3, 8)).unwrap().loss)
                .collect();
            assert_eq!(
                lr,
                la[4..].to_vec(),
                "{}: resumed losses differ",
                kind.as_str()
            );
            let same = a
                .model
                .param_values()
                .iter()
                .zip(r.model.param_values().iter())
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "{}: resumed weights are not bitwise identical",
                kind.as_str()
            );
            assert!(a.opt.m.to_vec() == r.opt.m.to_vec() && a.opt.v.to_vec() == r.opt.v.to_vec());
        }
    }

    #[test]
    fn training_is_bitwise_identical_across_thread_counts() {
        // Large enough that gemm takes its threaded path (m * n * k >= 48^3).
        let cfg = ModelConfig {
            d_model: 64,
            seq_len: 32,
            ..tiny(FfnKind::Sgatlin)
        };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut tr = Trainer::new(&cfg, train_cfg(4)).unwrap();
                let losses: Vec<f64> = (0..3)
                    .map(|s| tr.step(&pattern_batch(s, 4, 32)).unwrap().loss)
                    .collect();
                (losses, tr.model.param_values().to_vec())
            })
        };
        let (l1, p1) = run(1);
        let (l3, p3) = run(3);
        assert_eq!(l1, l3);
        assert!(
            p1.iter().zip(&p3).all(|(a, b)| a.to_bits() == b.to_bits()),
            "weights depend on the thread count"
        );
    }

    #[test]
    fn every_instruction_set_trains_deterministically_and_close_to_the_others() {
        use crate::nn::cpu::Isa;
        for kind in FfnKind::ALL {
            let cfg = tiny(kind);
            let run = |isa: Isa| {
                isa.scoped(|| {
                    let mut tr = Trainer::new(&cfg, train_cfg(30)).unwrap();
                    let losses: Vec<f64> = (0..30)
                        .map(|s| tr.step(&pattern_batch(s, 4, 8)).unwrap().loss)
                        .collect();
                    (losses, tr.model.param_values().to_vec())
                })
            };
            let (scalar, _) = run(Isa::Scalar);
            for isa in Isa::supported_all() {
                let (a, pa) = run(isa);
                let (b, pb) = run(isa);
                assert!(
                    a == b && pa == pb,
                    "{kind:?} on {isa:?} is not deterministic"
                );
                // Paths round differently (FMA, gemm's tiles), and training amplifies it a
                // little; after 30 steps the loss still agrees closely.
                let worst = a
                    .iter()
                    .zip(&scalar)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max);
                eprintln!("{kind:?} {isa:?}: largest loss difference from scalar {worst:.2e}");
                assert!(worst < 2e-3, "{kind:?} on {isa:?}: loss differs by {worst}");
            }
        }
    }

    #[test]
    fn weights_export_uses_pytorch_style_names() {
        let dir = tempfile::tempdir().unwrap();
        let tr = Trainer::new(&tiny(FfnKind::Sgatlin), train_cfg(8)).unwrap();
        let path = dir.path().join("w.safetensors");
        tr.export_weights(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let wq = st.tensor("blocks.0.attn.wq").unwrap();
        assert_eq!(wq.shape(), &[32, 32]);
        assert!(st.tensor("blocks.1.ffn.experts.u").is_ok());
        assert!(st.tensor("optim.m.embed").is_err());
    }

    #[test]
    fn train_config_fills_missing_fields_with_spec_defaults() {
        let c: TrainConfig = serde_json::from_str(r#"{"total_steps": 500, "clip": 2.0}"#).unwrap();
        assert_eq!(
            (c.total_steps, c.clip, c.lr, c.adamw.weight_decay),
            (500, 2.0, 1e-3, 0.1)
        );
        assert!(serde_json::from_str::<TrainConfig>(r#"{"learning_rate": 1.0}"#).is_err());
    }

    #[test]
    fn config_parameter_count_matches_the_built_model() {
        for kind in FfnKind::ALL {
            for cfg in [tiny(kind), ModelConfig::ladder(kind, 0.5, 500, 16)] {
                let m = crate::nn::Model::new(&cfg, 0).unwrap();
                assert_eq!(m.table.total, cfg.total_params(), "{}", kind.as_str());
                assert!(cfg.active_params_per_token() <= cfg.total_params());
            }
        }
    }

    #[test]
    fn nan_loss_is_reported_with_its_step() {
        let mut tr = Trainer::new(&tiny(FfnKind::Mlp), train_cfg(8)).unwrap();
        tr.step(&pattern_batch(0, 2, 8)).unwrap();
        tr.model.params.host_mut().unwrap()[0] = f32::NAN;
        let err = tr.step(&pattern_batch(1, 2, 8)).unwrap_err().to_string();
        assert!(err.contains("step 1"), "{err}");
    }

    #[test]
    fn padding_is_masked_out_of_the_loss() {
        let mut cfg = train_cfg(8);
        cfg.pad_id = Some(0);
        let mut tr = Trainer::new(&tiny(FfnKind::Mlp), cfg).unwrap();
        let mut batch = pattern_batch(0, 2, 8);
        for x in batch[5..9].iter_mut() {
            *x = 0;
        }
        let s = tr.step(&batch).unwrap();
        assert_eq!(s.tokens, 2 * 8 - 4);
    }
}

#[cfg(test)]
mod bench {
    use super::*;
    use crate::nn::config::FfnKind;

    /// `cargo test --release bench_train_throughput -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_train_throughput() {
        let scale: f64 = std::env::var("BENCH_SCALE")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1.0);
        let seq: usize = std::env::var("BENCH_SEQ")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(256);
        let batch: usize = std::env::var("BENCH_BATCH")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(8);
        let kinds: Vec<FfnKind> = match std::env::var("BENCH_KIND") {
            Ok(k) => vec![k.parse().unwrap()],
            Err(_) => vec![
                FfnKind::Mlp,
                FfnKind::Swiglu,
                FfnKind::Moe,
                FfnKind::Peer,
                FfnKind::Sgatlin,
            ],
        };
        for kind in kinds {
            let cfg = ModelConfig::ladder(kind, scale, 4096, seq);
            let steps: usize = std::env::var("BENCH_STEPS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(3);
            let (tps, bytes) = bench_train(&cfg, batch, steps).unwrap();
            let gflops =
                tps * crate::nn::flops::real_train_flops_per_seq(&cfg) / cfg.seq_len as f64 / 1e9;
            println!(
                "{:8} d={} L={} params={} active={}: {:.0} tok/s ({gflops:.1} real GFLOP/s), {:.1} MiB",
                kind.as_str(),
                cfg.d_model,
                cfg.n_layers,
                cfg.total_params(),
                cfg.active_params_per_token(),
                tps,
                bytes as f64 / 1048576.0
            );
        }
    }
}
