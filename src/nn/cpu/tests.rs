//! Every kernel's backward against central finite differences of its forward in f64, along
//! random directions, on fresh random inputs each run (the seed is printed on failure). The
//! same backward run in f32 must agree with the f64 differences to ~1e-3.

use super::activations::{gelu_backward, gelu_forward, swiglu_backward, swiglu_forward};
use super::attention::{attention_backward, attention_forward};
use super::experts::{experts_backward, experts_forward, SlotOrder};
use super::isa::Isa;
use super::matmul::matmul;
use super::real::Real;
use super::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use super::rope::{rope_apply, rope_tables};
use super::router::{product_key_topk_backward, product_key_topk_forward};
use super::xent::softmax_xent;
use crate::nn::backend::{AdamWStep, AttnShape, ExpertMode, ExpertShape, ProductKeyShape};
use crate::nn::rng::{fresh_seed, Rng};

fn cast<T: Real>(x: &[f64]) -> Vec<T> {
    x.iter().map(|&v| T::from_f64(v)).collect()
}

fn uncast<T: Real>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

/// An op under test: a forward from real inputs to one real output, and its backward.
trait OpCase {
    fn forward<T: Real>(&self, inputs: &[Vec<T>]) -> Vec<T>;
    fn backward<T: Real>(&self, inputs: &[Vec<T>], dy: &[T]) -> Vec<Vec<T>>;
}

fn randn(rng: &mut Rng, n: usize, std: f64) -> Vec<f64> {
    (0..n).map(|_| rng.normal() * std).collect()
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Checks d<w, f(x)>/dx_i along a random direction for every input i.
fn check<C: OpCase>(name: &str, seed: u64, case: &C, inputs: Vec<Vec<f64>>, eps: f64) {
    let mut rng = Rng::new(seed ^ 0x5EED);
    let y = case.forward::<f64>(&inputs);
    let w = randn(&mut rng, y.len(), 1.0);
    let g64 = case.backward::<f64>(&inputs, &w);
    let in32: Vec<Vec<f32>> = inputs.iter().map(|x| cast(x)).collect();
    // The f32 backward on every instruction set this CPU has.
    let g32: Vec<(Isa, Vec<Vec<f64>>)> = Isa::supported_all()
        .into_iter()
        .map(|isa| {
            let g = isa.scoped(|| case.backward::<f32>(&in32, &cast(&w)));
            (isa, g.iter().map(|g| uncast(g)).collect())
        })
        .collect();
    for i in 0..inputs.len() {
        let r = randn(&mut rng, inputs[i].len(), 1.0);
        let shifted = |sign: f64| {
            let mut x = inputs.clone();
            for (xi, ri) in x[i].iter_mut().zip(&r) {
                *xi += sign * eps * ri;
            }
            dot64(&w, &case.forward::<f64>(&x))
        };
        let fd = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps);
        let an64 = dot64(&g64[i], &r);
        let scale = fd.abs().max(an64.abs()).max(1e-3);
        assert!(
            (fd - an64).abs() <= 1e-6 * scale,
            "{name} input {i}: f64 backward {an64} vs finite differences {fd} (seed {seed})"
        );
        for (isa, g) in &g32 {
            let an32 = dot64(&g[i], &r);
            assert!(
                (fd - an32).abs() <= 1e-3 * scale,
                "{name} input {i}: f32 backward on {isa:?} {an32} vs finite differences {fd} \
                 (seed {seed})"
            );
        }
    }
}

struct MatmulCase {
    m: usize,
    n: usize,
    k: usize,
    a_t: bool,
    b_t: bool,
}
impl OpCase for MatmulCase {
    fn forward<T: Real>(&self, x: &[Vec<T>]) -> Vec<T> {
        let mut c = vec![T::ZERO; self.m * self.n];
        matmul(
            self.m, self.n, self.k, &x[0], self.a_t, &x[1], self.b_t, &mut c, false,
        );
        c
    }
    fn backward<T: Real>(&self, x: &[Vec<T>], dy: &[T]) -> Vec<Vec<T>> {
        let (m, n, k) = (self.m, self.n, self.k);
        let mut da = vec![T::ZERO; m * k];
        let mut db = vec![T::ZERO; k * n];
        // dA = dC · op(B)^T, dB = op(A)^T · dC, then transposed back to storage layout.
        if self.a_t {
            matmul(k, m, n, &x[1], self.b_t, dy, true, &mut da, false);
        } else {
            matmul(m, k, n, dy, false, &x[1], !self.b_t, &mut da, false);
        }
        if self.b_t {
            matmul(n, k, m, dy, true, &x[0], self.a_t, &mut db, false);
        } else {
            matmul(k, n, m, &x[0], !self.a_t, dy, false, &mut db, false);
        }
        vec![da, db]
    }
}

#[test]
fn matmul_backward_matches_finite_differences() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
        let (m, n, k) = (5, 7, 6);
        let case = MatmulCase { m, n, k, a_t, b_t };
        check(
            "matmul",
            seed,
            &case,
            vec![randn(&mut rng, m * k, 1.0), randn(&mut rng, k * n, 1.0)],
            1e-5,
        );
    }
    // The threaded path of gemm (above the size threshold) must give the same products.
    let (m, n, k) = (64, 80, 72);
    let a = randn(&mut rng, m * k, 1.0);
    let b = randn(&mut rng, k * n, 1.0);
    let mut c = vec![0.0; m * n];
    matmul(m, n, k, &a, false, &b, false, &mut c, false);
    for i in [0, 17, 63] {
        for j in [0, 33, 79] {
            let want: f64 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            assert!((c[i * n + j] - want).abs() < 1e-9, "seed {seed}");
        }
    }
}

struct RmsCase {
    d: usize,
}
impl OpCase for RmsCase {
    fn forward<T: Real>(&self, x: &[Vec<T>]) -> Vec<T> {
        let rows = x[0].len() / self.d;
        let (mut y, mut r) = (vec![T::ZERO; x[0].len()], vec![T::ZERO; rows]);
        rmsnorm_forward(&x[0], &x[1], self.d, &mut y, &mut r);
        y
    }
    fn backward<T: Real>(&self, x: &[Vec<T>], dy: &[T]) -> Vec<Vec<T>> {
        let rows = x[0].len() / self.d;
        let (mut y, mut r) = (vec![T::ZERO; x[0].len()], vec![T::ZERO; rows]);
        rmsnorm_forward(&x[0], &x[1], self.d, &mut y, &mut r);
        let (mut dx, mut ds) = (vec![T::ZERO; x[0].len()], vec![T::ZERO; self.d]);
        rmsnorm_backward(&x[0], &x[1], &r, dy, self.d, &mut dx, &mut ds);
        vec![dx, ds]
    }
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    // 150 rows: more than one partial-sum chunk of the scale gradient.
    let (rows, d) = (150, 12);
    let scale: Vec<f64> = (0..d).map(|_| 1.0 + 0.3 * rng.normal()).collect();
    check(
        "rmsnorm",
        seed,
        &RmsCase { d },
        vec![randn(&mut rng, rows * d, 1.5), scale],
        1e-5,
    );
}

struct RopeCase {
    seq: usize,
    heads: usize,
    hd: usize,
}
impl OpCase for RopeCase {
    fn forward<T: Real>(&self, x: &[Vec<T>]) -> Vec<T> {
        let (c, s) = rope_tables::<T>(self.seq, self.hd);
        let mut y = x[0].clone();
        rope_apply(&mut y, &c, &s, self.seq, self.heads, self.hd, false);
        y
    }
    fn backward<T: Real>(&self, _x: &[Vec<T>], dy: &[T]) -> Vec<Vec<T>> {
        let (c, s) = rope_tables::<T>(self.seq, self.hd);
        let mut dx = dy.to_vec();
        rope_apply(&mut dx, &c, &s, self.seq, self.heads, self.hd, true);
        vec![dx]
    }
}

#[test]
fn rope_backward_matches_finite_differences() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let case = RopeCase {
        seq: 9,
        heads: 2,
        hd: 8,
    };
    check(
        "rope",
        seed,
        &case,
        vec![randn(&mut rng, 2 * 9 * 2 * 8, 1.0)],
        1e-5,
    );
}

struct AttnCase {
    batch: usize,
    seq: usize,
    heads: usize,
    hd: usize,
}
impl AttnCase {
    fn shape(&self) -> AttnShape {
        AttnShape {
            batch: self.batch,
            seq: self.seq,
            heads: self.heads,
            head_dim: self.hd,
        }
    }
}
impl OpCase for AttnCase {
    fn forward<T: Real>(&self, x: &[Vec<T>]) -> Vec<T> {
        let mut out = vec![T::ZERO; x[0].len()];
        let mut att = vec![T::ZERO; self.batch * self.heads * self.seq * self.seq];
        attention_forward(&self.shape(), &x[0], &x[1], &x[2], &mut out, &mut att);
        out
    }
    fn backward<T: Real>(&self, x: &[Vec<T>], dy: &[T]) -> Vec<Vec<T>> {
        let mut out = vec![T::ZERO; x[0].len()];
        let mut att = vec![T::ZERO; self.batch * self.heads * self.seq * self.seq];
        attention_forward(&self.shape(), &x[0], &x[1], &x[2], &mut out, &mut att);
        let (mut dq, mut dk, mut dv) = (
            vec![T::ZERO; out.len()],
            vec![T::ZERO; out.len()],
            vec![T::ZERO; out.len()],
        );
        attention_backward(
            &self.shape(),
            &x[0],
            &x[1],
            &x[2],
            &att,
            dy,
            &mut dq,
            &mut dk,
            &mut dv,
        );
        vec![dq, dk, dv]
    }
}

#[test]
fn attention_backward_matches_finite_differences() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    // 7 positions: one block of the causal products; 70: three, the last one partial.
    for seq in [7, 70] {
        let case = AttnCase {
            batch: 2,
            seq,
            heads: 3,
            hd: 4,
        };
        let n = 2 * seq * 3 * 4;
        check(
            "attention",
            seed,
            &case,
            (0..3).map(|_| randn(&mut rng, n, 1.0)).collect(),
            1e-5,
        );
    }
}

struct GeluCase;
impl OpCase for GeluCase {
    fn forward<T: Real>(&self, x: &[Vec<T>]) -> Vec<T> {
        let mut y = vec![T::ZERO; x[0].len()];
        gelu_forward(&x[0], &mut y);
        y
    }
    fn backward<T: Real>(&self, x: &[Vec<T>], dy: &[T]) -> Vec<Vec<T>> {
        let mut dx = vec![T::ZERO; x[0].len()];
        gelu_backward(&x[0], dy, &mut dx);
        vec![dx]
    }
}

struct SwigluCase {
    f: usize,
}
impl OpCase for SwigluCase {
    fn forward<T: Real>(&self, x: &[Vec<T>]) -> Vec<T> {
        let mut y = vec![T::ZERO; x[0].len() / 2];
        swiglu_forward(&x[0], self.f, &mut y);
        y
    }
    fn backward<T: Real>(&self, x: &[Vec<T>], dy: &[T]) -> Vec<Vec<T>> {
        let mut dz = vec![T::ZERO; x[0].len()];
        swiglu_backward(&x[0], dy, self.f, &mut dz);
        vec![dz]
    }
}

#[test]
fn activations_backward_match_finite_differences() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    check(
        "gelu",
        seed,
        &GeluCase,
        vec![randn(&mut rng, 300, 2.0)],
        1e-5,
    );
    // Wide inputs so both clamps (gate above 7, linear outside ±7) are exercised, kept off
    // the kinks themselves, where a finite difference straddles the clamp.
    let mut z = randn(&mut rng, 40 * 20, 6.0);
    for x in z.iter_mut() {
        if (x.abs() - 7.0).abs() < 1e-3 {
            *x += 2e-3 * x.signum();
        }
    }
    check("swiglu", seed, &SwigluCase { f: 10 }, vec![z], 1e-6);
}

struct XentCase {
    vocab: usize,
    targets: Vec<u32>,
    pad: Option<u32>,
}
impl OpCase for XentCase {
    fn forward<T: Real>(&self, x: &[Vec<T>]) -> Vec<T> {
        let mut l = x[0].clone();
        let (sum, count) = softmax_xent(&mut l, &self.targets, self.vocab, self.pad, false);
        vec![T::from_f64(sum / count as f64)]
    }
    fn backward<T: Real>(&self, x: &[Vec<T>], dy: &[T]) -> Vec<Vec<T>> {
        let mut l = x[0].clone();
        softmax_xent(&mut l, &self.targets, self.vocab, self.pad, true);
        vec![l.iter().map(|&g| g * dy[0]).collect()]
    }
}

#[test]
fn softmax_xent_backward_matches_finite_differences() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let (rows, vocab) = (12, 17);
    let mut targets: Vec<u32> = (0..rows)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect();
    targets[3] = 0;
    targets[7] = 0;
    let case = XentCase {
        vocab,
        targets,
        pad: Some(0),
    };
    check(
        "softmax_xent",
        seed,
        &case,
        vec![randn(&mut rng, rows * vocab, 2.0)],
        1e-5,
    );
}

struct RouterCase {
    shape: ProductKeyShape,
    indices: Vec<u32>,
}
impl OpCase for RouterCase {
    fn forward<T: Real>(&self, x: &[Vec<T>]) -> Vec<T> {
        let n = self.indices.len();
        let (mut sc, mut ix) = (vec![T::ZERO; n], vec![0u32; n]);
        product_key_topk_forward(self.shape, &x[0], &mut sc, &mut ix);
        assert_eq!(
            ix, self.indices,
            "selection changed under a tiny perturbation"
        );
        sc
    }
    fn backward<T: Real>(&self, x: &[Vec<T>], dy: &[T]) -> Vec<Vec<T>> {
        let mut dl = vec![T::ZERO; x[0].len()];
        product_key_topk_backward(self.shape, &self.indices, dy, &mut dl);
        vec![dl]
    }
}

/// Logits whose per-half scores and all pairwise sums are separated by far more than the
/// finite-difference step: half 1 on a grid of 1.0, half 2 on a grid of 0.013, both shuffled.
fn separated_logits(rng: &mut Rng, tokens: usize, s: ProductKeyShape) -> Vec<f64> {
    let n = s.sqrt_n;
    let mut out = Vec::with_capacity(tokens * s.logits_per_token());
    for _ in 0..tokens {
        for half in 0..2 {
            for _ in 0..s.channels {
                let mut perm: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    perm.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
                }
                let step = if half == 0 { 1.0 } else { 0.013 };
                let offset = rng.normal();
                out.extend(
                    perm.iter()
                        .map(|&p| offset + p as f64 * step + 1e-4 * rng.uniform()),
                );
            }
        }
    }
    out
}

#[test]
fn product_key_router_backward_matches_finite_differences() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let shape = ProductKeyShape {
        channels: 3,
        sqrt_n: 6,
        k: 4,
    };
    let tokens = 5;
    let logits = separated_logits(&mut rng, tokens, shape);
    let mut sc = vec![0.0; tokens * shape.slots_per_token()];
    let mut ix = vec![0u32; sc.len()];
    product_key_topk_forward(shape, &logits, &mut sc, &mut ix);
    // Selection sanity against brute force over all N = sqrt_n^2 experts.
    for t in 0..tokens {
        for c in 0..shape.channels {
            let row = &logits[t * shape.logits_per_token()..];
            let mut all: Vec<(f64, u32)> = (0..36)
                .map(|e| (row[c * 6 + e / 6] + row[(3 + c) * 6 + e % 6], e as u32))
                .collect();
            all.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
            for i in 0..4 {
                assert_eq!(ix[(t * 3 + c) * 4 + i], all[i].1, "seed {seed}");
                assert!((sc[(t * 3 + c) * 4 + i] - all[i].0).abs() < 1e-12);
            }
        }
    }
    check(
        "product_key_topk",
        seed,
        &RouterCase { shape, indices: ix },
        vec![logits],
        // The scores are linear in the logits while the selection holds, and it holds for steps
        // far below the 0.0128 separation: a large step keeps the rounding of the sums (about
        // 1e-14 over a step of 2e-7 was 1e-7, above the tolerance for a small derivative) out.
        1e-4,
    );
}

struct ExpertsCase {
    shape: ExpertShape,
    mode: ExpertMode,
    indices: Vec<u32>,
}
impl ExpertsCase {
    fn run<T: Real>(&self, x: &[Vec<T>]) -> (Vec<T>, Vec<T>, Vec<T>, Vec<T>) {
        let slots = self.indices.len();
        let (mut a, mut coef, mut w) = (
            vec![T::ZERO; slots],
            vec![T::ZERO; slots],
            vec![T::ZERO; slots],
        );
        let mut y = vec![T::ZERO; x[0].len()];
        experts_forward(
            self.shape,
            self.mode,
            &x[0],
            &x[1],
            &self.indices,
            &x[2],
            &x[3],
            &mut a,
            &mut coef,
            &mut w,
            &mut y,
        );
        (y, a, coef, w)
    }
}
impl OpCase for ExpertsCase {
    fn forward<T: Real>(&self, x: &[Vec<T>]) -> Vec<T> {
        self.run(x).0
    }
    fn backward<T: Real>(&self, x: &[Vec<T>], dy: &[T]) -> Vec<Vec<T>> {
        let (_, a, coef, w) = self.run(x);
        let slots = self.indices.len();
        let (mut ds, mut da) = (vec![T::ZERO; slots], vec![T::ZERO; slots]);
        let (mut dx, mut du, mut dv) = (
            vec![T::ZERO; x[0].len()],
            vec![T::ZERO; x[2].len()],
            vec![T::ZERO; x[3].len()],
        );
        let mut order = SlotOrder::default();
        experts_backward(
            self.shape,
            self.mode,
            &x[0],
            &x[1],
            &self.indices,
            &x[2],
            &x[3],
            &a,
            &coef,
            &w,
            dy,
            &mut ds,
            &mut da,
            &mut dx,
            &mut du,
            &mut dv,
            &mut order,
        );
        vec![dx, ds, du, dv]
    }
}

#[test]
fn linear_experts_backward_matches_finite_differences() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let (tokens, d, channels, k, n) = (40, 6, 3, 2, 5);
    for (mode, stride) in [
        (ExpertMode::GatedLinear, n),
        (ExpertMode::GatedGelu, n),
        (ExpertMode::PeerSoftmaxGelu, 0),
    ] {
        let pool_rows = if stride == 0 { n } else { channels * n };
        let shape = ExpertShape {
            d,
            channels,
            k,
            channel_stride: stride,
            pool_rows,
        };
        // Distinct experts within a channel (as product keys give); collisions across
        // tokens and, for the shared pool, across channels exercise the scatter-add.
        let mut indices = Vec::new();
        for _ in 0..tokens * channels {
            let first = (rng.next_u64() % n as u64) as u32;
            indices.push(first);
            indices.push((first + 1 + (rng.next_u64() % (n as u64 - 1)) as u32) % n as u32);
        }
        let case = ExpertsCase {
            shape,
            mode,
            indices,
        };
        let inputs = vec![
            randn(&mut rng, tokens * d, 1.0),
            randn(&mut rng, tokens * channels * k, 1.0),
            randn(&mut rng, pool_rows * d, 0.7),
            randn(&mut rng, pool_rows * d, 0.7),
        ];
        check(&format!("experts {mode:?}"), seed, &case, inputs, 1e-5);
    }
}

/// Runs a case's f32 forward and backward on `isa`.
fn run_on<C: OpCase>(isa: Isa, case: &C, x: &[Vec<f32>], dy: &[f32]) -> Vec<Vec<f32>> {
    isa.scoped(|| {
        let mut out = vec![case.forward::<f32>(x)];
        out.extend(case.backward::<f32>(x, dy));
        out
    })
}

/// Every path against the scalar one at sizes that fill whole vectors and leave remainders.
/// Paths with FMA round differently from scalar code, so those agree to a tolerance; AVX2 and
/// AVX-512 add in the same order (`vmath::LANES`), so kernels without a matmul agree in
/// every bit.
fn agree_on_every_path<C: OpCase>(name: &str, case: &C, x: Vec<Vec<f64>>, has_matmul: bool) {
    let mut rng = Rng::new(fresh_seed());
    let x: Vec<Vec<f32>> = x.iter().map(|v| cast(v)).collect();
    let n_out = case.forward::<f32>(&x).len();
    let dy: Vec<f32> = cast(&randn(&mut rng, n_out, 1.0));
    let scalar = run_on(Isa::Scalar, case, &x, &dy);
    let mut vector_paths = Vec::new();
    for isa in Isa::supported_all()
        .into_iter()
        .filter(|&i| i != Isa::Scalar)
    {
        let got = run_on(isa, case, &x, &dy);
        for (j, (g, s)) in got.iter().zip(&scalar).enumerate() {
            let size = s.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            for (a, b) in g.iter().zip(s) {
                assert!(
                    (a - b).abs() <= 2e-5 * size,
                    "{name} output {j} on {isa:?}: {a} vs scalar {b}"
                );
            }
        }
        vector_paths.push(got);
    }
    if !has_matmul {
        if let [avx2, avx512] = &vector_paths[..] {
            assert!(avx2 == avx512, "{name}: AVX2 and AVX-512 differ");
        }
    }
}

#[test]
fn every_instruction_set_agrees_with_the_scalar_path() {
    let mut rng = Rng::new(fresh_seed());
    eprintln!("paths here: {:?}", Isa::supported_all());
    let (rows, d) = (37, 133); // not multiples of any vector width
    for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
        let (m, n, k) = (67, 45, 129);
        let case = MatmulCase { m, n, k, a_t, b_t };
        let x = vec![randn(&mut rng, m * k, 1.0), randn(&mut rng, k * n, 1.0)];
        agree_on_every_path("matmul", &case, x, true);
    }
    let x = vec![randn(&mut rng, rows * d, 1.0), randn(&mut rng, d, 1.0)];
    agree_on_every_path("rmsnorm", &RmsCase { d }, x, false);
    agree_on_every_path("gelu", &GeluCase, vec![randn(&mut rng, 5000, 2.0)], false);
    let f = 71;
    let x = vec![randn(&mut rng, rows * 2 * f, 4.0)];
    agree_on_every_path("swiglu", &SwigluCase { f }, x, false);
    let vocab = 1000;
    let targets = (0..rows).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let case = XentCase {
        vocab: vocab as usize,
        targets,
        pad: Some(3),
    };
    let x = vec![randn(&mut rng, rows * vocab as usize, 3.0)];
    agree_on_every_path("softmax_xent", &case, x, false);
    let case = AttnCase {
        batch: 2,
        seq: 45,
        heads: 2,
        hd: 24,
    };
    let n = 2 * 45 * 2 * 24;
    let x = (0..3).map(|_| randn(&mut rng, n, 1.0)).collect();
    agree_on_every_path("attention", &case, x, true);
    let (tokens, d, channels, k, n) = (50, 101, 4, 3, 16);
    for (mode, stride) in [
        (ExpertMode::GatedLinear, n),
        (ExpertMode::GatedGelu, n),
        (ExpertMode::PeerSoftmaxGelu, 0),
    ] {
        let pool_rows = if stride == 0 { n } else { channels * n };
        let indices = (0..tokens * channels * k)
            .map(|_| (rng.next_u64() % n as u64) as u32)
            .collect();
        let shape = ExpertShape {
            d,
            channels,
            k,
            channel_stride: stride,
            pool_rows,
        };
        let case = ExpertsCase {
            shape,
            mode,
            indices,
        };
        let x = vec![
            randn(&mut rng, tokens * d, 1.0),
            randn(&mut rng, tokens * channels * k, 1.0),
            randn(&mut rng, pool_rows * d, 0.5),
            randn(&mut rng, pool_rows * d, 0.5),
        ];
        agree_on_every_path(&format!("experts {mode:?}"), &case, x, false);
    }
}

#[test]
fn adamw_and_row_ops_agree_on_every_path() {
    use super::adamw::adamw_update;
    use super::rowops::{add_assign, add_row_vector, sum_rows_into};
    let mut rng = Rng::new(fresh_seed());
    let n = 10_007;
    let (p0, g): (Vec<f32>, Vec<f32>) = (
        cast(&randn(&mut rng, n, 1.0)),
        cast(&randn(&mut rng, n, 1.0)),
    );
    let step = AdamWStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        t: 3,
        grad_scale: 0.5,
    };
    let (d, b) = (97, cast::<f32>(&randn(&mut rng, 97, 1.0)));
    let run = |isa: Isa| {
        isa.scoped(|| {
            let (mut p, mut m, mut v) = (p0.clone(), vec![0.1f32; n], vec![0.2f32; n]);
            adamw_update(&mut p, &g, &mut m, &mut v, &step);
            let mut rows = p0[..d * 100].to_vec();
            add_row_vector(&mut rows, &b);
            let mut sums = vec![0.0f32; d];
            sum_rows_into(&rows, &mut sums);
            add_assign(&mut rows, &g[..d * 100]);
            [p, m, v, rows, sums]
        })
    };
    let scalar = run(Isa::Scalar);
    for isa in Isa::supported_all() {
        let got = run(isa);
        for (j, (g, s)) in got.iter().zip(&scalar).enumerate() {
            for (a, b) in g.iter().zip(s) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "output {j} on {isa:?}"
                );
            }
        }
    }
}

#[test]
fn gemm_kernels_of_every_path_agree_with_the_scalar_ones() {
    // Shapes with a single row or column, and both destination layouts gemm distinguishes.
    let mut rng = Rng::new(fresh_seed());
    for (m, n, k) in [(67, 45, 129), (3, 200, 17), (130, 1, 64), (1, 77, 40)] {
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let a: Vec<f32> = cast(&randn(&mut rng, m * k, 1.0));
            let b: Vec<f32> = cast(&randn(&mut rng, k * n, 1.0));
            let run = |path: Isa| {
                let mut c = vec![1.0f32; m * n];
                path.scoped(|| matmul(m, n, k, &a, a_t, &b, b_t, &mut c, true));
                c
            };
            let scalar = run(Isa::Scalar);
            for path in Isa::supported_all() {
                for (x, y) in run(path).iter().zip(&scalar) {
                    assert!(
                        (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                        "{path:?} {m}x{n}x{k}"
                    );
                }
            }
        }
    }
}
