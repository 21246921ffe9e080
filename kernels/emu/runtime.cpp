// The host emulator's runtime: kernels by name, launches (blocks in turn, the threads of a
// block as real threads with a real barrier), warp exchange, global byte counts and the
// shared-memory race check. build.rs compiles this file with every kernels/*.cu included
// after it (one translation unit, so every kernel's registration is linked in).
#include "cuda_emu.h"

#include <barrier>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace emu {

thread_local Thread *self = nullptr;
dim3 grid_dim, block_dim;

namespace {

struct Kernel {
  void *fn;
  Trampoline call;
  size_t nargs;
};

std::map<std::string, Kernel> &kernels() {
  static std::map<std::string, Kernel> k;
  return k;
}

// Who touched a shared element in the current barrier interval.
struct Touch {
  int writer = -1;   // the thread that wrote it, or -1
  int reader = -1;   // the first thread that read it, or -1
  int reader2 = -1;  // another thread that read it, or -1
};

struct Block {
  std::unique_ptr<std::barrier<>> barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<uint32_t> warp_slots;
  std::vector<unsigned char> dynamic_shared;
  bool race_check = false;
  std::mutex touches_lock;
  std::map<std::pair<const void *, size_t>, Touch> touches;
  std::string race;  // the first race found, if any
};

Block *block = nullptr;
std::string kernel_name;
// The launch's buffers, [begin, end) addresses, and the first access outside all of them.
std::vector<std::pair<uintptr_t, uintptr_t>> buffers;
std::mutex bounds_lock;
std::string out_of_bounds;
bool race_check_on = false;
std::string last_error;

void clear_touches() {
  std::lock_guard<std::mutex> g(block->touches_lock);
  block->touches.clear();
}

}  // namespace

void sync_block() {
  // Everything before the barrier is ordered before everything after: the interval ends.
  block->barrier->arrive_and_wait();
  if (self->linear == 0 && block->race_check) clear_touches();
  block->barrier->arrive_and_wait();
}

void note_shared(const void *array, size_t index, bool write) {
  if (!block->race_check) return;
  int me = int(self->linear);
  std::lock_guard<std::mutex> g(block->touches_lock);
  Touch &t = block->touches[{array, index}];
  int other = -1;
  const char *kind = nullptr;
  if (t.writer >= 0 && t.writer != me) {
    other = t.writer;
    kind = write ? "written by two threads" : "written by one thread and read by another";
  } else if (write && t.reader >= 0 && (t.reader != me || t.reader2 >= 0)) {
    other = t.reader != me ? t.reader : t.reader2;
    kind = "read by one thread and written by another";
  }
  if (kind && block->race.empty()) {
    char buf[320];
    std::snprintf(buf, sizeof buf,
                  "shared-memory race in kernel %s, block (%u,%u,%u): element %zu of the "
                  "array at %p %s (threads %d and %d) with no barrier between",
                  kernel_name.c_str(), self->bid.x, self->bid.y, self->bid.z, index, array, kind,
                  other, me);
    block->race = buf;
  }
  if (write)
    t.writer = me;
  else if (t.reader == -1)
    t.reader = me;
  else if (t.reader != me)
    t.reader2 = me;
}

// Keeps the launch's first out-of-bounds access: its kind, where it happened, and the detail.
void report_out_of_bounds(const char *kind, const std::string &detail) {
  std::lock_guard<std::mutex> g(bounds_lock);
  if (!out_of_bounds.empty()) return;
  char where[160];
  std::snprintf(where, sizeof where, " in kernel %s, block (%u,%u,%u), thread %u: ",
                kernel_name.c_str(), self->bid.x, self->bid.y, self->bid.z, self->linear);
  out_of_bounds = std::string("out-of-bounds ") + kind + where + detail;
}

bool in_bounds(const void *p, size_t bytes, bool write) {
  uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (auto [begin, end] : buffers)
    if (a >= begin && a + bytes <= end) return true;
  char detail[96];
  std::snprintf(detail, sizeof detail, "%zu bytes at %p lie in none of the launch's buffers",
                bytes, p);
  report_out_of_bounds(write ? "write" : "read", detail);
  return false;
}

void *dynamic_shared_base() { return block->dynamic_shared.data(); }

size_t dynamic_shared_bytes() { return block->dynamic_shared.size(); }

void shared_out_of_bounds(size_t index, size_t length) {
  report_out_of_bounds("shared-memory access", "element " + std::to_string(index) +
                                                   " of an array of " + std::to_string(length));
}

unsigned warp_size_here() {
  unsigned threads = block_dim.x * block_dim.y * block_dim.z;
  unsigned first = self->linear / 32 * 32;
  return threads - first < 32 ? threads - first : 32;
}

uint32_t warp_exchange(uint32_t v, int src) {
  unsigned warp = self->linear / 32, lane = self->linear % 32;
  std::barrier<> &b = *block->warp_barriers[warp];
  uint32_t *slots = &block->warp_slots[warp * 32];
  slots[lane] = v;
  b.arrive_and_wait();
  uint32_t out = (src >= 0 && unsigned(src) < warp_size_here()) ? slots[src] : v;
  b.arrive_and_wait();  // nobody overwrites a slot before every lane has read
  return out;
}

int register_kernel(const char *name, void *fn, Trampoline call, size_t nargs) {
  kernels()[name] = Kernel{fn, call, nargs};
  return 0;
}

}  // namespace emu

using namespace emu;

extern "C" {

struct ReproEmuStats {
  uint64_t read_bytes;
  uint64_t written_bytes;
};

void repro_emu_set_race_check(int on) { race_check_on = on != 0; }

const char *repro_emu_last_error() { return last_error.c_str(); }

// 0 on success; otherwise the reason is in repro_emu_last_error().
// `ranges`: the [begin, end) addresses of the buffers the kernel may touch, `nranges` pairs.
int repro_emu_launch(const char *name, const unsigned grid[3], const unsigned blk[3],
                     size_t shared_bytes, void **args, size_t nargs, const uint64_t *ranges,
                     size_t nranges, ReproEmuStats *stats) {
  auto found = kernels().find(name);
  if (found == kernels().end()) {
    last_error = std::string("no kernel named ") + name;
    return 1;
  }
  const Kernel &k = found->second;
  if (k.nargs != nargs) {
    last_error = std::string(name) + " takes " + std::to_string(k.nargs) + " arguments, given " +
                 std::to_string(nargs);
    return 1;
  }
  unsigned threads = blk[0] * blk[1] * blk[2];
  if (threads == 0 || threads > 1024 || grid[0] * grid[1] * grid[2] == 0) {
    last_error = std::string(name) + ": a launch needs 1 to 1024 threads a block and a block";
    return 1;
  }
  grid_dim = dim3{grid[0], grid[1], grid[2]};
  block_dim = dim3{blk[0], blk[1], blk[2]};
  kernel_name = name;
  buffers.clear();
  for (size_t i = 0; i < nranges; i++) buffers.emplace_back(ranges[2 * i], ranges[2 * i + 1]);
  out_of_bounds.clear();
  stats->read_bytes = stats->written_bytes = 0;
  std::atomic<uint64_t> read{0}, written{0};
  std::string race;
  for (unsigned bz = 0; bz < grid[2]; bz++)
    for (unsigned by = 0; by < grid[1]; by++)
      for (unsigned bx = 0; bx < grid[0]; bx++) {
        Block b;
        b.barrier = std::make_unique<std::barrier<>>(threads);
        for (unsigned w = 0; w * 32 < threads; w++)
          b.warp_barriers.push_back(
              std::make_unique<std::barrier<>>(threads - w * 32 < 32 ? threads - w * 32 : 32));
        b.warp_slots.assign((threads + 31) / 32 * 32, 0);
        b.dynamic_shared.assign(shared_bytes, 0);
        b.race_check = race_check_on;
        block = &b;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; t++)
          pool.emplace_back([&, t] {
            Thread me;
            me.tid = dim3{t % blk[0], t / blk[0] % blk[1], t / (blk[0] * blk[1])};
            me.bid = dim3{bx, by, bz};
            me.linear = t;
            self = &me;
            k.call(k.fn, args);
            read += me.read_bytes;
            written += me.written_bytes;
            self = nullptr;
          });
        for (auto &t : pool) t.join();
        block = nullptr;
        if (race.empty()) race = b.race;
      }
  stats->read_bytes = read;
  stats->written_bytes = written;
  if (!out_of_bounds.empty()) {
    last_error = out_of_bounds;
    return 3;
  }
  if (!race.empty()) {
    last_error = race;
    return 2;
  }
  return 0;
}

}  // extern "C"

#include "kernels.inc"
