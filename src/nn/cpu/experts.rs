//! Tiny linear experts gathered by index: y = sum over selected (c, i) of coef_ci * v_ci, with
//! a_ci = u_ci . x. Never materialises a [tokens, C, k, d] tensor: the forward pass walks the
//! selected rows of the pools directly.
//!
//! The backward scatter-add into the pools is deterministic and parallel: slots are bucketed by
//! pool row with a stable counting sort, then each pool row is owned by one task that sums its
//! slots in token order.

use super::activations::{gelu, gelu_grad};
use super::isa::Isa;
use super::real::{Real, SharedMut};
use super::vmath::{self, axpy, dot};
use crate::nn::backend::{ExpertMode, ExpertShape};
use rayon::prelude::*;

/// Forward. scores, indices: [tokens, C, k]. Saves a (u.x) and coef, both [tokens, C, k]
/// (and for PEER the softmax weights in `w`). y: [tokens, d] (overwritten).
#[allow(clippy::too_many_arguments)]
pub fn experts_forward<T: Real>(
    shape: ExpertShape,
    mode: ExpertMode,
    x: &[T],
    scores: &[T],
    indices: &[u32],
    u: &[T],
    v: &[T],
    a: &mut [T],
    coef: &mut [T],
    w: &mut [T],
    y: &mut [T],
) {
    let ExpertShape {
        d,
        channels,
        k,
        channel_stride,
        ..
    } = shape;
    let slots = channels * k;
    let isa = Isa::current();
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(a.par_chunks_mut(slots).zip(coef.par_chunks_mut(slots)))
        .zip(w.par_chunks_mut(slots))
        .enumerate()
        .for_each(|(t, (((yr, xr), (ar, cr)), wr))| {
            isa.run(
                #[inline(always)]
                |isa| {
                    yr.fill(T::ZERO);
                    let sc = &scores[t * slots..(t + 1) * slots];
                    let ix = &indices[t * slots..(t + 1) * slots];
                    for c in 0..channels {
                        if mode == ExpertMode::PeerSoftmaxGelu {
                            let s = &sc[c * k..(c + 1) * k];
                            let mx = vmath::max(s);
                            let mut sum = T::ZERO;
                            for i in 0..k {
                                wr[c * k + i] = (s[i] - mx).vexp();
                                sum += wr[c * k + i];
                            }
                            for i in 0..k {
                                wr[c * k + i] = wr[c * k + i] / sum;
                            }
                        }
                        for i in 0..k {
                            let j = c * k + i;
                            let row = c * channel_stride + ix[j] as usize;
                            let ur = &u[row * d..(row + 1) * d];
                            let av = dot(isa, ur, xr);
                            ar[j] = av;
                            cr[j] = match mode {
                                ExpertMode::GatedLinear => sc[j] * av,
                                ExpertMode::GatedGelu => gelu(sc[j] * av),
                                ExpertMode::PeerSoftmaxGelu => gelu(av) * wr[j],
                            };
                            axpy(isa, cr[j], &v[row * d..(row + 1) * d], yr);
                        }
                    }
                },
            )
        });
}

/// Backward. Writes dscores and `da` (scratch [tokens, C, k]); adds into dx, du, dv.
#[allow(clippy::too_many_arguments)]
pub fn experts_backward<T: Real>(
    shape: ExpertShape,
    mode: ExpertMode,
    x: &[T],
    scores: &[T],
    indices: &[u32],
    u: &[T],
    v: &[T],
    a: &[T],
    coef: &[T],
    w: &[T],
    dy: &[T],
    dscores: &mut [T],
    da: &mut [T],
    dx: &mut [T],
    du: &mut [T],
    dv: &mut [T],
    order: &mut SlotOrder,
) {
    let ExpertShape {
        d,
        channels,
        k,
        channel_stride,
        pool_rows,
    } = shape;
    let slots = channels * k;
    let tokens = x.len() / d;
    let isa = Isa::current();
    // Pass 1, per token: gradients of the gate, of a, and of x.
    dx.par_chunks_mut(d)
        .zip(dscores.par_chunks_mut(slots).zip(da.par_chunks_mut(slots)))
        .enumerate()
        .for_each(|(t, (dxr, (dsr, dar)))| {
            isa.run(
                #[inline(always)]
                |isa| {
                    let dyr = &dy[t * d..(t + 1) * d];
                    let sc = &scores[t * slots..(t + 1) * slots];
                    let ix = &indices[t * slots..(t + 1) * slots];
                    let ar = &a[t * slots..(t + 1) * slots];
                    let wr = &w[t * slots..(t + 1) * slots];
                    for c in 0..channels {
                        let mut dw_dot_w = T::ZERO;
                        for i in 0..k {
                            let j = c * k + i;
                            let row = c * channel_stride + ix[j] as usize;
                            let dcoef = dot(isa, &v[row * d..(row + 1) * d], dyr);
                            match mode {
                                ExpertMode::GatedLinear | ExpertMode::GatedGelu => {
                                    let dpre = if mode == ExpertMode::GatedGelu {
                                        dcoef * gelu_grad(sc[j] * ar[j])
                                    } else {
                                        dcoef
                                    };
                                    dsr[j] = dpre * ar[j];
                                    dar[j] = dpre * sc[j];
                                }
                                ExpertMode::PeerSoftmaxGelu => {
                                    let dw = dcoef * gelu(ar[j]);
                                    dsr[j] = dw; // softmax backward below
                                    dw_dot_w += dw * wr[j];
                                    dar[j] = dcoef * wr[j] * gelu_grad(ar[j]);
                                }
                            }
                            axpy(isa, dar[j], &u[row * d..(row + 1) * d], dxr);
                        }
                        if mode == ExpertMode::PeerSoftmaxGelu {
                            for i in 0..k {
                                let j = c * k + i;
                                dsr[j] = wr[j] * (dsr[j] - dw_dot_w);
                            }
                        }
                    }
                },
            )
        });
    // Pass 2, per pool row: scatter-add du and dv in a fixed (token) order.
    order.build(indices, tokens, channels, k, channel_stride, pool_rows);
    const ROWS_PER_TASK: usize = 16;
    let order = &*order;
    let dvp = SharedMut(dv.as_mut_ptr());
    du.par_chunks_mut(d * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(ci, duc)| {
            let r0 = ci * ROWS_PER_TASK;
            // SAFETY: this task owns pool rows r0..r0+ROWS_PER_TASK of dv as well as du.
            let dvc = unsafe { dvp.slice(r0 * d, duc.len()) };
            isa.run(
                #[inline(always)]
                |isa| {
                    for (ri, (dur, dvr)) in duc.chunks_mut(d).zip(dvc.chunks_mut(d)).enumerate() {
                        let row = r0 + ri;
                        for &slot in order.slots_of(row) {
                            let slot = slot as usize;
                            let t = slot / slots;
                            axpy(isa, da[slot], &x[t * d..(t + 1) * d], dur);
                            axpy(isa, coef[slot], &dy[t * d..(t + 1) * d], dvr);
                        }
                    }
                },
            )
        });
}

/// The (token, channel, i) slots grouped by pool row, in increasing slot order within a row.
#[derive(Default)]
pub struct SlotOrder {
    starts: Vec<u32>,
    slots: Vec<u32>,
}

impl SlotOrder {
    fn build(
        &mut self,
        indices: &[u32],
        tokens: usize,
        channels: usize,
        k: usize,
        channel_stride: usize,
        pool_rows: usize,
    ) {
        let slots = channels * k;
        let n = tokens * slots;
        self.starts.clear();
        self.starts.resize(pool_rows + 1, 0);
        let row_of = |j: usize| ((j % slots) / k) * channel_stride + indices[j] as usize;
        for j in 0..n {
            self.starts[row_of(j) + 1] += 1;
        }
        for r in 0..pool_rows {
            self.starts[r + 1] += self.starts[r];
        }
        self.slots.clear();
        self.slots.resize(n, 0);
        let mut fill: Vec<u32> = self.starts[..pool_rows].to_vec();
        for j in 0..n {
            let r = row_of(j);
            self.slots[fill[r] as usize] = j as u32;
            fill[r] += 1;
        }
    }

    fn slots_of(&self, row: usize) -> &[u32] {
        &self.slots[self.starts[row] as usize..self.starts[row + 1] as usize]
    }
}
