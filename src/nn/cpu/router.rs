//! The product-key top-k selection shared by sgatlin and PEER.
//!
//! Per token the logits row holds two halves of `channels * sqrt_n` sub-key scores, laid out
//! `[half][channel][sub_key]`. Per channel: top-k of each half, the k*k sums of the two, and the
//! final top-k of those. The selected score is `s1[a] + s2[b]`, so its gradient flows back to the
//! two sub-key logits it came from, recovered from the index as (idx / sqrt_n, idx % sqrt_n).

use super::real::Real;
use crate::nn::backend::ProductKeyShape;
use rayon::prelude::*;

/// Insert (score, index) into the descending list `best` (length k). Ties keep the earlier
/// entry first, as `jax.lax.top_k` does.
#[inline(always)]
fn push_topk<T: Real>(best: &mut [(T, u32)], len: &mut usize, score: T, index: u32) {
    let k = best.len();
    if *len == k && score.partial_cmp(&best[k - 1].0) != Some(std::cmp::Ordering::Greater) {
        return;
    }
    let mut pos = if *len < k { *len } else { k - 1 };
    while pos > 0 && score > best[pos - 1].0 {
        best[pos] = best[pos - 1];
        pos -= 1;
    }
    best[pos] = (score, index);
    if *len < k {
        *len += 1;
    }
}

/// logits: [tokens, 2*C*sqrt_n]; scores, indices: [tokens, C, k], best first.
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
    let per_tok = shape.logits_per_token();
    let slots = shape.slots_per_token();
    scores
        .par_chunks_mut(slots)
        .zip(indices.par_chunks_mut(slots))
        .zip(logits.par_chunks(per_tok))
        .for_each_init(
            || {
                (
                    vec![(T::ZERO, 0u32); k],
                    vec![(T::ZERO, 0u32); k],
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
                    // (a + 1) * (b + 1) <= k can reach the final top-k. Same result as all k*k.
                    for (a, &(s1, i1)) in b1.iter().enumerate() {
                        for &(s2, i2) in b2.iter().take(k / (a + 1)) {
                            push_topk(fin, &mut nf, s1 + s2, i1 * sqrt_n as u32 + i2);
                        }
                    }
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
