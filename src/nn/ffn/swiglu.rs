//! Dense clamped SwiGLU with biases (the GPT-OSS-style GLU of the reference code):
//! z = h W1 + b1 (gate half, linear half); y = swiglu(z) W2 + b2.

use crate::nn::backend::{Backend, Buf, View, ViewMut};
use crate::nn::config::ModelConfig;
use crate::nn::tensor::{Init, ParamId, ParamTable};
use std::sync::Arc;

/// One clamped-SwiGLU block; also the expert of `moe`.
pub struct SwigluWeights {
    pub w1: ParamId,
    pub b1: ParamId,
    pub w2: ParamId,
    pub b2: ParamId,
}

impl SwigluWeights {
    pub fn new(t: &mut ParamTable, prefix: &str, d: usize, f: usize) -> SwigluWeights {
        SwigluWeights {
            w1: t.add(
                format!("{prefix}.w1"),
                &[d, 2 * f],
                Init::TruncatedNormal(1.0 / (d as f64).sqrt()),
                true,
            ),
            b1: t.add(format!("{prefix}.b1"), &[2 * f], Init::Zeros, true),
            w2: t.add(
                format!("{prefix}.w2"),
                &[f, d],
                Init::TruncatedNormal(1.0 / (f as f64).sqrt()),
                true,
            ),
            b2: t.add(format!("{prefix}.b2"), &[d], Init::Zeros, true),
        }
    }

    /// The range of the flat buffers the four tensors fill (they are added one after another),
    /// and the same weights with offsets counted from its start, for a task that gets only
    /// that range.
    pub fn span(&self) -> (std::ops::Range<usize>, SwigluWeights) {
        let start = self.w1.offset;
        let end = self.b2.offset + self.b2.len;
        debug_assert_eq!(
            end - start,
            self.w1.len + self.b1.len + self.w2.len + self.b2.len
        );
        let at = |p: ParamId| ParamId {
            offset: p.offset - start,
            len: p.len,
        };
        let rebased = SwigluWeights {
            w1: at(self.w1),
            b1: at(self.b1),
            w2: at(self.w2),
            b2: at(self.b2),
        };
        (start..end, rebased)
    }
}

/// out[rows, d] = swiglu(h W1 + b1) W2 + b2, saving z and y; `p` holds the weights `w`.
#[allow(clippy::too_many_arguments)]
pub fn swiglu_block_forward(
    be: &dyn Backend,
    p: View<f32>,
    w: &SwigluWeights,
    d: usize,
    f: usize,
    h: View<f32>,
    rows: usize,
    mut z: ViewMut<f32>,
    mut y: ViewMut<f32>,
    mut out: ViewMut<f32>,
) {
    be.matmul(
        rows,
        2 * f,
        d,
        h,
        false,
        w.w1.within(p),
        false,
        z.rb(),
        false,
    );
    be.add_row_vector(z.rb(), w.b1.within(p));
    be.swiglu_forward(z.view(), f, y.rb());
    be.matmul(
        rows,
        d,
        f,
        y.view(),
        false,
        w.w2.within(p),
        false,
        out.rb(),
        false,
    );
    be.add_row_vector(out, w.b2.within(p));
}

/// Backward of `swiglu_block_forward`; dh overwritten, weight gradients added into g (laid
/// out like `p`).
#[allow(clippy::too_many_arguments)]
pub fn swiglu_block_backward(
    be: &dyn Backend,
    p: View<f32>,
    mut g: ViewMut<f32>,
    w: &SwigluWeights,
    d: usize,
    f: usize,
    h: View<f32>,
    rows: usize,
    z: View<f32>,
    y: View<f32>,
    dout: View<f32>,
    mut dy_scratch: ViewMut<f32>,
    mut dz_scratch: ViewMut<f32>,
    dh: ViewMut<f32>,
) {
    be.matmul(
        rows,
        f,
        d,
        dout,
        false,
        w.w2.within(p),
        true,
        dy_scratch.rb(),
        false,
    );
    be.matmul(
        f,
        d,
        rows,
        y,
        true,
        dout,
        false,
        w.w2.within_mut(&mut g),
        true,
    );
    be.sum_rows_into(dout, w.b2.within_mut(&mut g));
    be.swiglu_backward(z, dy_scratch.view(), f, dz_scratch.rb());
    let dz = dz_scratch.view();
    be.matmul(
        d,
        2 * f,
        rows,
        h,
        true,
        dz,
        false,
        w.w1.within_mut(&mut g),
        true,
    );
    be.sum_rows_into(dz, w.b1.within_mut(&mut g));
    be.matmul(rows, d, 2 * f, dz, false, w.w1.within(p), true, dh, false);
}

pub struct Swiglu {
    d: usize,
    f: usize,
    w: SwigluWeights,
    z: Buf<f32>,
    y: Buf<f32>,
    dy: Buf<f32>,
    dz: Buf<f32>,
}

impl Swiglu {
    pub fn new(
        t: &mut ParamTable,
        prefix: &str,
        cfg: &ModelConfig,
        be: &Arc<dyn Backend>,
    ) -> Swiglu {
        let (d, f) = (cfg.d_model, cfg.d_ffw);
        Swiglu {
            d,
            f,
            w: SwigluWeights::new(t, prefix, d, f),
            z: Buf::empty(be),
            y: Buf::empty(be),
            dy: Buf::empty(be),
            dz: Buf::empty(be),
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
        self.z.ensure(n * 2 * f)?;
        self.y.ensure(n * f)?;
        swiglu_block_forward(
            &**be,
            p.view(),
            &self.w,
            d,
            f,
            h,
            n,
            self.z.view_mut(),
            self.y.view_mut(),
            out,
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
        self.dy.ensure(n * f)?;
        self.dz.ensure(n * 2 * f)?;
        swiglu_block_backward(
            &**be,
            p.view(),
            g.view_mut(),
            &self.w,
            d,
            f,
            h,
            n,
            self.z.view(),
            self.y.view(),
            dy,
            self.dy.view_mut(),
            self.dz.view_mut(),
            dh,
        );
        Ok(())
    }

    /// Bytes held by the saved activations and scratch buffers.
    pub fn scratch_bytes(&self) -> usize {
        self.z.bytes() + self.y.bytes() + self.dy.bytes() + self.dz.bytes()
    }
}
