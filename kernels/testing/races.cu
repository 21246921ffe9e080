// Kernels with a planted bug, for the emulator's own tests: the emulator must report them.
#include "../common.cuh"

// sum_rows without the barrier between the partial sums and the tree.
__global__ void sum_rows_no_barrier(gptr<const float> x, gptr<float> out, int rows, int d) {
  SHARED_ARRAY(float, partial, ROW_BLOCK);
  int col = blockIdx.x;
  float s = 0.0f;
  for (int r = threadIdx.x; r < rows; r += blockDim.x) s += x[long(r) * d + col];
  partial[threadIdx.x] = s;
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[col] += partial[0];
}
REPRO_KERNEL(sum_rows_no_barrier)

// Every thread writes one shared slot.
__global__ void all_write_one(gptr<float> out) {
  SHARED_ARRAY(float, slot, 1);
  slot[0] = float(threadIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) out[0] = slot[0];
}
REPRO_KERNEL(all_write_one)

// add_row_vector without its bounds check, launched with more threads than elements.
__global__ void add_row_vector_unguarded(gptr<float> x, gptr<const float> b, int /*rows*/, int d) {
  long i = blockIdx.x * long(blockDim.x) + threadIdx.x;
  x[i] += b[i % d];
}
REPRO_KERNEL(add_row_vector_unguarded)
