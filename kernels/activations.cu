// GELU (tanh approximation) and the clamped SwiGLU. CPU twin: src/nn/cpu/activations.rs (same
// constants and operation order). One thread an element, grid-stride.
#include "gelu.cuh"

namespace act_k {
constexpr float kAlpha = 1.702f;
constexpr float kLimit = 7.0f;
using gelu_k::gelu;
using gelu_k::gelu_grad;

__device__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Selects as the twin writes them, so a NaN passes through as it does there.
__device__ float clamp_gate(float g) { return g > kLimit ? kLimit : g; }
__device__ float clamp_lin(float l) {
  l = l > kLimit ? kLimit : l;
  return l < -kLimit ? -kLimit : l;
}
}  // namespace act_k

__global__ void gelu_forward(gptr<const float> x, gptr<float> y, int n) {
  for (long i = blockIdx.x * long(blockDim.x) + threadIdx.x; i < n;
       i += long(gridDim.x) * blockDim.x)
    y[i] = act_k::gelu(x[i]);
}
REPRO_KERNEL(gelu_forward)

// dx = dy * gelu'(x) (overwrites dx, as the twin).
__global__ void gelu_backward(gptr<const float> x, gptr<const float> dy, gptr<float> dx, int n) {
  for (long i = blockIdx.x * long(blockDim.x) + threadIdx.x; i < n;
       i += long(gridDim.x) * blockDim.x)
    dx[i] = dy[i] * act_k::gelu_grad(x[i]);
}
REPRO_KERNEL(gelu_backward)

// z: [rows, 2f] (gate half first, linear half second); y: [rows, f].
__global__ void swiglu_forward(gptr<const float> z, gptr<float> y, int rows, int f) {
  long n = long(rows) * f;
  for (long i = blockIdx.x * long(blockDim.x) + threadIdx.x; i < n;
       i += long(gridDim.x) * blockDim.x) {
    long r = i / f, j = i - r * f;
    float g = act_k::clamp_gate(z[2 * f * r + j]);
    float l = act_k::clamp_lin(z[2 * f * r + f + j]);
    y[i] = g * act_k::sigmoid(act_k::kAlpha * g) * (l + 1.0f);
  }
}
REPRO_KERNEL(swiglu_forward)

// dz: [rows, 2f] (overwritten, as the twin); zero gradient where the clamp was active.
__global__ void swiglu_backward(gptr<const float> z, gptr<const float> dy, gptr<float> dz,
                                int rows, int f) {
  long n = long(rows) * f;
  for (long i = blockIdx.x * long(blockDim.x) + threadIdx.x; i < n;
       i += long(gridDim.x) * blockDim.x) {
    long r = i / f, j = i - r * f;
    long gi = 2 * f * r + j, li = gi + f;
    float g_raw = z[gi], l_raw = z[li], d = dy[i];
    float g = act_k::clamp_gate(g_raw), l = act_k::clamp_lin(l_raw);
    float s = act_k::sigmoid(act_k::kAlpha * g);
    float glu = g * s;
    float dglu = s + g * act_k::kAlpha * s * (1.0f - s);
    dz[gi] = g_raw > act_k::kLimit ? 0.0f : d * (l + 1.0f) * dglu;
    dz[li] = l_raw > act_k::kLimit || l_raw < -act_k::kLimit ? 0.0f : d * glu;
  }
}
REPRO_KERNEL(swiglu_backward)
