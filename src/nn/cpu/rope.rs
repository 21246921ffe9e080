//! Rotary position embedding (rotate-half convention, base 10000), applied in place.

use super::real::Real;
use rayon::prelude::*;

pub const ROPE_BASE: f64 = 10000.0;

/// cos/sin tables, each [seq_len, head_dim / 2].
pub fn rope_tables<T: Real>(seq_len: usize, head_dim: usize) -> (Vec<T>, Vec<T>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(seq_len * half);
    let mut sin = Vec::with_capacity(seq_len * half);
    for t in 0..seq_len {
        for i in 0..half {
            let freq = ROPE_BASE.powf(-(2.0 * i as f64) / head_dim as f64);
            let angle = t as f64 * freq;
            cos.push(T::from_f64(angle.cos()));
            sin.push(T::from_f64(angle.sin()));
        }
    }
    (cos, sin)
}

/// x: [tokens, heads, head_dim] where token index = b * seq_len + t. `inverse` applies the
/// transposed rotation, which is the backward pass.
pub fn rope_apply<T: Real>(
    x: &mut [T],
    cos: &[T],
    sin: &[T],
    seq_len: usize,
    n_heads: usize,
    head_dim: usize,
    inverse: bool,
) {
    let half = head_dim / 2;
    let row = n_heads * head_dim;
    x.par_chunks_mut(row).enumerate().for_each(|(tok, xr)| {
        let t = tok % seq_len;
        let c = &cos[t * half..(t + 1) * half];
        let s = &sin[t * half..(t + 1) * half];
        for h in xr.chunks_mut(head_dim) {
            for i in 0..half {
                let (x1, x2) = (h[i], h[i + half]);
                let sn = if inverse { -s[i] } else { s[i] };
                h[i] = x1 * c[i] - x2 * sn;
                h[i + half] = x1 * sn + x2 * c[i];
            }
        }
    });
}
