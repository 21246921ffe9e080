//! Dense GELU MLP without biases: y = gelu(h W1) W2.

use super::ensure;
use crate::nn::backend::Backend;
use crate::nn::config::ModelConfig;
use crate::nn::tensor::{Init, ParamId, ParamTable};

pub struct Mlp {
    d: usize,
    f: usize,
    w1: ParamId,
    w2: ParamId,
    pre: Vec<f32>,
    act: Vec<f32>,
    dact: Vec<f32>,
    dpre: Vec<f32>,
    /// Hidden activations forced at chosen token positions (activation patching).
    pub overrides: Vec<super::ActivationOverride>,
}

impl Mlp {
    pub fn new(t: &mut ParamTable, prefix: &str, cfg: &ModelConfig) -> Mlp {
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
            pre: vec![],
            act: vec![],
            dact: vec![],
            dpre: vec![],
            overrides: Vec::new(),
        }
    }

    pub fn forward(&mut self, be: &dyn Backend, p: &[f32], h: &[f32], n: usize, out: &mut [f32]) {
        let (d, f) = (self.d, self.f);
        ensure(&mut self.pre, n * f);
        ensure(&mut self.act, n * f);
        be.matmul(
            n,
            f,
            d,
            h,
            false,
            self.w1.of(p),
            false,
            &mut self.pre,
            false,
        );
        be.gelu_forward(&self.pre, &mut self.act);
        for o in &self.overrides {
            if let Some(row) = self.act.get_mut(o.token * f..(o.token + 1) * f) {
                row.copy_from_slice(&o.values);
            }
        }
        be.matmul(n, d, f, &self.act, false, self.w2.of(p), false, out, false);
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
        let (d, f) = (self.d, self.f);
        ensure(&mut self.dact, n * f);
        ensure(&mut self.dpre, n * f);
        be.matmul(
            n,
            f,
            d,
            dy,
            false,
            self.w2.of(p),
            true,
            &mut self.dact,
            false,
        );
        be.matmul(f, d, n, &self.act, true, dy, false, self.w2.of_mut(g), true);
        be.gelu_backward(&self.pre, &self.dact, &mut self.dpre);
        be.matmul(d, f, n, h, true, &self.dpre, false, self.w1.of_mut(g), true);
        be.matmul(n, d, f, &self.dpre, false, self.w1.of(p), true, dh, false);
    }
}

impl Mlp {
    pub fn hidden(&self) -> usize {
        self.f
    }

    /// The hidden activations gelu(h W1), [tokens, d_ffw], of the last forward pass.
    pub fn last_activation(&self) -> &[f32] {
        &self.act
    }

    /// Bytes held by the saved activations and scratch buffers.
    pub fn scratch_bytes(&self) -> usize {
        4 * (self.pre.capacity()
            + self.act.capacity()
            + self.dact.capacity()
            + self.dpre.capacity())
    }
}
