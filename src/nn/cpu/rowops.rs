//! Small row-wise helpers: bias add, column sums (bias gradients), residual add.

use super::isa::Isa;
use super::real::Real;
use crate::nn::backend::Bf16;
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

/// x *= factor
pub fn scale(x: &mut [f32], factor: f32) {
    x.par_chunks_mut(8192)
        .for_each(|c| c.iter_mut().for_each(|v| *v *= factor));
}

/// out[t] = table[tokens[t]], rows of `d`.
/// out[i] = x[i] rounded to bf16 (the CUDA twin: kernels/rowops.cu `round_bf16`).
pub fn round_bf16(x: &[f32], out: &mut [Bf16]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = Bf16::from_f32(v);
    }
}

pub fn gather_rows<T: Real>(table: &[T], tokens: &[u32], d: usize, out: &mut [T]) {
    out.par_chunks_mut(d)
        .zip(tokens.par_iter())
        .for_each(|(row, &tok)| {
            let tok = tok as usize;
            row.copy_from_slice(&table[tok * d..(tok + 1) * d]);
        });
}

/// table[tokens[t]] += rows[t], in token order (deterministic).
pub fn scatter_add_rows<T: Real>(rows: &[T], tokens: &[u32], d: usize, table: &mut [T]) {
    for (row, &tok) in rows.chunks(d).zip(tokens) {
        let tok = tok as usize;
        for (x, &g) in table[tok * d..(tok + 1) * d].iter_mut().zip(row) {
            *x += g;
        }
    }
}

/// The sum of squares in f64, over fixed chunks in a fixed order (each chunk in
/// `vmath::LANES` partial sums, so that it vectorises).
pub fn sum_squares(x: &[f32]) -> f64 {
    use super::vmath::LANES;
    let isa = Isa::current();
    let partials: Vec<f64> = x
        .par_chunks(16384)
        .map(|c| {
            isa.run(
                #[inline(always)]
                |_| {
                    let mut acc = [0.0f64; LANES];
                    let chunks = c.chunks_exact(LANES);
                    let rest: f64 = chunks
                        .remainder()
                        .iter()
                        .map(|&x| (x as f64) * (x as f64))
                        .sum();
                    for ch in chunks {
                        for j in 0..LANES {
                            acc[j] += (ch[j] as f64) * (ch[j] as f64);
                        }
                    }
                    acc.iter().sum::<f64>() + rest
                },
            )
        })
        .collect();
    partials.iter().sum()
}
