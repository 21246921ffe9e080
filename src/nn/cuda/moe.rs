//! Launch sizes of kernels/moe.cu (MoE routing, gather, combine and their backward), and its
//! tests against the CPU twins `nn::cpu::moe`.
//!
//! Forward: `moe_topk_softmax(logits, probs, chosen, n, ne, k)`,
//! `moe_sort_routes(chosen, routes, starts, token_rows, n, ne, k)`,
//! `moe_gather(h, routes, hx, rows, d)`,
//! `moe_combine(o, probs, routes, token_rows, out, n, ne, k, d)`.
//! Backward: `moe_combine_backward(dy, probs, routes, dout, rows, ne, d)`,
//! `moe_dprob(dy, o, routes, token_rows, dprob, n, ne, k, d)`,
//! `moe_softmax_backward(probs, dprob, dlogits, n, ne)`,
//! `moe_scatter_add(dhx, token_rows, dh, n, k, d)`.
//! Indices are u32: routes [rows, 2] (token, expert), starts [ne + 1], token_rows and chosen
//! [n, k]; floats f32. Every output is overwritten except dh (+=).

use super::{constant, elementwise_dims, LaunchDims};
use std::sync::LazyLock;

static BLOCK: LazyLock<u32> = LazyLock::new(|| constant("MOE_BLOCK"));
static SORT_THREADS: LazyLock<u32> = LazyLock::new(|| constant("MOE_SORT_THREADS"));
static MAX_EXPERTS: LazyLock<u32> = LazyLock::new(|| constant("MOE_MAX_EXPERTS"));

/// The most experts `moe_topk_softmax` takes.
pub fn max_experts() -> usize {
    *MAX_EXPERTS as usize
}

/// One warp a token.
fn warp_per_token(n: usize) -> LaunchDims {
    let per_block = (*BLOCK / 32) as usize;
    LaunchDims {
        grid: [n.div_ceil(per_block).max(1) as u32, 1, 1],
        block: [*BLOCK, 1, 1],
        shared_bytes: 0,
    }
}

/// `moe_topk_softmax`: one warp a token.
pub fn topk_softmax_dims(n: usize, ne: usize, k: usize) -> LaunchDims {
    assert!(
        ne >= 1 && ne <= max_experts() && k >= 1 && k <= ne,
        "top-{k} of {ne} experts (at most {})",
        max_experts()
    );
    warp_per_token(n)
}

/// `moe_sort_routes`: one block an expert.
pub fn sort_routes_dims(ne: usize) -> LaunchDims {
    assert!((1..=65535).contains(&ne));
    LaunchDims {
        grid: [ne as u32, 1, 1],
        block: [*SORT_THREADS, 1, 1],
        shared_bytes: 0,
    }
}

/// `moe_gather`: rows * d elements.
pub fn gather_dims(rows: usize, d: usize) -> LaunchDims {
    elementwise_dims(rows * d)
}

/// `moe_combine`: n * d elements.
pub fn combine_dims(n: usize, d: usize) -> LaunchDims {
    elementwise_dims(n * d)
}

/// `moe_combine_backward`: rows * d elements.
pub fn combine_backward_dims(rows: usize, d: usize) -> LaunchDims {
    elementwise_dims(rows * d)
}

/// `moe_dprob`: one block a token.
pub fn dprob_dims(n: usize) -> LaunchDims {
    LaunchDims {
        grid: [n.max(1) as u32, 1, 1],
        block: [*BLOCK, 1, 1],
        shared_bytes: 0,
    }
}

/// `moe_softmax_backward`: one warp a token.
pub fn softmax_backward_dims(n: usize) -> LaunchDims {
    warp_per_token(n)
}

/// `moe_scatter_add`: n * d elements.
pub fn scatter_add_dims(n: usize, d: usize) -> LaunchDims {
    elementwise_dims(n * d)
}

#[cfg(all(test, feature = "cuda-emu"))]
mod tests {
    use super::*;
    use crate::nn::cpu::moe as twin;
    use crate::nn::cuda::emu::Arg;
    use crate::nn::cuda::testing::{go, randn};
    use crate::nn::rng::{fresh_seed, Rng};

    const EPS: f32 = f32::EPSILON;

    fn i(x: usize) -> Arg {
        Arg::I32(x as i32)
    }

    fn flat(routes: &[[u32; 2]]) -> Vec<u32> {
        routes.iter().flatten().copied().collect()
    }

    /// Each element within its own bound.
    fn within(got: &[f32], want: &[f32], bound: impl Fn(usize) -> f32, what: &str) {
        assert_eq!(got.len(), want.len());
        for (j, (x, y)) in got.iter().zip(want).enumerate() {
            assert!(
                (x - y).abs() <= bound(j),
                "{what}: element {j}: {x} against {y} (bound {})",
                bound(j)
            );
        }
    }

    /// Logits of one test: random normals, few distinct values (ties everywhere), or one
    /// expert ahead for every token with the others all equal.
    #[derive(Clone, Copy, Debug)]
    enum Logits {
        Normal,
        Ties,
        SameExpert,
    }

    fn logits(rng: &mut Rng, n: usize, ne: usize, kind: Logits) -> Vec<f32> {
        match kind {
            Logits::Normal => randn(rng, n * ne, 1.0),
            Logits::Ties => (0..n * ne)
                .map(|_| (rng.uniform() * 3.0).floor() as f32 * 0.5)
                .collect(),
            Logits::SameExpert => (0..n * ne)
                .map(|j| if j % ne == ne / 2 { 4.0 } else { 0.25 })
                .collect(),
        }
    }

    #[test]
    fn moe_kernels_equal_their_cpu_twins() {
        let t0 = std::time::Instant::now();
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        for n in [1, 7, 130] {
            for ne in [2, 5, 64] {
                let mut ks = vec![1, 2, ne];
                ks.dedup();
                for k in ks {
                    // Ties and one expert for all: every shape but the costliest (64 of 64).
                    let kinds: &[Logits] = if k == 64 {
                        &[Logits::Normal]
                    } else {
                        &[Logits::Normal, Logits::Ties, Logits::SameExpert]
                    };
                    for &kind in kinds {
                        let case = format!("seed {seed}, n {n} experts {ne} k {k} {kind:?}");
                        check(&mut rng, n, ne, k, kind, &case);
                    }
                }
            }
        }
        eprintln!("moe kernels: {:?}", t0.elapsed());
    }

    fn check(rng: &mut Rng, n: usize, ne: usize, k: usize, kind: Logits, case: &str) {
        let rows = n * k;
        // Width 33: more than a warp, not a multiple of one (3 for the widest case, to keep the
        // emulator's thread count down).
        let d = if rows > 1000 { 3 } else { 33 };
        let lg = logits(rng, n, ne, kind);

        // Routing: chosen, routes, starts, token_rows must be equal; probs within the bound of
        // two softmaxes whose sums of ne terms run in different orders: each sum is within
        // ne eps of exact (relative), exp within an ulp or two.
        let (mut probs, mut chosen) = (vec![0.0f32; n * ne], vec![0u32; rows]);
        twin::topk_softmax(&lg, ne, k, &mut probs, &mut chosen);
        if let Logits::SameExpert = kind {
            assert!(chosen.chunks(k).all(|c| c[0] == (ne / 2) as u32));
        }
        let (mut gprobs, mut gchosen) = (vec![f32::NAN; n * ne], vec![u32::MAX; rows]);
        go(
            "moe_topk_softmax",
            topk_softmax_dims(n, ne, k),
            &mut [
                Arg::slice(&lg),
                Arg::slice_mut(&mut gprobs),
                Arg::slice_mut(&mut gchosen),
                i(n),
                i(ne),
                i(k),
            ],
        );
        assert_eq!(gchosen, chosen, "chosen, {case}");
        let tol = (2 * ne + 8) as f32 * EPS;
        within(
            &gprobs,
            &probs,
            |j| tol * probs[j],
            &format!("probs, {case}"),
        );

        let mut routes = vec![[0u32; 2]; rows];
        let (mut starts, mut token_rows) = (vec![0u32; ne + 1], vec![0u32; rows]);
        twin::sort_routes(&chosen, ne, k, &mut routes, &mut starts, &mut token_rows);
        let (mut groutes, mut gstarts, mut gtoken_rows) = (
            vec![u32::MAX; 2 * rows],
            vec![u32::MAX; ne + 1],
            vec![u32::MAX; rows],
        );
        go(
            "moe_sort_routes",
            sort_routes_dims(ne),
            &mut [
                Arg::slice(&chosen),
                Arg::slice_mut(&mut groutes),
                Arg::slice_mut(&mut gstarts),
                Arg::slice_mut(&mut gtoken_rows),
                i(n),
                i(ne),
                i(k),
            ],
        );
        let routes_flat = flat(&routes);
        assert_eq!(groutes, routes_flat, "routes, {case}");
        assert_eq!(gstarts, starts, "starts, {case}");
        assert_eq!(gtoken_rows, token_rows, "token_rows, {case}");

        // Gather, combine, scatter: the same products and sums in the same order: equal.
        let h = randn(rng, n * d, 1.0);
        let mut hx = vec![0.0f32; rows * d];
        twin::gather(&h, &routes, d, &mut hx);
        let o = randn(rng, rows * d, 1.0);
        let mut out = vec![0.0f32; n * d];
        twin::combine(&o, &probs, &routes, &token_rows, ne, k, d, &mut out);
        let (dhx, dh0) = (randn(rng, rows * d, 1.0), randn(rng, n * d, 1.0));
        let mut dh = dh0.clone();
        twin::scatter_add(&dhx, &token_rows, k, d, &mut dh);
        // Each with its launch size, then with 2 blocks (the grid-stride loop).
        for small in [false, true] {
            let shrink = |mut dims: LaunchDims| {
                if small {
                    dims.grid[0] = dims.grid[0].min(2);
                }
                dims
            };
            let mut ghx = vec![f32::NAN; rows * d];
            go(
                "moe_gather",
                shrink(gather_dims(rows, d)),
                &mut [
                    Arg::slice(&h),
                    Arg::slice(&routes_flat),
                    Arg::slice_mut(&mut ghx),
                    i(rows),
                    i(d),
                ],
            );
            assert_eq!(ghx, hx, "hx, {case}");
            let mut gout = vec![f32::NAN; n * d];
            go(
                "moe_combine",
                shrink(combine_dims(n, d)),
                &mut [
                    Arg::slice(&o),
                    Arg::slice(&probs),
                    Arg::slice(&routes_flat),
                    Arg::slice(&token_rows),
                    Arg::slice_mut(&mut gout),
                    i(n),
                    i(ne),
                    i(k),
                    i(d),
                ],
            );
            within(&gout, &out, |_| 0.0, &format!("combine, {case}"));
            let mut gdh = dh0.clone();
            go(
                "moe_scatter_add",
                shrink(scatter_add_dims(n, d)),
                &mut [
                    Arg::slice(&dhx),
                    Arg::slice(&token_rows),
                    Arg::slice_mut(&mut gdh),
                    i(n),
                    i(k),
                    i(d),
                ],
            );
            within(&gdh, &dh, |_| 0.0, &format!("scatter_add, {case}"));
        }

        // Combine backward: dout equal (one product); dprob's dots of d terms summed in other
        // orders, each within d eps sum|terms| of exact.
        let dy = randn(rng, n * d, 1.0);
        let (mut dout, mut dprob) = (vec![0.0f32; rows * d], vec![0.0f32; n * ne]);
        twin::combine_backward(&dy, &o, &probs, &routes, ne, d, &mut dout, &mut dprob);
        let mut gdout = vec![f32::NAN; rows * d];
        go(
            "moe_combine_backward",
            combine_backward_dims(rows, d),
            &mut [
                Arg::slice(&dy),
                Arg::slice(&probs),
                Arg::slice(&routes_flat),
                Arg::slice_mut(&mut gdout),
                i(rows),
                i(ne),
                i(d),
            ],
        );
        within(&gdout, &dout, |_| 0.0, &format!("dout, {case}"));
        let mut gdprob = vec![f32::NAN; n * ne];
        go(
            "moe_dprob",
            dprob_dims(n),
            &mut [
                Arg::slice(&dy),
                Arg::slice(&o),
                Arg::slice(&routes_flat),
                Arg::slice(&token_rows),
                Arg::slice_mut(&mut gdprob),
                i(n),
                i(ne),
                i(k),
                i(d),
            ],
        );
        let mut dot_abs = vec![0.0f32; n * ne];
        for (r, &[t, e]) in routes.iter().enumerate() {
            let t = t as usize;
            dot_abs[t * ne + e as usize] =
                (0..d).map(|c| (dy[t * d + c] * o[r * d + c]).abs()).sum();
        }
        within(
            &gdprob,
            &dprob,
            |j| 2.0 * d as f32 * EPS * dot_abs[j],
            &format!("dprob, {case}"),
        );

        // Softmax backward: s = sum(p dp) over ne terms in another order (within
        // 2 ne eps sum|p dp|, times p), then two roundings of p (dp - s).
        let mut dlogits = vec![0.0f32; n * ne];
        twin::softmax_backward(&probs, &dprob, ne, &mut dlogits);
        let mut gdlogits = vec![f32::NAN; n * ne];
        go(
            "moe_softmax_backward",
            softmax_backward_dims(n),
            &mut [
                Arg::slice(&probs),
                Arg::slice(&dprob),
                Arg::slice_mut(&mut gdlogits),
                i(n),
                i(ne),
            ],
        );
        let pdp_abs: Vec<f32> = probs
            .chunks(ne)
            .zip(dprob.chunks(ne))
            .map(|(p, dp)| p.iter().zip(dp).map(|(a, b)| (a * b).abs()).sum())
            .collect();
        within(
            &gdlogits,
            &dlogits,
            |j| probs[j] * 2.0 * ne as f32 * EPS * pdp_abs[j / ne] + 4.0 * EPS * dlogits[j].abs(),
            &format!("dlogits, {case}"),
        );
    }

    #[test]
    fn launch_sizes_follow_the_shape() {
        let (elem, cap) = (constant("ELEM_BLOCK"), constant("ELEM_GRID_MAX"));
        assert_eq!(combine_dims(7, 33).grid[0], (7u32 * 33).div_ceil(elem));
        assert_eq!(gather_dims(1 << 30, 64).grid[0], cap);
        let block = *BLOCK;
        assert_eq!(topk_softmax_dims(130, 64, 2).grid[0] * block / 32, 132);
        assert_eq!(sort_routes_dims(5).grid, [5, 1, 1]);
        assert!(std::panic::catch_unwind(|| topk_softmax_dims(1, max_experts() + 1, 1)).is_err());
    }
}
