//! PEER (He 2024): one pool of N single-neuron experts shared by C heads; per head and half a
//! query projection and sqrt(N) sub-keys, similarity scaled by 1/sqrt(2 d_key); output
//! gelu(u.x) * softmax_k(scores) * v. Keys are per head, as in the reference code.

use super::slots::Slots;
use super::GateStats;
use crate::nn::backend::{
    Backend, Buf, ExpertMode, ExpertShape, ProductKeyShape, Strided, View, ViewMut,
};
use crate::nn::config::ModelConfig;
use crate::nn::tensor::{Init, ParamId, ParamTable};
use std::sync::Arc;

pub struct Peer {
    d: usize,
    d_key: usize,
    /// Query projection [d, 2 * C * d_key], columns laid out [half][head][d_key].
    w_query: ParamId,
    /// Sub-keys [2 * C * sqrt_n, d_key], rows laid out [half][head][key].
    keys: ParamId,
    /// One pool of N experts shared by the C heads.
    pub slots: Slots,
    q: Buf<f32>,
    logits: Buf<f32>,
    dlogits: Buf<f32>,
    dq: Buf<f32>,
    pub stats: GateStats,
}

impl Peer {
    pub fn new(t: &mut ParamTable, prefix: &str, cfg: &ModelConfig, be: &Arc<dyn Backend>) -> Peer {
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
        let router = ProductKeyShape {
            channels: c,
            sqrt_n: s,
            k,
        };
        let experts = ExpertShape {
            d,
            channels: c,
            k,
            channel_stride: 0,
            pool_rows: n,
        };
        Peer {
            d,
            d_key: dk,
            w_query,
            keys,
            slots: Slots::new(be, router, experts, ExpertMode::PeerSoftmaxGelu, (u, v)),
            q: Buf::empty(be),
            logits: Buf::empty(be),
            dlogits: Buf::empty(be),
            dq: Buf::empty(be),
            stats: GateStats::new(n),
        }
    }

    fn scale(&self) -> f32 {
        (1.0 / (2.0 * self.d_key as f64).sqrt()) as f32
    }

    pub fn forward(
        &mut self,
        be: &Arc<dyn Backend>,
        p: &Buf<f32>,
        h: View<f32>,
        n: usize,
        out: ViewMut<f32>,
        stats: bool,
    ) -> Result<(), String> {
        let (d, dk, s) = (self.d, self.d_key, self.slots.router.sqrt_n);
        let parts = 2 * self.slots.router.channels;
        let lw = self.slots.router.logits_per_token();
        self.q.ensure(n * parts * dk)?;
        self.logits.ensure(n * lw)?;
        be.matmul(
            n,
            parts * dk,
            d,
            h,
            false,
            self.w_query.view(p),
            false,
            self.q.view_mut(),
            false,
        );
        let keys = self.keys.view(p);
        for pc in 0..parts {
            let a = Strided {
                v: self.q.view().from(pc * dk),
                rs: parts * dk,
                cs: 1,
            };
            let b = Strided {
                v: keys.from(pc * s * dk),
                rs: 1,
                cs: dk,
            };
            be.matmul_strided(
                n,
                s,
                dk,
                a,
                b,
                self.logits.view_mut().from(pc * s),
                lw,
                false,
            );
        }
        let sc = self.scale();
        be.scale(self.logits.view_mut(), sc);
        self.slots.forward(&**be, p, self.logits.view(), h, out)?;
        if stats {
            let (indices, w) = (self.slots.indices.to_vec(), self.slots.w.to_vec());
            for (&ix, &w) in indices.iter().zip(&w) {
                self.stats.selected[ix as usize] += 1;
                self.stats.mass[ix as usize] += w as f64;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        be: &Arc<dyn Backend>,
        p: &Buf<f32>,
        g: &mut Buf<f32>,
        h: View<f32>,
        dy: View<f32>,
        n: usize,
        mut dh: ViewMut<f32>,
    ) -> Result<(), String> {
        let (d, dk, s) = (self.d, self.d_key, self.slots.router.sqrt_n);
        let parts = 2 * self.slots.router.channels;
        let lw = self.slots.router.logits_per_token();
        self.dlogits.ensure(n * lw)?;
        self.dq.ensure(n * parts * dk)?;
        let dlogits = self.dlogits.view_mut();
        self.slots.backward(&**be, p, g, h, dy, dh.rb(), dlogits)?;
        let sc = self.scale();
        be.scale(self.dlogits.view_mut(), sc);
        let (keys, dlogits, q) = (self.keys.view(p), self.dlogits.view(), self.q.view());
        for pc in 0..parts {
            // dq_pc[n, dk] = dlogits_pc[n, s] · keys_pc[s, dk]
            let a = Strided {
                v: dlogits.from(pc * s),
                rs: lw,
                cs: 1,
            };
            let b = Strided {
                v: keys.from(pc * s * dk),
                rs: dk,
                cs: 1,
            };
            be.matmul_strided(
                n,
                dk,
                s,
                a,
                b,
                self.dq.view_mut().from(pc * dk),
                parts * dk,
                false,
            );
        }
        let mut gkeys = self.keys.view_mut(g);
        for pc in 0..parts {
            // dkeys_pc[s, dk] += dlogits_pc^T[s, n] · q_pc[n, dk]
            let a = Strided {
                v: dlogits.from(pc * s),
                rs: 1,
                cs: lw,
            };
            let b = Strided {
                v: q.from(pc * dk),
                rs: parts * dk,
                cs: 1,
            };
            be.matmul_strided(s, dk, n, a, b, gkeys.rb().from(pc * s * dk), dk, true);
        }
        let dq = self.dq.view();
        be.matmul(
            d,
            parts * dk,
            n,
            h,
            true,
            dq,
            false,
            self.w_query.view_mut(g),
            true,
        );
        be.matmul(
            n,
            d,
            parts * dk,
            dq,
            false,
            self.w_query.view(p),
            true,
            dh,
            true,
        );
        Ok(())
    }
}

impl Peer {
    /// Bytes held by the saved activations and scratch buffers.
    pub fn scratch_bytes(&self) -> usize {
        self.slots.bytes()
            + [&self.q, &self.logits, &self.dlogits, &self.dq]
                .iter()
                .map(|b| b.bytes())
                .sum::<usize>()
    }
}
