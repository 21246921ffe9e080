// Rotary position embedding (rotate-half convention), in place. CPU twin: src/nn/cpu/rope.rs;
// the cos/sin tables [seq, head_dim / 2] come from its rope_tables.
#include "common.cuh"

// x: [rows, heads, hd], row = b * seq + t. One thread a (row, head, i < hd / 2) pair, grid-stride.
// inverse != 0 applies the transposed rotation (the backward pass).
__global__ void rope(gptr<float> x, gptr<const float> cos_t, gptr<const float> sin_t, int rows,
                     int seq, int heads, int hd, int inverse) {
  int half = hd / 2;
  long per_row = long(heads) * half;
  long n = long(rows) * per_row;
  for (long p = blockIdx.x * long(blockDim.x) + threadIdx.x; p < n;
       p += long(gridDim.x) * blockDim.x) {
    long row = p / per_row;
    int rem = int(p - row * per_row);
    int h = rem / half, i = rem - h * half;
    long t = row % seq;
    float c = cos_t[t * half + i], s = sin_t[t * half + i];
    if (inverse) s = -s;
    long at = row * heads * hd + long(h) * hd + i;
    float x1 = x[at], x2 = x[at + half];
    x[at] = x1 * c - x2 * s;
    x[at + half] = x1 * s + x2 * c;
  }
}
REPRO_KERNEL(rope)
