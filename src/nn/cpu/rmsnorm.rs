//! RMSNorm over the last axis with a learned scale: y = x / rms(x) * g.

use super::real::Real;
use rayon::prelude::*;

pub const RMS_EPS: f64 = 1e-6;
/// Rows per partial sum of the scale gradient; fixed so the reduction order never depends on
/// the thread count.
const ROWS_PER_PARTIAL: usize = 64;

/// x, y: `[rows, d]`; scale: `[d]`; rstd: `[rows]` (saved for the backward pass).
pub fn rmsnorm_forward<T: Real>(x: &[T], scale: &[T], d: usize, y: &mut [T], rstd: &mut [T]) {
    let eps = T::from_f64(RMS_EPS);
    let inv_d = T::from_f64(1.0 / d as f64);
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(rstd.par_iter_mut())
        .for_each(|((yr, xr), r)| {
            let ms = super::real::dot(xr, xr) * inv_d;
            let inv = T::ONE / (ms + eps).sqrt();
            *r = inv;
            for i in 0..d {
                yr[i] = xr[i] * inv * scale[i];
            }
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
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(d * rows_per)
        .enumerate()
        .map(|(ci, dxc)| {
            let mut part = vec![T::ZERO; d];
            let r0 = ci * rows_per;
            for (ri, dxr) in dxc.chunks_mut(d).enumerate() {
                let row = r0 + ri;
                let xr = &x[row * d..(row + 1) * d];
                let dyr = &dy[row * d..(row + 1) * d];
                let inv = rstd[row];
                let mut m = T::ZERO;
                for i in 0..d {
                    let xhat = xr[i] * inv;
                    let dxhat = dyr[i] * scale[i];
                    m += dxhat * xhat;
                    part[i] += dyr[i] * xhat;
                }
                m *= inv_d;
                for i in 0..d {
                    let xhat = xr[i] * inv;
                    dxr[i] += inv * (dyr[i] * scale[i] - xhat * m);
                }
            }
            part
        })
        .collect();
    for part in &partials {
        for i in 0..d {
            dscale[i] += part[i];
        }
    }
}
