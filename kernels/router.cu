// Product-key top-k: per (token, channel), the top k of s1[a] + s2[b] over the sqrt_n x sqrt_n
// grid of the two halves' sub-key logits. CPU twin: src/nn/cpu/router.rs (the same ties: lower
// index first in each half, then earlier in (rank in half 1, rank in half 2) order, as
// jax.lax.top_k on the candidates; a NaN after every number).
//
// One warp a (token, channel). Every selection is a warp max of packed 64-bit keys
// (order-preserving score bits << 32 | 0xFFFFFFFF - number): the one largest key carries the
// score and the number, and equal scores go to the lower number. Keys are distinct, so the
// result never depends on the reduction order.
#include "common.cuh"

namespace router_k {
typedef unsigned long long u64;
constexpr unsigned FULL = 0xffffffffu;
// Logits of a half (and entries of a half's top list) a lane holds: entry i is in lane i % 32,
// register i / 32.
constexpr int REGS = ROUTER_MAX_SQRT_N / 32;

__device__ unsigned float_bits(float x) {
#ifdef REPRO_EMU
  unsigned u;
  __builtin_memcpy(&u, &x, 4);
  return u;
#else
  return __float_as_uint(x);
#endif
}

// Unsigned bits in score order: every NaN lowest (after every number), -0 as +0 (equal scores
// tie by number, as the twin's comparisons do).
__device__ unsigned order_bits(float x) {
  if (x != x) return 0u;
  if (x == 0.0f) return 0x80000000u;
  const unsigned u = float_bits(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Never 0 (the low half is at least 1 for any number below 2^32 - 1): 0 is a blank entry.
__device__ u64 pack(float x, unsigned number) {
  return (u64(order_bits(x)) << 32) | u64(0xFFFFFFFFu - number);
}
__device__ unsigned number_of(u64 key) { return 0xFFFFFFFFu - unsigned(key); }

// The warp's largest key, in every lane (the shuffles move 32 bits: high and low halves).
__device__ u64 warp_max(u64 v) {
  for (int off = 16; off > 0; off >>= 1) {
    const unsigned hi = __shfl_xor_sync(FULL, unsigned(v >> 32), off);
    const unsigned lo = __shfl_xor_sync(FULL, unsigned(v), off);
    const u64 o = (u64(hi) << 32) | lo;
    v = o > v ? o : v;
  }
  return v;
}

// Entry i of a lane-distributed list of `regs` registers (the same in every lane), i per lane:
// a shuffle a register (selecting a register by a variable index would put the list in local
// memory).
template <class T> __device__ T entry(const T (&x)[REGS], unsigned i, int regs) {
  T out = x[0];
#pragma unroll
  for (int r = 0; r < REGS; r++) {
    if (r < regs) {
      const T v = __shfl_sync(FULL, x[r], int(i % 32));
      if (unsigned(r) == i / 32) out = v;
    }
  }
  return out;
}

// One half's logits (entry j in lane j % 32, register j / 32) and its top list so far.
struct Half {
  float val[REGS];
  u64 key[REGS];  // 0 once taken (or past sqrt_n)
  float top_v[REGS];
  unsigned top_j[REGS];

  __device__ void load(gptr<const float> half, int sqrt_n, int lane) {
#pragma unroll
    for (int r = 0; r < REGS; r++) {
      const int j = lane + 32 * r;
      val[r] = j < sqrt_n ? float(half[j]) : 0.0f;
      key[r] = j < sqrt_n ? pack(val[r], unsigned(j)) : 0ull;
      top_v[r] = 0.0f;
      top_j[r] = 0u;
    }
  }

  // Top entry i: the best key left, taken.
  __device__ void take(int i, int lane) {
    u64 best = key[0];
#pragma unroll
    for (int r = 1; r < REGS; r++) best = key[r] > best ? key[r] : best;
    const unsigned j = number_of(warp_max(best));
    // The owner blanks it and sends its original value (the key has -0 as +0, NaNs alike).
    float mine = 0.0f;
#pragma unroll
    for (int r = 0; r < REGS; r++) {
      if (unsigned(lane + 32 * r) == j) {
        key[r] = 0ull;
        mine = val[r];
      }
    }
    const float v = __shfl_sync(FULL, mine, int(j % 32));
#pragma unroll
    for (int r = 0; r < REGS; r++) {
      if (lane + 32 * r == i) {
        top_v[r] = v;
        top_j[r] = j;
      }
    }
  }
};

// Candidates (a, b) whose (a + 1)(b + 1) <= k: all others have k pairs at least as good and
// earlier, so the top k lies among them (when no sum is inf + -inf). Row a holds b < width(a).
__device__ int width(int a, int m, int k) {
  const int w = k / (a + 1);
  return w < m ? w : m;
}
}  // namespace router_k

// logits: [tokens, 2, channels, sqrt_n]; scores, indices: [tokens, channels, k], best first
// (overwritten). Needs 1 <= sqrt_n <= ROUTER_MAX_SQRT_N, 1 <= k <= sqrt_n². One warp a
// (token, channel), grid-stride over them: each half's logits read once into registers; the
// top m = min(k, sqrt_n) of each half by m warp maxima; then the final k by warp maxima over
// the candidates, each lane holding its best ROUTER_QUEUE of a pass (one pass for k <= 33; a
// lane that runs out while it has more starts a new pass below the last winner).
__global__ void product_key_topk_forward(gptr<const float> logits, gptr<float> scores,
                                         gptr<unsigned> indices, int tokens, int channels,
                                         int sqrt_n, int k) {
  using namespace router_k;
  const int lane = threadIdx.x % 32;
  const int m = k < sqrt_n ? k : sqrt_n;
  const int regs = (m + 31) / 32;  // registers of a top list in use
  int count = 0;                    // candidates
  for (int a = 0; a < m; a++) count += width(a, m, k);
  const int per_lane = (count + 31) / 32;
  const long warps = long(gridDim.x) * (blockDim.x / 32);
  const long pairs = long(tokens) * channels;
  for (long p = long(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; p < pairs; p += warps) {
    const long t = p / channels;
    const int c = int(p - t * channels);
    // Each half's logits, then its top m.
    Half h1, h2;
    h1.load(logits + (t * 2 * channels + c) * sqrt_n, sqrt_n, lane);
    h2.load(logits + (t * 2 * channels + channels + c) * sqrt_n, sqrt_n, lane);
    for (int i = 0; i < m; i++) {
      h1.take(i, lane);
      h2.take(i, lane);
    }
    // The final k. Candidate n (numbered in (a, b) order) is lane n % 32's.
    u64 last = ~0ull;  // the last winner: the next pass takes keys below it
    int done = 0;
    float out_s = 0.0f;  // this lane's output of the current 32 (written 32 at a time)
    unsigned out_i = 0u;
    while (done < k) {
      u64 qk[ROUTER_QUEUE];  // the lane's best keys below `last`, best first (0: none)
      float qs[ROUTER_QUEUE];
      unsigned qab[ROUTER_QUEUE];  // a << 16 | b
#pragma unroll
      for (int q = 0; q < ROUTER_QUEUE; q++) {
        qk[q] = 0ull;
        qs[q] = 0.0f;
        qab[q] = 0u;
      }
      bool more = false;  // keys below `last` that the queue could not hold
      int a = 0, b = lane;
      for (int s = 0; s < per_lane; s++) {
        while (a < m && b >= width(a, m, k)) b -= width(a++, m, k);
        const bool real = a < m;
        const float s1 = entry(h1.top_v, real ? unsigned(a) : 0u, regs);
        const float s2 = entry(h2.top_v, real ? unsigned(b) : 0u, regs);
        if (real) {
          u64 ck = pack(s1 + s2, unsigned(lane + 32 * s));
          if (ck < last) {
            if (ck > qk[ROUTER_QUEUE - 1]) {
              more = more || qk[ROUTER_QUEUE - 1] != 0ull;
              float cs = s1 + s2;
              unsigned cab = unsigned(a) << 16 | unsigned(b);
#pragma unroll
              for (int q = 0; q < ROUTER_QUEUE; q++) {
                if (ck > qk[q]) {
                  const u64 tk = qk[q];
                  const float ts = qs[q];
                  const unsigned tab = qab[q];
                  qk[q] = ck, qs[q] = cs, qab[q] = cab;
                  ck = tk, cs = ts, cab = tab;
                }
              }
            } else {
              more = true;
            }
          }
        }
        b += 32;
      }
      while (done < k) {
        const u64 w = warp_max(qk[0]);
        const int owner = int(number_of(w) % 32);
        const float score = __shfl_sync(FULL, qs[0], owner);
        const unsigned ab = __shfl_sync(FULL, qab[0], owner);
        const unsigned i1 = entry(h1.top_j, ab >> 16, regs);
        const unsigned i2 = entry(h2.top_j, ab & 0xFFFFu, regs);
        if (lane == done % 32) {
          out_s = score;
          out_i = i1 * unsigned(sqrt_n) + i2;
        }
        if (done % 32 == 31 || done == k - 1) {
          const int base = done - done % 32;
          if (lane <= done % 32) {
            scores[p * k + base + lane] = out_s;
            indices[p * k + base + lane] = out_i;
          }
        }
        done++;
        last = w;
        if (lane == owner) {
#pragma unroll
          for (int q = 0; q + 1 < ROUTER_QUEUE; q++) {
            qk[q] = qk[q + 1];
            qs[q] = qs[q + 1];
            qab[q] = qab[q + 1];
          }
          qk[ROUTER_QUEUE - 1] = 0ull;
        }
        // The winner's queue ran out while it has keys left: they may beat the others' heads.
        if (__shfl_sync(FULL, unsigned(qk[0] == 0ull && more), owner)) break;
      }
    }
  }
}
REPRO_KERNEL(product_key_topk_forward)

// dlogits (overwritten): each sub-key logit gathers d(score) of the selected experts it is part
// of, in slot order as the twin adds them (so the same bits). One warp a (token, channel): the
// k (index, dscore) read once, 32 at a time, and broadcast; a lane sums its own logits
// (lane + 32 r of each half) in registers and writes each once.
__global__ void product_key_topk_backward(gptr<const unsigned> indices, gptr<const float> dscores,
                                          gptr<float> dlogits, int tokens, int channels,
                                          int sqrt_n, int k) {
  using namespace router_k;
  const int lane = threadIdx.x % 32;
  const long warps = long(gridDim.x) * (blockDim.x / 32);
  const long pairs = long(tokens) * channels;
  for (long p = long(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; p < pairs; p += warps) {
    const long t = p / channels;
    const int c = int(p - t * channels);
    float acc[2][REGS];
#pragma unroll
    for (int r = 0; r < REGS; r++) acc[0][r] = acc[1][r] = 0.0f;
    for (int base = 0; base < k; base += 32) {
      const int n = k - base < 32 ? k - base : 32;
      unsigned my_idx = 0u;
      float my_ds = 0.0f;
      if (lane < n) {
        my_idx = indices[p * k + base + lane];
        my_ds = dscores[p * k + base + lane];
      }
      for (int i = 0; i < n; i++) {
        const unsigned idx = __shfl_sync(FULL, my_idx, i);
        const float g = __shfl_sync(FULL, my_ds, i);
        const unsigned j1 = idx / unsigned(sqrt_n), j2 = idx % unsigned(sqrt_n);
#pragma unroll
        for (int r = 0; r < REGS; r++) {
          if (unsigned(lane + 32 * r) == j1) acc[0][r] += g;
          if (unsigned(lane + 32 * r) == j2) acc[1][r] += g;
        }
      }
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
      gptr<float> half = dlogits + (t * 2 * channels + long(h) * channels + c) * sqrt_n;
#pragma unroll
      for (int r = 0; r < REGS; r++)
        if (lane + 32 * r < sqrt_n) half[lane + 32 * r] = acc[h][r];
    }
  }
}
REPRO_KERNEL(product_key_topk_backward)
