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
