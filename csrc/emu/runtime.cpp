// The CUDA emulator's scheduler: blocks one after another, a block's threads as
// fibers switched at barriers (see runtime.h). A fiber starts on its own stack with
// makecontext / setcontext; after that every switch is a _setjmp / _longjmp pair, which
// does not save the signal mask (swapcontext makes a system call for it on every switch).
// The checked longjmp of _FORTIFY_SOURCE refuses jumps between stacks: off for this file.
// Built with AddressSanitizer (tests/test_sanitizers.py), every switch tells it which
// stack runs next, and the part of the shared-memory buffer beyond the launch's dynamic
// shared memory is poisoned, so a kernel's access past it is reported.
#undef _FORTIFY_SOURCE
#include "runtime.h"

#include "resbm/codec.h"

#include <setjmp.h>
#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#define RESBM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define RESBM_ASAN 1
#endif
#endif
#ifdef RESBM_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace resbm_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned kMaxThreads = 1024;

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Copy {
  void* dst;
  const void* src;
  int src_bytes;
};

// Operations a thread issues asynchronously, committed in groups and completed, oldest
// group first, when it waits (cp.async and wgmma both work this way).
template <typename Op>
struct AsyncGroups {
  std::vector<Op> open;  // not yet committed
  std::deque<std::vector<Op>> committed;

  void commit() {
    committed.push_back(std::move(open));
    open.clear();
  }
  // Completes the oldest groups until at most `pending` are left.
  template <typename Complete>
  void wait(int pending, Complete complete) {
    while (committed.size() > size_t(pending)) {
      for (const Op& op : committed.front()) complete(op);
      committed.pop_front();
    }
  }
  bool empty() const { return open.empty() && committed.empty(); }
  void clear() {
    open.clear();
    committed.clear();
  }
};

// One thread's part of a wgmma: its accumulators and operand elements as read at issue.
struct Wgmma {
  float* d;
  int n, dtype;
  uint64_t desc_a, desc_b;
  bool a_in_registers;             // A from registers (wgmma_rs): desc_a unused
  std::vector<uint16_t> operands;  // A: its 2 rows x 16, then B: its n / 4 columns x 16
};

struct Fiber {
  ucontext_t context;  // its start
  jmp_buf resume;      // where it waits
  void* asan_fake_stack = nullptr;  // AddressSanitizer's, while another stack runs
  bool started = false;
  std::unique_ptr<unsigned char[]> stack{new unsigned char[kStackBytes]};
  State state = State::kDone;
  uint3 index{};
  unsigned linear = 0;
  unsigned collectives = 0;  // warp collectives so far: picks the exchange buffer
  AsyncGroups<Copy> copies;  // cp.async
  AsyncGroups<Wgmma> wgmmas;
};

struct AlignedBytes {
  struct Free {
    void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  std::unique_ptr<unsigned char[], Free> data;
  size_t size = 0;
  void resize(size_t n) {
    if (n > size) {
      data.reset(static_cast<unsigned char*>(::operator new[](n, std::align_val_t(64))));
      size = n;
    }
  }
};

// The running launch (one at a time: g_mutex).
struct Launch {
  jmp_buf back;  // the scheduler, waiting for the running fiber to yield or end
  // the scheduler's stack (where fibers jump back to), for AddressSanitizer
  void* asan_fake_stack = nullptr;
  const void* stack_bottom = nullptr;
  size_t stack_size = 0;
  std::vector<Fiber> fibers;
  unsigned current = 0;
  const std::function<void()>* body = nullptr;
  AlignedBytes smem, exchange;
  size_t smem_bytes = 0;
  std::string fault;  // the first fault of the launch
};

std::mutex g_mutex;
Launch g_launch;
thread_local bool t_running = false;  // this thread runs a launch (its fibers run on it too)
std::unordered_map<const void*, int> g_max_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize
long long g_smem_opt_ins = 0;                     // calls that set it (resbm_emu_smem_opt_ins)
thread_local int t_last_error = kSuccess;
thread_local std::string t_message;

// AddressSanitizer hooks (no-ops without it): `switching` just before a jump to another
// stack (fake_stack_save: where it keeps this stack's state; null when this stack is
// done), `switched` just after landing on one.
#ifdef RESBM_ASAN
void switching(void** fake_stack_save, const void* bottom, size_t size) {
  __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
}
void switched(void* fake_stack, const void** old_bottom = nullptr, size_t* old_size = nullptr) {
  __sanitizer_finish_switch_fiber(fake_stack, old_bottom, old_size);
}
void poison(const void* p, size_t bytes) { ASAN_POISON_MEMORY_REGION(p, bytes); }
void unpoison(const void* p, size_t bytes) { ASAN_UNPOISON_MEMORY_REGION(p, bytes); }
#else
void switching(void**, const void*, size_t) {}
void switched(void*, const void** = nullptr, size_t* = nullptr) {}
void poison(const void*, size_t) {}
void unpoison(const void*, size_t) {}
#endif

Fiber& running() { return g_launch.fibers[g_launch.current]; }

void yield_as(State state) {
  Fiber& f = running();
  f.state = state;
  if (_setjmp(f.resume) == 0) {
    switching(&f.asan_fake_stack, g_launch.stack_bottom, g_launch.stack_size);
    _longjmp(g_launch.back, 1);
  }
  switched(f.asan_fake_stack);
}

void fiber_main() {
  switched(nullptr, &g_launch.stack_bottom, &g_launch.stack_size);  // came from the scheduler
  (*g_launch.body)();
  Fiber& f = running();
  f.copies.clear();  // copies never waited for: nobody reads them
  if (!f.wgmmas.empty())
    fault("wgmma still pending when the thread exits (no wgmma.wait_group for it)", nullptr);
  f.state = State::kDone;
  switching(nullptr, g_launch.stack_bottom, g_launch.stack_size);
  _longjmp(g_launch.back, 1);  // never returns: the fiber's stack is reused
}

void note_fault(const std::string& what) {
  if (g_launch.fault.empty()) g_launch.fault = what;
}

std::string thread_name(const Fiber& f) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", blockIdx.x, blockIdx.y,
                blockIdx.z, f.index.x, f.index.y, f.index.z);
  return buf;
}

// Runs one block to completion; false (and a fault) on a deadlock.
bool run_block(unsigned threads) {
  Launch& L = g_launch;
  std::memset(L.smem.data.get(), 0xFF, L.smem_bytes);  // unwritten shared memory reads as NaN
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& f = L.fibers[i];
    f.linear = i;
    f.index = {i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
    f.collectives = 0;
    f.copies.clear();
    f.wgmmas.clear();
    f.state = State::kReady;
    unpoison(f.stack.get(), kStackBytes);  // frames of the last block, left by a jump
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    f.started = false;
    makecontext(&f.context, fiber_main, 0);
  }
  const unsigned warps = (threads + 31) / 32;
  const bool reverse = (blockIdx.x + blockIdx.y + blockIdx.z) % 2 == 1;
  for (;;) {
    // each warp in turn runs as far as it can (to the block barrier or its end), so that
    // a warp reusing shared memory that later warps still read shows (both orders are used)
    bool progressed = false;
    for (unsigned wi = 0; wi < warps; ++wi) {
      const unsigned w = reverse ? warps - 1 - wi : wi;
      const unsigned first = 32 * w, last = first + 32 < threads ? first + 32 : threads;
      for (;;) {
        for (unsigned i = first; i < last; ++i) {
          if (L.fibers[i].state != State::kReady) continue;
          L.current = i;
          threadIdx = L.fibers[i].index;
          Fiber& f = L.fibers[i];
          if (_setjmp(L.back) == 0) {
            switching(&L.asan_fake_stack, f.stack.get(), kStackBytes);
            if (f.started) _longjmp(f.resume, 1);
            f.started = true;
            setcontext(&f.context);
          }
          switched(L.asan_fake_stack);
          progressed = true;
        }
        bool all_at_warp = true;  // every lane, none exited: a collective needs the whole warp
        for (unsigned i = first; i < last; ++i)
          all_at_warp = all_at_warp && L.fibers[i].state == State::kAtWarpBarrier;
        if (!all_at_warp) break;
        for (unsigned i = first; i < last; ++i) L.fibers[i].state = State::kReady;
      }
    }
    unsigned live = 0, at_block = 0;
    for (unsigned i = 0; i < threads; ++i) {
      live += L.fibers[i].state != State::kDone;
      at_block += L.fibers[i].state == State::kAtBlockBarrier;
    }
    if (live == 0) return true;
    if (at_block == live) {  // exited threads do not hold a barrier up
      for (unsigned i = 0; i < threads; ++i)
        if (L.fibers[i].state == State::kAtBlockBarrier) L.fibers[i].state = State::kReady;
      continue;
    }
    if (!progressed) {
      unsigned stuck = 0;
      while (L.fibers[stuck].state == State::kDone) ++stuck;
      note_fault("deadlock: threads wait at different barriers (a __syncthreads not reached by all "
                 "threads, or a warp collective with exited or diverged lanes), e.g. " +
                 thread_name(L.fibers[stuck]));
      return false;
    }
  }
}

int fail_launch(int code, const std::string& message) {
  t_last_error = code;
  t_message = "emulated launch: " + message;
  return code;
}

}  // namespace

int run_grid(const void* func, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  // (before the lock, which a launch from inside a kernel body would wait for forever)
  if (t_running) return fail_launch(kLaunchFailure, "a kernel launched from inside a kernel");
  std::lock_guard<std::mutex> lock(g_mutex);
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535)
    return fail_launch(kInvalidValue, "invalid configuration argument");
  const auto opt_in = g_max_smem.find(func);
  const size_t limit = opt_in == g_max_smem.end() ? kDefaultDynamicSmem : size_t(opt_in->second);
  if (smem > (limit > kDefaultDynamicSmem ? limit : kDefaultDynamicSmem))
    return fail_launch(kInvalidValue, "too much dynamic shared memory (" + std::to_string(smem) +
                                          " bytes; opted into " + std::to_string(limit) + ")");
  Launch& L = g_launch;
  if (L.fibers.size() < threads) L.fibers.resize(threads);
  L.smem.resize(smem > 16 ? smem : 16);
  L.smem_bytes = smem;
  unpoison(L.smem.data.get(), L.smem.size);
  poison(L.smem.data.get() + smem, L.smem.size - smem);  // kept from a larger launch: not this one's
  L.exchange.resize(size_t((threads + 31) / 32) * 2 * 32 * kMaxExchange);
  L.body = &body;
  L.fault.clear();
  t_running = true;
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z && L.fault.empty(); ++z)
    for (unsigned y = 0; y < grid.y && L.fault.empty(); ++y)
      for (unsigned x = 0; x < grid.x && L.fault.empty(); ++x) {
        blockIdx = {x, y, z};
        run_block(threads);
      }
  t_running = false;
  if (!L.fault.empty()) return fail_launch(kLaunchFailure, L.fault);
  return kSuccess;
}

void set_max_dynamic_smem(const void* func, int bytes) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_max_smem[func] = bytes;
  ++g_smem_opt_ins;
}

int take_last_error() {
  const int e = t_last_error;
  t_last_error = kSuccess;
  return e;
}

const char* last_message() { return t_message.c_str(); }

void block_barrier() { yield_as(State::kAtBlockBarrier); }

int lane() { return int(running().linear % 32); }

const void* exchange(const void* mine, size_t bytes) {
  Fiber& f = running();
  const unsigned warp = f.linear / 32;
  unsigned char* buffer = g_launch.exchange.data.get() + (size_t(warp) * 2 + f.collectives % 2) * 32 * kMaxExchange;
  std::memcpy(buffer + (f.linear % 32) * bytes, mine, bytes);
  ++f.collectives;
  yield_as(State::kAtWarpBarrier);
  return buffer;
}

unsigned char* dynamic_smem() { return g_launch.smem.data.get(); }

bool in_smem(const void* p, size_t bytes) {
  const unsigned char* b = g_launch.smem.data.get();
  const unsigned char* q = static_cast<const unsigned char*>(p);
  return q >= b && q + bytes <= b + g_launch.smem_bytes;
}

void fault(const char* what, const void* address) {
  char buf[64];
  std::snprintf(buf, sizeof buf, " (address %p, ", address);
  note_fault(std::string(what) + buf + thread_name(running()) + ")");
}

void cp_async(void* dst, const void* src, int src_bytes) {
  if (!in_smem(dst, 16) || reinterpret_cast<uintptr_t>(dst) % 16)
    return fault("cp.async destination outside shared memory or not 16-byte aligned", dst);
  if (src_bytes < 0 || src_bytes > 16 || (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16))
    return fault("cp.async source not 16-byte aligned or a bad size", src);
  std::memset(dst, 0xFF, 16);  // from here until the wait the destination holds nothing valid
  running().copies.open.push_back({dst, src, src_bytes});
}

void cp_async_commit() { running().copies.commit(); }

void cp_async_wait(int pending) {
  running().copies.wait(pending, [](const Copy& c) {
    if (c.src_bytes > 0) std::memcpy(c.dst, c.src, size_t(c.src_bytes));
    std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, size_t(16 - c.src_bytes));
  });
}

namespace {

// A k-major wgmma operand in shared memory as its descriptor lays it out. No swizzle: 8 x
// 16-byte core matrices, LBO bytes apart along k and SBO apart along the rows. 128-byte
// swizzle: rows of 128 bytes, 8-row groups SBO apart, and the byte address's bits 4-6 (its
// 16-byte chunk in the row) XORed with bits 7-9 (its row in the group of 8). Only the layouts
// whose groups start 1024-byte aligned (base offset 0) are modelled: a 16-element k slice at
// 0, 32, 64 or 96 bytes into the rows.
struct WgmmaOperand {
  size_t start, lbo, sbo;
  bool swizzled;

  explicit WgmmaOperand(uint64_t desc)
      : start(size_t(desc & 0x3FFF) << 4), lbo(size_t((desc >> 16) & 0x3FFF) << 4),
        sbo(size_t((desc >> 32) & 0x3FFF) << 4), swizzled((desc >> 62) == 1) {
    const uint64_t mode = desc >> 62;
    if (mode > 1 || ((desc >> 49) & 7) != 0)
      fault("wgmma descriptor with a 64- or 32-byte swizzle or a base offset (not modelled)", nullptr);
    if (swizzled && ((start >> 7) % 8 != 0 || start % 128 % 32 != 0 || sbo % 1024 != 0))
      fault("wgmma 128-byte swizzled operand not 1024-byte aligned (start, or SBO a multiple of 1024)", nullptr);
  }

  // Element (row, kk); 0 (and a fault) outside shared memory.
  uint16_t at(int row, int kk) const {
    size_t byte;
    if (swizzled) {
      byte = start + size_t(row / 8) * sbo + size_t(row % 8) * 128 + size_t(kk) * 2;
      byte ^= ((byte >> 7) & 7) << 4;
    } else {
      byte = start + size_t(row / 8) * sbo + size_t(kk / 8) * lbo + size_t(row % 8) * 16 + size_t(kk % 8) * 2;
    }
    uint16_t v = 0;
    if (byte + 2 > g_launch.smem_bytes)
      fault("wgmma operand outside shared memory", g_launch.smem.data.get() + byte);
    else
      std::memcpy(&v, g_launch.smem.data.get() + byte, 2);
    return v;
  }
};

// This thread's operand elements of a wgmma: A rows 16 w + g (+ 8), B columns 8 j + 2 t (+ 1).
// a_rows: A's 32 from registers, else null (A through desc_a).
std::vector<uint16_t> wgmma_operands(const Fiber& f, int n, const uint16_t* a_rows, uint64_t desc_a,
                                     uint64_t desc_b) {
  const int lane = int(f.linear % 32), w = int(f.linear / 32) % 4, g = lane / 4, t = lane % 4;
  const WgmmaOperand b(desc_b);
  std::vector<uint16_t> v;
  v.reserve(size_t(2 + n / 4) * 16);
  if (a_rows != nullptr) {
    v.assign(a_rows, a_rows + 32);
  } else {
    const WgmmaOperand a(desc_a);
    for (int h = 0; h < 2; ++h)
      for (int kk = 0; kk < 16; ++kk) v.push_back(a.at(16 * w + g + 8 * h, kk));
  }
  for (int j = 0; j < n / 8; ++j)
    for (int c = 0; c < 2; ++c)
      for (int kk = 0; kk < 16; ++kk) v.push_back(b.at(8 * j + 2 * t + c, kk));
  return v;
}

float operand_value(int dtype, uint16_t bits) {
  return dtype == resbm::kFloat16 ? resbm::fp16_to_float(bits) : resbm::bf16_to_float(bits);
}

void complete(const Fiber& f, const Wgmma& op) {
  const uint16_t* a_rows = op.a_in_registers ? op.operands.data() : nullptr;
  if (wgmma_operands(f, op.n, a_rows, op.desc_a, op.desc_b) != op.operands)
    return fault("wgmma operand in shared memory changed before wgmma.wait_group for it", nullptr);
  const uint16_t* a = op.operands.data();
  const uint16_t* b = a + 32;
  for (int j = 0; j < op.n / 8; ++j)
    for (int i = 0; i < 4; ++i) {  // d[4 j + i]: row g + 8 (i / 2), column 8 j + 2 t + i % 2
      float acc = op.d[4 * j + i];
      for (int kk = 0; kk < 16; ++kk)  // exact products of 16-bit values; fp32 sums
        acc += operand_value(op.dtype, a[(i / 2) * 16 + kk]) *
               operand_value(op.dtype, b[(2 * j + i % 2) * 16 + kk]);
      op.d[4 * j + i] = acc;
    }
}

void issue_wgmma(float* d, int n, int dtype, const uint16_t* a_rows, uint64_t desc_a, uint64_t desc_b) {
  Fiber& f = running();
  if (blockDim.x % 128 != 0 || blockDim.y * blockDim.z != 1)
    return fault("wgmma in a block that is not whole warpgroups (blockDim.x a multiple of 128)", nullptr);
  f.wgmmas.open.push_back(
      {d, n, dtype, desc_a, desc_b, a_rows != nullptr, wgmma_operands(f, n, a_rows, desc_a, desc_b)});
}

}  // namespace

void wgmma(float* d, int n, int dtype, uint64_t desc_a, uint64_t desc_b) {
  issue_wgmma(d, n, dtype, nullptr, desc_a, desc_b);
}

void wgmma_rs(float* d, int n, int dtype, const uint16_t (&a_rows)[32], uint64_t desc_b) {
  issue_wgmma(d, n, dtype, a_rows, 0, desc_b);
}

void wgmma_commit() { running().wgmmas.commit(); }

void wgmma_wait(int pending) {
  Fiber& f = running();
  f.wgmmas.wait(pending, [&](const Wgmma& op) { complete(f, op); });
}

}  // namespace resbm_emu

// How many shared-memory opt-ins (cudaFuncSetAttribute) the kernels' launchers made: a
// driver call on a GPU, which they make once per kernel and size (tests/test_cuda_backend.py).
extern "C" __attribute__((visibility("default"))) long long resbm_emu_smem_opt_ins(void) {
  std::lock_guard<std::mutex> lock(resbm_emu::g_mutex);
  return resbm_emu::g_smem_opt_ins;
}
