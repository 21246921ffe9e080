//! Dense clamped SwiGLU with biases (the GPT-OSS-style GLU of the reference code):
//! z = h W1 + b1 (gate half, linear half); y = swiglu(z) W2 + b2.

use super::ensure;
use crate::nn::backend::Backend;
use crate::nn::config::ModelConfig;
use crate::nn::tensor::{Init, ParamId, ParamTable};

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

/// Saved activations of a SwiGLU over `rows` rows.
#[derive(Default)]
pub struct SwigluActs {
    pub z: Vec<f32>,
    pub y: Vec<f32>,
    dy: Vec<f32>,
    dz: Vec<f32>,
}

/// out[rows, d] = swiglu(h W1 + b1) W2 + b2, saving z and y at `acts` rows offset..offset+rows.
#[allow(clippy::too_many_arguments)]
pub fn swiglu_block_forward(
    be: &dyn Backend,
    p: &[f32],
    w: &SwigluWeights,
    d: usize,
    f: usize,
    h: &[f32],
    rows: usize,
    z: &mut [f32],
    y: &mut [f32],
    out: &mut [f32],
) {
    be.matmul(rows, 2 * f, d, h, false, w.w1.of(p), false, z, false);
    be.add_row_vector(z, w.b1.of(p));
    be.swiglu_forward(z, f, y);
    be.matmul(rows, d, f, y, false, w.w2.of(p), false, out, false);
    be.add_row_vector(out, w.b2.of(p));
}

/// Backward of `swiglu_block_forward`; dh overwritten, weight gradients added into g.
#[allow(clippy::too_many_arguments)]
pub fn swiglu_block_backward(
    be: &dyn Backend,
    p: &[f32],
    g: &mut [f32],
    w: &SwigluWeights,
    d: usize,
    f: usize,
    h: &[f32],
    rows: usize,
    z: &[f32],
    y: &[f32],
    dout: &[f32],
    dy_scratch: &mut [f32],
    dz_scratch: &mut [f32],
    dh: &mut [f32],
) {
    be.matmul(rows, f, d, dout, false, w.w2.of(p), true, dy_scratch, false);
    be.matmul(f, d, rows, y, true, dout, false, w.w2.of_mut(g), true);
    be.sum_rows_into(dout, w.b2.of_mut(g));
    be.swiglu_backward(z, dy_scratch, f, dz_scratch);
    be.matmul(
        d,
        2 * f,
        rows,
        h,
        true,
        dz_scratch,
        false,
        w.w1.of_mut(g),
        true,
    );
    be.sum_rows_into(dz_scratch, w.b1.of_mut(g));
    be.matmul(
        rows,
        d,
        2 * f,
        dz_scratch,
        false,
        w.w1.of(p),
        true,
        dh,
        false,
    );
}

pub struct Swiglu {
    d: usize,
    f: usize,
    w: SwigluWeights,
    acts: SwigluActs,
}

impl Swiglu {
    pub fn new(t: &mut ParamTable, prefix: &str, cfg: &ModelConfig) -> Swiglu {
        let (d, f) = (cfg.d_model, cfg.d_ffw);
        Swiglu {
            d,
            f,
            w: SwigluWeights::new(t, prefix, d, f),
            acts: SwigluActs::default(),
        }
    }

    pub fn forward(&mut self, be: &dyn Backend, p: &[f32], h: &[f32], n: usize, out: &mut [f32]) {
        let (d, f) = (self.d, self.f);
        ensure(&mut self.acts.z, n * 2 * f);
        ensure(&mut self.acts.y, n * f);
        swiglu_block_forward(
            be,
            p,
            &self.w,
            d,
            f,
            h,
            n,
            &mut self.acts.z,
            &mut self.acts.y,
            out,
        );
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
        let a = &mut self.acts;
        ensure(&mut a.dy, n * f);
        ensure(&mut a.dz, n * 2 * f);
        swiglu_block_backward(
            be, p, g, &self.w, d, f, h, n, &a.z, &a.y, dy, &mut a.dy, &mut a.dz, dh,
        );
    }
}

impl Swiglu {
    /// Bytes held by the saved activations and scratch buffers.
    pub fn scratch_bytes(&self) -> usize {
        let a = &self.acts;
        4 * (a.z.capacity() + a.y.capacity() + a.dy.capacity() + a.dz.capacity())
    }
}
