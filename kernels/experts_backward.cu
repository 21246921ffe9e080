// Backward of the gathered linear experts (sgatlin, sgatlin-gelu, PEER), without atomics.
// CPU twin: experts_backward in src/nn/cpu/experts.rs (the same sums in other fixed orders).
//
// The (token, channel, rank) pairs, one a slot, are grouped by pool row (a stable sort: slots
// increase within a row; kernels/sort.cu), then:
//   experts_bwd_keys    the pool row of every slot;
//   experts_bwd_pool    expert-stationary: one warp a tile of EXPERT_TILE consecutive pairs of
//                       the sorted order, the same work whatever the rows' lengths; per row
//                       piece v_r is loaded once and du_r, dv_r summed in registers; per pair
//                       dscores (PEER: the raw gradient of w) and da are written;
//   experts_bwd_fixup   adds the pieces of the rows that cross tile boundaries, in tile order;
//   experts_bwd_token   token-centric: dx += Σ da · u[row] in slot order, and PEER's softmax
//                       backward.
// The pool passes are templates over the pool element (experts_k::pool_elem): the `_bf16`
// kernels read bf16 pools.
#include "experts.cuh"

namespace experts_bwd {
constexpr int kPerLane = EXPERT_BACKWARD_MAX_D / 32;

using experts_k::warp_sum;

// Where row r's run begins in the grouped order.
__device__ unsigned run_begin(gptr<const unsigned> ends, unsigned r) {
  return r == 0 ? 0u : unsigned(ends[r - 1]);
}
}  // namespace experts_bwd

// keys[slot] = the pool row of slot (c * channel_stride + indices[slot]); n = tokens * slots.
// Grid-stride, one thread a slot.
__global__ void experts_bwd_keys(gptr<const unsigned> indices, gptr<unsigned> keys, int n,
                                 int slots, int k, int channel_stride) {
  for (long j = long(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += long(gridDim.x) * blockDim.x)
    keys[j] = unsigned(experts_k::pool_row(indices, j, slots, k, channel_stride));
}
REPRO_KERNEL(experts_bwd_keys)

// Expert-stationary pass. One warp a tile of `tile` consecutive pairs of order (tiles =
// ceil(n / tile), grid-stride over warps). The warp walks its tile in order; the lanes load the
// per-pair values 32 pairs at a time (one read each) and pass them round with shuffles. At each
// new row r: v_r into registers (lane l holds columns l, l + 32, ...), and du_r, dv_r
// accumulators: read from du, dv when the row's run begins in this tile (the warp owns it and
// writes it back once), zero when it began in an earlier tile (a continuation: its sums go to
// partial[tile], [2][d], for experts_bwd_fixup; only a tile's first row can be one). Per pair
// (token t): dc = v_r . dy_t, the coefficient from (g, a, w), dv_r += coef dy_t, dscores and
// da written, du_r += da x_t. No shared memory, no barriers: lanes exchange by shuffles only.
template <class P>
__device__ void experts_bwd_pool_warp(gptr<const float> x, gptr<const float> dy,
                                      gptr<const float> scores, gptr<const float> a,
                                      gptr<const float> w, gptr<const P> v,
                                      gptr<const unsigned> keys, gptr<const unsigned> order,
                                      gptr<const unsigned> ends, gptr<float> dscores,
                                      gptr<float> da, gptr<float> du, gptr<float> dv,
                                      gptr<float> partial, int n, int d, int slots, int mode,
                                      int tile) {
  using namespace experts_bwd;
  const int lane = threadIdx.x % 32;
  const long warps = long(gridDim.x) * (blockDim.x / 32);
  const long tiles = (long(n) + tile - 1) / tile;
  const bool peer = mode == experts_k::kPeer;
  for (long tl = long(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; tl < tiles;
       tl += warps) {
    const long e0 = tl * tile, e1 = e0 + tile < n ? e0 + tile : n;
    float vr[kPerLane], au[kPerLane], av[kPerLane], dyr[kPerLane];
    long row = -1;       // the row being summed
    bool owned = false;  // whether its run began in this tile
    // Writes the current row's sums: into du, dv if owned, else into partial[tl].
    auto flush = [&]() {
      gptr<float> pu = owned ? du + row * d : partial + tl * 2 * d;
      gptr<float> pv = owned ? dv + row * d : partial + tl * 2 * d + d;
#pragma unroll
      for (int i = 0; i < kPerLane; i++) {
        const int col = lane + 32 * i;
        if (col < d) {
          pu[col] = au[i];
          pv[col] = av[i];
        }
      }
    };
    for (long base = e0; base < e1; base += 32) {
      const int len = e1 - base < 32 ? int(e1 - base) : 32;
      // Lane l: the values of pair base + l.
      unsigned m_slot = 0, m_row = 0;
      float m_g = 0.0f, m_a = 0.0f, m_w = 0.0f;
      if (lane < len) {
        m_slot = order[base + lane];
        m_row = keys[m_slot];
        m_g = scores[m_slot];
        m_a = a[m_slot];
        if (peer) m_w = w[m_slot];
      }
      for (int p = 0; p < len; p++) {
        const unsigned slot = __shfl_sync(0xffffffffu, m_slot, p);
        const long r = long(__shfl_sync(0xffffffffu, m_row, p));
        const float g = __shfl_sync(0xffffffffu, m_g, p);
        const float ap = __shfl_sync(0xffffffffu, m_a, p);
        const float wp = __shfl_sync(0xffffffffu, m_w, p);
        if (r != row) {
          if (row >= 0) flush();
          row = r;
          // Only the tile's first row can have begun before the tile (lane 0 reads, the warp
          // follows).
          int first_owned = 1;
          if (base + p == e0 && lane == 0) first_owned = run_begin(ends, unsigned(r)) == e0;
          owned = base + p > e0 || __shfl_sync(0xffffffffu, first_owned, 0);
          gptr<const P> vrow = v + r * d;
#pragma unroll
          for (int i = 0; i < kPerLane; i++) {
            const int col = lane + 32 * i;
            const bool in = col < d;
            vr[i] = in ? experts_k::pool_elem(vrow, col) : 0.0f;
            au[i] = in && owned ? float(du[r * d + col]) : 0.0f;
            av[i] = in && owned ? float(dv[r * d + col]) : 0.0f;
          }
        }
        const long t = long(slot / unsigned(slots));
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < kPerLane; i++) {
          const int col = lane + 32 * i;
          dyr[i] = col < d ? float(dy[t * d + col]) : 0.0f;
          dot = fmaf(vr[i], dyr[i], dot);
        }
        const float dc = warp_sum(dot);
        float cf, ds, dap;
        if (peer) {
          const float ga = experts_k::gelu(ap);
          cf = ga * wp;
          ds = dc * ga;  // dw: experts_bwd_token finishes the softmax backward
          dap = dc * wp * experts_k::gelu_grad(ap);
        } else {
          const float z = g * ap;
          const bool gl = mode == experts_k::kGatedGelu;
          cf = gl ? experts_k::gelu(z) : z;
          const float dpre = gl ? dc * experts_k::gelu_grad(z) : dc;
          ds = dpre * ap;
          dap = dpre * g;
        }
        if (lane == 0) {
          dscores[slot] = ds;
          da[slot] = dap;
        }
#pragma unroll
        for (int i = 0; i < kPerLane; i++) {
          const int col = lane + 32 * i;
          if (col < d) {
            av[i] = fmaf(cf, dyr[i], av[i]);
            au[i] = fmaf(dap, float(x[t * d + col]), au[i]);
          }
        }
      }
    }
    if (row >= 0) flush();
  }
}

__global__ void experts_bwd_pool(gptr<const float> x, gptr<const float> dy,
                                 gptr<const float> scores, gptr<const float> a,
                                 gptr<const float> w, gptr<const float> v,
                                 gptr<const unsigned> keys, gptr<const unsigned> order,
                                 gptr<const unsigned> ends, gptr<float> dscores, gptr<float> da,
                                 gptr<float> du, gptr<float> dv, gptr<float> partial, int n,
                                 int d, int slots, int mode, int tile) {
  experts_bwd_pool_warp<float>(x, dy, scores, a, w, v, keys, order, ends, dscores, da, du, dv,
                               partial, n, d, slots, mode, tile);
}
REPRO_KERNEL(experts_bwd_pool)

__global__ void experts_bwd_pool_bf16(gptr<const float> x, gptr<const float> dy,
                                      gptr<const float> scores, gptr<const float> a,
                                      gptr<const float> w, gptr<const unsigned short> v,
                                      gptr<const unsigned> keys, gptr<const unsigned> order,
                                      gptr<const unsigned> ends, gptr<float> dscores,
                                      gptr<float> da, gptr<float> du, gptr<float> dv,
                                      gptr<float> partial, int n, int d, int slots, int mode,
                                      int tile) {
  experts_bwd_pool_warp<unsigned short>(x, dy, scores, a, w, v, keys, order, ends, dscores, da,
                                        du, dv, partial, n, d, slots, mode, tile);
}
REPRO_KERNEL(experts_bwd_pool_bf16)

// Fix-up of the rows that cross tiles: the warp of tile tl (same tiling and grid as
// experts_bwd_pool) takes its last row r when r's run begins in tl and ends past it, and adds
// into du_r, dv_r (which tl's warp wrote) the pieces the later tiles of the run left in
// partial, in tile order. Every crossing row has exactly one such tile; no atomics.
__global__ void experts_bwd_fixup(gptr<const unsigned> keys, gptr<const unsigned> order,
                                  gptr<const unsigned> ends, gptr<const float> partial,
                                  gptr<float> du, gptr<float> dv, int n, int d, int tile) {
  using namespace experts_bwd;
  const int lane = threadIdx.x % 32;
  const long warps = long(gridDim.x) * (blockDim.x / 32);
  const long tiles = (long(n) + tile - 1) / tile;
  for (long tl = long(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; tl < tiles;
       tl += warps) {
    const long e0 = tl * tile, e1 = e0 + tile;
    if (e1 >= n) continue;  // the last tile: nothing runs past it
    // Lane 0 reads what decides; the warp follows its broadcast.
    unsigned r = 0, end = 0;
    int take = 0;
    if (lane == 0) {
      r = keys[order[e1 - 1]];
      end = ends[r];
      take = end > e1 && run_begin(ends, r) >= e0;
    }
    take = __shfl_sync(0xffffffffu, take, 0);
    if (!take) continue;
    r = __shfl_sync(0xffffffffu, r, 0);
    end = __shfl_sync(0xffffffffu, end, 0);
    const long last = (long(end) - 1) / tile;
    for (int col = lane; col < d; col += 32) {
      const long o = long(r) * d + col;
      float su = du[o], sv = dv[o];
      for (long q = tl + 1; q <= last; q++) {
        su += partial[q * 2 * d + col];
        sv += partial[q * 2 * d + d + col];
      }
      du[o] = su;
      dv[o] = sv;
    }
  }
}
REPRO_KERNEL(experts_bwd_fixup)

// Token-centric pass, one warp a token (grid-stride): dx_t += Σ over its slots, in slot order,
// of da · u[row] (dx read and written once; lane l keeps columns l, l + 32, ...; rows in
// groups whose loads do not wait on each other). In PEER mode, then, per channel the softmax
// backward: dscores = w (dw - Σ_k dw w), dw being what experts_bwd_pool left in dscores.
template <class P>
__device__ void experts_bwd_token_warp(gptr<const P> u, gptr<const unsigned> keys,
                                       gptr<const float> da, gptr<const float> w,
                                       gptr<float> dscores, gptr<float> dx, int tokens, int d,
                                       int channels, int k, int mode) {
  using namespace experts_bwd;
  constexpr int kGroup = 4;
  const int lane = threadIdx.x % 32;
  const long warps = long(gridDim.x) * (blockDim.x / 32);
  const int slots = channels * k;
  for (long t = long(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; t < tokens;
       t += warps) {
    const long s0 = t * slots;
    float acc[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; i++) {
      const int col = lane + 32 * i;
      acc[i] = col < d ? float(dx[t * d + col]) : 0.0f;
    }
    for (int base = 0; base < slots; base += 32) {
      const int len = slots - base < 32 ? slots - base : 32;
      unsigned m_row = 0;
      float m_da = 0.0f;
      if (lane < len) {
        m_row = keys[s0 + base + lane];
        m_da = da[s0 + base + lane];
      }
      for (int p = 0; p < len; p += kGroup) {
        long rows[kGroup];
        float f[kGroup];
#pragma unroll
        for (int q = 0; q < kGroup; q++) {
          // Past the end: a zero factor on row 0 that is never read.
          const int src = p + q < len ? p + q : p;
          rows[q] = long(__shfl_sync(0xffffffffu, m_row, src));
          f[q] = __shfl_sync(0xffffffffu, m_da, src);
        }
#pragma unroll
        for (int i = 0; i < kPerLane; i++) {
          const int col = lane + 32 * i;
          if (col < d)
#pragma unroll
            for (int q = 0; q < kGroup; q++)
              if (p + q < len) acc[i] = fmaf(f[q], experts_k::pool_elem(u + rows[q] * d, col), acc[i]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kPerLane; i++) {
      const int col = lane + 32 * i;
      if (col < d) dx[t * d + col] = acc[i];
    }
    if (mode != experts_k::kPeer) continue;
    // One channel at a time, its k slots over the lanes (lane l: l, l + 32, ...). Up to 32 a
    // channel, dw and w stay in registers; beyond, the second loop reads them again.
    for (int c = 0; c < channels; c++) {
      const long c0 = s0 + long(c) * k;
      float dw0 = 0.0f, w0 = 0.0f, part = 0.0f;
      for (int i = lane; i < k; i += 32) {
        const float dwi = dscores[c0 + i], wi = w[c0 + i];
        if (i < 32) dw0 = dwi, w0 = wi;
        part = fmaf(dwi, wi, part);
      }
      const float sum = warp_sum(part);
      for (int i = lane; i < k; i += 32) {
        const float dwi = i < 32 ? dw0 : float(dscores[c0 + i]);
        const float wi = i < 32 ? w0 : float(w[c0 + i]);
        dscores[c0 + i] = wi * (dwi - sum);
      }
    }
  }
}

__global__ void experts_bwd_token(gptr<const float> u, gptr<const unsigned> keys,
                                  gptr<const float> da, gptr<const float> w,
                                  gptr<float> dscores, gptr<float> dx, int tokens, int d,
                                  int channels, int k, int mode) {
  experts_bwd_token_warp<float>(u, keys, da, w, dscores, dx, tokens, d, channels, k, mode);
}
REPRO_KERNEL(experts_bwd_token)

__global__ void experts_bwd_token_bf16(gptr<const unsigned short> u, gptr<const unsigned> keys,
                                       gptr<const float> da, gptr<const float> w,
                                       gptr<float> dscores, gptr<float> dx, int tokens, int d,
                                       int channels, int k, int mode) {
  experts_bwd_token_warp<unsigned short>(u, keys, da, w, dscores, dx, tokens, d, channels, k,
                                         mode);
}
REPRO_KERNEL(experts_bwd_token_bf16)
