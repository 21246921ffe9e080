// Tiny linear experts gathered by index (sgatlin, sgatlin-gelu, PEER): y = sum over the selected
// slots (c, i) of coef * v[row], with a = u[row] . x and row = c * channel_stride + index.
// CPU twin: src/nn/cpu/experts.rs, whose operation order these kernels keep: the dot products in
// the twin's 32 partial sums and fold, the axpys in slot order with fused multiply-adds, the
// pool-row sums in token order. No float atomics.
#include "experts.cuh"

// Rows row[0..R) of a pool into registers, widened to f32 (lane l holds elements l, l + 32, ...
// of each), every load issued before any is used; rows j + r >= n are left alone.
template <int R, int V, class P>
__device__ void load_rows(float (&rows)[R][V], gptr<const P> pool, const long (&row)[R], int j,
                          int n, int d, int lane) {
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int e = 0; e < V; e++)
      if (j + r < n && e * 32 + lane < d)
        rows[r][e] = experts_k::pool_elem(pool, row[r] * d + e * 32 + lane);
}

// The forward, fused and token-centric (KERNELS.md (c) K2): one warp a token, EXPERT_WARPS warps
// a block, grid-stride over tokens. x_t and the f32 accumulator y_t live in registers (lane l
// holds elements l, l + 32, ...; d <= EXPERT_MAX_D), so x is read and y written once. Per channel
// the k (index, score) are read once (lane l holds slots l, l + 32, ...; k <= EXPERT_MAX_K) and
// broadcast by shuffles; the u rows come EXPERT_ROWS_IN_FLIGHT at a time, all their loads issued
// before the dots, a = u . x by the butterfly (every lane has it), the coefficient by mode, then
// the same rows of v and y += coef * v. Saves a per slot and, for PEER, the softmax weight w;
// the coefficient is not written (the backward recomputes it from g, a, w). P: the pool element
// type (experts_k::pool_elem reads it as f32).
template <class P>
__device__ void experts_forward_warp(gptr<const float> x, gptr<const float> scores,
                                     gptr<const unsigned> indices, gptr<const P> u,
                                     gptr<const P> v, gptr<float> a, gptr<float> w,
                                     gptr<float> y, int tokens, int d, int channels, int k,
                                     int channel_stride, int mode) {
  // bf16 rows in flight at once: one fewer (ptxas spills two widened rows at d = 1024).
  constexpr int V = EXPERT_MAX_D / 32, KC = EXPERT_MAX_K / 32,
                R = sizeof(P) == 4 ? EXPERT_ROWS_IN_FLIGHT : EXPERT_ROWS_IN_FLIGHT - 1;
  constexpr unsigned all = 0xffffffffu;
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const long stride = long(gridDim.x) * warps;
  // The twin's dot: 32-element chunks into 32 partial sums, then the tail past the last one.
  const int full = d - d % 32, tail = d % 32;
  for (long t = long(blockIdx.x) * warps + threadIdx.x / 32; t < tokens; t += stride) {
    float xr[V], yr[V];
#pragma unroll
    for (int e = 0; e < V; e++) {
      const int i = e * 32 + lane;
      xr[e] = i < d ? x[t * d + i] : 0.0f;
      yr[e] = 0.0f;
    }
    // This lane's element of the tail chunk (lane < tail), picked with constant indices so the
    // arrays stay in registers.
    float xt = 0.0f;
#pragma unroll
    for (int e = 0; e < V; e++)
      if (e * 32 == full) xt = xr[e];
    for (int c = 0; c < channels; c++) {
      const long c0 = (t * channels + c) * k, base = long(c) * channel_stride;
      unsigned ix[KC];
      float g[KC], wv[KC], av[KC];
#pragma unroll
      for (int ch = 0; ch < KC; ch++) {
        const int i = ch * 32 + lane;
        ix[ch] = i < k ? indices[c0 + i] : 0u;
        g[ch] = i < k ? scores[c0 + i] : 0.0f;
        wv[ch] = 0.0f;
        av[ch] = 0.0f;
      }
      if (mode == experts_k::kPeer) {
        // Softmax over the channel's k scores: max and sum over the lanes' slots.
        float m = experts_k::kLowest;
#pragma unroll
        for (int ch = 0; ch < KC; ch++)
          if (ch * 32 + lane < k) m = fmaxf(m, g[ch]);
        m = experts_k::warp_max(m);
        float sum = 0.0f;
#pragma unroll
        for (int ch = 0; ch < KC; ch++) {
          wv[ch] = ch * 32 + lane < k ? expf(g[ch] - m) : 0.0f;
          sum += wv[ch];
        }
        sum = experts_k::warp_sum(sum);
#pragma unroll
        for (int ch = 0; ch < KC; ch++)
          if (ch * 32 + lane < k) {
            wv[ch] = wv[ch] / sum;
            w[c0 + ch * 32 + lane] = wv[ch];
          }
      }
#pragma unroll
      for (int ch = 0; ch < KC; ch++) {
        if (ch * 32 >= k) break;
        const int n = k - ch * 32 < 32 ? k - ch * 32 : 32;  // slots of this chunk
        for (int j = 0; j < n; j += R) {
          float rows[R][V], coef[R];
          long row[R];
#pragma unroll
          for (int r = 0; r < R; r++)
            row[r] = base + __shfl_sync(all, ix[ch], (j + r) % 32);
          // Every u load of the group before any dot: R rows in flight.
          load_rows(rows, u, row, j, n, d, lane);
#pragma unroll
          for (int r = 0; r < R; r++) {
            if (j + r >= n) break;
            float acc = 0.0f, ut = 0.0f;
#pragma unroll
            for (int e = 0; e < V; e++) {
              if (e * 32 < full) acc = fmaf(rows[r][e], xr[e], acc);
              if (e * 32 == full && lane < tail) ut = rows[r][e];
            }
            float tl = 0.0f;  // the tail in the twin's order, the same in every lane
            for (int q = 0; q < tail; q++)
              tl = fmaf(__shfl_sync(all, ut, q), __shfl_sync(all, xt, q), tl);
            const float ar = experts_k::warp_sum(acc) + tl;
            const float gr = __shfl_sync(all, g[ch], j + r);
            const float wr = __shfl_sync(all, wv[ch], j + r);
            if (lane == j + r) av[ch] = ar;
            coef[r] = mode == experts_k::kGatedLinear ? gr * ar
                      : mode == experts_k::kGatedGelu ? experts_k::gelu(gr * ar)
                                                      : experts_k::gelu(ar) * wr;
          }
          load_rows(rows, v, row, j, n, d, lane);
          // y += coef * v in slot order, as the twin's axpys.
#pragma unroll
          for (int r = 0; r < R; r++)
#pragma unroll
            for (int e = 0; e < V; e++)
              if (j + r < n && e * 32 + lane < d) yr[e] = fmaf(coef[r], rows[r][e], yr[e]);
        }
        if (ch * 32 + lane < k) a[c0 + ch * 32 + lane] = av[ch];
      }
    }
#pragma unroll
    for (int e = 0; e < V; e++)
      if (e * 32 + lane < d) y[t * d + e * 32 + lane] = yr[e];
  }
}

// x, y: [tokens, d]; scores, indices, a, w: [tokens, channels, k]; u, v: [pool_rows, d] (f32).
// Writes y, a and, for PEER, w (left as it is in the other modes, as the twin does). Needs
// d <= EXPERT_MAX_D and k <= EXPERT_MAX_K (the backend checks). Launch: experts_forward_dims.
__global__ void experts_forward(gptr<const float> x, gptr<const float> scores,
                                gptr<const unsigned> indices, gptr<const float> u,
                                gptr<const float> v, gptr<float> a, gptr<float> w, gptr<float> y,
                                int tokens, int d, int channels, int k, int channel_stride,
                                int mode) {
  experts_forward_warp<float>(x, scores, indices, u, v, a, w, y, tokens, d, channels, k,
                              channel_stride, mode);
}
REPRO_KERNEL(experts_forward)

// The same with bf16 pools (u, v as unsigned short bf16 bits, widened to f32 on load).
__global__ void experts_forward_bf16(gptr<const float> x, gptr<const float> scores,
                                     gptr<const unsigned> indices, gptr<const unsigned short> u,
                                     gptr<const unsigned short> v, gptr<float> a, gptr<float> w,
                                     gptr<float> y, int tokens, int d, int channels, int k,
                                     int channel_stride, int mode) {
  experts_forward_warp<unsigned short>(x, scores, indices, u, v, a, w, y, tokens, d, channels, k,
                                       channel_stride, mode);
}
REPRO_KERNEL(experts_forward_bf16)
