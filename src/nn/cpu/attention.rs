//! Causal multi-head softmax attention (scores and softmax in the element type, f32 in
//! training). Parallel over (batch, head); each task runs its products through single-threaded
//! gemm and owns its own strided block of every output. The products go by blocks of `BLOCK`
//! query rows (or key columns), each against only the keys (queries) the causal mask lets it
//! see, so the masked upper triangle costs almost nothing (5/8 of the full products at 128
//! positions).

use super::isa::Isa;
use super::matmul::{gemm_into_ptr, MatRef};
use super::real::{Real, SharedMut};
use super::vmath;
use crate::nn::backend::AttnShape;
use rayon::prelude::*;

/// Rows (or columns) of the score matrix per product.
const BLOCK: usize = 32;

/// The row blocks of a `tn`-position sequence: (first row, end row).
fn blocks(tn: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..tn)
        .step_by(BLOCK)
        .map(move |r0| (r0, (r0 + BLOCK).min(tn)))
}

/// The row-major matrix at `data[base..]` with row stride `rs`.
fn rows<T>(data: &[T], base: usize, rs: usize) -> MatRef<'_, T> {
    MatRef {
        data: &data[base..],
        rs,
        cs: 1,
    }
}

/// The transpose of `rows`.
fn cols<T>(data: &[T], base: usize, rs: usize) -> MatRef<'_, T> {
    rows(data, base, rs).t()
}

/// c[m, n] = a[m, k] · b[k, n] into a row-major block of row stride `c_rs`, single-threaded.
///
/// # Safety
/// As `gemm_into_ptr`: `c` is valid for the block and no other thread writes it meanwhile.
unsafe fn product<T: Real>(
    isa: Isa,
    (m, n, k): (usize, usize, usize),
    a: MatRef<T>,
    b: MatRef<T>,
    c: *mut T,
    c_rs: usize,
) {
    gemm_into_ptr(isa, m, n, k, a, b, c, c_rs, 1, false)
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
        for (r0, r1) in blocks(tn) {
            // Scores of rows r0..r1 against keys 0..r1.
            // SAFETY: `a` is this task's own block.
            unsafe {
                product(
                    isa,
                    (r1 - r0, r1, hd),
                    rows(q, base + r0 * d, d),
                    cols(k, base, d),
                    a.as_mut_ptr().add(r0 * tn),
                    tn,
                )
            };
            isa.run(
                #[inline(always)]
                |_| {
                    for t in r0..r1 {
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
            // SAFETY: task (b, h) is the only writer of head h's columns in batch b's rows.
            unsafe {
                product(
                    isa,
                    (r1 - r0, hd, r1),
                    rows(a, r0 * tn, tn),
                    rows(v, base, d),
                    outp.ptr().add(base + r0 * d),
                    d,
                )
            };
        }
    });
}

/// Backward: writes dq, dk, dv from the saved probabilities `att` and the output gradient.
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
            // SAFETY (every product below): `ds` is this task's own scratch; the strided
            // blocks of dq, dk, dv it writes (head h's columns of batch b's rows) are its alone.
            for (r0, r1) in blocks(tn) {
                // dP of rows r0..r1 against keys 0..r1, then dS = P (dP - <P, dP>) scale.
                unsafe {
                    product(
                        isa,
                        (r1 - r0, r1, hd),
                        rows(dout, base + r0 * d, d),
                        cols(v, base, d),
                        ds.as_mut_ptr().add(r0 * tn),
                        tn,
                    )
                };
                isa.run(
                    #[inline(always)]
                    |isa| {
                        for t in r0..r1 {
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
                // dQ of rows r0..r1 = dS[r0..r1, 0..r1] K[0..r1].
                unsafe {
                    product(
                        isa,
                        (r1 - r0, hd, r1),
                        rows(ds, r0 * tn, tn),
                        rows(k, base, d),
                        dqp.ptr().add(base + r0 * d),
                        d,
                    )
                };
            }
            // Keys (and values) c0..c1 are seen by queries c0..tn only.
            for (c0, c1) in blocks(tn) {
                unsafe {
                    product(
                        isa,
                        (c1 - c0, hd, tn - c0),
                        cols(a, c0 * tn + c0, tn),
                        rows(dout, base + c0 * d, d),
                        dvp.ptr().add(base + c0 * d),
                        d,
                    );
                    product(
                        isa,
                        (c1 - c0, hd, tn - c0),
                        cols(ds, c0 * tn + c0, tn),
                        rows(q, base + c0 * d, d),
                        dkp.ptr().add(base + c0 * d),
                        d,
                    );
                }
            }
        },
    );
}
