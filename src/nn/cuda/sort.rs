//! A deterministic stable group-by-key on the device (kernels/sort.cu): given `keys[n]` (u32,
//! each `< key_bound`), `order[n]` = 0..n sorted by key, increasing item number within a key,
//! and `ends[key_bound]` (`ends[r]` = the end of key r's run in `order`; it begins at
//! `ends[r - 1]`, or 0). An LSD radix sort of `SORT_RADIX_BITS` a pass over as many blocks as
//! the items fill (each a contiguous chunk), then a merge for the ends. Used by both drivers:
//! the backend runs `group_by_key_launches` in order with its own launch.

use super::driver::{DevAddr, KArg};
use super::{constant, dims, LaunchDims};
use std::sync::LazyLock;

static SORT_RADIX_BITS: LazyLock<u32> = LazyLock::new(|| constant("SORT_RADIX_BITS"));
static SORT_BLOCK: LazyLock<u32> = LazyLock::new(|| constant("SORT_BLOCK"));
static SORT_ITEMS: LazyLock<u32> = LazyLock::new(|| constant("SORT_ITEMS"));
pub(super) static SORT_GRID_MAX: LazyLock<u32> = LazyLock::new(|| constant("SORT_GRID_MAX"));
static SORT_ENDS_TILE: LazyLock<u32> = LazyLock::new(|| constant("SORT_ENDS_TILE"));

/// The device scratch of one group-by-key: `bytes` of it (u32 aligned), laid out as two key
/// buffers, a value buffer (the item numbers between passes) and the digit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupScratch {
    pub bytes: usize,
    n: usize,
    passes: u32,
    blocks: u32,
    chunk: u32,
    keys: [usize; 2],
    vals: usize,
    counts: usize,
}

impl GroupScratch {
    pub(super) fn new(n: usize, key_bound: usize, grid_cap: u32) -> GroupScratch {
        assert!(n <= u32::MAX as usize && key_bound <= u32::MAX as usize);
        let bits = usize::BITS - key_bound.saturating_sub(1).leading_zeros();
        let passes = bits.div_ceil(*SORT_RADIX_BITS).max(1);
        let blocks = n.div_ceil(*SORT_ITEMS as usize).clamp(1, grid_cap as usize) as u32;
        let chunk = n.div_ceil(blocks as usize) as u32;
        // A second key buffer and the value buffer only when a pass follows another.
        let k1 = if passes > 1 { 4 * n } else { 0 };
        let keys = [0, 4 * n];
        let vals = keys[1] + k1;
        let counts = vals + k1;
        let bytes = counts + 4 * (*SORT_BLOCK as usize) * blocks as usize;
        GroupScratch {
            bytes,
            n,
            passes,
            blocks,
            chunk,
            keys,
            vals,
            counts,
        }
    }

    /// Radix passes (at least one).
    pub fn passes(&self) -> u32 {
        self.passes
    }

    /// Blocks of the histogram and scatter launches.
    pub fn blocks(&self) -> u32 {
        self.blocks
    }
}

/// The scratch `group_by_key_launches` needs for `n` keys below `key_bound`.
pub fn group_by_key_scratch(n: usize, key_bound: usize) -> GroupScratch {
    GroupScratch::new(n, key_bound, *SORT_GRID_MAX)
}

/// The launches, in order, that group `keys[n]` (each `< key_bound`) into `order[n]` and
/// `ends[key_bound]`, with `scratch` (`group_by_key_scratch(n, key_bound).bytes`) as work space:
/// per pass `sort_histogram(keys_in, counts, n, shift, chunk)`, `sort_scan(counts,
/// SORT_BLOCK * blocks)`, `sort_scatter(keys_in, vals_in, counts, keys_out, vals_out, n, shift,
/// chunk, first)`, then `sort_ends(sorted_keys, ends, n, key_bound)`. Needs n and key_bound
/// below 2^32.
pub fn group_by_key_launches(
    keys: DevAddr,
    n: usize,
    key_bound: usize,
    order: DevAddr,
    ends: DevAddr,
    scratch: DevAddr,
) -> Vec<(&'static str, LaunchDims, Vec<KArg>)> {
    launches(
        keys,
        key_bound,
        order,
        ends,
        scratch,
        group_by_key_scratch(n, key_bound),
    )
}

pub(super) fn launches(
    keys: DevAddr,
    key_bound: usize,
    order: DevAddr,
    ends: DevAddr,
    scratch: DevAddr,
    s: GroupScratch,
) -> Vec<(&'static str, LaunchDims, Vec<KArg>)> {
    let n = s.n;
    let block = *SORT_BLOCK;
    let buf = |addr: DevAddr, items: usize| KArg::Buf(addr, 4 * items);
    let at = |offset: usize| scratch + offset as DevAddr;
    let ncounts = block as usize * s.blocks as usize;
    let counts = buf(at(s.counts), ncounts);
    let pass_dims = dims(s.blocks as usize, s.blocks, block, 0);
    let mut out = Vec::new();
    let mut keys_in = buf(keys, n);
    let mut vals_in = buf(at(s.vals), 0);
    for p in 0..s.passes {
        let shift = KArg::U32(p * *SORT_RADIX_BITS);
        let keys_out = buf(at(s.keys[p as usize % 2]), n);
        // Values alternate so that the last pass writes `order`.
        let vals_out = if (s.passes - 1 - p).is_multiple_of(2) {
            buf(order, n)
        } else {
            buf(at(s.vals), n)
        };
        let (n32, chunk) = (KArg::U32(n as u32), KArg::U32(s.chunk));
        out.push((
            "sort_histogram",
            pass_dims,
            vec![keys_in, counts, n32, shift, chunk],
        ));
        out.push((
            "sort_scan",
            dims(1, 1, block, 0),
            vec![counts, KArg::U32(ncounts as u32)],
        ));
        out.push((
            "sort_scatter",
            pass_dims,
            vec![
                keys_in,
                vals_in,
                counts,
                keys_out,
                vals_out,
                n32,
                shift,
                chunk,
                KArg::U32((p == 0) as u32),
            ],
        ));
        keys_in = keys_out;
        vals_in = vals_out;
    }
    out.push((
        "sort_ends",
        ends_dims(n, key_bound),
        vec![
            keys_in,
            buf(ends, key_bound),
            KArg::U32(n as u32),
            KArg::U32(key_bound as u32),
        ],
    ));
    out
}

/// `sort_ends`: one block a tile of `SORT_ENDS_TILE` merged positions (n + key_bound of them),
/// grid-stride beyond `SORT_GRID_MAX` blocks.
fn ends_dims(n: usize, key_bound: usize) -> LaunchDims {
    let tiles = (n + key_bound).div_ceil(*SORT_ENDS_TILE as usize);
    dims(tiles, *SORT_GRID_MAX, *SORT_BLOCK, 0)
}

/// The global bytes (read, written) of `group_by_key_launches(n, key_bound)`, exactly as the
/// kernels touch them. Per pass, with C = SORT_BLOCK * blocks digit counts: the histogram reads
/// the n keys and writes C counts; the scan reads and writes C; the scatter reads n keys, n
/// values (not on the first pass: they are the item numbers) and C offsets and writes n keys
/// and n values. The ends read the n sorted keys plus, at each of the tiles - 1 inner tile
/// boundaries, two binary lifts of bit_length(n) reads; they write key_bound ends.
pub fn group_by_key_bytes(n: usize, key_bound: usize) -> (u64, u64) {
    let s = group_by_key_scratch(n, key_bound);
    bytes_of(n, key_bound, &s)
}

pub(super) fn bytes_of(n: usize, key_bound: usize, s: &GroupScratch) -> (u64, u64) {
    let (n, kb) = (n as u64, key_bound as u64);
    let c = *SORT_BLOCK as u64 * s.blocks as u64;
    let passes = s.passes as u64;
    let mut read = passes * (2 * n + 2 * c) + (passes - 1) * n;
    let mut written = passes * (c + c + 2 * n);
    let tiles = (n + kb).div_ceil(*SORT_ENDS_TILE as u64);
    let bit_length = (u64::BITS - n.leading_zeros()) as u64;
    read += n + 2 * tiles.saturating_sub(1) * bit_length;
    written += kb;
    (4 * read, 4 * written)
}

#[cfg(all(test, feature = "cuda-emu"))]
mod tests {
    use super::*;
    use crate::interp::testing::fresh_seed;
    use crate::nn::cuda::testing::{group_on_emulator, stable_grouping, Grouped};
    use crate::nn::rng::Rng;

    #[derive(Clone, Copy, Debug)]
    enum Dist {
        Uniform,
        Equal,
        Sorted,
        Reversed,
        Zipf,
    }

    fn make_keys(rng: &mut Rng, n: usize, key_bound: usize, dist: Dist) -> Vec<u32> {
        let kb = key_bound as u64;
        let uniform = |rng: &mut Rng| (rng.next_u64() % kb) as u32;
        let mut keys: Vec<u32> = match dist {
            Dist::Uniform | Dist::Sorted | Dist::Reversed => (0..n).map(|_| uniform(rng)).collect(),
            Dist::Equal => vec![uniform(rng); n],
            // P(r) ∝ 1 / (r + 1) roughly: log-uniform over 1..=key_bound, a few keys take most.
            Dist::Zipf => (0..n)
                .map(|_| {
                    let x = ((kb as f64 + 1.0).ln() * rng.uniform()).exp() - 1.0;
                    (x as u64).min(kb - 1) as u32
                })
                .collect(),
        };
        match dist {
            Dist::Sorted => keys.sort_unstable(),
            Dist::Reversed => keys.sort_unstable_by(|a, b| b.cmp(a)),
            _ => {}
        }
        keys
    }

    const NS: [usize; 8] = [0, 1, 5, 255, 256, 257, 5000, 100_000];
    const BOUNDS: [usize; 6] = [1, 2, 3, 1600, 7744 * 16, 1 << 20];
    const DISTS: [Dist; 5] = [
        Dist::Uniform,
        Dist::Equal,
        Dist::Sorted,
        Dist::Reversed,
        Dist::Zipf,
    ];

    fn check(keys: &[u32], key_bound: usize, cap: u32, fibers: bool, case: &str) -> Grouped {
        let r = group_on_emulator(keys, key_bound, cap, fibers);
        let (order, ends) = stable_grouping(keys, key_bound);
        assert!(
            r.order == order,
            "{case}: order differs from the stable sort"
        );
        assert!(r.ends == ends, "{case}: ends differ");
        let s = GroupScratch::new(keys.len(), key_bound, cap);
        assert_eq!(r.traffic, bytes_of(keys.len(), key_bound, &s), "{case}");
        r
    }

    /// Every size, bound and key distribution against the CPU stable sort, with exact traffic.
    /// Real threads up to 257 items and 1600 keys, fibers above (the same kernels, barriers
    /// and race check, far faster).
    #[test]
    fn group_by_key_matches_stable_sort() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        for &n in &NS {
            for &kb in &BOUNDS {
                for dist in DISTS {
                    let keys = make_keys(&mut rng, n, kb, dist);
                    let case = format!("seed {seed}, n {n}, key_bound {kb}, {dist:?}");
                    check(&keys, kb, *SORT_GRID_MAX, n > 257 || kb > 1600, &case);
                }
            }
        }
    }

    /// A grid capped below the chunks' count: chunks of many rounds, blocks of unequal
    /// (and empty) chunks; the ends' grid-stride loop over many tiles.
    #[test]
    fn group_by_key_capped_grid() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        for (n, cap) in [(5000, 2), (100_000, 3), (9000, 7), (12289, 4)] {
            for &kb in &[3, 1600, 1 << 20] {
                for dist in [Dist::Uniform, Dist::Zipf, Dist::Reversed] {
                    let keys = make_keys(&mut rng, n, kb, dist);
                    let case = format!("seed {seed}, n {n}, cap {cap}, key_bound {kb}, {dist:?}");
                    let s = GroupScratch::new(n, kb, cap);
                    assert_eq!(s.blocks(), cap.min(n.div_ceil(4096) as u32), "{case}");
                    check(&keys, kb, cap, true, &case);
                }
            }
        }
    }

    /// Two runs give the same bits (real threads, then fibers), three passes above 2^16 keys.
    #[test]
    fn group_by_key_deterministic() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        let kb = (1 << 16) + 3;
        let keys = make_keys(&mut rng, 3000, kb, Dist::Zipf);
        let a = check(&keys, kb, 2, false, "threads");
        let b = check(&keys, kb, 2, true, "fibers");
        assert_eq!(group_by_key_scratch(3000, kb).passes(), 3);
        assert_eq!(group_by_key_scratch(3000, 1 << 24).passes(), 3);
        assert!(a.order == b.order && a.ends == b.ends && a.traffic == b.traffic);
    }

    /// The traffic formula at a few shapes by hand: one pass below 257 keys, three at 2^20.
    #[test]
    fn group_by_key_bytes_formula() {
        // n 0, key_bound 1: one pass of one block (256 counts), one tile, no lifts.
        assert_eq!(group_by_key_bytes(0, 1), (4 * 2 * 256, 4 * (2 * 256 + 1)));
        // n 5000, key_bound 1600 (11 bits): two passes of 2 blocks (512 counts), the second
        // reading the values too; 7 tiles of 1024, 6 inner boundaries, 2 lifts of 13 reads each.
        assert_eq!(
            group_by_key_bytes(5000, 1600),
            (
                4 * (2 * (2 * 5000 + 2 * 512) + 5000 + 5000 + 2 * 6 * 13),
                4 * (2 * (2 * 512 + 2 * 5000) + 1600)
            )
        );
        let s = group_by_key_scratch(100_000, 1 << 20);
        assert_eq!((s.passes(), s.blocks()), (3, 25));
    }
}
