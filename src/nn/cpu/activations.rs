//! GELU (tanh approximation, the JAX default) and the clamped SwiGLU of the reference code.

use super::isa::Isa;
use super::real::Real;
use rayon::prelude::*;

pub const SWIGLU_ALPHA: f64 = 1.702;
pub const SWIGLU_LIMIT: f64 = 7.0;
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044_715;

#[inline(always)]
pub fn gelu<T: Real>(x: T) -> T {
    let half = T::from_f64(0.5);
    let inner = T::from_f64(SQRT_2_OVER_PI) * (x + T::from_f64(GELU_C) * x * x * x);
    half * x * (T::ONE + inner.vtanh())
}

#[inline(always)]
pub fn gelu_grad<T: Real>(x: T) -> T {
    let half = T::from_f64(0.5);
    let c = T::from_f64(GELU_C);
    let k = T::from_f64(SQRT_2_OVER_PI);
    let th = (k * (x + c * x * x * x)).vtanh();
    half * (T::ONE + th)
        + half * x * (T::ONE - th * th) * k * (T::ONE + T::from_f64(3.0) * c * x * x)
}

/// Elements per rayon task of the elementwise kernels.
const CHUNK: usize = 4096;

pub fn gelu_forward<T: Real>(x: &[T], y: &mut [T]) {
    let isa = Isa::current();
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(yc, xc)| {
            isa.run(
                #[inline(always)]
                |_| {
                    for (yi, &xi) in yc.iter_mut().zip(xc) {
                        *yi = gelu(xi);
                    }
                },
            )
        });
}

/// dx = dy * gelu'(x) (overwrites dx).
pub fn gelu_backward<T: Real>(x: &[T], dy: &[T], dx: &mut [T]) {
    let isa = Isa::current();
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dc, (xc, gc))| {
            isa.run(
                #[inline(always)]
                |_| {
                    for ((d, &xi), &gi) in dc.iter_mut().zip(xc).zip(gc) {
                        *d = gi * gelu_grad(xi);
                    }
                },
            )
        });
}

#[inline(always)]
fn sigmoid<T: Real>(x: T) -> T {
    T::ONE / (T::ONE + (-x).vexp())
}

/// z: [rows, 2F] (gate half first, linear half second); y: [rows, F].
/// y = min(gate, 7) * sigmoid(1.702 * min(gate, 7)) * (clamp(lin, -7, 7) + 1).
pub fn swiglu_forward<T: Real>(z: &[T], f: usize, y: &mut [T]) {
    let (alpha, lim) = (T::from_f64(SWIGLU_ALPHA), T::from_f64(SWIGLU_LIMIT));
    let isa = Isa::current();
    y.par_chunks_mut(f)
        .zip(z.par_chunks(2 * f))
        .for_each(|(yr, zr)| {
            isa.run(
                #[inline(always)]
                |_| {
                    let (gate, lin) = zr.split_at(f);
                    for ((yi, &g_raw), &l_raw) in yr.iter_mut().zip(gate).zip(lin) {
                        let g = if g_raw > lim { lim } else { g_raw };
                        let l = if l_raw > lim { lim } else { l_raw };
                        let l = if l < -lim { -lim } else { l };
                        *yi = g * sigmoid(alpha * g) * (l + T::ONE);
                    }
                },
            )
        });
}

/// dz: [rows, 2F] (overwritten).
pub fn swiglu_backward<T: Real>(z: &[T], dy: &[T], f: usize, dz: &mut [T]) {
    let (alpha, lim) = (T::from_f64(SWIGLU_ALPHA), T::from_f64(SWIGLU_LIMIT));
    let isa = Isa::current();
    dz.par_chunks_mut(2 * f)
        .zip(z.par_chunks(2 * f).zip(dy.par_chunks(f)))
        .for_each(|(dzr, (zr, dyr))| {
            isa.run(
                #[inline(always)]
                |_| {
                    let (dgate, dlin) = dzr.split_at_mut(f);
                    let (gate, lin) = zr.split_at(f);
                    // Selects rather than branches, and iterators rather than indices, so
                    // that the loop vectorises.
                    for (((dg, dl), (&g_raw, &l_raw)), &d) in dgate
                        .iter_mut()
                        .zip(dlin.iter_mut())
                        .zip(gate.iter().zip(lin))
                        .zip(dyr)
                    {
                        let g = if g_raw > lim { lim } else { g_raw };
                        let l = if l_raw > lim { lim } else { l_raw };
                        let l = if l < -lim { -lim } else { l };
                        let s = sigmoid(alpha * g);
                        let glu = g * s;
                        let dglu = s + g * alpha * s * (T::ONE - s);
                        *dg = if g_raw > lim {
                            T::ZERO
                        } else {
                            d * (l + T::ONE) * dglu
                        };
                        *dl = if l_raw > lim || l_raw < -lim {
                            T::ZERO
                        } else {
                            d * glu
                        };
                    }
                },
            )
        });
}
