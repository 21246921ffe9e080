//! Launch sizes of the linear experts (kernels/experts.cu), and the scratch the experts'
//! backward needs (the router's are in router.rs). First, simple kernels: correct and
//! deterministic (no float atomics), not fast. Used by both drivers, so nothing
//! here depends on the emulator.
//!
//! The backward of the experts is three launches: `experts_backward_token` (dscores, da, dx;
//! one block a token), `experts_slot_order` (the slots grouped by pool row, a stable counting
//! sort by one block, into the scratch), `experts_backward_pool` (du, dv; one block a pool row,
//! its slots in token order, as the CPU twin).

use super::{constant, dims, per_row, LaunchDims};
use crate::nn::backend::{ExpertMode, ExpertShape};
use std::sync::LazyLock;

static EXPERT_BLOCK: LazyLock<u32> = LazyLock::new(|| constant("EXPERT_BLOCK"));
static EXPERT_SORT_BLOCK: LazyLock<u32> = LazyLock::new(|| constant("EXPERT_SORT_BLOCK"));

/// The `mode` argument of the expert kernels.
pub fn expert_mode_arg(mode: ExpertMode) -> i32 {
    match mode {
        ExpertMode::GatedLinear => 0,
        ExpertMode::GatedGelu => 1,
        ExpertMode::PeerSoftmaxGelu => 2,
    }
}

/// `experts_forward(x, scores, indices, u, v, a, coef, w, y, tokens, d, channels, k,
/// channel_stride, mode)` and `experts_backward_token(scores, indices, u, v, a, w, dy, dscores,
/// da, dx, tokens, d, channels, k, channel_stride, mode)`: one block a token, two floats of
/// shared memory a slot (channels * k of them: at most 6144 in the default 48 KiB).
pub fn experts_token_dims(tokens: usize, s: ExpertShape) -> LaunchDims {
    per_row(tokens, *EXPERT_BLOCK, 8 * s.channels * s.k)
}

/// `experts_slot_order(indices, ends, order, tokens, channels, k, channel_stride, pool_rows)`:
/// one block.
pub fn experts_slot_order_dims() -> LaunchDims {
    dims(1, 1, *EXPERT_SORT_BLOCK, 0)
}

/// `experts_backward_pool(x, dy, da, coef, ends, order, du, dv, pool_rows, channels * k, d)`:
/// one block a pool row.
pub fn experts_backward_pool_dims(s: ExpertShape) -> LaunchDims {
    per_row(s.pool_rows, *EXPERT_BLOCK, 0)
}

/// Where the experts' backward keeps its slot order in its scratch buffer: `ends` (u32,
/// `pool_rows` of them) at byte 0 and `order` (u32, one a slot: tokens * channels * k) at byte
/// `order_offset`; `bytes` in all. Neither needs initialising.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertScratch {
    pub ends_len: usize,
    pub order_offset: usize,
    pub order_len: usize,
    pub bytes: usize,
}

pub fn experts_backward_scratch(tokens: usize, s: ExpertShape) -> ExpertScratch {
    let slots = tokens * s.channels * s.k;
    assert!(
        slots <= u32::MAX as usize && s.pool_rows <= i32::MAX as usize,
        "the slot order indexes with u32"
    );
    ExpertScratch {
        ends_len: s.pool_rows,
        order_offset: 4 * s.pool_rows,
        order_len: slots,
        bytes: 4 * (s.pool_rows + slots),
    }
}

#[cfg(all(test, feature = "cuda-emu"))]
mod tests {
    use super::*;
    use crate::nn::backend::ProductKeyShape;
    use crate::nn::cpu::experts::{experts_backward, experts_forward, SlotOrder};
    use crate::nn::cpu::Isa;
    use crate::nn::cuda::emu::Arg;
    use crate::nn::cuda::router::tests::{router_logits, topk_reference};
    use crate::nn::cuda::testing::{below, bits, close, go, grids, randn};
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

    /// The slots grouped by pool row, in slot order within a row, and each row's end.
    fn slot_order_reference(s: ExpertShape, indices: &[u32]) -> (Vec<u32>, Vec<u32>) {
        let slots = s.channels * s.k;
        let row = |j: usize| (j % slots / s.k) * s.channel_stride + indices[j] as usize;
        let mut order: Vec<u32> = (0..indices.len() as u32).collect();
        order.sort_by_key(|&j| row(j as usize));
        let ends = (0..s.pool_rows)
            .map(|r| (0..indices.len()).filter(|&j| row(j) <= r).count() as u32)
            .collect();
        (order, ends)
    }

    struct Scales {
        coef: Vec<f32>,
        ds: Vec<f32>,
        da: Vec<f32>,
    }

    /// The magnitudes each slot's results are made of (see `close`): A = Σ|u·x|, D = Σ|v·dy|,
    /// and the factors around them (|gelu| <= |z|, |gelu'| < 1.2, |gelu''| < 1).
    #[allow(clippy::too_many_arguments)]
    fn scales(
        s: ExpertShape,
        mode: ExpertMode,
        x: &[f32],
        g: &[f32],
        indices: &[u32],
        u: &[f32],
        v: &[f32],
        w: &[f32],
        dy: &[f32],
    ) -> Scales {
        let (d, slots) = (s.d, s.channels * s.k);
        let n = indices.len();
        let (mut coef, mut ds, mut da) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let mut wide = vec![0.0f32; n];
        for j in 0..n {
            let t = j / slots;
            let row = (j % slots / s.k) * s.channel_stride + indices[j] as usize;
            let mag = |p: &[f32], q: &[f32]| -> f32 {
                (0..d).map(|i| (p[row * d + i] * q[t * d + i]).abs()).sum()
            };
            let (a, dd, gj) = (mag(u, x), mag(v, dy), g[j].abs());
            match mode {
                ExpertMode::GatedLinear => {
                    coef[j] = gj * a;
                    ds[j] = dd * a;
                    da[j] = dd * gj;
                }
                ExpertMode::GatedGelu => {
                    coef[j] = 1.2 * gj * a;
                    let dpre = dd * (1.2 + gj * a);
                    ds[j] = dpre * a;
                    da[j] = dpre * gj;
                }
                ExpertMode::PeerSoftmaxGelu => {
                    coef[j] = 1.2 * a * w[j];
                    wide[j] = dd * 1.2 * a;
                    da[j] = dd * w[j] * (1.2 + a);
                }
            }
        }
        if mode == ExpertMode::PeerSoftmaxGelu {
            for c0 in (0..n).step_by(s.k) {
                let sum: f32 = (c0..c0 + s.k).map(|i| wide[i] * w[i]).sum();
                for j in c0..c0 + s.k {
                    ds[j] = w[j] * (wide[j] + sum);
                }
            }
        }
        Scales { coef, ds, da }
    }

    /// out[t or row, i] = |start| + Σ over slots of scale[slot] · |m[row or t, i]|.
    fn spread(
        start: &[f32],
        per_slot: &[f32],
        m: &[f32],
        d: usize,
        out_row: impl Fn(usize) -> usize,
        in_row: impl Fn(usize) -> usize,
    ) -> Vec<f32> {
        let mut out: Vec<f32> = start.iter().map(|v| v.abs()).collect();
        for (j, &sj) in per_slot.iter().enumerate() {
            let (o, r) = (out_row(j), in_row(j));
            for i in 0..d {
                out[o * d + i] += sj * m[r * d + i].abs();
            }
        }
        out
    }

    #[test]
    fn experts_equal_their_twin_in_every_mode_and_backward_is_deterministic() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        let modes = [
            ExpertMode::GatedLinear,
            ExpertMode::GatedGelu,
            ExpertMode::PeerSoftmaxGelu,
        ];
        // Every tokens x sqrt_n x k, each in all modes and both pool layouts; channels, d and
        // the kind of indices take turns (the full product costs minutes in the emulator).
        let (mut case_no, mut group) = (0usize, 0usize);
        for tokens in [1, 3, 17] {
            for sqrt_n in [2, 3, 5] {
                let mut ks = vec![1, 2, 3, sqrt_n * sqrt_n];
                ks.dedup();
                for k in ks {
                    group += 1;
                    let channels = [1, 3][group % 2];
                    let n_exp = sqrt_n * sqrt_n;
                    let ps = ProductKeyShape {
                        channels,
                        sqrt_n,
                        k,
                    };
                    for (mi, &mode) in modes.iter().enumerate() {
                        for stride in [n_exp, 0] {
                            case_no += 1;
                            let d = [1, 5, 33][(case_no + mi) % 3];
                            let kind = (case_no / 3) % 3;
                            let s = ExpertShape {
                                d,
                                channels,
                                k,
                                channel_stride: stride,
                                pool_rows: if stride == 0 { n_exp } else { channels * n_exp },
                            };
                            let case = format!(
                                "seed {seed}, {mode:?}, tokens {tokens}, d {d}, channels \
                                     {channels}, N {n_exp}, k {k}, stride {stride}, indices \
                                     kind {kind}"
                            );
                            experts_case(&mut rng, s, mode, tokens, ps, kind, &case);
                        }
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn experts_case(
        rng: &mut Rng,
        s: ExpertShape,
        mode: ExpertMode,
        tokens: usize,
        ps: ProductKeyShape,
        kind: usize,
        case: &str,
    ) {
        let (d, slots) = (s.d, s.channels * s.k);
        let n = tokens * slots;
        let indices = expert_indices(rng, kind, tokens, ps);
        let x = randn(rng, tokens * d, 1.0);
        let g = randn(rng, n, 1.0);
        let u = randn(rng, s.pool_rows * d, 1.0);
        let v = randn(rng, s.pool_rows * d, 1.0);
        let dy = randn(rng, tokens * d, 1.0);
        let peer = mode == ExpertMode::PeerSoftmaxGelu;
        // Without tanh and exp, and with the twin's fused multiply-adds, the kernels do the
        // twin's very operations: the same bits.
        let exact = mode == ExpertMode::GatedLinear && Isa::current() >= Isa::Avx2;
        let same = |got: &[f32], want: &[f32], what: &str| {
            if exact {
                assert_eq!(bits(got), bits(want), "{what} bitwise {case}");
            }
        };
        let i32_ = |v: usize| Arg::I32(v as i32);

        // Forward.
        let (mut a_w, mut coef_w, mut w_w) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let mut y_w = vec![0.0; tokens * d];
        experts_forward(
            s,
            mode,
            &x,
            &g,
            &indices,
            &u,
            &v,
            &mut a_w,
            &mut coef_w,
            &mut w_w,
            &mut y_w,
        );
        let sc = scales(s, mode, &x, &g, &indices, &u, &v, &w_w, &dy);
        let row = |j: usize| (j % slots / s.k) * s.channel_stride + indices[j] as usize;
        let y_scale = spread(&vec![0.0; tokens * d], &sc.coef, &v, d, |j| j / slots, row);
        let a_scale: Vec<f32> = (0..n)
            .map(|j| {
                (0..d)
                    .map(|i| (u[row(j) * d + i] * x[j / slots * d + i]).abs())
                    .sum()
            })
            .collect();
        let mut runs = Vec::new();
        for dims in grids(experts_token_dims(tokens, s)) {
            let (mut a, mut coef, mut w) =
                (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
            let mut y = vec![f32::NAN; tokens * d];
            go(
                "experts_forward",
                dims,
                &mut [
                    Arg::slice(&x),
                    Arg::slice(&g),
                    Arg::slice(&indices),
                    Arg::slice(&u),
                    Arg::slice(&v),
                    Arg::slice_mut(&mut a),
                    Arg::slice_mut(&mut coef),
                    Arg::slice_mut(&mut w),
                    Arg::slice_mut(&mut y),
                    i32_(tokens),
                    i32_(d),
                    i32_(s.channels),
                    i32_(s.k),
                    i32_(s.channel_stride),
                    Arg::I32(expert_mode_arg(mode)),
                ],
            );
            close(&a, &a_w, &a_scale, &format!("a {case}"));
            close(&coef, &coef_w, &sc.coef, &format!("coef {case}"));
            close(&y, &y_w, &y_scale, &format!("y {case}"));
            same(&a, &a_w, "a");
            same(&coef, &coef_w, "coef");
            same(&y, &y_w, "y");
            if peer {
                close(&w, &w_w, &vec![0.0; n], &format!("w {case}"));
            } else {
                // Only PEER has softmax weights; the others leave w alone, as the twin.
                assert!(w.iter().all(|v| v.is_nan()), "w written {case}");
            }
            runs.push((bits(&y), bits(&a), bits(&coef), bits(&w)));
        }
        assert_eq!(runs[0], runs[1], "forward twice {case}");

        // Backward, from the twin's saved tensors, adding into nonzero dx, du, dv.
        let (dx0, du0, dv0) = (
            randn(rng, tokens * d, 1.0),
            randn(rng, s.pool_rows * d, 1.0),
            randn(rng, s.pool_rows * d, 1.0),
        );
        let (mut ds_w, mut da_w) = (vec![0.0; n], vec![0.0; n]);
        let (mut dx_w, mut du_w, mut dv_w) = (dx0.clone(), du0.clone(), dv0.clone());
        experts_backward(
            s,
            mode,
            &x,
            &g,
            &indices,
            &u,
            &v,
            &a_w,
            &coef_w,
            &w_w,
            &dy,
            &mut ds_w,
            &mut da_w,
            &mut dx_w,
            &mut du_w,
            &mut dv_w,
            &mut SlotOrder::default(),
        );
        let dx_scale = spread(&dx0, &sc.da, &u, d, |j| j / slots, row);
        let du_scale = spread(&du0, &sc.da, &x, d, row, |j| j / slots);
        let dv_scale = spread(&dv0, &sc.coef, &dy, d, row, |j| j / slots);
        let (order_r, ends_r) = slot_order_reference(s, &indices);
        let scratch = experts_backward_scratch(tokens, s);
        assert_eq!((scratch.ends_len, scratch.order_len), (s.pool_rows, n));
        let mut runs = Vec::new();
        for (dims, pool_dims) in grids(experts_token_dims(tokens, s))
            .into_iter()
            .zip(grids(experts_backward_pool_dims(s)))
        {
            let (mut ds, mut da) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            let (mut dx, mut du, mut dv) = (dx0.clone(), du0.clone(), dv0.clone());
            go(
                "experts_backward_token",
                dims,
                &mut [
                    Arg::slice(&g),
                    Arg::slice(&indices),
                    Arg::slice(&u),
                    Arg::slice(&v),
                    Arg::slice(&a_w),
                    Arg::slice(&w_w),
                    Arg::slice(&dy),
                    Arg::slice_mut(&mut ds),
                    Arg::slice_mut(&mut da),
                    Arg::slice_mut(&mut dx),
                    i32_(tokens),
                    i32_(d),
                    i32_(s.channels),
                    i32_(s.k),
                    i32_(s.channel_stride),
                    Arg::I32(expert_mode_arg(mode)),
                ],
            );
            // The scratch starts as garbage: the sort initialises what it uses.
            let mut scratch_buf = vec![0xdead_beefu32; scratch.bytes / 4];
            let (ends, order) = scratch_buf.split_at_mut(scratch.order_offset / 4);
            go(
                "experts_slot_order",
                experts_slot_order_dims(),
                &mut [
                    Arg::slice(&indices),
                    Arg::slice_mut(ends),
                    Arg::slice_mut(order),
                    i32_(tokens),
                    i32_(s.channels),
                    i32_(s.k),
                    i32_(s.channel_stride),
                    i32_(s.pool_rows),
                ],
            );
            assert_eq!(ends, &ends_r[..], "ends {case}");
            assert_eq!(order, &order_r[..], "order {case}");
            go(
                "experts_backward_pool",
                pool_dims,
                &mut [
                    Arg::slice(&x),
                    Arg::slice(&dy),
                    Arg::slice(&da),
                    Arg::slice(&coef_w),
                    Arg::slice(ends),
                    Arg::slice(order),
                    Arg::slice_mut(&mut du),
                    Arg::slice_mut(&mut dv),
                    i32_(s.pool_rows),
                    i32_(slots),
                    i32_(d),
                ],
            );
            close(&ds, &ds_w, &sc.ds, &format!("dscores {case}"));
            close(&da, &da_w, &sc.da, &format!("da {case}"));
            close(&dx, &dx_w, &dx_scale, &format!("dx {case}"));
            close(&du, &du_w, &du_scale, &format!("du {case}"));
            close(&dv, &dv_w, &dv_scale, &format!("dv {case}"));
            same(&ds, &ds_w, "dscores");
            same(&da, &da_w, "da");
            same(&dx, &dx_w, "dx");
            same(&du, &du_w, "du");
            same(&dv, &dv_w, "dv");
            runs.push([ds, da, dx, du, dv].map(|t| bits(&t)));
        }
        assert_eq!(runs[0], runs[1], "backward twice {case}");
    }

    #[test]
    fn grids_stay_valid_for_large_shapes() {
        let es = ExpertShape {
            d: 768,
            channels: 16,
            k: 8,
            channel_stride: 7744,
            pool_rows: 16 * 7744,
        };
        let tokens = 1 << 20;
        let big = [
            experts_token_dims(tokens, es),
            experts_slot_order_dims(),
            experts_backward_pool_dims(es),
            experts_token_dims(0, es),
        ];
        for d in big {
            assert!((1..=i32::MAX as u32).contains(&d.grid[0]), "{d:?}");
            assert!(d.grid[1] == 1 && d.grid[2] == 1, "{d:?}");
            assert!(d.block[0] <= 1024 && d.shared_bytes <= 48 << 10, "{d:?}");
        }
        // Whole warps: the expert kernels give each warp whole dot products.
        assert_eq!(experts_token_dims(1, es).block[0] % 32, 0);
        assert_eq!(experts_slot_order_dims().grid[0], 1);
        let scratch = experts_backward_scratch(3, es);
        assert_eq!(scratch.bytes, 4 * (16 * 7744 + 3 * 16 * 8));
        assert_eq!(scratch.order_offset, 4 * 16 * 7744);
    }
}
