//! sgatlin: a product-key router (dense W_key then W_sub) selecting k tiny linear experts per
//! channel from per-channel pools; the raw router score gates each expert.

use super::GateStats;
use crate::nn::backend::{
    zero, Backend, Buf, ExpertsGrads, ExpertsSaved, ExpertsSavedRef, View, ViewMut,
};
use crate::nn::backend::{ExpertMode, ExpertShape, ProductKeyShape};
use crate::nn::config::{FfnKind, ModelConfig};
use crate::nn::tensor::{Init, ParamId, ParamTable};
use std::sync::Arc;

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
    hk: Buf<f32>,
    logits: Buf<f32>,
    pub scores: Buf<f32>,
    pub indices: Buf<u32>,
    a: Buf<f32>,
    coef: Buf<f32>,
    w: Buf<f32>,
    dscores: Buf<f32>,
    da: Buf<f32>,
    dlogits: Buf<f32>,
    dhk: Buf<f32>,
    pub stats: GateStats,
    /// Forced router outputs (gating patching); empty in training.
    pub overrides: Vec<super::RoutingOverride>,
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
            hk: Buf::empty(be),
            logits: Buf::empty(be),
            scores: Buf::empty(be),
            indices: Buf::empty(be),
            a: Buf::empty(be),
            coef: Buf::empty(be),
            w: Buf::empty(be),
            dscores: Buf::empty(be),
            da: Buf::empty(be),
            dlogits: Buf::empty(be),
            dhk: Buf::empty(be),
            overrides: Vec::new(),
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
        let r = &self.router;
        let (d, dk, lw) = (r.d, r.d_key, r.shape.logits_per_token());
        let slots = r.shape.slots_per_token();
        self.hk.ensure(n * dk)?;
        self.logits.ensure(n * lw)?;
        for b in [&mut self.scores, &mut self.a, &mut self.coef, &mut self.w] {
            b.ensure(n * slots)?;
        }
        self.indices.ensure(n * slots)?;
        be.matmul(
            n,
            dk,
            d,
            h,
            false,
            r.w_key.view(p),
            false,
            self.hk.view_mut(),
            false,
        );
        be.matmul(
            n,
            lw,
            dk,
            self.hk.view(),
            false,
            r.w_sub.view(p),
            false,
            self.logits.view_mut(),
            false,
        );
        be.product_key_topk_forward(
            r.shape,
            self.logits.view(),
            self.scores.view_mut(),
            self.indices.view_mut(),
        );
        super::apply_overrides(&self.overrides, &mut self.scores, &mut self.indices);
        let e = &self.experts;
        be.experts_forward(
            e.shape,
            e.mode,
            h,
            self.scores.view(),
            self.indices.view(),
            e.u.view(p),
            e.v.view(p),
            ExpertsSaved {
                a: self.a.view_mut(),
                coef: self.coef.view_mut(),
                w: self.w.view_mut(),
            },
            out,
        );
        if stats {
            let (c, k, stride) = (e.shape.channels, e.shape.k, e.shape.channel_stride);
            let (indices, scores) = (self.indices.to_vec(), self.scores.to_vec());
            for (j, (&ix, &sc)) in indices.iter().zip(&scores).enumerate() {
                let row = ((j % slots) / k) * stride + ix as usize;
                debug_assert!(row < c * stride);
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
        let r = &self.router;
        let e = &self.experts;
        let (d, dk, lw) = (r.d, r.d_key, r.shape.logits_per_token());
        let slots = r.shape.slots_per_token();
        self.dscores.ensure(n * slots)?;
        self.da.ensure(n * slots)?;
        self.dlogits.ensure(n * lw)?;
        self.dhk.ensure(n * dk)?;
        zero(&**be, dh.rb());
        // u and v are adjacent in the table, so split the gradient buffer between them.
        let (gu, gv) = {
            let (lo, hi) = g.view_mut().split_at(e.v.offset);
            (lo.range(e.u.range()), hi.range(0..e.v.len))
        };
        be.experts_backward(
            e.shape,
            e.mode,
            h,
            self.scores.view(),
            self.indices.view(),
            e.u.view(p),
            e.v.view(p),
            ExpertsSavedRef {
                a: self.a.view(),
                coef: self.coef.view(),
                w: self.w.view(),
            },
            dy,
            self.dscores.view_mut(),
            self.da.view_mut(),
            ExpertsGrads {
                dx: dh.rb(),
                du: gu,
                dv: gv,
            },
        );
        be.product_key_topk_backward(
            r.shape,
            self.indices.view(),
            self.dscores.view(),
            self.dlogits.view_mut(),
        );
        let (hk, dlogits) = (self.hk.view(), self.dlogits.view());
        be.matmul(
            dk,
            lw,
            n,
            hk,
            true,
            dlogits,
            false,
            r.w_sub.view_mut(g),
            true,
        );
        be.matmul(
            n,
            dk,
            lw,
            dlogits,
            false,
            r.w_sub.view(p),
            true,
            self.dhk.view_mut(),
            false,
        );
        let dhk = self.dhk.view();
        be.matmul(d, dk, n, h, true, dhk, false, r.w_key.view_mut(g), true);
        be.matmul(n, d, dk, dhk, false, r.w_key.view(p), true, dh, true);
        Ok(())
    }
}

impl Sgatlin {
    /// Bytes held by the saved activations and scratch buffers.
    pub fn scratch_bytes(&self) -> usize {
        [
            &self.hk,
            &self.logits,
            &self.scores,
            &self.a,
            &self.coef,
            &self.w,
            &self.dscores,
            &self.da,
            &self.dlogits,
            &self.dhk,
        ]
        .iter()
        .map(|b| b.bytes())
        .sum::<usize>()
            + self.indices.bytes()
    }
}
