//! The narrow seam between the model and the hardware: matrix products, row-wise ops, the
//! product-key router and the linear experts, and the optimiser update. Buffers are host
//! slices for now; a device backend will wrap its own buffers behind the same op list.

use super::cpu::adamw::AdamWStep;
use super::cpu::{AttnShape, ExpertMode, ExpertShape, MatRef, ProductKeyShape, SlotOrder};

/// Conventions: row-major; "forward" ops overwrite their outputs; "backward" ops add into the
/// gradients of their inputs unless documented as overwriting.
#[allow(clippy::too_many_arguments)]
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// c[m, n] (+)= op(a) · op(b); `a_t`: a stored [k, m]; `b_t`: b stored [n, k].
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
    );
    /// c[m, n] (+)= a · b with explicit strides (c has unit column stride).
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
    );
    fn rmsnorm_forward(&self, x: &[f32], scale: &[f32], d: usize, y: &mut [f32], rstd: &mut [f32]);
    fn rmsnorm_backward(
        &self,
        x: &[f32],
        scale: &[f32],
        rstd: &[f32],
        dy: &[f32],
        d: usize,
        dx: &mut [f32],
        dscale: &mut [f32],
    );
    /// In place; `inverse` is the backward pass.
    fn rope(
        &self,
        x: &mut [f32],
        cos: &[f32],
        sin: &[f32],
        seq: usize,
        heads: usize,
        hd: usize,
        inverse: bool,
    );
    fn attention_forward(
        &self,
        s: &AttnShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
        att: &mut [f32],
    );
    /// Overwrites dq, dk, dv.
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
    );
    fn gelu_forward(&self, x: &[f32], y: &mut [f32]);
    /// Overwrites dx.
    fn gelu_backward(&self, x: &[f32], dy: &[f32], dx: &mut [f32]);
    fn swiglu_forward(&self, z: &[f32], f: usize, y: &mut [f32]);
    /// Overwrites dz.
    fn swiglu_backward(&self, z: &[f32], dy: &[f32], f: usize, dz: &mut [f32]);
    /// Turns logits into d(mean loss)/d(logits) in place when `want_grad`; returns
    /// (sum of losses, counted tokens).
    fn softmax_xent(
        &self,
        logits: &mut [f32],
        targets: &[u32],
        vocab: usize,
        pad: Option<u32>,
        want_grad: bool,
    ) -> (f64, usize);
    fn product_key_topk_forward(
        &self,
        s: ProductKeyShape,
        logits: &[f32],
        scores: &mut [f32],
        indices: &mut [u32],
    );
    /// Overwrites dlogits.
    fn product_key_topk_backward(
        &self,
        s: ProductKeyShape,
        indices: &[u32],
        dscores: &[f32],
        dlogits: &mut [f32],
    );
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
    );
    /// saved = (a, coef, w) from the forward pass; overwrites dscores and da; adds into
    /// grads = (dx, du, dv).
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
    );
    /// `x[rows, d] += b[d]`
    fn add_row_vector(&self, x: &mut [f32], b: &[f32]);
    /// `out[d]` += column sums of `x[rows, d]` (fixed order).
    fn sum_rows_into(&self, x: &[f32], out: &mut [f32]);
    /// y += x
    fn add_assign(&self, y: &mut [f32], x: &[f32]);
    fn adamw_update(
        &self,
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        step: &AdamWStep,
    );
}
