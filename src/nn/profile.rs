//! A per-op profile of training: `Profiled<B>` is a `Backend` that hands every call to `B`
//! unchanged and adds the call's wall time and count to a table keyed by op name (matrix
//! products also by layout and shape). `bench_train_with(.., profile: true)` builds the trainer
//! on it; the unprofiled path never sees the wrapper.
//!
//! The ops run synchronously (rayon inside, returning when done), so an `Instant` around a call
//! is the op's wall time; what a step spends outside them (the model's own bookkeeping, the
//! gradient norm, buffer growth) is the step time minus the sum.

use super::backend::{
    AdamWStep, Addr, AttnShape, Backend, Bf16, ExpertMode, ExpertShape, ExpertsGrads, ExpertsSaved,
    ExpertsSavedRef, Pool, ProductKeyShape, Strided, View, ViewMut,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Op name, and for matrix products the shape (m, n, k).
type Key = (&'static str, Option<[usize; 3]>);

/// The table a `Profiled` backend fills; share it with `Profiled::stats`.
#[derive(Debug, Default)]
pub struct OpTimes {
    table: Mutex<BTreeMap<Key, (Duration, u64)>>,
}

impl OpTimes {
    fn add(&self, key: Key, dt: Duration) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let e = t.entry(key).or_default();
        e.0 += dt;
        e.1 += 1;
    }

    /// Forgets everything recorded so far (e.g. the warm-up step).
    pub fn reset(&self) {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// What was recorded, one entry per (op, shape).
    pub fn snapshot(&self) -> Vec<OpStat> {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.iter()
            .map(|(&(op, shape), &(dt, calls))| OpStat {
                op: op.to_string(),
                shape,
                calls,
                secs: dt.as_secs_f64(),
            })
            .collect()
    }
}

/// Time and count of one op (at one shape, for matrix products) over the profiled steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpStat {
    pub op: String,
    /// (m, n, k) of a matrix product.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<[usize; 3]>,
    pub calls: u64,
    pub secs: f64,
}

/// The profile of `steps` training steps that took `step_secs` of wall time together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub steps: usize,
    pub step_secs: f64,
    pub ops: Vec<OpStat>,
}

impl Profile {
    /// Per op (shapes summed): (op, seconds, calls), most time first.
    pub fn by_op(&self) -> Vec<(String, f64, u64)> {
        let mut m: BTreeMap<&str, (f64, u64)> = BTreeMap::new();
        for s in &self.ops {
            let e = m.entry(&s.op).or_default();
            e.0 += s.secs;
            e.1 += s.calls;
        }
        let mut v: Vec<_> = m
            .into_iter()
            .map(|(op, (secs, calls))| (op.to_string(), secs, calls))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }

    /// Seconds spent inside backend ops.
    pub fn ops_secs(&self) -> f64 {
        self.ops.iter().map(|s| s.secs).sum()
    }

    /// A fixed-width table: per op ms per step, % of the step, calls per step; the time outside
    /// backend ops; then the `top_shapes` matrix-product shapes that took most time.
    pub fn render(&self, indent: &str, top_shapes: usize) -> String {
        let steps = self.steps.max(1) as f64;
        let step_ms = self.step_secs * 1e3 / steps;
        let pct = |secs: f64| 100.0 * secs / self.step_secs.max(1e-12);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{indent}{:<34} {:>10} {:>7} {:>10}",
            "op", "ms/step", "% step", "calls/step"
        );
        let line = |out: &mut String, name: &str, secs: f64, calls: Option<u64>| {
            let calls = calls.map_or(String::new(), |c| format!("{:.1}", c as f64 / steps));
            let text = format!(
                "{indent}{name:<34} {:>10.2} {:>6.1}% {calls:>10}",
                secs * 1e3 / steps,
                pct(secs)
            );
            let _ = writeln!(out, "{}", text.trim_end());
        };
        for (op, secs, calls) in self.by_op() {
            line(&mut out, &op, secs, Some(calls));
        }
        line(
            &mut out,
            "outside backend ops",
            self.step_secs - self.ops_secs(),
            None,
        );
        let _ = writeln!(
            out,
            "{indent}{:<34} {step_ms:>10.2} {:>6.1}%",
            "step", 100.0
        );
        let mut shapes: Vec<&OpStat> = self.ops.iter().filter(|s| s.shape.is_some()).collect();
        shapes.sort_by(|a, b| b.secs.total_cmp(&a.secs));
        if !shapes.is_empty() && top_shapes > 0 {
            let _ = writeln!(out, "{indent}top matrix products (m x n x k):");
            for s in shapes.into_iter().take(top_shapes) {
                let [m, n, k] = s.shape.unwrap_or_default();
                line(
                    &mut out,
                    &format!("  {} {m}x{n}x{k}", s.op),
                    s.secs,
                    Some(s.calls),
                );
            }
        }
        out
    }
}

/// `B` with every op timed into a shared `OpTimes`.
pub struct Profiled<B: Backend> {
    inner: B,
    times: Arc<OpTimes>,
}

impl<B: Backend> Profiled<B> {
    pub fn new(inner: B) -> Profiled<B> {
        Profiled {
            inner,
            times: Arc::default(),
        }
    }

    /// The table this backend fills (keep a clone before boxing the backend into a model).
    pub fn stats(&self) -> Arc<OpTimes> {
        self.times.clone()
    }

    #[inline]
    fn time<R>(&self, key: Key, f: impl FnOnce() -> R) -> R {
        let t0 = Instant::now();
        let r = f();
        self.times.add(key, t0.elapsed());
        r
    }
}

fn matmul_name(a_t: bool, b_t: bool) -> &'static str {
    match (a_t, b_t) {
        (false, false) => "matmul(a,b)",
        (true, false) => "matmul(a^T,b)",
        (false, true) => "matmul(a,b^T)",
        (true, true) => "matmul(a^T,b^T)",
    }
}

#[allow(clippy::too_many_arguments)]
impl<B: Backend> Backend for Profiled<B> {
    fn take_error(&self) -> Option<String> {
        self.inner.take_error()
    }
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn alloc(&self, bytes: usize) -> Result<Addr, String> {
        self.inner.alloc(bytes)
    }
    fn free(&self, addr: Addr, bytes: usize) {
        self.inner.free(addr, bytes)
    }
    fn host_memory(&self) -> bool {
        self.inner.host_memory()
    }
    fn upload(&self, dst: Addr, src: &[u8]) {
        self.time(("upload", None), || self.inner.upload(dst, src))
    }
    fn download(&self, src: Addr, dst: &mut [u8]) {
        self.time(("download", None), || self.inner.download(src, dst))
    }
    fn copy(&self, dst: Addr, src: Addr, bytes: usize) {
        self.time(("copy", None), || self.inner.copy(dst, src, bytes))
    }
    fn zero(&self, dst: Addr, bytes: usize) {
        self.time(("zero", None), || self.inner.zero(dst, bytes))
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
        self.time((matmul_name(a_t, b_t), Some([m, n, k])), || {
            self.inner.matmul(m, n, k, a, a_t, b, b_t, c, accumulate)
        })
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
        self.time(("matmul_strided", Some([m, n, k])), || {
            self.inner
                .matmul_strided(m, n, k, a, b, c, c_rs, accumulate)
        })
    }
    fn rmsnorm_forward(
        &self,
        x: View<f32>,
        scale: View<f32>,
        d: usize,
        y: ViewMut<f32>,
        rstd: ViewMut<f32>,
    ) {
        self.time(("rmsnorm_forward", None), || {
            self.inner.rmsnorm_forward(x, scale, d, y, rstd)
        })
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
        self.time(("rmsnorm_backward", None), || {
            self.inner
                .rmsnorm_backward(x, scale, rstd, dy, d, dx, dscale)
        })
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
        let name = if inverse { "rope_backward" } else { "rope" };
        self.time((name, None), || {
            self.inner.rope(x, cos, sin, seq, heads, hd, inverse)
        })
    }
    fn attention_saved_len(&self, s: &AttnShape) -> usize {
        self.inner.attention_saved_len(s)
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
        self.time(("attention_forward", None), || {
            self.inner.attention_forward(s, q, k, v, out, saved)
        })
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
        self.time(("attention_backward", None), || {
            self.inner
                .attention_backward(s, q, k, v, out, saved, dout, dq, dk, dv)
        })
    }
    fn gelu_forward(&self, x: View<f32>, y: ViewMut<f32>) {
        self.time(("gelu_forward", None), || self.inner.gelu_forward(x, y))
    }
    fn gelu_backward(&self, x: View<f32>, dy: View<f32>, dx: ViewMut<f32>) {
        self.time(("gelu_backward", None), || {
            self.inner.gelu_backward(x, dy, dx)
        })
    }
    fn swiglu_forward(&self, z: View<f32>, f: usize, y: ViewMut<f32>) {
        self.time(("swiglu_forward", None), || {
            self.inner.swiglu_forward(z, f, y)
        })
    }
    fn swiglu_backward(&self, z: View<f32>, dy: View<f32>, f: usize, dz: ViewMut<f32>) {
        self.time(("swiglu_backward", None), || {
            self.inner.swiglu_backward(z, dy, f, dz)
        })
    }
    fn embedding_forward(&self, table: View<f32>, tokens: View<u32>, d: usize, out: ViewMut<f32>) {
        self.time(("embedding_forward", None), || {
            self.inner.embedding_forward(table, tokens, d, out)
        })
    }
    fn embedding_backward(
        &self,
        dx: View<f32>,
        tokens: View<u32>,
        host_tokens: &[u32],
        d: usize,
        dtable: ViewMut<f32>,
    ) {
        self.time(("embedding_backward", None), || {
            self.inner
                .embedding_backward(dx, tokens, host_tokens, d, dtable)
        })
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
        self.time(("softmax_xent", None), || {
            self.inner
                .softmax_xent(logits, targets, vocab, pad, counted, want_grad)
        })
    }
    fn product_key_topk_forward(
        &self,
        s: ProductKeyShape,
        logits: View<f32>,
        scores: ViewMut<f32>,
        indices: ViewMut<u32>,
    ) {
        self.time(("product_key_topk_forward", None), || {
            self.inner
                .product_key_topk_forward(s, logits, scores, indices)
        })
    }
    fn product_key_topk_backward(
        &self,
        s: ProductKeyShape,
        indices: View<u32>,
        dscores: View<f32>,
        dlogits: ViewMut<f32>,
    ) {
        self.time(("product_key_topk_backward", None), || {
            self.inner
                .product_key_topk_backward(s, indices, dscores, dlogits)
        })
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
        self.time(("experts_forward", None), || {
            self.inner
                .experts_forward(s, mode, x, scores, indices, pool, saved, y)
        })
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
        dscores: ViewMut<f32>,
        da: ViewMut<f32>,
        grads: ExpertsGrads,
    ) {
        self.time(("experts_backward", None), || {
            self.inner.experts_backward(
                s, mode, x, scores, indices, pool, saved, dy, dscores, da, grads,
            )
        })
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
        self.time(("moe_route", None), || {
            self.inner
                .moe_route(logits, ne, k, probs, chosen, routes, starts, token_rows)
        })
    }
    fn moe_gather(&self, h: View<f32>, routes: View<u32>, d: usize, hx: ViewMut<f32>) {
        self.time(("moe_gather", None), || {
            self.inner.moe_gather(h, routes, d, hx)
        })
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
        self.time(("moe_combine", None), || {
            self.inner
                .moe_combine(o, probs, routes, token_rows, ne, k, d, out)
        })
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
        self.time(("moe_combine_backward", None), || {
            self.inner
                .moe_combine_backward(dy, o, probs, routes, token_rows, ne, k, d, dout, dprob)
        })
    }
    fn softmax_backward(
        &self,
        probs: View<f32>,
        dprob: View<f32>,
        ne: usize,
        dlogits: ViewMut<f32>,
    ) {
        self.time(("softmax_backward", None), || {
            self.inner.softmax_backward(probs, dprob, ne, dlogits)
        })
    }
    fn moe_scatter_add(
        &self,
        dhx: View<f32>,
        token_rows: View<u32>,
        k: usize,
        d: usize,
        dh: ViewMut<f32>,
    ) {
        self.time(("moe_scatter_add", None), || {
            self.inner.moe_scatter_add(dhx, token_rows, k, d, dh)
        })
    }
    fn add_row_vector(&self, x: ViewMut<f32>, b: View<f32>) {
        self.time(("add_row_vector", None), || self.inner.add_row_vector(x, b))
    }
    fn sum_rows_into(&self, x: View<f32>, out: ViewMut<f32>) {
        self.time(("sum_rows_into", None), || self.inner.sum_rows_into(x, out))
    }
    fn add_assign(&self, y: ViewMut<f32>, x: View<f32>) {
        self.time(("add_assign", None), || self.inner.add_assign(y, x))
    }
    fn scale(&self, x: ViewMut<f32>, factor: f32) {
        self.time(("scale", None), || self.inner.scale(x, factor))
    }
    fn round_bf16(&self, x: View<f32>, out: ViewMut<Bf16>) {
        self.time(("round_bf16", None), || self.inner.round_bf16(x, out))
    }
    fn sum_squares(&self, x: View<f32>) -> f64 {
        self.time(("sum_squares", None), || self.inner.sum_squares(x))
    }
    fn adamw_update(
        &self,
        p: ViewMut<f32>,
        g: View<f32>,
        m: ViewMut<f32>,
        v: ViewMut<f32>,
        step: &AdamWStep,
    ) {
        self.time(("adamw_update", None), || {
            self.inner.adamw_update(p, g, m, v, step)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::config::FfnKind;
    use crate::nn::cpu::CpuBackend;
    use crate::nn::train::tests::tiny;
    use crate::nn::train::{TrainConfig, Trainer};

    fn batch(step: usize, rows: usize, seq: usize, vocab: usize) -> Vec<u32> {
        (0..rows * (seq + 1))
            .map(|i| ((i * 7 + step * 13 + i / 5) % vocab) as u32)
            .collect()
    }

    #[test]
    fn profiled_backend_delegates_bit_for_bit_and_sees_the_ops() {
        for kind in FfnKind::ALL {
            let cfg = tiny(kind);
            let tc = TrainConfig {
                total_steps: 4,
                warmup_steps: 1,
                seed: 3,
                ..TrainConfig::default()
            };
            let mut plain = Trainer::new(&cfg, tc.clone()).unwrap();
            let profiled = Profiled::new(CpuBackend::default());
            let times = profiled.stats();
            let mut wrapped =
                Trainer::with_backend(&cfg, tc, std::sync::Arc::new(profiled)).unwrap();
            assert_eq!(wrapped.model.backend_name(), plain.model.backend_name());
            for s in 0..3 {
                let b = batch(s, 3, cfg.seq_len, cfg.vocab);
                let (x, y) = (plain.step(&b).unwrap(), wrapped.step(&b).unwrap());
                assert_eq!(x.loss.to_bits(), y.loss.to_bits(), "{}", kind.as_str());
                assert_eq!(x.grad_norm.to_bits(), y.grad_norm.to_bits());
            }
            let same = plain
                .model
                .param_values()
                .iter()
                .zip(wrapped.model.param_values().iter())
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{}: weights differ under the profiler", kind.as_str());

            let ops = times.snapshot();
            let calls =
                |name: &str| -> u64 { ops.iter().filter(|s| s.op == name).map(|s| s.calls).sum() };
            let mut must = vec![
                "matmul(a,b)",
                "softmax_xent",
                "adamw_update",
                "rmsnorm_forward",
                "rmsnorm_backward",
                "rope",
                "rope_backward",
                "attention_forward",
                "attention_backward",
            ];
            must.extend(match kind {
                FfnKind::Mlp => vec!["gelu_forward", "gelu_backward"],
                FfnKind::Swiglu | FfnKind::Moe => vec!["swiglu_forward", "swiglu_backward"],
                _ => vec![
                    "product_key_topk_forward",
                    "product_key_topk_backward",
                    "experts_forward",
                    "experts_backward",
                ],
            });
            for op in must {
                assert!(calls(op) > 0, "{}: no {op} call seen", kind.as_str());
            }
            // One cross-entropy per step; matrix products carry their shapes.
            assert_eq!(calls("softmax_xent"), 3);
            assert!(ops
                .iter()
                .filter(|s| s.op.starts_with("matmul"))
                .all(|s| s.shape.is_some()));
            assert!(ops.iter().all(|s| s.secs >= 0.0));
        }
    }

    #[test]
    fn profile_report_sums_shapes_and_shows_the_remainder() {
        let p = Profile {
            steps: 2,
            step_secs: 1.0,
            ops: vec![
                OpStat {
                    op: "matmul(a,b)".into(),
                    shape: Some([4, 5, 6]),
                    calls: 2,
                    secs: 0.3,
                },
                OpStat {
                    op: "matmul(a,b)".into(),
                    shape: Some([7, 8, 9]),
                    calls: 4,
                    secs: 0.2,
                },
                OpStat {
                    op: "softmax_xent".into(),
                    shape: None,
                    calls: 2,
                    secs: 0.1,
                },
            ],
        };
        let by = p.by_op();
        assert_eq!(by[0].0, "matmul(a,b)");
        assert!((by[0].1 - 0.5).abs() < 1e-12 && by[0].2 == 6);
        assert!((p.ops_secs() - 0.6).abs() < 1e-12);
        let text = p.render("", 5);
        assert!(text.contains("outside backend ops"), "{text}");
        assert!(text.contains("matmul(a,b) 4x5x6"), "{text}");
        // 0.5 s over 2 steps = 250 ms/step, 50% of the step, 3 calls per step.
        assert!(
            text.lines().any(|l| l.starts_with("matmul(a,b) ")
                && l.contains("250.00")
                && l.contains("50.0%")
                && l.contains("3.0")),
            "{text}"
        );
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Profile>(&json).unwrap(), p);
    }
}
