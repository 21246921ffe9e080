//! Launch sizes, scratch and exact global-memory traffic of the experts' backward
//! (kernels/experts_backward.cu), no float atomics:
//!
//! 1. `experts_bwd_keys`: the pool row of every slot, into the scratch;
//! 2. the slots grouped by pool row, stably: the many-block radix sort of sort.rs
//!    (`CudaBackend::group_by_key`);
//! 3. `experts_bwd_pool`: expert-stationary, one warp a tile of EXPERT_TILE consecutive pairs
//!    of the grouped order (balanced whatever the skew): dscores (PEER: the raw dw), da, and
//!    du, dv of the rows whose run begins in the tile; a row begun in an earlier tile leaves its
//!    piece in the scratch's partial buffer;
//! 4. `experts_bwd_fixup`: adds those pieces into du, dv in tile order;
//! 5. `experts_bwd_token`: one warp a token, dx += Σ da · u[row], and PEER's softmax backward.
//!
//! Rows gathered per pair: x and dy (pass 3) and u (pass 5); v once per row piece.
//! Used by both drivers, so nothing here depends on the emulator.

use super::sort::group_by_key_bytes;
use super::{constant, elementwise_dims, per_row, LaunchDims};
use crate::nn::backend::{ExpertMode, ExpertShape};
use std::sync::LazyLock;

static EXPERT_BLOCK: LazyLock<u32> = LazyLock::new(|| constant("EXPERT_BLOCK"));
static EXPERT_TILE: LazyLock<u32> = LazyLock::new(|| constant("EXPERT_TILE"));
static MAX_D: LazyLock<u32> = LazyLock::new(|| constant("EXPERT_BACKWARD_MAX_D"));

/// Pairs a warp of `experts_bwd_pool` owns (the kernels' `tile` argument).
pub fn expert_tile() -> usize {
    *EXPERT_TILE as usize
}

/// The largest d the backward takes (each lane keeps its share of a row in registers).
pub fn max_d() -> usize {
    *MAX_D as usize
}

/// Whether the backward's kernels take the shape; the error says why not.
pub fn check_shape(s: ExpertShape) -> Result<(), String> {
    if s.d > max_d() {
        return Err(format!(
            "experts backward: d = {} is above the kernels' most, {} (EXPERT_BACKWARD_MAX_D)",
            s.d,
            max_d()
        ));
    }
    Ok(())
}

fn warps_per_block() -> usize {
    (*EXPERT_BLOCK / 32) as usize
}

/// `experts_bwd_keys(indices, keys, n, channels * k, k, channel_stride)`: one thread a slot.
pub fn keys_dims(n: usize) -> LaunchDims {
    elementwise_dims(n)
}

/// `experts_bwd_pool(x, dy, scores, a, w, v, keys, order, ends, dscores, da, du, dv, partial,
/// n, d, channels * k, mode, tile)` and `experts_bwd_fixup(keys, order, ends, partial, du, dv,
/// n, d, tile)`: one warp a tile of `tile` pairs, n pairs.
pub fn pool_dims(n: usize, tile: usize) -> LaunchDims {
    per_row(
        n.div_ceil(tile).div_ceil(warps_per_block()),
        *EXPERT_BLOCK,
        0,
    )
}

/// `experts_bwd_token(u, keys, da, w, dscores, dx, tokens, d, channels, k, mode)`: one warp a
/// token.
pub fn token_dims(tokens: usize) -> LaunchDims {
    per_row(tokens.div_ceil(warps_per_block()), *EXPERT_BLOCK, 0)
}

/// Where the backward keeps its work in one scratch buffer (byte offsets; nothing needs
/// initialising): keys and order (u32, one a slot), ends (u32, one a pool row), and partial
/// (f32, [tiles, 2, d]: a tile's piece of du and dv of its first row when that row began in an
/// earlier tile).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackwardScratch {
    pub n: usize,
    pub tiles: usize,
    pub keys: usize,
    pub order: usize,
    pub ends: usize,
    pub partial: usize,
    pub partial_len: usize,
    pub bytes: usize,
}

pub fn experts_backward_scratch(tokens: usize, s: ExpertShape) -> BackwardScratch {
    scratch_with_tile(tokens, s, expert_tile())
}

pub fn scratch_with_tile(tokens: usize, s: ExpertShape, tile: usize) -> BackwardScratch {
    let n = tokens * s.channels * s.k;
    assert!(
        n <= i32::MAX as usize && s.pool_rows <= i32::MAX as usize,
        "the slot order indexes with u32 and the kernels count slots in an int"
    );
    let tiles = n.div_ceil(tile);
    let partial_len = tiles * 2 * s.d;
    BackwardScratch {
        n,
        tiles,
        keys: 0,
        order: 4 * n,
        ends: 8 * n,
        partial: 8 * n + 4 * s.pool_rows,
        partial_len,
        bytes: 8 * n + 4 * s.pool_rows + 4 * partial_len,
    }
}

/// Global bytes a launch reads and writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bytes {
    pub read: u64,
    pub written: u64,
}

impl std::ops::AddAssign for Bytes {
    fn add_assign(&mut self, o: Bytes) {
        self.read += o.read;
        self.written += o.written;
    }
}

/// The bytes of each launch of the backward, exactly as the kernels move them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackwardBytes {
    pub keys: Bytes,
    pub group: Bytes,
    pub pool: Bytes,
    pub fixup: Bytes,
    pub token: Bytes,
}

impl BackwardBytes {
    pub fn total(&self) -> Bytes {
        let mut t = self.keys;
        for b in [self.group, self.pool, self.fixup, self.token] {
            t += b;
        }
        t
    }
}

/// The pool row of every slot (what `experts_bwd_keys` writes).
pub fn slot_rows(s: ExpertShape, indices: &[u32]) -> Vec<u32> {
    let slots = s.channels * s.k;
    (0..indices.len())
        .map(|j| ((j % slots / s.k) * s.channel_stride + indices[j] as usize) as u32)
        .collect()
}

/// The traffic of the backward's launches for `tokens` tokens whose slots have pool rows
/// `keys` (see `slot_rows`), with tiles of `tile` pairs. The pool pass is data-dependent (rows
/// per tile, rows crossing tiles), hence the keys.
pub fn experts_backward_bytes(
    s: ExpertShape,
    mode: ExpertMode,
    tokens: usize,
    keys: &[u32],
    tile: usize,
) -> BackwardBytes {
    let (d, n) = (s.d as u64, keys.len() as u64);
    let slots = s.channels * s.k;
    assert_eq!(keys.len(), tokens * slots);
    let peer = mode == ExpertMode::PeerSoftmaxGelu;
    let mut out = BackwardBytes {
        keys: Bytes {
            read: 4 * n,
            written: 4 * n,
        },
        ..Default::default()
    };

    let (read, written) = group_by_key_bytes(keys.len(), s.pool_rows);
    out.group = Bytes { read, written };

    // The grouped order's rows, and each row's end in it.
    let mut ends = vec![0u64; s.pool_rows];
    for &r in keys {
        ends[r as usize] += 1;
    }
    for r in 1..s.pool_rows {
        ends[r] += ends[r - 1];
    }
    let begin = |r: usize| if r == 0 { 0 } else { ends[r - 1] };
    let mut sorted = keys.to_vec();
    sorted.sort_unstable();
    let meta = 4 * (4 + peer as u64); // order, keys, scores, a (and w)
    for (ti, t) in sorted.chunks(tile).enumerate() {
        let e0 = (ti * tile) as u64;
        out.pool.read += t.len() as u64 * (meta + 8 * d);
        out.pool.written += t.len() as u64 * 8;
        if t[0] != 0 {
            out.pool.read += 4; // ends[r - 1]: whether the first row began here
        }
        let pieces = 1 + t.windows(2).filter(|p| p[0] != p[1]).count() as u64;
        let owned_first = begin(t[0] as usize) == e0;
        let owned = pieces - 1 + owned_first as u64;
        out.pool.read += pieces * 4 * d + owned * 8 * d;
        out.pool.written += 8 * d * pieces;
        // Fix-up: a tile before the last reads its last pair's row, the row's end and, if it
        // runs past the tile, its begin; the tile where a crossing row begins adds the pieces.
        let e1 = e0 + tile as u64;
        if e1 < n {
            let r = *t.last().unwrap() as usize;
            out.fixup.read += 12;
            if ends[r] > e1 {
                if r != 0 {
                    out.fixup.read += 4;
                }
                if begin(r) >= e0 {
                    let last = (ends[r] - 1) / tile as u64;
                    let later = last - ti as u64;
                    out.fixup.read += 8 * d + later * 8 * d;
                    out.fixup.written += 8 * d;
                }
            }
        }
    }

    // Token pass: dx read and written once, per slot its row, da and the u row; PEER's softmax
    // backward reads dw and w (again past 32 slots a channel) and writes dscores.
    let tk = tokens as u64;
    out.token.read = tk * 4 * d + n * (8 + 4 * d);
    out.token.written = tk * 4 * d;
    if peer {
        let beyond = s.k.saturating_sub(32) as u64;
        out.token.read += n * 8 + tk * s.channels as u64 * beyond * 8;
        out.token.written += n * 4;
    }
    out
}

#[cfg(all(test, feature = "cuda-emu"))]
mod tests {
    use super::*;
    use crate::nn::cpu::experts::{experts_backward, experts_forward, SlotOrder};
    use crate::nn::cuda::emu::{Arg, Traffic};
    use crate::nn::cuda::sort::SORT_GRID_MAX;
    use crate::nn::cuda::testing::{
        below, bits, close, go, grids, group_on_emulator, randn, scales, spread, stable_grouping,
    };
    use crate::nn::rng::{fresh_seed, Rng};

    fn run(name: &str, dims: LaunchDims, args: &mut [Arg]) -> Bytes {
        let Traffic {
            read_bytes,
            written_bytes,
        } = go(name, dims, args);
        Bytes {
            read: read_bytes,
            written: written_bytes,
        }
    }

    const MODES: [ExpertMode; 3] = [
        ExpertMode::GatedLinear,
        ExpertMode::GatedGelu,
        ExpertMode::PeerSoftmaxGelu,
    ];

    /// Indices of four kinds: uniform (repeated ids within a channel and across tokens); every
    /// slot the same id (one row holds all pairs when the channels share the pool); runs whose
    /// lengths sit at tile boundaries (1, tile - 1, tile, tile + 1, 2 tile + 1 ... when the
    /// channels share the pool), shuffled; a few hot ids (skew) among rare ones.
    fn indices(rng: &mut Rng, kind: usize, n: usize, n_exp: usize, tile: usize) -> Vec<u32> {
        match kind {
            0 => (0..n).map(|_| below(rng, n_exp)).collect(),
            1 => vec![below(rng, n_exp); n],
            2 => {
                let lens = [1, tile.max(2) - 1, tile, tile + 1, 2 * tile + 1, 3];
                let mut ids = Vec::new();
                let mut i = 0;
                while ids.len() < n {
                    ids.extend(std::iter::repeat_n(
                        (i % n_exp) as u32,
                        lens[i % lens.len()],
                    ));
                    i += 1;
                }
                ids.truncate(n);
                for j in (1..n).rev() {
                    ids.swap(j, below(rng, j + 1) as usize);
                }
                ids
            }
            _ => (0..n)
                .map(|_| {
                    if below(rng, 4) == 0 {
                        below(rng, n_exp)
                    } else {
                        below(rng, 2.min(n_exp))
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn backward_equals_its_twin_moves_the_bytes_of_its_formula_and_repeats_bit_for_bit() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        // Every tokens x k x mode x pool layout; d, channels, N, the indices' kind, the gates'
        // sign and the small tile take turns (the full product costs minutes in the emulator).
        let mut case_no = 0usize;
        for tokens in [1, 5, 33] {
            for k in [1, 3, 8, 33] {
                for mode in MODES {
                    for shared in [false, true] {
                        case_no += 1;
                        let d = [1, 7, 33, 130][case_no % 4];
                        let channels = [1, 3][(case_no / 4) % 2];
                        let n_exp = [4, 9, 25][case_no % 3];
                        let kind = (case_no / 2) % 4;
                        let negative = case_no.is_multiple_of(5);
                        let small_tile = [1, 2, 5, 32][(case_no / 3) % 4];
                        let s = ExpertShape {
                            d,
                            channels,
                            k,
                            channel_stride: if shared { 0 } else { n_exp },
                            pool_rows: if shared { n_exp } else { channels * n_exp },
                        };
                        let case = format!(
                            "seed {seed}, {mode:?}, tokens {tokens}, d {d}, channels {channels}, \
                             N {n_exp}, k {k}, shared pool {shared}, indices kind {kind}, \
                             negative gates {negative}"
                        );
                        backward_case(&mut rng, s, mode, tokens, kind, negative, small_tile, &case);
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_case(
        rng: &mut Rng,
        s: ExpertShape,
        mode: ExpertMode,
        tokens: usize,
        kind: usize,
        negative: bool,
        small_tile: usize,
        case: &str,
    ) {
        let (d, slots) = (s.d, s.channels * s.k);
        let n = tokens * slots;
        let n_exp = if s.channel_stride == 0 {
            s.pool_rows
        } else {
            s.channel_stride
        };
        let indices = indices(rng, kind, n, n_exp, small_tile);
        let x = randn(rng, tokens * d, 1.0);
        let mut g = randn(rng, n, 1.0);
        if negative {
            g.iter_mut().for_each(|v| *v = -v.abs());
        }
        let u = randn(rng, s.pool_rows * d, 1.0);
        let v = randn(rng, s.pool_rows * d, 1.0);
        let dy = randn(rng, tokens * d, 1.0);
        let i32_ = |v: usize| Arg::I32(v as i32);
        let mode_arg = || Arg::I32(super::super::experts::expert_mode_arg(mode));

        // The twin: forward for the saved a, coef, w; backward adding into nonzero dx, du, dv.
        let (mut a, mut coef, mut w) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let mut y = vec![0.0; tokens * d];
        experts_forward(
            s, mode, &x, &g, &indices, &u, &v, &mut a, &mut coef, &mut w, &mut y,
        );
        if mode != ExpertMode::PeerSoftmaxGelu {
            // The forward leaves w alone outside PEER: the kernels must not read it.
            w.iter_mut().for_each(|v| *v = f32::NAN);
        }
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
            &a,
            &coef,
            &w,
            &dy,
            &mut ds_w,
            &mut da_w,
            &mut dx_w,
            &mut du_w,
            &mut dv_w,
            &mut SlotOrder::default(),
        );
        let rows = slot_rows(s, &indices);
        let sc = scales(s, mode, &x, &g, &rows, &u, &v, &w, &dy);
        let row = |j: usize| rows[j] as usize;
        let dx_scale = spread(&dx0, &sc.da, &u, d, |j| j / slots, row);
        let du_scale = spread(&du0, &sc.da, &x, d, row, |j| j / slots);
        let dv_scale = spread(&dv0, &sc.coef, &dy, d, row, |j| j / slots);

        // Keys (the output starts as garbage: every element must be written).
        let mut keys = vec![0xdead_beefu32; n];
        let mut measured = BackwardBytes {
            keys: run(
                "experts_bwd_keys",
                keys_dims(n),
                &mut [
                    Arg::slice(&indices),
                    Arg::slice_mut(&mut keys),
                    i32_(n),
                    i32_(slots),
                    i32_(s.k),
                    i32_(s.channel_stride),
                ],
            ),
            ..Default::default()
        };
        // The backend's grouping, the radix sort (fibers beyond the sizes real threads run
        // quickly).
        let grouping = group_on_emulator(&keys, s.pool_rows, *SORT_GRID_MAX, n > 257);
        measured.group = Bytes {
            read: grouping.traffic.0,
            written: grouping.traffic.1,
        };
        let (order, ends) = (grouping.order, grouping.ends);
        assert_eq!(keys, rows, "keys {case}");
        let (order_r, ends_r) = stable_grouping(&rows, s.pool_rows);
        assert_eq!(order, order_r, "order {case}");
        assert_eq!(ends, ends_r, "ends {case}");

        for tile in [expert_tile(), small_tile] {
            let scratch = scratch_with_tile(tokens, s, tile);
            let mut runs = Vec::new();
            for (pd, td) in grids(pool_dims(n, tile))
                .into_iter()
                .zip(grids(token_dims(tokens)))
            {
                let (mut ds, mut da) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                let (mut dx, mut du, mut dv) = (dx0.clone(), du0.clone(), dv0.clone());
                let mut partial = vec![f32::NAN; scratch.partial_len];
                measured.pool = run(
                    "experts_bwd_pool",
                    pd,
                    &mut [
                        Arg::slice(&x),
                        Arg::slice(&dy),
                        Arg::slice(&g),
                        Arg::slice(&a),
                        Arg::slice(&w),
                        Arg::slice(&v),
                        Arg::slice(&keys),
                        Arg::slice(&order),
                        Arg::slice(&ends),
                        Arg::slice_mut(&mut ds),
                        Arg::slice_mut(&mut da),
                        Arg::slice_mut(&mut du),
                        Arg::slice_mut(&mut dv),
                        Arg::slice_mut(&mut partial),
                        i32_(n),
                        i32_(d),
                        i32_(slots),
                        mode_arg(),
                        i32_(tile),
                    ],
                );
                measured.fixup = run(
                    "experts_bwd_fixup",
                    pd,
                    &mut [
                        Arg::slice(&keys),
                        Arg::slice(&order),
                        Arg::slice(&ends),
                        Arg::slice(&partial),
                        Arg::slice_mut(&mut du),
                        Arg::slice_mut(&mut dv),
                        i32_(n),
                        i32_(d),
                        i32_(tile),
                    ],
                );
                measured.token = run(
                    "experts_bwd_token",
                    td,
                    &mut [
                        Arg::slice(&u),
                        Arg::slice(&keys),
                        Arg::slice(&da),
                        Arg::slice(&w),
                        Arg::slice_mut(&mut ds),
                        Arg::slice_mut(&mut dx),
                        i32_(tokens),
                        i32_(d),
                        i32_(s.channels),
                        i32_(s.k),
                        mode_arg(),
                    ],
                );
                let case = format!("{case}, tile {tile}, grid {:?}", pd.grid);
                close(&ds, &ds_w, &sc.ds, &format!("dscores {case}"));
                close(&da, &da_w, &sc.da, &format!("da {case}"));
                close(&dx, &dx_w, &dx_scale, &format!("dx {case}"));
                close(&du, &du_w, &du_scale, &format!("du {case}"));
                close(&dv, &dv_w, &dv_scale, &format!("dv {case}"));
                // The kernels' order, bit for bit, from their own da: du sums each tile's
                // piece of a row in pair order (from du0 where the row begins), then the later
                // pieces in tile order; dx sums the token's slots in slot order.
                let mut du_m = du0.clone();
                let (order_s, ends_s) = (&order_r, &ends_r);
                for r in 0..s.pool_rows {
                    let b = if r == 0 { 0 } else { ends_s[r - 1] as usize };
                    let e = ends_s[r] as usize;
                    let mut e_at = b;
                    while e_at < e {
                        let piece_end = e.min((e_at / tile + 1) * tile);
                        for col in 0..d {
                            let mut acc = if e_at == b { du0[r * d + col] } else { 0.0 };
                            for &j in &order_s[e_at..piece_end] {
                                let (j, t) = (j as usize, j as usize / slots);
                                acc = da[j].mul_add(x[t * d + col], acc);
                            }
                            du_m[r * d + col] = if e_at == b {
                                acc
                            } else {
                                du_m[r * d + col] + acc
                            };
                        }
                        e_at = piece_end;
                    }
                }
                assert_eq!(bits(&du), bits(&du_m), "du in the kernels' order {case}");
                let mut dx_m = dx0.clone();
                for j in 0..n {
                    let (t, r) = (j / slots, rows[j] as usize);
                    for col in 0..d {
                        dx_m[t * d + col] = da[j].mul_add(u[r * d + col], dx_m[t * d + col]);
                    }
                }
                assert_eq!(bits(&dx), bits(&dx_m), "dx in the kernels' order {case}");
                let want = experts_backward_bytes(s, mode, tokens, &rows, tile);
                assert_eq!(measured, want, "traffic {case}");
                runs.push([ds, da, dx, du, dv].map(|t| bits(&t)));
            }
            assert_eq!(
                runs[0], runs[1],
                "two grids, the same bits {case}, tile {tile}"
            );
        }
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
        let n = tokens * 16 * 8;
        for d in [
            keys_dims(n),
            pool_dims(n, expert_tile()),
            pool_dims(n, 1),
            token_dims(tokens),
            keys_dims(0),
            pool_dims(0, expert_tile()),
            token_dims(0),
        ] {
            assert!((1..=i32::MAX as u32).contains(&d.grid[0]), "{d:?}");
            assert!(d.grid[1] == 1 && d.grid[2] == 1, "{d:?}");
            assert!(d.block[0] <= 1024 && d.block[0] % 32 == 0, "{d:?}");
            assert_eq!(d.shared_bytes, 0, "{d:?}");
        }
        assert!(max_d() >= 768 && max_d().is_multiple_of(32));
        let sc = experts_backward_scratch(3, es);
        let n: usize = 3 * 16 * 8;
        let tiles = n.div_ceil(expert_tile());
        assert_eq!(sc.tiles, tiles);
        assert_eq!((sc.keys, sc.order, sc.ends), (0, 4 * n, 8 * n));
        assert_eq!(sc.partial, 8 * n + 4 * 16 * 7744);
        assert_eq!(sc.bytes, sc.partial + 4 * tiles * 2 * 768);
    }
}
