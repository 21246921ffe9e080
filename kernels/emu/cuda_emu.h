// The CUDA built-ins kernels/*.cu use, for running them on the host (cargo feature cuda-emu).
//
// A launch runs its blocks one after another; the threads of a block run as real threads (or,
// in fibers mode, as fibers that switch at each barrier), so `__syncthreads()` is a real
// barrier and a missing one can give a wrong answer. Global memory
// is read and written through `gptr<T>`, which counts bytes; shared memory through
// `shared_array` / `shared_dynamic`, whose accesses the race check sees: within one barrier
// interval, an element written by one thread and read or written by another is a race.
#pragma once

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace emu {

// The calling thread's place in the launch.
struct Thread {
  dim3 tid, bid;
  unsigned linear;  // threadIdx flattened, x fastest
  uint64_t read_bytes = 0, written_bytes = 0;
};
extern thread_local Thread *self;
extern dim3 grid_dim, block_dim;

void sync_block();
// Whether [p, p + bytes) lies in one of the launch's buffers; if not, the launch fails (the
// access is skipped: a read gives zero), naming the kernel, thread and address.
bool in_bounds(const void *p, size_t bytes, bool write);
void note_shared(const void *array, size_t index, bool write);
void *dynamic_shared_base();
size_t dynamic_shared_bytes();
// An index past a shared array's end: the launch fails, and the access goes to a scratch
// element of the calling thread's own.
void shared_out_of_bounds(size_t index, size_t length);

// A warp's lanes exchange 32-bit values: lane i publishes `v`, then reads lane `src`'s.
uint32_t warp_exchange(uint32_t v, int src);
unsigned warp_size_here();  // lanes in the calling thread's warp (the last may be partial)

template <class T> struct gref {
  T *p;
  operator T() const {
    if (!in_bounds(p, sizeof(T), false)) return T();
    self->read_bytes += sizeof(T);
    return *p;
  }
  gref &operator=(T v) {
    if (!in_bounds(p, sizeof(T), true)) return *this;
    self->written_bytes += sizeof(T);
    *p = v;
    return *this;
  }
  gref &operator=(const gref &o) { return *this = T(o); }
  gref &operator+=(T v) { return *this = T(*this) + v; }
  gref &operator-=(T v) { return *this = T(*this) - v; }
  gref &operator*=(T v) { return *this = T(*this) * v; }
};

// A pointer into global memory; every element read or written is counted.
template <class T> struct gptr {
  T *p;
  gref<T> operator[](ptrdiff_t i) const { return gref<T>{p + i}; }
  gref<T> operator*() const { return gref<T>{p}; }
  gptr operator+(ptrdiff_t i) const { return gptr{p + i}; }
  gptr operator-(ptrdiff_t i) const { return gptr{p - i}; }
  explicit operator bool() const { return p != nullptr; }
};

template <class T> struct sref {
  T *p;
  const void *array;
  size_t index;
  operator T() const {
    note_shared(array, index, false);
    return *p;
  }
  sref &operator=(T v) {
    note_shared(array, index, true);
    *p = v;
    return *this;
  }
  sref &operator=(const sref &o) { return *this = T(o); }
  sref &operator+=(T v) { return *this = T(*this) + v; }
};

template <class T> sref<T> shared_element(T *data, size_t length, size_t i) {
  if (i < length) return sref<T>{data + i, data, i};
  shared_out_of_bounds(i, length);
  static thread_local T scratch;
  return sref<T>{&scratch, &scratch, 0};
}

template <class T, size_t N> struct shared_array {
  T data[N];
  sref<T> operator[](size_t i) { return shared_element(data, N, i); }
};

template <class T> struct shared_dynamic {
  T *data;
  size_t length;
  sref<T> operator[](size_t i) { return shared_element(data, length, i); }
};
template <class T> shared_dynamic<T> dynamic_shared() {
  return shared_dynamic<T>{static_cast<T *>(dynamic_shared_base()),
                           dynamic_shared_bytes() / sizeof(T)};
}

// Kernels by name, each called through a trampoline that unpacks CUDA-style arguments (an
// array of pointers to the argument values).
using Trampoline = void (*)(void *fn, void **args);
int register_kernel(const char *name, void *fn, Trampoline call, size_t nargs);

template <class... A> struct Call {
  template <size_t... I>
  static void unpack(void (*f)(A...), void **args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_reference_t<A> *>(args[I])...);
  }
  static void trampoline(void *fn, void **args) {
    unpack(reinterpret_cast<void (*)(A...)>(fn), args, std::index_sequence_for<A...>{});
  }
};
template <class... A> int add(const char *name, void (*f)(A...)) {
  return register_kernel(name, reinterpret_cast<void *>(f), &Call<A...>::trampoline, sizeof...(A));
}

}  // namespace emu

using emu::gptr;

#define threadIdx (emu::self->tid)
#define blockIdx (emu::self->bid)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define warpSize 32
#define __global__
#define __device__ inline
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __syncthreads() emu::sync_block()
#define REPRO_KERNEL(name) static int repro_registered_##name = emu::add(#name, &name);

template <class T> inline T __shfl_sync(unsigned, T v, int src) {
  static_assert(sizeof(T) == 4, "32-bit values only");
  uint32_t bits;
  __builtin_memcpy(&bits, &v, 4);
  bits = emu::warp_exchange(bits, src);
  __builtin_memcpy(&v, &bits, 4);
  return v;
}
inline unsigned emu_lane() { return emu::self->linear % 32; }
template <class T> inline T __shfl_xor_sync(unsigned m, T v, int mask) {
  return __shfl_sync(m, v, int(emu_lane() ^ mask));
}
template <class T> inline T __shfl_down_sync(unsigned m, T v, unsigned delta) {
  unsigned src = emu_lane() + delta;
  return __shfl_sync(m, v, int(src < emu::warp_size_here() ? src : emu_lane()));
}
inline unsigned __ballot_sync(unsigned, int predicate) {
  unsigned out = 0;
  for (unsigned lane = 0; lane < emu::warp_size_here(); lane++)
    out |= (emu::warp_exchange(predicate ? 1u : 0u, int(lane)) & 1u) << lane;
  return out;
}

template <class T> inline T atomicAdd(emu::gref<T> r, T v) {
  if (!emu::in_bounds(r.p, sizeof(T), true)) return T();
  emu::self->read_bytes += sizeof(T);
  emu::self->written_bytes += sizeof(T);
  return std::atomic_ref<T>(*r.p).fetch_add(v);
}

template <class T> inline T __shfl_up_sync(unsigned m, T v, unsigned delta) {
  unsigned lane = emu_lane();
  return __shfl_sync(m, v, int(lane >= delta ? lane - delta : lane));
}

inline unsigned __float_as_uint(float v) {
  unsigned b;
  __builtin_memcpy(&b, &v, 4);
  return b;
}
inline float __uint_as_float(unsigned b) {
  float v;
  __builtin_memcpy(&v, &b, 4);
  return v;
}
