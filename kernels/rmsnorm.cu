// RMSNorm over the last axis with a learned scale: y = x * rstd * scale, rstd = 1/sqrt(mean(x²)
// + eps). CPU twin: src/nn/cpu/rmsnorm.rs (same eps, same operation order).
#include "common.cuh"

namespace rmsnorm_k {
// The block's total of v in a fixed tree (blockDim.x a power of two, at most ROW_BLOCK), given
// to every thread. The last barrier lets the next call reuse the array.
__device__ float block_sum(float v) {
  SHARED_ARRAY(float, partial, ROW_BLOCK);
  partial[threadIdx.x] = v;
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  float total = partial[0];
  __syncthreads();
  return total;
}
}  // namespace rmsnorm_k

// One block a row (grid-stride over rows). x, y: [rows, d]; scale: [d]; rstd: [rows].
__global__ void rmsnorm_forward(gptr<const float> x, gptr<const float> scale, gptr<float> y,
                                gptr<float> rstd, int rows, int d) {
  const float inv_d = float(1.0 / double(d));
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    long o = long(r) * d;
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      float v = x[o + i];
      s += v * v;
    }
    float inv = 1.0f / sqrtf(rmsnorm_k::block_sum(s) * inv_d + 1e-6f);
    if (threadIdx.x == 0) rstd[r] = inv;
    for (int i = threadIdx.x; i < d; i += blockDim.x) y[o + i] = x[o + i] * inv * scale[i];
  }
}
REPRO_KERNEL(rmsnorm_forward)

// Adds the input gradient into dx and writes the scale gradient of each RMS_ROWS_PER_PARTIAL
// rows into dscale_partial[partial, d] (overwrite): one block a partial, rows in order, so the
// result does not depend on timing; sum_rows then adds the partials into dscale.
__global__ void rmsnorm_backward(gptr<const float> x, gptr<const float> scale,
                                 gptr<const float> rstd, gptr<const float> dy, gptr<float> dx,
                                 gptr<float> dscale_partial, int rows, int d) {
  const float inv_d = float(1.0 / double(d));
  int partials = (rows + RMS_ROWS_PER_PARTIAL - 1) / RMS_ROWS_PER_PARTIAL;
  for (int c = blockIdx.x; c < partials; c += gridDim.x) {
    gptr<float> part = dscale_partial + long(c) * d;
    int r0 = c * RMS_ROWS_PER_PARTIAL;
    int r1 = rows - r0 < RMS_ROWS_PER_PARTIAL ? rows : r0 + RMS_ROWS_PER_PARTIAL;
    for (int r = r0; r < r1; r++) {
      long o = long(r) * d;
      float inv = rstd[r];
      // m = mean(dxhat · xhat), with dxhat = dy · scale and xhat = x · inv.
      float s = 0.0f;
      for (int i = threadIdx.x; i < d; i += blockDim.x) s += dy[o + i] * scale[i] * x[o + i];
      float m = rmsnorm_k::block_sum(s) * inv * inv_d;
      // Each thread owns columns i, so its part[i] needs no barrier between rows.
      for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float xi = x[o + i], dyi = dy[o + i];
        float g = dyi * scale[i];
        dx[o + i] += inv * (g - xi * inv * m);
        float p = dyi * (xi * inv);
        if (r == r0)
          part[i] = p;
        else
          part[i] += p;
      }
    }
  }
}
REPRO_KERNEL(rmsnorm_backward)
