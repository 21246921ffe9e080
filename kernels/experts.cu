// Tiny linear experts gathered by index (sgatlin, sgatlin-gelu, PEER): y = sum over the selected
// slots (c, i) of coef * v[row], with a = u[row] . x and row = c * channel_stride + index.
// CPU twin: src/nn/cpu/experts.rs, whose operation order these kernels keep: the dot products in
// the twin's 32 partial sums and fold, the axpys in slot order with fused multiply-adds, the
// pool-row sums in token order. First versions for correctness, not speed. No float atomics.
#include "experts.cuh"

// x, y: [tokens, d]; scores, indices, a, coef, w: [tokens, channels, k]; u, v: [pool_rows, d].
// Writes y, a (u . x), coef, and for PEER w (the softmax of the scores over each channel's k);
// w is left as it is in the other modes, as the twin does. One block a token (grid-stride),
// EXPERT_BLOCK threads; dynamic shared memory: expert_token_shared_bytes, 2 floats a slot.
__global__ void experts_forward(gptr<const float> x, gptr<const float> scores,
                                gptr<const unsigned> indices, gptr<const float> u,
                                gptr<const float> v, gptr<float> a, gptr<float> coef,
                                gptr<float> w, gptr<float> y, int tokens, int d, int channels,
                                int k, int channel_stride, int mode) {
  SHARED_DYNAMIC(float, sh);  // [0, slots): a; [slots, 2 slots): coef
  const int slots = channels * k;
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (long t = blockIdx.x; t < tokens; t += gridDim.x) {
    const long s0 = t * slots;
    gptr<const float> xr = x + t * d;
    // One warp a slot: a = u[row] . x.
    for (int j = warp; j < slots; j += warps) {
      long row = experts_k::pool_row(indices, s0 + j, slots, k, channel_stride);
      float av = experts_k::warp_dot(u + row * d, xr, d);
      if (threadIdx.x % 32 == 0) sh[j] = av;
    }
    __syncthreads();
    // One thread a channel: the softmax (PEER) and the coefficients, in the twin's order.
    for (int c = threadIdx.x; c < channels; c += blockDim.x) {
      const long c0 = s0 + long(c) * k;
      if (mode == experts_k::kPeer) {
        float mx = scores[c0];
        for (int i = 1; i < k; i++) {
          float s = scores[c0 + i];
          mx = s > mx ? s : mx;
        }
        float sum = 0.0f;
        for (int i = 0; i < k; i++) {
          float e = expf(scores[c0 + i] - mx);
          w[c0 + i] = e;
          sum += e;
        }
        for (int i = 0; i < k; i++) w[c0 + i] = w[c0 + i] / sum;
      }
      for (int i = 0; i < k; i++) {
        const int j = c * k + i;
        const float av = sh[j], g = scores[c0 + i];
        float cf;
        if (mode == experts_k::kGatedLinear)
          cf = g * av;
        else if (mode == experts_k::kGatedGelu)
          cf = experts_k::gelu(g * av);
        else
          cf = experts_k::gelu(av) * w[c0 + i];
        a[c0 + i] = av;
        coef[c0 + i] = cf;
        sh[slots + j] = cf;
      }
    }
    __syncthreads();
    // One thread a column: y = sum of coef * v[row] in slot order.
    for (int col = threadIdx.x; col < d; col += blockDim.x) {
      float acc = 0.0f;
      for (int j = 0; j < slots; j++) {
        long row = experts_k::pool_row(indices, s0 + j, slots, k, channel_stride);
        acc = fmaf(sh[slots + j], v[row * d + col], acc);
      }
      y[t * d + col] = acc;
    }
    // No barrier needed here: the next token's first writes (a) follow the barrier after the
    // last reads of a, and its coefficient writes follow another barrier.
  }
}
REPRO_KERNEL(experts_forward)
