// Stable group-by-key on the device: given keys[n] (each < key_bound), order[n] = 0..n sorted by
// key, items in increasing order within a key, and ends[key_bound] (ends[r] = the end of key r's
// run in order; it begins at ends[r - 1], or 0). Launch sequence: src/nn/cuda/sort.rs.
//
// An LSD radix sort, SORT_RADIX_BITS a pass, each pass three kernels: sort_histogram (per-block
// digit counts of a contiguous chunk, counts[digit * blocks + block]), sort_scan (their
// exclusive scan in (digit, block) order: where each block's items of each digit go) and
// sort_scatter (each item to its place, ranks within a block from per-warp ballots in item
// order). Then sort_ends merges the sorted keys with 0..key_bound. Every place is a function of
// the keys alone (no atomics, no timing): the same bits on every run.
#include "common.cuh"

namespace sortk {

constexpr unsigned FULL = 0xffffffffu;
constexpr unsigned DIGITS = 1u << SORT_RADIX_BITS;
constexpr unsigned WARPS = SORT_BLOCK / 32;
static_assert(SORT_BLOCK == DIGITS, "thread d owns digit d");
static_assert(SORT_ENDS_TILE % SORT_BLOCK == 0, "whole positions a thread");

typedef unsigned long long u64;

__device__ unsigned popc(unsigned x) {
  x = x - ((x >> 1) & 0x55555555u);
  x = (x & 0x33333333u) + ((x >> 2) & 0x33333333u);
  x = (x + (x >> 4)) & 0x0f0f0f0fu;
  return (x * 0x01010101u) >> 24;
}

// The active lanes of the calling warp whose digit equals this lane's (every lane calls).
__device__ unsigned peers(unsigned digit, bool active) {
  unsigned m = __ballot_sync(FULL, active);
  for (int b = 0; b < SORT_RADIX_BITS; b++) {
    const unsigned ones = __ballot_sync(FULL, (digit >> b) & 1u);
    m &= ((digit >> b) & 1u) ? ones : ~ones;
  }
  return m;
}

// Block b's items: [begin, end) of a chunk of `chunk` (chunks in block order keep the sort stable).
__device__ void chunk_of(unsigned n, unsigned chunk, u64 &begin, u64 &end) {
  begin = u64(blockIdx.x) * chunk;
  end = begin + chunk < n ? begin + chunk : u64(n);
}

// Inclusive sum over the lanes up to this one.
__device__ unsigned warp_scan(unsigned x, unsigned lane) {
  for (unsigned o = 1; o < 32; o *= 2) {
    const unsigned y = __shfl_up_sync(FULL, x, o);
    if (lane >= o) x += y;
  }
  return x;
}

}  // namespace sortk

// Per-block digit counts of its chunk: counts[digit * gridDim.x + block]. SORT_BLOCK threads;
// a round of SORT_BLOCK items at a time: each warp's last item of a digit writes the warp's
// count of it (one writer an element: no atomics), thread d adds up digit d.
__global__ void sort_histogram(gptr<const unsigned> keys, gptr<unsigned> counts, unsigned n,
                               unsigned shift, unsigned chunk) {
  using namespace sortk;
  SHARED_ARRAY(unsigned, wc, WARPS * DIGITS);
  const unsigned me = threadIdx.x, lane = me % 32, warp = me / 32;
  for (unsigned w = 0; w < WARPS; w++) wc[w * DIGITS + me] = 0;
  u64 begin, end;
  chunk_of(n, chunk, begin, end);
  unsigned total = 0;
  __syncthreads();
  for (u64 base = begin; base < end; base += SORT_BLOCK) {
    const u64 i = base + me;
    const bool active = i < end;
    const unsigned digit = active ? (unsigned(keys[i]) >> shift) & (DIGITS - 1) : 0;
    const unsigned p = peers(digit, active);
    if (active && (p >> lane) == 1u) wc[warp * DIGITS + digit] = popc(p);
    __syncthreads();
    for (unsigned w = 0; w < WARPS; w++) {
      total += wc[w * DIGITS + me];
      wc[w * DIGITS + me] = 0;
    }
    __syncthreads();
  }
  counts[u64(me) * gridDim.x + blockIdx.x] = total;
}
REPRO_KERNEL(sort_histogram)

// In-place exclusive scan of counts[total] (total = DIGITS * blocks), one block of SORT_BLOCK
// threads, SORT_BLOCK at a time with a carry.
__global__ void sort_scan(gptr<unsigned> counts, unsigned total) {
  using namespace sortk;
  SHARED_ARRAY(unsigned, warp_sums, WARPS);
  if (blockIdx.x != 0) return;
  const unsigned me = threadIdx.x, lane = me % 32, warp = me / 32;
  unsigned carry = 0;
  for (u64 base = 0; base < total; base += SORT_BLOCK) {
    const u64 i = base + me;
    const unsigned v = i < total ? unsigned(counts[i]) : 0u;
    const unsigned x = warp_scan(v, lane);
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    unsigned before = carry, all = 0;
    for (unsigned w = 0; w < WARPS; w++) {
      const unsigned s = warp_sums[w];
      if (w < warp) before += s;
      all += s;
    }
    if (i < total) counts[i] = before + x - v;
    carry += all;
    // Every warp has read warp_sums before the next round writes it.
    __syncthreads();
  }
}
REPRO_KERNEL(sort_scan)

// Moves each item of the block's chunk to offsets[digit * blocks + block] + its rank among the
// chunk's items of that digit (rounds in order; in a round, warps in order, lanes in order):
// keys_out and vals_out (vals = item numbers on the first pass). The same rounds as
// sort_histogram; thread d keeps digit d's cursor.
__global__ void sort_scatter(gptr<const unsigned> keys_in, gptr<const unsigned> vals_in,
                             gptr<const unsigned> offsets, gptr<unsigned> keys_out,
                             gptr<unsigned> vals_out, unsigned n, unsigned shift,
                             unsigned chunk, unsigned first) {
  using namespace sortk;
  SHARED_ARRAY(unsigned, wc, WARPS * DIGITS);
  SHARED_ARRAY(unsigned, off, WARPS * DIGITS);
  const unsigned me = threadIdx.x, lane = me % 32, warp = me / 32;
  for (unsigned w = 0; w < WARPS; w++) wc[w * DIGITS + me] = 0;
  u64 begin, end;
  chunk_of(n, chunk, begin, end);
  unsigned cursor = offsets[u64(me) * gridDim.x + blockIdx.x];
  __syncthreads();
  for (u64 base = begin; base < end; base += SORT_BLOCK) {
    const u64 i = base + me;
    const bool active = i < end;
    const unsigned key = active ? unsigned(keys_in[i]) : 0u;
    const unsigned digit = (key >> shift) & (DIGITS - 1);
    const unsigned p = peers(digit, active);
    if (active && (p >> lane) == 1u) wc[warp * DIGITS + digit] = popc(p);
    __syncthreads();
    for (unsigned w = 0; w < WARPS; w++) {
      const unsigned c = wc[w * DIGITS + me];
      wc[w * DIGITS + me] = 0;
      off[w * DIGITS + me] = cursor;
      cursor += c;
    }
    // The warps' offsets are complete before any item reads them.
    __syncthreads();
    if (active) {
      const unsigned pos = off[warp * DIGITS + digit] + popc(p & ((1u << lane) - 1u));
      keys_out[pos] = key;
      vals_out[pos] = first ? unsigned(i) : unsigned(vals_in[i]);
    }
  }
}
REPRO_KERNEL(sort_scatter)

namespace sortk {

// Merged position of sorted key m is keys[m] + m (after the keys 0..keys[m] - 1 of 0..key_bound,
// strictly increasing in m): the number of items among the first d merged positions, by a
// binary lift of a fixed bit-length-of-n steps, one read each.
__device__ unsigned items_before(gptr<const unsigned> keys, unsigned n, u64 d) {
  unsigned step = 1;
  while (step <= n / 2) step *= 2;
  u64 i = 0;
  for (; n && step; step /= 2) {
    const u64 t = i + step;
    const u64 p = (t < n ? t : u64(n)) - 1;
    const u64 k = unsigned(keys[p]);
    if (t <= n && k + p < d) i = t;
  }
  return unsigned(i);
}

}  // namespace sortk

// ends[r] = the number of sorted keys <= r: key r's place in the merge of the sorted keys with
// 0..key_bound (keys before an equal r) is r + ends[r]. One block a tile of SORT_ENDS_TILE
// merged positions (grid-stride): the tile's items are found by two binary lifts, flagged in
// shared memory, and each other position is a key r with ends[r] = the items before it.
// Reads each sorted key once (and 2 lifts a tile boundary); writes each end once.
__global__ void sort_ends(gptr<const unsigned> keys, gptr<unsigned> ends, unsigned n,
                          unsigned key_bound) {
  using namespace sortk;
  constexpr unsigned PER = SORT_ENDS_TILE / SORT_BLOCK;
  SHARED_ARRAY(unsigned, flag, SORT_ENDS_TILE);
  SHARED_ARRAY(unsigned, warp_sums, WARPS);
  SHARED_ARRAY(unsigned, bounds, 2);
  const unsigned me = threadIdx.x, lane = me % 32, warp = me / 32;
  const u64 total = u64(n) + key_bound;
  for (u64 d0 = u64(blockIdx.x) * SORT_ENDS_TILE; d0 < total;
       d0 += u64(gridDim.x) * SORT_ENDS_TILE) {
    const u64 d1 = d0 + SORT_ENDS_TILE < total ? d0 + SORT_ENDS_TILE : total;
    if (me == 0) bounds[0] = d0 == 0 ? 0u : items_before(keys, n, d0);
    if (me == 1) bounds[1] = d1 == total ? n : items_before(keys, n, d1);
    for (unsigned j = 0; j < PER; j++) flag[me * PER + j] = 0;
    __syncthreads();
    const unsigned i0 = bounds[0], i1 = bounds[1];
    for (u64 m = u64(i0) + me; m < i1; m += SORT_BLOCK)
      flag[unsigned(unsigned(keys[m]) + m - d0)] = 1;
    __syncthreads();
    unsigned f[PER], local = 0;
    for (unsigned j = 0; j < PER; j++) {
      f[j] = flag[me * PER + j];
      local += f[j];
    }
    const unsigned x = warp_scan(local, lane);
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    unsigned s = x - local;
    for (unsigned w = 0; w < warp; w++) s += warp_sums[w];
    for (unsigned j = 0; j < PER; j++) {
      const u64 q = u64(me) * PER + j;
      if (!f[j] && d0 + q < d1) ends[d0 + q - i0 - s] = i0 + s;
      s += f[j];
    }
    // The tile's bounds, flags and sums are read before the next tile writes them.
    __syncthreads();
  }
}
REPRO_KERNEL(sort_ends)
