//! Feedforward layers. Each owns its parameter handles and its saved activations, and has an
//! explicit forward and backward pass over the `Backend`.

pub mod mlp;
pub mod moe;
pub mod peer;
pub mod sgatlin;
pub mod slots;
pub mod swiglu;

use super::backend::{Backend, Buf, View, ViewMut};
use super::config::{FfnKind, ModelConfig};
use super::tensor::ParamTable;
use std::borrow::Cow;
use std::sync::Arc;

/// Expert usage accumulated over evaluation batches (SPEC §7, last bullet).
#[derive(Clone, Debug, Default)]
pub struct GateStats {
    /// How often each expert (pool row) was selected.
    pub selected: Vec<u64>,
    /// Accumulated gate mass per expert: |raw score| for sgatlin, the softmax weight for
    /// peer and moe.
    pub mass: Vec<f64>,
}

impl GateStats {
    pub fn new(n: usize) -> GateStats {
        GateStats {
            selected: vec![0; n],
            mass: vec![0.0; n],
        }
    }
    pub fn reset(&mut self) {
        self.selected.fill(0);
        self.mass.fill(0.0);
    }
    /// Fraction of experts selected at least once.
    pub fn fraction_used(&self) -> f64 {
        let used = self.selected.iter().filter(|&&c| c > 0).count();
        used as f64 / self.selected.len().max(1) as f64
    }
    /// KL(z || uniform) = log N + sum z_i log z_i of the normalised gate mass z.
    pub fn unevenness(&self) -> f64 {
        let total: f64 = self.mass.iter().sum();
        let n = self.mass.len() as f64;
        if total <= 0.0 {
            return 0.0;
        }
        let mut kl = n.ln();
        for &m in &self.mass {
            if m > 0.0 {
                let z = m / total;
                kl += z * z.ln();
            }
        }
        kl
    }
}

/// Router outputs forced at one token position (row of the batch, b * seq + t).
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingOverride {
    pub token: usize,
    /// [C * k] raw scores and expert indices, channel-major.
    pub scores: Vec<f32>,
    pub indices: Vec<u32>,
}

/// Writes the overrides into the router outputs of this forward pass.
pub(crate) fn apply_overrides(
    overrides: &[RoutingOverride],
    scores: &mut Buf<f32>,
    indices: &mut Buf<u32>,
) {
    for o in overrides {
        let slots = o.scores.len();
        if (o.token + 1) * slots <= scores.len() {
            scores.upload_at(o.token * slots, &o.scores);
            indices.upload_at(o.token * slots, &o.indices);
        }
    }
}

/// Router outputs (scores, indices), each [tokens, C, k]: borrowed on the CPU, copied from a
/// device.
pub type Routing<'a> = (Cow<'a, [f32]>, Cow<'a, [u32]>);

/// A dense MLP's hidden activations forced at one token position (row of the batch).
#[derive(Clone, Debug, PartialEq)]
pub struct ActivationOverride {
    pub token: usize,
    /// [d_ffw] activations after the nonlinearity.
    pub values: Vec<f32>,
}

pub enum FfnLayer {
    Mlp(mlp::Mlp),
    Swiglu(swiglu::Swiglu),
    Moe(moe::Moe),
    Peer(peer::Peer),
    Sgatlin(sgatlin::Sgatlin),
}

impl FfnLayer {
    pub fn new(
        table: &mut ParamTable,
        prefix: &str,
        cfg: &ModelConfig,
        be: &Arc<dyn Backend>,
    ) -> FfnLayer {
        match cfg.ffn {
            FfnKind::Mlp => FfnLayer::Mlp(mlp::Mlp::new(table, prefix, cfg, be)),
            FfnKind::Swiglu => FfnLayer::Swiglu(swiglu::Swiglu::new(table, prefix, cfg, be)),
            FfnKind::Moe => FfnLayer::Moe(moe::Moe::new(table, prefix, cfg, be)),
            FfnKind::Peer => FfnLayer::Peer(peer::Peer::new(table, prefix, cfg, be)),
            FfnKind::Sgatlin | FfnKind::SgatlinGelu => {
                FfnLayer::Sgatlin(sgatlin::Sgatlin::new(table, prefix, cfg, be))
            }
        }
    }

    /// The product-key slots (sgatlin, sgatlin-gelu, PEER), if this kind has them.
    pub fn slots_mut(&mut self) -> Option<&mut slots::Slots> {
        match self {
            FfnLayer::Peer(l) => Some(&mut l.slots),
            FfnLayer::Sgatlin(l) => Some(&mut l.slots),
            _ => None,
        }
    }

    /// out[n, d] = FFW(h) (overwritten).
    pub fn forward(
        &mut self,
        be: &Arc<dyn Backend>,
        p: &Buf<f32>,
        h: View<f32>,
        n: usize,
        out: ViewMut<f32>,
        stats: bool,
    ) -> Result<(), String> {
        match self {
            FfnLayer::Mlp(l) => l.forward(be, p, h, n, out),
            FfnLayer::Swiglu(l) => l.forward(be, p, h, n, out),
            FfnLayer::Moe(l) => l.forward(be, p, h, n, out, stats),
            FfnLayer::Peer(l) => l.forward(be, p, h, n, out, stats),
            FfnLayer::Sgatlin(l) => l.forward(be, p, h, n, out, stats),
        }
    }

    /// dh (overwritten) from dy; parameter gradients are added into g.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        be: &Arc<dyn Backend>,
        p: &Buf<f32>,
        g: &mut Buf<f32>,
        h: View<f32>,
        dy: View<f32>,
        n: usize,
        dh: ViewMut<f32>,
    ) -> Result<(), String> {
        match self {
            FfnLayer::Mlp(l) => l.backward(be, p, g, h, dy, n, dh),
            FfnLayer::Swiglu(l) => l.backward(be, p, g, h, dy, n, dh),
            FfnLayer::Moe(l) => l.backward(be, p, g, h, dy, n, dh),
            FfnLayer::Peer(l) => l.backward(be, p, g, h, dy, n, dh),
            FfnLayer::Sgatlin(l) => l.backward(be, p, g, h, dy, n, dh),
        }
    }

    /// Bytes held by this layer's saved activations and scratch buffers.
    pub fn scratch_bytes(&self) -> usize {
        match self {
            FfnLayer::Mlp(l) => l.scratch_bytes(),
            FfnLayer::Swiglu(l) => l.scratch_bytes(),
            FfnLayer::Moe(l) => l.scratch_bytes(),
            FfnLayer::Peer(l) => l.scratch_bytes(),
            FfnLayer::Sgatlin(l) => l.scratch_bytes(),
        }
    }

    pub fn gate_stats(&self) -> Option<&GateStats> {
        match self {
            FfnLayer::Moe(l) => Some(&l.stats),
            FfnLayer::Peer(l) => Some(&l.stats),
            FfnLayer::Sgatlin(l) => Some(&l.stats),
            _ => None,
        }
    }

    pub fn reset_gate_stats(&mut self) {
        match self {
            FfnLayer::Moe(l) => l.stats.reset(),
            FfnLayer::Peer(l) => l.stats.reset(),
            FfnLayer::Sgatlin(l) => l.stats.reset(),
            _ => {}
        }
    }

    pub fn set_routing_override(&mut self, overrides: Vec<RoutingOverride>) -> Result<(), String> {
        match self {
            FfnLayer::Sgatlin(l) => l.slots.overrides = overrides,
            FfnLayer::Peer(l) => l.slots.overrides = overrides,
            _ => {
                return Err(
                    "routing overrides apply to product-key kinds (sgatlin, sgatlin-gelu, peer)"
                        .into(),
                )
            }
        }
        Ok(())
    }

    /// Forces the hidden activations of a dense MLP at the given positions on the following
    /// forward passes (the dense analogue of gating patching); an empty list clears it.
    pub fn set_activation_override(
        &mut self,
        overrides: Vec<ActivationOverride>,
    ) -> Result<(), String> {
        let FfnLayer::Mlp(l) = self else {
            return Err("activation overrides apply to the dense `mlp` kind".into());
        };
        if let Some(o) = overrides.iter().find(|o| o.values.len() != l.hidden()) {
            return Err(format!(
                "activation override has {} values, the MLP has {} hidden units",
                o.values.len(),
                l.hidden()
            ));
        }
        l.overrides = overrides;
        Ok(())
    }

    /// The hidden activations [tokens, d_ffw] of the last forward pass, for `mlp`.
    pub fn last_activation(&self) -> Option<Cow<'_, [f32]>> {
        match self {
            FfnLayer::Mlp(l) => Some(l.last_activation()),
            _ => None,
        }
    }

    /// The router outputs of the last forward pass (scores, indices), each [tokens, C, k],
    /// for product-key kinds: the raw material of feedforward circuits.
    pub fn last_routing(&self) -> Option<Routing<'_>> {
        match self {
            FfnLayer::Sgatlin(l) => Some(l.slots.routing()),
            FfnLayer::Peer(l) => Some(l.slots.routing()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::config::FfnKind;
    use crate::nn::model::Model;

    #[test]
    fn unevenness_is_zero_for_uniform_and_log_n_for_one_expert() {
        let mut g = GateStats::new(4);
        g.mass = vec![1.0; 4];
        g.selected = vec![1, 0, 2, 0];
        assert!(g.unevenness().abs() < 1e-12);
        assert_eq!(g.fraction_used(), 0.5);
        g.mass = vec![0.0, 3.0, 0.0, 0.0];
        assert!((g.unevenness() - 4f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn sparse_models_collect_gate_statistics() {
        for kind in [FfnKind::Sgatlin, FfnKind::Peer, FfnKind::Moe] {
            let cfg = crate::nn::train::tests::tiny(kind);
            let mut m = Model::new(&cfg, 3).unwrap();
            m.collect_gate_stats = true;
            let toks: Vec<u32> = (0..32).map(|i| (i * 7 % 64) as u32).collect();
            m.forward_logits(&toks).unwrap();
            let stats = m.gate_stats();
            assert_eq!(stats.len(), 2);
            let per_token = if kind == FfnKind::Moe {
                cfg.topk
            } else {
                cfg.channels * cfg.topk
            };
            for s in stats {
                let s = s.unwrap();
                assert_eq!(s.selected.iter().sum::<u64>() as usize, 32 * per_token);
                assert!(s.fraction_used() > 0.0 && s.fraction_used() <= 1.0);
                assert!(s.unevenness() >= 0.0);
            }
            m.reset_gate_stats();
            assert_eq!(m.gate_stats()[0].unwrap().selected.iter().sum::<u64>(), 0);
            if kind != FfnKind::Moe {
                // Patching token 3 of layer 1 with token 5's routing copies it exactly.
                let slots = cfg.channels * cfg.topk;
                let (sc, ix) = m.last_routing(1).unwrap();
                let (sc5, ix5) = (
                    sc[5 * slots..6 * slots].to_vec(),
                    ix[5 * slots..6 * slots].to_vec(),
                );
                let patch = RoutingOverride {
                    token: 3,
                    scores: sc5.clone(),
                    indices: ix5.clone(),
                };
                m.set_routing_override(1, vec![patch]).unwrap();
                m.forward_logits(&toks).unwrap();
                let (sc, ix) = m.last_routing(1).unwrap();
                assert_eq!(&sc[3 * slots..4 * slots], &sc5[..]);
                assert_eq!(&ix[3 * slots..4 * slots], &ix5[..]);
                m.set_routing_override(1, vec![]).unwrap();
            }
        }
    }
}
