// The pass kernels' shared pieces (passes.cu): launch constants, row statistics,
// d-split runs, split sums, payload reads, batched element loads, row quantization
// and the weight operands' preparation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "errors.cuh"
#include "mma.cuh"
#include "resbm/args.h"
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
// Whether two blocks of `smem` bytes of dynamic shared memory fit one sm_90 SM (228 KB, 1 KB
// of it reserved per block).
constexpr bool two_blocks_fit_sm90(size_t smem) { return 2 * (smem + 1024) <= 228 * 1024; }
constexpr int kWgRows = 32;  // the weight gradient's row splits start at multiples (16-byte aligned Z^T chunks)

template <typename A, typename B>
constexpr A cmax(A a, B b) {
  return a > A(b) ? a : A(b);
}
template <typename A, typename B>
constexpr A cmin(A a, B b) {
  return a < A(b) ? a : A(b);
}

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
// THREADS (the block's threads), ...: eight at a time, first load(r, col) for all eight (independent loads, in
// flight together), then use(r, col, loaded) for each, col = column(c). A loop that loads and
// uses one element at a time waits a whole memory latency per element (64 a thread at BN =
// 64, KPAD = 128: twice that for a payload's code, then its scale), so `load` should only
// load. Where KPAD divides THREADS (KPAD <= 128) a thread's elements share one column, whose
// column(c) is formed once.
template <int BN, int KPAD, int THREADS = kThreads, typename Column, typename Load, typename Use>
__device__ __forceinline__ void for_block_elements(Column column, Load load, Use use) {
  constexpr int kPer = BN * KPAD / THREADS, kBatch = kPer < 8 ? kPer : 8;
  static_assert(kPer * THREADS == BN * KPAD && kPer % kBatch == 0, "elements split evenly");
  constexpr bool kOwnColumn = THREADS % KPAD == 0;
  const auto own = column(int(threadIdx.x % KPAD));  // (unused otherwise)
  auto column_of = [&](unsigned i) { return kOwnColumn ? own : column(int(i % KPAD)); };
  for (int j0 = 0; j0 < kPer; j0 += kBatch) {
    decltype(load(0, own)) loaded[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const unsigned i = threadIdx.x + unsigned(j0 + u) * THREADS;
      loaded[u] = load(int(i / KPAD), column_of(i));
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const unsigned i = threadIdx.x + unsigned(j0 + u) * THREADS;
      use(int(i / KPAD), column_of(i), loaded[u]);
    }
  }
}

// Quantize + pack `rows` rows of an fp32 z tile (shared memory, leading dim ld) into the
// payload with the shared codec functions. bf16 codes: one warp per row. Else one warp per
// (row, group), lanes across the group, four of them at a time: their absmax reductions'
// shuffles and their scales' divisions interleave (one group after another, a warp waited on
// each group's chain of five shuffles and two divisions in turn: 16 a warp at k = 128).
// WARPS: the block's warps.
template <int WARPS = kWarps>
__device__ void quantize_rows(const float* zs, int ld, int rows, int64_t row0, int64_t n,
                              int64_t k, int bits, int group, int scale_dtype, int stochastic,
                              uint32_t key, uint8_t* codes, void* scales) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int valid_rows = n - row0 < rows ? int(n - row0) : rows;
  if (bits == 16) {
    for (int r = warp; r < valid_rows; r += WARPS) {
      uint16_t* out = reinterpret_cast<uint16_t*>(codes) + (row0 + r) * k;
      for (int c = lane; c < k; c += 32) out[c] = float_to_bf16(zs[r * ld + c]);
    }
    return;
  }
  constexpr int kUnits = 4;  // (row, group) units a warp quantizes at once
  const int qmax = qmax_of(bits), per = 8 / bits, nbytes = group / per, groups = int(k) / group;
  const int64_t row_bytes = k * bits / 8;
  const int units = valid_rows * groups;
  for (int u0 = warp; u0 < units; u0 += WARPS * kUnits) {
    float m[kUnits], inv[kUnits];
#pragma unroll
    for (int t = 0; t < kUnits; ++t) {
      const int u = u0 + t * WARPS;  // (warp-uniform)
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
      const int u = u0 + t * WARPS, r = u / groups, gi = u % groups;
      if (u < units && lane == 0) store_float(scales, (row0 + r) * groups + gi, scale_dtype, s);  // non-finite shows
    }
#pragma unroll
    for (int t = 0; t < kUnits; ++t) {
      const int u = u0 + t * WARPS, r = u / groups, c0 = (u % groups) * group;
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

}  // namespace
}  // namespace cuda
}  // namespace resbm
