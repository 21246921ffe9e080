//! Vector math for the kernels' inner loops: `exp` and `tanh` in plain arithmetic (no libm
//! call, so a loop over them vectorises), and reductions with a fixed number of partial sums
//! (so the result does not depend on the vector width). Call these inside `Isa::run` bodies.

use super::isa::Isa;
use super::real::Real;

/// Partial sums of the reductions: a multiple of every vector width (8 on AVX2, 16 on AVX-512),
/// so AVX2 and AVX-512 add in the same order and give the same bits.
pub const LANES: usize = 32;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two: the high part has so few bits that `n * LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2^23: adding it to a float below 2^22 in magnitude rounds it to an integer, which
/// then sits in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;
/// Beyond these, e^x is 0 or infinite in f32.
const EXP_LO: f32 = -87.33;
const EXP_HI: f32 = 88.37;

/// e^x for f32 within 1.5 ulp (Cephes' minimax polynomial on |r| ≤ ln2/2 after x = n ln2 + r).
/// Below -87.33 it returns 0 (instead of a subnormal), above 88.37 infinity; NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let xc = x.clamp(EXP_LO, EXP_HI);
    let t = xc * LOG2E + ROUND;
    let n_f = t - ROUND;
    let n_i = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (xc - n_f * LN2_HI) - n_f * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = (p * r) * r + r + 1.0;
    let scale = f32::from_bits(((n_i + 127) as u32) << 23);
    let y = y * scale;
    if x < EXP_LO {
        0.0
    } else if x > EXP_HI {
        f32::INFINITY
    } else {
        y
    }
}

/// tanh for f32 within 2 ulp: an odd polynomial near 0 (Cephes), 1 - 2/(e^{2|x|} + 1)
/// beyond, both computed so that the choice is a blend.
#[inline(always)]
pub fn tanh_f32(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    let mut p = -5.704_988_7e-3f32;
    p = p * z + 2.063_909e-2;
    p = p * z - 5.373_971_6e-2;
    p = p * z + 1.333_144_2e-1;
    p = p * z - 3.333_328e-1;
    let small = x + x * (p * z);
    let large = (1.0 - 2.0 / (exp_f32(2.0 * a) + 1.0)).copysign(x);
    if a < 0.625 {
        small
    } else {
        large
    }
}

/// Σ a[i] · b[i] in `LANES` partial sums, fused where the path has FMA.
#[inline(always)]
pub fn dot<T: Real>(isa: Isa, a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::ZERO; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for j in 0..LANES {
            acc[j] = isa.madd(x[j], y[j], acc[j]);
        }
    }
    let mut tail = T::ZERO;
    for (&x, &y) in ra.iter().zip(rb) {
        tail = isa.madd(x, y, tail);
    }
    fold(acc) + tail
}

/// Σ f(x[i]) in `LANES` partial sums.
#[inline(always)]
pub fn sum_map<T: Real>(x: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::ZERO; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] += f(c[j]);
        }
    }
    let mut tail = T::ZERO;
    for &v in rest {
        tail += f(v);
    }
    fold(acc) + tail
}

/// The largest element (the first NaN-free maximum; -inf for an empty slice).
#[inline(always)]
pub fn max<T: Real>(x: &[T]) -> T {
    let mut acc = [T::from_f64(f64::NEG_INFINITY); LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    let mut m = T::from_f64(f64::NEG_INFINITY);
    for v in acc.into_iter().chain(rest.iter().copied()) {
        if v > m {
            m = v;
        }
    }
    m
}

/// y += alpha · x, fused where the path has FMA.
#[inline(always)]
pub fn axpy<T: Real>(isa: Isa, alpha: T, x: &[T], y: &mut [T]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi = isa.madd(alpha, xi, *yi);
    }
}

/// Pairwise sum of the partial sums, in a fixed tree.
#[inline(always)]
fn fold<T: Real>(mut acc: [T; LANES]) -> T {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            acc[j] += acc[j + w];
        }
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units of the last place of the f32 nearest the exact value.
    fn ulps(got: f32, exact: f64) -> f64 {
        let e = exact as f32;
        let ulp = (f32::from_bits(e.abs().to_bits() + 1) - e.abs()) as f64;
        (got as f64 - exact).abs() / ulp
    }

    fn sweep(lo: f32, hi: f32, n: usize) -> impl Iterator<Item = f32> {
        (0..=n).map(move |i| lo + (hi - lo) * i as f32 / n as f32)
    }

    #[test]
    fn exp_is_within_one_and_a_half_ulp_over_the_whole_range_and_saturates_beyond() {
        let mut worst = 0.0f64;
        for x in sweep(-87.0, 88.0, 400_000) {
            worst = worst.max(ulps(exp_f32(x), (x as f64).exp()));
        }
        assert!(worst <= 1.5, "worst error {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn tanh_is_within_two_ulp_near_zero_and_far_from_it() {
        let mut worst = 0.0f64;
        for x in sweep(-12.0, 12.0, 400_001).chain(sweep(-1e-3, 1e-3, 10_001)) {
            let exact = (x as f64).tanh();
            // Near 0 an ulp of tanh is tiny; measure there relative to tanh itself.
            worst = worst.max(ulps(tanh_f32(x), exact));
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(tanh_f32(0.0), 0.0);
        assert_eq!(tanh_f32(50.0), 1.0);
        assert_eq!(tanh_f32(-50.0), -1.0);
        assert_eq!(tanh_f32(f32::INFINITY), 1.0);
    }

    #[test]
    fn reductions_equal_a_plain_f64_sum_on_every_path() {
        let mut rng = crate::nn::rng::Rng::new(7);
        for n in [0, 1, 31, 32, 33, 100, 1000] {
            let a: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let exact: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let sum_exact: f64 = a.iter().map(|&x| x as f64 * x as f64).sum();
            let max_exact = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for isa in Isa::supported_all() {
                let d = isa.run(|isa| dot(isa, &a, &b));
                assert!(
                    (d as f64 - exact).abs() < 1e-4 * (1.0 + n as f64),
                    "{isa:?} n={n}"
                );
                let s = isa.run(|_| sum_map(&a, |x| x * x));
                assert!((s as f64 - sum_exact).abs() < 1e-4 * (1.0 + sum_exact));
                assert_eq!(isa.run(|_| max(&a)), max_exact);
            }
        }
    }
}
