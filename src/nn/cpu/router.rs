//! The product-key top-k selection shared by sgatlin and PEER.
//!
//! Per token the logits row holds two halves of `channels * sqrt_n` sub-key scores, laid out
//! `[half][channel][sub_key]`. Per channel: top-k of each half, the k*k sums of the two, and the
//! final top-k of those. The selected score is `s1[a] + s2[b]`, so its gradient flows back to the
//! two sub-key logits it came from, recovered from the index as (idx / sqrt_n, idx % sqrt_n).

use super::real::Real;
use crate::nn::backend::ProductKeyShape;
use rayon::prelude::*;

/// Whether score `p` comes before score `q` (descending): a NaN comes after every number, and
/// equal scores (-0 and +0 alike; NaN and NaN) keep their order.
#[inline(always)]
fn before<T: Real>(p: T, q: T) -> bool {
    match (p.partial_cmp(&p), q.partial_cmp(&q)) {
        (None, _) => false,
        (_, None) => true,
        _ => p > q,
    }
}

/// Insert (score, index) into the descending list `best` (at most `best.len()` entries, `len`
/// filled). Ties keep the earlier entry first, as `jax.lax.top_k` does.
#[inline(always)]
fn push_topk<T: Real>(best: &mut [(T, u32)], len: &mut usize, score: T, index: u32) {
    let cap = best.len();
    if *len == cap && !before(score, best[cap - 1].0) {
        return;
    }
    let mut pos = if *len < cap { *len } else { cap - 1 };
    while pos > 0 && before(score, best[pos - 1].0) {
        best[pos] = best[pos - 1];
        pos -= 1;
    }
    best[pos] = (score, index);
    if *len < cap {
        *len += 1;
    }
}

/// logits: [tokens, 2*C*sqrt_n]; scores, indices: [tokens, C, k], best first. Needs
/// 1 <= k <= sqrt_n².
///
/// What it guarantees, for every such k: per (token, channel) the k best pairs of the
/// sqrt_n x sqrt_n grid of sums s1[a] + s2[b], ordered as `jax.lax.top_k` orders them when each
/// half is ranked best first (lower index first among equal logits) and the pairs are listed
/// in (rank in half 1, rank in half 2) order: by score, then earlier in that order. A NaN
/// (logit or sum) comes after every number. Only the candidates with
/// (rank1 + 1)(rank2 + 1) <= k are summed; that is exact unless a half holds +inf and the other
/// -inf (then inf + -inf = NaN breaks the dominance the pruning relies on). The CUDA kernel
/// (kernels/router.cu) gives the same bits in every case.
pub fn product_key_topk_forward<T: Real>(
    shape: ProductKeyShape,
    logits: &[T],
    scores: &mut [T],
    indices: &mut [u32],
) {
    let ProductKeyShape {
        channels,
        sqrt_n,
        k,
    } = shape;
    assert!(
        (1..=sqrt_n * sqrt_n).contains(&k),
        "product-key top-k: k = {k} out of 1..={}",
        sqrt_n * sqrt_n
    );
    // Each half's list: the best m; no candidate uses a rank past it.
    let m = k.min(sqrt_n);
    let per_tok = shape.logits_per_token();
    let slots = shape.slots_per_token();
    scores
        .par_chunks_mut(slots)
        .zip(indices.par_chunks_mut(slots))
        .zip(logits.par_chunks(per_tok))
        .for_each_init(
            || {
                (
                    vec![(T::ZERO, 0u32); m],
                    vec![(T::ZERO, 0u32); m],
                    vec![(T::ZERO, 0u32); k],
                )
            },
            |(b1, b2, fin), ((sc, ix), lg)| {
                for c in 0..channels {
                    let h1 = &lg[c * sqrt_n..(c + 1) * sqrt_n];
                    let h2 = &lg[(channels + c) * sqrt_n..(channels + c + 1) * sqrt_n];
                    let (mut n1, mut n2, mut nf) = (0, 0, 0);
                    for (j, &s) in h1.iter().enumerate() {
                        push_topk(b1, &mut n1, s, j as u32);
                    }
                    for (j, &s) in h2.iter().enumerate() {
                        push_topk(b2, &mut n2, s, j as u32);
                    }
                    // Pair (a, b) is dominated by every (a', b') with a' <= a, b' <= b (higher or
                    // equal score, earlier in a-major order, which wins ties), so only pairs with
                    // (a + 1) * (b + 1) <= k can reach the final top-k. Same result as all N.
                    for (a, &(s1, i1)) in b1.iter().enumerate() {
                        for &(s2, i2) in b2.iter().take(k / (a + 1)) {
                            push_topk(fin, &mut nf, s1 + s2, i1 * sqrt_n as u32 + i2);
                        }
                    }
                    debug_assert_eq!(nf, k);
                    for (i, &(s, idx)) in fin.iter().enumerate() {
                        sc[c * k + i] = s;
                        ix[c * k + i] = idx;
                    }
                }
            },
        );
}

/// dlogits (overwritten): the gradient of the sub-key logits given d(scores).
pub fn product_key_topk_backward<T: Real>(
    shape: ProductKeyShape,
    indices: &[u32],
    dscores: &[T],
    dlogits: &mut [T],
) {
    let ProductKeyShape {
        channels,
        sqrt_n,
        k,
    } = shape;
    let per_tok = shape.logits_per_token();
    let slots = shape.slots_per_token();
    dlogits
        .par_chunks_mut(per_tok)
        .zip(indices.par_chunks(slots).zip(dscores.par_chunks(slots)))
        .for_each(|(dl, (ix, ds))| {
            dl.fill(T::ZERO);
            for c in 0..channels {
                for i in 0..k {
                    let idx = ix[c * k + i] as usize;
                    let g = ds[c * k + i];
                    dl[c * sqrt_n + idx / sqrt_n] += g;
                    dl[(channels + c) * sqrt_n + idx % sqrt_n] += g;
                }
            }
        });
}
