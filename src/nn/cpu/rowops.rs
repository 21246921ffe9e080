//! Small row-wise helpers: bias add, column sums (bias gradients), residual add.

use super::isa::Isa;
use super::real::Real;
use rayon::prelude::*;

const ROWS_PER_PARTIAL: usize = 64;

/// `x[rows, d] += b[d]`
pub fn add_row_vector<T: Real>(x: &mut [T], b: &[T]) {
    let d = b.len();
    let isa = Isa::current();
    x.par_chunks_mut(d * ROWS_PER_PARTIAL).for_each(|rows| {
        isa.run(
            #[inline(always)]
            |_| {
                for r in rows.chunks_mut(d) {
                    for (ri, &bi) in r.iter_mut().zip(b) {
                        *ri += bi;
                    }
                }
            },
        )
    });
}

/// `out[d]` += sum over rows of `x[rows, d]`, in a fixed order.
pub fn sum_rows_into<T: Real>(x: &[T], out: &mut [T]) {
    let d = out.len();
    let isa = Isa::current();
    let partials: Vec<Vec<T>> = x
        .par_chunks(d * ROWS_PER_PARTIAL)
        .map(|c| {
            let mut p = vec![T::ZERO; d];
            isa.run(
                #[inline(always)]
                |_| {
                    for r in c.chunks(d) {
                        for (pi, &ri) in p.iter_mut().zip(r) {
                            *pi += ri;
                        }
                    }
                },
            );
            p
        })
        .collect();
    for p in &partials {
        for i in 0..d {
            out[i] += p[i];
        }
    }
}

/// y += x
pub fn add_assign<T: Real>(y: &mut [T], x: &[T]) {
    let isa = Isa::current();
    y.par_chunks_mut(8192)
        .zip(x.par_chunks(8192))
        .for_each(|(yc, xc)| {
            isa.run(
                #[inline(always)]
                |_| {
                    for (a, &b) in yc.iter_mut().zip(xc) {
                        *a += b;
                    }
                },
            )
        });
}
