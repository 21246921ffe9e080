//! RMSNorm over the last axis with a learned scale: y = x / rms(x) * g.

use super::isa::Isa;
use super::real::Real;
use super::vmath;
use rayon::prelude::*;

pub const RMS_EPS: f64 = 1e-6;
/// Rows per partial sum of the scale gradient; fixed so the reduction order never depends on
/// the thread count.
const ROWS_PER_PARTIAL: usize = 64;

/// x, y: `[rows, d]`; scale: `[d]`; rstd: `[rows]` (saved for the backward pass).
pub fn rmsnorm_forward<T: Real>(x: &[T], scale: &[T], d: usize, y: &mut [T], rstd: &mut [T]) {
    let eps = T::from_f64(RMS_EPS);
    let inv_d = T::from_f64(1.0 / d as f64);
    let isa = Isa::current();
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(rstd.par_iter_mut())
        .for_each(|((yr, xr), r)| {
            isa.run(
                #[inline(always)]
                |isa| {
                    let ms = vmath::dot(isa, xr, xr) * inv_d;
                    let inv = T::ONE / (ms + eps).sqrt();
                    *r = inv;
                    for ((yi, &xi), &si) in yr.iter_mut().zip(xr).zip(scale) {
                        *yi = xi * inv * si;
                    }
                },
            )
        });
}

/// Adds the input gradient into `dx` and the scale gradient into `dscale`.
pub fn rmsnorm_backward<T: Real>(
    x: &[T],
    scale: &[T],
    rstd: &[T],
    dy: &[T],
    d: usize,
    dx: &mut [T],
    dscale: &mut [T],
) {
    let inv_d = T::from_f64(1.0 / d as f64);
    let rows_per = ROWS_PER_PARTIAL;
    let isa = Isa::current();
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(d * rows_per)
        .enumerate()
        .map(|(ci, dxc)| {
            let mut part = vec![T::ZERO; d];
            let mut g = vec![T::ZERO; d];
            let r0 = ci * rows_per;
            isa.run(
                #[inline(always)]
                |isa| {
                    for (ri, dxr) in dxc.chunks_mut(d).enumerate() {
                        let row = r0 + ri;
                        let xr = &x[row * d..(row + 1) * d];
                        let dyr = &dy[row * d..(row + 1) * d];
                        let inv = rstd[row];
                        // Iterators, not indices: no bounds checks, so the loops vectorise.
                        for (((gi, pi), &dyi), (&xi, &si)) in g
                            .iter_mut()
                            .zip(part.iter_mut())
                            .zip(dyr)
                            .zip(xr.iter().zip(scale))
                        {
                            *gi = dyi * si;
                            *pi += dyi * (xi * inv);
                        }
                        // m = mean(dxhat · xhat), with xhat = x · inv.
                        let m = vmath::dot(isa, &g, xr) * inv * inv_d;
                        for ((dxi, &gi), &xi) in dxr.iter_mut().zip(&g).zip(xr) {
                            *dxi += inv * (gi - xi * inv * m);
                        }
                    }
                },
            );
            part
        })
        .collect();
    for part in &partials {
        for i in 0..d {
            dscale[i] += part[i];
        }
    }
}
