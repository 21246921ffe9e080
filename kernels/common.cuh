// What every kernel file includes: global and shared memory access that the host emulator can
// count and check, and the launch sizes the Rust side reads.
#pragma once

// Threads per block of the row kernels (read by src/nn/cuda/emu.rs: keep the name and form).
#define ROW_BLOCK 128
// Most blocks of the one-block-a-row kernels (rmsnorm, xent, embedding_backward, the sum of
// squares); beyond it they loop over rows (grid-stride), so any size stays a valid grid.
#define ROW_GRID_MAX 65535
// Threads per block of the elementwise kernels, and the most blocks they launch (grid-stride).
#define ELEM_BLOCK 256
#define ELEM_GRID_MAX 8192
// Rows per partial sum of the rmsnorm scale gradient (as the CPU twin's ROWS_PER_PARTIAL).
#define RMS_ROWS_PER_PARTIAL 64
// Threads per block of the softmax cross-entropy (one block a row; a power of two).
#define XENT_BLOCK 256
// Threads per block of the f64 sums (sum_f64, sum_squares_partial; a power of two), and the
// elements each partial of the sum of squares covers (as the twin global_norm's chunk).
#define SUM_BLOCK 256
#define SQ_CHUNK 16384
// Product-key top-k (kernels/router.cu): one warp a (token, channel), ROUTER_BLOCK threads a
// block (a multiple of 32). A lane holds ROUTER_MAX_SQRT_N / 32 logits of each half, and its
// ROUTER_QUEUE best candidates of a pass (32 * ROUTER_QUEUE candidates in one pass: k <= 33).
#define ROUTER_BLOCK 128
#define ROUTER_MAX_SQRT_N 256
#define ROUTER_QUEUE 4
// Threads per block of the expert kernels (one block a token, or a pool row; a multiple of 32:
// each warp takes whole dot products).
#define EXPERT_BLOCK 128
// The fused expert forward: one warp a token, EXPERT_WARPS warps a block. Each lane holds
// EXPERT_MAX_D / 32 elements of x and y, and EXPERT_MAX_K / 32 slots of a channel (both
// multiples of 32); EXPERT_ROWS_IN_FLIGHT pool rows are loaded before their dot products.
#define EXPERT_WARPS 4
#define EXPERT_MAX_D 1024
#define EXPERT_MAX_K 128
#define EXPERT_ROWS_IN_FLIGHT 2
// Experts backward (kernels/experts_backward.cu): one warp owns EXPERT_TILE consecutive pairs of
// the pool-row order (the same work whatever the skew), and each lane keeps its columns of a
// row in registers, so d is at most EXPERT_BACKWARD_MAX_D (a multiple of 32).
#define EXPERT_TILE 128
#define EXPERT_BACKWARD_MAX_D 1024

#ifdef REPRO_EMU
// gptr<T> counts bytes; SHARED_ARRAY is one instance per block (blocks run one at a time)
// whose accesses the race check sees.
#define SHARED_ARRAY(T, name, n) static emu::shared_array<T, n> name
#define SHARED_DYNAMIC(T, name) emu::shared_dynamic<T> name = emu::dynamic_shared<T>()
#else
template <class T> using gptr = T*;
#define SHARED_ARRAY(T, name, n) __shared__ T name[n]
#define SHARED_DYNAMIC(T, name) extern __shared__ T name[]
#define REPRO_KERNEL(name)
#endif

// Attention (kernels/attention.cu): query and key tiles of ATTN_TILE rows, ATTN_THREADS threads
// a block = ATTN_TILE rows of ATTN_THREADS / ATTN_TILE lanes each (a lane group sits in one
// warp); each lane keeps ATTN_MAX_HEAD_DIM / lanes columns of its row in registers.
#define ATTN_TILE 16
#define ATTN_THREADS 128
#define ATTN_MAX_HEAD_DIM 128

// MoE routing (kernels/moe.cu): elementwise and per-token kernels run MOE_BLOCK threads a
// block; the counting sort runs one block of MOE_SORT_THREADS (a multiple of 32) per expert.
// Top-k keeps one bit a candidate per lane: at most 32 * 32 experts.
#define MOE_BLOCK 128
#define MOE_SORT_THREADS 128
#define MOE_MAX_EXPERTS 1024

// Device stable group-by-key (kernels/sort.cu): an LSD radix sort of SORT_RADIX_BITS a pass,
// SORT_BLOCK threads a block (= 1 << SORT_RADIX_BITS: thread d owns digit d), at least
// SORT_ITEMS items a block and at most SORT_GRID_MAX blocks (beyond it the chunks grow); the
// run ends come from a merge of the sorted keys with 0..key_bound in tiles of SORT_ENDS_TILE
// merged positions (a multiple of SORT_BLOCK).
#define SORT_RADIX_BITS 8
#define SORT_BLOCK 256
#define SORT_ITEMS 4096
#define SORT_GRID_MAX 512
#define SORT_ENDS_TILE 1024
