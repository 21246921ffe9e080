//! Model configuration: every size explicit, plus the SPEC §6 ladder.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FfnKind {
    #[serde(rename = "mlp")]
    Mlp,
    #[serde(rename = "swiglu")]
    Swiglu,
    #[serde(rename = "moe")]
    Moe,
    #[serde(rename = "peer")]
    Peer,
    #[serde(rename = "sgatlin")]
    Sgatlin,
    #[serde(rename = "sgatlin-gelu")]
    SgatlinGelu,
}

impl FfnKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            FfnKind::Mlp => "mlp",
            FfnKind::Swiglu => "swiglu",
            FfnKind::Moe => "moe",
            FfnKind::Peer => "peer",
            FfnKind::Sgatlin => "sgatlin",
            FfnKind::SgatlinGelu => "sgatlin-gelu",
        }
    }
    /// Kinds routed by product keys (sgatlin, its ablation, PEER).
    pub fn is_product_key(&self) -> bool {
        matches!(
            self,
            FfnKind::Peer | FfnKind::Sgatlin | FfnKind::SgatlinGelu
        )
    }
    pub fn is_sparse(&self) -> bool {
        self.is_product_key() || *self == FfnKind::Moe
    }
}

impl std::str::FromStr for FfnKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
            format!(
                "unknown ffn kind `{s}` (expected mlp, swiglu, moe, peer, sgatlin, sgatlin-gelu)"
            )
        })
    }
}

/// Sizes of one model. Fields that a kind does not use are ignored by it (and by `validate`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub seq_len: usize,
    pub ffn: FfnKind,
    /// sgatlin: channels C; peer: heads; moe: unused.
    pub channels: usize,
    /// sgatlin/peer: pool size N (a perfect square); moe: number of experts (16).
    pub experts: usize,
    /// Experts selected per channel/head (sgatlin, peer) or per token (moe).
    pub topk: usize,
    /// Router key width (sgatlin W_key output, peer query/key width).
    pub d_key: usize,
    /// Hidden width of mlp/swiglu, and of each moe expert.
    pub d_ffw: usize,
}

/// d_ffw = 256 * floor((8/3 * d) / 256), at least 256 (SPEC §2).
pub fn default_d_ffw(d_model: usize) -> usize {
    (256 * ((8.0 / 3.0 * d_model as f64) / 256.0).floor() as usize).max(256)
}

fn perfect_square_near(x: f64) -> usize {
    let r = x.round().max(1.0) as usize;
    r.saturating_mul(r)
}

/// floor(sqrt(n)), exact for every usize (no overflow near usize::MAX).
pub fn isqrt(n: usize) -> usize {
    let sq = |r: usize| r.checked_mul(r);
    let mut r = (n as f64).sqrt() as usize;
    while sq(r).is_none_or(|s| s > n) {
        r -= 1;
    }
    while sq(r + 1).is_some_and(|s| s <= n) {
        r += 1;
    }
    r
}

impl ModelConfig {
    /// SPEC §6. d_model = 128·s rounded to a multiple of 64 (integer s) or 32 (fractional s),
    /// at least that multiple; n_layers = max(1, round(2·s)).
    pub fn ladder(ffn: FfnKind, scale: f64, vocab: usize, seq_len: usize) -> ModelConfig {
        let unit = if scale.fract() == 0.0 { 64.0 } else { 32.0 };
        let d_model = (((128.0 * scale) / unit).round().max(1.0) * unit) as usize;
        let n_layers = ((2.0 * scale).round() as usize).max(1);
        let (channels, experts, topk, d_ffw) = match ffn {
            FfnKind::Mlp | FfnKind::Swiglu => (1, 0, 0, default_d_ffw(d_model)),
            FfnKind::Moe => (1, 16, 2, d_model),
            FfnKind::Sgatlin | FfnKind::SgatlinGelu => {
                (16, perfect_square_near(16.0 + 12.0 * scale), 8, 0)
            }
            FfnKind::Peer => (16, perfect_square_near(32.0 + 24.0 * scale), 8, 0),
        };
        ModelConfig {
            vocab,
            d_model,
            n_layers,
            seq_len,
            ffn,
            channels,
            experts,
            topk,
            d_key: 128,
            d_ffw,
        }
    }

    /// 64 (SPEC §3); one head of width d_model when d_model <= 64; 32 when d_model is a
    /// multiple of 32 but not of 64 (fractional ladder widths such as 96 or 160).
    pub fn head_dim(&self) -> usize {
        if self.d_model <= 64 {
            self.d_model
        } else if self.d_model.is_multiple_of(64) {
            64
        } else {
            32
        }
    }

    pub fn n_heads(&self) -> usize {
        self.d_model / self.head_dim().max(1)
    }

    pub fn sqrt_experts(&self) -> usize {
        isqrt(self.experts)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.check_fields()
            .map_err(|(field, msg)| format!("model config: `{field}` {msg}"))
    }

    /// Like `validate`, but the error is (the bad field's name, what is wrong with it), so that
    /// a caller can name the field as its user spelled it.
    pub fn check_fields(&self) -> Result<(), (&'static str, String)> {
        let pos = |v: usize, name: &'static str| {
            if v == 0 {
                Err((name, "must be positive".to_string()))
            } else {
                Ok(())
            }
        };
        pos(self.vocab, "vocab")?;
        pos(self.d_model, "d_model")?;
        pos(self.n_layers, "n_layers")?;
        pos(self.seq_len, "seq_len")?;
        if self.vocab > u32::MAX as usize {
            return Err(("vocab", "must fit in u32".into()));
        }
        if self.d_model > 64 && !self.d_model.is_multiple_of(32) {
            return Err((
                "d_model",
                format!(
                    "= {} must be a multiple of 64 (head dim 64), of 32 (head dim 32) or at most 64 (one head)",
                    self.d_model
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err((
                "d_model",
                format!("= {} must be even (RoPE rotates pairs)", self.d_model),
            ));
        }
        match self.ffn {
            FfnKind::Mlp | FfnKind::Swiglu => pos(self.d_ffw, "d_ffw")?,
            FfnKind::Moe => {
                pos(self.d_ffw, "d_ffw")?;
                pos(self.experts, "experts")?;
                pos(self.topk, "topk")?;
                if self.topk > self.experts {
                    return Err((
                        "topk",
                        format!(
                            "= {} exceeds `experts` = {} (moe picks topk of the experts)",
                            self.topk, self.experts
                        ),
                    ));
                }
            }
            FfnKind::Peer | FfnKind::Sgatlin | FfnKind::SgatlinGelu => {
                pos(self.channels, "channels")?;
                pos(self.experts, "experts")?;
                pos(self.topk, "topk")?;
                pos(self.d_key, "d_key")?;
                let r = isqrt(self.experts);
                if r.checked_mul(r) != Some(self.experts) {
                    return Err((
                        "experts",
                        format!(
                            "= {} must be a perfect square for product-key routing",
                            self.experts
                        ),
                    ));
                }
                if self.topk >= r {
                    return Err((
                        "topk",
                        format!("= {} must be below sqrt(experts) = {r}", self.topk),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Parameters of one feedforward layer (all of them, and those one token touches).
    fn ffn_params(&self) -> (usize, usize) {
        let d = self.d_model;
        let (c, n, k, dk, f) = (
            self.channels,
            self.experts,
            self.topk,
            self.d_key,
            self.d_ffw,
        );
        let s = self.sqrt_experts();
        match self.ffn {
            FfnKind::Mlp => (2 * d * f, 2 * d * f),
            FfnKind::Swiglu => {
                let p = d * 2 * f + 2 * f + f * d + d;
                (p, p)
            }
            FfnKind::Moe => {
                let expert = d * 2 * f + 2 * f + f * d + d;
                (d * n + n * expert, d * n + k * expert)
            }
            FfnKind::Sgatlin | FfnKind::SgatlinGelu => {
                let router = d * dk + dk * 2 * c * s;
                (router + 2 * c * n * d, router + 2 * c * k * d)
            }
            FfnKind::Peer => {
                let router = d * 2 * c * dk + 2 * c * s * dk;
                (router + 2 * n * d, router + 2 * c * k * d)
            }
        }
    }

    fn backbone_params(&self) -> usize {
        let d = self.d_model;
        let per_layer = 4 * d * d + 2 * d + 2 * self.head_dim();
        self.vocab * d + self.n_layers * per_layer + d
    }

    pub fn total_params(&self) -> usize {
        self.backbone_params() + self.n_layers * self.ffn_params().0
    }

    /// Parameters one token touches: the backbone (embedding included) plus the router and the
    /// selected experts of each feedforward layer.
    pub fn active_params_per_token(&self) -> usize {
        self.backbone_params() + self.n_layers * self.ffn_params().1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladder_follows_spec_section_6() {
        let c = ModelConfig::ladder(FfnKind::Sgatlin, 1.0, 4096, 256);
        assert_eq!(
            (c.d_model, c.n_layers, c.channels, c.topk, c.experts, c.d_key),
            (128, 2, 16, 8, 784, 128)
        );
        assert_eq!(c.n_heads(), 2);
        let c = ModelConfig::ladder(FfnKind::Peer, 2.0, 4096, 256);
        assert_eq!((c.d_model, c.n_layers, c.experts), (256, 4, 80 * 80));
        let c = ModelConfig::ladder(FfnKind::Mlp, 0.25, 4096, 128);
        assert_eq!((c.d_model, c.n_layers, c.d_ffw), (32, 1, 256));
        let c = ModelConfig::ladder(FfnKind::Sgatlin, 0.75, 4096, 128);
        assert_eq!(
            (c.d_model, c.n_layers, c.experts, c.head_dim()),
            (96, 2, 25 * 25, 32)
        );
        let c = ModelConfig::ladder(FfnKind::Moe, 3.0, 4096, 128);
        assert_eq!((c.d_model, c.experts, c.topk, c.d_ffw), (384, 16, 2, 384));
        assert_eq!(default_d_ffw(256), 512);
        assert_eq!(default_d_ffw(768), 2048);
        // sgatlin at s = 7 has about 4.1 B parameters (SPEC §6).
        let big = ModelConfig::ladder(FfnKind::Sgatlin, 7.0, 50_000, 2048);
        let p = big.total_params() as f64;
        assert!((3.9e9..4.4e9).contains(&p), "{p}");
        for s in [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 8.0] {
            for k in [
                FfnKind::Mlp,
                FfnKind::Swiglu,
                FfnKind::Moe,
                FfnKind::Peer,
                FfnKind::Sgatlin,
                FfnKind::SgatlinGelu,
            ] {
                ModelConfig::ladder(k, s, 4096, 128).validate().unwrap();
            }
        }
    }

    #[test]
    fn validate_names_the_bad_field() {
        let ok = ModelConfig::ladder(FfnKind::Sgatlin, 1.0, 4096, 256);
        let err = ModelConfig {
            experts: 780,
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(
            err.contains("`experts`") && err.contains("perfect square"),
            "{err}"
        );
        let err = ModelConfig {
            topk: 28,
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(err.contains("`topk`"), "{err}");
        let err = ModelConfig {
            d_model: 100,
            ..ok.clone()
        }
        .validate()
        .unwrap_err();
        assert!(err.contains("`d_model`"), "{err}");
        let err = ModelConfig { vocab: 0, ..ok }.validate().unwrap_err();
        assert!(err.contains("`vocab`"), "{err}");
    }

    #[test]
    fn ffn_kinds_serialise_to_their_spec_names() {
        assert_eq!(
            serde_json::to_string(&FfnKind::SgatlinGelu).unwrap(),
            "\"sgatlin-gelu\""
        );
        assert_eq!("moe".parse::<FfnKind>().unwrap(), FfnKind::Moe);
        assert!("dense".parse::<FfnKind>().is_err());
        let c = ModelConfig::ladder(FfnKind::Peer, 1.0, 100, 16);
        let back: ModelConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
