// libresbm_cuda: the four fused ResBM passes and the weight-gradient reduction
// (same math as resbm_kernels/backends/reference.py and the Triton backend).
//
// Three kernel families, each a template over the input dtype DT and the
// padded bottleneck width KPAD (16, 32, 64, 128 or 256 >= k), and
// prepare_operand_kernel, which first writes a pass's weights in the tensor
// cores' operand types (RMSNorm weight folded in, tf32 hi + lo for fp32,
// zero-padded to KPAD) to the caller's workspace, once per call, so that no
// block converts weights: they stream in with cp.async like the activations.
//
//  project_quantize_kernel  (encode forward, decode backward)
//      One CTA of 128 threads per BN rows (BN = 64, or 32 when KPAD = 256).
//      Streams the (BN, d) input and the prepared (KPAD, d) weights through
//      shared memory in 128-byte-wide d tiles (64 when KPAD = 256; 16-byte
//      cp.async through PS buffers: two tiles in flight while one is
//      multiplied, fp32 double buffered), multiplies them on tensor cores (mma.sync; fp32
//      accumulators for all k columns stay in registers), gathers the row sums
//      of squares of the folded RMSNorm from the same A fragments (16-bit inputs:
//      on the tensor cores, the diagonal of A A^T), then scales,
//      adds the identity path x[:, :k], and quantizes + packs through the shared
//      codec functions of resbm/codec.h (bit-exact with the reference given z).
//      On sm_90a, 16-bit inputs with KPAD <= 128 (project_loop_wgmma): the 128
//      threads are one warpgroup and multiply tiles twice as wide (256 bytes, four
//      buffers, three at KPAD = 128), laid out as wgmma's core matrices, straight
//      from shared memory (wgmma m64nKPADk16; with four buffers each tile's wgmma
//      stays in flight while the next one's are issued), the sums of squares read
//      from the same tiles; only with RESBM_CUDA_WGMMA=1 (slower than mma.sync on an H100).
//      For small n, grid.y splits d (pq_splits): each CTA then projects a run of d
//      tiles and writes fp32 partials, and finish_rows_kernel sums them in split
//      order and does the rest (finish_rows, shared with the unsplit kernel).
//  dequant_project_kernel   (decode forward, encode backward)
//      One CTA per BN rows and run of d (grid.y splits d while the row blocks alone
//      would leave the GPU part idle or its last wave half empty, dq_splits; output
//      columns are independent):
//      dequantizes its (BN, k) payload rows into shared
//      memory once (shared codec functions, eight elements' loads in flight per thread:
//      for_block_elements, as finish_rows reads x[:, :k]; for 16-bit inputs up to KPAD = 128
//      also into the tensor cores' A fragments once), then walks its d run in BD2-column tiles:
//      tensor-core product with the (BD2, KPAD) weight tile (w_d's rows as
//      they are for 16-bit decode forward, else prepared; the weight tiles
//      stream through a ring of RowCfg::WS cp.async buffers, the next ones
//      loading while this one is used), identity pad, residual, and the RMSNorm
//      backward terms, written with 16-byte stores (a whole tile with none of them
//      through store_plain_tile16 / store_plain_tile, without the per-chunk tests).
//      Encode backward through RMSNorm first re-runs the projection loop of
//      the encoder over x for r = 1/rms(x) and s = x (gamma W)^T (as Triton),
//      unless given encode forward's row statistics. Its main loop's x tiles come
//      through the weight tiles' ring, copied with them (RowCfg::STAGE_X), unless
//      that leaves an SM one block (stage_x_wanted).
//  weight_grad_kernel       (grad W_d, grad W_e)
//      out[split][c][j] = sum_rows rscale[r] * zhat[r][c] * a[r][j]: a separate
//      pass over the big input; grid (d tiles, row splits), deterministic
//      per-split fp32 partials summed by the caller (no atomics). Its operand
//      (rscale * zhat)^T is written once per call by weight_operand_kernel (a block
//      per BN tokens, transposed through shared memory), split
//      in the tensor cores' type (hi + lo, see dequant_parts), to the caller's workspace, so every
//      d-tile block streams it with cp.async (with the input, blocks of 32 rows,
//      up to three stages) instead of dequantizing the payload.
//
// Precision (see mma.cuh): bf16/fp16 on 16-bit tensor cores with fp32
// accumulation, dequantized zhat rounded to bf16 (bf16) or split hi + lo (fp16), gamma-folded weights rounded
// once to the input dtype; fp32 inputs use 3xTF32. Requirements checked by the C API:
// d and k multiples of 16, k <= 256, k <= d, 16-byte aligned activations.
// Every launch goes on the caller's stream; nothing here synchronises.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "errors.cuh"
#include "mma.cuh"
#include "resbm/args.h"
#include "resbm/c_api.h"
#include "resbm/codec.h"

namespace resbm {
namespace cuda {
namespace {

using resbm_cuda_detail::fail;
using resbm_cuda_detail::g_error;
using resbm_cuda_detail::launch_status;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr int64_t kMaxGridY = 65535;  // blocks along a grid's y
constexpr int64_t kMinSplitTiles = 2;  // d tiles of a row kernel's d split, at least
constexpr int64_t kSplitFixedTiles = 2;  // a row block's set-up (payload rows, partials), in d tiles
constexpr int64_t kMaxProjectionSplits = 8;  // project_quantize's d splits (each adds partials)
constexpr size_t kMaxSmemSm80 = 163 * 1024;  // opt-in shared memory per block on sm_80 (less than sm_90)
constexpr int kWgRows = 32;  // the weight gradient's row splits start at multiples (16-byte aligned Z^T chunks)

template <typename A, typename B>
constexpr A cmax(A a, B b) {
  return a > A(b) ? a : A(b);
}
template <typename A, typename B>
constexpr A cmin(A a, B b) {
  return a < A(b) ? a : A(b);
}

// ---- configurations -------------------------------------------------------------------

// Row-blocked kernels (project_quantize, dequant_project).
template <int DT, int KPAD>
struct RowCfg {
  using Op = Operand<DT>;
  using T = typename Op::T;
  using E = typename Op::E;
  static constexpr int KS = Op::KS;
  static constexpr int WN = KPAD > 128 ? 2 : 1;  // warps across the k columns
  static constexpr int WM = kWarps / WN;         // warps across rows (16 rows each)
  static constexpr int BN = 16 * WM;             // rows per CTA
  static constexpr int WC = KPAD / WN;           // k columns per warp (<= 128)
  static constexpr int NT = WC / 8;              // n tiles per warp: acc = 4*NT <= 64 regs
  // projection: d streamed in tiles of 128 bytes per row (64 for KPAD = 256, so the
  // double-buffered weight tiles fit sm_80's shared memory)
  static constexpr int BD = (KPAD > 128 ? 64 : 128) / int(sizeof(T));
  static constexpr int XLD = BD + 16 / int(sizeof(T));  // +16 bytes: conflict-free fragments
  static constexpr int WLD = BD + 16 / int(sizeof(E));
  static constexpr int WVEC = 16 / int(sizeof(E));  // operand elements per 16-byte chunk
  static constexpr bool W_SPLIT = DT == kFloat32;  // tf32 hi + lo; 16-bit weights: one part
  // buffers of the projection's cp.async pipeline: double buffering kept one 8 KB input tile
  // in flight per CTA, a fraction of what an SM needs to cover HBM latency; fp32 (two weight
  // parts) stays at two, three would not fit sm_80's shared memory at KPAD = 128
  static constexpr int PS = W_SPLIT ? 2 : 3;
  static constexpr size_t X_BYTES = size_t(PS) * BN * XLD * sizeof(T);
  static constexpr size_t W_BYTES = size_t(KPAD) * WLD * sizeof(E);  // one buffer of hi or lo
  // x and the weight tile (hi, and lo for fp32), PS buffers each
  static constexpr size_t PROJ_BYTES = X_BYTES + (W_SPLIT ? 2 : 1) * PS * W_BYTES;
  // fp32 (BN, KPAD) tile of z (project_quantize epilogue) or zhat (dequant_project)
  static constexpr int ZLD = KPAD + 4;
  static constexpr size_t Z_BYTES = size_t(BN) * ZLD * 4;
  // dequant_project main loop: BD2 output columns per tile
  static constexpr int BD2 = DT == kFloat32 ? 32 : 64;
  static constexpr int NC2 = BD2 / WN;  // output columns per warp
  static constexpr int NT2 = NC2 / 8;
  static constexpr int W2LD = KPAD + 16 / int(sizeof(E));
  static constexpr int W2_PARTS = DT == kFloat32 ? 2 : 1;  // 16-bit weights are exact: no lo
  static constexpr size_t W2_BYTES = size_t(BD2) * W2LD * sizeof(E);
  static constexpr int HLD = BD2 + 4;
  static constexpr size_t H_BYTES = size_t(BN) * HLD * 4;
  static constexpr size_t SCALARS_BYTES = size_t(2 + WN) * BN * 4;

  static constexpr size_t FINISH_BYTES = Z_BYTES + size_t(BN) * 4;  // z tile, rows' sums of squares
  static constexpr size_t PQ_SMEM = cmax(PROJ_BYTES, FINISH_BYTES);
  // project_loop_wgmma (16-bit, KPAD <= 128): dense 256-byte-wide d tiles, twice the mma.sync
  // loop's, through WG_PS buffers (four; three at KPAD = 128, within sm_80's opt-in limit,
  // which the emulator keeps). On the H100 at k=32 both backends' projections made about one
  // loop trip per us per SM, whatever their tiles' width (Triton's first config, 64 x 128, did
  // 2.1 tiles of 64 x 64 per us per SM; this loop with 64 x 64 tiles 0.9).
  static constexpr int WG_BD = 256 / int(sizeof(T));
  static constexpr size_t WG_STAGE_BYTES = size_t(BN + KPAD) * 256;  // the x tile, then the weights'
  static constexpr int WG_PS = 4 * WG_STAGE_BYTES <= kMaxSmemSm80 ? 4 : 3;
  static constexpr size_t WG_SMEM = cmax(WG_PS * WG_STAGE_BYTES, FINISH_BYTES);
  // dequant_project's weight tiles stream through a ring of WS buffers: three (two in flight
  // while one is multiplied) where sm_80's shared memory allows, else fewer (fp32, KPAD = 256:
  // one, loaded between tiles). Through RMSNorm (encode backward) each stage also holds the
  // output tile's (BN, BD2) tile of x, the epilogue's input, copied with its weights (STAGE_X:
  // where that keeps WS stages within sm_80's limit, all but fp32 at KPAD = 128)
  static constexpr int X2LD = BD2 + 16 / int(sizeof(T));  // +16 bytes: conflict-free 16-byte reads
  static constexpr size_t X2_BYTES = size_t(BN) * X2LD * sizeof(T);
  __host__ __device__ static constexpr size_t stage_bytes(bool x) { return W2_PARTS * W2_BYTES + (x ? X2_BYTES : 0); }
  static constexpr size_t ring_bytes(int stages, bool x) { return size_t(stages) * stage_bytes(x) + H_BYTES; }
  static constexpr bool ring_fits(int stages, bool x) {
    return Z_BYTES + SCALARS_BYTES + ring_bytes(stages, x) <= kMaxSmemSm80;
  }
  static constexpr int WS = ring_fits(3, false) ? 3 : ring_fits(2, false) ? 2 : 1;
  static constexpr bool STAGE_X = ring_fits(WS, true);
  // the region after zhat holds the RMSNorm pre-pass's tiles (prepass), then the main loop's
  // (with x in its stages: stage_x, DQArgs)
  static constexpr size_t dq_smem(bool prepass, bool stage_x) {
    return Z_BYTES + SCALARS_BYTES + cmax(prepass ? PROJ_BYTES : 0, ring_bytes(WS, stage_x));
  }

  static_assert(NT >= 2 && NT <= 16 && NT2 >= 2 && NT % 2 == 0 && NT2 % 2 == 0,
                "bad tile configuration (B fragments load two n tiles at a time)");
  static_assert(BD % KS == 0 && KPAD % KS == 0 && BD % WVEC == 0, "bad k step");
  static_assert(X_BYTES % 16 == 0 && W_BYTES % 16 == 0 && Z_BYTES % 16 == 0 &&
                    SCALARS_BYTES % 16 == 0 && W2_BYTES % 16 == 0,
                "shared-memory regions must stay 16-byte aligned");
  static_assert(X2_BYTES % 16 == 0, "x tiles must stay 16-byte aligned");
  static_assert(PQ_SMEM <= kMaxSmemSm80 && dq_smem(true, STAGE_X) <= kMaxSmemSm80,
                "more shared memory than an sm_80 block can have");
  static_assert(FINISH_BYTES <= kDefaultSmem, "finish_rows_kernel needs no shared-memory opt-in");
};

// Weight-gradient kernel: output tile (KPAD, BDW) per CTA of 8 warps, rows reduced in chunks of
// BR. Each d tile's block reads the whole (N, KPAD) operand Z^T (from L2), so the tiles are
// as wide as 64 accumulators a thread allow (BDW = 128 up to KPAD = 128), and a stage holds 64
// rows of 16-bit inputs: on the H200 (2026-11-28) the 4-warp kernel with 64-column tiles and
// 32-row stages (8 KB of x in flight a block) took 115 us at k=128, N=16384, d=4096, where
// Triton's (128 x 128 tiles, 64 rows, 8 warps) took 40.
template <int DT, int KPAD>
struct WgCfg {
  using Op = Operand<DT>;
  using T = typename Op::T;
  using E = typename Op::E;
  static constexpr int THREADS = 256, WARPS = THREADS / 32;
  static constexpr int KS = Op::KS;
  static constexpr int WM = KPAD / 32 < 1 ? 1 : KPAD / 32 < WARPS ? KPAD / 32 : WARPS;  // 32 c rows a warp
  static constexpr int WN = WARPS / WM;
  static constexpr int MR = KPAD / WM;  // c rows per warp
  static constexpr int MT = MR / 16;
  static constexpr int BDW = 64 * THREADS / KPAD < 128 ? 64 * THREADS / KPAD : 128;
  static constexpr int NW = BDW / WN;  // d columns per warp
  static constexpr int NT = NW / 8;    // acc = 4*MT*NT = KPAD*BDW/THREADS <= 64 regs
  static constexpr int BR = sizeof(T) == 2 ? 64 : 32;
  static constexpr int XLD = BDW + 16 / int(sizeof(T));
  static constexpr int ZTLD = BR + 16 / int(sizeof(E));
  static constexpr size_t X_BYTES = size_t(BR) * XLD * sizeof(T);
  static constexpr size_t ZT_BYTES = size_t(KPAD) * ZTLD * sizeof(E);
  static constexpr int ZPARTS = dequant_parts(DT);  // Z^T hi (+ lo)
  // one stage: the x tile and the Z^T tiles of BR rows; three stages (two loading while one
  // is multiplied) where they fit sm_80's shared memory, else two (fp16, fp32 at KPAD = 256)
  static constexpr size_t STAGE_BYTES = X_BYTES + ZPARTS * ZT_BYTES;
  static constexpr int STAGES = 3 * STAGE_BYTES <= kMaxSmemSm80 ? 3 : 2;
  static constexpr size_t SMEM = STAGES * STAGE_BYTES;
  // two blocks an SM where their shared memory fits sm_90's 228 KB (bf16 up to KPAD = 128)
  static constexpr int MIN_BLOCKS = 2 * (SMEM + 1024) <= 228 * 1024 ? 2 : 1;
  static_assert(MT >= 1 && NT >= 2 && NT % 2 == 0 && BR % 16 == 0 && WM * WN == WARPS,
                "bad tile configuration (B fragments load two n tiles at a time)");
  static_assert(X_BYTES % 16 == 0 && ZT_BYTES % 16 == 0, "16-byte aligned regions");
  static_assert(SMEM <= kMaxSmemSm80, "more shared memory than an sm_80 block can have");
};

// ---- shared device helpers --------------------------------------------------------------

__device__ __forceinline__ float inv_rms(float sumsq, int64_t d, float eps) {
  return div_rn(1.0f, __fsqrt_rn(add_rn(div_rn(sumsq, float(d)), eps)));
}

// This block's run of a row kernel's `tiles` d tiles when grid.y splits d: equal runs of
// ceil(tiles / gridDim.y), the last possibly short (or empty: its block still takes part).
struct TileRun {
  int64_t first, count;
};
__device__ __forceinline__ TileRun tile_run(int64_t tiles) {
  const int64_t run = (tiles + gridDim.y - 1) / gridDim.y, first = int64_t(blockIdx.y) * run;
  return {first, first >= tiles ? 0 : tiles - first < run ? tiles - first : run};
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
  v += __shfl_xor_sync(0xFFFFFFFFu, v, 2);
  return v;
}

constexpr int kSumSplits = 8;  // splits whose partials split_sums loads before it adds them
constexpr int kSumElems = 4;   // elements a thread sums at once (finish_rows, finish_weight_grad)

// m[u] = the sum over s < splits of partial[s * split_stride + idx[u]] (u < U where ok[u], else
// 0), each in split order. The loads of kSumSplits splits of all U elements are issued before
// the first add: a loop adding each split as it came waited about one memory latency per split.
template <int U>
__device__ __forceinline__ void split_sums(const float* partial, int64_t splits, int64_t split_stride,
                                           const int64_t (&idx)[U], const bool (&ok)[U], float (&m)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) m[u] = 0.0f;
  for (int64_t s0 = 0; s0 < splits; s0 += kSumSplits) {
    float v[U][kSumSplits];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int s = 0; s < kSumSplits; ++s)
        v[u][s] = ok[u] && s0 + s < splits ? partial[(s0 + s) * split_stride + idx[u]] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int s = 0; s < kSumSplits; ++s) {
        if (s0 + s < splits) m[u] += v[u][s];
      }
    }
  }
}

// zhat[row][c] of a payload (codes + scales) with the shared codec functions, in two steps:
// fields() loads an element's raw code and scale bits, decode() turns them into the value,
// so that a thread can have many elements' loads in flight before it decodes the first (see
// for_block_elements). k / group and 8 / bits are divided once, here (a 64-bit division
// per element before).
struct PayloadFields {
  uint32_t code = 0, scale = 0;
};

struct Payload {
  const uint8_t* codes;
  const void* scales;
  int bits, scale_dtype;
  uint32_t group, field_mask;  // field_mask: codes per byte - 1 (bits < 16)
  int64_t k, row_bytes, groups;

  __device__ Payload(const uint8_t* codes_, const void* scales_, int bits_, int group_, int scale_dtype_,
                     int64_t k_)
      : codes(codes_), scales(scales_), bits(bits_), scale_dtype(scale_dtype_), group(uint32_t(group_)),
        field_mask(bits_ < 16 ? 8u / uint32_t(bits_) - 1u : 0u), k(k_), row_bytes(k_ * bits_ / 8),
        groups(bits_ < 16 ? k_ / group_ : 0) {}

  // What an element's address and unpacking take from its column c alone (its code's byte
  // in the row, its scale's group, its field in the byte): formed once for a thread that keeps
  // one column (for_block_elements), where the group's division alone took ~20 instructions
  // an element.
  struct Column {
    int c;
    uint32_t byte, group, field;
  };
  __device__ __forceinline__ Column column(int c) const {
    if (bits == 16) return {c, 0u, 0u, 0u};
    return {c, uint32_t(c * bits) >> 3, uint32_t(c) / group, uint32_t(c) & field_mask};
  }

  __device__ __forceinline__ PayloadFields fields(int64_t row, const Column& col) const {
    if (bits == 16) return {reinterpret_cast<const uint16_t*>(codes)[row * k + col.c], 0u};
    return {codes[row * row_bytes + col.byte], load_bits(scales, row * groups + col.group, scale_dtype)};
  }

  __device__ __forceinline__ float decode(PayloadFields f, const Column& col) const {
    if (bits == 16) return bf16_to_float(uint16_t(f.code));
    const int q = unpack_field(uint8_t(f.code), int(col.field), bits);
    return dequantize_value(q, bits_to_float(f.scale, scale_dtype));
  }
};

// Visits the (BN, KPAD) elements (r, c) of a row block, a thread those at tid, tid +
// kThreads, ...: eight at a time, first load(r, col) for all eight (independent loads, in
// flight together), then use(r, col, loaded) for each, col = column(c). A loop that loads and
// uses one element at a time waits a whole memory latency per element (64 a thread at BN =
// 64, KPAD = 128: twice that for a payload's code, then its scale), so `load` should only
// load. Where KPAD divides kThreads (KPAD <= 128) a thread's elements share one column, whose
// column(c) is formed once.
template <int BN, int KPAD, typename Column, typename Load, typename Use>
__device__ __forceinline__ void for_block_elements(Column column, Load load, Use use) {
  constexpr int kPer = BN * KPAD / kThreads, kBatch = kPer < 8 ? kPer : 8;
  static_assert(kPer * kThreads == BN * KPAD && kPer % kBatch == 0, "elements split evenly");
  constexpr bool kOwnColumn = kThreads % KPAD == 0;
  const auto own = column(int(threadIdx.x % KPAD));  // (unused otherwise)
  auto column_of = [&](unsigned i) { return kOwnColumn ? own : column(int(i % KPAD)); };
  for (int j0 = 0; j0 < kPer; j0 += kBatch) {
    decltype(load(0, own)) loaded[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const unsigned i = threadIdx.x + unsigned(j0 + u) * kThreads;
      loaded[u] = load(int(i / KPAD), column_of(i));
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const unsigned i = threadIdx.x + unsigned(j0 + u) * kThreads;
      use(int(i / KPAD), column_of(i), loaded[u]);
    }
  }
}

// Quantize + pack `rows` rows of an fp32 z tile (shared memory, leading dim ld) into the
// payload with the shared codec functions. bf16 codes: one warp per row. Else one warp per
// (row, group), lanes across the group, four of them at a time: their absmax reductions'
// shuffles and their scales' divisions interleave (one group after another, a warp waited on
// each group's chain of five shuffles and two divisions in turn: 16 a warp at k = 128).
__device__ void quantize_rows(const float* zs, int ld, int rows, int64_t row0, int64_t n,
                              int64_t k, int bits, int group, int scale_dtype, int stochastic,
                              uint32_t key, uint8_t* codes, void* scales) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int valid_rows = n - row0 < rows ? int(n - row0) : rows;
  if (bits == 16) {
    for (int r = warp; r < valid_rows; r += kWarps) {
      uint16_t* out = reinterpret_cast<uint16_t*>(codes) + (row0 + r) * k;
      for (int c = lane; c < k; c += 32) out[c] = float_to_bf16(zs[r * ld + c]);
    }
    return;
  }
  constexpr int kUnits = 4;  // (row, group) units a warp quantizes at once
  const int qmax = qmax_of(bits), per = 8 / bits, nbytes = group / per, groups = int(k) / group;
  const int64_t row_bytes = k * bits / 8;
  const int units = valid_rows * groups;
  for (int u0 = warp; u0 < units; u0 += kWarps * kUnits) {
    float m[kUnits], inv[kUnits];
#pragma unroll
    for (int t = 0; t < kUnits; ++t) {
      const int u = u0 + t * kWarps;  // (warp-uniform)
      m[t] = 0.0f;
      if (u < units) {
        const float* z = zs + (u / groups) * ld + (u % groups) * group;
        for (int j = lane; j < group; j += 32) m[t] = absmax_update(m[t], z[j]);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
      for (int t = 0; t < kUnits; ++t) m[t] = absmax_update(m[t], __shfl_xor_sync(0xFFFFFFFFu, m[t], off));
    }
#pragma unroll
    for (int t = 0; t < kUnits; ++t) {
      const float s = group_scale(m[t], qmax, scale_dtype);
      inv[t] = inv_scale(s);
      const int u = u0 + t * kWarps, r = u / groups, gi = u % groups;
      if (u < units && lane == 0) store_float(scales, (row0 + r) * groups + gi, scale_dtype, s);  // non-finite shows
    }
#pragma unroll
    for (int t = 0; t < kUnits; ++t) {
      const int u = u0 + t * kWarps, r = u / groups, c0 = (u % groups) * group;
      if (u >= units) break;
      const int64_t grow = row0 + r;
      uint8_t* out = codes + grow * row_bytes + c0 / per;
      for (int b = lane; b < nbytes; b += 32) {
        uint8_t byte = 0;
        for (int j = 0; j < per; ++j) {
          const int c = c0 + b * per + j;
          const float u01 = stochastic ? uniform(uint32_t(grow * k + c), key) : 0.0f;
          byte |= pack_field(quantize_value(zs[r * ld + c], inv[t], qmax, stochastic != 0, u01), j, bits);
        }
        out[b] = byte;
      }
    }
  }
}

// Operand-typed weights, built once per call by prepare_operand_kernel so that the pass
// kernels stream them into shared memory with cp.async instead of converting every weight
// tile in every CTA: hi / lo (rows, cols) row-major, element (r, c) = split(w[r * s_r +
// c * s_c] (* gamma[c])) for r < rows_valid and c < cols_valid, else 0 (hi alone: the
// value rounded to the operand type).
struct PrepArgs {
  const void* w;
  int64_t s_r, s_c;
  const void* gamma;  // (cols,) or null
  int64_t rows, cols, rows_valid, cols_valid;
  void* hi;
  void* lo;  // null: hi only (the operand is exact in the input dtype)
};

// Element i of a tensor-core operand held as hi (+ lo) arrays: v split into the operand
// type (lo null: hi alone, v rounded).
template <int DT>
__device__ __forceinline__ void store_operand_element(void* hi, void* lo, int64_t i, float v) {
  using E = typename Operand<DT>::E;
  E h, l;
  split1<DT>(v, h, l);
  static_cast<E*>(hi)[i] = h;
  if (lo != nullptr) static_cast<E*>(lo)[i] = l;
}

// A grid-stride loop over the (rows, cols) elements of the prepared weights (see PrepArgs).
template <int DT>
__global__ void prepare_operand_kernel(const PrepArgs p) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.rows * p.cols;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.cols, c = i % p.cols;
    float v = 0.0f;
    if (r < p.rows_valid && c < p.cols_valid) {
      v = load_float(p.w, r * p.s_r + c * p.s_c, DT);
      if (p.gamma != nullptr) v = v * load_float(p.gamma, c, DT);
    }
    store_operand_element<DT>(p.hi, p.lo, i, v);
  }
}

// The projection loop shared by project_quantize and the RMSNorm pre-pass of
// dequant_project: acc (BN, KPAD) += a[rows, run] @ B[run], B(dd, c) = whi[c][dd] (+ wlo[c][dd]
// for fp32), the prepared operand (KPAD, d), over the run of d tiles `run`; optionally the
// rows' sums of squares there. The a
// tile and the weight tile stream in together through RowCfg::PS buffers (16-byte
// cp.async, cp_async_pipeline).
// Uses PROJ_BYTES of `smem` and ends with a barrier (smem free again).
template <int DT, int KPAD>
__device__ __forceinline__ void project_loop(const typename Operand<DT>::T* __restrict__ a,
                                             int64_t n, int64_t d, int64_t row0,
                                             const typename Operand<DT>::E* __restrict__ whi_g,
                                             const typename Operand<DT>::E* __restrict__ wlo_g,
                                             TileRun run, bool want_sumsq, unsigned char* smem,
                                             float (&acc)[RowCfg<DT, KPAD>::NT][4],
                                             float (&sumsq)[2]) {
  using C = RowCfg<DT, KPAD>;
  using T = typename C::T;
  using E = typename C::E;
  constexpr int S = C::PS;
  T* xs = reinterpret_cast<T*>(smem);                                 // [S][BN][XLD]
  E* whi = reinterpret_cast<E*>(smem + C::X_BYTES);                   // [S][KPAD][WLD]
  E* wlo = reinterpret_cast<E*>(smem + C::X_BYTES + S * C::W_BYTES);  // [S][KPAD][WLD]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % C::WM, wn = warp / C::WM;
  constexpr bool b_split = C::W_SPLIT;
  constexpr int VEC = 16 / int(sizeof(T));  // elements per 16-byte chunk
  constexpr int CHUNKS = C::BD / VEC;       // chunks per tile row
  constexpr int WCHUNKS = C::BD / C::WVEC;

  // each thread copies the same 16-byte column chunk of every XROWS-th row of the a tile
  // and of every WROWS-th row of the weight tile, for every tile (only d0 moves); tile i of
  // the run into buffer i % S
  constexpr int XROWS = kThreads / CHUNKS, WROWS = kThreads / WCHUNKS;
  static_assert(kThreads % CHUNKS == 0 && kThreads % WCHUNKS == 0 && C::BN % XROWS == 0 &&
                    KPAD % WROWS == 0, "tile rows must split evenly over the threads");
  const int xr = tid / CHUNKS, xc = (tid % CHUNKS) * VEC;
  const int wr = tid / WCHUNKS, wc = (tid % WCHUNKS) * C::WVEC;
  // a whole tile (inside d, the block's rows all below n: all but the edges) is copied from
  // per-thread sources advanced a tile at a time from the run's first, untested
  const bool rows_in = row0 + C::BN <= n;
  const T* x_tile0 = rows_in ? a + (row0 + xr) * d + run.first * C::BD + xc : a;
  const int64_t w_tile0 = int64_t(wr) * d + run.first * C::BD + wc;
  auto issue = [&](int64_t i) {
    const int buf = int(uint32_t(i) % uint32_t(S));  // (a block's tiles: fewer than 2^32)
    const int64_t tile = run.first + i;
    T* xdst = xs + buf * (C::BN * C::XLD) + xr * C::XLD + xc;
    const int wdst = buf * (KPAD * C::WLD) + wr * C::WLD + wc;
    if (rows_in && (tile + 1) * C::BD <= d) {
      const T* xsrc = x_tile0 + i * C::BD;
#pragma unroll
      for (int j = 0; j < C::BN / XROWS; ++j) cp_async16(xdst + j * XROWS * C::XLD, xsrc + j * XROWS * d, 16);
      const int64_t wsrc = w_tile0 + i * C::BD;
#pragma unroll
      for (int j = 0; j < KPAD / WROWS; ++j) {
        cp_async16(whi + wdst + j * WROWS * C::WLD, whi_g + wsrc + j * WROWS * d, 16);
        if constexpr (b_split) cp_async16(wlo + wdst + j * WROWS * C::WLD, wlo_g + wsrc + j * WROWS * d, 16);
      }
      return;
    }
    const int64_t col = tile * C::BD + xc;  // d % 16 == 0: chunks are all in or all out
#pragma unroll
    for (int j = 0; j < C::BN / XROWS; ++j) {
      const int64_t grow = row0 + xr + j * XROWS;
      const bool ok = grow < n && col < d;
      cp_async16(xdst + j * XROWS * C::XLD, ok ? a + grow * d + col : a, ok ? 16 : 0);
    }
    const int64_t wcol = tile * C::BD + wc;
    const bool wok = wcol < d;
#pragma unroll
    for (int j = 0; j < KPAD / WROWS; ++j) {
      const int64_t src = wok ? int64_t(wr + j * WROWS) * d + wcol : 0;
      cp_async16(whi + wdst + j * WROWS * C::WLD, whi_g + src, wok ? 16 : 0);
      if constexpr (b_split) cp_async16(wlo + wdst + j * WROWS * C::WLD, wlo_g + src, wok ? 16 : 0);
    }
  };

  // 16-bit inputs: the rows' sums of squares are the diagonal of the Gram matrix A A^T,
  // formed on the tensor cores from the A fragments the projection loads anyway (products
  // of 16-bit values are exact in fp32, as in the FMAs of upcast values they replace: two
  // conversions and two FMAs per 32-bit register, 64 sm_90a instructions a 64-column tile,
  // against two mma a k step). An A fragment's registers 0 and 2 (row g, k 2t.. and
  // 2t + 8..) are the B fragment of the n tile of rows 0..7, registers 1 and 3 that of rows
  // 8..15; gram[h] accumulates those two 16 x 8 products.
  float gram[2][4] = {};
  cp_async_pipeline<S>(run.count, issue, [&](int64_t, int buf) {
    const T* xt = xs + buf * (C::BN * C::XLD);
    const E* wht = whi + buf * (KPAD * C::WLD);
    const E* wlt = wlo + buf * (KPAD * C::WLD);
#pragma unroll
    for (int ks = 0; ks < C::BD; ks += C::KS) {
      FragA fa;
      if constexpr (DT == kFloat32) {
        load_a_f32<DT>(fa, xt, C::XLD, wm * 16, ks, lane, want_sumsq, sumsq);
      } else {
        load_a_op<DT>(fa, xt, nullptr, C::XLD, wm * 16, ks, lane, false);  // raw 16-bit rows are exact
        if (want_sumsq) {
          const FragB rows_lo{{fa.hi[0], fa.hi[2]}, {0u, 0u}}, rows_hi{{fa.hi[1], fa.hi[3]}, {0u, 0u}};
          mma_acc<DT, false>(gram[0], fa, rows_lo, false);
          mma_acc<DT, false>(gram[1], fa, rows_hi, false);
        }
      }
#pragma unroll
      for (int j = 0; j < C::NT; j += 2) {
        FragB fb0, fb1;
        load_b_op_x2<DT>(fb0, fb1, wht, wlt, C::WLD, wn * C::WC + j * 8, ks, lane, b_split);
        mma_acc<DT, DT == kFloat32>(acc[j], fa, fb0, b_split);
        mma_acc<DT, DT == kFloat32>(acc[j + 1], fa, fb1, b_split);
      }
    }
  });
  if (DT != kFloat32 && want_sumsq) {
    // the diagonal: row g's at column g of gram[0] (c0 / c1 of the lane with t = g / 2),
    // row g + 8's at column g of gram[1]'s lower half (c2 / c3); the caller sums each quad
    const int g = lane >> 2, t = lane & 3;
    if (t == g >> 1) {  // (constant indices: an index computed at run time puts gram on the stack)
      sumsq[0] += g & 1 ? gram[0][1] : gram[0][0];
      sumsq[1] += g & 1 ? gram[1][3] : gram[1][2];
    }
  }
}

// project_loop on sm_90a's warpgroup mma (16-bit inputs, KPAD <= 128: the CTA's 128
// threads are one warpgroup, its 64 rows one m64 tile, KPAD one n), with the wider tiles of
// RowCfg::WG_BD columns (CH = 16 chunks of 16 bytes a row) through WG_PS buffers, each
// stage's x and weight tiles laid out as wgmma's core matrices (no swizzle) and multiplied
// from shared memory, so no thread loads fragments. Chunk c of row r sits at byte
// SBO (r / 8) + LBO c + 16 (r % 8): the 8 rows of a core matrix 16 bytes apart, LBO = 128
// bytes to the next core matrix along k, SBO = 128 CH to the next 8 rows. Thread `tid` copies
// chunk tid / 8 of rows 8 j + tid % 8 to byte SBO j + 16 tid (a warp: 8 rows x 64 contiguous
// bytes, 4 whole core matrices, 512 contiguous bytes of shared memory).
// With want_sumsq, sumsq[h] of lane t = 0 of each quad holds the full sum of squares of
// row 16 wm + g + 8 h (the other lanes 0), so that quad_sum gives it as in project_loop.
template <int DT, int KPAD>
__device__ __forceinline__ void project_loop_wgmma(const typename Operand<DT>::T* __restrict__ a,
                                                   int64_t n, int64_t d, int64_t row0,
                                                   const typename Operand<DT>::E* __restrict__ w_g,
                                                   TileRun run, bool want_sumsq, unsigned char* smem,
                                                   float (&acc)[RowCfg<DT, KPAD>::NT][4],
                                                   float (&sumsq)[2]) {
  using C = RowCfg<DT, KPAD>;
  using T = typename C::T;
  using E = typename C::E;
  constexpr int CH = C::WG_BD * int(sizeof(T)) / 16, S = C::WG_PS;
  static_assert(DT != kFloat32 && C::WN == 1 && C::BN == 64 && CH == 16 && kThreads == 8 * CH,
                "one warpgroup, 64 rows, 256-byte rows of 16-bit elements, 8 rows a pass");
  static_assert(S * C::WG_STAGE_BYTES <= kMaxSmemSm80, "the stages fit sm_80's (the emulator's) limit");
  constexpr size_t X_STAGE = size_t(C::BN) * 16 * CH, STAGE = C::WG_STAGE_BYTES;
  constexpr uint32_t LBO = 128, SBO = CH * LBO;  // the next core matrix along k / along the rows
  const int tid = threadIdx.x;
  const int chunk = tid / 8, row_base = tid % 8;
  // this thread's sources in tile 0 (row 8 j: + 8 j d; tile t: + t WG_BD), set up once
  const int64_t rows_left = n - row0 - row_base, step = 8 * d;
  const T* x_src = a + (row0 + row_base) * d + chunk * 8;
  const E* w_src = w_g + int64_t(row_base) * d + chunk * 8;
  auto issue = [&](int64_t i) {  // tile i of the run into stage i % S: x, then the weights
    unsigned char* stage = smem + (i % S) * STAGE;
    const int64_t col = (run.first + i) * C::WG_BD;
    const bool col_ok = col + chunk * 8 < d;  // d % 16 == 0: chunks are all in or all out
#pragma unroll
    for (int j = 0; j < C::BN / 8; ++j) {
      const bool ok = col_ok && 8 * j < rows_left;
      cp_async16(stage + SBO * j + 16 * tid, ok ? x_src + j * step + col : a, ok ? 16 : 0);
    }
#pragma unroll
    for (int j = 0; j < KPAD / 8; ++j)
      cp_async16(stage + X_STAGE + SBO * j + 16 * tid, col_ok ? w_src + j * step + col : w_g, col_ok ? 16 : 0);
  };
  // the sums of squares: thread tid takes row tid % 64, chunks CH / 2 (tid / 64) .. (LBO apart)
  const int sq_row = tid % 64, sq_offset = (sq_row / 8) * SBO + (CH / 2) * (tid / 64) * LBO + 16 * (sq_row % 8);
  float sq = 0.0f;
  // with four buffers, each tile's wgmma group stays in flight until the next tile's is
  // issued (as Triton's loop), its buffers refilled after that; with three (KPAD = 128) that
  // would leave one tile's copies in flight, so each body waits for its own group
  constexpr bool kInFlight = S >= 4;
  cp_async_pipeline<S, true, kInFlight>(run.count, issue, [&](int64_t, int buf) {
    const unsigned char* xt = smem + buf * STAGE;
    const unsigned char* wt = xt + X_STAGE;
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < CH / 2; ++ks)  // k steps of 16: chunks 2 ks, 2 ks + 1
      wgmma<DT, KPAD>(acc, wgmma_desc(xt + 2 * LBO * ks, LBO, SBO), wgmma_desc(wt + 2 * LBO * ks, LBO, SBO));
    wgmma_commit();
    if (want_sumsq) {
#pragma unroll
      for (int i = 0; i < CH / 2; ++i) {
        const uint4 raw = *reinterpret_cast<const uint4*>(xt + sq_offset + LBO * i);
        const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float v0 = e16_to_float<DT>(uint16_t(w[e] & 0xFFFFu)), v1 = e16_to_float<DT>(uint16_t(w[e] >> 16));
          sq += v0 * v0 + v1 * v1;
        }
      }
    }
    wgmma_wait<kInFlight ? 1 : 0>();  // the group whose buffers the next refill reuses is complete
  });
  if constexpr (kInFlight) {  // the last group: acc final, then for every warp the shared memory free
    wgmma_wait<0>();
    __syncthreads();
  }
  if (want_sumsq) {  // rows' totals: two threads per row, through shared memory
    float* part = reinterpret_cast<float*>(smem);  // [2][64]
    part[tid] = sq;
    __syncthreads();
    const int lane = tid & 31, wm = tid >> 5, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = 16 * wm + g + 8 * h;
      sumsq[h] = t == 0 ? part[r] + part[64 + r] : 0.0f;
    }
    __syncthreads();  // the caller's epilogue reuses the shared memory
  }
}

// ---- kernels ------------------------------------------------------------------------------

struct PQArgs {
  const void* a;    // (n, d) activations (x or grad_h), row-major, 16-byte aligned
  const void* whi;  // prepared operand (KPAD, d): B(dd, c) = whi[c][dd] (+ wlo[c][dd])
  const void* wlo;  // fp32 only (tf32 lo part), else null
  int norm;         // RMSNorm folded into the weights: scale rows by 1/rms(a)
  int64_t n, d, k;
  float eps;
  int bits, group, scale_dtype, stochastic;
  uint32_t key;
  uint8_t* codes;
  void* scales;
  float* stats;  // (n, k+1) RMSNorm row statistics [r * acc | r], or null (needs norm)
  float* partial;  // with splits > 1: (splits, n, k+1) fp32 [acc | sum of squares] per d split
  int splits;      // d splits (grid.y); more than one: finish_rows_kernel finishes the rows
  int write_header;  // the block of rows 0 writes the payload header and the codes padding
  int32_t header[4];
};

// p with the C API's header words (4 int32 in host memory), if any, to be written.
PQArgs with_header(PQArgs p, const int32_t* header) {
  p.write_header = header != nullptr;
  if (header != nullptr) std::memcpy(p.header, header, sizeof p.header);
  return p;
}

// The payload's 16-byte header (the codec's four int32 words, little-endian) just before
// the codes, and the zeros that pad the codes region to 16 bytes (the payload layout of
// resbm_kernels/codec.py): written by block 0 of the kernel that writes the codes.
__device__ __forceinline__ void store_header(const int32_t (&words)[4], uint8_t* codes, int64_t code_bytes) {
  const int tid = threadIdx.x;
  if (tid < 16) codes[tid - 16] = uint8_t(uint32_t(words[tid / 4]) >> (8 * (tid % 4)));
  if (tid < (16 - code_bytes % 16) % 16) codes[code_bytes + tid] = 0;
}

// The rows of block row0 from their projection (zs: fp32 [BN][ZLD], the raw acc, overwritten
// with z) and sums of squares (row_sq, [BN]; replaced by r = 1/rms with the norm):
// z = r * acc + a[:, :k], the row statistics if asked, then quantize + pack through the
// shared codec functions; the first block also writes the payload header.
template <int DT, int KPAD>
__device__ void finish_rows(const PQArgs& p, float* zs, float* row_sq, int64_t row0) {
  using C = RowCfg<DT, KPAD>;
  using T = typename C::T;
  const T* a = static_cast<const T*>(p.a);
  const int tid = threadIdx.x;
  if (p.norm && tid < C::BN) row_sq[tid] = inv_rms(row_sq[tid], p.d, p.eps);
  __syncthreads();
  // z = r * acc + a[:, :k] (a's bits loaded eight elements at a time)
  for_block_elements<C::BN, KPAD>(
      [](int c) { return c; },
      [&](int r, int c) { return row0 + r < p.n && c < p.k ? load_bits(a, (row0 + r) * p.d + c, DT) : 0u; },
      [&](int r, int c, uint32_t a_bits) {
        const int64_t grow = row0 + r;
        float z = zs[r * C::ZLD + c];
        if (p.norm) z = z * row_sq[r];
        if (grow < p.n && c < p.k) {
          if (p.stats != nullptr) {
            float* srow = p.stats + grow * (p.k + 1);
            srow[c] = z;
            if (c == 0) srow[p.k] = row_sq[r];
          }
          z = z + bits_to_float(a_bits, DT);
        }
        zs[r * C::ZLD + c] = z;
      });
  __syncthreads();
  quantize_rows(zs, C::ZLD, C::BN, row0, p.n, p.k, p.bits, p.group, p.scale_dtype, p.stochastic,
                p.key, p.codes, p.scales);
  if (p.write_header && row0 == 0) store_header(p.header, p.codes, p.n * p.k * p.bits / 8);
}

// WG: the projection on wgmma (project_loop_wgmma), else on mma.sync. With grid.y > 1 each
// block projects its run of d only and writes that as partials for finish_rows_kernel.
template <int DT, int KPAD, bool WG>
__global__ void __launch_bounds__(kThreads, 1) project_quantize_kernel(const PQArgs p) {
  using C = RowCfg<DT, KPAD>;
  using T = typename C::T;
  RESBM_DYNAMIC_SMEM(smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp % C::WM, wn = warp / C::WM, g = lane >> 2, t = lane & 3;
  const int64_t row0 = int64_t(blockIdx.x) * C::BN;
  using E = typename C::E;
  const T* a = static_cast<const T*>(p.a);
  const bool norm = p.norm != 0;
  constexpr int BD = WG ? C::WG_BD : C::BD;  // d tile of the projection loop
  const TileRun run = tile_run((p.d + BD - 1) / BD);

  float acc[C::NT][4];
#pragma unroll
  for (int j = 0; j < C::NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  float sumsq[2] = {0.0f, 0.0f};
  if constexpr (WG) {
    project_loop_wgmma<DT, KPAD>(a, p.n, p.d, row0, static_cast<const E*>(p.whi), run, norm, smem, acc, sumsq);
  } else {
    project_loop<DT, KPAD>(a, p.n, p.d, row0, static_cast<const E*>(p.whi),
                           static_cast<const E*>(p.wlo), run, norm, smem, acc, sumsq);
  }

  // acc and the rows' sums of squares: into shared memory for finish_rows, or with a d split
  // this block's partials (every block writes its rows' partials, an empty run zeros)
  const bool split = gridDim.y > 1;
  float* zs = reinterpret_cast<float*>(smem);  // [BN][ZLD]
  float* row_sq = zs + C::BN * C::ZLD;         // [BN]
  float* part = split ? p.partial + int64_t(blockIdx.y) * p.n * (p.k + 1) : nullptr;
#pragma unroll
  for (int j = 0; j < C::NT; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wm * 16 + g + 8 * h, col = wn * C::WC + j * 8 + 2 * t;
      const int64_t grow = row0 + r;
      if (!split) {
        *reinterpret_cast<float2*>(zs + r * C::ZLD + col) = make_float2(acc[j][2 * h], acc[j][2 * h + 1]);
      } else if (grow < p.n && col < p.k) {  // k even: col + 1 < k too
        part[grow * (p.k + 1) + col] = acc[j][2 * h];
        part[grow * (p.k + 1) + col + 1] = acc[j][2 * h + 1];
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float ssum = quad_sum(sumsq[h]);  // (every lane: a warp collective)
    const int r = wm * 16 + g + 8 * h;
    if (wn == 0 && t == 0) {
      if (!split) {
        row_sq[r] = ssum;
      } else if (row0 + r < p.n) {
        part[(row0 + r) * (p.k + 1) + p.k] = ssum;
      }
    }
  }
  if (split) return;
  __syncthreads();
  finish_rows<DT, KPAD>(p, zs, row_sq, row0);
}

// The second kernel of a d-split project_quantize: each block sums its rows' partials in
// split order (deterministic), then finish_rows.
template <int DT, int KPAD>
__global__ void __launch_bounds__(kThreads) finish_rows_kernel(const PQArgs p) {
  using C = RowCfg<DT, KPAD>;
  RESBM_DYNAMIC_SMEM(smem);
  float* zs = reinterpret_cast<float*>(smem);  // [BN][ZLD]
  float* row_sq = zs + C::BN * C::ZLD;         // [BN]
  const int64_t row0 = int64_t(blockIdx.x) * C::BN, n = p.n, k = p.k;
  constexpr int kElems = C::BN * (KPAD + 1);  // (r, c): c = KPAD stands for the sum of squares
  for (int i0 = threadIdx.x; i0 < kElems; i0 += kThreads * kSumElems) {
    int64_t idx[kSumElems];
    bool ok[kSumElems];
    float sum[kSumElems];
#pragma unroll
    for (int u = 0; u < kSumElems; ++u) {
      const int i = i0 + u * kThreads, r = i / (KPAD + 1), c = i % (KPAD + 1);
      idx[u] = (row0 + r) * (k + 1) + (c == KPAD ? k : c);
      ok[u] = i < kElems && row0 + r < n && (c < k || c == KPAD);
    }
    split_sums(p.partial, p.splits, n * (k + 1), idx, ok, sum);
#pragma unroll
    for (int u = 0; u < kSumElems; ++u) {
      const int i = i0 + u * kThreads, r = i / (KPAD + 1), c = i % (KPAD + 1);
      if (i < kElems) {
        if (c == KPAD) {
          row_sq[r] = sum[u];
        } else {
          zs[r * C::ZLD + c] = sum[u];
        }
      }
    }
  }
  __syncthreads();
  finish_rows<DT, KPAD>(p, zs, row_sq, row0);
}

struct DQArgs {
  const uint8_t* codes;
  const void* scales;
  int bits, group, scale_dtype;
  const void* w2hi;  // the (d, k) projection, rows of w2_ld: B(dd, c) = w2hi[dd][c] (+ w2lo[dd][c])
  const void* w2lo;  // null when the weights are exact in the input dtype
  int64_t w2_ld, w2_cols;  // columns w2_cols.. are zeros (up to KPAD)
  const void* phi;   // RMSNorm pre-pass: the encoder's prepared operand (KPAD, d), hi (, lo)
  const void* plo;
  const void* x;      // encode backward through RMSNorm: x (n, d), gamma (d,) (else null)
  const void* gamma;
  float eps;
  const void* residual;  // (n, d) of out_dtype or null
  void* out;             // (n, d) of out_dtype
  int out_dtype;
  float* rscale;         // (n,) r = 1/rms(x) when gamma is set (may be null)
  const float* stats;    // (n, k+1) encode forward's row statistics [r x (gamma W)^T | r], or null:
                         // with gamma, they replace the pre-pass over x
  int64_t n, d, k;
  int prefetch;  // set by launch_dq: RESBM_CUDA_PREFETCH (see the epilogue)
  int stage_x;   // set by launch_dq: the ring stages hold x (through RMSNorm, RowCfg::STAGE_X,
                 // stage_x_wanted)
};

// Stores this thread's chunks of a whole (BN, BD2) dequant_project output tile that has
// nothing to add (decode forward without a residual, columns past the identity path): 8
// columns at `ec` of rows er + j * EROWS from hs, as fp32, at columns gcol.. of rows
// row0 + r of out. The general epilogue tests the flags, the bounds and the output dtype
// for every chunk, about 49 sm_90a instructions a chunk where this loop takes 23 (bf16,
// KPAD = 32). Each chunk's index is formed whole: advanced from the last one, nvcc split the
// 16-byte stores into 4-byte ones.
template <int EPER, int EROWS, int HLD>
__device__ __forceinline__ void store_plain_tile(void* out, const float* hs, int er, int ec, int64_t row0,
                                                 int64_t gcol, int64_t d) {
#pragma unroll 1
  for (int j = 0; j < EPER; ++j) {
    const int r = er + j * EROWS;
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = hs[r * HLD + ec + e];
    store8(out, (row0 + r) * d + gcol, kFloat32, v);
  }
}

// The same for a 16-bit output (OUT), from this thread's accumulators (acc[j][2h..2h+1]: row
// wm * 16 + g + 8h, columns wn * NC2 + 8j + 2t and the next, the mma.sync layout): each pair is
// rounded in registers and staged as one word in a (BN, BD2 + 8) tile of OUT in hs's space
// (rows 16 bytes past a multiple of the 32 banks: the warp's stores and each quarter-warp's
// 16-byte loads conflict-free), then stored as store_plain_tile does. Staged as fp32 and
// converted after, the tile took 16 8-byte shared stores and 8 16-byte loads a thread, both
// 2-way bank-conflicted: 80 % of the sm_90a kernel's shared-memory wavefronts a tile at
// KPAD = 32 (bf16; the H200's ncu of 2026-11-28 had it stalled mostly on shared memory).
template <int OUT, typename C, int EPER, int EROWS>
__device__ __forceinline__ void store_plain_tile16(void* out, uint32_t* hb, const float (&acc)[C::NT2][4], int wm,
                                                   int wn, int g, int t, int er, int ec, int64_t row0, int64_t gcol,
                                                   int64_t d) {
  constexpr int HBW = (C::BD2 + 8) / 2;  // words a staged row
  static_assert(size_t(C::BN) * HBW * 4 <= C::H_BYTES, "the 16-bit tile fits hs's space");
#pragma unroll
  for (int j = 0; j < C::NT2; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wm * 16 + g + 8 * h;  // (word of columns wn * NC2 + 8j + 2t and the next)
      hb[r * HBW + wn * (C::NC2 / 2) + j * 4 + t] = pack_pair16(OUT, acc[j][2 * h], acc[j][2 * h + 1]);
    }
  }
  __syncthreads();  // the tile is complete
#pragma unroll 1
  for (int j = 0; j < EPER; ++j) {
    const int r = er + j * EROWS;
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(out) + (row0 + r) * d + gcol) =
        *reinterpret_cast<const uint4*>(hb + r * HBW + (ec >> 1));
  }
}

// Five blocks an SM for bf16 at KPAD <= 32 (at most 102 registers a thread; the tests bound
// it at 96): with store_plain_tile16 beside the fp32 epilogue nvcc chose 100 (sm_90a), a
// block an SM fewer for the benchmarked decode forward; asked for five it uses 94, no spills.
template <int DT, int KPAD>
__global__ void __launch_bounds__(kThreads, DT == kBFloat16 && KPAD <= 32 ? 5 : 1)
    dequant_project_kernel(const DQArgs p) {
  using C = RowCfg<DT, KPAD>;
  using T = typename C::T;
  using E = typename C::E;
  RESBM_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % C::WM, wn = warp / C::WM, g = lane >> 2, t = lane & 3;
  const int64_t row0 = int64_t(blockIdx.x) * C::BN;
  const int64_t n = p.n, d = p.d, k = p.k;
  const TileRun run = tile_run((d + C::BD2 - 1) / C::BD2);  // this block's output tiles

  float* zf = reinterpret_cast<float*>(smem);  // [BN][ZLD] dequantized rows, 0 beyond k / n
  float* row_r = zf + C::BN * C::ZLD;          // [BN]
  float* row_alpha = row_r + C::BN;            // [BN]
  float* dotp = row_alpha + C::BN;             // [WN][BN]
  unsigned char* region = smem + C::Z_BYTES + C::SCALARS_BYTES;  // pre-pass, then main loop
  // main loop: WS stages, each a weight tile [BD2][W2LD] (hi, and lo for fp32) and with
  // stage_x (through RMSNorm) the tile of x [BN][X2LD] of the same columns; then the output
  // tile [BN][HLD]
  const bool stage_x = p.stage_x != 0;
  const size_t stage = C::stage_bytes(stage_x);
  auto w2hi = [&](int b) { return reinterpret_cast<E*>(region + size_t(b) * stage); };
  auto w2lo = [&](int b) { return reinterpret_cast<E*>(region + size_t(b) * stage + C::W2_BYTES); };
  auto xs = [&](int b) { return reinterpret_cast<T*>(region + size_t(b) * stage + C::W2_PARTS * C::W2_BYTES); };
  float* hs = reinterpret_cast<float*>(region + C::WS * stage);

  const Payload payload(p.codes, p.scales, p.bits, p.group, p.scale_dtype, k);
  using Column = Payload::Column;
  for_block_elements<C::BN, KPAD>(
      [&](int c) { return payload.column(c); },
      [&](int r, const Column& col) {
        return row0 + r < n && col.c < k ? payload.fields(row0 + r, col) : PayloadFields{};
      },
      [&](int r, const Column& col, PayloadFields f) {
        zf[r * C::ZLD + col.c] = row0 + r < n && col.c < k ? payload.decode(f, col) : 0.0f;
      });
  __syncthreads();

  const bool norm = p.gamma != nullptr;
  const T* x = static_cast<const T*>(p.x);
  const T* gamma = static_cast<const T*>(p.gamma);
  if (norm && p.stats != nullptr) {
    // alpha = r^2 (g_z . p) / d from the statistics (p = r s), one thread per row
    if (tid < C::BN) {
      const int64_t grow = row0 + tid;
      float r = 0.0f, dsum = 0.0f;
      if (grow < n) {
        const float* srow = p.stats + grow * (k + 1);
        r = srow[k];
        for (int64_t c = 0; c < k; ++c) dsum += zf[tid * C::ZLD + c] * srow[c];
        if (p.rscale != nullptr && blockIdx.y == 0) p.rscale[grow] = r;
      }
      row_r[tid] = r;
      row_alpha[tid] = r * r * dsum / float(d);
    }
    __syncthreads();
  } else if (norm) {
    // s = x (gamma W)^T and sum(x^2) for these rows (the encoder's projection)
    float acc[C::NT][4];
#pragma unroll
    for (int j = 0; j < C::NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    float sumsq[2] = {0.0f, 0.0f};
    const TileRun all{0, (d + C::BD - 1) / C::BD};  // (never split: see dq_splits)
    project_loop<DT, KPAD>(x, n, d, row0, static_cast<const E*>(p.phi),
                           static_cast<const E*>(p.plo), all, true, region, acc, sumsq);
    float dot[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < C::NT; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wm * 16 + g + 8 * h, col = wn * C::WC + j * 8 + 2 * t;
        dot[h] += zf[r * C::ZLD + col] * acc[j][2 * h] + zf[r * C::ZLD + col + 1] * acc[j][2 * h + 1];
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float dsum = quad_sum(dot[h]), ssum = quad_sum(sumsq[h]);
      const int r = wm * 16 + g + 8 * h;
      if (t == 0) {
        dotp[wn * C::BN + r] = dsum;
        if (wn == 0) row_r[r] = inv_rms(ssum, d, p.eps);
      }
    }
    __syncthreads();
    if (tid < C::BN) {
      float dsum = 0.0f;
#pragma unroll
      for (int w = 0; w < C::WN; ++w) dsum += dotp[w * C::BN + tid];
      const float r = row_r[tid];
      row_alpha[tid] = r * r * r * dsum / float(d);
      if (p.rscale != nullptr && row0 + tid < n && blockIdx.y == 0) p.rscale[row0 + tid] = r;
    }
    __syncthreads();
  }

  constexpr bool kWSplit = DT == kFloat32;
  constexpr bool kZSplit = dequant_parts(DT) == 2;  // zhat's A fragments: hi (+ lo)
  constexpr int CH = C::BD2 / 8;  // 8-column chunks per output tile row
  constexpr int EROWS = kThreads / CH, EPER = C::BN / EROWS;
  static_assert(kThreads % CH == 0 && EPER * EROWS == C::BN, "output chunks split evenly");
  const int er = tid / CH, ec = (tid % CH) * 8;
  constexpr int W2CH = KPAD / C::WVEC;  // 16-byte chunks per weight tile row
  const E* w2hi_g = static_cast<const E*>(p.w2hi);
  const E* w2lo_g = static_cast<const E*>(p.w2lo);
  // weight tile w2[dd][c] of this block's output tile `i` (columns d0 = (run.first + i) * BD2..,
  // zeros beyond d and w2_cols) into ring buffer i % WS: a thread copies chunk wch of rows
  // wr + j * WSTEP of every tile (only d0 moves)
  constexpr int WSTEP = kThreads / W2CH, WPER = C::BD2 / WSTEP;
  static_assert(kThreads % W2CH == 0 && WPER * WSTEP == C::BD2, "weight tile copies split evenly");
  const int wr = tid / W2CH, wch = tid % W2CH;
  const bool w_col_ok = wch * C::WVEC < p.w2_cols;  // w2_cols % WVEC == 0
  const int64_t w_off = int64_t(wr) * p.w2_ld + wch * C::WVEC;
  // with stage_x, the x tile of the same columns into the same stage: a thread copies chunk
  // xch of rows xr + j * XSTEP (zeros beyond n and d)
  constexpr int XVEC = 16 / int(sizeof(T)), XCH = C::BD2 / XVEC;  // 16-byte chunks per x tile row
  constexpr int XSTEP = kThreads / XCH, XPER = C::BN / XSTEP;
  static_assert(kThreads % XCH == 0 && XPER * XSTEP == C::BN, "x tile copies split evenly");
  const int xr = tid / XCH, xch = tid % XCH;
  // a whole tile (all its rows below d): only the thread's column test, its source advanced
  // by a tile's rows from the run's first (zero-size copies from w2hi_g where the column is out)
  const E* w_tile0 = w_col_ok ? w2hi_g + w_off + run.first * C::BD2 * p.w2_ld : w2hi_g;
  const int64_t w_tile_step = w_col_ok ? int64_t(C::BD2) * p.w2_ld : 0;
  const int64_t w_row_step = w_col_ok ? int64_t(WSTEP) * p.w2_ld : 0;
  auto issue_w2 = [&](int64_t i) {
    const int b = int(uint32_t(i) % uint32_t(C::WS));  // (a block's tiles: fewer than 2^32)
    const int64_t d0 = (run.first + i) * C::BD2;
    if (!kWSplit && d0 + C::BD2 <= d) {
      const E* src = w_tile0 + i * w_tile_step;
#pragma unroll
      for (int j = 0; j < WPER; ++j)
        cp_async16(w2hi(b) + (wr + j * WSTEP) * C::W2LD + wch * C::WVEC, src + j * w_row_step, w_col_ok ? 16 : 0);
    } else {
#pragma unroll
      for (int j = 0; j < WPER; ++j) {
        const bool ok = w_col_ok && d0 + wr + j * WSTEP < d;
        const int64_t src = ok ? w_off + (d0 + j * WSTEP) * p.w2_ld : 0;
        const int dst = (wr + j * WSTEP) * C::W2LD + wch * C::WVEC;
        cp_async16(w2hi(b) + dst, w2hi_g + src, ok ? 16 : 0);
        if constexpr (kWSplit) cp_async16(w2lo(b) + dst, w2lo_g + src, ok ? 16 : 0);
      }
    }
    if (stage_x) {
      const int64_t col = d0 + xch * XVEC;
#pragma unroll
      for (int j = 0; j < XPER; ++j) {
        const int r = xr + j * XSTEP;
        const bool ok = row0 + r < n && col < d;  // d % 16 == 0: chunks are all in or out
        cp_async16(xs(b) + r * C::X2LD + xch * XVEC, x + (ok ? (row0 + r) * d + col : 0), ok ? 16 : 0);
      }
    }
  };
  // zhat's A fragments are the same for every output tile: with 16-bit operands they are
  // formed once, not per tile, where they take at most 64 registers (bf16 every KPAD; fp16,
  // split hi + lo, up to 128)
  constexpr int KSTEPS = KPAD / C::KS;
  constexpr bool kHoistA = DT != kFloat32 && KSTEPS * 4 * dequant_parts(DT) <= 64;
  float no_sq[2] = {0.0f, 0.0f};
  FragA fa_all[kHoistA ? KSTEPS : 1];
  if constexpr (kHoistA) {
#pragma unroll
    for (int s = 0; s < KSTEPS; ++s) load_a_f32<DT>(fa_all[s], zf, C::ZLD, wm * 16, s * C::KS, lane, false, no_sq);
  }
  cp_async_pipeline<C::WS>(run.count, issue_w2, [&](int64_t i, int b) {
    const int64_t d0 = (run.first + i) * C::BD2;
    float acc[C::NT2][4];
#pragma unroll
    for (int j = 0; j < C::NT2; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    auto k_step = [&](const FragA& fa, int ks) {
#pragma unroll
      for (int j = 0; j < C::NT2; j += 2) {
        FragB fb0, fb1;
        load_b_op_x2<DT>(fb0, fb1, w2hi(b), w2lo(b), C::W2LD, wn * C::NC2 + j * 8, ks, lane, kWSplit);
        mma_acc<DT, kZSplit>(acc[j], fa, fb0, kWSplit);
        mma_acc<DT, kZSplit>(acc[j + 1], fa, fb1, kWSplit);
      }
    };
    if constexpr (kHoistA) {
#pragma unroll
      for (int s = 0; s < KSTEPS; ++s) k_step(fa_all[s], s * C::KS);
    } else {
#pragma unroll 2
      for (int ks = 0; ks < KPAD; ks += C::KS) {
        FragA fa;
        load_a_f32<DT>(fa, zf, C::ZLD, wm * 16, ks, lane, false, no_sq);
        k_step(fa, ks);
      }
    }
    const void* epilogue_in = norm ? p.x : p.residual;  // (the C API never passes both)
    // a whole tile with nothing to add (see store_plain_tile)
    const bool plain = epilogue_in == nullptr && d0 >= k && row0 + C::BN <= n && d0 + C::BD2 <= d;
    if (plain && p.out_dtype != kFloat32) {
      uint32_t* hb = reinterpret_cast<uint32_t*>(hs);
      if (p.out_dtype == kBFloat16) {
        store_plain_tile16<kBFloat16, C, EPER, EROWS>(p.out, hb, acc, wm, wn, g, t, er, ec, row0, d0 + ec, d);
      } else {
        store_plain_tile16<kFloat16, C, EPER, EROWS>(p.out, hb, acc, wm, wn, g, t, er, ec, row0, d0 + ec, d);
      }
      return;  // (the next tile)
    }
#pragma unroll
    for (int j = 0; j < C::NT2; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wm * 16 + g + 8 * h, col = wn * C::NC2 + j * 8 + 2 * t;
        *reinterpret_cast<float2*>(hs + r * C::HLD + col) =
            make_float2(acc[j][2 * h], acc[j][2 * h + 1]);
      }
    }
    // x (RMSNorm) came with the weights (stage_x; else, as fp32 at KPAD = 128 or where
    // stage_x_wanted declines, loaded as the residual is). The residual of a chunk is loaded
    // beside its use: loading every chunk of the tile first (2026-11-27) doubled the registers
    // (bf16, k=32: 92 -> 180), so an SM held 2 blocks instead of 5, and on an H100 decode
    // forward at N=65536 took 369 us, not 266 (bench/results/logs/h100-2026-11-27/VERDICT.md).
    // From KPAD = 64, where shared memory or registers already hold an SM to 3 blocks or
    // fewer, each chunk also asks for the same chunk of the next tile into L2
    // (prefetch.global.L2: no registers held), so that its load then waits for L2, not
    // memory; at KPAD <= 32 that cost 4 registers, a block per SM (bf16: 96 -> 100).
    __syncthreads();  // hs is complete
    if (plain) {  // (fp32 output)
      store_plain_tile<EPER, EROWS, C::HLD>(p.out, hs, er, ec, row0, d0 + ec, d);
      return;  // (the next tile)
    }
    const bool prefetch = KPAD >= 64 && p.prefetch && epilogue_in != nullptr && !stage_x && i + 1 < run.count;
#pragma unroll 1
    for (int j = 0; j < EPER; ++j) {  // chunk ec of rows er + j * EROWS (the same every tile)
      const int r = er + j * EROWS;
      const int64_t grow = row0 + r, gcol = d0 + ec;
      if (grow >= n || gcol >= d) continue;  // d % 16 == 0: chunks are all in or all out
      if constexpr (KPAD >= 64) {
        if (prefetch && gcol + C::BD2 < d) {
          const int bytes = dtype_bytes(norm ? DT : p.out_dtype);
          prefetch_l2(static_cast<const unsigned char*>(epilogue_in) + (grow * d + gcol + C::BD2) * bytes);
        }
      }
      float v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = hs[r * C::HLD + ec + e];
      if (norm) {
        float gm[8], xv[8];
        load8(gamma, gcol, DT, gm);
        if (stage_x) {
          load8(xs(b), r * C::X2LD + ec, DT, xv);
        } else {
          load8(x, grow * d + gcol, DT, xv);
        }
        const float rr = row_r[r], al = row_alpha[r];
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = rr * (v[e] * gm[e]) - xv[e] * al;
      }
      if (gcol < k) {  // identity path pad_d(zhat); k % 16 == 0
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = v[e] + zf[r * C::ZLD + gcol + e];
      }
      if (p.residual != nullptr) {
        float rv[8];
        load8(p.residual, grow * d + gcol, p.out_dtype, rv);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = v[e] + rv[e];
      }
      store8(p.out, grow * d + gcol, p.out_dtype, v);
    }
  });
}

// Z^T = (rscale * zhat)^T as (KPAD, npad) hi (and lo: dequant_parts) arrays of operand elements,
// zero beyond n rows and k columns; npad (a multiple of 8) keeps every row 16-byte aligned.
struct WOArgs {
  const uint8_t* codes;
  const void* scales;
  int bits, group, scale_dtype;
  const float* rscale;  // (n,) or null
  void* zhi;
  void* zlo;
  int64_t n, k, kpad, npad;
};

int64_t operand_rows(int64_t n) { return (n + 7) / 8 * 8; }

// One block per BN rows (tokens): their payload rows are read as they lie (for_block_elements)
// into a (KPAD, BN) tile of shared memory, which is written out transposed, tokens along
// Z^T's rows: both sides coalesced. (One element per thread in Z^T's order read each warp's 32
// codes and scales from 32 payload rows, a sector each.) 16 rows, a 32-byte sector of a 16-bit
// Z^T row: with the row kernels' 64 (256 blocks at N=16384, two an SM, each thread waiting for
// 8 batches of loads in turn at KPAD=128) the kernel took 18 us on the H200 (2026-11-28, k=128)
// for 6 MB; 1024 blocks of 16 rows wait for 2 batches each, eight blocks an SM at once.
template <int DT, int KPAD>
struct WoCfg {
  static constexpr int BN = 16, LD = BN + 1;  // +1: conflict-free columns
  static constexpr size_t SMEM = size_t(KPAD) * LD * 4;
  static_assert(SMEM <= kDefaultSmem, "weight_operand_kernel needs no shared-memory opt-in");
};

struct WeightOperandLoads {
  PayloadFields fields;
  float rscale = 1.0f;
};

template <int DT, int KPAD>
__global__ void __launch_bounds__(kThreads) weight_operand_kernel(const WOArgs p) {
  using C = WoCfg<DT, KPAD>;
  RESBM_DYNAMIC_SMEM(smem);
  float* zt = reinterpret_cast<float*>(smem);  // [KPAD][LD]: zt[c][r] = rscale[r] * zhat[r][c]
  const int64_t row0 = int64_t(blockIdx.x) * C::BN;
  const Payload payload(p.codes, p.scales, p.bits, p.group, p.scale_dtype, p.k);
  using Column = Payload::Column;
  auto valid = [&](int r, const Column& col) { return row0 + r < p.n && col.c < p.k; };
  for_block_elements<C::BN, KPAD>(
      [&](int c) { return payload.column(c); },
      [&](int r, const Column& col) {
        WeightOperandLoads l;
        if (valid(r, col)) {
          l.fields = payload.fields(row0 + r, col);
          if (p.rscale != nullptr) l.rscale = p.rscale[row0 + r];
        }
        return l;
      },
      [&](int r, const Column& col, WeightOperandLoads l) {
        float v = 0.0f;
        if (valid(r, col)) {
          v = payload.decode(l.fields, col);
          if (p.rscale != nullptr) v = v * l.rscale;
        }
        zt[col.c * C::LD + r] = v;
      });
  __syncthreads();
  for (int i = threadIdx.x; i < KPAD * C::BN; i += kThreads) {
    const int c = i / C::BN, r = i % C::BN;
    if (row0 + r < p.npad) store_operand_element<DT>(p.zhi, p.zlo, c * p.npad + row0 + r, zt[c * C::LD + r]);
  }
}

struct WGArgs {
  const void* a;    // (n, d) activations, 16-byte aligned
  const void* zhi;  // weight_operand_kernel's Z^T, (KPAD, npad) each
  const void* zlo;
  float* out;  // out[s * out_ss + c * out_sc + j * out_sd]
  int64_t out_ss, out_sc, out_sd;
  int64_t n, d, k, npad, rows_per_split;  // rows_per_split: a multiple of BR (aligned Z^T chunks)
};

template <int DT, int KPAD>
__global__ void __launch_bounds__(WgCfg<DT, KPAD>::THREADS, WgCfg<DT, KPAD>::MIN_BLOCKS)
    weight_grad_kernel(const WGArgs p) {
  using C = WgCfg<DT, KPAD>;
  using T = typename C::T;
  using E = typename C::E;
  RESBM_DYNAMIC_SMEM(smem);
  // stage s: [BR][XLD] x tile, then [KPAD][ZTLD] hi (and lo) tiles of (zhat * rscale)^T
  auto xs = [&](int s) { return reinterpret_cast<T*>(smem + s * C::STAGE_BYTES); };
  auto zhi = [&](int s) { return reinterpret_cast<E*>(smem + s * C::STAGE_BYTES + C::X_BYTES); };
  auto zlo = [&](int s) { return reinterpret_cast<E*>(smem + s * C::STAGE_BYTES + C::X_BYTES + C::ZT_BYTES); };
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % C::WM, wn = warp / C::WM, g = lane >> 2, t = lane & 3;
  const int64_t split = blockIdx.y, d0 = int64_t(blockIdx.x) * C::BDW;
  const int64_t start = split * p.rows_per_split;
  const int64_t end = start + p.rows_per_split < p.n ? start + p.rows_per_split : p.n;
  const T* a = static_cast<const T*>(p.a);
  const E* zt_hi = static_cast<const E*>(p.zhi);
  const E* zt_lo = static_cast<const E*>(p.zlo);
  constexpr int VEC = 16 / int(sizeof(T));
  constexpr int CHUNKS = C::BDW / VEC;
  constexpr int ZVEC = 16 / int(sizeof(E));   // Z^T elements per 16-byte chunk
  constexpr int ZCHUNKS = C::BR / ZVEC;       // chunks per row of a (KPAD, BR) tile

  float acc[C::MT][C::NT][4];
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < C::NT; ++nt)
      acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.0f;

  // the loads of block `it` (rows start + it * BR..) into stage it % STAGES. Every block, a
  // thread copies the same chunks (x: column chunk xch of rows xr + j * XSTEP; Z^T: chunk zch
  // of rows zr + j * ZSTEP of hi, then lo), so only the block's row offset changes.
  constexpr int XSTEP = C::THREADS / CHUNKS, ZSTEP = C::THREADS / ZCHUNKS;
  constexpr int ZROWS = C::ZPARTS * KPAD;  // Z^T rows, hi then lo
  constexpr int XPER = C::BR / XSTEP, ZPER = (ZROWS + ZSTEP - 1) / ZSTEP;
  static_assert(C::THREADS % CHUNKS == 0 && C::THREADS % ZCHUNKS == 0 && XPER * XSTEP == C::BR &&
                    (ZPER * ZSTEP == ZROWS || ZPER == 1),
                "the copies of a block must split evenly between the threads");
  const int xr = tid / CHUNKS, xch = tid % CHUNKS, zr = tid / ZCHUNKS, zch = tid % ZCHUNKS;
  const bool x_col_ok = d0 + xch * VEC < p.d;
  const int64_t rows = end - start;
  auto issue = [&](int64_t it) {
    const int s = int(it % C::STAGES);
    const int64_t r0 = it * C::BR;
    const T* xsrc = a + (start + r0 + xr) * p.d + d0 + xch * VEC;
    T* xdst = xs(s) + xr * C::XLD + xch * VEC;
#pragma unroll
    for (int j = 0; j < XPER; ++j) {
      const bool ok = x_col_ok && r0 + xr + j * XSTEP < rows;
      cp_async16(xdst + j * XSTEP * C::XLD, ok ? xsrc + int64_t(j * XSTEP) * p.d : a, ok ? 16 : 0);
    }
    // rows of the next split (or beyond n) read as zeros
    const int64_t zrows = rows - r0 - zch * ZVEC;
    const int zbytes = zrows >= ZVEC ? 16 : zrows > 0 ? int(zrows) * int(sizeof(E)) : 0;
    const int64_t zcol = start + r0 + zch * ZVEC;
#pragma unroll 8
    for (int j = 0; j < ZPER; ++j) {
      const int row = zr + j * ZSTEP, part = row / KPAD, c = row % KPAD;
      const E* src = part ? zt_lo : zt_hi;
      if (ZSTEP <= ZROWS || row < ZROWS)  // bf16, KPAD = 16: fewer chunks than threads
        cp_async16((part ? zlo(s) : zhi(s)) + c * C::ZTLD + zch * ZVEC, zbytes ? src + c * p.npad + zcol : src,
                   zbytes);
    }
  };
  const int64_t blocks = end > start ? (end - start + C::BR - 1) / C::BR : 0;
  cp_async_pipeline<C::STAGES>(blocks, issue, [&](int64_t, int s) {
#pragma unroll
    for (int ks = 0; ks < C::BR; ks += C::KS) {
      FragA fa[C::MT];
#pragma unroll
      for (int mt = 0; mt < C::MT; ++mt)
        load_a_op<DT>(fa[mt], zhi(s), zlo(s), C::ZTLD, wm * C::MR + mt * 16, ks, lane, C::ZPARTS == 2);
#pragma unroll
      for (int nt = 0; nt < C::NT; nt += 2) {
        FragB fb0, fb1;
        load_b_raw_kn_x2<DT>(fb0, fb1, xs(s), C::XLD, wn * C::NW + nt * 8, ks, lane);
#pragma unroll
        for (int mt = 0; mt < C::MT; ++mt) {
          mma_acc<DT, C::ZPARTS == 2>(acc[mt][nt], fa[mt], fb0, DT == kFloat32);
          mma_acc<DT, C::ZPARTS == 2>(acc[mt][nt + 1], fa[mt], fb1, DT == kFloat32);
        }
      }
    }
  });

  float* out = p.out + split * p.out_ss;
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < C::NT; ++nt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t c = wm * C::MR + mt * 16 + g + 8 * h;
        const int64_t j = d0 + wn * C::NW + nt * 8 + 2 * t;
        if (c < p.k && j < p.d) {  // d even: j + 1 < d too
          out[c * p.out_sc + j * p.out_sd] = acc[mt][nt][2 * h];
          out[c * p.out_sc + (j + 1) * p.out_sd] = acc[mt][nt][2 * h + 1];
        }
      }
    }
  }
}

// The weight gradient from the per-split partials (resbm_cuda_finish_weight_grad): splits
// summed in order, the RMSNorm factors applied, each output rounded once.
struct FinishArgs {
  const float* partial;  // (splits, rows, cols)
  int64_t splits, rows, cols;
  void* out;
  int out_dtype;
  const void* gamma;  // (cols,) or null
  const void* w;      // (rows, cols) of out_dtype, with gamma
  void* grad_gamma;   // (cols,), with gamma
  int gamma_dtype;
};

constexpr int kFinishThreads = 256;
constexpr int kFinishCols = 16;                                // columns per block, with gamma
constexpr int kFinishSlices = kFinishThreads / kFinishCols;  // rows split between threads

// Without gamma each thread sums four elements at a time, a block's 256 threads apart. With
// gamma a block takes 16 columns (64-byte runs of a row) and each of its 16 row slices every
// 16th row, four rows at a time (where one thread per column walked all rows in turn), then
// grad_gamma sums the slices' partial sums in slice order: a fixed order, so the result does
// not depend on timing. Either way a thread has four elements' partials of up to eight
// splits in flight at once.
__global__ void __launch_bounds__(kFinishThreads, 2) finish_weight_grad_kernel(const FinishArgs p) {
  const int tid = threadIdx.x;
  if (p.gamma == nullptr) {
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t i0 = int64_t(blockIdx.x) * blockDim.x * kSumElems + tid; i0 < p.rows * p.cols;
         i0 += stride * kSumElems) {
      int64_t idx[kSumElems];
      bool ok[kSumElems];
      float m[kSumElems];
#pragma unroll
      for (int u = 0; u < kSumElems; ++u) {
        idx[u] = i0 + int64_t(u) * blockDim.x;
        ok[u] = idx[u] < p.rows * p.cols;
      }
      split_sums(p.partial, p.splits, p.rows * p.cols, idx, ok, m);
#pragma unroll
      for (int u = 0; u < kSumElems; ++u) {
        if (ok[u]) store_float(p.out, idx[u], p.out_dtype, m[u]);
      }
    }
    return;
  }
  RESBM_DYNAMIC_SMEM(smem);
  float(*slice_sums)[kFinishCols] = reinterpret_cast<float(*)[kFinishCols]>(smem);  // [slice][col]
  const int col = tid % kFinishCols, slice = tid / kFinishCols;
  for (int64_t j0 = int64_t(blockIdx.x) * kFinishCols; j0 < p.cols; j0 += int64_t(gridDim.x) * kFinishCols) {
    const int64_t j = j0 + col;
    float gg = 0.0f;
    if (j < p.cols) {
      const float g = load_float(p.gamma, j, p.gamma_dtype);
      // four rows at a time, their loads before any store (which the compiler may not move
      // them past: the output could alias them), in the same order of rows as one at a time
      for (int64_t r0 = slice; r0 < p.rows; r0 += kSumElems * kFinishSlices) {
        float m[kSumElems], w[kSumElems];
        int64_t idx[kSumElems];
        bool ok[kSumElems];
#pragma unroll
        for (int u = 0; u < kSumElems; ++u) {
          const int64_t r = r0 + u * kFinishSlices;
          idx[u] = r * p.cols + j;
          ok[u] = r < p.rows;
          w[u] = ok[u] ? load_float(p.w, idx[u], p.out_dtype) : 0.0f;
        }
        split_sums(p.partial, p.splits, p.rows * p.cols, idx, ok, m);
#pragma unroll
        for (int u = 0; u < kSumElems; ++u) {
          const int64_t r = r0 + u * kFinishSlices;
          if (r < p.rows) {
            store_float(p.out, r * p.cols + j, p.out_dtype, m[u] * g);
            gg += w[u] * m[u];
          }
        }
      }
    }
    slice_sums[slice][col] = gg;
    __syncthreads();
    if (slice == 0 && j < p.cols) {
      for (int s = 1; s < kFinishSlices; ++s) gg += slice_sums[s][col];
      store_float(p.grad_gamma, j, p.gamma_dtype, gg);
    }
    __syncthreads();  // slice_sums is reused by the next columns
  }
}

// ---- launch helpers ------------------------------------------------------------------------

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

template <int DT>
int launch_prep(const char* fn, const PrepArgs& p, cudaStream_t stream) {
  char name[80];
  std::snprintf(name, sizeof name, "prepare_operand_kernel<%s>", Operand<DT>::name());
  const int64_t total = p.rows * p.cols;
  const int64_t blocks = (total + 255) / 256 < 4096 ? (total + 255) / 256 : 4096;
  launch(prepare_operand_kernel<DT>, unsigned(blocks), 256, 0, stream, p);
  return launch_status(fn, name);
}

// project_quantize on wgmma: 16-bit inputs with KPAD <= 128, asked for with
// RESBM_CUDA_WGMMA=1, on an sm_90 device with a library built for sm_90a (RESBM_SM90A)
// or on the emulator. Off by default: on an H100 (2026-11-27, N=16384, d=4096) it took
// 1.3-2x the mma.sync loop's time, bound by L2 traffic (bench/results/logs/h100-2026-11-27).
template <int DT, int KPAD>
constexpr bool wgmma_shape() {
  return DT != kFloat32 && KPAD <= 128;
}

bool wgmma_enabled() {
  const char* env = std::getenv("RESBM_CUDA_WGMMA");
  if (env == nullptr || std::strcmp(env, "1") != 0) return false;
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
  std::snprintf(name, sizeof name, "project_quantize_kernel<%s,%d%s>", Operand<DT>::name(), KPAD,
                WG ? ",wgmma" : "");
  const void* func = reinterpret_cast<const void*>(&project_quantize_kernel<DT, KPAD, WG>);
  constexpr size_t smem = WG ? C::WG_SMEM : C::PQ_SMEM;
  RESBM_TRY(prepare(fn, name, func, smem));
  const int64_t blocks = (p.n + C::BN - 1) / C::BN;
  launch(project_quantize_kernel<DT, KPAD, WG>, dim3(unsigned(blocks), unsigned(p.splits)), kThreads, smem,
         stream, p);
  RESBM_TRY(launch_status(fn, name));
  if (p.splits == 1) return RESBM_OK;
  std::snprintf(name, sizeof name, "finish_rows_kernel<%s,%d>", Operand<DT>::name(), KPAD);
  launch(finish_rows_kernel<DT, KPAD>, unsigned(blocks), kThreads, C::FINISH_BYTES, stream, p);
  return launch_status(fn, name);
}

template <int DT, int KPAD>
int launch_pq(const char* fn, const PQArgs& p, const PrepArgs& prep, cudaStream_t stream) {
  RESBM_TRY(launch_prep<DT>(fn, prep, stream));
  if constexpr (wgmma_shape<DT, KPAD>()) {
    if (wgmma_enabled()) return launch_pq_kernel<DT, KPAD, true>(fn, p, stream);
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
bool on_unless_zero(const char* name) {
  const char* env = std::getenv(name);
  return env == nullptr || std::strcmp(env, "0") != 0;
}
bool splits_enabled() { return on_unless_zero("RESBM_CUDA_SPLITS"); }

// Whether encode backward's row kernel copies its x tiles through the weight tiles' ring,
// given the blocks the device runs at once with and without them there and its SMs: by
// default unless that leaves an SM one block where more fit (H200, 2026-11-28, N=16384,
// d=4096, bf16: staged 6-7 % faster at k=32, 3 blocks an SM against 5; the same at k=64;
// 10-11 % slower at k=128, one block against two); RESBM_CUDA_STAGE_X=1 always, 0 never
// (for comparison).
bool stage_x_wanted(int blocks_staged, int blocks_plain, int sms) {
  const char* env = std::getenv("RESBM_CUDA_STAGE_X");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (env != nullptr && std::strcmp(env, "1") == 0) return true;
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
  const int64_t bd = wgmma_shape<DT, KPAD>() && wgmma_enabled() ? C::WG_BD : C::BD;  // launch_pq's loop's tile
  const int64_t row_blocks = (n + C::BN - 1) / C::BN, sms = blocks_at_once(nullptr, 0);
  *splits = row_blocks >= sms || !splits_enabled()
                ? 1
                : int(fill_splits(row_blocks, (d + bd - 1) / bd, sms, kMaxProjectionSplits));
  return RESBM_OK;
}

// preps: the operands to build first (n_preps of them: 0, 1 or 2)
template <int DT, int KPAD>
int launch_dq(const char* fn, const DQArgs& p, const PrepArgs* preps, int n_preps,
              cudaStream_t stream) {
  using C = RowCfg<DT, KPAD>;
  for (int i = 0; i < n_preps; ++i) RESBM_TRY(launch_prep<DT>(fn, preps[i], stream));
  char name[80];
  std::snprintf(name, sizeof name, "dequant_project_kernel<%s,%d>", Operand<DT>::name(), KPAD);
  const void* func = reinterpret_cast<const void*>(&dequant_project_kernel<DT, KPAD>);
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
  launch(dequant_project_kernel<DT, KPAD>, grid, kThreads, smem, stream, args);
  return launch_status(fn, name);
}

template <int DT, int KPAD>
int launch_wg(const char* fn, const WOArgs& op, const WGArgs& p, int splits, cudaStream_t stream) {
  using C = WgCfg<DT, KPAD>;
  char name[80];
  std::snprintf(name, sizeof name, "weight_operand_kernel<%s,%d>", Operand<DT>::name(), KPAD);
  using O = WoCfg<DT, KPAD>;
  const int64_t op_blocks = (op.npad + O::BN - 1) / O::BN;
  launch(weight_operand_kernel<DT, KPAD>, unsigned(op_blocks > 0 ? op_blocks : 1), kThreads, O::SMEM, stream, op);
  RESBM_TRY(launch_status(fn, name));
  std::snprintf(name, sizeof name, "weight_grad_kernel<%s,%d>", Operand<DT>::name(), KPAD);
  const void* func = reinterpret_cast<const void*>(&weight_grad_kernel<DT, KPAD>);
  RESBM_TRY(prepare(fn, name, func, C::SMEM));
  const dim3 grid(unsigned((p.d + C::BDW - 1) / C::BDW), unsigned(splits));
  launch(weight_grad_kernel<DT, KPAD>, grid, C::THREADS, C::SMEM, stream, p);
  return launch_status(fn, name);
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

// ---- argument validation (host only, before any CUDA call) ----------------------------------

int check_dims(const char* fn, int64_t n, int64_t d, int64_t k) {
  const long long N = n, D = d, K = k;
  if (n < 0 || d <= 0 || k <= 0)
    return fail(RESBM_ERR_ARG, fn, "bad shape n=%lld, d=%lld, k=%lld (need n >= 0, d > 0, k > 0)",
                N, D, K);
  if (d % 16 || k % 16)
    return fail(RESBM_ERR_ARG, fn, "d=%lld and k=%lld must both be multiples of 16", D, K);
  if (k > 256) return fail(RESBM_ERR_ARG, fn, "k=%lld is too large (at most 256)", K);
  if (k > d) return fail(RESBM_ERR_ARG, fn, "k=%lld exceeds d=%lld", K, D);
  if (n > (int64_t(1) << 34) || n > INT64_MAX / 4 / d)
    return fail(RESBM_ERR_ARG, fn, "shape n=%lld, d=%lld is too large", N, D);
  return RESBM_OK;
}

int check_dtype(const char* fn, const char* name, int dtype) {
  if (!valid_dtype(dtype))
    return fail(RESBM_ERR_ARG, fn, "bad %s=%d (1 fp32, 2 fp16, 3 bf16)", name, dtype);
  return RESBM_OK;
}

// A required (or optional, when !required) pointer with the given alignment.
int check_ptr(const char* fn, const char* name, const void* ptr, size_t align, bool required) {
  if (ptr == nullptr)
    return required ? fail(RESBM_ERR_ARG, fn, "null pointer %s", name) : RESBM_OK;
  if (reinterpret_cast<uintptr_t>(ptr) % align)
    return fail(RESBM_ERR_ARG, fn, "%s is not %zu-byte aligned", name, align);
  return RESBM_OK;
}

// A split count (grid.y of the kernel that takes it).
int check_splits(const char* fn, int splits) {
  if (splits < 1 || splits > kMaxGridY) return fail(RESBM_ERR_ARG, fn, "bad splits=%d (1..65535)", splits);
  return RESBM_OK;
}

// ---- workspace: the prepared weight operands of one call ------------------------------------

// The caller's workspace holds, in this order, the projection operand (KPAD, d): hi [, lo]
// (encode forward, decode backward, the RMSNorm pre-pass of encode backward), then the
// output projection's operand (d, KPAD): hi [, lo] (encode backward, and decode forward in
// fp32; 16-bit w_d streams as it is). One layout for the size query and the launches.
struct Workspace {
  int proj_parts = 0, w2_parts = 0;  // 0 (absent), 1 (hi) or 2 (hi, lo)
  size_t part = 0;                   // bytes of one part: KPAD x d operand elements

  size_t bytes() const { return size_t(proj_parts + w2_parts) * part; }
  void* part_at(void* base, int index) const {
    return static_cast<unsigned char*>(base) + size_t(index) * part;
  }
  void* proj(void* base, int lo) const { return lo < proj_parts ? part_at(base, lo) : nullptr; }
  void* w2(void* base, int lo) const {
    return lo < w2_parts ? part_at(base, proj_parts + lo) : nullptr;
  }
};

Workspace workspace_for(int pass, int dtype, int64_t d, int64_t k, bool norm) {
  const bool fp32 = dtype == kFloat32;
  Workspace w;
  w.part = size_t(kpad_of(k)) * size_t(d) * (fp32 ? 4 : 2);
  if (pass == RESBM_PASS_ENCODE_FORWARD || pass == RESBM_PASS_DECODE_BACKWARD ||
      (pass == RESBM_PASS_ENCODE_BACKWARD && norm))
    w.proj_parts = fp32 ? 2 : 1;  // tf32 hi + lo; 16-bit (gamma-folded or not): one part
  if (pass == RESBM_PASS_ENCODE_BACKWARD || (pass == RESBM_PASS_DECODE_FORWARD && fp32))
    w.w2_parts = fp32 ? 2 : 1;
  return w;
}

}  // namespace
}  // namespace cuda
}  // namespace resbm

using namespace resbm::cuda;
using resbm::dtype_bytes;
using resbm::kBFloat16;
using resbm::kFloat16;
using resbm::kFloat32;

extern "C" {

int resbm_cuda_workspace_bytes(int pass, int dtype, int64_t d, int64_t k, int norm,
                               int64_t* bytes) {
  const char* fn = "resbm_cuda_workspace_bytes";
  if (pass < RESBM_PASS_ENCODE_FORWARD || pass > RESBM_PASS_ENCODE_BACKWARD)
    return fail(RESBM_ERR_ARG, fn, "bad pass=%d (0 encode forward, 1 decode forward, "
                "2 decode backward, 3 encode backward)", pass);
  RESBM_TRY(check_dims(fn, 0, d, k));
  RESBM_TRY(check_dtype(fn, "dtype", dtype));
  RESBM_TRY(check_ptr(fn, "bytes", bytes, alignof(int64_t), true));
  *bytes = int64_t(workspace_for(pass, dtype, d, k, norm != 0).bytes());
  return RESBM_OK;
}

int resbm_cuda_projection_splits(int dtype, int64_t n, int64_t d, int64_t k, int* splits) {
  const char* fn = "resbm_cuda_projection_splits";
  RESBM_TRY(check_dims(fn, n, d, k));
  RESBM_TRY(check_dtype(fn, "dtype", dtype));
  RESBM_TRY(check_ptr(fn, "splits", splits, alignof(int), true));
  RESBM_DISPATCH(pq_splits, dtype, k, fn, n, d, splits);
}

int resbm_cuda_encode_forward(const void* x, int dtype, int64_t n, int64_t d, int64_t k,
                              const void* w_e, const void* norm_weight, float eps, int bits,
                              int group, int scale_dtype, int stochastic, uint32_t key,
                              uint8_t* codes, void* scales, const int32_t* header,
                              float* row_stats, float* partial, int splits, void* workspace,
                              void* stream) {
  const char* fn = "resbm_cuda_encode_forward";
  RESBM_TRY(check_dims(fn, n, d, k));
  RESBM_TRY(check_dtype(fn, "dtype", dtype));
  RESBM_TRY(resbm::check_args(fn, "x", x, dtype, n, k, bits, group, scale_dtype, codes, scales,
                              g_error, sizeof g_error));
  if (n == 0) return RESBM_OK;
  RESBM_TRY(check_ptr(fn, "x", x, 16, true));
  RESBM_TRY(check_ptr(fn, "w_e", w_e, dtype_bytes(dtype), true));
  RESBM_TRY(check_ptr(fn, "norm_weight", norm_weight, dtype_bytes(dtype), false));
  RESBM_TRY(check_ptr(fn, "row_stats", row_stats, sizeof(float), false));
  RESBM_TRY(check_splits(fn, splits));
  RESBM_TRY(check_ptr(fn, "partial", partial, sizeof(float), splits > 1));  // (splits, n, k + 1) fp32
  RESBM_TRY(check_ptr(fn, "workspace", workspace, 16, true));
  const bool norm = norm_weight != nullptr;
  if (row_stats != nullptr && !norm)
    return fail(RESBM_ERR_ARG, fn, "row_stats are RMSNorm statistics: they need norm_weight");
  const Workspace ws = workspace_for(RESBM_PASS_ENCODE_FORWARD, dtype, d, k, norm);
  // operand (KPAD, d): B(dd, c) = w_e[c * d + dd] * gamma[dd]
  const PrepArgs prep{w_e, /*s_r=*/d, /*s_c=*/1, norm_weight, kpad_of(k), d, k, d,
                      ws.proj(workspace, 0), ws.proj(workspace, 1)};
  const PQArgs p = with_header({x, prep.hi, prep.lo, norm, n, d, k, eps, bits, group, scale_dtype,
                                stochastic, key, codes, scales, row_stats, partial, splits, 0, {}},
                               header);
  RESBM_DISPATCH(launch_pq, dtype, k, fn, p, prep, static_cast<cudaStream_t>(stream));
}

int resbm_cuda_decode_backward(const void* grad_h, int dtype, int64_t n, int64_t d, int64_t k,
                               const void* w_d, int bits, int group, int scale_dtype,
                               int stochastic, uint32_t key, uint8_t* codes, void* scales,
                               const int32_t* header, float* partial, int splits,
                               void* workspace, void* stream) {
  const char* fn = "resbm_cuda_decode_backward";
  RESBM_TRY(check_dims(fn, n, d, k));
  RESBM_TRY(check_dtype(fn, "dtype", dtype));
  RESBM_TRY(resbm::check_args(fn, "grad_h", grad_h, dtype, n, k, bits, group, scale_dtype, codes,
                              scales, g_error, sizeof g_error));
  if (n == 0) return RESBM_OK;
  RESBM_TRY(check_ptr(fn, "grad_h", grad_h, 16, true));
  RESBM_TRY(check_ptr(fn, "w_d", w_d, dtype_bytes(dtype), true));
  RESBM_TRY(check_splits(fn, splits));
  RESBM_TRY(check_ptr(fn, "partial", partial, sizeof(float), splits > 1));  // (splits, n, k + 1) fp32
  RESBM_TRY(check_ptr(fn, "workspace", workspace, 16, true));
  const Workspace ws = workspace_for(RESBM_PASS_DECODE_BACKWARD, dtype, d, k, false);
  // g_z = grad_h @ w_d (+ identity): operand (KPAD, d), B(dd, c) = w_d[dd * k + c]
  const PrepArgs prep{w_d, /*s_r=*/1, /*s_c=*/k, nullptr, kpad_of(k), d, k, d,
                      ws.proj(workspace, 0), ws.proj(workspace, 1)};
  const PQArgs p = with_header({grad_h, prep.hi, prep.lo, 0, n, d, k, 0.0f, bits, group, scale_dtype,
                                stochastic, key, codes, scales, nullptr, partial, splits, 0, {}},
                               header);
  RESBM_DISPATCH(launch_pq, dtype, k, fn, p, prep, static_cast<cudaStream_t>(stream));
}

int resbm_cuda_decode_forward(const uint8_t* codes, const void* scales, int64_t n, int64_t d,
                              int64_t k, int bits, int group, int scale_dtype, const void* w_d,
                              int w_dtype, const void* residual, void* out, int out_dtype,
                              void* workspace, void* stream) {
  const char* fn = "resbm_cuda_decode_forward";
  RESBM_TRY(check_dims(fn, n, d, k));
  RESBM_TRY(check_dtype(fn, "w_dtype", w_dtype));
  RESBM_TRY(resbm::check_args(fn, "out", out, out_dtype, n, k, bits, group, scale_dtype, codes,
                              scales, g_error, sizeof g_error));
  if (n == 0) return RESBM_OK;
  const Workspace ws = workspace_for(RESBM_PASS_DECODE_FORWARD, w_dtype, d, k, false);
  RESBM_TRY(check_ptr(fn, "out", out, 16, true));
  RESBM_TRY(check_ptr(fn, "residual", residual, 16, false));
  RESBM_TRY(check_ptr(fn, "w_d", w_d, 16, true));
  RESBM_TRY(check_ptr(fn, "workspace", workspace, 16, ws.bytes() > 0));
  // h = zhat @ w_d^T: B(dd, c) = w_d[dd * k + c], (d, k) rows streamed as they are (16-bit
  // weights are exact operands), or prepared as (d, KPAD) hi + lo (fp32)
  const PrepArgs prep{w_d, /*s_r=*/k, /*s_c=*/1, nullptr, d, kpad_of(k), d, k,
                      ws.w2(workspace, 0), ws.w2(workspace, 1)};
  const bool prepared = ws.w2_parts > 0;
  const DQArgs p{codes, scales, bits, group, scale_dtype,
                 prepared ? prep.hi : w_d, prep.lo, prepared ? kpad_of(k) : k,
                 prepared ? kpad_of(k) : k, nullptr, nullptr, nullptr, nullptr, 0.0f, residual,
                 out, out_dtype, nullptr, nullptr, n, d, k};
  RESBM_DISPATCH(launch_dq, w_dtype, k, fn, p, &prep, prepared ? 1 : 0,
                 static_cast<cudaStream_t>(stream));
}

int resbm_cuda_encode_backward(const uint8_t* codes, const void* scales, int64_t n, int64_t d,
                               int64_t k, int bits, int group, int scale_dtype, const void* x,
                               int dtype, const void* w_e, const void* norm_weight, float eps,
                               void* grad_x, float* rscale, const float* row_stats,
                               void* workspace, void* stream) {
  const char* fn = "resbm_cuda_encode_backward";
  RESBM_TRY(check_dims(fn, n, d, k));
  RESBM_TRY(resbm::check_args(fn, "grad_x", grad_x, dtype, n, k, bits, group, scale_dtype, codes,
                              scales, g_error, sizeof g_error));
  if (n == 0) return RESBM_OK;
  RESBM_TRY(check_ptr(fn, "grad_x", grad_x, 16, true));
  RESBM_TRY(check_ptr(fn, "w_e", w_e, dtype_bytes(dtype), true));
  const bool norm = norm_weight != nullptr;
  if (norm) {
    RESBM_TRY(check_ptr(fn, "x", x, 16, true));
    RESBM_TRY(check_ptr(fn, "norm_weight", norm_weight, 16, true));
    RESBM_TRY(check_ptr(fn, "rscale", rscale, 4, false));
    RESBM_TRY(check_ptr(fn, "row_stats", row_stats, sizeof(float), false));
  } else if (row_stats != nullptr) {
    return fail(RESBM_ERR_ARG, fn, "row_stats are RMSNorm statistics: they need norm_weight");
  }
  RESBM_TRY(check_ptr(fn, "workspace", workspace, 16, true));
  const Workspace ws = workspace_for(RESBM_PASS_ENCODE_BACKWARD, dtype, d, k, norm);
  // grad_x = g_z @ w_e (+ identity, + RMSNorm backward): operand (d, KPAD),
  // B(dd, c) = w_e[c * d + dd]; the pre-pass's (KPAD, d) as in encode forward
  const PrepArgs preps[2] = {
      {w_e, /*s_r=*/1, /*s_c=*/d, nullptr, d, kpad_of(k), d, k, ws.w2(workspace, 0),
       ws.w2(workspace, 1)},
      {w_e, /*s_r=*/d, /*s_c=*/1, norm_weight, kpad_of(k), d, k, d, ws.proj(workspace, 0),
       ws.proj(workspace, 1)}};
  const DQArgs p{codes, scales, bits, group, scale_dtype, preps[0].hi, preps[0].lo,
                 kpad_of(k), kpad_of(k), preps[1].hi, preps[1].lo, norm ? x : nullptr,
                 norm_weight, eps, nullptr, grad_x, dtype, norm ? rscale : nullptr, row_stats,
                 n, d, k};
  // the pre-pass's operand only without the statistics
  RESBM_DISPATCH(launch_dq, dtype, k, fn, p, preps, norm && row_stats == nullptr ? 2 : 1,
                 static_cast<cudaStream_t>(stream));
}

int resbm_cuda_weight_grad_workspace_bytes(int dtype, int64_t n, int64_t k, int64_t* bytes) {
  const char* fn = "resbm_cuda_weight_grad_workspace_bytes";
  if (n < 0 || n > (int64_t(1) << 34)) return fail(RESBM_ERR_ARG, fn, "bad n=%lld (0..2^34)", (long long)n);
  if (k <= 0 || k % 16 || k > 256)
    return fail(RESBM_ERR_ARG, fn, "bad k=%lld (a positive multiple of 16, at most 256)", (long long)k);
  RESBM_TRY(check_dtype(fn, "dtype", dtype));
  RESBM_TRY(check_ptr(fn, "bytes", bytes, alignof(int64_t), true));
  *bytes = dequant_parts(dtype) * int64_t(kpad_of(k)) * operand_rows(n) * (dtype == kFloat32 ? 4 : 2);
  return RESBM_OK;
}

int resbm_cuda_weight_grad(const void* a, int dtype, int64_t n, int64_t d, int64_t k,
                           const uint8_t* codes, const void* scales, int bits, int group,
                           int scale_dtype, const float* rscale, int splits, int transpose,
                           float* partial, void* workspace, void* stream) {
  const char* fn = "resbm_cuda_weight_grad";
  RESBM_TRY(check_dims(fn, n, d, k));
  RESBM_TRY(check_dtype(fn, "dtype", dtype));
  RESBM_TRY(resbm::check_args(fn, "a", a, dtype, n, k, bits, group, scale_dtype, codes, scales,
                              g_error, sizeof g_error));
  RESBM_TRY(check_splits(fn, splits));
  RESBM_TRY(check_ptr(fn, "partial", partial, 4, true));
  RESBM_TRY(check_ptr(fn, "a", a, 16, n > 0));
  RESBM_TRY(check_ptr(fn, "rscale", rscale, 4, false));
  RESBM_TRY(check_ptr(fn, "workspace", workspace, 16, n > 0));
  // every split writes its whole (k, d) partial, zeros when it has no rows; split starts are
  // multiples of the blocks' 32 rows, so the Z^T chunks they copy stay 16-byte aligned
  const int64_t rows_per_split = ((n + splits - 1) / splits + kWgRows - 1) / kWgRows * kWgRows;
  const int64_t npad = operand_rows(n), kpad = kpad_of(k);
  const size_t part = size_t(kpad * npad) * (dtype == kFloat32 ? 4 : 2);
  void* zlo = dequant_parts(dtype) == 2 ? static_cast<unsigned char*>(workspace) + part : nullptr;
  const WOArgs op{codes, scales, bits, group, scale_dtype, rscale, workspace, zlo, n, k, kpad, npad};
  const WGArgs p{a, workspace, zlo, partial, d * k, transpose ? 1 : d, transpose ? k : 1,
                 n, d, k, npad, rows_per_split > 0 ? rows_per_split : kWgRows};
  RESBM_DISPATCH(launch_wg, dtype, k, fn, op, p, splits, static_cast<cudaStream_t>(stream));
}

int resbm_cuda_finish_weight_grad(const float* partial, int splits, int64_t rows, int64_t cols,
                                  void* out, int out_dtype, const void* norm_weight, const void* w,
                                  void* grad_norm, int norm_dtype, void* stream) {
  const char* fn = "resbm_cuda_finish_weight_grad";
  if (rows <= 0 || cols <= 0 || rows > (int64_t(1) << 31) || cols > (int64_t(1) << 31))
    return fail(RESBM_ERR_ARG, fn, "bad shape rows=%lld cols=%lld", (long long)rows, (long long)cols);
  RESBM_TRY(check_splits(fn, splits));
  RESBM_TRY(check_dtype(fn, "out_dtype", out_dtype));
  RESBM_TRY(check_ptr(fn, "partial", partial, 4, true));
  RESBM_TRY(check_ptr(fn, "out", out, 2, true));
  const bool norm = norm_weight != nullptr;
  if (norm) {
    RESBM_TRY(check_dtype(fn, "norm_dtype", norm_dtype));
    RESBM_TRY(check_ptr(fn, "w", w, 2, true));
    RESBM_TRY(check_ptr(fn, "grad_norm", grad_norm, 2, true));
  }
  const FinishArgs p{partial, splits, rows, cols, out, out_dtype, norm_weight, w, grad_norm, norm_dtype};
  const int64_t per_block = norm ? kFinishCols : kFinishThreads * kSumElems;  // columns, else elements
  const int64_t items = norm ? cols : rows * cols;
  const int64_t blocks = (items + per_block - 1) / per_block < 4096 ? (items + per_block - 1) / per_block : 4096;
  const size_t smem = norm ? kFinishThreads * sizeof(float) : 0;  // the slices' partial grad_gamma
  launch(finish_weight_grad_kernel, unsigned(blocks), kFinishThreads, smem, static_cast<cudaStream_t>(stream), p);
  return launch_status(fn, "finish_weight_grad_kernel");
}

}  // extern "C"
