// What the expert kernels share (kernels/experts.cu, the forward; kernels/experts_backward.cu):
// the activation and its derivative, the mode numbers, and the pool row of a slot.
#pragma once
#include "gelu.cuh"

namespace experts_k {
// ExpertMode as an int (src/nn/cuda/experts.rs: expert_mode_arg).
constexpr int kGatedLinear = 0, kGatedGelu = 1, kPeer = 2;
using gelu_k::gelu;
using gelu_k::gelu_grad;

// p . q over d elements by one whole warp, in the twin's order (vmath::dot): lane l sums
// elements l, l + 32, ... of the full 32-chunks, the 32 sums fold pairwise (16, 8, ... apart),
// then the tail past the last full chunk is added. The result is valid in lane 0.
__device__ float warp_dot(gptr<const float> p, gptr<const float> q, int d) {
  const int lane = threadIdx.x % 32, full = d - d % 32;
  float acc = 0.0f;
  for (int i = lane; i < full; i += 32) acc = fmaf(p[i], q[i], acc);
  for (int w = 16; w > 0; w /= 2) acc += __shfl_down_sync(0xffffffffu, acc, w);
  float tail = 0.0f;
  if (lane == 0)
    for (int i = full; i < d; i++) tail = fmaf(p[i], q[i], tail);
  return acc + tail;
}

__device__ long pool_row(gptr<const unsigned> indices, long slot, int slots, int k,
                         int channel_stride) {
  return long(int(slot % slots) / k) * channel_stride + indices[slot];
}

// The lowest finite float: the start of a max (NVRTC has no INFINITY without headers).
constexpr float kLowest = -3.402823466e38f;

// A pool element as f32: the one place the expert kernels read a pool row, so a bf16 pool
// (unsigned short rows, widened on load) is one more overload.
__device__ float pool_elem(gptr<const float> p, long i) { return p[i]; }
// A bf16 element is the top half of an f32: widening is exact.
__device__ float pool_elem(gptr<const unsigned short> p, long i) {
  return __uint_as_float(unsigned(p[i]) << 16);
}

// The sum of one value a lane, in every lane: xor butterfly 16, 8, 4, 2, 1. Lane 0 adds in
// vmath's fold order (acc[j] += acc[j + w]) and the others the same pairs swapped (x + y ==
// y + x), so every lane holds the same bits.
__device__ float warp_sum(float s) {
  for (int m = 16; m > 0; m /= 2) s += __shfl_xor_sync(0xffffffffu, s, m);
  return s;
}

__device__ float warp_max(float s) {
  for (int m = 16; m > 0; m /= 2) s = fmaxf(s, __shfl_xor_sync(0xffffffffu, s, m));
  return s;
}
}  // namespace experts_k
