//! Launch sizes of the product-key top-k (kernels/router.cu), forward and backward: one warp a
//! (token, channel), ROUTER_BLOCK threads (several warps) a block, grid-stride over the pairs.
//! Used by both drivers, so nothing here depends on the emulator.

use super::{constant, per_row, LaunchDims};
use crate::nn::backend::ProductKeyShape;
use std::sync::LazyLock;

static ROUTER_BLOCK: LazyLock<u32> = LazyLock::new(|| constant("ROUTER_BLOCK"));
static ROUTER_MAX_SQRT_N: LazyLock<u32> = LazyLock::new(|| constant("ROUTER_MAX_SQRT_N"));

/// The largest sqrt_n the kernels take (a lane holds sqrt_n / 32 logits of each half).
pub fn max_sqrt_n() -> usize {
    *ROUTER_MAX_SQRT_N as usize
}

/// Whether the kernels take the shape: 1 <= sqrt_n <= max_sqrt_n() and 1 <= k <= sqrt_n²;
/// the error says why not.
pub fn check_shape(s: ProductKeyShape) -> Result<(), String> {
    if s.sqrt_n == 0 || s.sqrt_n > max_sqrt_n() {
        return Err(format!(
            "product-key top-k: sqrt_n = {} (at most {} sub-keys a half)",
            s.sqrt_n,
            max_sqrt_n()
        ));
    }
    if s.k == 0 || s.k > s.sqrt_n * s.sqrt_n {
        return Err(format!(
            "product-key top-k: k = {} out of 1..={}",
            s.k,
            s.sqrt_n * s.sqrt_n
        ));
    }
    Ok(())
}

/// One warp a (token, channel), for `tokens * channels` of them.
fn warp_per_pair(tokens: usize, s: ProductKeyShape) -> LaunchDims {
    let warps = (*ROUTER_BLOCK / 32) as usize;
    per_row((tokens * s.channels).div_ceil(warps), *ROUTER_BLOCK, 0)
}

/// `product_key_topk_forward(logits, scores, indices, tokens, channels, sqrt_n, k)`; needs
/// `check_shape(s)`.
pub fn router_topk_forward_dims(tokens: usize, s: ProductKeyShape) -> LaunchDims {
    warp_per_pair(tokens, s)
}

/// `product_key_topk_backward(indices, dscores, dlogits, tokens, channels, sqrt_n, k)`; needs
/// `check_shape(s)`.
pub fn router_topk_backward_dims(tokens: usize, s: ProductKeyShape) -> LaunchDims {
    warp_per_pair(tokens, s)
}

#[cfg(all(test, feature = "cuda-emu"))]
pub(crate) mod tests {
    use super::*;
    use crate::nn::backend::{Backend, Buf};
    use crate::nn::cpu::router::{product_key_topk_backward, product_key_topk_forward};
    use crate::nn::cuda::backend::CudaBackend;
    use crate::nn::cuda::emu::{Arg, EmuDriver, Traffic};
    use crate::nn::cuda::testing::{below, bits, go_as, grids, randn};
    use crate::nn::rng::{fresh_seed, Rng};
    use std::cmp::Ordering;
    use std::sync::Arc;

    /// Descending, a NaN after every number (the kernel's and the twin's order).
    fn desc(p: f32, q: f32) -> Ordering {
        match (p.is_nan(), q.is_nan()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            _ => q.partial_cmp(&p).unwrap(),
        }
    }

    /// The product-key top-k by brute force over all N pairs, the twin's tie rule: each half
    /// ranked best first (lower index first among equals), pairs in (rank 1, rank 2) order,
    /// then a stable sort by score, a NaN last. Right for every k <= N.
    pub(crate) fn topk_reference(s: ProductKeyShape, logits: &[f32]) -> (Vec<f32>, Vec<u32>) {
        let (c_n, n, k) = (s.channels, s.sqrt_n, s.k);
        let (mut sc, mut ix) = (Vec::new(), Vec::new());
        for row in logits.chunks(s.logits_per_token()) {
            for c in 0..c_n {
                let half = |h: usize| {
                    let v = &row[(h * c_n + c) * n..(h * c_n + c + 1) * n];
                    let mut r: Vec<usize> = (0..n).collect();
                    r.sort_by(|&p, &q| desc(v[p], v[q]));
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
                all.sort_by(|p, q| desc(p.0, q.0));
                sc.extend(all[..k].iter().map(|p| p.0));
                ix.extend(all[..k].iter().map(|p| p.1));
            }
        }
        (sc, ix)
    }

    /// The kinds of logits `router_logits` makes; the last breaks the reference (see
    /// `exact_kinds`).
    const KINDS: usize = 6;

    /// The kinds where the pruned top-k (twin and kernel) equals brute force: all but the one
    /// with +inf in one half and -inf in the other (inf + -inf = NaN undoes the dominance).
    fn exact(kind: usize) -> bool {
        kind != 5
    }

    /// Logits of several kinds: 0 normal; 1 small integers (ties everywhere: in each half and
    /// among the sums); 2 every token the same row (every token choosing the same experts);
    /// 3 all negative; 4 normal with a tenth NaN, +-0 and +-inf (infinities of one sign per
    /// token); 5 normal with infinities of both signs.
    pub(crate) fn router_logits(
        rng: &mut Rng,
        kind: usize,
        tokens: usize,
        per_token: usize,
    ) -> Vec<f32> {
        match kind {
            0 => randn(rng, tokens * per_token, 1.0),
            1 => (0..tokens * per_token)
                .map(|_| below(rng, 3) as f32)
                .collect(),
            2 => randn(rng, per_token, 1.0).repeat(tokens),
            3 => (0..tokens * per_token)
                .map(|_| -(rng.normal() as f32).abs() - 0.5)
                .collect(),
            _ => {
                let mut x = randn(rng, tokens * per_token, 1.0);
                for (t, row) in x.chunks_mut(per_token).enumerate() {
                    let inf = if t % 2 == 0 {
                        f32::INFINITY
                    } else {
                        -f32::INFINITY
                    };
                    for v in row.iter_mut() {
                        *v = match below(rng, 40) {
                            0 => f32::NAN,
                            1 => 0.0,
                            2 => -0.0,
                            3 if kind == 4 => inf,
                            3 => f32::INFINITY,
                            4 if kind == 5 => -f32::INFINITY,
                            _ => *v,
                        };
                    }
                }
                x
            }
        }
    }

    /// Both kernels' trailing arguments: tokens, channels, sqrt_n, k.
    fn shape_args(s: ProductKeyShape, tokens: usize) -> [Arg; 4] {
        [tokens, s.channels, s.sqrt_n, s.k].map(|v| Arg::I32(v as i32))
    }

    /// The kernels run with the race check on; `fibers`: the block's threads as fibers (the same
    /// bits, much faster: the sweep runs so; a few cases run on real threads).
    fn forward(
        s: ProductKeyShape,
        tokens: usize,
        logits: &[f32],
        dims: LaunchDims,
        fibers: bool,
    ) -> (Vec<f32>, Vec<u32>, Traffic) {
        let n = tokens * s.slots_per_token();
        let (mut sc, mut ix) = (vec![f32::NAN; n], vec![u32::MAX; n]);
        let mut args = vec![
            Arg::slice(logits),
            Arg::slice_mut(&mut sc),
            Arg::slice_mut(&mut ix),
        ];
        args.extend(shape_args(s, tokens));
        let traffic = go_as("product_key_topk_forward", dims, &mut args, fibers);
        (sc, ix, traffic)
    }

    fn backward(
        s: ProductKeyShape,
        tokens: usize,
        indices: &[u32],
        dscores: &[f32],
        dims: LaunchDims,
        fibers: bool,
    ) -> (Vec<f32>, Traffic) {
        let mut dl = vec![f32::NAN; tokens * s.logits_per_token()];
        let mut args = vec![
            Arg::slice(indices),
            Arg::slice(dscores),
            Arg::slice_mut(&mut dl),
        ];
        args.extend(shape_args(s, tokens));
        let traffic = go_as("product_key_topk_backward", dims, &mut args, fibers);
        (dl, traffic)
    }

    /// Real threads for three tokens on the 2-block grid, fibers otherwise.
    fn fibers(tokens: usize, grid: usize) -> bool {
        tokens != 3 || grid == 0
    }

    fn twin(s: ProductKeyShape, tokens: usize, logits: &[f32]) -> (Vec<f32>, Vec<u32>) {
        let n = tokens * s.slots_per_token();
        let (mut sc, mut ix) = (vec![0.0; n], vec![0; n]);
        product_key_topk_forward(s, logits, &mut sc, &mut ix);
        (sc, ix)
    }

    /// One case: the forward against the twin and (where exact) brute force, indices and score
    /// bits; the backward against the twin, bits; each launch's bytes against the formula
    /// (forward: the logits once, scores and indices once; backward: indices and dscores once,
    /// dlogits once).
    fn check_case(rng: &mut Rng, s: ProductKeyShape, tokens: usize, kind: usize, case: &str) {
        let logits = router_logits(rng, kind, tokens, s.logits_per_token());
        let (sc_w, ix_w) = twin(s, tokens, &logits);
        if exact(kind) {
            let (sc_r, ix_r) = topk_reference(s, &logits);
            assert_eq!(ix_w, ix_r, "twin against reference {case}");
            assert_eq!(bits(&sc_w), bits(&sc_r), "twin against reference {case}");
        }
        let pairs = (tokens * s.channels) as u64;
        let (n, k) = (s.sqrt_n as u64, s.k as u64);
        for (g, dims) in grids(router_topk_forward_dims(tokens, s))
            .into_iter()
            .enumerate()
        {
            let (sc, ix, traffic) = forward(s, tokens, &logits, dims, fibers(tokens, g));
            assert_eq!(ix, ix_w, "indices {case}, grid {:?}", dims.grid);
            // The same single addition of two logits: the same bits.
            assert_eq!(
                bits(&sc),
                bits(&sc_w),
                "scores {case}, grid {:?}",
                dims.grid
            );
            assert_eq!(
                traffic.read_bytes,
                pairs * 2 * n * 4,
                "forward reads {case}"
            );
            assert_eq!(
                traffic.written_bytes,
                pairs * k * 8,
                "forward writes {case}"
            );
        }
        // Backward on the selected indices, and (kind 0) on uniform ones with repeats.
        let ix = if kind == 0 {
            (0..ix_w.len())
                .map(|_| below(rng, s.sqrt_n * s.sqrt_n))
                .collect()
        } else {
            ix_w
        };
        let ds = randn(rng, ix.len(), 1.0);
        let mut dl_w = vec![0.0; logits.len()];
        product_key_topk_backward(s, &ix, &ds, &mut dl_w);
        for (g, dims) in grids(router_topk_backward_dims(tokens, s))
            .into_iter()
            .enumerate()
        {
            let (dl, traffic) = backward(s, tokens, &ix, &ds, dims, fibers(tokens, g));
            assert_eq!(
                bits(&dl),
                bits(&dl_w),
                "backward {case}, grid {:?}",
                dims.grid
            );
            assert_eq!(traffic.read_bytes, pairs * k * 8, "backward reads {case}");
            assert_eq!(
                traffic.written_bytes,
                pairs * 2 * n * 4,
                "backward writes {case}"
            );
        }
    }

    /// Every sqrt_n with every k, one to 33 tokens, one or three channels; all kinds of logits
    /// on the small shapes, one (rotating with the shape) on the larger ones.
    #[test]
    fn product_key_topk_equals_reference_and_twin() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        for sqrt_n in [2, 3, 5, 33, 40, 100] {
            let n_exp = sqrt_n * sqrt_n;
            let mut ks = vec![1, 2, 3, 5, 8, 33];
            ks.retain(|&k| k < n_exp);
            // k = N where the test has time for it (1089: 272 passes of the queues at least);
            // else 200: top lists of 40 or 100 (several registers a lane), several passes.
            ks.push(if n_exp <= 1089 { n_exp } else { 200 });
            for &k in &ks {
                for tokens in [1, 3, 17, 33] {
                    for channels in [1, 3] {
                        let large = sqrt_n * tokens > 40 || k > 33;
                        if large && k > 33 && tokens > 1 {
                            continue;
                        }
                        let s = ProductKeyShape {
                            channels,
                            sqrt_n,
                            k,
                        };
                        let kinds = if large {
                            let kind = (tokens + channels + k + sqrt_n) % KINDS;
                            kind..kind + 1
                        } else {
                            0..KINDS
                        };
                        for kind in kinds {
                            let case = format!(
                                "seed {seed}, tokens {tokens}, channels {channels}, \
                                 sqrt_n {sqrt_n}, k {k}, logits kind {kind}"
                            );
                            check_case(&mut rng, s, tokens, kind, &case);
                        }
                    }
                }
            }
        }
    }

    /// The twin against brute force for every k <= N.
    #[test]
    fn twin_equals_reference_for_every_k() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        for sqrt_n in [1, 2, 3, 4, 5, 7, 11] {
            for k in 1..=sqrt_n * sqrt_n {
                for kind in (0..KINDS).filter(|&kind| exact(kind)) {
                    let (tokens, channels) = (3, 2);
                    let s = ProductKeyShape {
                        channels,
                        sqrt_n,
                        k,
                    };
                    let logits = router_logits(&mut rng, kind, tokens, s.logits_per_token());
                    let (sc_r, ix_r) = topk_reference(s, &logits);
                    let (sc_w, ix_w) = twin(s, tokens, &logits);
                    let case = format!("seed {seed}, sqrt_n {sqrt_n}, k {k}, kind {kind}");
                    assert_eq!(ix_w, ix_r, "{case}");
                    assert_eq!(bits(&sc_w), bits(&sc_r), "{case}");
                }
            }
        }
    }

    #[test]
    fn shapes_the_kernels_cannot_take_fail_the_op() {
        let ok = ProductKeyShape {
            channels: 2,
            sqrt_n: max_sqrt_n(),
            k: 8,
        };
        assert!(check_shape(ok).is_ok());
        assert!(check_shape(ProductKeyShape { k: 1, ..ok }).is_ok());
        let n_exp = ok.sqrt_n * ok.sqrt_n;
        assert!(check_shape(ProductKeyShape { k: n_exp, ..ok }).is_ok());
        for bad in [
            ProductKeyShape {
                sqrt_n: max_sqrt_n() + 1,
                ..ok
            },
            ProductKeyShape { sqrt_n: 0, ..ok },
            ProductKeyShape { k: 0, ..ok },
            ProductKeyShape { k: n_exp + 1, ..ok },
        ] {
            assert!(check_shape(bad).is_err(), "{bad:?}");
        }
        // Through the backend: an error for the model to report, no panic, nothing launched.
        let be: Arc<dyn Backend> = Arc::new(CudaBackend::new(Arc::new(EmuDriver::new(true))));
        let s = ProductKeyShape {
            channels: 1,
            sqrt_n: max_sqrt_n() + 1,
            k: 2,
        };
        let logits = Buf::<f32>::zeros(&be, s.logits_per_token()).unwrap();
        let mut sc = Buf::<f32>::zeros(&be, s.slots_per_token()).unwrap();
        let mut ix = Buf::<u32>::zeros(&be, s.slots_per_token()).unwrap();
        be.product_key_topk_forward(s, logits.view(), sc.view_mut(), ix.view_mut());
        let err = be.take_error().expect("an error");
        let want = format!("at most {} sub-keys", max_sqrt_n());
        assert!(err.contains(&want), "{err}");
        let mut dl = Buf::<f32>::zeros(&be, s.logits_per_token()).unwrap();
        be.product_key_topk_backward(s, ix.view(), sc.view(), dl.view_mut());
        assert!(be.take_error().is_some());
    }

    #[test]
    fn grids_stay_valid_for_large_shapes() {
        let ps = ProductKeyShape {
            channels: 16,
            sqrt_n: 88,
            k: 8,
        };
        for d in [
            router_topk_forward_dims(1 << 20, ps),
            router_topk_backward_dims(1 << 20, ps),
            router_topk_forward_dims(0, ps),
            router_topk_backward_dims(1, ps),
        ] {
            assert!((1..=i32::MAX as u32).contains(&d.grid[0]), "{d:?}");
            assert!(d.grid[1] == 1 && d.grid[2] == 1, "{d:?}");
            // Whole warps, no shared memory.
            assert!(d.block[0] <= 1024 && d.block[0] % 32 == 0, "{d:?}");
            assert_eq!(d.shared_bytes, 0, "{d:?}");
        }
        // One warp a pair: 16 pairs in 16 / (ROUTER_BLOCK / 32) blocks.
        let warps = (*ROUTER_BLOCK / 32) as usize;
        assert_eq!(
            router_topk_forward_dims(1, ps).grid[0] as usize,
            16usize.div_ceil(warps)
        );
    }
}
