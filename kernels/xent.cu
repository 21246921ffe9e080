// Fused softmax cross-entropy, one block a row: logits become d(mean loss)/d(logits) in place.
// CPU twin: src/nn/cpu/xent.rs. Plus sum_f64, the fixed-order sum the host downloads the loss by.
#include "common.cuh"

namespace xent_k {
// The block's max / total of v in a fixed tree (blockDim.x a power of two, at most
// XENT_BLOCK), given to every thread; the last barrier lets the next call reuse the array.
__device__ float block_max(float v) {
  SHARED_ARRAY(float, part, XENT_BLOCK);
  part[threadIdx.x] = v;
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half)
      part[threadIdx.x] = fmaxf(part[threadIdx.x], part[threadIdx.x + half]);
    __syncthreads();
  }
  float out = part[0];
  __syncthreads();
  return out;
}

__device__ float block_sum(float v) {
  SHARED_ARRAY(float, part, XENT_BLOCK);
  part[threadIdx.x] = v;
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
    __syncthreads();
  }
  float out = part[0];
  __syncthreads();
  return out;
}
}  // namespace xent_k

// logits: [rows, vocab]; targets: [rows]; loss: [rows], each row's loss (0 for a pad row).
// pad: the masked target, -1 for none. inv_count: 1 / (rows whose target is not pad), the
// scale of the mean. want_grad == 0 leaves the logits as they are.
__global__ void softmax_xent(gptr<float> logits, gptr<const unsigned> targets, gptr<double> loss,
                             int rows, int vocab, int pad, int want_grad, float inv_count) {
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    gptr<float> row = logits + long(r) * vocab;
    unsigned tgt = targets[r];
    if (pad >= 0 && tgt == unsigned(pad)) {
      if (want_grad)
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) row[i] = 0.0f;
      if (threadIdx.x == 0) loss[r] = 0.0;
      continue;
    }
    // Read before the barriers below, which order it before any thread's gradient write.
    // A target outside the vocabulary gives a NaN loss rather than a stray read.
    float at_target = 0.0f;
    if (threadIdx.x == 0) at_target = tgt < unsigned(vocab) ? float(row[tgt]) : nanf("");
    float mx = -3.402823466e38f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, row[i]);
    mx = xent_k::block_max(mx);
    float s = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += expf(row[i] - mx);
    float sum = xent_k::block_sum(s);
    if (threadIdx.x == 0) loss[r] = double(mx + logf(sum) - at_target);
    if (want_grad) {
      float k = inv_count / sum;
      for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float p = expf(row[i] - mx) * k;
        if (unsigned(i) == tgt) p -= inv_count;
        row[i] = p;
      }
    }
  }
}
REPRO_KERNEL(softmax_xent)

// out[0] = x[0] + ... + x[n - 1] (overwrite), by one block: each thread a strided share in
// index order, then a fixed tree, so the bits never depend on timing.
__global__ void sum_f64(gptr<const double> x, gptr<double> out, int n) {
  SHARED_ARRAY(double, part, SUM_BLOCK);
  if (blockIdx.x != 0) return;
  double s = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = part[0];
}
REPRO_KERNEL(sum_f64)
