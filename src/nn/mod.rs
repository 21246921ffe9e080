//! The training engine: a transformer with explicit forward and backward passes over a
//! `Backend` (CPU: `gemm` + rayon), the feedforward kinds of the sgatlin paper, AdamW with the
//! warmup-stable-sqrt-decay schedule, FLOP counting, safetensors checkpoints and a trainer.
//!
//! What a training stage calls:
//! - `ModelConfig::ladder(ffn, scale, vocab, seq_len)` or an explicit `ModelConfig`, then
//!   `validate()`; `total_params()`, `active_params_per_token()`.
//! - `flops::{forward_flops_per_seq, real_forward_flops_per_seq, steps_for_budget}`.
//! - `Trainer::new(&model_cfg, TrainConfig { total_steps, warmup_steps, pad_id, seed, .. })`,
//!   then `step(&rows)` per batch (B rows of seq_len + 1 tokens) -> `StepStats`,
//!   `eval_loss(&[&rows])`, `save_checkpoint` / `Trainer::load_checkpoint` (bit-exact resume),
//!   `export_weights` (weights only).
//! - Analysis: `Model::forward_logits`, `logits()`, `last_routing(layer)`,
//!   `set_routing_override(layer, ..)`, `collect_gate_stats` + `gate_stats()`.
//! - `bench_train(&cfg, batch, steps)` -> (tokens/s, bytes); `bench_train_with(.., profile)`
//!   also gives a per-op profile (`profile::Profiled` wraps the backend and times every op).
//!
//! Determinism: every parallel reduction sums in a fixed order that does not depend on the
//! thread count, so a seed gives bitwise-identical runs on one machine (f32 dot products take an
//! AVX2+FMA path where the CPU has it, so results may differ between CPU generations).

pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod ffn;
pub mod flops;
pub mod memory;
pub mod model;
pub mod optim;
pub mod profile;
pub mod rng;
pub mod tensor;
pub mod train;

#[cfg(test)]
mod dfdx_oracle_tests;
#[cfg(test)]
mod oracle_tests;

pub use config::{FfnKind, ModelConfig};
pub use model::{BatchLoss, Model};
pub use train::{bench_train, bench_train_with, StepStats, TrainBench, TrainConfig, Trainer};
