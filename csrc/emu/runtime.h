// resbm CUDA emulator: runs the CUDA kernels of csrc/cuda on the CPU, so that CI
// (which has no GPU) checks what they compute against the reference.
//
// A launch runs its blocks one after another. The threads of a block are
// fibers on the calling thread (own stacks; see runtime.cpp), switched only at barriers: at
// __syncthreads, and at the warp-wide exchange behind every warp collective
// (mma, ldmatrix, shuffles). Between two __syncthreads each warp in turn runs
// as far as it can before the next one starts (first to last warp in even
// blocks, last to first in odd ones): the most any warp can run ahead. A block
// whose threads wait at different barriers is a deadlock on the GPU; here it
// fails the launch with an error instead.
//
// Kept faithful where kernel bugs hide: a cp.async fills its destination with
// 0xFF bytes (NaN as floats) when issued and copies only when the thread waits
// for its group (cp_async_wait), so reading it before the wait, or reusing a
// buffer that other threads still read (a missing barrier), gives NaN; dynamic
// shared memory starts filled with 0xFF;
// shared-memory operands of cp.async and ldmatrix are bounds- and
// alignment-checked; a launch asking for more dynamic shared memory than it
// opted into, or than an sm_80 block can have, fails as on the GPU.
// Global memory bounds: checked when the kernels are built with AddressSanitizer
// (RESBM_SANITIZE, tests/test_sanitizers.py), which sees past-the-end accesses of
// torch's CPU tensors and of shared memory beyond the launch's size.
// wgmma (sm_90a's warpgroup mma) reads its shared-memory operands through their
// descriptors at issue and checks them again at the wait for its group, and writes its
// accumulators only then.
// Not modelled: timing, the order in which warps run between barriers, streams
// (launches run at once), the proxy fences (fence.proxy.async) and wgmma.fence, and
// whether all 128 threads of a warpgroup issue the same wgmma.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

// The running thread's coordinates (set by the emulator at every switch).
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

namespace resbm_emu {

constexpr size_t kMaxDynamicSmem = 163 * 1024;  // an sm_80 block's opt-in limit (sm_90: 227 KB)
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
// SMs the emulated device reports (few, like the Triton interpreter's 4 programs at once,
// so that the tests' small shapes also take the paths that split work to fill a GPU)
constexpr int kSms = 4;

// cudaError_t values the emulator reports (cuda_runtime.h's enum).
enum Error : int { kSuccess = 0, kInvalidValue = 1, kLaunchFailure = 719 };

// Runs `body` as every thread of every block of the grid; returns kSuccess or the error
// (its message in last_message()). `func` identifies the kernel (its attributes).
int run_grid(const void* func, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

void set_max_dynamic_smem(const void* func, int bytes);
int take_last_error();                  // and clear it (cudaGetLastError)
const char* last_message();             // of the last failed launch

void block_barrier();                   // __syncthreads
int lane();                             // of the running thread, in its warp

// Warp collective: every lane of the running thread's warp publishes `bytes` (at most
// kMaxExchange) bytes; returns the 32 lanes' values, lane by lane, valid until the warp's
// next collective but one (two buffers alternate, so one barrier per collective suffices).
constexpr size_t kMaxExchange = 64;
const void* exchange(const void* mine, size_t bytes);

unsigned char* dynamic_smem();  // the running block's

// Reports a bad shared-memory access (out of the block's dynamic shared memory or
// misaligned): the launch fails with `what` in its message.
void fault(const char* what, const void* address);
bool in_smem(const void* p, size_t bytes);

// cp.async of the running thread: queued, completed by wait_groups.
void cp_async(void* dst, const void* src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);

// wgmma of the running thread (one of a warpgroup's 128): d (its n / 2 accumulators)
// += A (64 x 16) B^T (n x 16), both read through shared-memory descriptors (no swizzle or
// the 128-byte swizzle).
// The operands are read at issue and again when the thread waits for the group: if they
// changed (a buffer reused before wgmma.wait_group) the launch fails; d is written at
// that wait, so reading it earlier sees the old values.
void wgmma(float* d, int n, int dtype, uint64_t desc_a, uint64_t desc_b);
// The same with A from registers: a_rows, this thread's A rows 16 w + g and + 8 (k 0..15 each),
// as its warp's registers hold them (read at issue; the PTX ISA has them unchanged until the
// wait, which is not checked).
void wgmma_rs(float* d, int n, int dtype, const uint16_t (&a_rows)[32], uint64_t desc_b);
void wgmma_commit();
void wgmma_wait(int pending);

template <typename T>
const T* exchange(const T& mine) {
  static_assert(sizeof(T) <= kMaxExchange && sizeof(T) % alignof(T) == 0, "exchange: too large");
  return static_cast<const T*>(exchange(&mine, sizeof(T)));
}

}  // namespace resbm_emu
