//! Launch sizes of the linear experts' forward (kernels/experts.cu; the router's are in
//! router.rs, the backward's in experts_backward.rs). Deterministic (no float atomics). Used by
//! both drivers, so nothing here depends on the emulator.
//!
//! The forward is one fused launch, `experts_forward`: one warp a token, x and y in registers,
//! the pool rows gathered several at a time, nothing [tokens, C, k, d] in device memory; it
//! moves exactly `experts_forward_bytes`.

use super::{constant, per_row, LaunchDims};
use crate::nn::backend::{ExpertMode, ExpertShape};
use std::sync::LazyLock;

static EXPERT_WARPS: LazyLock<u32> = LazyLock::new(|| constant("EXPERT_WARPS"));
static EXPERT_MAX_D: LazyLock<u32> = LazyLock::new(|| constant("EXPERT_MAX_D"));
static EXPERT_MAX_K: LazyLock<u32> = LazyLock::new(|| constant("EXPERT_MAX_K"));

/// The `mode` argument of the expert kernels.
pub fn expert_mode_arg(mode: ExpertMode) -> i32 {
    match mode {
        ExpertMode::GatedLinear => 0,
        ExpertMode::GatedGelu => 1,
        ExpertMode::PeerSoftmaxGelu => 2,
    }
}

/// `experts_forward(x, scores, indices, u, v, a, w, y, tokens, d, channels, k, channel_stride,
/// mode)`: one warp a token, EXPERT_WARPS warps a block (grid-stride past the cap), no shared
/// memory. Right for the shapes `check_shape` takes.
pub fn experts_forward_dims(tokens: usize) -> LaunchDims {
    let warps = *EXPERT_WARPS as usize;
    per_row(tokens.div_ceil(warps), 32 * warps as u32, 0)
}

/// Whether `experts_forward` takes the shape (each lane holds d / 32 elements of x and y and
/// k / 32 slots of a channel in registers); the error says why not.
pub fn check_shape(s: ExpertShape) -> Result<(), String> {
    let (max_d, max_k) = (*EXPERT_MAX_D as usize, *EXPERT_MAX_K as usize);
    if s.d > max_d {
        Err(format!(
            "experts forward: d = {} is above the kernel's most, {max_d} (EXPERT_MAX_D)",
            s.d
        ))
    } else if s.k > max_k {
        Err(format!(
            "experts forward: k = {} is above the kernel's most, {max_k} (EXPERT_MAX_K)",
            s.k
        ))
    } else {
        Ok(())
    }
}

/// The global-memory bytes (read, written) of one `experts_forward` launch, each value moved
/// once: P = tokens * C * k slots read a u and a v row (f32) and their index and score, x is
/// read and y written once, a (and PEER's w) written once a slot.
pub fn experts_forward_bytes(tokens: usize, s: ExpertShape, mode: ExpertMode) -> (u64, u64) {
    let (t, d) = (tokens as u64, s.d as u64);
    let p = t * (s.channels * s.k) as u64;
    let read = p * 2 * d * 4 + t * d * 4 + p * (4 + 4);
    let saved = if mode == ExpertMode::PeerSoftmaxGelu {
        2
    } else {
        1
    };
    (read, t * d * 4 + p * 4 * saved)
}

#[cfg(all(test, feature = "cuda-emu"))]
mod tests {
    use super::*;
    use crate::nn::backend::ProductKeyShape;
    use crate::nn::cpu::experts::experts_forward;
    use crate::nn::cpu::Isa;
    use crate::nn::cuda::emu::{Arg, Traffic};
    use crate::nn::cuda::experts_backward::slot_rows;
    use crate::nn::cuda::kernel_constant;
    use crate::nn::cuda::router::tests::{router_logits, topk_reference};
    use crate::nn::cuda::testing::{below, bits, close, go, grids, randn, scales, spread};
    use crate::nn::rng::{fresh_seed, Rng};

    /// Indices of three kinds: the router's (distinct within a channel; the logits have ties);
    /// every token the same experts; uniform with repeats within a channel.
    fn expert_indices(rng: &mut Rng, kind: usize, tokens: usize, s: ProductKeyShape) -> Vec<u32> {
        let n_exp = s.sqrt_n * s.sqrt_n;
        let slots = s.slots_per_token();
        match kind {
            0 => topk_reference(s, &router_logits(rng, 1, tokens, s.logits_per_token())).1,
            1 => topk_reference(s, &router_logits(rng, 0, 1, s.logits_per_token()))
                .1
                .repeat(tokens),
            _ => (0..tokens * slots).map(|_| below(rng, n_exp)).collect(),
        }
    }

    /// Without tanh and exp, and with the twin's fused multiply-adds, the kernels do the twin's
    /// very operations: the same bits.
    fn exact(mode: ExpertMode) -> bool {
        mode == ExpertMode::GatedLinear && Isa::current() >= Isa::Avx2
    }

    /// One `experts_forward` launch: (y, a, w, traffic), every output starting as NaN.
    #[allow(clippy::too_many_arguments)]
    fn forward_kernel(
        s: ExpertShape,
        mode: ExpertMode,
        tokens: usize,
        x: &[f32],
        g: &[f32],
        indices: &[u32],
        u: &[f32],
        v: &[f32],
        dims: LaunchDims,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Traffic) {
        let n = indices.len();
        let (mut a, mut w) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        let mut y = vec![f32::NAN; tokens * s.d];
        let i32_ = |v: usize| Arg::I32(v as i32);
        let traffic = go(
            "experts_forward",
            dims,
            &mut [
                Arg::slice(x),
                Arg::slice(g),
                Arg::slice(indices),
                Arg::slice(u),
                Arg::slice(v),
                Arg::slice_mut(&mut a),
                Arg::slice_mut(&mut w),
                Arg::slice_mut(&mut y),
                i32_(tokens),
                i32_(s.d),
                i32_(s.channels),
                i32_(s.k),
                i32_(s.channel_stride),
                Arg::I32(expert_mode_arg(mode)),
            ],
        );
        (y, a, w, traffic)
    }

    /// The forward kernel against its twin on the launch function's grid, one block and two
    /// blocks (grid-stride): y and a within `close` of the twin's (bitwise in GatedLinear), w
    /// too for PEER (left alone otherwise), the same bits on every grid, and exactly
    /// `experts_forward_bytes` moved. Returns the twin's saved (a, coef, w).
    #[allow(clippy::too_many_arguments)]
    fn check_forward(
        s: ExpertShape,
        mode: ExpertMode,
        tokens: usize,
        x: &[f32],
        g: &[f32],
        indices: &[u32],
        u: &[f32],
        v: &[f32],
        case: &str,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (d, slots) = (s.d, s.channels * s.k);
        let n = indices.len();
        let (mut a_w, mut coef_w, mut w_w) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let mut y_w = vec![0.0; tokens * d];
        experts_forward(
            s,
            mode,
            x,
            g,
            indices,
            u,
            v,
            &mut a_w,
            &mut coef_w,
            &mut w_w,
            &mut y_w,
        );
        // Only the coefficients' scale is used (dy stands in for the backward's).
        let sc = scales(s, mode, x, g, &slot_rows(s, indices), u, v, &w_w, x);
        let row = |j: usize| (j % slots / s.k) * s.channel_stride + indices[j] as usize;
        let y_scale = spread(&vec![0.0; tokens * d], &sc.coef, v, d, |j| j / slots, row);
        let a_scale: Vec<f32> = (0..n)
            .map(|j| {
                (0..d)
                    .map(|i| (u[row(j) * d + i] * x[j / slots * d + i]).abs())
                    .sum()
            })
            .collect();
        let dims = experts_forward_dims(tokens);
        let mut one = dims;
        one.grid[0] = 1;
        let mut runs = Vec::new();
        for dims in [dims, one]
            .into_iter()
            .chain(grids(dims).into_iter().skip(1))
        {
            let (y, a, w, traffic) = forward_kernel(s, mode, tokens, x, g, indices, u, v, dims);
            close(&a, &a_w, &a_scale, &format!("a {case}"));
            close(&y, &y_w, &y_scale, &format!("y {case}"));
            if exact(mode) {
                assert_eq!(bits(&a), bits(&a_w), "a bitwise {case}");
                assert_eq!(bits(&y), bits(&y_w), "y bitwise {case}");
            }
            if mode == ExpertMode::PeerSoftmaxGelu {
                close(&w, &w_w, &vec![0.0; n], &format!("w {case}"));
            } else {
                // Only PEER has softmax weights; the others leave w alone, as the twin.
                assert!(w.iter().all(|v| v.is_nan()), "w written {case}");
            }
            let (read, written) = experts_forward_bytes(tokens, s, mode);
            assert_eq!(
                (traffic.read_bytes, traffic.written_bytes),
                (read, written),
                "traffic (read, written) {case} on {dims:?}"
            );
            runs.push((bits(&y), bits(&a), bits(&w)));
        }
        assert!(runs.windows(2).all(|p| p[0] == p[1]), "grids differ {case}");
        (a_w, coef_w, w_w)
    }

    /// The forward at the awkward shapes: every mode, d and k (k = 33: more slots than a warp
    /// has lanes), with tokens, channels, both pool layouts, the kinds of indices (the
    /// router's, every token the same experts, repeats within a channel) and of scores (normal,
    /// all negative) taking turns.
    #[test]
    fn experts_forward_equals_its_twin_at_awkward_shapes() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        let modes = [
            ExpertMode::GatedLinear,
            ExpertMode::GatedGelu,
            ExpertMode::PeerSoftmaxGelu,
        ];
        let mut case_no = 0usize;
        for mode in modes {
            for d in [1, 7, 33, 130, 1024] {
                for k in [1, 3, 8, 33] {
                    for turn in 0..2 {
                        case_no += 1;
                        let tokens = [1, 5, 33][case_no % 3];
                        // Never the largest of all at once: the emulator counts every access.
                        let channels = if d == 1024 && tokens == 33 && k == 33 {
                            3
                        } else {
                            [1, 3, 16][case_no / 3 % 3]
                        };
                        let sqrt_n = if k > 9 { 6 } else { 3 };
                        let n_exp = sqrt_n * sqrt_n;
                        let stride = [n_exp, 0][turn];
                        let kind = case_no / 2 % 3;
                        let negative = case_no % 4 == 1;
                        let s = ExpertShape {
                            d,
                            channels,
                            k,
                            channel_stride: stride,
                            pool_rows: if stride == 0 { n_exp } else { channels * n_exp },
                        };
                        let ps = ProductKeyShape {
                            channels,
                            sqrt_n,
                            k,
                        };
                        let case = format!(
                            "seed {seed}, {mode:?}, tokens {tokens}, d {d}, channels \
                             {channels}, N {n_exp}, k {k}, stride {stride}, indices kind \
                             {kind}, negative scores {negative}"
                        );
                        let indices = expert_indices(&mut rng, kind, tokens, ps);
                        let x = randn(&mut rng, tokens * d, 1.0);
                        let mut g = randn(&mut rng, indices.len(), 1.0);
                        if negative {
                            g.iter_mut().for_each(|v| *v = -v.abs() - 0.01);
                        }
                        let u = randn(&mut rng, s.pool_rows * d, 1.0);
                        let v = randn(&mut rng, s.pool_rows * d, 1.0);
                        check_forward(s, mode, tokens, &x, &g, &indices, &u, &v, &case);
                    }
                }
            }
        }
    }

    /// The bytes of one launch are the formula's, which the traffic report uses: every u and v
    /// row once a slot, x and y once, index, score and saved a (and w) once a slot.
    #[test]
    fn experts_forward_moves_exactly_the_formula_bytes() {
        let s = ExpertShape {
            d: 64,
            channels: 4,
            k: 8,
            channel_stride: 16,
            pool_rows: 64,
        };
        let (t, p) = (9u64, 9 * 4 * 8u64);
        let lin = experts_forward_bytes(9, s, ExpertMode::GatedLinear);
        // u and v rows, x, index and score; y and a.
        assert_eq!(
            lin,
            (
                p * 2 * 64 * 4 + t * 64 * 4 + p * (4 + 4),
                t * 64 * 4 + p * 4
            )
        );
        let peer = experts_forward_bytes(9, s, ExpertMode::PeerSoftmaxGelu);
        assert_eq!(peer, (lin.0, lin.1 + p * 4));
        let mut rng = Rng::new(fresh_seed());
        let indices: Vec<u32> = (0..p).map(|_| below(&mut rng, 16)).collect();
        let x = randn(&mut rng, 9 * 64, 1.0);
        let g = randn(&mut rng, p as usize, 1.0);
        let u = randn(&mut rng, 64 * 64, 1.0);
        for mode in [ExpertMode::GatedGelu, ExpertMode::PeerSoftmaxGelu] {
            let dims = experts_forward_dims(9);
            let traffic = forward_kernel(s, mode, 9, &x, &g, &indices, &u, &u, dims).3;
            assert_eq!(
                (traffic.read_bytes, traffic.written_bytes),
                experts_forward_bytes(9, s, mode),
                "{mode:?}"
            );
        }
    }

    /// A shape the forward or backward kernels cannot hold is a failed op with a clear message,
    /// not a panic.
    #[test]
    fn experts_beyond_their_most_d_or_k_are_a_clear_error() {
        use crate::nn::backend::{Backend, Buf, ExpertsGrads, ExpertsSaved, ExpertsSavedRef, Pool};
        use crate::nn::cuda::backend::CudaBackend;
        use crate::nn::cuda::emu::EmuDriver;
        use std::sync::Arc;
        let be: Arc<dyn Backend> = Arc::new(CudaBackend::new(Arc::new(EmuDriver::new(true))));
        let most = |name: &str| kernel_constant(name).unwrap() as usize;
        let (max_d, max_k) = (most("EXPERT_MAX_D"), most("EXPERT_MAX_K"));
        let max_bwd_d = most("EXPERT_BACKWARD_MAX_D");
        // (pass, d, k, what the error names)
        for (backward, d, k, want) in [
            (
                false,
                max_d + 1,
                1,
                format!("experts forward: d = {} is above", max_d + 1),
            ),
            (
                false,
                max_d,
                max_k + 1,
                format!("experts forward: k = {} is above", max_k + 1),
            ),
            (
                true,
                max_bwd_d + 1,
                1,
                format!("experts backward: d = {} is above", max_bwd_d + 1),
            ),
        ] {
            let s = ExpertShape {
                d,
                channels: 1,
                k,
                channel_stride: 0,
                pool_rows: 1,
            };
            let buf = |n: usize| Buf::<f32>::zeros(&be, n).unwrap();
            let (x, g, u, v, dy) = (buf(d), buf(k), buf(d), buf(d), buf(d));
            let (mut a, mut coef, mut w, mut y) = (buf(k), buf(k), buf(k), buf(d));
            let (mut ds, mut da, mut du, mut dv) = (buf(k), buf(k), buf(d), buf(d));
            let indices = Buf::<u32>::zeros(&be, k).unwrap();
            let pool = Pool::F32 {
                u: u.view(),
                v: v.view(),
            };
            if backward {
                be.experts_backward(
                    s,
                    ExpertMode::GatedLinear,
                    x.view(),
                    g.view(),
                    indices.view(),
                    pool,
                    ExpertsSavedRef {
                        a: a.view(),
                        coef: coef.view(),
                        w: w.view(),
                    },
                    dy.view(),
                    ds.view_mut(),
                    da.view_mut(),
                    ExpertsGrads {
                        dx: y.view_mut(),
                        du: du.view_mut(),
                        dv: dv.view_mut(),
                    },
                );
            } else {
                be.experts_forward(
                    s,
                    ExpertMode::GatedLinear,
                    x.view(),
                    g.view(),
                    indices.view(),
                    pool,
                    ExpertsSaved {
                        a: a.view_mut(),
                        coef: coef.view_mut(),
                        w: w.view_mut(),
                    },
                    y.view_mut(),
                );
            }
            let err = be.take_error().expect("the op fails");
            assert!(err.contains(&want), "{err}");
        }
    }

    #[test]
    fn grids_stay_valid_for_large_shapes() {
        for tokens in [0, 1, 9, 1 << 20] {
            let d = experts_forward_dims(tokens);
            assert!((1..=i32::MAX as u32).contains(&d.grid[0]), "{d:?}");
            assert!(d.grid[1] == 1 && d.grid[2] == 1, "{d:?}");
            // Whole warps: each warp takes a token's whole dot products.
            assert!(d.block[0] <= 1024 && d.block[0].is_multiple_of(32), "{d:?}");
        }
        assert_eq!(
            experts_forward_dims(9).grid[0],
            9usize.div_ceil(experts_forward_dims(1).block[0] as usize / 32) as u32
        );
    }
}
