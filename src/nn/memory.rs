//! Memory a training or evaluation run will hold, estimated from the sizes alone before anything
//! is allocated. Every count is an f64, so no size, however absurd, overflows: the estimate of a
//! model too large to exist is simply a huge number of bytes.
//!
//! The terms mirror the buffers the engine allocates (`Model::with_backend`, the `ensure` calls
//! of the forward and backward passes, `AdamW::new`, `checkpoint::save`); the test below holds
//! them to the bytes a real step allocates.

use super::backend::Storage;
use super::config::{FfnKind, ModelConfig};

/// Bytes, by what holds them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryEstimate {
    /// Parameter count (not bytes).
    pub params: f64,
    /// Parameters and gradients (f32 each), the per-expert usage counters, and with bf16
    /// expert storage the bf16 copy of the pools the expert kernels read.
    pub weights: f64,
    /// AdamW's two moments (training only).
    pub optimizer: f64,
    /// Activations saved for the backward pass, the backward scratch, the logits and the
    /// feedforward layers' scratch, at the configured batch.
    pub activations: f64,
    /// The byte copy of weights and moments made while a checkpoint is written (training only).
    pub checkpoint: f64,
}

impl MemoryEstimate {
    pub fn total(&self) -> f64 {
        self.weights + self.optimizer + self.activations + self.checkpoint
    }

    /// `about 3.20 GiB (1.2e8 parameters and their gradients 0.90 GiB, AdamW moments ...)`.
    pub fn describe(&self) -> String {
        let mut parts = vec![format!(
            "{:.3e} parameters and their gradients {}",
            self.params,
            gib(self.weights)
        )];
        if self.optimizer > 0.0 {
            parts.push(format!("AdamW moments {}", gib(self.optimizer)));
        }
        parts.push(format!("activations {}", gib(self.activations)));
        if self.checkpoint > 0.0 {
            parts.push(format!("checkpoint copy {}", gib(self.checkpoint)));
        }
        format!("about {} ({})", gib(self.total()), parts.join(", "))
    }
}

/// Bytes for messages: GiB (`2.50 GiB`, `3.0e6 GiB`), or MiB below one GiB (`12.3 MiB`).
pub fn gib(bytes: f64) -> String {
    let g = bytes / (1u64 << 30) as f64;
    if g < 1.0 {
        format!("{:.1} MiB", bytes / (1u64 << 20) as f64)
    } else if g >= 1e6 {
        format!("{g:.1e} GiB")
    } else if g >= 10.0 {
        format!("{g:.0} GiB")
    } else {
        format!("{g:.2} GiB")
    }
}

/// sqrt(experts) as the router uses it (floor), without the integer square root's overflow.
fn sqrt_experts(cfg: &ModelConfig) -> f64 {
    (cfg.experts as f64).sqrt().floor()
}

/// At least 1, so that a zero width gives a zero term rather than 0/0.
fn head_dim(cfg: &ModelConfig) -> f64 {
    cfg.head_dim().max(1) as f64
}

/// Parameters of the whole model (the f64 twin of `ModelConfig::total_params`).
pub fn param_count(cfg: &ModelConfig) -> f64 {
    let d = cfg.d_model as f64;
    let (c, n, dk, f) = (
        cfg.channels as f64,
        cfg.experts as f64,
        cfg.d_key as f64,
        cfg.d_ffw as f64,
    );
    let s = sqrt_experts(cfg);
    let ffn = match cfg.ffn {
        FfnKind::Mlp => 2.0 * d * f,
        FfnKind::Swiglu => d * 2.0 * f + 2.0 * f + f * d + d,
        FfnKind::Moe => d * n + n * (d * 2.0 * f + 2.0 * f + f * d + d),
        FfnKind::Sgatlin | FfnKind::SgatlinGelu => d * dk + dk * 2.0 * c * s + pool_params(cfg),
        FfnKind::Peer => d * 2.0 * c * dk + 2.0 * c * s * dk + pool_params(cfg),
    };
    let per_layer = 4.0 * d * d + 2.0 * d + 2.0 * head_dim(cfg) + ffn;
    cfg.vocab as f64 * d + cfg.n_layers as f64 * per_layer + d
}

/// Parameters of one layer's expert pools, u and v (0 for kinds without pools).
fn pool_params(cfg: &ModelConfig) -> f64 {
    let (d, c, n) = (cfg.d_model as f64, cfg.channels as f64, cfg.experts as f64);
    match cfg.ffn {
        FfnKind::Sgatlin | FfnKind::SgatlinGelu => 2.0 * c * n * d,
        FfnKind::Peer => 2.0 * n * d,
        FfnKind::Mlp | FfnKind::Swiglu | FfnKind::Moe => 0.0,
    }
}

/// Bytes of one feedforward layer's buffers for `n` tokens: (forward, backward, fixed).
/// Fixed: the usage counters (u64 + f64 per expert) and the expert-order table.
fn ffn_bytes(cfg: &ModelConfig, n: f64) -> (f64, f64, f64) {
    let d = cfg.d_model as f64;
    let (c, ne, k, dk, f) = (
        cfg.channels as f64,
        cfg.experts as f64,
        cfg.topk as f64,
        cfg.d_key as f64,
        cfg.d_ffw as f64,
    );
    let s = sqrt_experts(cfg);
    match cfg.ffn {
        FfnKind::Mlp => (4.0 * 2.0 * n * f, 4.0 * 2.0 * n * f, 0.0),
        FfnKind::Swiglu => (4.0 * 3.0 * n * f, 4.0 * 3.0 * n * f, 0.0),
        FfnKind::Moe => {
            let rows = n * k;
            // probs, chosen (u32), routes (2 x u32), hx, z (2F), y, o.
            let fwd = 4.0 * n * ne + 4.0 * rows + 8.0 * rows + 4.0 * rows * (2.0 * d + 3.0 * f);
            // dprob, dlogits, dout, dy, dz, dhx.
            let bwd = 4.0 * 2.0 * n * ne + 4.0 * rows * (2.0 * d + 3.0 * f);
            (fwd, bwd, 16.0 * ne + 8.0 * ne)
        }
        FfnKind::Sgatlin | FfnKind::SgatlinGelu | FfnKind::Peer => {
            let slots = c * k;
            let lw = 2.0 * c * s;
            let (q, pool) = if cfg.ffn == FfnKind::Peer {
                (2.0 * c * dk, ne)
            } else {
                (dk, c * ne)
            };
            // q or hk, logits, scores, a, coef, w, indices (u32), the slot order (u32).
            let fwd = 4.0 * n * (q + lw + 4.0 * slots + slots + slots);
            // dscores, da, dlogits, dq or dhk.
            let bwd = 4.0 * n * (2.0 * slots + lw + q);
            // Usage counters, and the order table's starts and fill (u32 per pool row).
            (fwd, bwd, 16.0 * pool + 8.0 * pool)
        }
    }
}

/// Forward-pass bytes of the backbone for `n` tokens in `batch` sequences, and the logits.
fn backbone_forward_bytes(cfg: &ModelConfig, batch: f64, n: f64) -> f64 {
    let d = cfg.d_model as f64;
    let t = cfg.seq_len as f64;
    let l = cfg.n_layers as f64;
    let h = cfg.d_model as f64 / head_dim(cfg);
    // Per block: h1, q_raw, k_raw, v, q, k, o, x_mid, h2; two norm rstds, q/k rstds; scores.
    let block = 9.0 * n * d + 2.0 * n + 2.0 * n * h + batch * h * t * t;
    // Residual stream (layers + 1), feedforward out, final norm, logits, rope tables,
    // and the per-thread attention scratch (T^2 each, a few threads).
    let shared = (l + 1.0) * n * d
        + n * d
        + n * d
        + n
        + n * cfg.vocab as f64
        + t * head_dim(cfg)
        + 16.0 * t * t;
    4.0 * (l * block + shared)
}

/// Bytes of the token buffers of one batch (rows, inputs, targets: u32) and the per-token
/// losses (f64).
fn token_bytes(n: f64, batch: f64) -> f64 {
    4.0 * (n + batch) + 4.0 * 2.0 * n * 2.0 + 8.0 * n
}

/// Peak memory of training `cfg` on batches of `batch` sequences of `cfg.seq_len` tokens, the
/// expert kernels reading the pools in `storage`.
pub fn train_estimate(cfg: &ModelConfig, batch: usize, storage: Storage) -> MemoryEstimate {
    let p = param_count(cfg);
    let batch = batch as f64;
    let n = batch * cfg.seq_len as f64;
    let d = cfg.d_model as f64;
    let l = cfg.n_layers as f64;
    let (ffn_fwd, ffn_bwd, ffn_fixed) = ffn_bytes(cfg, n);
    // dx, dh, d_o, dq, dk, dv, dq_raw, dk_raw.
    let backward = 4.0 * 8.0 * n * d;
    MemoryEstimate {
        params: p,
        weights: 8.0 * p + l * ffn_fixed + l * pool_copy_bytes(cfg, storage),
        optimizer: 8.0 * p,
        activations: backbone_forward_bytes(cfg, batch, n)
            + l * (ffn_fwd + ffn_bwd)
            + backward
            + token_bytes(n, batch),
        // checkpoint::save turns weights and both moments into bytes before writing them.
        checkpoint: 12.0 * p,
    }
}

/// Bytes of one layer's bf16 copy of its pools (`Slots`' shadow), made with bf16 storage.
fn pool_copy_bytes(cfg: &ModelConfig, storage: Storage) -> f64 {
    match storage {
        Storage::F32 => 0.0,
        Storage::Bf16 => 2.0 * pool_params(cfg),
    }
}

/// Peak memory of evaluating `cfg` (forward passes only) on batches of `batch` sequences.
pub fn eval_estimate(cfg: &ModelConfig, batch: usize) -> MemoryEstimate {
    let p = param_count(cfg);
    let batch = batch as f64;
    let n = batch * cfg.seq_len as f64;
    let (ffn_fwd, _, ffn_fixed) = ffn_bytes(cfg, n);
    let l = cfg.n_layers as f64;
    MemoryEstimate {
        params: p,
        // Parameters, gradients (allocated though unused), the file's bytes and their copy
        // as floats while the weights are loaded.
        weights: 16.0 * p + l * ffn_fixed,
        optimizer: 0.0,
        activations: backbone_forward_bytes(cfg, batch, n) + l * ffn_fwd + token_bytes(n, batch),
        checkpoint: 0.0,
    }
}

/// Total memory of this machine and the memory available now (`/proc/meminfo`), in bytes.
pub fn machine_memory() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024.0)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::train::tests::{pattern_batch, train_cfg};
    use crate::nn::train::{bench_train, Trainer};

    fn small(ffn: FfnKind) -> ModelConfig {
        let mut c = ModelConfig::ladder(ffn, 0.5, 300, 24);
        if ffn.is_product_key() {
            c.experts = 64;
            c.topk = 4;
            c.channels = 4;
            c.d_key = 16;
        }
        c
    }

    #[test]
    fn params_match_the_model() {
        for ffn in FfnKind::ALL {
            let c = small(ffn);
            assert_eq!(param_count(&c), c.total_params() as f64, "{ffn:?}");
            let big = ModelConfig::ladder(ffn, 7.0, 50_000, 2048);
            assert_eq!(param_count(&big), big.total_params() as f64, "{ffn:?}");
        }
    }

    /// The estimate covers what one real training step allocates, and not much more.
    #[test]
    fn estimate_covers_a_real_step() {
        for ffn in FfnKind::ALL {
            for batch in [1, 3] {
                let c = small(ffn);
                let (_, measured) = bench_train(&c, batch, 0).unwrap();
                let e = train_estimate(&c, batch, Storage::F32);
                // `measured` has no checkpoint copy, usage counters or token buffers.
                let held = e.weights + e.optimizer + e.activations;
                let ratio = held / measured as f64;
                assert!(
                    (1.0..1.25).contains(&ratio),
                    "{ffn:?} batch {batch}: estimate {held} for {measured} measured ({ratio:.3})"
                );
            }
        }
    }

    /// With bf16 expert storage the estimate grows by exactly the copy a real step holds (2
    /// bytes a pool parameter), and still covers the whole step.
    #[test]
    fn estimate_counts_the_bf16_copy_of_the_pools() {
        let held = |c: &ModelConfig, storage: Storage| {
            let mut tr = Trainer::new(c, train_cfg(2)).unwrap();
            tr.model.set_expert_storage(storage).unwrap();
            tr.step(&pattern_batch(0, 2, c.seq_len)).unwrap();
            (tr.model.allocated_bytes() + tr.opt.m.bytes() + tr.opt.v.bytes()) as f64
        };
        for ffn in [FfnKind::Sgatlin, FfnKind::SgatlinGelu, FfnKind::Peer] {
            let c = small(ffn);
            let (e32, e16) = (
                train_estimate(&c, 2, Storage::F32),
                train_estimate(&c, 2, Storage::Bf16),
            );
            let (m32, m16) = (held(&c, Storage::F32), held(&c, Storage::Bf16));
            let pools = c.n_layers as f64 * pool_params(&c);
            assert!(pools > 0.0, "{ffn:?}");
            assert_eq!(e16.total() - e32.total(), 2.0 * pools, "{ffn:?}");
            assert_eq!(m16 - m32, 2.0 * pools, "{ffn:?}: the step's copy");
            let ratio = (e16.weights + e16.optimizer + e16.activations) / m16;
            assert!((1.0..1.25).contains(&ratio), "{ffn:?}: {ratio:.3}");
        }
        let dense = small(FfnKind::Moe);
        assert_eq!(pool_params(&dense), 0.0);
    }

    #[test]
    fn absurd_sizes_give_huge_finite_estimates() {
        let mut c = ModelConfig::ladder(FfnKind::Sgatlin, 1.0, 256, 128);
        c.d_model = usize::MAX;
        c.n_layers = usize::MAX;
        c.experts = usize::MAX;
        c.seq_len = usize::MAX;
        let e = train_estimate(&c, usize::MAX, Storage::Bf16);
        assert!(e.total() > 1e50 && e.total().is_finite(), "{e:?}");
        assert!(e.describe().contains("GiB"));
    }
}
