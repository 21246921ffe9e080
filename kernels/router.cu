// Product-key top-k: per (token, channel), the top k of s1[a] + s2[b] over the sqrt_n x sqrt_n
// grid of the two halves' sub-key logits. CPU twin: src/nn/cpu/router.rs (the same ties: lower
// index first in each half, then earlier in (rank in half 1, rank in half 2) order, as
// jax.lax.top_k on the k x k candidates). Every selection is by rank (how many entries beat
// it), so threads need no merging and the result never depends on timing.
#include "common.cuh"

namespace router_k {
// Whether score p comes before score q in descending order; a NaN comes after every number
// (so the order stays total and every rank below k is written exactly once).
__device__ bool before(float p, float q) {
  if (p != p) return false;
  if (q != q) return true;
  return p > q;
}
__device__ bool same(float p, float q) { return !before(p, q) && !before(q, p); }

// Candidates (a, b) whose (a + 1)(b + 1) <= k: all others have k pairs at least as good and
// earlier, so the top k lies among them. b ranges over [0, width(a)).
__device__ int width(int a, int m, int k) {
  int w = k / (a + 1);
  return w < m ? w : m;
}
}  // namespace router_k

// logits: [tokens, 2, channels, sqrt_n]; scores, indices: [tokens, channels, k], best first
// (overwritten). One block a (token, channel) pair (grid-stride). Dynamic shared memory:
// router_topk_shared_bytes (src/nn/cuda/experts.rs): the top m = min(k, sqrt_n) of each half,
// 2m floats then 2m unsigned.
__global__ void product_key_topk_forward(gptr<const float> logits, gptr<float> scores,
                                         gptr<unsigned> indices, int tokens, int channels,
                                         int sqrt_n, int k) {
  SHARED_DYNAMIC(float, top_s);
  SHARED_DYNAMIC(unsigned, top_i);
  const int m = k < sqrt_n ? k : sqrt_n;
  const long pairs = long(tokens) * channels;
  for (long p = blockIdx.x; p < pairs; p += gridDim.x) {
    const long t = p / channels;
    const int c = int(p - t * channels);
    // Each sub-key of each half: its rank in its half; the top m go to shared memory.
    for (int e = threadIdx.x; e < 2 * sqrt_n; e += blockDim.x) {
      const int h = e / sqrt_n, j = e - h * sqrt_n;
      gptr<const float> half = logits + (t * 2 * channels + long(h) * channels + c) * sqrt_n;
      const float s = half[j];
      int rank = 0;
      for (int q = 0; q < sqrt_n; q++) {
        float o = half[q];
        rank += router_k::before(o, s) || (q < j && router_k::same(o, s));
      }
      if (rank < m) {
        top_s[h * m + rank] = s;
        top_i[2 * m + h * m + rank] = unsigned(j);
      }
    }
    __syncthreads();
    // Each candidate, numbered in (a, b) order: its rank among the candidates.
    int count = 0;
    for (int a = 0; a < m; a++) count += router_k::width(a, m, k);
    for (int q = threadIdx.x; q < count; q += blockDim.x) {
      int a = 0, b = q;
      while (b >= router_k::width(a, m, k)) b -= router_k::width(a++, m, k);
      const float s = top_s[a] + top_s[m + b];
      int rank = 0, o = 0;
      for (int a2 = 0; a2 < m; a2++) {
        const float s1 = top_s[a2];
        for (int b2 = 0; b2 < router_k::width(a2, m, k); b2++, o++) {
          float s2 = s1 + top_s[m + b2];
          rank += router_k::before(s2, s) || (o < q && router_k::same(s2, s));
        }
      }
      if (rank < k) {
        const long out = p * k + rank;
        scores[out] = s;
        indices[out] = top_i[2 * m + a] * unsigned(sqrt_n) + top_i[3 * m + b];
      }
    }
    // The next pair overwrites the tops.
    __syncthreads();
  }
}
REPRO_KERNEL(product_key_topk_forward)

// dlogits (overwritten): each sub-key logit gathers d(score) of the selected experts it is part
// of, in slot order as the twin adds them (so the same bits). One thread a logit, grid-stride.
__global__ void product_key_topk_backward(gptr<const unsigned> indices, gptr<const float> dscores,
                                          gptr<float> dlogits, int tokens, int channels,
                                          int sqrt_n, int k) {
  const long per_token = 2L * channels * sqrt_n;
  const long n = tokens * per_token;
  for (long e = blockIdx.x * long(blockDim.x) + threadIdx.x; e < n;
       e += long(gridDim.x) * blockDim.x) {
    const long t = e / per_token;
    const int r = int(e - t * per_token);
    const int h = r / (channels * sqrt_n);
    const int c = (r / sqrt_n) % channels, j = r % sqrt_n;
    const long slot0 = (t * channels + c) * k;
    float acc = 0.0f;
    for (int i = 0; i < k; i++) {
      const unsigned idx = indices[slot0 + i];
      const unsigned sub = h == 0 ? idx / unsigned(sqrt_n) : idx % unsigned(sqrt_n);
      if (sub == unsigned(j)) acc += dscores[slot0 + i];
    }
    dlogits[e] = acc;
  }
}
REPRO_KERNEL(product_key_topk_backward)
