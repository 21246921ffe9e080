//! What sgatlin and PEER share below their routers: the product-key top-k and the tiny linear
//! experts it selects, with the slots' buffers ([tokens, C, k] each).

use super::RoutingOverride;
use crate::nn::backend::{
    zero, Backend, Bf16, Buf, ExpertMode, ExpertShape, ExpertsGrads, ExpertsSaved, ExpertsSavedRef,
    Pool, ProductKeyShape, Storage, View, ViewMut,
};
use crate::nn::model::host_or_copy;
use crate::nn::tensor::ParamId;
use std::sync::Arc;

/// The pools as the expert ops read them (the shadow holds u then v).
fn pool<'a>(
    storage: Storage,
    u: ParamId,
    v: ParamId,
    p: &'a Buf<f32>,
    shadow: &'a Buf<Bf16>,
) -> Pool<'a> {
    match storage {
        Storage::F32 => Pool::F32 {
            u: u.view(p),
            v: v.view(p),
        },
        Storage::Bf16 => Pool::Bf16 {
            u: shadow.range(0..u.len),
            v: shadow.range(u.len..u.len + v.len),
        },
    }
}

pub struct Slots {
    pub router: ProductKeyShape,
    pub experts: ExpertShape,
    pub mode: ExpertMode,
    /// The pools: u (down) and v (up); v follows u in the parameter table.
    pub u: ParamId,
    pub v: ParamId,
    pub storage: Storage,
    /// With bf16 storage: the copy of u and v (adjacent, as in the table) that the experts
    /// read, made at each forward pass.
    shadow: Buf<Bf16>,
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
            storage: Storage::F32,
            shadow: Buf::empty(be),
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
        if self.storage == Storage::Bf16 {
            let pools = self.u.offset..self.v.offset + self.v.len;
            self.shadow.ensure(pools.len())?;
            be.round_bf16(p.range(pools), self.shadow.view_mut());
        }
        be.experts_forward(
            self.experts,
            self.mode,
            h,
            self.scores.view(),
            self.indices.view(),
            pool(self.storage, self.u, self.v, p, &self.shadow),
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
            pool(self.storage, self.u, self.v, p, &self.shadow),
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
            + self.shadow.bytes()
    }
}

#[cfg(test)]
mod tests {
    use crate::interp::testing::fresh_seed;
    use crate::nn::backend::{Bf16, Storage};
    use crate::nn::train::tests::{pattern_batch, tiny, train_cfg};
    use crate::nn::{FfnKind, Trainer};

    /// The model's parameters with every expert pool rounded to bf16.
    fn pools_rounded(t: &Trainer) -> Vec<f32> {
        let mut p = t.model.param_values().to_vec();
        for info in &t.model.table.infos {
            if info.name.ends_with(".experts.u") || info.name.ends_with(".experts.v") {
                for x in &mut p[info.offset..info.offset + info.len] {
                    *x = Bf16::from_f32(*x).to_f32();
                }
            }
        }
        p
    }

    /// Training with bf16 storage computes with the pools rounded to bf16 at every step (the
    /// copy follows the optimiser's updates), and keeps the f32 parameters: each step's loss
    /// and gradients equal those of an f32 model whose pools are the rounded ones.
    #[test]
    fn bf16_storage_computes_with_rounded_pools_and_keeps_f32_parameters() {
        let seed = fresh_seed();
        for kind in [FfnKind::Sgatlin, FfnKind::SgatlinGelu, FfnKind::Peer] {
            let cfg = tiny(kind);
            let mut bf = Trainer::new(&cfg, train_cfg(3)).unwrap();
            bf.model.set_expert_storage(Storage::Bf16).unwrap();
            let mut reference = Trainer::new(&cfg, train_cfg(3)).unwrap();
            for step in 0..3 {
                let batch = pattern_batch(step + seed as usize % 7, 2, cfg.seq_len);
                reference.model.set_params(&pools_rounded(&bf)).unwrap();
                let (inputs, targets): (Vec<u32>, Vec<u32>) = batch
                    .chunks(cfg.seq_len + 1)
                    .flat_map(|r| r[..cfg.seq_len].iter().zip(&r[1..]).map(|(&a, &b)| (a, b)))
                    .unzip();
                let want = reference
                    .model
                    .forward_backward(&inputs, &targets, None)
                    .unwrap();
                let before = bf.model.param_values().to_vec();
                let got = bf.step(&batch).unwrap();
                let case = format!("{} seed {seed} step {step}", kind.as_str());
                assert_eq!(got.loss.to_bits(), want.loss.to_bits(), "{case}");
                assert_eq!(
                    bf.model.grad_values().to_vec(),
                    reference.model.grad_values().to_vec(),
                    "{case}"
                );
                // The update applies to the unrounded f32 parameters.
                let after = bf.model.param_values();
                assert!(after.iter().zip(&before).any(|(a, b)| a != b), "{case}");
                assert!(
                    after.iter().any(|&x| Bf16::from_f32(x).to_f32() != x),
                    "{case}: parameters were rounded"
                );
            }
        }
    }

    #[test]
    fn bf16_storage_is_refused_without_expert_pools() {
        for kind in [FfnKind::Mlp, FfnKind::Swiglu, FfnKind::Moe] {
            let mut t = Trainer::new(&tiny(kind), train_cfg(1)).unwrap();
            let err = t.model.set_expert_storage(Storage::Bf16).unwrap_err();
            assert!(err.contains("expert pools"), "{err}");
            t.model.set_expert_storage(Storage::F32).unwrap();
        }
    }
}
