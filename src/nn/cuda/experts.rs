//! Launch sizes of the product-key router and the linear experts (kernels/router.cu,
//! kernels/experts.cu). First, simple kernels:
//! correct and deterministic (no float atomics), not fast. Used by both drivers, so nothing
//! here depends on the emulator.

use super::{constant, elementwise_dims, per_row, LaunchDims};
use crate::nn::backend::{ExpertMode, ExpertShape, ProductKeyShape};
use std::sync::LazyLock;

static ROUTER_BLOCK: LazyLock<u32> = LazyLock::new(|| constant("ROUTER_BLOCK"));
static EXPERT_BLOCK: LazyLock<u32> = LazyLock::new(|| constant("EXPERT_BLOCK"));

/// `product_key_topk_forward(logits, scores, indices, tokens, channels, sqrt_n, k)`: one block
/// a (token, channel); shared memory holds each half's top min(k, sqrt_n) (score, index).
/// Needs 1 <= k <= sqrt_n² (the twin in src/nn/cpu/router.rs is right for k <= sqrt_n only).
pub fn router_topk_forward_dims(tokens: usize, s: ProductKeyShape) -> LaunchDims {
    let m = s.k.min(s.sqrt_n);
    per_row(tokens * s.channels, *ROUTER_BLOCK, 16 * m)
}

/// `product_key_topk_backward(indices, dscores, dlogits, tokens, channels, sqrt_n, k)`: one
/// thread a logit.
pub fn router_topk_backward_dims(tokens: usize, s: ProductKeyShape) -> LaunchDims {
    let n = tokens * s.logits_per_token();
    elementwise_dims(n)
}

/// The `mode` argument of the expert kernels.
pub fn expert_mode_arg(mode: ExpertMode) -> i32 {
    match mode {
        ExpertMode::GatedLinear => 0,
        ExpertMode::GatedGelu => 1,
        ExpertMode::PeerSoftmaxGelu => 2,
    }
}

/// `experts_forward(x, scores, indices, u, v, a, coef, w, y, tokens, d, channels, k,
/// channel_stride, mode)`: one block a token, two floats of
/// shared memory a slot (channels * k of them: at most 6144 in the default 48 KiB).
pub fn experts_token_dims(tokens: usize, s: ExpertShape) -> LaunchDims {
    per_row(tokens, *EXPERT_BLOCK, 8 * s.channels * s.k)
}

#[cfg(all(test, feature = "cuda-emu"))]
mod tests {
    use super::*;
    use crate::nn::cpu::experts::experts_forward;
    use crate::nn::cpu::router::{product_key_topk_backward, product_key_topk_forward};
    use crate::nn::cpu::Isa;
    use crate::nn::cuda::emu::Arg;
    use crate::nn::cuda::testing::{below, bits, close, go, grids, randn};
    use crate::nn::rng::{fresh_seed, Rng};

    /// The product-key top-k by brute force over all N pairs, the twin's tie rule: each half
    /// ranked best first (lower index first among equals), pairs in (rank 1, rank 2) order,
    /// then a stable sort by score. Right for every k <= N.
    fn topk_reference(s: ProductKeyShape, logits: &[f32]) -> (Vec<f32>, Vec<u32>) {
        let (c_n, n, k) = (s.channels, s.sqrt_n, s.k);
        let (mut sc, mut ix) = (Vec::new(), Vec::new());
        for row in logits.chunks(s.logits_per_token()) {
            for c in 0..c_n {
                let half = |h: usize| {
                    let v = &row[(h * c_n + c) * n..(h * c_n + c + 1) * n];
                    let mut r: Vec<usize> = (0..n).collect();
                    r.sort_by(|&p, &q| v[q].partial_cmp(&v[p]).unwrap());
                    r.into_iter().map(|j| (v[j], j as u32)).collect::<Vec<_>>()
                };
                let (h1, h2) = (half(0), half(1));
                let mut all: Vec<(f32, u32)> = h1
                    .iter()
                    .flat_map(|&(s1, i1)| {
                        h2.iter()
                            .map(move |&(s2, i2)| (s1 + s2, i1 * n as u32 + i2))
                    })
                    .collect();
                all.sort_by(|p, q| q.0.partial_cmp(&p.0).unwrap());
                sc.extend(all[..k].iter().map(|p| p.0));
                ix.extend(all[..k].iter().map(|p| p.1));
            }
        }
        (sc, ix)
    }

    /// Logits of three kinds: normal; small integers (ties everywhere: in each half and
    /// among the sums); every token the same row (every token choosing the same experts).
    fn router_logits(rng: &mut Rng, kind: usize, tokens: usize, per_token: usize) -> Vec<f32> {
        match kind {
            0 => randn(rng, tokens * per_token, 1.0),
            1 => (0..tokens * per_token)
                .map(|_| below(rng, 3) as f32)
                .collect(),
            _ => randn(rng, per_token, 1.0).repeat(tokens),
        }
    }

    fn router_forward(
        s: ProductKeyShape,
        tokens: usize,
        logits: &[f32],
        dims: LaunchDims,
    ) -> (Vec<f32>, Vec<u32>) {
        let n = tokens * s.slots_per_token();
        let (mut sc, mut ix) = (vec![f32::NAN; n], vec![u32::MAX; n]);
        go(
            "product_key_topk_forward",
            dims,
            &mut [
                Arg::slice(logits),
                Arg::slice_mut(&mut sc),
                Arg::slice_mut(&mut ix),
                Arg::I32(tokens as i32),
                Arg::I32(s.channels as i32),
                Arg::I32(s.sqrt_n as i32),
                Arg::I32(s.k as i32),
            ],
        );
        (sc, ix)
    }

    #[test]
    fn product_key_topk_equals_its_twin() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        for tokens in [1, 3, 17] {
            for channels in [1, 3] {
                for sqrt_n in [2, 3, 5] {
                    let mut ks = vec![1, 2, 3, sqrt_n * sqrt_n];
                    ks.dedup();
                    for k in ks {
                        let s = ProductKeyShape {
                            channels,
                            sqrt_n,
                            k,
                        };
                        for kind in 0..3 {
                            let case = format!(
                                "seed {seed}, tokens {tokens}, channels {channels}, \
                                 sqrt_n {sqrt_n}, k {k}, logits kind {kind}"
                            );
                            let logits =
                                router_logits(&mut rng, kind, tokens, s.logits_per_token());
                            let (sc_r, ix_r) = topk_reference(s, &logits);
                            // The twin is right up to k = sqrt_n (its per-half lists hold k
                            // entries, only sqrt_n of them filled): there the reference is it.
                            if k <= sqrt_n {
                                let n = tokens * s.slots_per_token();
                                let (mut sc_w, mut ix_w) = (vec![0.0; n], vec![0; n]);
                                product_key_topk_forward(s, &logits, &mut sc_w, &mut ix_w);
                                assert_eq!(ix_w, ix_r, "reference against twin {case}");
                                assert_eq!(
                                    bits(&sc_w),
                                    bits(&sc_r),
                                    "reference against twin {case}"
                                );
                            }
                            for dims in grids(router_topk_forward_dims(tokens, s)) {
                                let (sc, ix) = router_forward(s, tokens, &logits, dims);
                                assert_eq!(ix, ix_r, "indices {case}");
                                // The same single addition of two logits: the same bits.
                                assert_eq!(bits(&sc), bits(&sc_r), "scores {case}");
                            }
                            // Backward: the twin's additions in the twin's order.
                            let ds = randn(&mut rng, ix_r.len(), 1.0);
                            let mut dl_w = vec![0.0; logits.len()];
                            product_key_topk_backward(s, &ix_r, &ds, &mut dl_w);
                            for dims in grids(router_topk_backward_dims(tokens, s)) {
                                let mut dl = vec![f32::NAN; logits.len()];
                                go(
                                    "product_key_topk_backward",
                                    dims,
                                    &mut [
                                        Arg::slice(&ix_r),
                                        Arg::slice(&ds),
                                        Arg::slice_mut(&mut dl),
                                        Arg::I32(tokens as i32),
                                        Arg::I32(channels as i32),
                                        Arg::I32(sqrt_n as i32),
                                        Arg::I32(k as i32),
                                    ],
                                );
                                assert_eq!(bits(&dl), bits(&dl_w), "backward {case}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Indices of three kinds: the router's (distinct within a channel; the logits have ties);
    /// every token the same experts; uniform with repeats within a channel.
    fn expert_indices(rng: &mut Rng, kind: usize, tokens: usize, s: ProductKeyShape) -> Vec<u32> {
        let n_exp = s.sqrt_n * s.sqrt_n;
        let slots = s.slots_per_token();
        match kind {
            0 => topk_reference(s, &router_logits(rng, 1, tokens, s.logits_per_token())).1,
            1 => topk_reference(s, &router_logits(rng, 0, 1, s.logits_per_token()))
                .1
                .repeat(tokens),
            _ => (0..tokens * slots).map(|_| below(rng, n_exp)).collect(),
        }
    }

    struct Scales {
        coef: Vec<f32>,
    }

    /// The magnitudes each slot's results are made of (see `close`): A = Σ|u·x|,
    /// and the factors around them (|gelu| <= |z|).
    #[allow(clippy::too_many_arguments)]
    fn scales(
        s: ExpertShape,
        mode: ExpertMode,
        x: &[f32],
        g: &[f32],
        indices: &[u32],
        u: &[f32],
        w: &[f32],
    ) -> Scales {
        let (d, slots) = (s.d, s.channels * s.k);
        let n = indices.len();
        let mut coef = vec![0.0; n];
        for j in 0..n {
            let t = j / slots;
            let row = (j % slots / s.k) * s.channel_stride + indices[j] as usize;
            let mag = |p: &[f32], q: &[f32]| -> f32 {
                (0..d).map(|i| (p[row * d + i] * q[t * d + i]).abs()).sum()
            };
            let (a, gj) = (mag(u, x), g[j].abs());
            coef[j] = match mode {
                ExpertMode::GatedLinear => gj * a,
                ExpertMode::GatedGelu => 1.2 * gj * a,
                ExpertMode::PeerSoftmaxGelu => 1.2 * a * w[j],
            };
        }
        Scales { coef }
    }

    /// out[t or row, i] = |start| + Σ over slots of scale[slot] · |m[row or t, i]|.
    fn spread(
        start: &[f32],
        per_slot: &[f32],
        m: &[f32],
        d: usize,
        out_row: impl Fn(usize) -> usize,
        in_row: impl Fn(usize) -> usize,
    ) -> Vec<f32> {
        let mut out: Vec<f32> = start.iter().map(|v| v.abs()).collect();
        for (j, &sj) in per_slot.iter().enumerate() {
            let (o, r) = (out_row(j), in_row(j));
            for i in 0..d {
                out[o * d + i] += sj * m[r * d + i].abs();
            }
        }
        out
    }

    #[test]
    fn experts_equal_their_twin_in_every_mode_and_backward_is_deterministic() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        let modes = [
            ExpertMode::GatedLinear,
            ExpertMode::GatedGelu,
            ExpertMode::PeerSoftmaxGelu,
        ];
        // Every tokens x sqrt_n x k, each in all modes and both pool layouts; channels, d and
        // the kind of indices take turns (the full product costs minutes in the emulator).
        let (mut case_no, mut group) = (0usize, 0usize);
        for tokens in [1, 3, 17] {
            for sqrt_n in [2, 3, 5] {
                let mut ks = vec![1, 2, 3, sqrt_n * sqrt_n];
                ks.dedup();
                for k in ks {
                    group += 1;
                    let channels = [1, 3][group % 2];
                    let n_exp = sqrt_n * sqrt_n;
                    let ps = ProductKeyShape {
                        channels,
                        sqrt_n,
                        k,
                    };
                    for (mi, &mode) in modes.iter().enumerate() {
                        for stride in [n_exp, 0] {
                            case_no += 1;
                            let d = [1, 5, 33][(case_no + mi) % 3];
                            let kind = (case_no / 3) % 3;
                            let s = ExpertShape {
                                d,
                                channels,
                                k,
                                channel_stride: stride,
                                pool_rows: if stride == 0 { n_exp } else { channels * n_exp },
                            };
                            let case = format!(
                                "seed {seed}, {mode:?}, tokens {tokens}, d {d}, channels \
                                     {channels}, N {n_exp}, k {k}, stride {stride}, indices \
                                     kind {kind}"
                            );
                            experts_case(&mut rng, s, mode, tokens, ps, kind, &case);
                        }
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn experts_case(
        rng: &mut Rng,
        s: ExpertShape,
        mode: ExpertMode,
        tokens: usize,
        ps: ProductKeyShape,
        kind: usize,
        case: &str,
    ) {
        let (d, slots) = (s.d, s.channels * s.k);
        let n = tokens * slots;
        let indices = expert_indices(rng, kind, tokens, ps);
        let x = randn(rng, tokens * d, 1.0);
        let g = randn(rng, n, 1.0);
        let u = randn(rng, s.pool_rows * d, 1.0);
        let v = randn(rng, s.pool_rows * d, 1.0);
        let peer = mode == ExpertMode::PeerSoftmaxGelu;
        // Without tanh and exp, and with the twin's fused multiply-adds, the kernels do the
        // twin's very operations: the same bits.
        let exact = mode == ExpertMode::GatedLinear && Isa::current() >= Isa::Avx2;
        let same = |got: &[f32], want: &[f32], what: &str| {
            if exact {
                assert_eq!(bits(got), bits(want), "{what} bitwise {case}");
            }
        };
        let i32_ = |v: usize| Arg::I32(v as i32);

        // Forward.
        let (mut a_w, mut coef_w, mut w_w) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let mut y_w = vec![0.0; tokens * d];
        experts_forward(
            s,
            mode,
            &x,
            &g,
            &indices,
            &u,
            &v,
            &mut a_w,
            &mut coef_w,
            &mut w_w,
            &mut y_w,
        );
        let sc = scales(s, mode, &x, &g, &indices, &u, &w_w);
        let row = |j: usize| (j % slots / s.k) * s.channel_stride + indices[j] as usize;
        let y_scale = spread(&vec![0.0; tokens * d], &sc.coef, &v, d, |j| j / slots, row);
        let a_scale: Vec<f32> = (0..n)
            .map(|j| {
                (0..d)
                    .map(|i| (u[row(j) * d + i] * x[j / slots * d + i]).abs())
                    .sum()
            })
            .collect();
        let mut runs = Vec::new();
        for dims in grids(experts_token_dims(tokens, s)) {
            let (mut a, mut coef, mut w) =
                (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
            let mut y = vec![f32::NAN; tokens * d];
            go(
                "experts_forward",
                dims,
                &mut [
                    Arg::slice(&x),
                    Arg::slice(&g),
                    Arg::slice(&indices),
                    Arg::slice(&u),
                    Arg::slice(&v),
                    Arg::slice_mut(&mut a),
                    Arg::slice_mut(&mut coef),
                    Arg::slice_mut(&mut w),
                    Arg::slice_mut(&mut y),
                    i32_(tokens),
                    i32_(d),
                    i32_(s.channels),
                    i32_(s.k),
                    i32_(s.channel_stride),
                    Arg::I32(expert_mode_arg(mode)),
                ],
            );
            close(&a, &a_w, &a_scale, &format!("a {case}"));
            close(&coef, &coef_w, &sc.coef, &format!("coef {case}"));
            close(&y, &y_w, &y_scale, &format!("y {case}"));
            same(&a, &a_w, "a");
            same(&coef, &coef_w, "coef");
            same(&y, &y_w, "y");
            if peer {
                close(&w, &w_w, &vec![0.0; n], &format!("w {case}"));
            } else {
                // Only PEER has softmax weights; the others leave w alone, as the twin.
                assert!(w.iter().all(|v| v.is_nan()), "w written {case}");
            }
            runs.push((bits(&y), bits(&a), bits(&coef), bits(&w)));
        }
        assert_eq!(runs[0], runs[1], "forward twice {case}");
    }

    #[test]
    fn grids_stay_valid_for_large_shapes() {
        let ps = ProductKeyShape {
            channels: 16,
            sqrt_n: 88,
            k: 8,
        };
        let es = ExpertShape {
            d: 768,
            channels: 16,
            k: 8,
            channel_stride: 7744,
            pool_rows: 16 * 7744,
        };
        let tokens = 1 << 20;
        let big = [
            router_topk_forward_dims(tokens, ps),
            router_topk_backward_dims(tokens, ps),
            experts_token_dims(tokens, es),
            router_topk_forward_dims(0, ps),
            experts_token_dims(0, es),
        ];
        for d in big {
            assert!((1..=i32::MAX as u32).contains(&d.grid[0]), "{d:?}");
            assert!(d.grid[1] == 1 && d.grid[2] == 1, "{d:?}");
            assert!(d.block[0] <= 1024 && d.shared_bytes <= 48 << 10, "{d:?}");
        }
        // Whole warps: the expert kernels give each warp whole dot products.
        assert_eq!(experts_token_dims(1, es).block[0] % 32, 0);
        assert_eq!(router_topk_forward_dims(1, ps).shared_bytes, 16 * 8);
    }
}
