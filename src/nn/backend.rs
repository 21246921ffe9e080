//! The seam between the model and the hardware. A backend owns the memory the model computes
//! in (`Buf`: host memory for `cpu`, device memory for `cuda` and `cuda-emu`) and every op a
//! training step needs: matrix products, row-wise ops, attention, the loss, the product-key
//! router and linear experts, MoE routing, the gradient norm and the optimiser update. The
//! model only ever hands a backend views of its own buffers; nothing but the loss, the
//! statistics and checkpoints cross to the host.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

/// An address in a backend's memory: a host address for `cpu` and `cuda-emu`, a device
/// pointer for `cuda`.
pub type Addr = u64;

/// What a buffer may hold.
pub trait Elem: Copy + Default + Send + Sync + 'static {}
impl Elem for f32 {}
impl Elem for u32 {}
impl Elem for f64 {}
impl Elem for Bf16 {}

/// A bfloat16: the top 16 bits of an f32 (8 exponent bits, 7 mantissa bits). Storage only:
/// expert pools may be kept as a bf16 copy whose rows the kernels read and widen to f32.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bf16(pub u16);

impl Bf16 {
    /// Rounded to the nearest bf16, ties to even (as the hardware conversion); NaN stays a
    /// (quiet) NaN, and values beyond the largest bf16 round to infinity.
    pub fn from_f32(x: f32) -> Bf16 {
        let b = x.to_bits();
        if x.is_nan() {
            return Bf16((b >> 16) as u16 | 0x40);
        }
        Bf16((b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16)
    }
    pub fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }
}

/// Memory owned by one backend: `len` elements (the allocation may be larger, so that buffers
/// can be reused across batches of different sizes). Freed by its backend when dropped.
pub struct Buf<T: Elem> {
    addr: Addr,
    len: usize,
    cap: usize,
    host: bool,
    be: Arc<dyn Backend>,
    _t: PhantomData<T>,
}

// SAFETY: a Buf is an owned allocation, like a Vec.
unsafe impl<T: Elem> Send for Buf<T> {}
unsafe impl<T: Elem> Sync for Buf<T> {}

impl<T: Elem> Drop for Buf<T> {
    fn drop(&mut self) {
        if self.cap > 0 {
            self.be.free(self.addr, self.cap * size_of::<T>());
        }
    }
}

impl<T: Elem> Buf<T> {
    /// `len` zeros on backend `be`.
    pub fn zeros(be: &Arc<dyn Backend>, len: usize) -> Result<Buf<T>, String> {
        let addr = if len == 0 {
            0
        } else {
            be.alloc(len.checked_mul(size_of::<T>()).ok_or("buffer too large")?)?
        };
        Ok(Buf {
            addr,
            len,
            cap: len,
            host: be.host_memory(),
            be: be.clone(),
            _t: PhantomData,
        })
    }

    /// An empty buffer on backend `be` (allocates nothing).
    pub fn empty(be: &Arc<dyn Backend>) -> Buf<T> {
        Buf {
            addr: 0,
            len: 0,
            cap: 0,
            host: be.host_memory(),
            be: be.clone(),
            _t: PhantomData,
        }
    }

    /// A buffer holding `data`.
    pub fn from_host(be: &Arc<dyn Backend>, data: &[T]) -> Result<Buf<T>, String> {
        let mut b = Buf::zeros(be, data.len())?;
        b.upload(data);
        Ok(b)
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes allocated.
    pub fn bytes(&self) -> usize {
        self.cap * size_of::<T>()
    }

    /// Makes the buffer `len` long, keeping its allocation when it is large enough (the
    /// contents are then kept too; a new allocation is zeroed).
    pub fn ensure(&mut self, len: usize) -> Result<(), String> {
        if len > self.cap {
            let fresh = Buf::zeros(&self.be, len)?;
            *self = fresh;
        }
        self.len = len;
        Ok(())
    }

    pub fn view(&self) -> View<'_, T> {
        View::new(self.addr, self.len, self.host)
    }
    pub fn view_mut(&mut self) -> ViewMut<'_, T> {
        ViewMut::new(self.addr, self.len, self.host)
    }
    pub fn range(&self, r: Range<usize>) -> View<'_, T> {
        self.view().range(r)
    }
    pub fn range_mut(&mut self, r: Range<usize>) -> ViewMut<'_, T> {
        self.view_mut().range(r)
    }

    /// The contents, borrowed where the memory is the host's.
    pub fn host(&self) -> Option<&[T]> {
        self.view().host()
    }
    pub fn host_mut(&mut self) -> Option<&mut [T]> {
        self.view_mut().into_host()
    }

    /// Copies the contents to the host.
    pub fn to_vec(&self) -> Vec<T> {
        let mut out = vec![T::default(); self.len];
        self.be.download(self.addr, bytes_of_mut(&mut out));
        out
    }

    /// Overwrites the first `data.len()` elements.
    pub fn upload(&mut self, data: &[T]) {
        assert!(data.len() <= self.len, "upload past the end of a buffer");
        self.be.upload(self.addr, bytes_of(data));
    }

    /// Overwrites the elements from `offset` on with `data`.
    pub fn upload_at(&mut self, offset: usize, data: &[T]) {
        let end = offset.checked_add(data.len()).filter(|&e| e <= self.len);
        assert!(end.is_some(), "upload past the end of a buffer");
        let addr = self.addr + (offset * size_of::<T>()) as Addr;
        self.be.upload(addr, bytes_of(data));
    }

    pub fn fill_zero(&mut self) {
        self.be.zero(self.addr, self.len * size_of::<T>());
    }

    /// Copies `src` (the same length) into this buffer, device to device.
    pub fn copy_from(&mut self, src: View<'_, T>) {
        assert_eq!(
            src.len, self.len,
            "copy between buffers of different lengths"
        );
        self.be.copy(self.addr, src.addr, self.len * size_of::<T>());
    }
}

/// Grow-only scratch: makes `buf` `len` long, creating it on first use.
pub fn ensure<T: Elem>(
    be: &Arc<dyn Backend>,
    buf: &mut Option<Buf<T>>,
    len: usize,
) -> Result<(), String> {
    match buf {
        Some(b) => b.ensure(len),
        None => {
            *buf = Some(Buf::zeros(be, len)?);
            Ok(())
        }
    }
}

/// Zeroes a view.
pub fn zero<T: Elem>(be: &dyn Backend, v: ViewMut<T>) {
    be.zero(v.addr(), v.len() * size_of::<T>())
}

pub(crate) fn bytes_of<T: Elem>(s: &[T]) -> &[u8] {
    // SAFETY: Elem types are plain numbers with no padding.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, size_of_val(s)) }
}

pub(crate) fn bytes_of_mut<T: Elem>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as above; every bit pattern is a valid f32, u32 or f64.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut u8, size_of_val(s)) }
}

/// A borrowed run of a buffer, as `&[T]` is of a Vec: the borrow checker keeps a `ViewMut`
/// from overlapping any other view of the same memory.
#[derive(Clone, Copy)]
pub struct View<'a, T> {
    addr: Addr,
    len: usize,
    host: bool,
    _p: PhantomData<&'a [T]>,
}

/// A mutably borrowed run of a buffer, as `&mut [T]`.
pub struct ViewMut<'a, T> {
    addr: Addr,
    len: usize,
    host: bool,
    _p: PhantomData<&'a mut [T]>,
}

impl<'a, T: Elem> View<'a, T> {
    fn new(addr: Addr, len: usize, host: bool) -> Self {
        View {
            addr,
            len,
            host,
            _p: PhantomData,
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn addr(&self) -> Addr {
        self.addr
    }
    pub fn range(self, r: Range<usize>) -> View<'a, T> {
        assert!(
            r.start <= r.end && r.end <= self.len,
            "view {r:?} of {}",
            self.len
        );
        View::new(
            self.addr + (r.start * size_of::<T>()) as Addr,
            r.len(),
            self.host,
        )
    }
    /// From element `start` to the end.
    pub fn from(self, start: usize) -> View<'a, T> {
        self.range(start..self.len)
    }
    /// The elements as a host slice, where the memory is the host's.
    pub fn host(self) -> Option<&'a [T]> {
        // SAFETY: host memory of `len` elements, borrowed for 'a from its Buf; no ViewMut
        // overlaps it while this borrow lives.
        self.host
            .then(|| unsafe { std::slice::from_raw_parts(self.addr as *const T, self.len) })
    }
}

impl<'a, T: Elem> ViewMut<'a, T> {
    fn new(addr: Addr, len: usize, host: bool) -> Self {
        ViewMut {
            addr,
            len,
            host,
            _p: PhantomData,
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn addr(&self) -> Addr {
        self.addr
    }
    /// A shorter-lived copy, as `&mut *slice`.
    pub fn rb(&mut self) -> ViewMut<'_, T> {
        ViewMut::new(self.addr, self.len, self.host)
    }
    pub fn view(&self) -> View<'_, T> {
        View::new(self.addr, self.len, self.host)
    }
    pub fn range(self, r: Range<usize>) -> ViewMut<'a, T> {
        assert!(
            r.start <= r.end && r.end <= self.len,
            "view {r:?} of {}",
            self.len
        );
        ViewMut::new(
            self.addr + (r.start * size_of::<T>()) as Addr,
            r.len(),
            self.host,
        )
    }
    /// From element `start` to the end.
    pub fn from(self, start: usize) -> ViewMut<'a, T> {
        let len = self.len;
        self.range(start..len)
    }
    pub fn split_at(self, mid: usize) -> (ViewMut<'a, T>, ViewMut<'a, T>) {
        assert!(mid <= self.len, "split at {mid} of {}", self.len);
        let tail = self.addr + (mid * size_of::<T>()) as Addr;
        (
            ViewMut::new(self.addr, mid, self.host),
            ViewMut::new(tail, self.len - mid, self.host),
        )
    }
    pub fn into_host(self) -> Option<&'a mut [T]> {
        // SAFETY: host memory of `len` elements, borrowed mutably for 'a: nothing else views it.
        self.host
            .then(|| unsafe { std::slice::from_raw_parts_mut(self.addr as *mut T, self.len) })
    }
}

/// A strided matrix in a view: element (i, j) at `rs * i + cs * j`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub v: View<'a, f32>,
    pub rs: usize,
    pub cs: usize,
}

impl Strided<'_> {
    pub fn t(self) -> Self {
        Strided {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// What a training step needs of a backend. Conventions: row-major; "forward" ops overwrite
/// their outputs; "backward" ops add into the gradients of their inputs unless documented as
/// overwriting. Views passed to one op never overlap where one of them is written.
#[allow(clippy::too_many_arguments)]
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;

    // Memory. Errors are for allocation only; a failed copy on a device is fatal there.
    /// `bytes` of zeroed memory.
    fn alloc(&self, bytes: usize) -> Result<Addr, String>;
    fn free(&self, addr: Addr, bytes: usize);
    /// Whether views can be read as host slices (the `cpu` backend).
    fn host_memory(&self) -> bool;
    fn upload(&self, dst: Addr, src: &[u8]);
    fn download(&self, src: Addr, dst: &mut [u8]);
    fn copy(&self, dst: Addr, src: Addr, bytes: usize);
    fn zero(&self, dst: Addr, bytes: usize);
    /// The first error of a launch or copy since the last call (a device's ops run
    /// asynchronously and cannot fail in place; the model asks after every pass).
    fn take_error(&self) -> Option<String> {
        None
    }

    /// c[m, n] (+)= op(a) · op(b); `a_t`: a stored [k, m]; `b_t`: b stored [n, k].
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
    );
    /// c[m, n] (+)= a · b with explicit strides (c has unit column stride).
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
    );
    fn rmsnorm_forward(
        &self,
        x: View<f32>,
        scale: View<f32>,
        d: usize,
        y: ViewMut<f32>,
        rstd: ViewMut<f32>,
    );
    fn rmsnorm_backward(
        &self,
        x: View<f32>,
        scale: View<f32>,
        rstd: View<f32>,
        dy: View<f32>,
        d: usize,
        dx: ViewMut<f32>,
        dscale: ViewMut<f32>,
    );
    /// In place; `inverse` is the backward pass.
    fn rope(
        &self,
        x: ViewMut<f32>,
        cos: View<f32>,
        sin: View<f32>,
        seq: usize,
        heads: usize,
        hd: usize,
        inverse: bool,
    );
    /// Floats the forward pass saves for the backward pass (the probabilities on the CPU,
    /// one log-sum-exp a row on a device).
    fn attention_saved_len(&self, s: &AttnShape) -> usize;
    fn attention_forward(
        &self,
        s: &AttnShape,
        q: View<f32>,
        k: View<f32>,
        v: View<f32>,
        out: ViewMut<f32>,
        saved: ViewMut<f32>,
    );
    /// Overwrites dq, dk, dv.
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
    );
    fn gelu_forward(&self, x: View<f32>, y: ViewMut<f32>);
    /// Overwrites dx.
    fn gelu_backward(&self, x: View<f32>, dy: View<f32>, dx: ViewMut<f32>);
    fn swiglu_forward(&self, z: View<f32>, f: usize, y: ViewMut<f32>);
    /// Overwrites dz.
    fn swiglu_backward(&self, z: View<f32>, dy: View<f32>, f: usize, dz: ViewMut<f32>);
    /// out[t] = table[tokens[t]] (rows of d).
    fn embedding_forward(&self, table: View<f32>, tokens: View<u32>, d: usize, out: ViewMut<f32>);
    /// dtable[tokens[t]] += dx[t], each row's sum in token order; `tokens` is also on the host
    /// (the caller uploaded it), so that a device can be given its order.
    fn embedding_backward(
        &self,
        dx: View<f32>,
        tokens: View<u32>,
        host_tokens: &[u32],
        d: usize,
        dtable: ViewMut<f32>,
    );
    /// Turns logits into d(mean loss)/d(logits) in place when `want_grad`; returns the sum of
    /// the losses of the `counted` rows whose target is not `pad`.
    fn softmax_xent(
        &self,
        logits: ViewMut<f32>,
        targets: View<u32>,
        vocab: usize,
        pad: Option<u32>,
        counted: usize,
        want_grad: bool,
    ) -> f64;
    fn product_key_topk_forward(
        &self,
        s: ProductKeyShape,
        logits: View<f32>,
        scores: ViewMut<f32>,
        indices: ViewMut<u32>,
    );
    /// Overwrites dlogits.
    fn product_key_topk_backward(
        &self,
        s: ProductKeyShape,
        indices: View<u32>,
        dscores: View<f32>,
        dlogits: ViewMut<f32>,
    );
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
    );
    /// Overwrites dscores and da; adds into grads (dx, du, dv).
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
        dscores: ViewMut<f32>,
        da: ViewMut<f32>,
        grads: ExpertsGrads,
    );
    /// MoE routing: probs = softmax over all `ne` experts of `logits` [n, ne], the top-k
    /// experts of each token (ties to the lower index) in `chosen` [n, k], and the routed rows
    /// grouped by expert: `routes` [rows, 2] (token, expert), `starts` [ne + 1] and each
    /// token's rows `token_rows` [n, k], increasing.
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
    );
    /// hx[r] = h[token of r], rows of `d`.
    fn moe_gather(&self, h: View<f32>, routes: View<u32>, d: usize, hx: ViewMut<f32>);
    /// out[t] = sum over t's rows r, in order, of probs[t, expert of r] * o[r] (overwritten).
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
    );
    /// dout[r] = probs[t, e] * dy[t] and dprob[t, e] = <dy[t], o[r]> (0 where unchosen); both
    /// overwritten.
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
    );
    /// dlogits = p * (dp - sum(p * dp)) per row of `ne` (overwritten).
    fn softmax_backward(
        &self,
        probs: View<f32>,
        dprob: View<f32>,
        ne: usize,
        dlogits: ViewMut<f32>,
    );
    /// dh[t] += the rows of dhx that token t was routed to, in order.
    fn moe_scatter_add(
        &self,
        dhx: View<f32>,
        token_rows: View<u32>,
        k: usize,
        d: usize,
        dh: ViewMut<f32>,
    );
    /// `x[rows, d] += b[d]`
    fn add_row_vector(&self, x: ViewMut<f32>, b: View<f32>);
    /// `out[d]` += column sums of `x[rows, d]` (fixed order).
    fn sum_rows_into(&self, x: View<f32>, out: ViewMut<f32>);
    /// y += x
    fn add_assign(&self, y: ViewMut<f32>, x: View<f32>);
    /// x *= factor
    fn scale(&self, x: ViewMut<f32>, factor: f32);
    /// out[i] = x[i] rounded to bf16 (`Bf16::from_f32`).
    fn round_bf16(&self, x: View<f32>, out: ViewMut<Bf16>);
    /// The sum of squares of `x` in f64, in a fixed order (the global gradient norm).
    fn sum_squares(&self, x: View<f32>) -> f64;
    fn adamw_update(
        &self,
        p: ViewMut<f32>,
        g: View<f32>,
        m: ViewMut<f32>,
        v: ViewMut<f32>,
        step: &AdamWStep,
    );
}

/// Causal multi-head attention over q, k, v of [batch * seq, heads * head_dim].
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// The product-key router: per token, two halves of `channels * sqrt_n` sub-key logits laid out
/// [half][channel][sub_key]; per channel the top-k of the sqrt_n^2 sums.
#[derive(Clone, Copy, Debug)]
pub struct ProductKeyShape {
    pub channels: usize,
    pub sqrt_n: usize,
    pub k: usize,
}

impl ProductKeyShape {
    pub fn logits_per_token(&self) -> usize {
        2 * self.channels * self.sqrt_n
    }
    pub fn slots_per_token(&self) -> usize {
        self.channels * self.k
    }
}

/// How a selected linear expert's output is weighted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertMode {
    /// sgatlin: coef = g * a (the raw router score gates a linear neuron).
    GatedLinear,
    /// sgatlin-gelu ablation: coef = gelu(g * a).
    GatedGelu,
    /// PEER: coef = gelu(a) * softmax_k(g).
    PeerSoftmaxGelu,
}

#[derive(Clone, Copy, Debug)]
pub struct ExpertShape {
    pub d: usize,
    pub channels: usize,
    pub k: usize,
    /// Rows per channel pool; the pool row of (c, idx) is `c * channel_stride + idx`
    /// (channel_stride = N for per-channel pools, 0 for one pool shared by all channels).
    pub channel_stride: usize,
    pub pool_rows: usize,
}

/// One AdamW update of a run of parameters.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// lambda; the applied decay is lr * lambda * theta.
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub t: u64,
    /// Multiplies the gradient first (global-norm clipping).
    pub grad_scale: f32,
}

/// How the expert kernels read the pools of sgatlin and PEER: the f32 parameters, or a bf16
/// copy of them made at each forward pass (half the bytes of every gathered row; the
/// parameters, their gradients and the optimiser stay f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    #[default]
    F32,
    Bf16,
}

/// The expert pools u (down) and v (up), [pool_rows, d] each, as the expert ops read them: the
/// f32 parameters themselves, or a bf16 copy of them (rows widened to f32 on load, f32
/// arithmetic); the gradients are f32 in both cases.
#[derive(Clone, Copy)]
pub enum Pool<'a> {
    F32 {
        u: View<'a, f32>,
        v: View<'a, f32>,
    },
    Bf16 {
        u: View<'a, Bf16>,
        v: View<'a, Bf16>,
    },
}

/// Where `experts_forward` saves what the same backend's `experts_backward` reads, each
/// [tokens, C, k]: a (u.x), coef and PEER's softmax weights w. A backend's forward saves what its
/// own backward needs: the CPU one a, coef and w; the CUDA one a and PEER's w (its backward
/// recomputes the coefficient from the scores, a and w), leaving coef as it was.
pub struct ExpertsSaved<'a> {
    pub a: ViewMut<'a, f32>,
    pub coef: ViewMut<'a, f32>,
    pub w: ViewMut<'a, f32>,
}

pub struct ExpertsSavedRef<'a> {
    pub a: View<'a, f32>,
    pub coef: View<'a, f32>,
    pub w: View<'a, f32>,
}

pub struct ExpertsGrads<'a> {
    pub dx: ViewMut<'a, f32>,
    pub du: ViewMut<'a, f32>,
    pub dv: ViewMut<'a, f32>,
}
