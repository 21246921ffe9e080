//! What the emulator tests of the kernels share: launching with the race check on, the two
//! grids each kernel runs on, random inputs and comparisons.

use super::driver::Driver;
use super::emu::{launch_as, Arg, EmuDriver, Traffic};
use super::{sort, LaunchDims};
use crate::nn::backend::{ExpertMode, ExpertShape};
use crate::nn::rng::Rng;

/// Runs a kernel on the emulator with the race check on, and returns the bytes it moved; a
/// failure fails the test.
pub fn go(name: &str, dims: LaunchDims, args: &mut [Arg]) -> Traffic {
    go_as(name, dims, args, false)
}

/// `go`, with each block's threads as fibers when `fibers` (the same bits, far faster).
pub fn go_as(name: &str, dims: LaunchDims, args: &mut [Arg], fibers: bool) -> Traffic {
    launch_as(
        name,
        dims.grid,
        dims.block,
        dims.shared_bytes,
        args,
        true,
        fibers,
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The launch function's dims, and the same with a grid of 2 blocks, so that the grid-stride
/// loops run past the grid as they do when a large shape meets the cap.
pub fn grids(d: LaunchDims) -> [LaunchDims; 2] {
    let mut small = d;
    small.grid[0] = 2;
    [d, small]
}

/// The items 0..n grouped by key (each `< key_bound`) by the host's stable sort: the order, and
/// each key's run end in it.
pub fn stable_grouping(keys: &[u32], key_bound: usize) -> (Vec<u32>, Vec<u32>) {
    let mut order: Vec<u32> = (0..keys.len() as u32).collect();
    order.sort_by_key(|&i| keys[i as usize]);
    let mut ends = vec![0u32; key_bound];
    for &k in keys {
        ends[k as usize] += 1;
    }
    for r in 1..key_bound {
        ends[r] += ends[r - 1];
    }
    (order, ends)
}

/// What the device's group-by-key gave, and the global bytes (read, written) it moved.
pub struct Grouped {
    pub order: Vec<u32>,
    pub ends: Vec<u32>,
    pub traffic: (u64, u64),
}

/// Groups `keys` with the launches of sort.rs on an emulator (race check on; fibers for speed
/// where asked), the histogram's and scatter's grid capped at `cap` blocks. The outputs start
/// poisoned: every element must be written.
pub fn group_on_emulator(keys: &[u32], key_bound: usize, cap: u32, fibers: bool) -> Grouped {
    let n = keys.len();
    let drv = EmuDriver::with_mode(true, fibers);
    let s = sort::GroupScratch::new(n, key_bound, cap);
    let words = |x: &[u32]| -> Vec<u8> { x.iter().flat_map(|v| v.to_le_bytes()).collect() };
    let k = drv.alloc(4 * n).unwrap();
    drv.upload(k, &words(keys)).unwrap();
    let (order, ends, scratch) = (
        drv.alloc(4 * n).unwrap(),
        drv.alloc(4 * key_bound).unwrap(),
        drv.alloc(s.bytes).unwrap(),
    );
    drv.upload(order, &vec![0xAB; 4 * n]).unwrap();
    drv.upload(ends, &vec![0xAB; 4 * key_bound]).unwrap();
    for (name, d, args) in sort::launches(k, key_bound, order, ends, scratch, s) {
        drv.launch(name, d, &args)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let fetch = |addr, len: usize| {
        let mut b = vec![0u8; 4 * len];
        drv.download(addr, &mut b).unwrap();
        b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect::<Vec<u32>>()
    };
    let (order_v, ends_v) = (fetch(order, n), fetch(ends, key_bound));
    let traffic = drv.traffic().values().fold((0, 0), |a, (_, t)| {
        (a.0 + t.read_bytes, a.1 + t.written_bytes)
    });
    for a in [k, order, ends, scratch] {
        drv.free(a);
    }
    Grouped {
        order: order_v,
        ends: ends_v,
        traffic,
    }
}

pub fn randn(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * std) as f32).collect()
}

pub fn below(rng: &mut Rng, n: usize) -> u32 {
    (rng.next_u64() % n as u64) as u32
}

pub fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// |got - want| <= 1e-5 · max(|want|, scale[i]): a kernel does its twin's f32 arithmetic in
/// other reduction orders and with its own exp/tanh, so each result is within a few ulp of the
/// terms that make it; `scale` is their magnitude where they may cancel (0 where a relative
/// bound holds).
pub fn close(got: &[f32], want: &[f32], scale: &[f32], case: &str) {
    assert_eq!(got.len(), want.len(), "{case}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-5 * w.abs().max(scale[i]);
        assert!((g - w).abs() <= tol, "{case}: element {i}: {g} against {w}");
    }
}

/// The expert kernels' comparison bounds (experts.rs, experts_backward.rs tests): slots given
/// by their pool rows.
pub struct Scales {
    pub coef: Vec<f32>,
    pub ds: Vec<f32>,
    pub da: Vec<f32>,
}

/// The magnitudes each slot's results are made of (see `close`): A = Σ|u·x|, D = Σ|v·dy|,
/// and the factors around them (|gelu| <= |z|, |gelu'| < 1.2, |gelu''| < 1).
#[allow(clippy::too_many_arguments)]
pub fn scales(
    s: ExpertShape,
    mode: ExpertMode,
    x: &[f32],
    g: &[f32],
    rows: &[u32],
    u: &[f32],
    v: &[f32],
    w: &[f32],
    dy: &[f32],
) -> Scales {
    let (d, slots) = (s.d, s.channels * s.k);
    let n = rows.len();
    let (mut coef, mut ds, mut da) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let mut wide = vec![0.0f32; n];
    for j in 0..n {
        let (t, row) = (j / slots, rows[j] as usize);
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
pub fn spread(
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
