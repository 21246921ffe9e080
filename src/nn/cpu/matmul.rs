//! Matrix products through the `gemm` crate (rayon-parallel above a size threshold), with
//! gemm's kernels for this thread's instruction set (`Isa`): gemm's own dispatch takes the
//! widest the CPU has and cannot be capped, so its f32 driver is instantiated here per path.

use super::isa::Isa;
use super::real::Real;
use std::any::TypeId;

/// A strided matrix view: element (i, j) lives at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<T> MatRef<'_, T> {
    /// The transpose: the same elements with the strides swapped.
    pub fn t(self) -> Self {
        MatRef {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// c[m, n] = (accumulate ? c : 0) + a[m, k] · b[k, n], all strided.
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<T>,
    b: MatRef<T>,
    c: &mut [T],
    c_rs: usize,
    c_cs: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(c.len() > last(m, n, c_rs, c_cs), "gemm: output too small");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c[i * c_rs + j * c_cs] = T::ZERO;
                }
            }
        }
        return;
    }
    assert!(a.data.len() > last(m, k, a.rs, a.cs), "gemm: lhs too small");
    assert!(b.data.len() > last(k, n, b.rs, b.cs), "gemm: rhs too small");
    // Small products lose more to thread hand-off than they gain.
    let par = if m * n * k >= 48 * 48 * 48 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: bounds checked above; gemm reads a, b and writes c within those bounds.
    unsafe {
        raw_gemm(
            Isa::current(),
            m,
            n,
            k,
            a,
            b,
            c.as_mut_ptr(),
            c_rs,
            c_cs,
            accumulate,
            par,
        )
    }
}

/// Like `gemm_strided`, single-threaded and on the given instruction set (it runs inside
/// other kernels' parallel tasks), writing through a raw pointer so that concurrent tasks can
/// fill disjoint strided blocks of one buffer.
///
/// # Safety
/// `c` must be valid for writes at every (i, j) < (m, n) position, and no other thread may
/// touch those elements during the call; a and b must be in bounds.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_into_ptr<T: Real>(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<T>,
    b: MatRef<T>,
    c: *mut T,
    c_rs: usize,
    c_cs: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(
        a.data.len() > (m - 1) * a.rs + (k - 1) * a.cs,
        "gemm: lhs too small"
    );
    assert!(
        b.data.len() > (k - 1) * b.rs + (n - 1) * b.cs,
        "gemm: rhs too small"
    );
    raw_gemm(
        isa,
        m,
        n,
        k,
        a,
        b,
        c,
        c_rs,
        c_cs,
        accumulate,
        gemm::Parallelism::None,
    )
}

/// c (+)= a · b through gemm's kernels for `isa` (f32) or gemm's own dispatch (f64,
/// the finite-difference checks).
///
/// # Safety
/// As `gemm::gemm`: a, b in bounds for (m, k) and (k, n), c valid for writes at (m, n).
#[allow(clippy::too_many_arguments)]
unsafe fn raw_gemm<T: Real>(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<T>,
    b: MatRef<T>,
    c: *mut T,
    c_rs: usize,
    c_cs: usize,
    accumulate: bool,
    par: gemm::Parallelism,
) {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        let driver = f32_drivers::for_isa(isa);
        // gemm's tiles want a column-major destination: a row-major one is computed as
        // c^T = b^T a^T, as `gemm::gemm` does before it dispatches.
        let (m, n, a, b, c_rs, c_cs) = if c_cs < c_rs {
            (n, m, b.t(), a.t(), c_cs, c_rs)
        } else {
            (m, n, a, b, c_rs, c_cs)
        };
        driver(
            m,
            n,
            k,
            c as *mut f32,
            c_cs as isize,
            c_rs as isize,
            accumulate,
            a.data.as_ptr() as *const f32,
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr() as *const f32,
            b.cs as isize,
            b.rs as isize,
            par,
        );
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        c,
        c_cs as isize,
        c_rs as isize,
        accumulate,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        T::ONE,
        T::ONE,
        false,
        false,
        false,
        par,
    );
}

/// gemm's f32 driver (`gemm_basic_generic`) bound to one family of its microkernels, as the
/// gemm crate binds them internally; N is the vector width in floats.
mod f32_drivers {
    use gemm_common::simd::MixedSimd;

    macro_rules! driver {
        ($(#[$cfg:meta])* $name:ident, $kernels:ident, $simd:ident, $n:expr) => {
            $(#[$cfg])*
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn $name(
                m: usize,
                n: usize,
                k: usize,
                dst: *mut f32,
                dst_cs: isize,
                dst_rs: isize,
                read_dst: bool,
                lhs: *const f32,
                lhs_cs: isize,
                lhs_rs: isize,
                rhs: *const f32,
                rhs_cs: isize,
                rhs_rs: isize,
                par: gemm::Parallelism,
            ) {
                use gemm_f32::microkernel::$kernels::f32 as uk;
                const N: usize = $n;
                gemm_common::gemm::gemm_basic_generic::<
                    _,
                    f32,
                    N,
                    { uk::MR_DIV_N * N },
                    { uk::NR },
                    { uk::MR_DIV_N },
                    { uk::H_M },
                    { uk::H_N },
                >(
                    <gemm_common::simd::$simd as MixedSimd<f32, f32, f32, f32>>::try_new()
                        .expect("the caller checked the instruction set"),
                    m,
                    n,
                    k,
                    dst,
                    dst_cs,
                    dst_rs,
                    read_dst,
                    lhs,
                    lhs_cs,
                    lhs_rs,
                    rhs,
                    rhs_cs,
                    rhs_rs,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    |a, b, c| a * b + c,
                    &uk::UKR,
                    &uk::H_UKR,
                    false,
                    par,
                )
            }
        };
    }

    pub type Driver = unsafe fn(
        usize,
        usize,
        usize,
        *mut f32,
        isize,
        isize,
        bool,
        *const f32,
        isize,
        isize,
        *const f32,
        isize,
        isize,
        gemm::Parallelism,
    );

    /// The driver of a path (which must be supported).
    pub fn for_isa(isa: super::Isa) -> Driver {
        match isa {
            #[cfg(target_arch = "x86_64")]
            super::Isa::Avx512 => avx512,
            #[cfg(target_arch = "x86_64")]
            super::Isa::Avx2 => avx2,
            _ => scalar,
        }
    }

    driver!(scalar, scalar, Scalar, 1);
    driver!(
        #[cfg(target_arch = "x86_64")]
        avx2,
        fma,
        V3,
        8
    );
    driver!(
        #[cfg(target_arch = "x86_64")]
        avx512,
        avx512f,
        V4,
        16
    );
}

/// c[m, n] (+)= op(a) · op(b) for contiguous row-major operands; `a_t` means `a` is stored
/// as [k, m], `b_t` means `b` is stored as [n, k].
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    a_t: bool,
    b: &[T],
    b_t: bool,
    c: &mut [T],
    accumulate: bool,
) {
    let a = if a_t {
        MatRef {
            data: a,
            rs: 1,
            cs: m,
        }
    } else {
        MatRef {
            data: a,
            rs: k,
            cs: 1,
        }
    };
    let b = if b_t {
        MatRef {
            data: b,
            rs: 1,
            cs: k,
        }
    } else {
        MatRef {
            data: b,
            rs: n,
            cs: 1,
        }
    };
    gemm_strided(m, n, k, a, b, c, n, 1, accumulate);
}
