// Causal multi-head attention, flash style: no [seq, seq] matrix in device memory.
// q, k, v, out, dout, dq, dk, dv: [batch * seq, heads * hd]; lse, delta: [batch, heads, seq].
// CPU twin: src/nn/cpu/attention.rs (same layout and scale 1 / sqrt(hd)).
//
// A block owns ATTN_TILE rows (queries, or keys in dkdv) of one (head, batch): grid
// (ceil(seq / ATTN_TILE), heads, batch). Each row is a group of LANES adjacent lanes of one
// warp; lane l keeps columns l, l + LANES, ... of its row in registers, so hd <= ATTN_MAX_HEAD_DIM.
// A score is the group's partial dots summed by a butterfly, which gives every lane the same
// bits (float addition commutes), so all lanes of a row take the same branches.
// The other side's tile (keys and values, or queries and output gradients) goes through
// dynamic shared memory: 2 * ATTN_TILE * hd floats. Rows past seq compute on zeros and write
// nothing; every lane runs the same loops, as the shuffles need.
#include "common.cuh"

namespace attn {

constexpr int LANES = ATTN_THREADS / ATTN_TILE;
constexpr int COLS = ATTN_MAX_HEAD_DIM / LANES;
static_assert(LANES >= 1 && LANES <= 32 && (LANES & (LANES - 1)) == 0, "a row's lanes in one warp");
static_assert(COLS * LANES == ATTN_MAX_HEAD_DIM, "columns split evenly over a row's lanes");

// Below every score; exp(lowest - finite) is 0, never NaN as -inf - -inf would be.
constexpr float LOWEST = -3.0e38f;

__device__ float group_sum(float x) {
  for (int m = LANES / 2; m > 0; m /= 2) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

// Computed in double as the twin does, so that both round the same value.
__device__ float scale_of(int hd) { return float(1.0 / sqrt(double(hd))); }

// Rows r0 .. r0 + ATTN_TILE of two [.., d] matrices (head columns from `base`) into tile[0..]
// and tile[ATTN_TILE * hd ..]; zeros past seq.
// Tile: a shared pointer on a GPU, the emulator's shared_dynamic (by value) on the host.
template <class Tile>
__device__ void load_pair(Tile tile, gptr<const float> a, gptr<const float> b, long base,
                          long d, int r0, int seq, int hd) {
  for (int x = threadIdx.x; x < ATTN_TILE * hd; x += blockDim.x) {
    int r = r0 + x / hd, col = x % hd;
    bool in = r < seq;
    tile[x] = in ? float(a[base + r * d + col]) : 0.0f;
    tile[ATTN_TILE * hd + x] = in ? float(b[base + r * d + col]) : 0.0f;
  }
}

// One head row's columns owned by this lane (zeros past seq or hd).
__device__ void load_row(float (&reg)[COLS], gptr<const float> a, long at, bool in, int lane,
                         int hd) {
#pragma unroll
  for (int jj = 0; jj < COLS; jj++) {
    int col = lane + LANES * jj;
    reg[jj] = (in && col < hd) ? float(a[at + col]) : 0.0f;
  }
}

// <reg, tile row c> over the whole row (the group's sum).
template <class Tile>
__device__ float row_dot(const float (&reg)[COLS], Tile tile, int offset, int lane, int hd) {
  float part = 0.0f;
#pragma unroll
  for (int jj = 0; jj < COLS; jj++) {
    int col = lane + LANES * jj;
    if (col < hd) part += reg[jj] * tile[offset + col];
  }
  return group_sum(part);
}

}  // namespace attn

// Forward: online softmax over key tiles. out = softmax(scale q k^T, causal) v and
// lse = log-sum-exp of each query's scaled scores (what backward needs instead of P).
__global__ void attention_forward(gptr<const float> q, gptr<const float> k, gptr<const float> v,
                                  gptr<float> out, gptr<float> lse, int batch, int seq,
                                  int heads, int hd) {
  using namespace attn;
  (void)batch;  // the grid's z
  SHARED_DYNAMIC(float, kv);
  const int lane = threadIdx.x % LANES, row = threadIdx.x / LANES;
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * ATTN_TILE, i = i0 + row;
  const long d = long(heads) * hd, base = long(b) * seq * d + long(h) * hd;
  const float scale = scale_of(hd);
  float qr[COLS], o[COLS];
  load_row(qr, q, base + i * d, i < seq, lane, hd);
#pragma unroll
  for (int jj = 0; jj < COLS; jj++) o[jj] = 0.0f;
  float m = LOWEST, l = 0.0f;
  // Key 0 is in the first tile and visible to every row (padding rows included), so m is a
  // real score after it.
  const int last = i0 + ATTN_TILE < seq ? i0 + ATTN_TILE : seq;
  for (int j0 = 0; j0 < last; j0 += ATTN_TILE) {
    load_pair(kv, k, v, base, d, j0, seq, hd);
    __syncthreads();
    float s[ATTN_TILE];
    float mt = m;
#pragma unroll
    for (int c = 0; c < ATTN_TILE; c++) {
      s[c] = row_dot(qr, kv, c * hd, lane, hd) * scale;
      int j = j0 + c;
      if (j <= i && j < seq) mt = fmaxf(mt, s[c]);
    }
    const float alpha = expf(m - mt);
    l *= alpha;
#pragma unroll
    for (int jj = 0; jj < COLS; jj++) o[jj] *= alpha;
#pragma unroll
    for (int c = 0; c < ATTN_TILE; c++) {
      int j = j0 + c;
      float p = (j <= i && j < seq) ? expf(s[c] - mt) : 0.0f;
      l += p;
#pragma unroll
      for (int jj = 0; jj < COLS; jj++) {
        int col = lane + LANES * jj;
        if (col < hd) o[jj] += p * kv[(ATTN_TILE + c) * hd + col];
      }
    }
    m = mt;
    __syncthreads();  // everyone is done with this tile before the next overwrites it
  }
  if (i < seq) {
    const float inv = 1.0f / l;
#pragma unroll
    for (int jj = 0; jj < COLS; jj++) {
      int col = lane + LANES * jj;
      if (col < hd) out[base + i * d + col] = o[jj] * inv;
    }
    if (lane == 0) lse[(long(b) * heads + h) * seq + i] = m + logf(l);
  }
}
REPRO_KERNEL(attention_forward)

// Backward, step 1: delta = rowsum(dout * out) per (batch, head, query), which equals
// sum_j P_ij dP_ij. One thread a row.
__global__ void attention_backward_delta(gptr<const float> dout, gptr<const float> out,
                                         gptr<float> delta, int batch, int seq, int heads,
                                         int hd) {
  const long rows = long(batch) * heads * seq, d = long(heads) * hd;
  for (long x = blockIdx.x * long(blockDim.x) + threadIdx.x; x < rows;
       x += long(gridDim.x) * blockDim.x) {
    long i = x % seq, bh = x / seq, h = bh % heads, b = bh / heads;
    long at = (b * seq + i) * d + h * hd;
    float s = 0.0f;
    for (int col = 0; col < hd; col++) s += float(dout[at + col]) * float(out[at + col]);
    delta[x] = s;
  }
}
REPRO_KERNEL(attention_backward_delta)

// Backward, step 2: a block owns ATTN_TILE keys and walks the query tiles that see them,
// recomputing P = exp(scale q k - lse); dv = sum_i P_ij dout_i, dk = sum_i dS_ij q_i with
// dS = P (dP - delta) scale. Overwrites dk and dv; no atomics (each key row is one group's).
__global__ void attention_backward_dkdv(gptr<const float> q, gptr<const float> k,
                                        gptr<const float> v, gptr<const float> dout,
                                        gptr<const float> lse, gptr<const float> delta,
                                        gptr<float> dk, gptr<float> dv, int batch, int seq,
                                        int heads, int hd) {
  using namespace attn;
  (void)batch;  // the grid's z
  SHARED_DYNAMIC(float, qd);
  SHARED_ARRAY(float, lse_t, ATTN_TILE);
  SHARED_ARRAY(float, delta_t, ATTN_TILE);
  const int lane = threadIdx.x % LANES, row = threadIdx.x / LANES;
  const int b = blockIdx.z, h = blockIdx.y, j0 = blockIdx.x * ATTN_TILE, j = j0 + row;
  const long d = long(heads) * hd, base = long(b) * seq * d + long(h) * hd;
  const long stats = (long(b) * heads + h) * seq;
  const float scale = scale_of(hd);
  float kr[COLS], vr[COLS], dka[COLS], dva[COLS];
  load_row(kr, k, base + j * d, j < seq, lane, hd);
  load_row(vr, v, base + j * d, j < seq, lane, hd);
#pragma unroll
  for (int jj = 0; jj < COLS; jj++) dka[jj] = dva[jj] = 0.0f;
  // Queries before j0 see none of these keys.
  for (int i0 = j0; i0 < seq; i0 += ATTN_TILE) {
    load_pair(qd, q, dout, base, d, i0, seq, hd);
    if (threadIdx.x < ATTN_TILE) {
      int i = i0 + threadIdx.x;
      lse_t[threadIdx.x] = i < seq ? float(lse[stats + i]) : 0.0f;
      delta_t[threadIdx.x] = i < seq ? float(delta[stats + i]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < ATTN_TILE; c++) {
      int i = i0 + c;
      float s = row_dot(kr, qd, c * hd, lane, hd) * scale;
      float dp = row_dot(vr, qd, (ATTN_TILE + c) * hd, lane, hd);
      float p = (i < seq && j <= i) ? expf(s - lse_t[c]) : 0.0f;
      float ds = p * (dp - delta_t[c]) * scale;
#pragma unroll
      for (int jj = 0; jj < COLS; jj++) {
        int col = lane + LANES * jj;
        if (col < hd) {
          dva[jj] += p * qd[(ATTN_TILE + c) * hd + col];
          dka[jj] += ds * qd[c * hd + col];
        }
      }
    }
    __syncthreads();  // the tile and its statistics are read before the next overwrites them
  }
  if (j < seq) {
#pragma unroll
    for (int jj = 0; jj < COLS; jj++) {
      int col = lane + LANES * jj;
      if (col < hd) {
        dk[base + j * d + col] = dka[jj];
        dv[base + j * d + col] = dva[jj];
      }
    }
  }
}
REPRO_KERNEL(attention_backward_dkdv)

// Backward, step 3: a block owns ATTN_TILE queries and walks the key tiles they see;
// dq = sum_j dS_ij k_j. Overwrites dq.
__global__ void attention_backward_dq(gptr<const float> q, gptr<const float> k,
                                      gptr<const float> v, gptr<const float> dout,
                                      gptr<const float> lse, gptr<const float> delta,
                                      gptr<float> dq, int batch, int seq, int heads, int hd) {
  using namespace attn;
  (void)batch;  // the grid's z
  SHARED_DYNAMIC(float, kv);
  const int lane = threadIdx.x % LANES, row = threadIdx.x / LANES;
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * ATTN_TILE, i = i0 + row;
  const long d = long(heads) * hd, base = long(b) * seq * d + long(h) * hd;
  const long stats = (long(b) * heads + h) * seq;
  const float scale = scale_of(hd);
  float qr[COLS], dor[COLS], dqa[COLS];
  load_row(qr, q, base + i * d, i < seq, lane, hd);
  load_row(dor, dout, base + i * d, i < seq, lane, hd);
#pragma unroll
  for (int jj = 0; jj < COLS; jj++) dqa[jj] = 0.0f;
  const float li = i < seq ? float(lse[stats + i]) : 0.0f;
  const float di = i < seq ? float(delta[stats + i]) : 0.0f;
  const int last = i0 + ATTN_TILE < seq ? i0 + ATTN_TILE : seq;
  for (int j0 = 0; j0 < last; j0 += ATTN_TILE) {
    load_pair(kv, k, v, base, d, j0, seq, hd);
    __syncthreads();
#pragma unroll
    for (int c = 0; c < ATTN_TILE; c++) {
      int j = j0 + c;
      float s = row_dot(qr, kv, c * hd, lane, hd) * scale;
      float dp = row_dot(dor, kv, (ATTN_TILE + c) * hd, lane, hd);
      float p = (i < seq && j <= i) ? expf(s - li) : 0.0f;
      float ds = p * (dp - di) * scale;
#pragma unroll
      for (int jj = 0; jj < COLS; jj++) {
        int col = lane + LANES * jj;
        if (col < hd) dqa[jj] += ds * kv[c * hd + col];
      }
    }
    __syncthreads();  // the tile is read before the next overwrites it
  }
  if (i < seq) {
#pragma unroll
    for (int jj = 0; jj < COLS; jj++) {
      int col = lane + LANES * jj;
      if (col < hd) dq[base + i * d + col] = dqa[jj];
    }
  }
}
REPRO_KERNEL(attention_backward_dq)
