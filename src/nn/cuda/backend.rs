//! The CUDA backend: every op of `nn::Backend` as kernel launches of kernels/*.cu and matrix
//! products, through a `Driver` (cudarc on a GPU, the host emulator in CI). One code path for
//! both drivers: buffers, launch sizes, argument order and the order of launches live here.
//!
//! Ops cannot fail in the `Backend` signature; a failed launch or copy is kept (the first one,
//! like CUDA's sticky errors) and reported by `take_error`, which the model checks after every
//! pass.

use super::backbone as bb;
use super::driver::{DevAddr, Driver, Gemm, KArg};
use super::{attention, experts as ex, experts_backward as eb, moe, router, sort};
use super::{elementwise_dims, LaunchDims};
use crate::nn::backend::{
    AdamWStep, Addr, AttnShape, Backend, Bf16, Elem, ExpertMode, ExpertShape, ExpertsGrads,
    ExpertsSaved, ExpertsSavedRef, Pool, ProductKeyShape, Strided, View, ViewMut,
};
use std::sync::{Arc, Mutex};

pub struct CudaBackend {
    dr: Arc<dyn Driver>,
    error: Mutex<Option<String>>,
    scratch: Mutex<Scratch>,
}

/// Device scratch of the ops that need it (reduction partials, the embedding's order), grown on
/// demand and reused.
#[derive(Default)]
struct Scratch {
    areas: Vec<(DevAddr, usize)>,
}

fn buf<T: Elem>(v: View<T>) -> KArg {
    KArg::Buf(v.addr(), v.len() * size_of::<T>())
}

fn buf_mut<T: Elem>(v: ViewMut<T>) -> KArg {
    KArg::Buf(v.addr(), v.len() * size_of::<T>())
}

fn int(x: usize) -> KArg {
    KArg::I32(i32::try_from(x).expect("sizes fit in an int (checked by the model config)"))
}

impl CudaBackend {
    pub fn new(dr: Arc<dyn Driver>) -> CudaBackend {
        CudaBackend {
            dr,
            error: Mutex::default(),
            scratch: Mutex::default(),
        }
    }

    fn fail(&self, e: String) {
        let mut err = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if err.is_none() {
            *err = Some(e);
        }
    }

    fn check(&self, r: Result<(), String>) {
        if let Err(e) = r {
            self.fail(e);
        }
    }

    fn launch(&self, name: &str, dims: LaunchDims, args: &[KArg]) {
        self.check(self.dr.launch(name, dims, args));
    }

    /// The kernel for a pool's element type (`name`, or `name_bf16`), and the pools u and v.
    fn pool_args(name: &str, pool: Pool) -> (String, KArg, KArg) {
        match pool {
            Pool::F32 { u, v } => (name.to_string(), buf(u), buf(v)),
            Pool::Bf16 { u, v } => (format!("{name}_bf16"), buf(u), buf(v)),
        }
    }

    /// Scratch area `slot` of at least `bytes` (its contents are whatever was left there).
    fn scratch(&self, slot: usize, bytes: usize) -> DevAddr {
        let mut s = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if s.areas.len() <= slot {
            s.areas.resize(slot + 1, (0, 0));
        }
        let (addr, have) = s.areas[slot];
        if have < bytes.max(1) {
            if have > 0 {
                self.dr.free(addr);
            }
            match self.dr.alloc(bytes.max(1)) {
                Ok(a) => s.areas[slot] = (a, bytes.max(1)),
                Err(e) => {
                    self.fail(e);
                    s.areas[slot] = (0, 0);
                    return 0;
                }
            }
        }
        s.areas[slot].0
    }

    /// The items 0..n grouped by their keys (< num_keys), stably: `order` and the runs' `ends`
    /// (src/nn/cuda/sort.rs: a radix sort over many blocks, deterministic).
    fn group_by_key(
        &self,
        keys: DevAddr,
        n: usize,
        num_keys: usize,
        order: DevAddr,
        ends: DevAddr,
    ) {
        let bytes = sort::group_by_key_scratch(n, num_keys).bytes;
        let scratch = self.scratch(SLOT_SORT, bytes);
        for (name, dims, args) in
            sort::group_by_key_launches(keys, n, num_keys, order, ends, scratch)
        {
            self.launch(name, dims, &args);
        }
    }

    fn download_f64(&self, addr: DevAddr) -> f64 {
        let mut b = [0u8; 8];
        self.check(self.dr.download(addr, &mut b));
        f64::from_le_bytes(b)
    }

    /// Sums `n` doubles at `partials` on the device (fixed order) and brings the total over.
    fn total(&self, partials: DevAddr, n: usize) -> f64 {
        let out = self.scratch(SLOT_TOTAL, 8);
        self.launch(
            "sum_f64",
            bb::sum_f64_dims(),
            &[KArg::Buf(partials, n * 8), KArg::Buf(out, 8), int(n)],
        );
        self.download_f64(out)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let s = self.scratch.get_mut().unwrap_or_else(|p| p.into_inner());
        for &(addr, bytes) in &s.areas {
            if bytes > 0 {
                self.dr.free(addr);
            }
        }
    }
}

// Scratch slots.
const SLOT_PARTIALS: usize = 0;
const SLOT_TOTAL: usize = 1;
const SLOT_ORDER: usize = 2;
const SLOT_STARTS: usize = 3;
const SLOT_SEGMENTS: usize = 4;
const SLOT_SORT: usize = 5;

/// The gemm operand of a strided matrix: unit column stride (row-major), or unit row stride
/// (stored transposed).
fn operand(m: Strided) -> Option<(DevAddr, usize, bool)> {
    if m.cs == 1 {
        Some((m.v.addr(), m.rs, false))
    } else if m.rs == 1 {
        Some((m.v.addr(), m.cs, true))
    } else {
        None
    }
}

fn bytes_u32(s: &[u32]) -> Vec<u8> {
    s.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[allow(clippy::too_many_arguments)]
impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }
    fn alloc(&self, bytes: usize) -> Result<Addr, String> {
        self.dr.alloc(bytes)
    }
    fn free(&self, addr: Addr, _bytes: usize) {
        self.dr.free(addr)
    }
    fn host_memory(&self) -> bool {
        false
    }
    fn upload(&self, dst: Addr, src: &[u8]) {
        self.check(self.dr.upload(dst, src))
    }
    fn download(&self, src: Addr, dst: &mut [u8]) {
        self.check(self.dr.download(src, dst))
    }
    fn copy(&self, dst: Addr, src: Addr, bytes: usize) {
        self.check(self.dr.copy(dst, src, bytes))
    }
    fn zero(&self, dst: Addr, bytes: usize) {
        self.check(self.dr.zero(dst, bytes))
    }
    fn take_error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn matmul(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: View<f32>,
        a_t: bool,
        b: View<f32>,
        b_t: bool,
        c: ViewMut<f32>,
        accumulate: bool,
    ) {
        let g = Gemm {
            m,
            n,
            k,
            a: a.addr(),
            lda: if a_t { m } else { k },
            a_t,
            stride_a: 0,
            b: b.addr(),
            ldb: if b_t { k } else { n },
            b_t,
            stride_b: 0,
            c: c.addr(),
            ldc: n,
            stride_c: 0,
            batch: 1,
            accumulate,
        };
        self.check(self.dr.gemm(&g))
    }
    fn matmul_strided(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: Strided,
        b: Strided,
        c: ViewMut<f32>,
        c_rs: usize,
        accumulate: bool,
    ) {
        let (Some((a, lda, a_t)), Some((b, ldb, b_t))) = (operand(a), operand(b)) else {
            return self.fail("matmul_strided: an operand has no unit stride".into());
        };
        let g = Gemm {
            m,
            n,
            k,
            a,
            lda,
            a_t,
            stride_a: 0,
            b,
            ldb,
            b_t,
            stride_b: 0,
            c: c.addr(),
            ldc: c_rs,
            stride_c: 0,
            batch: 1,
            accumulate,
        };
        self.check(self.dr.gemm(&g))
    }
    fn rmsnorm_forward(
        &self,
        x: View<f32>,
        scale: View<f32>,
        d: usize,
        y: ViewMut<f32>,
        rstd: ViewMut<f32>,
    ) {
        let rows = x.len() / d;
        self.launch(
            "rmsnorm_forward",
            bb::rmsnorm_forward_dims(rows),
            &[
                buf(x),
                buf(scale),
                buf_mut(y),
                buf_mut(rstd),
                int(rows),
                int(d),
            ],
        )
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
        let rows = x.len() / d;
        let parts = bb::rmsnorm_partials(rows);
        let partial = KArg::Buf(self.scratch(SLOT_PARTIALS, parts * d * 4), parts * d * 4);
        self.launch(
            "rmsnorm_backward",
            bb::rmsnorm_backward_dims(rows),
            &[
                buf(x),
                buf(scale),
                buf(rstd),
                buf(dy),
                buf_mut(dx),
                partial,
                int(rows),
                int(d),
            ],
        );
        self.launch(
            "sum_rows",
            bb::column_sums_dims(d),
            &[partial, buf_mut(dscale), int(parts), int(d)],
        )
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
        let rows = x.len() / (heads * hd);
        self.launch(
            "rope",
            bb::rope_dims(rows, heads, hd),
            &[
                buf_mut(x),
                buf(cos),
                buf(sin),
                int(rows),
                int(seq),
                int(heads),
                int(hd),
                int(inverse as usize),
            ],
        )
    }
    fn attention_saved_len(&self, s: &AttnShape) -> usize {
        s.batch * s.heads * s.seq
    }
    fn attention_forward(
        &self,
        s: &AttnShape,
        q: View<f32>,
        k: View<f32>,
        v: View<f32>,
        out: ViewMut<f32>,
        saved: ViewMut<f32>,
    ) {
        if s.head_dim > attention::max_head_dim() {
            return self.fail(format!(
                "attention: head_dim {} is above the kernels' {}",
                s.head_dim,
                attention::max_head_dim()
            ));
        }
        self.launch(
            "attention_forward",
            attention::forward_dims(s),
            &[
                buf(q),
                buf(k),
                buf(v),
                buf_mut(out),
                buf_mut(saved),
                int(s.batch),
                int(s.seq),
                int(s.heads),
                int(s.head_dim),
            ],
        )
    }
    fn attention_backward(
        &self,
        s: &AttnShape,
        q: View<f32>,
        k: View<f32>,
        v: View<f32>,
        out: View<f32>,
        saved: View<f32>,
        dout: View<f32>,
        dq: ViewMut<f32>,
        dk: ViewMut<f32>,
        dv: ViewMut<f32>,
    ) {
        let rows = s.batch * s.heads * s.seq;
        let delta = KArg::Buf(self.scratch(SLOT_PARTIALS, rows * 4), rows * 4);
        let shape = [int(s.batch), int(s.seq), int(s.heads), int(s.head_dim)];
        let with_shape = |args: &[KArg]| [args, &shape[..]].concat();
        self.launch(
            "attention_backward_delta",
            attention::delta_dims(s),
            &with_shape(&[buf(dout), buf(out), delta]),
        );
        let common = [buf(q), buf(k), buf(v), buf(dout), buf(saved), delta];
        self.launch(
            "attention_backward_dkdv",
            attention::dkdv_dims(s),
            &with_shape(&[&common[..], &[buf_mut(dk), buf_mut(dv)]].concat()),
        );
        self.launch(
            "attention_backward_dq",
            attention::dq_dims(s),
            &with_shape(&[&common[..], &[buf_mut(dq)]].concat()),
        )
    }
    fn gelu_forward(&self, x: View<f32>, y: ViewMut<f32>) {
        let n = x.len();
        self.launch(
            "gelu_forward",
            bb::gelu_dims(n),
            &[buf(x), buf_mut(y), int(n)],
        )
    }
    fn gelu_backward(&self, x: View<f32>, dy: View<f32>, dx: ViewMut<f32>) {
        let n = x.len();
        self.launch(
            "gelu_backward",
            bb::gelu_dims(n),
            &[buf(x), buf(dy), buf_mut(dx), int(n)],
        )
    }
    fn swiglu_forward(&self, z: View<f32>, f: usize, y: ViewMut<f32>) {
        let rows = z.len() / (2 * f);
        self.launch(
            "swiglu_forward",
            bb::swiglu_dims(rows, f),
            &[buf(z), buf_mut(y), int(rows), int(f)],
        )
    }
    fn swiglu_backward(&self, z: View<f32>, dy: View<f32>, f: usize, dz: ViewMut<f32>) {
        let rows = z.len() / (2 * f);
        self.launch(
            "swiglu_backward",
            bb::swiglu_dims(rows, f),
            &[buf(z), buf(dy), buf_mut(dz), int(rows), int(f)],
        )
    }
    fn embedding_forward(&self, table: View<f32>, tokens: View<u32>, d: usize, out: ViewMut<f32>) {
        let n = tokens.len();
        self.launch(
            "embedding_forward",
            bb::embedding_forward_dims(n, d),
            &[buf(table), buf(tokens), buf_mut(out), int(n), int(d)],
        )
    }
    fn embedding_backward(
        &self,
        dx: View<f32>,
        _tokens: View<u32>,
        host_tokens: &[u32],
        d: usize,
        dtable: ViewMut<f32>,
    ) {
        // The host knows the tokens: it hands the device their order, so that each row of the
        // table is summed by one block in token order.
        let (order, starts, segs) = bb::embedding_segments(host_tokens);
        let area = |slot: usize, v: &[u32]| {
            let a = self.scratch(slot, v.len() * 4);
            self.check(self.dr.upload(a, &bytes_u32(v)));
            KArg::Buf(a, v.len() * 4)
        };
        let args = [
            buf(dx),
            area(SLOT_ORDER, &order),
            area(SLOT_STARTS, &starts),
            area(SLOT_SEGMENTS, &segs),
            buf_mut(dtable),
            int(segs.len()),
            int(d),
        ];
        if !segs.is_empty() {
            self.launch(
                "embedding_backward",
                bb::embedding_backward_dims(segs.len()),
                &args,
            )
        }
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
        let rows = targets.len();
        let losses = self.scratch(SLOT_PARTIALS, rows * 8);
        self.launch(
            "softmax_xent",
            bb::xent_dims(rows),
            &[
                buf_mut(logits),
                buf(targets),
                KArg::Buf(losses, rows * 8),
                int(rows),
                int(vocab),
                KArg::I32(bb::xent_pad(pad)),
                int(want_grad as usize),
                KArg::F32(bb::xent_inv_count(counted)),
            ],
        );
        self.total(losses, rows)
    }
    fn product_key_topk_forward(
        &self,
        s: ProductKeyShape,
        logits: View<f32>,
        scores: ViewMut<f32>,
        indices: ViewMut<u32>,
    ) {
        if let Err(e) = router::check_shape(s) {
            return self.fail(e);
        }
        let tokens = logits.len() / s.logits_per_token();
        self.launch(
            "product_key_topk_forward",
            router::router_topk_forward_dims(tokens, s),
            &[
                buf(logits),
                buf_mut(scores),
                buf_mut(indices),
                int(tokens),
                int(s.channels),
                int(s.sqrt_n),
                int(s.k),
            ],
        )
    }
    fn product_key_topk_backward(
        &self,
        s: ProductKeyShape,
        indices: View<u32>,
        dscores: View<f32>,
        dlogits: ViewMut<f32>,
    ) {
        if let Err(e) = router::check_shape(s) {
            return self.fail(e);
        }
        let tokens = indices.len() / s.slots_per_token();
        self.launch(
            "product_key_topk_backward",
            router::router_topk_backward_dims(tokens, s),
            &[
                buf(indices),
                buf(dscores),
                buf_mut(dlogits),
                int(tokens),
                int(s.channels),
                int(s.sqrt_n),
                int(s.k),
            ],
        )
    }
    fn experts_forward(
        &self,
        s: ExpertShape,
        mode: ExpertMode,
        x: View<f32>,
        scores: View<f32>,
        indices: View<u32>,
        pool: Pool,
        saved: ExpertsSaved,
        y: ViewMut<f32>,
    ) {
        if let Err(e) = ex::check_shape(s) {
            return self.fail(e);
        }
        let tokens = x.len() / s.d;
        let (kernel, u, v) = Self::pool_args("experts_forward", pool);
        // Saves a and PEER's w (what experts_backward needs), not the coefficient.
        self.launch(
            &kernel,
            ex::experts_forward_dims(tokens),
            &[
                buf(x),
                buf(scores),
                buf(indices),
                u,
                v,
                buf_mut(saved.a),
                buf_mut(saved.w),
                buf_mut(y),
                int(tokens),
                int(s.d),
                int(s.channels),
                int(s.k),
                int(s.channel_stride),
                KArg::I32(ex::expert_mode_arg(mode)),
            ],
        )
    }
    fn experts_backward(
        &self,
        s: ExpertShape,
        mode: ExpertMode,
        x: View<f32>,
        scores: View<f32>,
        indices: View<u32>,
        pool: Pool,
        saved: ExpertsSavedRef,
        dy: View<f32>,
        mut dscores: ViewMut<f32>,
        mut da: ViewMut<f32>,
        mut grads: ExpertsGrads,
    ) {
        if let Err(e) = eb::check_shape(s) {
            return self.fail(e);
        }
        let tokens = x.len() / s.d;
        let sc = eb::experts_backward_scratch(tokens, s);
        let n = sc.n;
        let tile = eb::expert_tile();
        let area = self.scratch(SLOT_ORDER, sc.bytes);
        let addr = |off: usize| area + off as DevAddr;
        let (keys_at, order_at, ends_at) = (addr(sc.keys), addr(sc.order), addr(sc.ends));
        let keys = KArg::Buf(keys_at, 4 * n);
        let order = KArg::Buf(order_at, 4 * n);
        let ends = KArg::Buf(ends_at, 4 * s.pool_rows);
        let partial = KArg::Buf(addr(sc.partial), 4 * sc.partial_len);
        let mode = KArg::I32(ex::expert_mode_arg(mode));
        // The pool row of every slot, then the slots grouped by it (stable).
        self.launch(
            "experts_bwd_keys",
            eb::keys_dims(n),
            &[
                buf(indices),
                keys,
                int(n),
                int(s.channels * s.k),
                int(s.k),
                int(s.channel_stride),
            ],
        );
        self.group_by_key(keys_at, n, s.pool_rows, order_at, ends_at);
        // Expert-stationary: dscores (PEER: dw), da, and du, dv in tiles of the grouped order;
        // then the rows that cross tiles get their later pieces, in tile order.
        let (pool_kernel, _, v) = Self::pool_args("experts_bwd_pool", pool);
        self.launch(
            &pool_kernel,
            eb::pool_dims(n, tile),
            &[
                buf(x),
                buf(dy),
                buf(scores),
                buf(saved.a),
                buf(saved.w),
                v,
                keys,
                order,
                ends,
                buf_mut(dscores.rb()),
                buf_mut(da.rb()),
                buf_mut(grads.du.rb()),
                buf_mut(grads.dv.rb()),
                partial,
                int(n),
                int(s.d),
                int(s.channels * s.k),
                mode,
                int(tile),
            ],
        );
        self.launch(
            "experts_bwd_fixup",
            eb::pool_dims(n, tile),
            &[
                keys,
                order,
                ends,
                partial,
                buf_mut(grads.du),
                buf_mut(grads.dv),
                int(n),
                int(s.d),
                int(tile),
            ],
        );
        // Token-centric: dx, and PEER's softmax backward.
        let (token_kernel, u, _) = Self::pool_args("experts_bwd_token", pool);
        self.launch(
            &token_kernel,
            eb::token_dims(tokens),
            &[
                u,
                keys,
                buf(da.view()),
                buf(saved.w),
                buf_mut(dscores),
                buf_mut(grads.dx),
                int(tokens),
                int(s.d),
                int(s.channels),
                int(s.k),
                mode,
            ],
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
        if ne > moe::max_experts() {
            return self.fail(format!("moe: at most {} experts", moe::max_experts()));
        }
        let n = chosen.len() / k;
        let chosen_arg = KArg::Buf(chosen.addr(), chosen.len() * 4);
        self.launch(
            "moe_topk_softmax",
            moe::topk_softmax_dims(n, ne, k),
            &[
                buf(logits),
                buf_mut(probs),
                chosen_arg,
                int(n),
                int(ne),
                int(k),
            ],
        );
        self.launch(
            "moe_sort_routes",
            moe::sort_routes_dims(ne),
            &[
                chosen_arg,
                buf_mut(routes),
                buf_mut(starts),
                buf_mut(token_rows),
                int(n),
                int(ne),
                int(k),
            ],
        )
    }
    fn moe_gather(&self, h: View<f32>, routes: View<u32>, d: usize, hx: ViewMut<f32>) {
        let rows = routes.len() / 2;
        self.launch(
            "moe_gather",
            moe::gather_dims(rows, d),
            &[buf(h), buf(routes), buf_mut(hx), int(rows), int(d)],
        )
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
        let n = token_rows.len() / k;
        self.launch(
            "moe_combine",
            moe::combine_dims(n, d),
            &[
                buf(o),
                buf(probs),
                buf(routes),
                buf(token_rows),
                buf_mut(out),
                int(n),
                int(ne),
                int(k),
                int(d),
            ],
        )
    }
    fn moe_combine_backward(
        &self,
        dy: View<f32>,
        o: View<f32>,
        probs: View<f32>,
        routes: View<u32>,
        token_rows: View<u32>,
        ne: usize,
        k: usize,
        d: usize,
        dout: ViewMut<f32>,
        dprob: ViewMut<f32>,
    ) {
        let (rows, n) = (routes.len() / 2, token_rows.len() / k);
        self.launch(
            "moe_combine_backward",
            moe::combine_backward_dims(rows, d),
            &[
                buf(dy),
                buf(probs),
                buf(routes),
                buf_mut(dout),
                int(rows),
                int(ne),
                int(d),
            ],
        );
        self.launch(
            "moe_dprob",
            moe::dprob_dims(n),
            &[
                buf(dy),
                buf(o),
                buf(routes),
                buf(token_rows),
                buf_mut(dprob),
                int(n),
                int(ne),
                int(k),
                int(d),
            ],
        )
    }
    fn softmax_backward(
        &self,
        probs: View<f32>,
        dprob: View<f32>,
        ne: usize,
        dlogits: ViewMut<f32>,
    ) {
        let n = probs.len() / ne;
        self.launch(
            "moe_softmax_backward",
            moe::softmax_backward_dims(n),
            &[buf(probs), buf(dprob), buf_mut(dlogits), int(n), int(ne)],
        )
    }
    fn moe_scatter_add(
        &self,
        dhx: View<f32>,
        token_rows: View<u32>,
        k: usize,
        d: usize,
        dh: ViewMut<f32>,
    ) {
        let n = token_rows.len() / k;
        self.launch(
            "moe_scatter_add",
            moe::scatter_add_dims(n, d),
            &[
                buf(dhx),
                buf(token_rows),
                buf_mut(dh),
                int(n),
                int(k),
                int(d),
            ],
        )
    }
    fn add_row_vector(&self, x: ViewMut<f32>, b: View<f32>) {
        let (n, d) = (x.len(), b.len());
        self.launch(
            "add_row_vector",
            elementwise_dims(n),
            &[buf_mut(x), buf(b), int(n / d), int(d)],
        )
    }
    fn sum_rows_into(&self, x: View<f32>, out: ViewMut<f32>) {
        let d = out.len();
        if d > 0 {
            self.launch(
                "sum_rows",
                bb::column_sums_dims(d),
                &[buf(x), buf_mut(out), int(x.len() / d), int(d)],
            )
        }
    }
    fn add_assign(&self, y: ViewMut<f32>, x: View<f32>) {
        let n = y.len();
        self.launch(
            "add_assign",
            bb::add_assign_dims(n),
            &[buf_mut(y), buf(x), int(n)],
        )
    }
    fn scale(&self, x: ViewMut<f32>, factor: f32) {
        let n = x.len();
        self.launch(
            "scale",
            elementwise_dims(n),
            &[buf_mut(x), KArg::F32(factor), int(n)],
        )
    }
    fn round_bf16(&self, x: View<f32>, out: ViewMut<Bf16>) {
        let n = x.len();
        self.launch(
            "round_bf16",
            elementwise_dims(n),
            &[buf(x), buf_mut(out), int(n)],
        )
    }
    fn sum_squares(&self, x: View<f32>) -> f64 {
        let n = x.len();
        let parts = bb::sum_squares_partials(n);
        let partials = self.scratch(SLOT_PARTIALS, parts * 8);
        self.launch(
            "sum_squares_partial",
            bb::sum_squares_dims(n),
            &[buf(x), int(n), KArg::Buf(partials, parts * 8)],
        );
        self.total(partials, parts)
    }
    fn adamw_update(
        &self,
        p: ViewMut<f32>,
        g: View<f32>,
        m: ViewMut<f32>,
        v: ViewMut<f32>,
        s: &AdamWStep,
    ) {
        let n = p.len();
        let (inv_bc1, inv_sqrt_bc2) = bb::adamw_bias_corrections(s.beta1, s.beta2, s.t);
        self.launch(
            "adamw_update",
            bb::adamw_dims(n),
            &[
                buf_mut(p),
                buf(g),
                buf_mut(m),
                buf_mut(v),
                int(n),
                KArg::F32(s.lr),
                KArg::F32(s.beta1),
                KArg::F32(s.beta2),
                KArg::F32(s.eps),
                KArg::F32(s.weight_decay),
                KArg::F32(inv_bc1),
                KArg::F32(inv_sqrt_bc2),
                KArg::F32(s.grad_scale),
            ],
        )
    }
}
