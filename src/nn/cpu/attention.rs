//! Causal multi-head softmax attention (scores and softmax in the element type, f32 in
//! training). Parallel over (batch, head); every task owns its own rows of the outputs.

use super::real::{dot, Real, SharedMut};
use rayon::prelude::*;

pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// q, k, v, out: [batch * seq, heads * head_dim]; att: [batch, heads, seq, seq] (probabilities,
/// saved for backward; the upper triangle is zero).
pub fn attention_forward<T: Real>(
    s: &AttnShape,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    att: &mut [T],
) {
    let (tn, hn, hd) = (s.seq, s.heads, s.head_dim);
    let d = hn * hd;
    let scale = T::from_f64(1.0 / (hd as f64).sqrt());
    let outp = SharedMut(out.as_mut_ptr());
    att.par_chunks_mut(tn * tn).enumerate().for_each(|(bh, a)| {
        let (b, h) = (bh / hn, bh % hn);
        let row = |t: usize| (b * tn + t) * d + h * hd;
        for t in 0..tn {
            let qr = &q[row(t)..row(t) + hd];
            let ar = &mut a[t * tn..(t + 1) * tn];
            let mut mx = T::from_f64(f64::NEG_INFINITY);
            for u in 0..=t {
                let sc = dot(qr, &k[row(u)..row(u) + hd]) * scale;
                ar[u] = sc;
                if sc > mx {
                    mx = sc;
                }
            }
            let mut sum = T::ZERO;
            for x in ar[..=t].iter_mut() {
                *x = (*x - mx).exp();
                sum += *x;
            }
            let inv = T::ONE / sum;
            for x in ar[..=t].iter_mut() {
                *x *= inv;
            }
            for x in ar[t + 1..].iter_mut() {
                *x = T::ZERO;
            }
            // SAFETY: task (b, h) is the only writer of these head_dim columns of row t.
            let o = unsafe { outp.slice(row(t), hd) };
            o.fill(T::ZERO);
            for u in 0..=t {
                super::real::axpy(ar[u], &v[row(u)..row(u) + hd], o);
            }
        }
    });
}

/// Writes dq, dk, dv (they are overwritten, not accumulated).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Real>(
    s: &AttnShape,
    q: &[T],
    k: &[T],
    v: &[T],
    att: &[T],
    dout: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let (tn, hn, hd) = (s.seq, s.heads, s.head_dim);
    let d = hn * hd;
    let scale = T::from_f64(1.0 / (hd as f64).sqrt());
    let (dqp, dkp, dvp) = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    (0..s.batch * hn).into_par_iter().for_each(|bh| {
        let (b, h) = (bh / hn, bh % hn);
        let row = |t: usize| (b * tn + t) * d + h * hd;
        let a = &att[bh * tn * tn..(bh + 1) * tn * tn];
        // SAFETY: rows of head h in batch b belong to this task alone.
        unsafe {
            for t in 0..tn {
                dqp.slice(row(t), hd).fill(T::ZERO);
                dkp.slice(row(t), hd).fill(T::ZERO);
                dvp.slice(row(t), hd).fill(T::ZERO);
            }
        }
        let mut ds = vec![T::ZERO; tn];
        for t in 0..tn {
            let ar = &a[t * tn..(t + 1) * tn];
            let dor = &dout[row(t)..row(t) + hd];
            let mut acc = T::ZERO;
            for u in 0..=t {
                let da = dot(dor, &v[row(u)..row(u) + hd]);
                ds[u] = da;
                acc += da * ar[u];
                // dv[u] += a[t,u] * dout[t]
                unsafe { super::real::axpy(ar[u], dor, dvp.slice(row(u), hd)) };
            }
            let dqr = unsafe { dqp.slice(row(t), hd) };
            for u in 0..=t {
                let g = ar[u] * (ds[u] - acc) * scale;
                super::real::axpy(g, &k[row(u)..row(u) + hd], dqr);
                unsafe { super::real::axpy(g, &q[row(t)..row(t) + hd], dkp.slice(row(u), hd)) };
            }
        }
    });
}
