//! The training engine: a transformer with explicit forward and backward passes over a
//! `Backend` (CPU: `gemm` + rayon), the feedforward kinds of the sgatlin paper, AdamW with the
//! warmup-stable-sqrt-decay schedule, FLOP counting, safetensors checkpoints and a trainer.

pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod ffn;
pub mod flops;
pub mod model;
pub mod optim;
pub mod rng;
pub mod tensor;
pub mod train;

#[cfg(test)]
mod dfdx_oracle_tests;
#[cfg(test)]
mod oracle_tests;

pub use config::{FfnKind, ModelConfig};
pub use model::{BatchLoss, Model};
pub use train::{bench_train, StepStats, TrainConfig, Trainer};
