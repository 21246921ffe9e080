// What every kernel file includes: global and shared memory access that the host emulator can
// count and check, and the launch sizes the Rust side reads.
#pragma once

// Threads per block of the row kernels (read by src/nn/cuda/emu.rs: keep the name and form).
#define ROW_BLOCK 128

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
