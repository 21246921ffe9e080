// Row operations of the backbone: x[rows, d] += b[d], out[d] += column sums of x, and y += x.
// CPU twins: src/nn/cpu/rowops.rs.
#include "common.cuh"

// One thread an element, grid-stride.
__global__ void add_row_vector(gptr<float> x, gptr<const float> b, int rows, int d) {
  long n = long(rows) * d;
  for (long i = blockIdx.x * long(blockDim.x) + threadIdx.x; i < n;
       i += long(gridDim.x) * blockDim.x)
    x[i] += b[i % d];
}
REPRO_KERNEL(add_row_vector)

// One block a column: each thread sums a strided share of the rows, then the block adds its
// threads' sums in a fixed tree, so the result does not depend on timing.
__global__ void sum_rows(gptr<const float> x, gptr<float> out, int rows, int d) {
  SHARED_ARRAY(float, partial, ROW_BLOCK);
  int col = blockIdx.x;
  float s = 0.0f;
  for (int r = threadIdx.x; r < rows; r += blockDim.x) s += x[long(r) * d + col];
  partial[threadIdx.x] = s;
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[col] += partial[0];
}
REPRO_KERNEL(sum_rows)

// The same sum with warp shuffles: within a warp by butterfly exchange, then across warps
// through dynamic shared memory (one float a warp: launch with blockDim.x / 32 * 4 bytes).
__global__ void sum_rows_warp(gptr<const float> x, gptr<float> out, int rows, int d) {
  SHARED_DYNAMIC(float, per_warp);
  int col = blockIdx.x;
  float s = 0.0f;
  for (int r = threadIdx.x; r < rows; r += blockDim.x) s += x[long(r) * d + col];
  for (int mask = 16; mask > 0; mask /= 2) s += __shfl_xor_sync(0xffffffffu, s, mask);
  if (threadIdx.x % 32 == 0) per_warp[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < int(blockDim.x / 32); w++) total += per_warp[w];
    out[col] += total;
  }
}
REPRO_KERNEL(sum_rows_warp)

// y += x, one thread an element, grid-stride.
__global__ void add_assign(gptr<float> y, gptr<const float> x, int n) {
  for (long i = blockIdx.x * long(blockDim.x) + threadIdx.x; i < n;
       i += long(gridDim.x) * blockDim.x)
    y[i] += x[i];
}
REPRO_KERNEL(add_assign)

// x *= factor, one thread an element, grid-stride.
__global__ void scale(gptr<float> x, float factor, int n) {
  for (long i = blockIdx.x * long(blockDim.x) + threadIdx.x; i < n;
       i += long(gridDim.x) * blockDim.x)
    x[i] *= factor;
}
REPRO_KERNEL(scale)

// out[i] = x[i] rounded to the nearest bfloat16, ties to even (the twin: Bf16::from_f32 in
// src/nn/backend.rs); NaN stays a quiet NaN. One thread an element, grid-stride.
__global__ void round_bf16(gptr<const float> x, gptr<unsigned short> out, int n) {
  for (long i = blockIdx.x * long(blockDim.x) + threadIdx.x; i < n;
       i += long(gridDim.x) * blockDim.x) {
    const float v = x[i];
    const unsigned b = __float_as_uint(v);
    out[i] = v != v ? (unsigned short)((b >> 16) | 0x40u)
                    : (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
  }
}
REPRO_KERNEL(round_bf16)
