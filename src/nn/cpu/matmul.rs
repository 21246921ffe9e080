//! Matrix products through the `gemm` crate (rayon-parallel above a size threshold).

use super::real::Real;

/// A strided matrix view: element (i, j) lives at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
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
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
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
}

/// Like `gemm_strided`, single-threaded, writing through a raw pointer so that concurrent tasks
/// can fill disjoint strided blocks of one buffer.
///
/// # Safety
/// `c` must be valid for writes at every (i, j) < (m, n) position, and no other thread may
/// touch those elements during the call; a and b must be in bounds.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_into_ptr<T: Real>(
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
        gemm::Parallelism::None,
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
