//! PEER (He 2024): one pool of N single-neuron experts shared by C heads; per head and half a
//! query projection and sqrt(N) sub-keys, similarity scaled by 1/sqrt(2 d_key); output
//! gelu(u.x) * softmax_k(scores) * v. Keys are per head, as in the reference code.

use super::{ensure, GateStats};
use crate::nn::backend::Backend;
use crate::nn::config::ModelConfig;
use crate::nn::cpu::{ExpertMode, ExpertShape, MatRef, ProductKeyShape, SlotOrder};
use crate::nn::tensor::{Init, ParamId, ParamTable};

pub struct Peer {
    shape: ProductKeyShape,
    eshape: ExpertShape,
    d: usize,
    d_key: usize,
    /// Query projection [d, 2 * C * d_key], columns laid out [half][head][d_key].
    w_query: ParamId,
    /// Sub-keys [2 * C * sqrt_n, d_key], rows laid out [half][head][key].
    keys: ParamId,
    u: ParamId,
    v: ParamId,
    q: Vec<f32>,
    logits: Vec<f32>,
    pub scores: Vec<f32>,
    pub indices: Vec<u32>,
    a: Vec<f32>,
    coef: Vec<f32>,
    w: Vec<f32>,
    dscores: Vec<f32>,
    da: Vec<f32>,
    dlogits: Vec<f32>,
    dq: Vec<f32>,
    order: SlotOrder,
    pub stats: GateStats,
    /// Forced router outputs (gating patching); empty in training.
    pub overrides: Vec<super::RoutingOverride>,
}

impl Peer {
    pub fn new(t: &mut ParamTable, prefix: &str, cfg: &ModelConfig) -> Peer {
        let (d, c, n, k, dk) = (cfg.d_model, cfg.channels, cfg.experts, cfg.topk, cfg.d_key);
        let s = cfg.sqrt_experts();
        let w_query = t.add(
            format!("{prefix}.router.w_query"),
            &[d, 2 * c * dk],
            Init::TruncatedNormal(1.0 / (d as f64).sqrt()),
            true,
        );
        let keys = t.add(
            format!("{prefix}.router.keys"),
            &[2 * c * s, dk],
            Init::TruncatedNormal(1.0),
            true,
        );
        let std = 1.0 / (n as f64).sqrt();
        let u = t.add(
            format!("{prefix}.experts.u"),
            &[n, d],
            Init::TruncatedNormal(std),
            true,
        );
        let v = t.add(
            format!("{prefix}.experts.v"),
            &[n, d],
            Init::TruncatedNormal(std),
            true,
        );
        Peer {
            shape: ProductKeyShape {
                channels: c,
                sqrt_n: s,
                k,
            },
            eshape: ExpertShape {
                d,
                channels: c,
                k,
                channel_stride: 0,
                pool_rows: n,
            },
            d,
            d_key: dk,
            w_query,
            keys,
            u,
            v,
            q: vec![],
            logits: vec![],
            scores: vec![],
            indices: vec![],
            a: vec![],
            coef: vec![],
            w: vec![],
            dscores: vec![],
            da: vec![],
            dlogits: vec![],
            dq: vec![],
            order: SlotOrder::default(),
            overrides: Vec::new(),
            stats: GateStats::new(n),
        }
    }

    fn scale(&self) -> f32 {
        (1.0 / (2.0 * self.d_key as f64).sqrt()) as f32
    }

    pub fn forward(
        &mut self,
        be: &dyn Backend,
        p: &[f32],
        h: &[f32],
        n: usize,
        out: &mut [f32],
        stats: bool,
    ) {
        let (d, dk, s) = (self.d, self.d_key, self.shape.sqrt_n);
        let parts = 2 * self.shape.channels;
        let lw = self.shape.logits_per_token();
        let slots = self.shape.slots_per_token();
        ensure(&mut self.q, n * parts * dk);
        ensure(&mut self.logits, n * lw);
        ensure(&mut self.scores, n * slots);
        ensure(&mut self.a, n * slots);
        ensure(&mut self.coef, n * slots);
        ensure(&mut self.w, n * slots);
        self.indices.resize(n * slots, 0);
        be.matmul(
            n,
            parts * dk,
            d,
            h,
            false,
            self.w_query.of(p),
            false,
            &mut self.q,
            false,
        );
        let keys = self.keys.of(p);
        for pc in 0..parts {
            let a = MatRef {
                data: &self.q[pc * dk..],
                rs: parts * dk,
                cs: 1,
            };
            let b = MatRef {
                data: &keys[pc * s * dk..],
                rs: 1,
                cs: dk,
            };
            be.matmul_strided(n, s, dk, a, b, &mut self.logits[pc * s..], lw, false);
        }
        let sc = self.scale();
        self.logits.iter_mut().for_each(|x| *x *= sc);
        be.product_key_topk_forward(
            self.shape,
            &self.logits,
            &mut self.scores,
            &mut self.indices,
        );
        super::apply_overrides(&self.overrides, &mut self.scores, &mut self.indices);
        be.experts_forward(
            self.eshape,
            ExpertMode::PeerSoftmaxGelu,
            h,
            &self.scores,
            &self.indices,
            self.u.of(p),
            self.v.of(p),
            &mut self.a,
            &mut self.coef,
            &mut self.w,
            out,
        );
        if stats {
            for (&ix, &w) in self.indices.iter().zip(&self.w) {
                self.stats.selected[ix as usize] += 1;
                self.stats.mass[ix as usize] += w as f64;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        be: &dyn Backend,
        p: &[f32],
        g: &mut [f32],
        h: &[f32],
        dy: &[f32],
        n: usize,
        dh: &mut [f32],
    ) {
        let (d, dk, s) = (self.d, self.d_key, self.shape.sqrt_n);
        let parts = 2 * self.shape.channels;
        let lw = self.shape.logits_per_token();
        let slots = self.shape.slots_per_token();
        ensure(&mut self.dscores, n * slots);
        ensure(&mut self.da, n * slots);
        ensure(&mut self.dlogits, n * lw);
        ensure(&mut self.dq, n * parts * dk);
        dh[..n * d].fill(0.0);
        let (gu, gv) = {
            let (lo, hi) = g.split_at_mut(self.v.offset);
            (
                &mut lo[self.u.offset..self.u.offset + self.u.len],
                &mut hi[..self.v.len],
            )
        };
        be.experts_backward(
            self.eshape,
            ExpertMode::PeerSoftmaxGelu,
            h,
            &self.scores,
            &self.indices,
            self.u.of(p),
            self.v.of(p),
            (&self.a, &self.coef, &self.w),
            dy,
            &mut self.dscores,
            &mut self.da,
            (dh, gu, gv),
            &mut self.order,
        );
        be.product_key_topk_backward(self.shape, &self.indices, &self.dscores, &mut self.dlogits);
        let sc = self.scale();
        self.dlogits.iter_mut().for_each(|x| *x *= sc);
        let keys = self.keys.of(p);
        for pc in 0..parts {
            // dq_pc[n, dk] = dlogits_pc[n, s] · keys_pc[s, dk]
            let a = MatRef {
                data: &self.dlogits[pc * s..],
                rs: lw,
                cs: 1,
            };
            let b = MatRef {
                data: &keys[pc * s * dk..],
                rs: dk,
                cs: 1,
            };
            be.matmul_strided(n, dk, s, a, b, &mut self.dq[pc * dk..], parts * dk, false);
        }
        let gkeys = self.keys.of_mut(g);
        for pc in 0..parts {
            // dkeys_pc[s, dk] += dlogits_pc^T[s, n] · q_pc[n, dk]
            let a = MatRef {
                data: &self.dlogits[pc * s..],
                rs: 1,
                cs: lw,
            };
            let b = MatRef {
                data: &self.q[pc * dk..],
                rs: parts * dk,
                cs: 1,
            };
            be.matmul_strided(s, dk, n, a, b, &mut gkeys[pc * s * dk..], dk, true);
        }
        be.matmul(
            d,
            parts * dk,
            n,
            h,
            true,
            &self.dq,
            false,
            self.w_query.of_mut(g),
            true,
        );
        be.matmul(
            n,
            d,
            parts * dk,
            &self.dq,
            false,
            self.w_query.of(p),
            true,
            dh,
            true,
        );
    }
}

impl Peer {
    /// Bytes held by the saved activations and scratch buffers.
    pub fn scratch_bytes(&self) -> usize {
        4 * (self.q.capacity()
            + self.logits.capacity()
            + self.scores.capacity()
            + self.a.capacity()
            + self.coef.capacity()
            + self.w.capacity()
            + self.dscores.capacity()
            + self.da.capacity()
            + self.dlogits.capacity()
            + self.dq.capacity()
            + self.indices.capacity())
    }
}
