// Mixture-of-experts routing and combine: top-k with softmax gate weights over all experts,
// the stable grouping of (token, expert) pairs by expert, gather, combine and their backward.
// CPU twins: src/nn/cpu/moe.rs (same layouts). n tokens, ne experts, k distinct experts a
// token, rows = n * k; routes [rows, 2] = (token, expert) grouped by expert, tokens increasing
// within an expert; starts [ne + 1]; token_rows [n, k] each token's rows, increasing.
// Every sum runs in a fixed order: no atomics.
#include "common.cuh"

namespace moe {

constexpr unsigned FULL = 0xffffffffu;

// Keeps (v, e) unless (v2, e2) is larger, or equal with a lower index (jax.lax.top_k's tie
// rule); e < 0 is no candidate. A total order, so a butterfly gives every lane the same winner.
__device__ void take_better(float &v, int &e, float v2, int e2) {
  if (e2 >= 0 && (e < 0 || v2 > v || (v2 == v && e2 < e))) {
    v = v2;
    e = e2;
  }
}

__device__ float warp_sum(float x) {
  for (int m = 16; m > 0; m /= 2) x += __shfl_xor_sync(FULL, x, m);
  return x;
}

}  // namespace moe

// One warp a token (blocks of whole warps): k rounds of arg-max over the experts not yet
// taken (lane l holds experts l, l + 32, ...: one bit each, so ne <= MOE_MAX_EXPERTS), then the
// softmax of the whole row. chosen [n, k] by falling logit; probs [n, ne].
__global__ void moe_topk_softmax(gptr<const float> logits, gptr<float> probs,
                                 gptr<unsigned> chosen, int n, int ne, int k) {
  using namespace moe;
  const int lane = threadIdx.x % 32;
  const long t = (blockIdx.x * long(blockDim.x) + threadIdx.x) / 32;
  if (t >= n) return;  // the whole warp
  const long row = t * ne;
  unsigned taken = 0;
  for (int slot = 0; slot < k; slot++) {
    float v = 0.0f;
    int e = -1;
    for (int x = lane, i = 0; x < ne; x += 32, i++)
      if (!((taken >> i) & 1u)) take_better(v, e, logits[row + x], x);
    for (int m = 16; m > 0; m /= 2) {
      float v2 = __shfl_xor_sync(FULL, v, m);
      int e2 = __shfl_xor_sync(FULL, e, m);
      take_better(v, e, v2, e2);
    }
    if (e % 32 == lane) taken |= 1u << (e / 32);
    if (lane == 0) chosen[t * k + slot] = unsigned(e);
  }
  float mx = logits[row];
  for (int x = lane; x < ne; x += 32) mx = fmaxf(mx, logits[row + x]);
  for (int m = 16; m > 0; m /= 2) mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, m));
  float sum = 0.0f;
  for (int x = lane; x < ne; x += 32) sum += expf(logits[row + x] - mx);
  sum = warp_sum(sum);
  for (int x = lane; x < ne; x += 32) probs[row + x] = expf(logits[row + x] - mx) / sum;
}
REPRO_KERNEL(moe_topk_softmax)

// Stable counting sort by expert: one block of MOE_SORT_THREADS (a multiple of 32) per expert
// e (grid ne). The block counts the pairs of lower experts (its first row), then walks the
// pairs in order a chunk of blockDim.x at a time, placing its own by prefix counts (a warp scan, then the warps before), so
// tokens stay in increasing order. Each block reads all n * k choices twice: fine for the few
// hundred experts this is for. A token's rank among its rows is the number of its experts
// below e (its rows are in expert order).
__global__ void moe_sort_routes(gptr<const unsigned> chosen, gptr<unsigned> routes,
                                gptr<unsigned> starts, gptr<unsigned> token_rows, int n, int ne,
                                int k) {
  using namespace moe;
  SHARED_ARRAY(unsigned, per_warp, MOE_SORT_THREADS / 32);
  const unsigned e = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned warps = blockDim.x / 32;
  const long pairs = long(n) * k;
  unsigned below = 0;
  for (long j = threadIdx.x; j < pairs; j += blockDim.x) below += unsigned(chosen[j]) < e;
  for (int m = 16; m > 0; m /= 2) below += __shfl_xor_sync(FULL, below, m);
  if (lane == 0) per_warp[warp] = below;
  __syncthreads();
  unsigned base = 0;
  for (unsigned w = 0; w < warps; w++) base += per_warp[w];
  __syncthreads();  // every thread has read per_warp before the loop reuses it
  if (threadIdx.x == 0) {
    starts[e] = base;
    if (e == unsigned(ne) - 1) starts[ne] = unsigned(pairs);
  }
  for (long j0 = 0; j0 < pairs; j0 += blockDim.x) {
    const long j = j0 + threadIdx.x;
    const bool hit = j < pairs && unsigned(chosen[j]) == e;
    // Hits up to and including this lane: an inclusive scan over the warp.
    unsigned upto = hit;
    for (int m = 1; m < 32; m *= 2) {
      unsigned below_lane = __shfl_up_sync(FULL, upto, m);
      if (lane >= unsigned(m)) upto += below_lane;
    }
    if (lane == 31) per_warp[warp] = upto;
    __syncthreads();
    unsigned r = base + upto - hit, total = 0;
    for (unsigned w = 0; w < warps; w++) {
      unsigned c = per_warp[w];
      if (w < warp) r += c;
      total += c;
    }
    if (hit) {
      const long t = j / k;
      unsigned rank = 0;
      for (int s = 0; s < k; s++) rank += unsigned(chosen[t * k + s]) < e;
      routes[2 * long(r)] = unsigned(t);
      routes[2 * long(r) + 1] = e;
      token_rows[t * k + rank] = r;
    }
    base += total;
    __syncthreads();  // per_warp is read before the next chunk overwrites it
  }
}
REPRO_KERNEL(moe_sort_routes)

// hx[r] = h[token of r]: one thread an element, grid-stride. h [n, d], hx [rows, d].
__global__ void moe_gather(gptr<const float> h, gptr<const unsigned> routes, gptr<float> hx,
                           int rows, int d) {
  const long total = long(rows) * d;
  for (long x = blockIdx.x * long(blockDim.x) + threadIdx.x; x < total;
       x += long(gridDim.x) * blockDim.x) {
    long r = x / d, c = x % d;
    hx[x] = h[long(routes[2 * r]) * d + c];
  }
}
REPRO_KERNEL(moe_gather)

// out[t] = sum over t's rows in token_rows order of probs[t, e_r] * o[r] (overwrites out):
// one thread an element, grid-stride.
__global__ void moe_combine(gptr<const float> o, gptr<const float> probs,
                            gptr<const unsigned> routes, gptr<const unsigned> token_rows,
                            gptr<float> out, int n, int ne, int k, int d) {
  const long total = long(n) * d;
  for (long x = blockIdx.x * long(blockDim.x) + threadIdx.x; x < total;
       x += long(gridDim.x) * blockDim.x) {
    long t = x / d, c = x % d;
    float s = 0.0f;
    for (int slot = 0; slot < k; slot++) {
      long r = token_rows[t * k + slot];
      s += float(probs[t * ne + routes[2 * r + 1]]) * float(o[r * d + c]);
    }
    out[x] = s;
  }
}
REPRO_KERNEL(moe_combine)

// Combine backward, the rows' share: dout[r] = probs[t, e] * dy[t] for r = (t, e): one thread
// an element, grid-stride. dy [n, d], dout [rows, d].
__global__ void moe_combine_backward(gptr<const float> dy, gptr<const float> probs,
                                     gptr<const unsigned> routes, gptr<float> dout, int rows,
                                     int ne, int d) {
  const long total = long(rows) * d;
  for (long x = blockIdx.x * long(blockDim.x) + threadIdx.x; x < total;
       x += long(gridDim.x) * blockDim.x) {
    long r = x / d, c = x % d;
    long t = routes[2 * r], e = routes[2 * r + 1];
    dout[x] = float(probs[t * ne + e]) * float(dy[t * d + c]);
  }
}
REPRO_KERNEL(moe_combine_backward)

// Combine backward, the gate's share: dprob[t, e] = <dy[t], o[r]> for t's rows r = (t, e), 0
// for the experts t did not choose (overwrites dprob [n, ne]). One block a token (grid n):
// the block zeroes the row, then its warps take t's rows in turn, a warp a dot.
__global__ void moe_dprob(gptr<const float> dy, gptr<const float> o, gptr<const unsigned> routes,
                          gptr<const unsigned> token_rows, gptr<float> dprob, int n, int ne,
                          int k, int d) {
  using namespace moe;
  (void)n;  // the grid
  const long t = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int e = threadIdx.x; e < ne; e += blockDim.x) dprob[t * ne + e] = 0.0f;
  __syncthreads();  // the zeros land before the chosen entries are written
  for (int slot = warp; slot < k; slot += warps) {
    long r = token_rows[t * k + slot];
    float s = 0.0f;
    for (int c = lane; c < d; c += 32) s += float(dy[t * d + c]) * float(o[r * d + c]);
    s = warp_sum(s);
    if (lane == 0) dprob[t * ne + routes[2 * r + 1]] = s;
  }
}
REPRO_KERNEL(moe_dprob)

// Softmax backward over all experts, one warp a token: dlogits = p (dp - sum(p dp)).
__global__ void moe_softmax_backward(gptr<const float> probs, gptr<const float> dprob,
                                     gptr<float> dlogits, int n, int ne) {
  using namespace moe;
  const int lane = threadIdx.x % 32;
  const long t = (blockIdx.x * long(blockDim.x) + threadIdx.x) / 32;
  if (t >= n) return;  // the whole warp
  const long row = t * ne;
  float s = 0.0f;
  for (int x = lane; x < ne; x += 32) s += float(probs[row + x]) * float(dprob[row + x]);
  s = warp_sum(s);
  for (int x = lane; x < ne; x += 32)
    dlogits[row + x] = float(probs[row + x]) * (float(dprob[row + x]) - s);
}
REPRO_KERNEL(moe_softmax_backward)

// dh[t] += sum of dhx over t's rows in token_rows order: one thread an element, grid-stride.
__global__ void moe_scatter_add(gptr<const float> dhx, gptr<const unsigned> token_rows,
                                gptr<float> dh, int n, int k, int d) {
  const long total = long(n) * d;
  for (long x = blockIdx.x * long(blockDim.x) + threadIdx.x; x < total;
       x += long(gridDim.x) * blockDim.x) {
    long t = x / d, c = x % d;
    float s = dh[x];
    for (int slot = 0; slot < k; slot++) s += float(dhx[long(token_rows[t * k + slot]) * d + c]);
    dh[x] = s;
  }
}
REPRO_KERNEL(moe_scatter_add)
