// The host emulator's runtime: kernels by name, launches (blocks in turn, the threads of a
// block as real threads with a real barrier), warp exchange, global byte counts and the
// shared-memory race check. build.rs compiles this file with every kernels/*.cu included
// after it (one translation unit, so every kernel's registration is linked in).
//
// The threads are a pool of persistent workers, worker t being thread t of every block: a
// launch wakes its workers once, and they run the blocks in turn, the last thread to finish a
// block starting the next. Creating threads a block cost far more than the kernels' work.
//
// Fibers mode (repro_emu_set_fibers) runs the same launches faster: the threads of a block are
// user-space fibers on the calling thread, resumed round-robin, each running until it waits at
// a barrier or finishes. The barriers, their completions, the race check, the
// counts and the errors are the thread mode's; only who runs next differs (deterministic).
#include "cuda_emu.h"

#include <climits>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#endif
#if !(defined(__x86_64__) && defined(__linux__))
#include <ucontext.h>  // see switch_fiber
#endif

namespace emu {

thread_local Thread *self = nullptr;
dim3 grid_dim, block_dim;

namespace {

#ifdef __linux__
// Declared here rather than through <unistd.h>, whose names would meet the kernels' own.
extern "C" long syscall(long number, ...) noexcept;
#endif

// Sleeps while `a` holds `old`. On Linux a bare futex: std::atomic::wait spins and yields first,
// which with a hundred threads a core costs more than sleeping at once.
void wait_while(std::atomic<uint32_t> &a, uint32_t old) {
  while (a.load() == old) {
#ifdef __linux__
    syscall(SYS_futex, reinterpret_cast<uint32_t *>(&a), FUTEX_WAIT_PRIVATE, old, nullptr,
            nullptr, 0);
#else
    a.wait(old);
#endif
  }
}

void wake(std::atomic<uint32_t> &a, bool all) {
#ifdef __linux__
  syscall(SYS_futex, reinterpret_cast<uint32_t *>(&a), FUTEX_WAKE_PRIVATE, all ? INT_MAX : 1,
          nullptr, nullptr, 0);
#else
  if (all)
    a.notify_all();
  else
    a.notify_one();
#endif
}

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

// A reusable barrier of `expected` threads: the last to arrive runs the completion and starts
// the next phase.
struct Barrier {
  std::atomic<uint32_t> arrived{0}, phase{0};
  uint32_t expected = 0;
};

// Thrown out of a kernel's barrier when the block can never get past it (see `stuck`).
struct Abort {};

// The launch in progress and its current block. Reused: the workers, the barriers and the
// shared memory outlive blocks and launches; only a launch's first block sets them up.
struct Block {
  unsigned threads = 0;
  Barrier barrier;
  std::unique_ptr<Barrier[]> warp_barriers;
  std::vector<uint32_t> warp_slots;  // two sets, 32 a warp each, used in alternate phases
  std::vector<unsigned char> dynamic_shared;
  bool race_check = false;
  std::mutex touches_lock;
  std::map<std::pair<const void *, size_t>, Touch> touches;
  std::string race;  // the first race found in this block, if any

  // Threads of the current block that are running kernel code (not waiting at a barrier, not
  // finished), and that have finished. Running reaching zero with a thread unfinished means
  // every unfinished thread waits at a barrier that nobody is left to complete.
  std::atomic<int> running{0}, finished{0}, first_finished{-1};
  std::atomic<bool> aborted{false};
  std::string abort_reason;

  const Kernel *kernel = nullptr;
  void **args = nullptr;
  unsigned index = 0, count = 0;  // the current block, of the launch's blocks
  dim3 bid;
  std::atomic<uint32_t> sequence{0};  // advances as each block starts, and at the launch's end
  bool over = false;                  // the launch has ended (read after `sequence` moves)
  std::atomic<uint64_t> read{0}, written{0};
  std::string first_race;  // the launch's first race
  bool fibers = false;     // the threads are fibers on one OS thread (run_fibers)
};

Block *block = nullptr;
std::string kernel_name;
// The launch's buffers, [begin, end) addresses, and the first access outside all of them.
std::vector<std::pair<uintptr_t, uintptr_t>> buffers;
std::mutex bounds_lock;
std::string out_of_bounds;
bool race_check_on = false;
bool fibers_on = false;
std::string last_error;

void clear_touches() {
  std::lock_guard<std::mutex> g(block->touches_lock);
  block->touches.clear();
}

// Every unfinished thread of the block waits at a barrier that can never complete: fail the
// launch and release them (each throws Abort out of its kernel). Called by the thread that
// found it, with no other thread running, so only once a block.
void stuck() {
  Block &b = *block;
  int done = b.finished.load(), first = b.first_finished.load();
  char buf[400];
  if (done > 0)
    std::snprintf(buf, sizeof buf,
                  "kernel %s, block (%u,%u,%u): %d of its %u threads finished (thread %d first) "
                  "while the others wait at a barrier (__syncthreads or a warp shuffle) that "
                  "they will never all reach; every thread of a block must reach each barrier",
                  kernel_name.c_str(), b.bid.x, b.bid.y, b.bid.z, done, b.threads, first);
  else
    std::snprintf(buf, sizeof buf,
                  "kernel %s, block (%u,%u,%u): its threads wait at different barriers "
                  "(__syncthreads or a warp shuffle), none of which all its threads reach",
                  kernel_name.c_str(), b.bid.x, b.bid.y, b.bid.z);
  b.abort_reason = buf;
  b.aborted = true;
  auto release = [](Barrier &r) {
    r.phase.fetch_add(1);
    wake(r.phase, true);
  };
  release(b.barrier);
  for (unsigned w = 0; w * 32 < b.threads; w++) release(b.warp_barriers[w]);
}

// Switching fibers. On x86-64 Linux a few instructions that save the callee-saved registers on
// the old stack and restore them from the new: swapcontext also sets the signal mask, a system
// call each switch, which costs more than most kernels' work between two barriers. Elsewhere,
// ucontext.
#if defined(__x86_64__) && defined(__linux__)
extern "C" void repro_emu_fiber_switch(void **save_sp, void *load_sp);
asm(R"(
  .text
  .globl repro_emu_fiber_switch
  .hidden repro_emu_fiber_switch
  .type repro_emu_fiber_switch, @function
repro_emu_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  fldcw (%rsp)
  ldmxcsr 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size repro_emu_fiber_switch, .-repro_emu_fiber_switch
)");

struct FiberContext {
  void *sp = nullptr;
};

void switch_fiber(FiberContext &from, FiberContext &to) { repro_emu_fiber_switch(&from.sp, to.sp); }

// A context that starts `entry` (which never returns) on the stack [stack, stack + bytes).
bool make_fiber(FiberContext &c, char *stack, size_t bytes, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  uint64_t *sp = reinterpret_cast<uint64_t *>(top);
  *--sp = 0;                                    // entry's return address: none
  *--sp = reinterpret_cast<uintptr_t>(entry);  // where the first switch returns to
  for (int i = 0; i < 6; i++) *--sp = 0;       // rbp rbx r12 r13 r14 r15
  *--sp = 0x1f80;                              // mxcsr: the defaults
  *--sp = 0x037f;                              // x87 control word: the defaults
  c.sp = sp;
  return true;
}
#else
struct FiberContext {
  ucontext_t uc;
};

void switch_fiber(FiberContext &from, FiberContext &to) { swapcontext(&from.uc, &to.uc); }

bool make_fiber(FiberContext &c, char *stack, size_t bytes, void (*entry)()) {
  if (getcontext(&c.uc) != 0) return false;
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
  return true;
}
#endif

// The fibers of fibers mode, one a thread of the block: grown to the largest block seen, their
// stacks mapped once and reused. Each fiber loops forever: run its thread of the current block,
// then hand back to the scheduler (run_fibers), which resumes it for the next block. Nothing
// here is thread_local: a later launch may come from another OS thread.
constexpr size_t fiber_stack_bytes = 256 << 10;
constexpr size_t fiber_guard_bytes = 64 << 10;  // unmapped below the stack: overflow faults

struct Fiber {
  FiberContext context;
  Thread me;
  Barrier *waiting = nullptr;  // the barrier it waits at, or null
  uint32_t phase = 0;          // that barrier's phase when it arrived
  bool done = true;            // has finished the current block
};

struct Fibers {
  FiberContext scheduler;
  std::vector<std::unique_ptr<Fiber>> all;
  Fiber *current = nullptr;  // the fiber running, or last run
};

Fibers &fibers() {
  static Fibers *f = new Fibers;  // never destroyed, like the pool
  return *f;
}

void fiber_main() {
  Fibers &fs = fibers();
  Fiber *f = fs.current;  // this fiber: the scheduler sets `current` before resuming it
  for (;;) {
    try {
      block->kernel->call(block->kernel->fn, block->args);
    } catch (const Abort &) {
    }
    f->done = true;
    switch_fiber(f->context, fs.scheduler);
  }
}

// Grows the fibers to `n`; false (with the reason in `why`) if a stack cannot be had.
bool grow_fibers(unsigned n, std::string &why) {
  Fibers &fs = fibers();
  while (fs.all.size() < n) {
    auto f = std::make_unique<Fiber>();
#ifdef __linux__
    void *m = mmap(nullptr, fiber_guard_bytes + fiber_stack_bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED || mprotect(m, fiber_guard_bytes, PROT_NONE) != 0) {
      why = "cannot map a fiber's stack";
      return false;
    }
    char *stack = static_cast<char *>(m) + fiber_guard_bytes;
#else
    char *stack = new char[fiber_stack_bytes];
#endif
    if (!make_fiber(f->context, stack, fiber_stack_bytes, fiber_main)) {
      why = "cannot make a fiber's context";
      return false;
    }
    fs.all.push_back(std::move(f));
  }
  return true;
}

// Called by a fiber at a barrier it is not the last to reach: back to the scheduler, which
// resumes it once the barrier's phase has moved (completed, or released by `stuck`).
void fiber_wait(Barrier &r, uint32_t phase) {
  Fibers &fs = fibers();
  Fiber *f = fs.current;
  f->waiting = &r;
  f->phase = phase;
  switch_fiber(f->context, fs.scheduler);
}

// Arrives at `r` and waits for the rest of its threads; the last to arrive runs `complete`
// first.
template <class F> void arrive_and_wait(Barrier &r, F complete) {
  Block &b = *block;
  uint32_t phase = r.phase.load();  // cannot move on before this thread arrives
  if (r.arrived.fetch_add(1) + 1 == r.expected) {
    r.arrived.store(0);
    complete();
    if (b.fibers) {
      r.phase.fetch_add(1);  // the waiting fibers become runnable; this one carries on
    } else {
      b.running.fetch_add(int(r.expected) - 1);  // on behalf of the threads it releases
      r.phase.fetch_add(1);
      wake(r.phase, true);
    }
  } else if (b.fibers) {
    fiber_wait(r, phase);
  } else {
    if (b.running.fetch_sub(1) == 1) stuck();
    wait_while(r.phase, phase);
  }
  if (b.aborted.load()) throw Abort{};
}

// The last thread of a block to finish ends it: keeps its race, and starts the next block or
// ends the launch. Every other thread of the block is done with it or waits for `sequence`.
void next_block() {
  Block &b = *block;
  if (b.first_race.empty()) b.first_race = b.race;
  b.race.clear();
  b.touches.clear();
  b.index++;
  if (b.aborted || b.index == b.count) {
    b.over = true;
  } else {
    b.bid = dim3{b.index % grid_dim.x, b.index / grid_dim.x % grid_dim.y,
                 b.index / (grid_dim.x * grid_dim.y)};
    std::memset(b.dynamic_shared.data(), 0, b.dynamic_shared.size());
    b.barrier.arrived = 0;
    for (unsigned w = 0; w * 32 < b.threads; w++) b.warp_barriers[w].arrived = 0;
    b.running = int(b.threads);
    b.finished = 0;
    b.first_finished = -1;
  }
}

void end_block() {
  next_block();
  block->sequence.fetch_add(1);
  wake(block->sequence, true);
}

// A thread has finished the current block (returned from the kernel, or thrown out of it).
void finish_thread(unsigned t) {
  Block &b = *block;
  int expected = -1;
  b.first_finished.compare_exchange_strong(expected, int(t));
  int done = b.finished.fetch_add(1) + 1;
  if (b.aborted.load()) {
    // The threads released by `stuck` were not running: only `finished` counts them.
    if (done == int(b.threads)) end_block();
    return;
  }
  if (b.running.fetch_sub(1) == 1) {
    if (b.finished.load() == int(b.threads))
      end_block();
    else
      stuck();
  }
}

// Runs thread `t` of each block of the launch in turn.
void run_launch(unsigned t) {
  Block &b = *block;
  for (;;) {
    uint32_t sequence = b.sequence.load();
    Thread me;
    me.tid = dim3{t % block_dim.x, t / block_dim.x % block_dim.y, t / (block_dim.x * block_dim.y)};
    me.bid = b.bid;
    me.linear = t;
    self = &me;
    try {
      b.kernel->call(b.kernel->fn, b.args);
    } catch (const Abort &) {
    }
    b.read += me.read_bytes;
    b.written += me.written_bytes;
    self = nullptr;
    finish_thread(t);
    wait_while(b.sequence, sequence);
    if (b.over) return;
  }
}

// Fibers mode: runs every block of the launch on the calling thread. Each pass resumes, in
// order, every fiber that is neither finished nor waiting at a barrier still in the phase it
// arrived in; a pass that resumes none while some are unfinished is the thread mode's `stuck`.
void run_fibers() {
  Block &b = *block;
  Fibers &fs = fibers();
  for (;;) {
    for (unsigned t = 0; t < b.threads; t++) {
      Fiber &f = *fs.all[t];
      f.me = Thread{};
      f.me.tid =
          dim3{t % block_dim.x, t / block_dim.x % block_dim.y, t / (block_dim.x * block_dim.y)};
      f.me.bid = b.bid;
      f.me.linear = t;
      f.waiting = nullptr;
      f.done = false;
    }
    for (unsigned left = b.threads; left > 0;) {
      bool resumed = false;
      for (unsigned t = 0; t < b.threads; t++) {
        Fiber &f = *fs.all[t];
        if (f.done || (f.waiting && f.waiting->phase.load() == f.phase)) continue;
        f.waiting = nullptr;
        fs.current = &f;
        self = &f.me;
        switch_fiber(fs.scheduler, f.context);
        resumed = true;
        if (f.done) {
          left--;
          b.read += f.me.read_bytes;
          b.written += f.me.written_bytes;
          if (b.first_finished.load() < 0) b.first_finished = int(t);
          b.finished.fetch_add(1);
        }
      }
      if (!resumed && left > 0) stuck();  // releases the waiting fibers, which throw Abort
    }
    self = nullptr;
    next_block();
    if (b.over) return;
  }
}

// The persistent workers, grown to the largest block seen. Never destroyed: at process exit the
// (detached) workers sleep in wait_while and are not touched.
struct Pool {
  struct alignas(64) Slot {
    std::atomic<uint32_t> go{0};  // advanced to start a launch
  };
  Slot slots[1024];
  unsigned size = 0;
  std::atomic<uint32_t> active{0};  // workers still in the current launch

  void grow(unsigned threads) {
    for (; size < threads; size++)
      std::thread([this, t = size] {
        uint32_t seen = 0;
        for (;;) {
          wait_while(slots[t].go, seen);
          seen = slots[t].go.load();
          run_launch(t);
          if (active.fetch_sub(1) == 1) wake(active, false);
        }
      }).detach();
  }
};

Pool &pool() {
  static Pool *p = new Pool;
  return *p;
}

}  // namespace

void sync_block() {
  // Everything before the barrier is ordered before everything after: the interval ends.
  arrive_and_wait(block->barrier, [] {
    if (block->race_check) clear_touches();
  });
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
  Barrier &r = block->warp_barriers[warp];
  // Two sets of slots, used in alternate phases: a lane publishing for the next exchange
  // cannot overwrite a slot another lane has yet to read in this one.
  uint32_t *slots = &block->warp_slots[(warp * 2 + (r.phase.load() & 1)) * 32];
  slots[lane] = v;
  arrive_and_wait(r, [] {});
  return (src >= 0 && unsigned(src) < warp_size_here()) ? slots[src] : v;
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

// Runs the threads of each block as fibers on the launching thread (see run_fibers).
void repro_emu_set_fibers(int on) { fibers_on = on != 0; }

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
  uint64_t wide = uint64_t(blk[0]) * blk[1] * blk[2],
           blocks = uint64_t(grid[0]) * grid[1] * grid[2];
  if (wide == 0 || wide > 1024 || blocks == 0 || blocks > UINT32_MAX) {
    last_error = std::string(name) + ": a launch needs 1 to 1024 threads a block and a block";
    return 1;
  }
  unsigned threads = unsigned(wide);
  grid_dim = dim3{grid[0], grid[1], grid[2]};
  block_dim = dim3{blk[0], blk[1], blk[2]};
  kernel_name = name;
  buffers.clear();
  for (size_t i = 0; i < nranges; i++) buffers.emplace_back(ranges[2 * i], ranges[2 * i + 1]);
  out_of_bounds.clear();
  stats->read_bytes = stats->written_bytes = 0;

  static Block *b = new Block;  // never destroyed, like the pool
  b->threads = threads;
  b->barrier.expected = threads;
  b->barrier.arrived = 0;
  unsigned warps = (threads + 31) / 32;
  b->warp_barriers = std::make_unique<Barrier[]>(warps);
  for (unsigned w = 0; w < warps; w++)
    b->warp_barriers[w].expected = threads - w * 32 < 32 ? threads - w * 32 : 32;
  b->warp_slots.assign(warps * 2 * 32, 0);
  b->dynamic_shared.assign(shared_bytes, 0);
  b->race_check = race_check_on;
  b->touches.clear();
  b->race.clear();
  b->first_race.clear();
  b->running = int(threads);
  b->finished = 0;
  b->first_finished = -1;
  b->aborted = false;
  b->abort_reason.clear();
  b->kernel = &k;
  b->args = args;
  b->index = 0;
  b->count = unsigned(blocks);
  b->bid = dim3{0, 0, 0};
  b->over = false;
  b->read = b->written = 0;
  block = b;

  b->fibers = fibers_on;
  if (b->fibers && !grow_fibers(threads, last_error)) {
    block = nullptr;
    return 1;
  }
  if (b->fibers) {
    run_fibers();
  } else {
    Pool &p = pool();
    p.grow(threads);
    p.active = threads;
    for (unsigned t = 0; t < threads; t++) {
      p.slots[t].go.fetch_add(1);
      wake(p.slots[t].go, false);
    }
    for (uint32_t left; (left = p.active.load()) != 0;) wait_while(p.active, left);
  }
  block = nullptr;
  stats->read_bytes = b->read;
  stats->written_bytes = b->written;
  if (b->aborted) {
    last_error = b->abort_reason;
    return 4;
  }
  if (!out_of_bounds.empty()) {
    last_error = out_of_bounds;
    return 3;
  }
  if (!b->first_race.empty()) {
    last_error = b->first_race;
    return 2;
  }
  return 0;
}
}  // extern "C"

#include "kernels.inc"
