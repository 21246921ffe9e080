//! Dense GELU MLP without biases: y = gelu(h W1) W2.

use crate::nn::backend::{Backend, Buf, View, ViewMut};
use crate::nn::config::ModelConfig;
use crate::nn::tensor::{Init, ParamId, ParamTable};
use std::borrow::Cow;
use std::sync::Arc;

pub struct Mlp {
    d: usize,
    f: usize,
    w1: ParamId,
    w2: ParamId,
    pre: Buf<f32>,
    act: Buf<f32>,
    dact: Buf<f32>,
    dpre: Buf<f32>,
    /// Hidden activations forced at chosen token positions (activation patching).
    pub overrides: Vec<super::ActivationOverride>,
}

impl Mlp {
    pub fn new(t: &mut ParamTable, prefix: &str, cfg: &ModelConfig, be: &Arc<dyn Backend>) -> Mlp {
        let (d, f) = (cfg.d_model, cfg.d_ffw);
        let w1 = t.add(
            format!("{prefix}.w1"),
            &[d, f],
            Init::TruncatedNormal(1.0 / (d as f64).sqrt()),
            true,
        );
        let w2 = t.add(
            format!("{prefix}.w2"),
            &[f, d],
            Init::TruncatedNormal(1.0 / (f as f64).sqrt()),
            true,
        );
        Mlp {
            d,
            f,
            w1,
            w2,
            pre: Buf::empty(be),
            act: Buf::empty(be),
            dact: Buf::empty(be),
            dpre: Buf::empty(be),
            overrides: Vec::new(),
        }
    }

    pub fn forward(
        &mut self,
        be: &Arc<dyn Backend>,
        p: &Buf<f32>,
        h: View<f32>,
        n: usize,
        out: ViewMut<f32>,
    ) -> Result<(), String> {
        let (d, f) = (self.d, self.f);
        self.pre.ensure(n * f)?;
        self.act.ensure(n * f)?;
        be.matmul(
            n,
            f,
            d,
            h,
            false,
            self.w1.view(p),
            false,
            self.pre.view_mut(),
            false,
        );
        be.gelu_forward(self.pre.view(), self.act.view_mut());
        for o in &self.overrides {
            if (o.token + 1) * f <= n * f {
                self.act.upload_at(o.token * f, &o.values);
            }
        }
        be.matmul(
            n,
            d,
            f,
            self.act.view(),
            false,
            self.w2.view(p),
            false,
            out,
            false,
        );
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
        dh: ViewMut<f32>,
    ) -> Result<(), String> {
        let (d, f) = (self.d, self.f);
        self.dact.ensure(n * f)?;
        self.dpre.ensure(n * f)?;
        be.matmul(
            n,
            f,
            d,
            dy,
            false,
            self.w2.view(p),
            true,
            self.dact.view_mut(),
            false,
        );
        be.matmul(
            f,
            d,
            n,
            self.act.view(),
            true,
            dy,
            false,
            self.w2.view_mut(g),
            true,
        );
        be.gelu_backward(self.pre.view(), self.dact.view(), self.dpre.view_mut());
        be.matmul(
            d,
            f,
            n,
            h,
            true,
            self.dpre.view(),
            false,
            self.w1.view_mut(g),
            true,
        );
        be.matmul(
            n,
            d,
            f,
            self.dpre.view(),
            false,
            self.w1.view(p),
            true,
            dh,
            false,
        );
        Ok(())
    }
}

impl Mlp {
    pub fn hidden(&self) -> usize {
        self.f
    }

    /// The hidden activations gelu(h W1), [tokens, d_ffw], of the last forward pass.
    pub fn last_activation(&self) -> Cow<'_, [f32]> {
        crate::nn::model::host_or_copy(&self.act)
    }

    /// Bytes held by the saved activations and scratch buffers.
    pub fn scratch_bytes(&self) -> usize {
        self.pre.bytes() + self.act.bytes() + self.dact.bytes() + self.dpre.bytes()
    }
}
