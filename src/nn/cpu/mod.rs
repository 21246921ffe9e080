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

use super::backend::{
    AdamWStep, Addr, AttnShape, Backend, Bf16, ExpertMode, ExpertShape, ExpertsGrads, ExpertsSaved,
    ExpertsSavedRef, Pool, ProductKeyShape, Strided, View, ViewMut,
};
pub use experts::SlotOrder;
pub use isa::Isa;
pub use matmul::MatRef;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::borrow::Cow;
use std::sync::Mutex;

/// The CPU backend: host memory, `gemm` for matrix products, rayon for everything else.
#[derive(Default)]
pub struct CpuBackend {
    /// The experts' backward sort, kept between steps so that it allocates once.
    order: Mutex<SlotOrder>,
}

/// Memory is aligned for the widest vector loads.
const ALIGN: usize = 64;

fn s<T: super::backend::Elem>(v: View<'_, T>) -> &[T] {
    v.host().expect("the cpu backend computes in host memory")
}

/// The pools as f32 rows: the parameters, or a bf16 copy widened (the values the CUDA
/// kernels compute with when they load bf16 rows).
fn pool_rows(pool: Pool<'_>) -> (Cow<'_, [f32]>, Cow<'_, [f32]>) {
    let widen = |x: View<'_, Bf16>| -> Cow<'_, [f32]> {
        Cow::Owned(s(x).iter().map(|b| b.to_f32()).collect())
    };
    match pool {
        Pool::F32 { u, v } => (Cow::Borrowed(s(u)), Cow::Borrowed(s(v))),
        Pool::Bf16 { u, v } => (widen(u), widen(v)),
    }
}

fn m<T: super::backend::Elem>(v: ViewMut<'_, T>) -> &mut [T] {
    v.into_host()
        .expect("the cpu backend computes in host memory")
}

/// (token, expert) pairs stored two u32 a row.
fn pairs(v: View<'_, u32>) -> &[[u32; 2]] {
    let flat = s(v);
    // SAFETY: [u32; 2] has the alignment of u32 and no padding.
    unsafe { std::slice::from_raw_parts(flat.as_ptr() as *const [u32; 2], flat.len() / 2) }
}

fn pairs_mut(v: ViewMut<'_, u32>) -> &mut [[u32; 2]] {
    let flat = m(v);
    // SAFETY: as `pairs`.
    unsafe { std::slice::from_raw_parts_mut(flat.as_mut_ptr() as *mut [u32; 2], flat.len() / 2) }
}

fn mat(a: Strided<'_>) -> MatRef<'_, f32> {
    MatRef {
        data: s(a.v),
        rs: a.rs,
        cs: a.cs,
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn alloc(&self, bytes: usize) -> Result<Addr, String> {
        let layout = Layout::from_size_align(bytes.max(1), ALIGN)
            .map_err(|_| format!("cannot allocate {bytes} bytes"))?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        if p.is_null() {
            return Err(format!(
                "cannot allocate {}",
                super::memory::gib(bytes as f64)
            ));
        }
        Ok(p as Addr)
    }
    fn free(&self, addr: Addr, bytes: usize) {
        // SAFETY: `addr` came from `alloc` with this size.
        unsafe {
            dealloc(
                addr as *mut u8,
                Layout::from_size_align_unchecked(bytes.max(1), ALIGN),
            )
        }
    }
    fn host_memory(&self) -> bool {
        true
    }
    fn upload(&self, dst: Addr, src: &[u8]) {
        // SAFETY: `dst` is host memory of at least src.len() bytes (Buf::upload checks).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) }
    }
    fn download(&self, src: Addr, dst: &mut [u8]) {
        // SAFETY: as upload.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) }
    }
    fn copy(&self, dst: Addr, src: Addr, bytes: usize) {
        // SAFETY: two host buffers of `bytes` (Buf::copy_from checks the lengths).
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) }
    }
    fn zero(&self, dst: Addr, bytes: usize) {
        // SAFETY: host memory of `bytes`.
        unsafe { std::ptr::write_bytes(dst as *mut u8, 0, bytes) }
    }
    fn matmul(
        &self,
        m_: usize,
        n: usize,
        k: usize,
        a: View<f32>,
        a_t: bool,
        b: View<f32>,
        b_t: bool,
        c: ViewMut<f32>,
        accumulate: bool,
    ) {
        matmul::matmul(m_, n, k, s(a), a_t, s(b), b_t, m(c), accumulate)
    }
    fn matmul_strided(
        &self,
        m_: usize,
        n: usize,
        k: usize,
        a: Strided,
        b: Strided,
        c: ViewMut<f32>,
        c_rs: usize,
        accumulate: bool,
    ) {
        matmul::gemm_strided(m_, n, k, mat(a), mat(b), m(c), c_rs, 1, accumulate)
    }
    fn rmsnorm_forward(
        &self,
        x: View<f32>,
        scale: View<f32>,
        d: usize,
        y: ViewMut<f32>,
        rstd: ViewMut<f32>,
    ) {
        rmsnorm::rmsnorm_forward(s(x), s(scale), d, m(y), m(rstd))
    }
    fn rmsnorm_backward(
        &self,
        x: View<f32>,
        scale: View<f32>,
        rstd: View<f32>,
        dy: View<f32>,
        d: usize,
        dx: ViewMut<f32>,
        dscale: ViewMut<f32>,
    ) {
        rmsnorm::rmsnorm_backward(s(x), s(scale), s(rstd), s(dy), d, m(dx), m(dscale))
    }
    fn rope(
        &self,
        x: ViewMut<f32>,
        cos: View<f32>,
        sin: View<f32>,
        seq: usize,
        heads: usize,
        hd: usize,
        inverse: bool,
    ) {
        rope::rope_apply(m(x), s(cos), s(sin), seq, heads, hd, inverse)
    }
    fn attention_saved_len(&self, a: &AttnShape) -> usize {
        a.batch * a.heads * a.seq * a.seq
    }
    fn attention_forward(
        &self,
        a: &AttnShape,
        q: View<f32>,
        k: View<f32>,
        v: View<f32>,
        out: ViewMut<f32>,
        saved: ViewMut<f32>,
    ) {
        attention::attention_forward(a, s(q), s(k), s(v), m(out), m(saved))
    }
    fn attention_backward(
        &self,
        a: &AttnShape,
        q: View<f32>,
        k: View<f32>,
        v: View<f32>,
        _out: View<f32>,
        saved: View<f32>,
        dout: View<f32>,
        dq: ViewMut<f32>,
        dk: ViewMut<f32>,
        dv: ViewMut<f32>,
    ) {
        attention::attention_backward(a, s(q), s(k), s(v), s(saved), s(dout), m(dq), m(dk), m(dv))
    }
    fn gelu_forward(&self, x: View<f32>, y: ViewMut<f32>) {
        activations::gelu_forward(s(x), m(y))
    }
    fn gelu_backward(&self, x: View<f32>, dy: View<f32>, dx: ViewMut<f32>) {
        activations::gelu_backward(s(x), s(dy), m(dx))
    }
    fn swiglu_forward(&self, z: View<f32>, f: usize, y: ViewMut<f32>) {
        activations::swiglu_forward(s(z), f, m(y))
    }
    fn swiglu_backward(&self, z: View<f32>, dy: View<f32>, f: usize, dz: ViewMut<f32>) {
        activations::swiglu_backward(s(z), s(dy), f, m(dz))
    }
    fn embedding_forward(&self, table: View<f32>, tokens: View<u32>, d: usize, out: ViewMut<f32>) {
        rowops::gather_rows(s(table), s(tokens), d, m(out))
    }
    fn embedding_backward(
        &self,
        dx: View<f32>,
        tokens: View<u32>,
        _host_tokens: &[u32],
        d: usize,
        dtable: ViewMut<f32>,
    ) {
        rowops::scatter_add_rows(s(dx), s(tokens), d, m(dtable))
    }
    fn softmax_xent(
        &self,
        logits: ViewMut<f32>,
        targets: View<u32>,
        vocab: usize,
        pad: Option<u32>,
        counted: usize,
        want_grad: bool,
    ) -> f64 {
        let (sum, count) = xent::softmax_xent(m(logits), s(targets), vocab, pad, want_grad);
        debug_assert_eq!(count, counted);
        sum
    }
    fn product_key_topk_forward(
        &self,
        ps: ProductKeyShape,
        logits: View<f32>,
        scores: ViewMut<f32>,
        indices: ViewMut<u32>,
    ) {
        router::product_key_topk_forward(ps, s(logits), m(scores), m(indices))
    }
    fn product_key_topk_backward(
        &self,
        ps: ProductKeyShape,
        indices: View<u32>,
        dscores: View<f32>,
        dlogits: ViewMut<f32>,
    ) {
        router::product_key_topk_backward(ps, s(indices), s(dscores), m(dlogits))
    }
    fn experts_forward(
        &self,
        es: ExpertShape,
        mode: ExpertMode,
        x: View<f32>,
        scores: View<f32>,
        indices: View<u32>,
        pool: Pool,
        saved: ExpertsSaved,
        y: ViewMut<f32>,
    ) {
        let (u, v) = pool_rows(pool);
        experts::experts_forward(
            es,
            mode,
            s(x),
            s(scores),
            s(indices),
            &u,
            &v,
            m(saved.a),
            m(saved.coef),
            m(saved.w),
            m(y),
        )
    }
    fn experts_backward(
        &self,
        es: ExpertShape,
        mode: ExpertMode,
        x: View<f32>,
        scores: View<f32>,
        indices: View<u32>,
        pool: Pool,
        saved: ExpertsSavedRef,
        dy: View<f32>,
        dscores: ViewMut<f32>,
        da: ViewMut<f32>,
        grads: ExpertsGrads,
    ) {
        let (u, v) = pool_rows(pool);
        let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        experts::experts_backward(
            es,
            mode,
            s(x),
            s(scores),
            s(indices),
            &u,
            &v,
            s(saved.a),
            s(saved.coef),
            s(saved.w),
            s(dy),
            m(dscores),
            m(da),
            m(grads.dx),
            m(grads.du),
            m(grads.dv),
            &mut order,
        )
    }
    fn moe_route(
        &self,
        logits: View<f32>,
        ne: usize,
        k: usize,
        probs: ViewMut<f32>,
        chosen: ViewMut<u32>,
        routes: ViewMut<u32>,
        starts: ViewMut<u32>,
        token_rows: ViewMut<u32>,
    ) {
        let chosen = m(chosen);
        moe::topk_softmax(s(logits), ne, k, m(probs), chosen);
        moe::sort_routes(chosen, ne, k, pairs_mut(routes), m(starts), m(token_rows))
    }
    fn moe_gather(&self, h: View<f32>, routes: View<u32>, d: usize, hx: ViewMut<f32>) {
        moe::gather(s(h), pairs(routes), d, m(hx))
    }
    fn moe_combine(
        &self,
        o: View<f32>,
        probs: View<f32>,
        routes: View<u32>,
        token_rows: View<u32>,
        ne: usize,
        k: usize,
        d: usize,
        out: ViewMut<f32>,
    ) {
        moe::combine(
            s(o),
            s(probs),
            pairs(routes),
            s(token_rows),
            ne,
            k,
            d,
            m(out),
        )
    }
    fn moe_combine_backward(
        &self,
        dy: View<f32>,
        o: View<f32>,
        probs: View<f32>,
        routes: View<u32>,
        _token_rows: View<u32>,
        ne: usize,
        _k: usize,
        d: usize,
        dout: ViewMut<f32>,
        dprob: ViewMut<f32>,
    ) {
        moe::combine_backward(
            s(dy),
            s(o),
            s(probs),
            pairs(routes),
            ne,
            d,
            m(dout),
            m(dprob),
        )
    }
    fn softmax_backward(
        &self,
        probs: View<f32>,
        dprob: View<f32>,
        ne: usize,
        dlogits: ViewMut<f32>,
    ) {
        moe::softmax_backward(s(probs), s(dprob), ne, m(dlogits))
    }
    fn moe_scatter_add(
        &self,
        dhx: View<f32>,
        token_rows: View<u32>,
        k: usize,
        d: usize,
        dh: ViewMut<f32>,
    ) {
        moe::scatter_add(s(dhx), s(token_rows), k, d, m(dh))
    }
    fn add_row_vector(&self, x: ViewMut<f32>, b: View<f32>) {
        rowops::add_row_vector(m(x), s(b))
    }
    fn sum_rows_into(&self, x: View<f32>, out: ViewMut<f32>) {
        rowops::sum_rows_into(s(x), m(out))
    }
    fn add_assign(&self, y: ViewMut<f32>, x: View<f32>) {
        rowops::add_assign(m(y), s(x))
    }
    fn scale(&self, x: ViewMut<f32>, factor: f32) {
        rowops::scale(m(x), factor)
    }
    fn round_bf16(&self, x: View<f32>, out: ViewMut<Bf16>) {
        rowops::round_bf16(s(x), m(out))
    }
    fn sum_squares(&self, x: View<f32>) -> f64 {
        rowops::sum_squares(s(x))
    }
    fn adamw_update(
        &self,
        p: ViewMut<f32>,
        g: View<f32>,
        mm: ViewMut<f32>,
        v: ViewMut<f32>,
        step: &AdamWStep,
    ) {
        adamw::adamw_update(m(p), s(g), m(mm), m(v), step)
    }
}
