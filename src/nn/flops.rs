//! FLOP counting for the isoflop comparison, SPEC §5 (the reference convention).

use super::config::{FfnKind, ModelConfig};

/// Counted forward FLOPs per sequence: matmuls of attention and feedforward only (no
/// embedding, unembedding, top-k or gathers); attention scores over the full T^2.
pub fn forward_flops_per_seq(cfg: &ModelConfig) -> f64 {
    let t = cfg.seq_len as f64;
    let d = cfg.d_model as f64;
    let h = cfg.n_heads() as f64;
    let dh = cfg.head_dim() as f64;
    let attn = 3.0 * t * 2.0 * d * d + 2.0 * (h * 2.0 * t * t * dh) + t * 2.0 * d * d;
    let f = cfg.d_ffw as f64;
    let (c, k, dk) = (cfg.channels as f64, cfg.topk as f64, cfg.d_key as f64);
    let s = cfg.sqrt_experts() as f64;
    let ffn = match cfg.ffn {
        FfnKind::Mlp => t * 4.0 * d * f,
        FfnKind::Swiglu => t * 6.0 * d * f,
        FfnKind::Sgatlin | FfnKind::SgatlinGelu => {
            t * (2.0 * dk * d + 2.0 * 2.0 * c * s * dk) + t * 2.0 * 2.0 * k * c * d
        }
        FfnKind::Peer => {
            t * (2.0 * 2.0 * c * dk * d + 2.0 * 2.0 * c * s * dk) + t * 2.0 * 2.0 * k * c * d
        }
        FfnKind::Moe => {
            // SPEC §5 writes 16 experts, top-2 and F = d; use the configured sizes.
            let (e, kk) = (cfg.experts as f64, cfg.topk as f64);
            t * 2.0 * d * e + t * kk * 2.0 * d * (2.0 * f) + t * kk * 2.0 * f * d
        }
    };
    cfg.n_layers as f64 * (attn + ffn)
}

/// Counted forward FLOPs plus the unembedding (2 * T * d * vocab per sequence).
pub fn real_forward_flops_per_seq(cfg: &ModelConfig) -> f64 {
    forward_flops_per_seq(cfg) + 2.0 * cfg.seq_len as f64 * cfg.d_model as f64 * cfg.vocab as f64
}

/// Training = 3 x forward.
pub fn train_flops_per_seq(cfg: &ModelConfig) -> f64 {
    3.0 * forward_flops_per_seq(cfg)
}

pub fn real_train_flops_per_seq(cfg: &ModelConfig) -> f64 {
    3.0 * real_forward_flops_per_seq(cfg)
}

/// steps = budget // (3 * fwd_per_seq * batch), with the counted FLOPs.
pub fn steps_for_budget(cfg: &ModelConfig, budget: f64, batch: usize) -> u64 {
    (budget / (train_flops_per_seq(cfg) * batch as f64)).floor() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_follow_the_reference_formulas() {
        // d=256 (4 heads), 4 layers, T=1024, sgatlin C=8, N=1024, k=8, d_key=128.
        let cfg = ModelConfig {
            vocab: 8192,
            d_model: 256,
            n_layers: 4,
            seq_len: 1024,
            ffn: FfnKind::Sgatlin,
            channels: 8,
            experts: 1024,
            topk: 8,
            d_key: 128,
            d_ffw: 0,
        };
        let (t, d) = (1024.0f64, 256.0f64);
        let attn = 6.0 * t * d * d + 2.0 * 4.0 * 2.0 * t * t * 64.0 + 2.0 * t * d * d;
        let ffn = t * (2.0 * 128.0 * d + 4.0 * 8.0 * 32.0 * 128.0) + t * 4.0 * 8.0 * 8.0 * d;
        let want = 4.0 * (attn + ffn);
        assert_eq!(forward_flops_per_seq(&cfg), want);
        assert_eq!(
            real_forward_flops_per_seq(&cfg),
            want + 2.0 * t * d * 8192.0
        );
        let steps = steps_for_budget(&cfg, 1e15, 8);
        assert_eq!(steps, (1e15 / (3.0 * want * 8.0)).floor() as u64);
        let mlp = ModelConfig {
            ffn: FfnKind::Mlp,
            d_ffw: 512,
            ..cfg.clone()
        };
        assert_eq!(
            forward_flops_per_seq(&mlp),
            4.0 * (attn + t * 4.0 * d * 512.0)
        );
        let moe = ModelConfig {
            ffn: FfnKind::Moe,
            experts: 16,
            topk: 2,
            d_ffw: 256,
            ..cfg
        };
        let moe_ffn = t * 2.0 * d * 16.0 + t * 2.0 * 2.0 * d * 512.0 + t * 2.0 * 2.0 * 256.0 * d;
        assert_eq!(forward_flops_per_seq(&moe), 4.0 * (attn + moe_ffn));
    }
}
