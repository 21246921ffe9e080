// Tiny linear experts gathered by index (sgatlin, sgatlin-gelu, PEER): y = sum over the selected
// slots (c, i) of coef * v[row], with a = u[row] . x and row = c * channel_stride + index.
// CPU twin: src/nn/cpu/experts.rs, whose operation order these kernels keep: the dot products in
// the twin's 32 partial sums and fold, the axpys in slot order with fused multiply-adds, the
// pool-row sums in token order. No float atomics.
#include "experts.cuh"

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
  constexpr int V = EXPERT_MAX_D / 32, KC = EXPERT_MAX_K / 32, R = EXPERT_ROWS_IN_FLIGHT;
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
#pragma unroll
          for (int r = 0; r < R; r++)
#pragma unroll
            for (int e = 0; e < V; e++)
              if (j + r < n && e * 32 + lane < d)
                rows[r][e] = experts_k::pool_elem(u, row[r] * d + e * 32 + lane);
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
#pragma unroll
          for (int r = 0; r < R; r++)
#pragma unroll
            for (int e = 0; e < V; e++)
              if (j + r < n && e * 32 + lane < d)
                rows[r][e] = experts_k::pool_elem(v, row[r] * d + e * 32 + lane);
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

// Until the new backward lands (it recomputes the coefficient itself; the merge drops this):
// coef = the forward's coefficient of each of n slots from (g, a, w), for the old
// experts_backward_pool. One thread a slot.
__global__ void experts_coef_until_new_backward(gptr<const float> scores, gptr<const float> a,
                                                gptr<const float> w, gptr<float> coef, int n,
                                                int mode) {
  for (long j = long(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += long(gridDim.x) * blockDim.x) {
    const float g = scores[j], av = a[j];
    coef[j] = mode == experts_k::kGatedLinear ? g * av
              : mode == experts_k::kGatedGelu ? experts_k::gelu(g * av)
                                              : experts_k::gelu(av) * w[j];
  }
}
REPRO_KERNEL(experts_coef_until_new_backward)

// Backward, pass 1, one block a token (grid-stride): dscores and da (overwritten, [tokens,
// channels, k]), and dx += sum over slots of da * u[row] (in slot order). a, w: what
// experts_forward saved. Dynamic shared memory: expert_token_shared_bytes.
__global__ void experts_backward_token(gptr<const float> scores, gptr<const unsigned> indices,
                                       gptr<const float> u, gptr<const float> v,
                                       gptr<const float> a, gptr<const float> w,
                                       gptr<const float> dy, gptr<float> dscores, gptr<float> da,
                                       gptr<float> dx, int tokens, int d, int channels, int k,
                                       int channel_stride, int mode) {
  SHARED_DYNAMIC(float, sh);  // [0, slots): d(coef); [slots, 2 slots): da
  const int slots = channels * k;
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (long t = blockIdx.x; t < tokens; t += gridDim.x) {
    const long s0 = t * slots;
    gptr<const float> dyr = dy + t * d;
    for (int j = warp; j < slots; j += warps) {
      long row = experts_k::pool_row(indices, s0 + j, slots, k, channel_stride);
      float dc = experts_k::warp_dot(v + row * d, dyr, d);
      if (threadIdx.x % 32 == 0) sh[j] = dc;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < channels; c += blockDim.x) {
      const long c0 = s0 + long(c) * k;
      float dw_dot_w = 0.0f;
      for (int i = 0; i < k; i++) {
        const int j = c * k + i;
        const float dc = sh[j], g = scores[c0 + i], av = a[c0 + i];
        float ds, dav;
        if (mode == experts_k::kPeer) {
          const float wi = w[c0 + i];
          const float dw = dc * experts_k::gelu(av);
          ds = dw;  // the softmax backward below
          dw_dot_w += dw * wi;
          dav = dc * wi * experts_k::gelu_grad(av);
        } else {
          const float dpre = mode == experts_k::kGatedGelu ? dc * experts_k::gelu_grad(g * av) : dc;
          ds = dpre * av;
          dav = dpre * g;
        }
        dscores[c0 + i] = ds;
        da[c0 + i] = dav;
        sh[slots + j] = dav;
      }
      if (mode == experts_k::kPeer)
        for (int i = 0; i < k; i++) {
          const float wi = w[c0 + i];
          dscores[c0 + i] = wi * (dscores[c0 + i] - dw_dot_w);
        }
    }
    __syncthreads();
    for (int col = threadIdx.x; col < d; col += blockDim.x) {
      float acc = dx[t * d + col];
      for (int j = 0; j < slots; j++) {
        long row = experts_k::pool_row(indices, s0 + j, slots, k, channel_stride);
        acc = fmaf(sh[slots + j], u[row * d + col], acc);
      }
      dx[t * d + col] = acc;
    }
  }
}
REPRO_KERNEL(experts_backward_token)

// Backward, the slots grouped by pool row: a stable counting sort by one block, no atomics.
// Writes order (n = tokens * channels * k slots, grouped by row, increasing slot within a row)
// and ends[r] (the end of row r's group in order; it begins at ends[r - 1], or 0). Slots go in
// chunks of blockDim.x; in a chunk each thread finds, for its slot's row, how many earlier
// slots of the chunk share it (its place after those the earlier chunks put there), and the
// last of them moves the row's cursor on. EXPERT_SORT_BLOCK threads, one block.
__global__ void experts_slot_order(gptr<const unsigned> indices, gptr<unsigned> ends,
                                   gptr<unsigned> order, int tokens, int channels, int k,
                                   int channel_stride, int pool_rows) {
  SHARED_ARRAY(unsigned, rows, EXPERT_SORT_BLOCK);
  if (blockIdx.x != 0) return;
  const int slots = channels * k;
  const long n = long(tokens) * slots;
  const unsigned me = threadIdx.x;
  for (int r = me; r < pool_rows; r += blockDim.x) ends[r] = 0;
  // Pass 0 counts each row's slots into ends; then ends becomes the rows' starts (thread 0,
  // in row order); pass 1 places each slot at its row's cursor and leaves ends[r] at the end.
  for (int pass = 0; pass < 2; pass++) {
    __syncthreads();
    if (pass == 1 && me == 0) {
      unsigned start = 0;
      for (int r = 0; r < pool_rows; r++) {
        unsigned count = ends[r];
        ends[r] = start;
        start += count;
      }
    }
    for (long base = 0; base < n; base += blockDim.x) {
      const long j = base + me;
      const unsigned len = n - base < long(blockDim.x) ? unsigned(n - base) : blockDim.x;
      unsigned row = 0;
      if (me < len) {
        row = unsigned(experts_k::pool_row(indices, j, slots, k, channel_stride));
        rows[me] = row;
      }
      __syncthreads();
      unsigned earlier = 0;
      bool last = true;
      if (me < len) {
        for (unsigned i = 0; i < len; i++) {
          if (rows[i] != row) continue;
          if (i < me) earlier++;
          if (i > me) last = false;
        }
        if (pass == 1) order[ends[row] + earlier] = unsigned(j);
      }
      // Every thread has read its row's cursor (and rows) before the last moves it.
      __syncthreads();
      if (me < len && last) ends[row] += earlier + 1;
    }
  }
}
REPRO_KERNEL(experts_slot_order)

// Backward, pass 2, one block a pool row (grid-stride), one thread a column: du[r] += sum of
// da * x[token] and dv[r] += sum of coef * dy[token] over the row's slots in slot (token) order,
// as the twin. order, ends: experts_slot_order. Rows no slot chose are not touched.
__global__ void experts_backward_pool(gptr<const float> x, gptr<const float> dy,
                                      gptr<const float> da, gptr<const float> coef,
                                      gptr<const unsigned> ends, gptr<const unsigned> order,
                                      gptr<float> du, gptr<float> dv, int pool_rows, int slots,
                                      int d) {
  for (int r = blockIdx.x; r < pool_rows; r += gridDim.x) {
    const unsigned begin = r == 0 ? 0u : unsigned(ends[r - 1]), end = ends[r];
    if (begin == end) continue;
    for (int col = threadIdx.x; col < d; col += blockDim.x) {
      const long o = long(r) * d + col;
      float acc_u = du[o], acc_v = dv[o];
      for (unsigned e = begin; e < end; e++) {
        const unsigned slot = order[e];
        const long xo = long(slot / unsigned(slots)) * d + col;
        acc_u = fmaf(da[slot], x[xo], acc_u);
        acc_v = fmaf(coef[slot], dy[xo], acc_v);
      }
      du[o] = acc_u;
      dv[o] = acc_v;
    }
  }
}
REPRO_KERNEL(experts_backward_pool)
