//! sgatlin: a product-key router (dense W_key then W_sub) selecting k tiny linear experts per
//! channel from per-channel pools; the raw router score gates each expert.

use super::slots::Slots;
use super::GateStats;
use crate::nn::backend::{Backend, Buf, ExpertMode, ExpertShape, ProductKeyShape, View, ViewMut};
use crate::nn::config::{FfnKind, ModelConfig};
use crate::nn::tensor::{Init, ParamId, ParamTable};
use std::sync::Arc;

/// The router is dense: logits = (x W_key) W_sub, then the product-key top-k per channel; the
/// experts are per-channel pools u, v of [C * N, d].
pub struct Sgatlin {
    d: usize,
    d_key: usize,
    w_key: ParamId,
    w_sub: ParamId,
    pub slots: Slots,
    hk: Buf<f32>,
    logits: Buf<f32>,
    dlogits: Buf<f32>,
    dhk: Buf<f32>,
    pub stats: GateStats,
}

impl Sgatlin {
    pub fn new(
        t: &mut ParamTable,
        prefix: &str,
        cfg: &ModelConfig,
        be: &Arc<dyn Backend>,
    ) -> Sgatlin {
        let (d, c, n, k, dk) = (cfg.d_model, cfg.channels, cfg.experts, cfg.topk, cfg.d_key);
        let s = cfg.sqrt_experts();
        let shape = ProductKeyShape {
            channels: c,
            sqrt_n: s,
            k,
        };
        let w_key = t.add(
            format!("{prefix}.router.w_key"),
            &[d, dk],
            Init::TruncatedNormal(1.0 / (d as f64).sqrt()),
            true,
        );
        let w_sub = t.add(
            format!("{prefix}.router.w_sub"),
            &[dk, 2 * c * s],
            Init::TruncatedNormal(1.0 / (dk as f64).sqrt()),
            true,
        );
        let std = 1.0 / (n as f64).sqrt();
        let u = t.add(
            format!("{prefix}.experts.u"),
            &[c, n, d],
            Init::TruncatedNormal(std),
            true,
        );
        let v = t.add(
            format!("{prefix}.experts.v"),
            &[c, n, d],
            Init::TruncatedNormal(std),
            true,
        );
        let mode = if cfg.ffn == FfnKind::SgatlinGelu {
            ExpertMode::GatedGelu
        } else {
            ExpertMode::GatedLinear
        };
        let experts = ExpertShape {
            d,
            channels: c,
            k,
            channel_stride: n,
            pool_rows: c * n,
        };
        Sgatlin {
            d,
            d_key: dk,
            w_key,
            w_sub,
            slots: Slots::new(be, shape, experts, mode, (u, v)),
            hk: Buf::empty(be),
            logits: Buf::empty(be),
            dlogits: Buf::empty(be),
            dhk: Buf::empty(be),
            stats: GateStats::new(c * n),
        }
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
        let (d, dk, lw) = (self.d, self.d_key, self.slots.router.logits_per_token());
        self.hk.ensure(n * dk)?;
        self.logits.ensure(n * lw)?;
        let hk = self.hk.view_mut();
        be.matmul(n, dk, d, h, false, self.w_key.view(p), false, hk, false);
        let (hk, logits) = (self.hk.view(), self.logits.view_mut());
        be.matmul(
            n,
            lw,
            dk,
            hk,
            false,
            self.w_sub.view(p),
            false,
            logits,
            false,
        );
        self.slots.forward(&**be, p, self.logits.view(), h, out)?;
        if stats {
            let e = self.slots.experts;
            let per_token = self.slots.router.slots_per_token();
            let (indices, scores) = (self.slots.indices.to_vec(), self.slots.scores.to_vec());
            for (j, (&ix, &sc)) in indices.iter().zip(&scores).enumerate() {
                let row = ((j % per_token) / e.k) * e.channel_stride + ix as usize;
                debug_assert!(row < e.channels * e.channel_stride);
                self.stats.selected[row] += 1;
                self.stats.mass[row] += (sc as f64).abs();
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
        let (d, dk, lw) = (self.d, self.d_key, self.slots.router.logits_per_token());
        self.dlogits.ensure(n * lw)?;
        self.dhk.ensure(n * dk)?;
        let dlogits = self.dlogits.view_mut();
        self.slots.backward(&**be, p, g, h, dy, dh.rb(), dlogits)?;
        let (hk, dlogits) = (self.hk.view(), self.dlogits.view());
        be.matmul(
            dk,
            lw,
            n,
            hk,
            true,
            dlogits,
            false,
            self.w_sub.view_mut(g),
            true,
        );
        let dhk = self.dhk.view_mut();
        be.matmul(
            n,
            dk,
            lw,
            dlogits,
            false,
            self.w_sub.view(p),
            true,
            dhk,
            false,
        );
        let dhk = self.dhk.view();
        be.matmul(d, dk, n, h, true, dhk, false, self.w_key.view_mut(g), true);
        be.matmul(n, d, dk, dhk, false, self.w_key.view(p), true, dh, true);
        Ok(())
    }
}

impl Sgatlin {
    /// Bytes held by the saved activations and scratch buffers.
    pub fn scratch_bytes(&self) -> usize {
        self.slots.bytes()
            + [&self.hk, &self.logits, &self.dlogits, &self.dhk]
                .iter()
                .map(|b| b.bytes())
                .sum::<usize>()
    }
}
