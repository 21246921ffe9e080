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

use super::{
    check_memory, finite_positive, out_dir, parse_max_memory, parse_with, within, MemoryCheck,
    Progress, StageContext, StageKind,
};
use crate::data::shards::{Batcher, BatcherConfig, Sampling, TokenShard};
use crate::data::tokenize::TokensManifest;
use crate::nn::backend::{Backend, Storage};
use crate::nn::device::Device;
use crate::nn::memory::{self, MemoryEstimate};
use crate::nn::{flops, FfnKind, ModelConfig, TrainConfig, Trainer};
use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::Arc;
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
    /// How the expert kernels read the pools of sgatlin and PEER: `f32` (the parameters) or
    /// `bf16` (a copy made at each forward pass, counted in the memory estimate; parameters and
    /// optimiser stay f32).
    #[serde(default, skip_serializing_if = "is_f32")]
    pub expert_storage: Storage,
    /// Seconds between resume checkpoints (0: after every step).
    #[serde(default = "default_checkpoint_s")]
    pub checkpoint_s: f64,
    /// Refuse to start when the estimated peak memory exceeds this size (`8G`, `512M`; a bare
    /// number is MiB). Without it, the limit is the memory available when the stage starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<Value>,
}

/// Upper bounds of the sizes a user can type: far above any model this engine can train, low
/// enough that no product of them overflows before the memory estimate refuses it.
pub const MAX_SIZE: usize = 1 << 20;
/// Product-key pools are squares of up to `MAX_SIZE` sub-keys.
pub const MAX_EXPERTS: usize = 1 << 40;
pub const MAX_SCALE: f64 = 1000.0;
pub const MAX_STEPS: u64 = 1 << 40;
/// The vocabulary assumed at load, before the tokens exist (the real one is used at run time).
pub const PLACEHOLDER_VOCAB: usize = 256;

/// What the checks of `With` establish.
pub struct Plan {
    pub cfg: ModelConfig,
    pub steps: u64,
    pub memory: MemoryEstimate,
}

const LOWER: &str =
    "with.batch, with.seq_len or the model (with.scale, or with.d_model and with.layers)";

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
fn is_f32(s: &Storage) -> bool {
    *s == Storage::F32
}
fn default_device() -> String {
    "cpu".into()
}
fn default_checkpoint_s() -> f64 {
    60.0
}

impl With {
    /// The model's sizes: the ladder at `scale` (or a 1-scale ladder when only explicit sizes
    /// are given), overridden field by field. Errors start with the bad field (`with.topk ...`).
    pub fn model_config(&self, vocab: usize) -> Result<ModelConfig, String> {
        let explicit = self.d_model.is_some() && self.layers.is_some();
        let scale = match (self.scale, explicit) {
            (Some(s), _) => {
                finite_positive("scale", s)?;
                if s > MAX_SCALE {
                    return Err(format!(
                        "with.scale must be at most {MAX_SCALE} (d_model = 128 x scale), got {s}"
                    ));
                }
                s
            }
            (None, true) => 1.0,
            (None, false) => {
                return Err(
                    "with.scale is missing: give with.scale, or with.d_model and with.layers"
                        .into(),
                )
            }
        };
        let sizes = [
            ("d_model", self.d_model, MAX_SIZE),
            ("layers", self.layers, MAX_SIZE),
            ("channels", self.channels, MAX_SIZE),
            ("experts", self.experts, MAX_EXPERTS),
            ("topk", self.topk, MAX_SIZE),
            ("d_key", self.d_key, MAX_SIZE),
            ("d_ffw", self.d_ffw, MAX_SIZE),
        ];
        for (name, v, max) in sizes {
            if let Some(v) = v {
                within(name, v as u64, 1, max as u64, "a sanity bound")?;
            }
        }
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
        cfg.check_fields().map_err(|(field, msg)| {
            let (name, given) = match field {
                "vocab" => return format!("with.tokens: the vocabulary of {vocab} tokens {msg}"),
                "n_layers" => ("layers", self.layers),
                "seq_len" => ("seq_len", Some(self.seq_len)),
                "d_model" => ("d_model", self.d_model),
                "channels" => ("channels", self.channels),
                "experts" => ("experts", self.experts),
                "topk" => ("topk", self.topk),
                "d_key" => ("d_key", self.d_key),
                _ => ("d_ffw", self.d_ffw),
            };
            match given {
                Some(_) => format!("with.{name} {msg}"),
                None => format!(
                    "with.{name} {msg} (the ladder's value at with.scale = {scale} for {}; set with.{name} to override it)",
                    self.ffn.as_str()
                ),
            }
        })?;
        Ok(cfg)
    }

    /// Range checks of the fields that do not depend on the model.
    fn check_fields(&self) -> Result<(), String> {
        within(
            "seq_len",
            self.seq_len as u64,
            1,
            MAX_SIZE as u64,
            "a sanity bound",
        )?;
        within(
            "batch",
            self.batch as u64,
            1,
            MAX_SIZE as u64,
            "a sanity bound",
        )?;
        finite_positive("lr", self.lr)?;
        if !(self.clip.is_finite() && self.clip >= 0.0) {
            return Err(format!(
                "with.clip must be finite and positive (or 0 for no clipping), got {}",
                self.clip
            ));
        }
        if !(self.checkpoint_s.is_finite() && self.checkpoint_s >= 0.0) {
            return Err(format!(
                "with.checkpoint_s must be a finite number of seconds (0: after every step), got {}",
                self.checkpoint_s
            ));
        }
        match (self.flops, self.steps) {
            (Some(_), Some(_)) => {
                return Err("with.steps: give with.flops or with.steps, not both".into())
            }
            (None, None) => {
                return Err(
                    "with.flops is missing: give with.flops (a FLOP budget) or with.steps".into(),
                )
            }
            (Some(f), None) => finite_positive("flops", f)?,
            (None, Some(s)) => within("steps", s, 1, MAX_STEPS, "a sanity bound")?,
        }
        if let (Some(w), Some(s)) = (self.warmup, self.steps) {
            if w > s {
                return Err(format!(
                    "with.warmup = {w} is longer than the run (with.steps = {s})"
                ));
            }
        }
        Device::parse(&self.device).map_err(|e| format!("with.device: {e}"))?;
        if self.expert_storage == Storage::Bf16
            && !matches!(
                self.ffn,
                FfnKind::Sgatlin | FfnKind::SgatlinGelu | FfnKind::Peer
            )
        {
            return Err(format!(
                "with.expert_storage: bf16 is for the product-key experts (sgatlin, sgatlin-gelu, peer); ffn {} has no expert pools",
                self.ffn.as_str()
            ));
        }
        parse_max_memory(self.max_memory.as_ref())?;
        Ok(())
    }

    /// Every check of the fields, then the model at `vocab`, its step count and its memory.
    pub fn plan(&self, vocab: usize) -> Result<Plan, String> {
        self.check_fields()?;
        let cfg = self.model_config(vocab)?;
        let steps = match (self.steps, self.flops) {
            (Some(s), _) => s,
            (None, Some(budget)) => {
                let step = flops::train_flops_per_seq(&cfg) * self.batch as f64;
                let steps = flops::steps_for_budget(&cfg, budget, self.batch);
                if steps == 0 {
                    return Err(format!(
                        "with.flops: a budget of {budget:e} buys no step: one step of this model at with.batch = {} costs {step:.3e} counted FLOPs (3 x forward x batch); raise with.flops or lower {LOWER}",
                        self.batch
                    ));
                }
                if steps > MAX_STEPS {
                    return Err(format!(
                        "with.flops: a budget of {budget:e} buys {steps} steps of {step:.3e} counted FLOPs, more than {MAX_STEPS} (a sanity bound)"
                    ));
                }
                steps
            }
            (None, None) => {
                return Err("with.flops is missing: give with.flops or with.steps".into())
            }
        };
        let memory = memory::train_estimate(&cfg, self.batch, self.expert_storage);
        Ok(Plan { cfg, steps, memory })
    }

    /// Refuses a plan whose memory is over the limit.
    fn check_memory(&self, plan: &Plan, when: MemoryCheck) -> Result<(), String> {
        check_memory(
            "training",
            &plan.memory,
            parse_max_memory(self.max_memory.as_ref())?,
            when,
            LOWER,
        )
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

    fn not_in_key(&self) -> &'static [&'static str] {
        &["max_memory", "checkpoint_s"]
    }

    fn inputs(&self, with: &Map<String, Value>) -> Result<Vec<String>, String> {
        let w: With = parse_with(with)?;
        // The vocabulary is a placeholder here; the real one is checked again at run time.
        let plan = w.plan(PLACEHOLDER_VOCAB)?;
        w.check_memory(&plan, MemoryCheck::Load)?;
        Ok(vec![w.tokens])
    }

    fn run(&self, ctx: &StageContext) -> Result<()> {
        let w: With = parse_with(&ctx.with).map_err(anyhow::Error::msg)?;
        let out = out_dir(ctx)?;
        let tokens_dir = ctx.workspace.join(&w.tokens);
        let manifest = read_tokens_manifest(&tokens_dir)?;
        let shard = TokenShard::open(&tokens_dir.join(&manifest.train.file))?;
        let plan = w
            .plan(manifest.vocab_size as usize)
            .map_err(anyhow::Error::msg)?;
        // Before anything large is allocated: the model, its optimiser state and activations
        // must fit in `max_memory`, or in the memory available now.
        w.check_memory(&plan, MemoryCheck::Run)
            .map_err(anyhow::Error::msg)?;
        let Plan { cfg, steps, .. } = plan;
        let fwd_per_seq = flops::forward_flops_per_seq(&cfg);
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
        let backend = Device::parse(&w.device)
            .and_then(Device::backend)
            .map_err(|e| anyhow!("with.device {}: {e}", w.device))?;
        let (mut trainer, mut curve) =
            match resume(&ckpt, &curve_file, &fingerprint, backend.clone())? {
                Some((t, c)) => {
                    println!("resuming at step {} from {}", t.step, ckpt.display());
                    (t, c)
                }
                None => (
                    Trainer::with_backend(&cfg, tc, backend)?,
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

        trainer
            .model
            .set_expert_storage(w.expert_storage)
            .map_err(|e| anyhow!("with.expert_storage: {e}"))?;
        let mut progress = Progress::from_env();
        let tokens_per_step = w.batch as f64 * w.seq_len as f64;
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
            let tps = done as f64 * tokens_per_step / secs.max(1e-9);
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
        let trained_tokens = steps as f64 * tokens_per_step;
        trainer.export_weights(&out.join("model.safetensors"))?;
        std::fs::write(out.join("loss.csv"), &curve)?;
        let final_loss = recent.iter().sum::<f64>() / recent.len().max(1) as f64;
        let this_run_tokens = (steps - first_step) as f64 * tokens_per_step;
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
            // The kernels' instruction set: results on another differ by rounding only.
            "isa": crate::nn::cpu::Isa::current().name(),
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

fn resume(
    ckpt: &Path,
    curve_file: &Path,
    fingerprint: &str,
    backend: Arc<dyn Backend>,
) -> Result<Option<(Trainer, String)>> {
    let Ok(stored) = std::fs::read_to_string(ckpt.with_extension("fingerprint")) else {
        return Ok(None);
    };
    if stored != fingerprint || !ckpt.is_file() {
        return Ok(None);
    }
    let trainer = Trainer::load_checkpoint_on(ckpt, backend)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Map<String, Value> {
        json!({"tokens": "data/tokens", "ffn": "sgatlin", "scale": 0.5, "steps": 100})
            .as_object()
            .unwrap()
            .clone()
    }

    fn inputs(with: &Map<String, Value>) -> Result<Vec<String>, String> {
        Train.inputs(with)
    }

    /// `with` is refused by an error that starts with `with.FIELD` and a space or colon.
    fn refused(changes: Value, remove: &[&str], field: &str) -> String {
        let mut w = base();
        for k in remove {
            w.remove(*k);
        }
        for (k, v) in changes.as_object().unwrap() {
            w.insert(k.clone(), v.clone());
        }
        let err = inputs(&w).expect_err(&format!("{changes} was accepted"));
        crate::stages::assert_names_field(&err, field, &changes.to_string());
        err
    }

    #[test]
    fn good_options_pass() {
        assert_eq!(inputs(&base()).unwrap(), vec!["data/tokens".to_string()]);
        let mut w = base();
        w.remove("steps");
        w.insert("flops".into(), json!(1e12));
        w.insert("max_memory".into(), json!("4G"));
        w.insert("clip".into(), json!(0));
        w.insert("checkpoint_s".into(), json!(0));
        w.insert("expert_storage".into(), json!("bf16"));
        inputs(&w).unwrap();
        let explicit = json!({"tokens": "t", "ffn": "mlp", "d_model": 32, "layers": 1, "steps": 1, "warmup": 1});
        inputs(explicit.as_object().unwrap()).unwrap();
    }

    #[test]
    fn every_float_field_must_be_finite_and_positive() {
        // JSON has no NaN or infinity: YAML `.nan` and `.inf` arrive as null.
        for field in ["lr", "scale"] {
            for bad in [
                json!(0),
                json!(-1),
                json!(-1e-300),
                Value::Null,
                json!("fast"),
            ] {
                refused(json!({ field: bad }), &[], field);
            }
        }
        for field in ["clip", "checkpoint_s"] {
            for bad in [
                json!(-1),
                json!(-1e-300),
                Value::Null,
                json!("x"),
                json!([1]),
            ] {
                refused(json!({ field: bad }), &[], field);
            }
        }
        for bad in [json!(0), json!(-1e12), Value::Null, json!("1e12")] {
            refused(json!({ "flops": bad }), &["steps"], "flops");
        }
        let e = refused(json!({"scale": 1e9}), &[], "scale");
        assert!(e.contains("at most 1000"), "{e}");
        let e = refused(json!({"lr": Value::Null}), &[], "lr");
        assert!(e.contains(".nan") && e.contains("is null"), "{e}");
    }

    #[test]
    fn every_size_is_range_checked() {
        for field in [
            "seq_len", "batch", "d_model", "layers", "channels", "experts", "topk", "d_key",
            "d_ffw",
        ] {
            for bad in [
                json!(0),
                json!(-1),
                json!(1u64 << 41),
                json!(u64::MAX),
                json!(1e12),
                json!(2.5),
                Value::Null,
                json!("64"),
            ] {
                refused(json!({ field: bad }), &[], field);
            }
        }
        let e = refused(json!({"batch": (1u64 << 20) + 1}), &[], "batch");
        assert!(e.contains("at most 1048576"), "{e}");
        let e = refused(json!({"d_model": 1e12}), &[], "d_model");
        assert!(e.contains("whole number"), "{e}");
        // Consistency of the sizes, named by the field.
        refused(json!({"d_model": 100}), &[], "d_model");
        refused(json!({"d_model": 33}), &[], "d_model");
        refused(json!({"experts": 780}), &[], "experts");
        refused(json!({"topk": 28}), &[], "topk");
        refused(json!({"ffn": "moe", "topk": 17}), &[], "topk");
        // A ladder value that does not fit says where it came from.
        let e = refused(json!({"experts": 16}), &[], "topk");
        assert!(
            e.contains("ladder") && e.contains("with.scale = 0.5"),
            "{e}"
        );
    }

    #[test]
    fn run_length_is_checked() {
        for bad in [
            json!(0),
            json!(-1),
            json!(u64::MAX),
            json!(1e6),
            Value::Null,
        ] {
            refused(json!({ "steps": bad }), &[], "steps");
        }
        refused(json!({"flops": 1e12}), &[], "steps");
        refused(json!({}), &["steps"], "flops");
        let e = refused(json!({"flops": 1.0}), &["steps"], "flops");
        assert!(e.contains("buys no step") && e.contains("costs"), "{e}");
        refused(json!({"flops": 1e300}), &["steps"], "flops");
        refused(json!({"warmup": 101}), &[], "warmup");
        refused(json!({"warmup": -1}), &[], "warmup");
        refused(json!({"seed": -1}), &[], "seed");
    }

    #[test]
    fn other_fields_name_themselves() {
        refused(json!({"device": "tpu"}), &[], "device");
        refused(json!({"expert_storage": "fp8"}), &[], "expert_storage");
        for ffn in ["mlp", "swiglu", "moe"] {
            refused(
                json!({"ffn": ffn, "expert_storage": "bf16"}),
                &[],
                "expert_storage",
            );
        }
        refused(json!({"ffn": "dense"}), &[], "ffn");
        refused(json!({"tokens": 5}), &[], "tokens");
        refused(json!({"lrr": 1}), &[], "lrr");
        refused(json!({}), &["tokens"], "tokens");
        for bad in [
            json!(0),
            json!("0G"),
            json!("-1G"),
            json!("lots"),
            json!(-5),
            Value::Null,
        ] {
            refused(json!({ "max_memory": bad }), &[], "max_memory");
        }
    }

    #[test]
    fn memory_over_the_limit_is_refused_with_the_estimate() {
        let e = refused(json!({"max_memory": "1M"}), &[], "max_memory");
        assert!(
            e.contains("MiB") && e.contains("activations") && e.contains("lower with.batch"),
            "{e}"
        );
        // The run-time check uses the same limit.
        let w: With = parse_with(&base()).unwrap();
        let plan = w.plan(4096).unwrap();
        check_memory("training", &plan.memory, Some(1e6), MemoryCheck::Run, LOWER).unwrap_err();
        check_memory(
            "training",
            &plan.memory,
            Some(1e12),
            MemoryCheck::Run,
            LOWER,
        )
        .unwrap();
        // Larger than any machine: refused at load without a max_memory.
        let e = inputs(
            json!({"tokens": "t", "ffn": "mlp", "d_model": 1 << 20, "layers": 1 << 20, "steps": 1})
                .as_object()
                .unwrap(),
        )
        .unwrap_err();
        assert!(
            e.contains("of memory this machine has") && e.contains("GiB"),
            "{e}"
        );
    }

    /// Random combinations of extreme values for every field: `inputs` and the memory estimate
    /// answer (Ok or Err), never panic.
    #[test]
    fn no_typed_value_panics() {
        let seed = std::env::var("REPRO_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
                    | 1
            });
        let mut x = seed;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Values of the right type, mostly, so that most cases get past parsing; and a few
        // of any type.
        let ints = [
            0u64,
            1,
            2,
            3,
            8,
            16,
            32,
            64,
            100,
            784,
            1 << 20,
            (1 << 20) + 1,
            1 << 40,
            u64::MAX,
        ];
        let floats = [
            0.0,
            -1.0,
            5e-324,
            1e-300,
            0.01,
            0.5,
            1.0,
            7.0,
            1000.0,
            1001.0,
            1e12,
            1e300,
            f64::MAX,
        ];
        let wild = [
            json!(-1),
            json!(1e12),
            json!(0.5),
            Value::Null,
            json!("x"),
            json!([]),
        ];
        let ffns = [
            "mlp",
            "swiglu",
            "moe",
            "peer",
            "sgatlin",
            "sgatlin-gelu",
            "x",
        ];
        let int_fields = [
            "d_model", "layers", "channels", "experts", "topk", "d_key", "d_ffw", "seq_len",
            "batch", "warmup", "seed",
        ];
        let float_fields = ["scale", "lr", "clip", "checkpoint_s"];
        let mems = [json!("1K"), json!("8G"), json!("1T"), json!(0), json!("x")];
        let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
        for case in 0..4000 {
            let mut w = Map::new();
            let value = |typed: Value, next: &mut dyn FnMut() -> u64| {
                if next().is_multiple_of(16) {
                    wild[next() as usize % wild.len()].clone()
                } else {
                    typed
                }
            };
            w.insert("tokens".into(), json!("t"));
            let ffn = json!(ffns[next() as usize % ffns.len()]);
            w.insert("ffn".into(), value(ffn, &mut next));
            for f in int_fields {
                if next().is_multiple_of(3) {
                    let v = json!(ints[next() as usize % ints.len()]);
                    w.insert(f.into(), value(v, &mut next));
                }
            }
            for f in float_fields {
                // A model needs a scale (or explicit sizes): give one most of the time.
                let odds = if f == "scale" { 4 } else { 3 };
                if next() % odds != 1 {
                    let v = json!(floats[next() as usize % floats.len()]);
                    w.insert(f.into(), value(v, &mut next));
                }
            }
            // Steps or a budget, mostly one of them.
            match next() % 8 {
                0 => {}
                1 => {
                    w.insert("steps".into(), json!(1));
                    w.insert("flops".into(), json!(1e12));
                }
                2..=4 => {
                    let v = json!(ints[next() as usize % ints.len()]);
                    w.insert("steps".into(), value(v, &mut next));
                }
                _ => {
                    let v = json!(floats[next() as usize % floats.len()] * 1e6);
                    w.insert("flops".into(), value(v, &mut next));
                }
            }
            if next().is_multiple_of(4) {
                w.insert(
                    "max_memory".into(),
                    mems[next() as usize % mems.len()].clone(),
                );
            }
            let ran = std::panic::catch_unwind(|| {
                let out = inputs(&w);
                if let Ok(parsed) = parse_with::<With>(&w) {
                    if let Ok(plan) = parsed.plan(PLACEHOLDER_VOCAB) {
                        assert!(plan.memory.total().is_finite());
                        assert!(plan.steps >= 1);
                    }
                }
                out
            });
            if let Ok(out) = &ran {
                let what = match out {
                    Ok(_) => "ok".to_string(),
                    Err(e) => e.split([' ', ':']).next().unwrap_or("").to_string(),
                };
                *outcomes.entry(what).or_default() += 1;
            }
            assert!(
                ran.is_ok(),
                "case {case} panicked (REPRO_FUZZ_SEED={seed}): {}",
                Value::Object(w)
            );
        }
        // The loop reaches the model and memory checks, and passes some cases.
        eprintln!("outcomes: {outcomes:?}");
        assert!(
            outcomes.get("ok").copied().unwrap_or(0) >= 10,
            "{outcomes:?}"
        );
        // The estimate and the config checks themselves, on sizes no check has bounded.
        let sizes = [
            0,
            1,
            2,
            3,
            63,
            64,
            1 << 20,
            1 << 40,
            usize::MAX / 2,
            usize::MAX,
        ];
        for case in 0..2000 {
            let mut pick = || sizes[next() as usize % sizes.len()];
            let ffn: FfnKind = ffns[case % 6].parse().unwrap();
            let cfg = ModelConfig {
                vocab: pick(),
                d_model: pick(),
                n_layers: pick(),
                seq_len: pick(),
                ffn,
                channels: pick(),
                experts: pick(),
                topk: pick(),
                d_key: pick(),
                d_ffw: pick(),
            };
            let batch = pick();
            let ran = std::panic::catch_unwind(|| {
                let _ = cfg.check_fields();
                let t = memory::train_estimate(&cfg, batch, Storage::Bf16).total();
                let e = memory::eval_estimate(&cfg, batch).total();
                assert!(t >= 0.0 && e >= 0.0);
                let _ = flops::forward_flops_per_seq(&cfg);
            });
            assert!(
                ran.is_ok(),
                "estimate case {case} panicked (REPRO_FUZZ_SEED={seed}): {cfg:?} batch {batch}"
            );
        }
    }
}
