//! Causal multi-head softmax attention (scores and softmax in the element type, f32 in
//! training). Parallel over (batch, head); each task runs its products through single-threaded
//! gemm and owns its own strided block of every output.

use super::isa::Isa;
use super::matmul::{gemm_into_ptr, MatRef};
use super::real::{Real, SharedMut};
use super::vmath;
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
    assert!(out.len() >= s.batch * tn * d);
    let outp = SharedMut(out.as_mut_ptr());
    let isa = Isa::current();
    att.par_chunks_mut(tn * tn).enumerate().for_each(|(bh, a)| {
        let (b, h) = (bh / hn, bh % hn);
        let base = b * tn * d + h * hd;
        let qm = MatRef {
            data: &q[base..],
            rs: d,
            cs: 1,
        };
        let kt = MatRef {
            data: &k[base..],
            rs: 1,
            cs: d,
        };
        // SAFETY: `a` is this task's own block.
        unsafe { gemm_into_ptr(isa, tn, tn, hd, qm, kt, a.as_mut_ptr(), tn, 1, false) };
        isa.run(
            #[inline(always)]
            |_| {
                for t in 0..tn {
                    let (row, masked) = a[t * tn..(t + 1) * tn].split_at_mut(t + 1);
                    for x in row.iter_mut() {
                        *x *= scale;
                    }
                    let mx = vmath::max(row);
                    for x in row.iter_mut() {
                        *x = (*x - mx).vexp();
                    }
                    let inv = T::ONE / vmath::sum_map(row, |x| x);
                    for x in row.iter_mut() {
                        *x *= inv;
                    }
                    masked.fill(T::ZERO);
                }
            },
        );
        let am = MatRef {
            data: &a[..],
            rs: tn,
            cs: 1,
        };
        let vm = MatRef {
            data: &v[base..],
            rs: d,
            cs: 1,
        };
        // SAFETY: task (b, h) is the only writer of head h's columns in batch b's rows.
        unsafe { gemm_into_ptr(isa, tn, hd, tn, am, vm, outp.ptr().add(base), d, 1, false) };
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
    assert!(
        dq.len() >= s.batch * tn * d
            && dk.len() >= s.batch * tn * d
            && dv.len() >= s.batch * tn * d
    );
    let isa = Isa::current();
    let (dqp, dkp, dvp) = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    (0..s.batch * hn).into_par_iter().for_each_init(
        || vec![T::ZERO; tn * tn],
        |ds, bh| {
            let (b, h) = (bh / hn, bh % hn);
            let base = b * tn * d + h * hd;
            let a = &att[bh * tn * tn..(bh + 1) * tn * tn];
            let dom = MatRef {
                data: &dout[base..],
                rs: d,
                cs: 1,
            };
            // SAFETY (all gemm_into_ptr calls below): `ds` is local; the strided blocks of dq, dk,
            // dv at `base` belong to this (b, h) task alone.
            unsafe {
                // dA = dO · V^T
                let vt = MatRef {
                    data: &v[base..],
                    rs: 1,
                    cs: d,
                };
                gemm_into_ptr(isa, tn, tn, hd, dom, vt, ds.as_mut_ptr(), tn, 1, false);
                // dV = A^T · dO
                let at = MatRef {
                    data: a,
                    rs: 1,
                    cs: tn,
                };
                gemm_into_ptr(isa, tn, hd, tn, at, dom, dvp.ptr().add(base), d, 1, false);
            }
            // dS = A * (dA - rowsum(A * dA)) * scale (zero above the diagonal, where A is zero).
            isa.run(
                #[inline(always)]
                |isa| {
                    for t in 0..tn {
                        let ar = &a[t * tn..t * tn + t + 1];
                        let (dr, masked) = ds[t * tn..(t + 1) * tn].split_at_mut(t + 1);
                        let acc = vmath::dot(isa, ar, dr);
                        for (d, &p) in dr.iter_mut().zip(ar) {
                            *d = p * (*d - acc) * scale;
                        }
                        masked.fill(T::ZERO);
                    }
                },
            );
            unsafe {
                let dsm = MatRef {
                    data: &ds[..],
                    rs: tn,
                    cs: 1,
                };
                // dQ = dS · K
                let km = MatRef {
                    data: &k[base..],
                    rs: d,
                    cs: 1,
                };
                gemm_into_ptr(isa, tn, hd, tn, dsm, km, dqp.ptr().add(base), d, 1, false);
                // dK = dS^T · Q
                let dst = MatRef {
                    data: &ds[..],
                    rs: 1,
                    cs: tn,
                };
                let qm = MatRef {
                    data: &q[base..],
                    rs: d,
                    cs: 1,
                };
                gemm_into_ptr(isa, tn, hd, tn, dst, qm, dkp.ptr().add(base), d, 1, false);
            }
        },
    );
}
