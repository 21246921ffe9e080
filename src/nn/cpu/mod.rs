//! CPU kernels, one file per op family, generic over the float type so that every backward
//! can be checked against f64 finite differences. `CpuBackend` binds them at f32.

pub mod activations;
pub mod adamw;
pub mod attention;
pub mod experts;
pub mod isa;
pub mod matmul;
pub mod moe;
pub mod real;
pub mod rmsnorm;
pub mod rope;
pub mod router;
pub mod rowops;
pub mod vmath;
pub mod xent;

#[cfg(test)]
mod tests;

use super::backend::Backend;
pub use attention::AttnShape;
pub use experts::{ExpertMode, ExpertShape, SlotOrder};
pub use isa::Isa;
pub use matmul::MatRef;
pub use router::ProductKeyShape;

/// The CPU backend: `gemm` for matrix products, rayon for everything else.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn matmul(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        a_t: bool,
        b: &[f32],
        b_t: bool,
        c: &mut [f32],
        accumulate: bool,
    ) {
        matmul::matmul(m, n, k, a, a_t, b, b_t, c, accumulate)
    }
    fn matmul_strided(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: MatRef<f32>,
        b: MatRef<f32>,
        c: &mut [f32],
        c_rs: usize,
        accumulate: bool,
    ) {
        matmul::gemm_strided(m, n, k, a, b, c, c_rs, 1, accumulate)
    }
    fn rmsnorm_forward(&self, x: &[f32], scale: &[f32], d: usize, y: &mut [f32], rstd: &mut [f32]) {
        rmsnorm::rmsnorm_forward(x, scale, d, y, rstd)
    }
    fn rmsnorm_backward(
        &self,
        x: &[f32],
        scale: &[f32],
        rstd: &[f32],
        dy: &[f32],
        d: usize,
        dx: &mut [f32],
        dscale: &mut [f32],
    ) {
        rmsnorm::rmsnorm_backward(x, scale, rstd, dy, d, dx, dscale)
    }
    fn rope(
        &self,
        x: &mut [f32],
        cos: &[f32],
        sin: &[f32],
        seq: usize,
        heads: usize,
        hd: usize,
        inverse: bool,
    ) {
        rope::rope_apply(x, cos, sin, seq, heads, hd, inverse)
    }
    fn attention_forward(
        &self,
        s: &AttnShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
        att: &mut [f32],
    ) {
        attention::attention_forward(s, q, k, v, out, att)
    }
    fn attention_backward(
        &self,
        s: &AttnShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        att: &[f32],
        dout: &[f32],
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        attention::attention_backward(s, q, k, v, att, dout, dq, dk, dv)
    }
    fn gelu_forward(&self, x: &[f32], y: &mut [f32]) {
        activations::gelu_forward(x, y)
    }
    fn gelu_backward(&self, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        activations::gelu_backward(x, dy, dx)
    }
    fn swiglu_forward(&self, z: &[f32], f: usize, y: &mut [f32]) {
        activations::swiglu_forward(z, f, y)
    }
    fn swiglu_backward(&self, z: &[f32], dy: &[f32], f: usize, dz: &mut [f32]) {
        activations::swiglu_backward(z, dy, f, dz)
    }
    fn softmax_xent(
        &self,
        logits: &mut [f32],
        targets: &[u32],
        vocab: usize,
        pad: Option<u32>,
        want_grad: bool,
    ) -> (f64, usize) {
        xent::softmax_xent(logits, targets, vocab, pad, want_grad)
    }
    fn product_key_topk_forward(
        &self,
        s: ProductKeyShape,
        logits: &[f32],
        scores: &mut [f32],
        indices: &mut [u32],
    ) {
        router::product_key_topk_forward(s, logits, scores, indices)
    }
    fn product_key_topk_backward(
        &self,
        s: ProductKeyShape,
        indices: &[u32],
        dscores: &[f32],
        dlogits: &mut [f32],
    ) {
        router::product_key_topk_backward(s, indices, dscores, dlogits)
    }
    fn experts_forward(
        &self,
        s: ExpertShape,
        mode: ExpertMode,
        x: &[f32],
        scores: &[f32],
        indices: &[u32],
        u: &[f32],
        v: &[f32],
        a: &mut [f32],
        coef: &mut [f32],
        w: &mut [f32],
        y: &mut [f32],
    ) {
        experts::experts_forward(s, mode, x, scores, indices, u, v, a, coef, w, y)
    }
    fn experts_backward(
        &self,
        s: ExpertShape,
        mode: ExpertMode,
        x: &[f32],
        scores: &[f32],
        indices: &[u32],
        u: &[f32],
        v: &[f32],
        saved: (&[f32], &[f32], &[f32]),
        dy: &[f32],
        dscores: &mut [f32],
        da: &mut [f32],
        grads: (&mut [f32], &mut [f32], &mut [f32]),
        order: &mut SlotOrder,
    ) {
        let (a, coef, w) = saved;
        let (dx, du, dv) = grads;
        experts::experts_backward(
            s, mode, x, scores, indices, u, v, a, coef, w, dy, dscores, da, dx, du, dv, order,
        )
    }
    fn add_row_vector(&self, x: &mut [f32], b: &[f32]) {
        rowops::add_row_vector(x, b)
    }
    fn sum_rows_into(&self, x: &[f32], out: &mut [f32]) {
        rowops::sum_rows_into(x, out)
    }
    fn add_assign(&self, y: &mut [f32], x: &[f32]) {
        rowops::add_assign(y, x)
    }
    fn adamw_update(
        &self,
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        step: &adamw::AdamWStep,
    ) {
        adamw::adamw_update(p, g, m, v, step)
    }
}
