// The pass kernels' launchers (passes.cu): shared-memory opt-in, occupancy, d splits,
// the environment switches, and the dtype x KPAD dispatch.
#pragma once

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "row_kernels.cuh"
#include "weight_grad.cuh"

namespace resbm {
namespace cuda {
namespace {

#define RESBM_TRY(expr)               \
  do {                                \
    const int rc_ = (expr);           \
    if (rc_ != RESBM_OK) return rc_;  \
  } while (0)

// Opt into more than 48 KiB of dynamic shared memory when a kernel needs it: once per device,
// kernel and size, not on every launch (the attribute is a driver call). On the H200 of
// 2026-11-27, when every launch made it, each pass's host time per call was 50-130 us longer at
// k = 64 and 128, where one or two of its kernels opt in, than at k = 32, where none does (decode
// forward: 101-111 against 53-55 us); the H100's of that morning showed no such step. (A
// cudaDeviceReset would clear the attribute behind this cache; torch never resets a device.)
int prepare(const char* fn, const char* kernel, const void* func, size_t smem) {
  if (smem <= kDefaultSmem) return RESBM_OK;
  auto opt_in = [&] {
    const cudaError_t e = cudaFuncSetAttribute(func, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess)
      return fail(RESBM_ERR_CUDA, fn, "%s: cannot use %zu bytes of shared memory: %s", kernel, smem,
                  cudaGetErrorString(e));
    return int(RESBM_OK);
  };
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();  // no device to ask: the attribute call reports the problem
    return opt_in();
  }
  struct OptIn {
    int device;
    const void* func;
    size_t smem;  // the largest size opted into
  };
  static std::mutex mutex;
  static std::vector<OptIn> done;
  std::lock_guard<std::mutex> lock(mutex);  // (held across the driver call: made once per kernel and size)
  for (OptIn& o : done) {
    if (o.device != device || o.func != func) continue;
    if (o.smem < smem) {
      RESBM_TRY(opt_in());
      o.smem = smem;
    }
    return RESBM_OK;
  }
  RESBM_TRY(opt_in());
  done.push_back({device, func, smem});
  return RESBM_OK;
}

// "kernel<dtype,KPAD>", ",wgmma" added for a wgmma variant: the name a launch error reports.
template <int DT, int KPAD>
void kernel_name(char (&name)[80], const char* kernel, bool wg = false) {
  std::snprintf(name, sizeof name, "%s<%s,%d%s>", kernel, Operand<DT>::name(), KPAD, wg ? ",wgmma" : "");
}

template <int DT>
int launch_prep(const char* fn, const PrepArgs& p, cudaStream_t stream) {
  char name[80];
  std::snprintf(name, sizeof name, "prepare_operand_kernel<%s>", Operand<DT>::name());
  const int64_t total = p.rows * p.cols;
  const int64_t blocks = (total + 255) / 256 < 4096 ? (total + 255) / 256 : 4096;
  launch(prepare_operand_kernel<DT>, unsigned(blocks), 256, 0, stream, p);
  return launch_status(fn, name);
}

// A RESBM_CUDA_* switch read as the Python side reads it (checks.switch, which raises for any
// other value before a launch): 1 or 0 ("1" / "0" between blanks), -1 unset or blank.
int env_switch(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr) return -1;
  while (*env != '\0' && std::isspace(static_cast<unsigned char>(*env))) ++env;
  const char* end = env + std::strlen(env);
  while (end > env && std::isspace(static_cast<unsigned char>(end[-1]))) --end;
  if (end - env != 1 || (*env != '0' && *env != '1')) return -1;
  return *env - '0';
}

// The pass kernels (project_quantize, dequant_project, weight_grad) on wgmma: 16-bit inputs
// with KPAD <= 128, on an sm_90 device with a library built for sm_90a (RESBM_SM90A) or on the
// emulator. RESBM_CUDA_WGMMA unset: the projection only (project_quantize, whose swizzled wgmma
// loop took encode forward 0.61-0.81x the mma.sync loop's time on an H200, 2026-11-28,
// N=16384, d=4096; dequant_project's took decode forward 1.4-1.6x, and decode backward, the
// projection with the wgmma weight gradient, was no faster: bench/results/logs/
// h200-2026-11-28-third); "1" every pass kernel, "0" none (for comparison).
template <int DT, int KPAD>
constexpr bool wgmma_shape() {
  return DT != kFloat32 && KPAD <= 128;
}

bool wgmma_enabled(bool projection) {
  const int wanted = env_switch("RESBM_CUDA_WGMMA");
  if (wanted == -1 ? !projection : wanted == 0) return false;
#if defined(RESBM_CUDA_EMULATION)
  return true;
#elif defined(RESBM_SM90A)
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    (void)cudaGetLastError();  // no device to ask: the mma.sync kernel reports the problem
    return false;
  }
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

template <int DT, int KPAD, bool WG>
int launch_pq_kernel(const char* fn, const PQArgs& p, cudaStream_t stream) {
  using C = RowCfg<DT, KPAD>;
  char name[80];
  kernel_name<DT, KPAD>(name, "project_quantize_kernel", WG);
  const void* func = reinterpret_cast<const void*>(&project_quantize_kernel<DT, KPAD, WG>);
  constexpr size_t smem = WG ? C::WG_SMEM : C::PQ_SMEM;
  constexpr int bn = WG ? C::WG_BN : C::BN, threads = WG ? C::WG_THREADS : kThreads;
  RESBM_TRY(prepare(fn, name, func, smem));
  launch(project_quantize_kernel<DT, KPAD, WG>, dim3(unsigned((p.n + bn - 1) / bn), unsigned(p.splits)), threads,
         smem, stream, p);
  RESBM_TRY(launch_status(fn, name));
  if (p.splits == 1) return RESBM_OK;
  kernel_name<DT, KPAD>(name, "finish_rows_kernel");
  launch(finish_rows_kernel<DT, KPAD>, unsigned((p.n + C::BN - 1) / C::BN), kThreads, C::FINISH_BYTES, stream, p);
  return launch_status(fn, name);
}

template <int DT, int KPAD>
int launch_pq(const char* fn, const PQArgs& p, const PrepArgs& prep, cudaStream_t stream) {
  RESBM_TRY(launch_prep<DT>(fn, prep, stream));
  if constexpr (wgmma_shape<DT, KPAD>()) {
    if (wgmma_enabled(true)) return launch_pq_kernel<DT, KPAD, true>(fn, p, stream);
  }
  return launch_pq_kernel<DT, KPAD, false>(fn, p, stream);
}

// Blocks the current device runs at once: its SMs times the blocks of kernel `func` (kThreads
// threads, `smem` bytes of dynamic shared memory) an SM holds, or one per SM when `func` is
// null; at least 1. Asked once per device and kernel (the launchers run on every op call).
int blocks_at_once(const void* func, size_t smem) {
  struct Entry {
    int device;
    const void* func;
    size_t smem;
    int blocks;
  };
  static std::mutex mutex;
  static std::vector<Entry> known;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();  // no device to ask: one block per row block (the launch reports it)
    return 1;
  }
  std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : known)
    if (e.device == device && e.func == func && e.smem == smem) return e.blocks;
  int sms = 0, per_sm = 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      (func != nullptr &&
       cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, func, kThreads, smem) != cudaSuccess)) {
    (void)cudaGetLastError();
    return 1;
  }
  const int blocks = (sms > 1 ? sms : 1) * (per_sm > 1 ? per_sm : 1);
  known.push_back({device, func, smem, blocks});
  return blocks;
}

// A switch that is on unless its environment variable is "0", read per launch (for
// comparisons): RESBM_CUDA_SPLITS=0 keeps one block per row block, RESBM_CUDA_PREFETCH=0 turns
// dequant_project's L2 prefetch of its epilogue input off.
bool on_unless_zero(const char* name) { return env_switch(name) != 0; }
bool splits_enabled() { return on_unless_zero("RESBM_CUDA_SPLITS"); }

// Whether encode backward's row kernel copies its x tiles through the weight tiles' ring,
// given the blocks the device runs at once with and without them there and its SMs: by
// default unless that leaves an SM one block where more fit (H200, 2026-11-28, N=16384,
// d=4096, bf16: staged 6-7 % faster at k=32, 3 blocks an SM against 5; the same at k=64;
// 10-11 % slower at k=128, one block against two); RESBM_CUDA_STAGE_X=1 always, 0 never
// (for comparison).
bool stage_x_wanted(int blocks_staged, int blocks_plain, int sms) {
  const int wanted = env_switch("RESBM_CUDA_STAGE_X");
  if (wanted != -1) return wanted == 1;
  return blocks_staged >= blocks_plain || blocks_staged > sms;
}

// d splits for `row_blocks` blocks of rows over `tiles` d tiles, `slots` blocks at once each
// taking about as long per tile as alone: a launch then takes about waves x (run + fixed),
// waves = ceil(row_blocks x splits / slots), run = ceil(tiles / splits) and fixed a block's
// own cost (its rows' set-up) in tiles, kSplitFixedTiles. The fewest splits up to `most` (and
// runs of at least kMinSplitTiles tiles) that minimise that, none left empty.
int64_t fill_splits(int64_t row_blocks, int64_t tiles, int64_t slots, int64_t most) {
  if (row_blocks < 1) return 1;  // (no rows)
  // (past about slots / row_blocks splits the cost only grows: waves grow with the splits)
  most = cmin(cmin(most, tiles / kMinSplitTiles), cmin(2 * ((slots + row_blocks - 1) / row_blocks) + 2, kMaxGridY));
  auto cost = [&](int64_t s) { return (row_blocks * s + slots - 1) / slots * ((tiles + s - 1) / s + kSplitFixedTiles); };
  int64_t best = 1;
  for (int64_t s = 2; s <= most; ++s)
    if (cost(s) < cost(best)) best = s;
  const int64_t run = (tiles + best - 1) / best;
  return (tiles + run - 1) / run;
}

// d splits of dequant_project (output columns are independent: no partials), its blocks
// counted as slots: they are latency bound (H100, d=4096, k=32, bf16, from the run of
// 2026-11-26: 0.94 / 1.42 / 1.87 64x64 tiles per us per SM with 0.5 / 1.9 / 7.8 blocks per
// SM; k=128: 0.51 / 0.76 / 0.80, more bound by the SM). One split with the RMSNorm pre-pass,
// which every split would repeat over x.
template <int DT, int KPAD>
int dq_splits(const DQArgs& p, int64_t row_blocks, const void* func, size_t smem) {
  using C = RowCfg<DT, KPAD>;
  if (!splits_enabled() || (p.gamma != nullptr && p.stats == nullptr)) return 1;
  return int(fill_splits(row_blocks, (p.d + C::BD2 - 1) / C::BD2, blocks_at_once(func, smem), kMaxGridY));
}

// d splits of project_quantize (resbm_cuda_projection_splits). Its blocks are bound by their
// SM, not by latency (same run: 0.95 / 0.87 / 1.02 tiles per us per SM at k=32 with 0.5 /
// 1.9 / 7.8 blocks per SM, 0.53 / 0.49 / 0.54 at k=128), so a second block on an SM gains
// nothing: one slot per SM, splits only while row blocks are fewer than SMs, and each adds
// (n, k + 1) fp32 partials: at most kMaxProjectionSplits.
template <int DT, int KPAD>
int pq_splits(const char*, int64_t n, int64_t d, int* splits) {
  using C = RowCfg<DT, KPAD>;
  const bool wg = wgmma_shape<DT, KPAD>() && wgmma_enabled(true);  // launch_pq's loop and so its tiles
  const int64_t bd = wg ? C::WG_BD : C::BD, bn = wg ? C::WG_BN : C::BN;
  const int64_t row_blocks = (n + bn - 1) / bn, sms = blocks_at_once(nullptr, 0);
  *splits = row_blocks >= sms || !splits_enabled()
                ? 1
                : int(fill_splits(row_blocks, (d + bd - 1) / bd, sms, kMaxProjectionSplits));
  return RESBM_OK;
}

template <int DT, int KPAD, bool WG>
int launch_dq_kernel(const char* fn, const DQArgs& p, cudaStream_t stream) {
  using C = RowCfg<DT, KPAD>;
  char name[80];
  kernel_name<DT, KPAD>(name, "dequant_project_kernel", WG);
  const void* func = reinterpret_cast<const void*>(&dequant_project_kernel<DT, KPAD, WG>);
  DQArgs args = p;
  args.prefetch = on_unless_zero("RESBM_CUDA_PREFETCH");
  const bool prepass = p.gamma != nullptr && p.stats == nullptr;
  const size_t staged = C::dq_smem(prepass, true), plain = C::dq_smem(prepass, false);
  if (p.gamma != nullptr && C::STAGE_X) {
    RESBM_TRY(prepare(fn, name, func, staged));  // (the occupancy query needs the opt-in)
    args.stage_x = stage_x_wanted(blocks_at_once(func, staged), blocks_at_once(func, plain),
                                  blocks_at_once(nullptr, 0));
  }
  const size_t smem = args.stage_x ? staged : plain;
  RESBM_TRY(prepare(fn, name, func, smem));
  const int64_t blocks = (p.n + C::BN - 1) / C::BN;
  const dim3 grid(unsigned(blocks), unsigned(dq_splits<DT, KPAD>(p, blocks, func, smem)));
  launch(dequant_project_kernel<DT, KPAD, WG>, grid, kThreads, smem, stream, args);
  return launch_status(fn, name);
}

// preps: the operands to build first (n_preps of them: 0, 1 or 2)
template <int DT, int KPAD>
int launch_dq(const char* fn, const DQArgs& p, const PrepArgs* preps, int n_preps,
              cudaStream_t stream) {
  for (int i = 0; i < n_preps; ++i) RESBM_TRY(launch_prep<DT>(fn, preps[i], stream));
  if constexpr (wgmma_shape<DT, KPAD>()) {
    if (wgmma_enabled(false)) return launch_dq_kernel<DT, KPAD, true>(fn, p, stream);
  }
  return launch_dq_kernel<DT, KPAD, false>(fn, p, stream);
}

template <int DT, int KPAD, bool WG>
int launch_wg_kernel(const char* fn, const WGArgs& p, int splits, cudaStream_t stream) {
  using C = WgCfg<DT, KPAD>;
  char name[80];
  kernel_name<DT, KPAD>(name, "weight_grad_kernel", WG);
  const void* func = reinterpret_cast<const void*>(&weight_grad_kernel<DT, KPAD, WG>);
  RESBM_TRY(prepare(fn, name, func, C::SMEM));
  const dim3 grid(unsigned((p.d + C::BDW - 1) / C::BDW), unsigned(splits));
  launch(weight_grad_kernel<DT, KPAD, WG>, grid, C::THREADS, C::SMEM, stream, p);
  return launch_status(fn, name);
}

template <int DT, int KPAD>
int launch_wg(const char* fn, const WOArgs& op, const WGArgs& p, int splits, cudaStream_t stream) {
  char name[80];
  kernel_name<DT, KPAD>(name, "weight_operand_kernel");
  using O = WoCfg<DT, KPAD>;
  const int64_t op_blocks = (op.npad + O::BN - 1) / O::BN;
  launch(weight_operand_kernel<DT, KPAD>, unsigned(op_blocks > 0 ? op_blocks : 1), kThreads, O::SMEM, stream, op);
  RESBM_TRY(launch_status(fn, name));
  if constexpr (wgmma_shape<DT, KPAD>()) {
    if (wgmma_enabled(false)) return launch_wg_kernel<DT, KPAD, true>(fn, p, splits, stream);
  }
  return launch_wg_kernel<DT, KPAD, false>(fn, p, splits, stream);
}

int kpad_of(int64_t k) { return k <= 16 ? 16 : k <= 32 ? 32 : k <= 64 ? 64 : k <= 128 ? 128 : 256; }

// Instantiates LAUNCH<DT, KPAD> for the runtime (dtype, k).
#define RESBM_DISPATCH(LAUNCH, dtype, k, ...)                                         \
  do {                                                                                \
    const int kp_ = kpad_of(k);                                                       \
    switch ((dtype) * 1000 + kp_) {                                                   \
      case kFloat32 * 1000 + 16: return LAUNCH<kFloat32, 16>(__VA_ARGS__);            \
      case kFloat32 * 1000 + 32: return LAUNCH<kFloat32, 32>(__VA_ARGS__);            \
      case kFloat32 * 1000 + 64: return LAUNCH<kFloat32, 64>(__VA_ARGS__);            \
      case kFloat32 * 1000 + 128: return LAUNCH<kFloat32, 128>(__VA_ARGS__);          \
      case kFloat32 * 1000 + 256: return LAUNCH<kFloat32, 256>(__VA_ARGS__);          \
      case kFloat16 * 1000 + 16: return LAUNCH<kFloat16, 16>(__VA_ARGS__);            \
      case kFloat16 * 1000 + 32: return LAUNCH<kFloat16, 32>(__VA_ARGS__);            \
      case kFloat16 * 1000 + 64: return LAUNCH<kFloat16, 64>(__VA_ARGS__);            \
      case kFloat16 * 1000 + 128: return LAUNCH<kFloat16, 128>(__VA_ARGS__);          \
      case kFloat16 * 1000 + 256: return LAUNCH<kFloat16, 256>(__VA_ARGS__);          \
      case kBFloat16 * 1000 + 16: return LAUNCH<kBFloat16, 16>(__VA_ARGS__);          \
      case kBFloat16 * 1000 + 32: return LAUNCH<kBFloat16, 32>(__VA_ARGS__);          \
      case kBFloat16 * 1000 + 64: return LAUNCH<kBFloat16, 64>(__VA_ARGS__);          \
      case kBFloat16 * 1000 + 128: return LAUNCH<kBFloat16, 128>(__VA_ARGS__);        \
      case kBFloat16 * 1000 + 256: return LAUNCH<kBFloat16, 256>(__VA_ARGS__);        \
      default: return fail(RESBM_ERR_ARG, fn, "no kernel for dtype=%d, k=%lld", int(dtype), \
                           (long long)(k));                                           \
    }                                                                                 \
  } while (0)

}  // namespace
}  // namespace cuda
}  // namespace resbm
