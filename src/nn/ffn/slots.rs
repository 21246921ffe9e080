//! What sgatlin and PEER share below their routers: the product-key top-k and the tiny linear
//! experts it selects, with the slots' buffers ([tokens, C, k] each).

use super::RoutingOverride;
use crate::nn::backend::{
    zero, Backend, Buf, ExpertMode, ExpertShape, ExpertsGrads, ExpertsSaved, ExpertsSavedRef,
    ProductKeyShape, View, ViewMut,
};
use crate::nn::model::host_or_copy;
use crate::nn::tensor::ParamId;
use std::sync::Arc;

pub struct Slots {
    pub router: ProductKeyShape,
    pub experts: ExpertShape,
    pub mode: ExpertMode,
    /// The pools: u (down) and v (up); v follows u in the parameter table.
    pub u: ParamId,
    pub v: ParamId,
    /// The router's outputs (raw scores and pool indices) of the last forward pass.
    pub scores: Buf<f32>,
    pub indices: Buf<u32>,
    a: Buf<f32>,
    coef: Buf<f32>,
    /// PEER's softmax weights (gate mass).
    pub w: Buf<f32>,
    dscores: Buf<f32>,
    da: Buf<f32>,
    /// Forced router outputs (gating patching); empty in training.
    pub overrides: Vec<RoutingOverride>,
}

impl Slots {
    pub fn new(
        be: &Arc<dyn Backend>,
        router: ProductKeyShape,
        experts: ExpertShape,
        mode: ExpertMode,
        (u, v): (ParamId, ParamId),
    ) -> Slots {
        assert_eq!(u.offset + u.len, v.offset, "v follows u in the table");
        Slots {
            router,
            experts,
            mode,
            u,
            v,
            scores: Buf::empty(be),
            indices: Buf::empty(be),
            a: Buf::empty(be),
            coef: Buf::empty(be),
            w: Buf::empty(be),
            dscores: Buf::empty(be),
            da: Buf::empty(be),
            overrides: Vec::new(),
        }
    }

    /// out[n, d] (overwritten) from the router's `logits`: top-k (with the overrides), then the
    /// selected experts of `h`.
    pub fn forward(
        &mut self,
        be: &dyn Backend,
        p: &Buf<f32>,
        logits: View<f32>,
        h: View<f32>,
        out: ViewMut<f32>,
    ) -> Result<(), String> {
        let n = logits.len() / self.router.logits_per_token();
        let slots = n * self.router.slots_per_token();
        for b in [&mut self.scores, &mut self.a, &mut self.coef, &mut self.w] {
            b.ensure(slots)?;
        }
        self.indices.ensure(slots)?;
        be.product_key_topk_forward(
            self.router,
            logits,
            self.scores.view_mut(),
            self.indices.view_mut(),
        );
        super::apply_overrides(&self.overrides, &mut self.scores, &mut self.indices);
        be.experts_forward(
            self.experts,
            self.mode,
            h,
            self.scores.view(),
            self.indices.view(),
            self.u.view(p),
            self.v.view(p),
            ExpertsSaved {
                a: self.a.view_mut(),
                coef: self.coef.view_mut(),
                w: self.w.view_mut(),
            },
            out,
        );
        Ok(())
    }

    /// dh overwritten with the experts' input gradient, the pools' gradients added into g, and
    /// the router logits' gradient in `dlogits` (overwritten).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        be: &dyn Backend,
        p: &Buf<f32>,
        g: &mut Buf<f32>,
        h: View<f32>,
        dy: View<f32>,
        mut dh: ViewMut<f32>,
        dlogits: ViewMut<f32>,
    ) -> Result<(), String> {
        let slots = self.scores.len();
        self.dscores.ensure(slots)?;
        self.da.ensure(slots)?;
        zero(be, dh.rb());
        // u and v are adjacent in the table, so split the gradient buffer between them.
        let (gu, gv) = {
            let (lo, hi) = g.view_mut().split_at(self.v.offset);
            (lo.range(self.u.range()), hi.range(0..self.v.len))
        };
        be.experts_backward(
            self.experts,
            self.mode,
            h,
            self.scores.view(),
            self.indices.view(),
            self.u.view(p),
            self.v.view(p),
            ExpertsSavedRef {
                a: self.a.view(),
                coef: self.coef.view(),
                w: self.w.view(),
            },
            dy,
            self.dscores.view_mut(),
            self.da.view_mut(),
            ExpertsGrads {
                dx: dh,
                du: gu,
                dv: gv,
            },
        );
        be.product_key_topk_backward(
            self.router,
            self.indices.view(),
            self.dscores.view(),
            dlogits,
        );
        Ok(())
    }

    /// The router's outputs of the last forward pass.
    pub fn routing(&self) -> super::Routing<'_> {
        (host_or_copy(&self.scores), host_or_copy(&self.indices))
    }

    /// Bytes held by the slots' buffers.
    pub fn bytes(&self) -> usize {
        [
            &self.scores,
            &self.a,
            &self.coef,
            &self.w,
            &self.dscores,
            &self.da,
        ]
        .iter()
        .map(|b| b.bytes())
        .sum::<usize>()
            + self.indices.bytes()
    }
}
