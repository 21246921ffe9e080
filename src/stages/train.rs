//! `train`: trains one language model on token shards and writes its weights, loss curve and
//! metrics into its out folder.
//!
//! ```text
//! train:
//!   uses: train
//!   with: {tokens: data/tokens, ffn: sgatlin, scale: 0.5, flops: 1e13, seq_len: 128, batch: 16}
//!   outs: [models/sgatlin-0.5]
//! ```
//!
//! Sizes come from the ladder of SPEC §6 (`scale`) and any explicit field (`d_model`,
//! `layers`, `channels`, `experts`, `topk`, `d_key`, `d_ffw`) overrides it. The step count is
//! `steps`, or derived from a FLOP budget (`flops`) with the counting of SPEC §5.
//!
//! The out folder holds `model.safetensors` (weights, PyTorch/JAX-readable, the config in
//! its metadata), `loss.csv` (step, loss, lr, grad norm) and `train.json` (the metrics).
//! While it runs, a checkpoint is kept in the stage's scratch folder every `checkpoint_s`
//! seconds; a run that is killed resumes from it and ends bitwise identical to one that was not.

use super::{out_dir, parse_with, Progress, StageContext, StageKind};
use crate::data::shards::{Batcher, BatcherConfig, Sampling, TokenShard};
use crate::data::tokenize::TokensManifest;
use crate::nn::{flops, FfnKind, ModelConfig, TrainConfig, Trainer};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::time::Instant;

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct With {
    pub tokens: String,
    pub ffn: FfnKind,
    #[serde(default)]
    pub scale: Option<f64>,
    #[serde(default)]
    pub d_model: Option<usize>,
    #[serde(default)]
    pub layers: Option<usize>,
    #[serde(default)]
    pub channels: Option<usize>,
    #[serde(default)]
    pub experts: Option<usize>,
    #[serde(default)]
    pub topk: Option<usize>,
    #[serde(default)]
    pub d_key: Option<usize>,
    #[serde(default)]
    pub d_ffw: Option<usize>,
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// A training FLOP budget (counted FLOPs, SPEC §5)…
    #[serde(default)]
    pub flops: Option<f64>,
    /// …or a step count.
    #[serde(default)]
    pub steps: Option<u64>,
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Default: 1000 steps (SPEC §4), at most a tenth of the run.
    #[serde(default)]
    pub warmup: Option<u64>,
    #[serde(default = "default_clip")]
    pub clip: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_device")]
    pub device: String,
    /// Seconds between resume checkpoints.
    #[serde(default = "default_checkpoint_s")]
    pub checkpoint_s: f64,
}

fn default_seq_len() -> usize {
    128
}
fn default_batch() -> usize {
    16
}
fn default_lr() -> f64 {
    1e-3
}
fn default_clip() -> f64 {
    1.0
}
fn default_device() -> String {
    "cpu".into()
}
fn default_checkpoint_s() -> f64 {
    60.0
}

impl With {
    /// The model's sizes: the ladder at `scale` (or a 1-scale ladder when only explicit sizes
    /// are given), overridden field by field.
    pub fn model_config(&self, vocab: usize) -> Result<ModelConfig, String> {
        let explicit = self.d_model.is_some() && self.layers.is_some();
        let scale = match (self.scale, explicit) {
            (Some(s), _) if s > 0.0 => s,
            (Some(s), _) => return Err(format!("with.scale must be positive, got {s}")),
            (None, true) => 1.0,
            (None, false) => return Err("give with.scale, or with.d_model and with.layers".into()),
        };
        let mut cfg = ModelConfig::ladder(self.ffn, scale, vocab, self.seq_len);
        let set = |field: &mut usize, v: Option<usize>| {
            if let Some(v) = v {
                *field = v;
            }
        };
        set(&mut cfg.d_model, self.d_model);
        set(&mut cfg.n_layers, self.layers);
        set(&mut cfg.channels, self.channels);
        set(&mut cfg.experts, self.experts);
        set(&mut cfg.topk, self.topk);
        set(&mut cfg.d_key, self.d_key);
        set(&mut cfg.d_ffw, self.d_ffw);
        cfg.validate()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        match (self.flops, self.steps) {
            (Some(_), Some(_)) => return Err("give with.flops or with.steps, not both".into()),
            (None, None) => return Err("give with.flops (a FLOP budget) or with.steps".into()),
            (Some(f), None) if f.is_nan() || f <= 0.0 => {
                return Err(format!("with.flops must be positive, got {f}"))
            }
            _ => {}
        }
        if self.seq_len == 0 || self.batch == 0 {
            return Err("with.seq_len and with.batch must be positive".into());
        }
        if self.device != "cpu" {
            return Err(format!(
                "with.device `{}`: this build trains on the CPU only (the CUDA backend is not built yet)",
                self.device
            ));
        }
        // Sizes are checked against a placeholder vocabulary now, the real one at run time.
        self.model_config(256).map(|_| ())
    }
}

pub struct Train;

impl StageKind for Train {
    fn name(&self) -> &'static str {
        "train"
    }

    fn version(&self) -> &'static str {
        "1"
    }

    fn inputs(&self, with: &Map<String, Value>) -> Result<Vec<String>, String> {
        let w: With = parse_with(with)?;
        w.check()?;
        Ok(vec![w.tokens])
    }

    fn run(&self, ctx: &StageContext) -> Result<()> {
        let w: With = parse_with(&ctx.with).map_err(anyhow::Error::msg)?;
        let out = out_dir(ctx)?;
        let tokens_dir = ctx.workspace.join(&w.tokens);
        let manifest = read_tokens_manifest(&tokens_dir)?;
        let shard = TokenShard::open(&tokens_dir.join(&manifest.train.file))?;
        let cfg = w
            .model_config(manifest.vocab_size as usize)
            .map_err(anyhow::Error::msg)?;

        let fwd_per_seq = flops::forward_flops_per_seq(&cfg);
        let steps = match (w.steps, w.flops) {
            (Some(s), _) => s,
            (None, Some(budget)) => flops::steps_for_budget(&cfg, budget, w.batch),
            _ => unreachable!("checked"),
        };
        if steps == 0 {
            bail!(
                "a FLOP budget of {:e} buys no step: one step of this model costs {:.3e} counted FLOPs",
                w.flops.unwrap_or(0.0),
                3.0 * fwd_per_seq * w.batch as f64
            );
        }
        let warmup = w.warmup.unwrap_or(1000).min(steps / 10);
        let tc = TrainConfig {
            lr: w.lr,
            clip: w.clip,
            warmup_steps: warmup,
            total_steps: steps,
            pad_id: manifest.pad_id,
            seed: w.seed,
            ..TrainConfig::default()
        };
        println!(
            "{} d_model={} layers={} params={} active/token={} steps={steps} warmup={warmup} batch={}x{}",
            cfg.ffn.as_str(),
            cfg.d_model,
            cfg.n_layers,
            cfg.total_params(),
            cfg.active_params_per_token(),
            w.batch,
            w.seq_len
        );

        // Resume from the scratch checkpoint if it was made by this very configuration.
        let fingerprint = serde_json::to_string(&(&ctx.with, &cfg))?;
        let ckpt = ctx.scratch.join("resume.safetensors");
        let curve_file = ctx.scratch.join("resume-loss.csv");
        let (mut trainer, mut curve) = match resume(&ckpt, &curve_file, &fingerprint)? {
            Some((t, c)) => {
                println!("resuming at step {} from {}", t.step, ckpt.display());
                (t, c)
            }
            None => (
                Trainer::new(&cfg, tc)?,
                String::from("step,loss,lr,grad_norm\n"),
            ),
        };
        let batcher = Batcher::new(
            shard.tokens(),
            BatcherConfig {
                batch_size: w.batch,
                seq_len: w.seq_len,
                seed: w.seed,
                sampling: Sampling::Random,
            },
        )?;

        let mut progress = Progress::from_env();
        let t0 = Instant::now();
        let first_step = trainer.step;
        let mut last_ckpt = Instant::now();
        let mut recent = std::collections::VecDeque::new();
        let mut rows = Vec::with_capacity(w.batch * (w.seq_len + 1));
        while trainer.step < steps {
            let batch = batcher.batch_at(trainer.step);
            rows.clear();
            for (inp, tgt) in batch
                .inputs
                .chunks(w.seq_len)
                .zip(batch.targets.chunks(w.seq_len))
            {
                rows.extend_from_slice(inp);
                rows.push(*tgt.last().expect("non-empty row"));
            }
            let s = trainer.step(&rows)?;
            curve.push_str(&format!("{},{},{},{}\n", s.step, s.loss, s.lr, s.grad_norm));
            recent.push_back(s.loss);
            if recent.len() > 20 {
                recent.pop_front();
            }
            let done = trainer.step - first_step;
            let secs = t0.elapsed().as_secs_f64();
            let tps = (done as usize * w.batch * w.seq_len) as f64 / secs.max(1e-9);
            let eta = (steps - trainer.step) as f64 * secs / done as f64;
            let msg = format!(
                "loss {:.3}  {:.0} tok/s  ETA {}",
                s.loss,
                tps,
                short_duration(eta)
            );
            progress.update(trainer.step, steps, &msg);
            if trainer.step % 100 == 0 || trainer.step == steps {
                println!("step {}/{steps} {msg}", trainer.step);
            }
            if last_ckpt.elapsed().as_secs_f64() >= w.checkpoint_s && trainer.step < steps {
                save_resume(&trainer, &ckpt, &curve, &curve_file, &fingerprint)?;
                last_ckpt = Instant::now();
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        let trained_tokens = (steps as usize * w.batch * w.seq_len) as f64;
        trainer.export_weights(&out.join("model.safetensors"))?;
        std::fs::write(out.join("loss.csv"), &curve)?;
        let final_loss = recent.iter().sum::<f64>() / recent.len().max(1) as f64;
        let this_run_tokens = ((steps - first_step) as usize * w.batch * w.seq_len) as f64;
        let metrics = json!({
            "ffn": cfg.ffn.as_str(),
            "scale": w.scale,
            "d_model": cfg.d_model,
            "layers": cfg.n_layers,
            "total_params": cfg.total_params(),
            "active_params": cfg.active_params_per_token(),
            "counted_flops": 3.0 * fwd_per_seq * (w.batch as f64) * steps as f64,
            "real_flops": flops::real_train_flops_per_seq(&cfg) * (w.batch as f64) * steps as f64,
            "flops_budget": w.flops,
            "tokens": trained_tokens,
            "steps": steps,
            "batch": w.batch,
            "seq_len": w.seq_len,
            "seed": w.seed,
            "final_train_loss": final_loss,
            "tokens_per_s": this_run_tokens / wall.max(1e-9),
            "wall_s": wall,
            "resumed_at_step": (first_step > 0).then_some(first_step),
            "model_config": cfg,
        });
        std::fs::write(out.join("train.json"), serde_json::to_vec_pretty(&metrics)?)?;
        if let Some(m) = &ctx.metrics {
            std::fs::write(ctx.workspace.join(m), serde_json::to_vec_pretty(&metrics)?)?;
        }
        Ok(())
    }
}

pub fn read_tokens_manifest(dir: &Path) -> Result<TokensManifest> {
    let path = dir.join("tokens.json");
    let bytes = std::fs::read(&path)
        .with_context(|| format!("cannot read {} (is it a tokenise output?)", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("bad {}", path.display()))
}

fn save_resume(
    trainer: &Trainer,
    ckpt: &Path,
    curve: &str,
    curve_file: &Path,
    fingerprint: &str,
) -> Result<()> {
    // Each file is replaced whole, the checkpoint last: a kill at any point leaves a checkpoint
    // and a curve at least as long as it (resume cuts the curve back to the checkpoint's step).
    crate::atomic::write(curve_file, curve.as_bytes(), true)?;
    crate::atomic::write(
        &ckpt.with_extension("fingerprint"),
        fingerprint.as_bytes(),
        true,
    )?;
    trainer.save_checkpoint(ckpt)
}

fn resume(ckpt: &Path, curve_file: &Path, fingerprint: &str) -> Result<Option<(Trainer, String)>> {
    let Ok(stored) = std::fs::read_to_string(ckpt.with_extension("fingerprint")) else {
        return Ok(None);
    };
    if stored != fingerprint || !ckpt.is_file() {
        return Ok(None);
    }
    let trainer = Trainer::load_checkpoint(ckpt)?;
    // The curve is cut back to the checkpoint's step: rows written after it were redone.
    let curve: String = std::fs::read_to_string(curve_file)?
        .lines()
        .filter(|l| {
            l.split(',')
                .next()
                .and_then(|s| s.parse::<u64>().ok())
                .is_none_or(|s| s < trainer.step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    Ok(Some((trainer, curve)))
}

fn short_duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}
