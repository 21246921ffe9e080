//! Mixture-of-experts routing and combine, the CPU twins of kernels/moe.cu: top-k expert choice
//! with gate weights = softmax over ALL experts, the stable grouping of (token, expert) pairs by
//! expert, the gather of each routed row's input, the weighted combine of the experts' outputs
//! and the backward of each. Tokens n, experts ne, k experts a token (distinct), rows = n * k
//! routed rows; `routes[r] = [token, expert]`, grouped by expert (expert e's rows are
//! `starts[e]..starts[e + 1]`), tokens increasing within an expert; `token_rows[t * k..]` are
//! token t's rows, increasing (so in expert order). Indices are u32, as on the device.

use rayon::prelude::*;

/// Top-k of each token's `logits` row ([n, ne]) into `chosen` ([n, k], by falling logit; ties
/// go to the lower index, as jax.lax.top_k), and `probs` ([n, ne]) = softmax of the row over
/// all experts. NaN logits are not supported.
pub fn topk_softmax(logits: &[f32], ne: usize, k: usize, probs: &mut [f32], chosen: &mut [u32]) {
    assert!(k >= 1 && k <= ne);
    let n = chosen.len() / k;
    probs[..n * ne]
        .par_chunks_mut(ne)
        .zip(logits.par_chunks(ne))
        .zip(chosen.par_chunks_mut(k))
        .for_each(|((p, row), pick)| {
            // Repeated arg-max; a strict > keeps the lower index on ties.
            for slot in 0..k {
                let mut best: Option<usize> = None;
                for (e, &x) in row.iter().enumerate() {
                    if pick[..slot].contains(&(e as u32)) {
                        continue;
                    }
                    if best.is_none_or(|b| x > row[b]) {
                        best = Some(e);
                    }
                }
                pick[slot] = best.unwrap_or(0) as u32;
            }
            let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for (y, &x) in p.iter_mut().zip(row) {
                *y = (x - mx).exp();
                sum += *y;
            }
            for y in p.iter_mut() {
                *y /= sum;
            }
        });
}

/// Stable counting sort of the n * k pairs of `chosen` ([n, k]) by expert: `routes` ([rows])
/// `[token, expert]`, `starts` ([ne + 1]) and `token_rows` ([n, k]).
pub fn sort_routes(
    chosen: &[u32],
    ne: usize,
    k: usize,
    routes: &mut [[u32; 2]],
    starts: &mut [u32],
    token_rows: &mut [u32],
) {
    let n = chosen.len() / k;
    starts[..ne + 1].fill(0);
    for &e in chosen {
        starts[e as usize + 1] += 1;
    }
    for e in 0..ne {
        starts[e + 1] += starts[e];
    }
    let mut fill = starts[..ne].to_vec();
    for (j, &e) in chosen.iter().enumerate() {
        routes[fill[e as usize] as usize] = [(j / k) as u32, e];
        fill[e as usize] += 1;
    }
    let mut taken = vec![0usize; n];
    for (r, &[t, _]) in routes[..n * k].iter().enumerate() {
        let t = t as usize;
        token_rows[t * k + taken[t]] = r as u32;
        taken[t] += 1;
    }
}

/// hx[r] = h[token of r]; h [n, d], hx [rows, d].
pub fn gather(h: &[f32], routes: &[[u32; 2]], d: usize, hx: &mut [f32]) {
    hx[..routes.len() * d]
        .par_chunks_mut(d)
        .zip(routes.par_iter())
        .for_each(|(row, &[t, _])| {
            let t = t as usize;
            row.copy_from_slice(&h[t * d..(t + 1) * d]);
        });
}

/// out[t] = sum over t's rows r, in `token_rows` order, of probs[t, expert of r] * o[r];
/// o [rows, d], out [n, d] (overwritten).
#[allow(clippy::too_many_arguments)]
pub fn combine(
    o: &[f32],
    probs: &[f32],
    routes: &[[u32; 2]],
    token_rows: &[u32],
    ne: usize,
    k: usize,
    d: usize,
    out: &mut [f32],
) {
    let n = token_rows.len() / k;
    out[..n * d]
        .par_chunks_mut(d)
        .enumerate()
        .for_each(|(t, row)| {
            row.fill(0.0);
            for &r in &token_rows[t * k..(t + 1) * k] {
                let (r, e) = (r as usize, routes[r as usize][1] as usize);
                let w = probs[t * ne + e];
                for (x, &v) in row.iter_mut().zip(&o[r * d..(r + 1) * d]) {
                    *x += w * v;
                }
            }
        });
}

/// Combine backward: dout[r] = probs[t, e] * dy[t] ([rows, d]) and dprob[t, e] = <dy[t], o[r]>
/// for each routed row r = (t, e), 0 for the experts t did not choose ([n, ne], overwritten).
#[allow(clippy::too_many_arguments)]
pub fn combine_backward(
    dy: &[f32],
    o: &[f32],
    probs: &[f32],
    routes: &[[u32; 2]],
    ne: usize,
    d: usize,
    dout: &mut [f32],
    dprob: &mut [f32],
) {
    let n = dy.len() / d;
    let dots: Vec<f32> = dout[..routes.len() * d]
        .par_chunks_mut(d)
        .zip(routes.par_iter())
        .enumerate()
        .map(|(r, (drow, &[t, e]))| {
            let (t, e) = (t as usize, e as usize);
            let w = probs[t * ne + e];
            let dyr = &dy[t * d..(t + 1) * d];
            for (x, &g) in drow.iter_mut().zip(dyr) {
                *x = w * g;
            }
            dyr.iter()
                .zip(&o[r * d..(r + 1) * d])
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect();
    dprob[..n * ne].fill(0.0);
    for (&[t, e], &v) in routes.iter().zip(&dots) {
        dprob[t as usize * ne + e as usize] = v;
    }
}

/// Softmax backward over all experts: dlogits = p * (dp - sum(p * dp)), rows of ne.
pub fn softmax_backward(probs: &[f32], dprob: &[f32], ne: usize, dlogits: &mut [f32]) {
    let n = probs.len() / ne;
    dlogits[..n * ne]
        .par_chunks_mut(ne)
        .zip(probs.par_chunks(ne).zip(dprob.par_chunks(ne)))
        .for_each(|(dl, (pr, dp))| {
            let s: f32 = pr.iter().zip(dp).map(|(a, b)| a * b).sum();
            for ((x, &pe), &de) in dl.iter_mut().zip(pr).zip(dp) {
                *x = pe * (de - s);
            }
        });
}

/// dh[t] += sum of dhx[r] over t's rows, in `token_rows` order; dhx [rows, d], dh [n, d].
pub fn scatter_add(dhx: &[f32], token_rows: &[u32], k: usize, d: usize, dh: &mut [f32]) {
    let n = token_rows.len() / k;
    dh[..n * d]
        .par_chunks_mut(d)
        .enumerate()
        .for_each(|(t, row)| {
            for &r in &token_rows[t * k..(t + 1) * k] {
                let r = r as usize;
                for (x, &v) in row.iter_mut().zip(&dhx[r * d..(r + 1) * d]) {
                    *x += v;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-worked case: 3 tokens, 4 experts, k = 2, with a tie.
    #[test]
    fn routing_by_hand() {
        let logits = [
            0.0, 2.0, 1.0, 2.0, // ties 1 and 3: 1 first
            5.0, 0.0, 0.0, 0.0, // 0, then the tie 1, 2, 3: 1
            1.0, 1.0, 1.0, 3.0, // 3, then 0
        ];
        let (mut probs, mut chosen) = (vec![0.0; 12], vec![0; 6]);
        topk_softmax(&logits, 4, 2, &mut probs, &mut chosen);
        assert_eq!(chosen, [1, 3, 0, 1, 3, 0]);
        for row in probs.chunks(4) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        assert!((probs[1] - probs[3]).abs() == 0.0 && probs[1] > probs[2]);
        let (mut routes, mut starts, mut token_rows) = (vec![[0; 2]; 6], vec![0; 5], vec![0; 6]);
        sort_routes(&chosen, 4, 2, &mut routes, &mut starts, &mut token_rows);
        assert_eq!(starts, [0, 2, 4, 4, 6]);
        assert_eq!(routes, [[1, 0], [2, 0], [0, 1], [1, 1], [0, 3], [2, 3]]);
        assert_eq!(token_rows, [2, 4, 0, 3, 1, 5]);
    }
}
