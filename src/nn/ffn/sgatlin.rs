//! sgatlin: a product-key router (dense W_key then W_sub) selecting k tiny linear experts per
//! channel from per-channel pools; the raw router score gates each expert.

use super::{ensure, GateStats};
use crate::nn::backend::Backend;
use crate::nn::config::{FfnKind, ModelConfig};
use crate::nn::cpu::{ExpertMode, ExpertShape, ProductKeyShape, SlotOrder};
use crate::nn::tensor::{Init, ParamId, ParamTable};

/// The router of sgatlin: logits = (x W_key) W_sub, then product-key top-k per channel.
pub struct ProductKeyRouter {
    pub shape: ProductKeyShape,
    pub d: usize,
    pub d_key: usize,
    pub w_key: ParamId,
    pub w_sub: ParamId,
}

/// Per-channel pools of linear experts: u (down) and v (up), each [C * N, d].
pub struct LinearExperts {
    pub shape: ExpertShape,
    pub mode: ExpertMode,
    pub u: ParamId,
    pub v: ParamId,
}

pub struct Sgatlin {
    pub router: ProductKeyRouter,
    pub experts: LinearExperts,
    hk: Vec<f32>,
    logits: Vec<f32>,
    pub scores: Vec<f32>,
    pub indices: Vec<u32>,
    a: Vec<f32>,
    coef: Vec<f32>,
    w: Vec<f32>,
    dscores: Vec<f32>,
    da: Vec<f32>,
    dlogits: Vec<f32>,
    dhk: Vec<f32>,
    order: SlotOrder,
    pub stats: GateStats,
    /// Forced router outputs (gating patching); empty in training.
    pub overrides: Vec<super::RoutingOverride>,
}

impl Sgatlin {
    pub fn new(t: &mut ParamTable, prefix: &str, cfg: &ModelConfig) -> Sgatlin {
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
        Sgatlin {
            router: ProductKeyRouter {
                shape,
                d,
                d_key: dk,
                w_key,
                w_sub,
            },
            experts: LinearExperts {
                shape: ExpertShape {
                    d,
                    channels: c,
                    k,
                    channel_stride: n,
                    pool_rows: c * n,
                },
                mode,
                u,
                v,
            },
            hk: vec![],
            logits: vec![],
            scores: vec![],
            indices: vec![],
            a: vec![],
            coef: vec![],
            w: vec![],
            dscores: vec![],
            da: vec![],
            dlogits: vec![],
            dhk: vec![],
            order: SlotOrder::default(),
            overrides: Vec::new(),
            stats: GateStats::new(c * n),
        }
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
        let r = &self.router;
        let (d, dk, lw) = (r.d, r.d_key, r.shape.logits_per_token());
        let slots = r.shape.slots_per_token();
        ensure(&mut self.hk, n * dk);
        ensure(&mut self.logits, n * lw);
        ensure(&mut self.scores, n * slots);
        ensure(&mut self.a, n * slots);
        ensure(&mut self.coef, n * slots);
        ensure(&mut self.w, n * slots);
        self.indices.resize(n * slots, 0);
        be.matmul(
            n,
            dk,
            d,
            h,
            false,
            r.w_key.of(p),
            false,
            &mut self.hk,
            false,
        );
        be.matmul(
            n,
            lw,
            dk,
            &self.hk,
            false,
            r.w_sub.of(p),
            false,
            &mut self.logits,
            false,
        );
        be.product_key_topk_forward(r.shape, &self.logits, &mut self.scores, &mut self.indices);
        super::apply_overrides(&self.overrides, &mut self.scores, &mut self.indices);
        let e = &self.experts;
        be.experts_forward(
            e.shape,
            e.mode,
            h,
            &self.scores,
            &self.indices,
            e.u.of(p),
            e.v.of(p),
            &mut self.a,
            &mut self.coef,
            &mut self.w,
            out,
        );
        if stats {
            let (c, k, stride) = (e.shape.channels, e.shape.k, e.shape.channel_stride);
            for (j, (&ix, &sc)) in self.indices.iter().zip(&self.scores).enumerate() {
                let row = ((j % slots) / k) * stride + ix as usize;
                debug_assert!(row < c * stride);
                self.stats.selected[row] += 1;
                self.stats.mass[row] += (sc as f64).abs();
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
        let r = &self.router;
        let e = &self.experts;
        let (d, dk, lw) = (r.d, r.d_key, r.shape.logits_per_token());
        let slots = r.shape.slots_per_token();
        ensure(&mut self.dscores, n * slots);
        ensure(&mut self.da, n * slots);
        ensure(&mut self.dlogits, n * lw);
        ensure(&mut self.dhk, n * dk);
        dh[..n * d].fill(0.0);
        // u and v are adjacent in the table, so split the gradient buffer between them.
        let (gu, gv) = {
            let (lo, hi) = g.split_at_mut(e.v.offset);
            (
                &mut lo[e.u.offset..e.u.offset + e.u.len],
                &mut hi[..e.v.len],
            )
        };
        be.experts_backward(
            e.shape,
            e.mode,
            h,
            &self.scores,
            &self.indices,
            e.u.of(p),
            e.v.of(p),
            (&self.a, &self.coef, &self.w),
            dy,
            &mut self.dscores,
            &mut self.da,
            (dh, gu, gv),
            &mut self.order,
        );
        be.product_key_topk_backward(r.shape, &self.indices, &self.dscores, &mut self.dlogits);
        be.matmul(
            dk,
            lw,
            n,
            &self.hk,
            true,
            &self.dlogits,
            false,
            r.w_sub.of_mut(g),
            true,
        );
        be.matmul(
            n,
            dk,
            lw,
            &self.dlogits,
            false,
            r.w_sub.of(p),
            true,
            &mut self.dhk,
            false,
        );
        be.matmul(d, dk, n, h, true, &self.dhk, false, r.w_key.of_mut(g), true);
        be.matmul(n, d, dk, &self.dhk, false, r.w_key.of(p), true, dh, true);
    }
}

impl Sgatlin {
    /// Bytes held by the saved activations and scratch buffers.
    pub fn scratch_bytes(&self) -> usize {
        4 * (self.hk.capacity()
            + self.logits.capacity()
            + self.scores.capacity()
            + self.a.capacity()
            + self.coef.capacity()
            + self.w.capacity()
            + self.dscores.capacity()
            + self.da.capacity()
            + self.dlogits.capacity()
            + self.dhk.capacity()
            + self.indices.capacity())
    }
}
