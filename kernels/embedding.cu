// Token embedding: the row gather of the forward pass and the deterministic scatter-add of the
// backward pass. CPU twin: the lookup and the closing loop of Model::{forward, backward}
// (src/nn/model.rs), which add rows in token order.
#include "common.cuh"

// out[t, :] = table[tokens[t], :] for t < n; one thread an element, grid-stride.
__global__ void embedding_forward(gptr<const float> table, gptr<const unsigned> tokens,
                                  gptr<float> out, int n, int d) {
  long total = long(n) * d;
  for (long i = blockIdx.x * long(blockDim.x) + threadIdx.x; i < total;
       i += long(gridDim.x) * blockDim.x) {
    long t = i / d;
    out[i] = table[long(tokens[t]) * d + (i - t * d)];
  }
}
REPRO_KERNEL(embedding_forward)

// For each segment s (one distinct token, seg_tokens[s]): dtable[seg_tokens[s], :] += dx[order[j],
// :] for j in starts[s]..starts[s + 1], in j order, so each row gets exactly the twin's sequence of
// additions (no atomics; segments own distinct rows). One block a segment (grid-stride), threads
// over columns. order, starts, seg_tokens: embedding_segments in src/nn/cuda/backbone.rs.
__global__ void embedding_backward(gptr<const float> dx, gptr<const unsigned> order,
                                   gptr<const unsigned> starts, gptr<const unsigned> seg_tokens,
                                   gptr<float> dtable, int segments, int d) {
  for (int s = blockIdx.x; s < segments; s += gridDim.x) {
    long row = long(seg_tokens[s]) * d;
    unsigned j0 = starts[s], j1 = starts[s + 1];
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
      float acc = dtable[row + c];
      for (unsigned j = j0; j < j1; j++) acc += dx[long(order[j]) * d + c];
      dtable[row + c] = acc;
    }
  }
}
REPRO_KERNEL(embedding_backward)
