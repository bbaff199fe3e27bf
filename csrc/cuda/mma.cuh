// Tensor-core building blocks of the pass kernels (passes.cu): operand types,
// hi/lo operand splitting, split-term products, fragment loads from shared memory,
// the cp.async pipeline and 16-byte vector loads/stores, on top of the inline PTX of
// primitives.cuh. sm_80+ (mma.sync m16n8k16 bf16/f16 and m16n8k8 tf32); sm_90a adds wgmma.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16 / m16n8k8"),
// with g = lane / 4 (groupID) and t = lane % 4 (threadID_in_group):
//   m16n8k16 (16-bit): A reg i = rows g + 8*(i%2), cols 2t + 8*(i/2) + {0,1}
//                      B reg i = rows (k) 2t + 8*i + {0,1}, col (n) g
//   m16n8k8  (tf32):   A reg i = row g + 8*(i%2), col t + 4*(i/2)
//                      B reg i = row (k) t + 4*i, col (n) g
//   C/D (both):        reg i = row g + 8*(i/2), col 2t + (i%2)
// A "raw" operand is stored row-major [m][k]; B operands are stored [n][k]
// (k contiguous) unless the loader says otherwise. The lower 16 bits of a
// packed 16-bit pair hold the element with the smaller k index.
//
// Precision: bf16/fp16 inputs run on bf16/fp16 tensor cores with fp32
// accumulation. Dequantized zhat (times the RMSNorm factor in encode backward),
// not exactly representable in the input dtype, is rounded once to bf16 for bf16
// inputs (as a bf16 model rounds its activations, and as the Triton kernels do);
// for fp16 it is split as hi + lo, both fp16, and multiplied twice (hi*B +
// lo*B), which keeps ~16 mantissa bits (see dequant_parts); gamma-folded encoder
// weights are rounded once to the input dtype (as a 16-bit model rounds its
// normalised activations, and as the Triton kernels do), so the projection
// stays one product. fp32 inputs use 3xTF32 (a_hi*b_hi + a_hi*b_lo +
// a_lo*b_hi), ~fp32 accuracy: results match the float32 reference within fp32
// tolerances.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "primitives.cuh"
#include "resbm/codec.h"

namespace resbm {
namespace cuda {

// ---- operand traits ---------------------------------------------------------------

template <int DT>
struct Operand;

template <>
struct Operand<kFloat32> {
  using T = float;        // storage type of the inputs
  using E = uint32_t;     // one tf32 operand element
  static constexpr int KS = 8;  // mma k per instruction (m16n8k8)
  static const char* name() { return "fp32"; }
};

template <>
struct Operand<kFloat16> {
  using T = uint16_t;
  using E = uint16_t;
  static constexpr int KS = 16;  // m16n8k16
  static const char* name() { return "fp16"; }
};

template <>
struct Operand<kBFloat16> {
  using T = uint16_t;
  using E = uint16_t;
  static constexpr int KS = 16;
  static const char* name() { return "bf16"; }
};

// Operand parts of a dequantized value: bf16 one (rounded to bf16); fp16 two (hi + lo, so
// that values keep more precision than fp16's 11 bits); fp32 two (3xTF32).
__host__ __device__ constexpr int dequant_parts(int dtype) { return dtype == kBFloat16 ? 1 : 2; }

// ---- conversions and splits ---------------------------------------------------------

// fp32 value of a 16-bit operand element.
template <int DT>
__device__ __forceinline__ float e16_to_float(uint16_t h) {
  return DT == kFloat16 ? __half2float(__ushort_as_half(h))
                        : __bfloat162float(__ushort_as_bfloat16(h));
}

template <int DT>
__device__ __forceinline__ uint16_t float_to_e16(float v) {
  return DT == kFloat16 ? __half_as_ushort(__float2half_rn(v))
                        : __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// v = hi + lo (approximately) in the operand type of DT.
template <int DT>
__device__ __forceinline__ void split1(float v, typename Operand<DT>::E& hi,
                                       typename Operand<DT>::E& lo) {
  if constexpr (DT == kFloat32) {
    hi = to_tf32(v);
    lo = to_tf32(v - __uint_as_float(hi));
  } else {
    hi = float_to_e16<DT>(v);
    lo = float_to_e16<DT>(v - e16_to_float<DT>(hi));
  }
}

// Two 16-bit values (v0 at the lower k index) split into packed hi and lo pairs.
template <int DT>
__device__ __forceinline__ void split2(float v0, float v1, uint32_t& hi, uint32_t& lo) {
  uint16_t h0 = float_to_e16<DT>(v0), h1 = float_to_e16<DT>(v1);
  uint16_t l0 = float_to_e16<DT>(v0 - e16_to_float<DT>(h0));
  uint16_t l1 = float_to_e16<DT>(v1 - e16_to_float<DT>(h1));
  hi = uint32_t(h0) | (uint32_t(h1) << 16);
  lo = uint32_t(l0) | (uint32_t(l1) << 16);
}

__device__ __forceinline__ uint32_t pack16(uint16_t lo_k, uint16_t hi_k) {
  return uint32_t(lo_k) | (uint32_t(hi_k) << 16);
}

// ---- fragments ----------------------------------------------------------------------

struct FragA {
  uint32_t hi[4], lo[4];
};
struct FragB {
  uint32_t hi[2], lo[2];
};

// acc += A*B with the split terms the operands need (A_SPLIT / b_split: lo parts valid).
template <int DT, bool A_SPLIT>
__device__ __forceinline__ void mma_acc(float (&c)[4], const FragA& a, const FragB& b,
                                        bool b_split) {
  mma<DT>(c, a.hi, b.hi);
  if (b_split) mma<DT>(c, a.hi, b.lo);
  if (A_SPLIT) mma<DT>(c, a.lo, b.hi);
}

// ---- fragment loads -------------------------------------------------------------------

// A from an fp32 tile S[m][k], split into hi + lo of the operand type. With
// want_sq (fp32 inputs only) the squares of the loaded values are added to
// sq[0] (row g) and sq[1] (row g + 8): the RMS statistic of the same elements.
template <int DT>
__device__ __forceinline__ void load_a_f32(FragA& f, const float* s, int ld, int m0, int k0,
                                           int lane, bool want_sq, float (&sq)[2]) {
  const int g = lane >> 2, t = lane & 3;
  if constexpr (DT == kFloat32) {
    const float* p = s + (m0 + g) * ld + k0 + t;
    const float v[4] = {p[0], p[8 * ld], p[4], p[8 * ld + 4]};
#pragma unroll
    for (int i = 0; i < 4; ++i) split1<DT>(v[i], f.hi[i], f.lo[i]);
    if (want_sq) {
      sq[0] += v[0] * v[0] + v[2] * v[2];
      sq[1] += v[1] * v[1] + v[3] * v[3];
    }
  } else {
    const float* p = s + (m0 + g) * ld + k0 + 2 * t;
    const float2 v0 = *reinterpret_cast<const float2*>(p);
    const float2 v1 = *reinterpret_cast<const float2*>(p + 8 * ld);
    const float2 v2 = *reinterpret_cast<const float2*>(p + 8);
    const float2 v3 = *reinterpret_cast<const float2*>(p + 8 * ld + 8);
    split2<DT>(v0.x, v0.y, f.hi[0], f.lo[0]);
    split2<DT>(v1.x, v1.y, f.hi[1], f.lo[1]);
    split2<DT>(v2.x, v2.y, f.hi[2], f.lo[2]);
    split2<DT>(v3.x, v3.y, f.hi[3], f.lo[3]);
  }
}

// A from operand-typed hi/lo tiles Z[m][k] (rows 16-byte aligned; or a raw 16-bit input
// tile, exact as it is), one ldmatrix per part; lo is read only if `split`. Matrix q of the ldmatrix is rows m0 + 8 * (q % 2)..,
// columns k0 + (q / 2) * 16 bytes..: exactly A regs 0-3 (for tf32 too: 32-bit elements).
template <int DT>
__device__ __forceinline__ void load_a_op(FragA& f, const typename Operand<DT>::E* hi,
                                          const typename Operand<DT>::E* lo, int ld, int m0,
                                          int k0, int lane, bool split) {
  constexpr int KH = 16 / int(sizeof(typename Operand<DT>::E));  // elements per 16 bytes
  const int q = lane >> 3;
  const int o = (m0 + 8 * (q & 1) + (lane & 7)) * ld + k0 + (q >> 1) * KH;
  ldsm_x4(f.hi, hi + o);
  if (split) ldsm_x4(f.lo, lo + o);
}

// B fragments of the n tiles n0 (f0) and n0 + 8 (f1) from operand-typed tiles W[n][k]
// (k contiguous, rows 16-byte aligned), one ldmatrix per part; lo is read only if
// `split`. Matrix m of the ldmatrix is n rows n0 + 8 * (m / 2).., k columns k0 + (m % 2)
// * 16 bytes..: its 16-bit pairs (tf32: 32-bit elements) are exactly B regs 0 and 1.
template <int DT>
__device__ __forceinline__ void load_b_op_x2(FragB& f0, FragB& f1,
                                             const typename Operand<DT>::E* hi,
                                             const typename Operand<DT>::E* lo, int ld, int n0,
                                             int k0, int lane, bool split) {
  constexpr int KH = 16 / int(sizeof(typename Operand<DT>::E));  // elements per 16 bytes
  const int m = lane >> 3;
  const int o = (n0 + 8 * (m >> 1) + (lane & 7)) * ld + k0 + (m & 1) * KH;
  uint32_t v[4];
  ldsm_x4(v, hi + o);
  f0.hi[0] = v[0];
  f0.hi[1] = v[1];
  f1.hi[0] = v[2];
  f1.hi[1] = v[3];
  if (split) {
    ldsm_x4(v, lo + o);
    f0.lo[0] = v[0];
    f0.lo[1] = v[1];
    f1.lo[0] = v[2];
    f1.lo[1] = v[3];
  }
}

// B fragments of the n tiles n0 (f0) and n0 + 8 (f1) from a raw input tile S[k][n] (n
// contiguous: the row-major activations of the weight-gradient kernel; rows 16-byte
// aligned). 16-bit: one transposing ldmatrix, matrix q = k rows k0 + 8 * (q % 2)..,
// n columns n0 + 8 * (q / 2)..; fp32: loaded element by element and split into tf32 hi + lo.
template <int DT>
__device__ __forceinline__ void load_b_raw_kn_x2(FragB& f0, FragB& f1, const typename Operand<DT>::T* s,
                                                 int ld, int n0, int k0, int lane) {
  if constexpr (DT == kFloat32) {
    const int g = lane >> 2, t = lane & 3;
    const float* p = s + (k0 + t) * ld + n0 + g;
    split1<DT>(p[0], f0.hi[0], f0.lo[0]);
    split1<DT>(p[4 * ld], f0.hi[1], f0.lo[1]);
    split1<DT>(p[8], f1.hi[0], f1.lo[0]);
    split1<DT>(p[4 * ld + 8], f1.hi[1], f1.lo[1]);
  } else {
    const int q = lane >> 3;
    uint32_t v[4];
    ldsm_x4_trans(v, s + (k0 + 8 * (q & 1) + (lane & 7)) * ld + n0 + 8 * (q >> 1));
    f0.hi[0] = v[0];
    f0.hi[1] = v[1];
    f1.hi[0] = v[2];
    f1.hi[1] = v[3];
  }
}

// A from a raw 16-bit input tile S[k][m] (m contiguous: the activations of the weight
// gradient, its rows the products' k), one transposing ldmatrix: matrix q = k rows k0 + 8 *
// (q / 2).., m columns m0 + 8 * (q % 2)..: exactly A regs 0-3.
template <int DT>
__device__ __forceinline__ void load_a_raw_km(FragA& f, const typename Operand<DT>::T* s, int ld, int m0, int k0,
                                              int lane) {
  static_assert(DT != kFloat32, "16-bit inputs");
  const int q = lane >> 3;
  ldsm_x4_trans(f.hi, s + (k0 + 8 * (q >> 1) + (lane & 7)) * ld + m0 + 8 * (q & 1));
}

// ---- cp.async -------------------------------------------------------------------------

// A STAGES-deep cp.async pipeline over `blocks` blocks: issue(i) starts block i's copies
// into buffer i % STAGES, body(i, i % STAGES) uses them once they have landed. One commit
// group per block (empty past the end), so the wait count is a constant; block i + STAGES - 1
// loads into the buffer body(i - 1) read, which the barrier after each body has freed.
// ASYNC_READS: body reads the buffers with wgmma (the async proxy): each thread fences its
// landed copies for it before the barrier.
// DEFERRED_REFILL: body(i) may leave its own reads in flight (a wgmma group) until body(i + 1)
// has waited for them, so block i + STAGES - 1 is issued after body(i) instead of before it:
// STAGES - 2 blocks stay in flight during a body, and the caller waits for the last reads.
template <int STAGES, bool ASYNC_READS = false, bool DEFERRED_REFILL = false, typename Issue, typename Body>
__device__ __forceinline__ void cp_async_pipeline(int64_t blocks, Issue issue, Body body) {
  static_assert(!DEFERRED_REFILL || STAGES >= 3, "a deferred refill keeps a block in flight: three buffers at least");
  constexpr int kPending = DEFERRED_REFILL ? STAGES - 2 : STAGES - 1;  // groups after block i's
  auto refill = [&](int64_t i) {
    if (i + STAGES - 1 < blocks) issue(i + STAGES - 1);
    cp_async_commit();
  };
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < blocks) issue(int64_t(s));
    cp_async_commit();
  }
  for (int64_t i = 0; i < blocks; ++i) {
    if constexpr (!DEFERRED_REFILL) refill(i);
    cp_async_wait<kPending>();  // block i's group is complete
    if constexpr (ASYNC_READS) fence_proxy_async();
    __syncthreads();
    body(i, int(uint32_t(i) % uint32_t(STAGES)));  // (fewer than 2^32 blocks: a 32-bit modulo)
    __syncthreads();
    if constexpr (DEFERRED_REFILL) refill(i);  // into block i - 1's buffer, which body(i) waited for
  }
}

// ---- wgmma operands (sm_90a) ---------------------------------------------------------

// Shared-memory matrix descriptor of a k-major 16-bit wgmma operand (PTX ISA, "Matrix
// Descriptor"). Without swizzle the tile is made of core matrices of 8 rows x 16 bytes (128
// contiguous bytes), `lbo` bytes apart along k and `sbo` bytes apart along the rows. With
// the 128-byte swizzle (kSwizzle128) each row is 128 bytes of k, 16-byte chunk c of row r
// stored at chunk c ^ (r % 8), groups of 8 rows `sbo` (a multiple of 1024) bytes apart from a
// 1024-byte aligned start; `tile` may then sit 32, 64 or 96 bytes into the rows (the k steps
// of a 64-element row) and `lbo` is unused.
enum WgmmaSwizzle : uint64_t { kNoSwizzle = 0, kSwizzle128 = 1 };

__device__ __forceinline__ uint64_t wgmma_desc(const void* tile, uint32_t lbo, uint32_t sbo,
                                               WgmmaSwizzle swizzle = kNoSwizzle) {
  return uint64_t((smem_address(tile) >> 4) & 0x3FFF) | uint64_t((lbo >> 4) & 0x3FFF) << 16 |
         uint64_t((sbo >> 4) & 0x3FFF) << 32 | uint64_t(swizzle) << 62;
}

// ---- vector loads/stores of 8 consecutive elements (16-byte aligned) ---------------------

// Loads elements [i, i+8) of a row-major array of `dtype` as fp32.
__device__ __forceinline__ void load8(const void* p, int64_t i, int dtype, float (&v)[8]) {
  if (dtype == kFloat32) {
    const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
    const float4 a = q[0], b = q[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + i);
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint16_t lo = uint16_t(w[j] & 0xFFFFu), hi = uint16_t(w[j] >> 16);
      v[2 * j] = dtype == kFloat16 ? fp16_to_float(lo) : bf16_to_float(lo);
      v[2 * j + 1] = dtype == kFloat16 ? fp16_to_float(hi) : bf16_to_float(hi);
    }
  }
}

// (a, b) as two elements of the 16-bit `dtype` in one word (a in the low half: the element
// with the smaller index), rounded to nearest even by the paired conversion instruction: the
// codec's float_to_bf16 / float_to_fp16 to the bit for every non-NaN value (inf beyond the
// range, fp16 subnormals).
__device__ __forceinline__ uint32_t pack_pair16(int dtype, float a, float b) {
  if (dtype == kFloat16) {
    const __half2 h = __floats2half2_rn(a, b);
    return pack16(__half_as_ushort(__low2half(h)), __half_as_ushort(__high2half(h)));
  }
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return pack16(__bfloat16_as_ushort(__low2bfloat16(h)), __bfloat16_as_ushort(__high2bfloat16(h)));
}

// Stores v as elements [i, i+8) of `dtype` (16-bit ones through pack_pair16).
__device__ __forceinline__ void store8(void* p, int64_t i, int dtype, const float (&v)[8]) {
  if (dtype == kFloat32) {
    float4* q = reinterpret_cast<float4*>(static_cast<float*>(p) + i);
    q[0] = make_float4(v[0], v[1], v[2], v[3]);
    q[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) w[j] = pack_pair16(dtype, v[2 * j], v[2 * j + 1]);
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(p) + i) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

}  // namespace cuda
}  // namespace resbm
