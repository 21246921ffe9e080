// AdamW with bias correction and decoupled weight decay, and the sum of squares of the global
// gradient norm. CPU twins: src/nn/cpu/adamw.rs, global_norm in src/nn/optim.rs.
#include "common.cuh"

// One thread an element, grid-stride. inv_bc1 = 1 / (1 - beta1^t) and inv_sqrt_bc2 =
// 1 / sqrt(1 - beta2^t) come from the host, computed in f64 as the twin does.
__global__ void adamw_update(gptr<float> p, gptr<const float> g, gptr<float> m, gptr<float> v,
                             int n, float lr, float beta1, float beta2, float eps,
                             float weight_decay, float inv_bc1, float inv_sqrt_bc2,
                             float grad_scale) {
  for (long i = blockIdx.x * long(blockDim.x) + threadIdx.x; i < n;
       i += long(gridDim.x) * blockDim.x) {
    float gi = g[i] * grad_scale;
    float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float mhat = mi * inv_bc1;
    float denom = sqrtf(vi) * inv_sqrt_bc2 + eps;
    float pi = p[i];
    p[i] = pi - lr * (mhat / denom + weight_decay * pi);
  }
}
REPRO_KERNEL(adamw_update)

// partial[c] = sum of x[i]² (in f64) over chunk c = [c * SQ_CHUNK, (c + 1) * SQ_CHUNK): one
// block a chunk (grid-stride over chunks), a fixed tree within it; sum_f64 then adds the
// partials, so the norm's bits never depend on timing or on the grid.
__global__ void sum_squares_partial(gptr<const float> x, int n, gptr<double> partial) {
  SHARED_ARRAY(double, part, SUM_BLOCK);
  int chunks = (n + SQ_CHUNK - 1) / SQ_CHUNK;
  for (int c = blockIdx.x; c < chunks; c += gridDim.x) {
    long lo = long(c) * SQ_CHUNK;
    long hi = n - lo < SQ_CHUNK ? long(n) : lo + SQ_CHUNK;
    double s = 0.0;
    for (long i = lo + threadIdx.x; i < hi; i += blockDim.x) {
      double xi = x[i];
      s += xi * xi;
    }
    part[threadIdx.x] = s;
    __syncthreads();
    for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
      __syncthreads();
    }
    // No barrier before the next chunk: only thread 0 reads part[0] after the tree, and only
    // it writes part[0] next.
    if (threadIdx.x == 0) partial[c] = part[0];
  }
}
REPRO_KERNEL(sum_squares_partial)
