// GELU (tanh approximation) and its derivative, shared by the elementwise kernels
// (kernels/activations.cu) and the experts (kernels/experts.cuh). CPU twin: gelu in
// src/nn/cpu/activations.rs (same constants and operation order).
#pragma once
#include "common.cuh"

namespace gelu_k {
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluC = 0.044715f;

__device__ float gelu(float x) {
  float inner = kSqrt2OverPi * (x + kGeluC * x * x * x);
  return 0.5f * x * (1.0f + tanhf(inner));
}

__device__ float gelu_grad(float x) {
  float th = tanhf(kSqrt2OverPi * (x + kGeluC * x * x * x));
  return 0.5f * (1.0f + th) +
         0.5f * x * (1.0f - th * th) * kSqrt2OverPi * (1.0f + 3.0f * kGeluC * x * x);
}
}  // namespace gelu_k
