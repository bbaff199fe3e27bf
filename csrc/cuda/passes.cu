// libresbm_cuda: the four fused ResBM passes and the weight-gradient reduction
// (same math as resbm_kernels/backends/reference.py and the Triton backend).
//
// Three kernel families, each a template over the input dtype DT and the
// padded bottleneck width KPAD (16, 32, 64, 128 or 256 >= k):
//
//  project_quantize_kernel  (encode forward, decode backward)
//      One CTA of 128 threads per BN rows (BN = 64, or 32 when KPAD = 256).
//      Streams the (BN, d) input through shared memory in 128-byte-wide d
//      tiles (16-byte cp.async, double buffered), multiplies each tile with the
//      matching (KPAD, tile) weight tile on tensor cores (mma.sync; fp32
//      accumulators for all k columns stay in registers), gathers the row sums
//      of squares of the folded RMSNorm from the same A fragments, then scales,
//      adds the identity path x[:, :k], and quantizes + packs through the shared
//      codec functions of resbm/codec.h (bit-exact with the reference given z).
//  dequant_project_kernel   (decode forward, encode backward)
//      One CTA per BN rows: dequantizes its (BN, k) payload rows into shared
//      memory once (shared codec functions), then walks d in BD2-column tiles:
//      tensor-core product with the (BD2, KPAD) weight tile, identity pad,
//      residual, and the RMSNorm backward terms, written with 16-byte stores.
//      Encode backward through RMSNorm first re-runs the projection loop of
//      the encoder over x for r = 1/rms(x) and s = x (gamma W)^T (as Triton).
//  weight_grad_kernel       (grad W_d, grad W_e)
//      out[split][c][j] = sum_rows rscale[r] * zhat[r][c] * a[r][j]: a separate
//      pass over the big input; grid (d tiles, row splits), deterministic
//      per-split fp32 partials summed by the caller (no atomics).
//
// Precision (see mma.cuh): bf16/fp16 on 16-bit tensor cores with fp32
// accumulation and hi/lo splitting of the operands that are not exact in the
// input dtype; fp32 inputs use 3xTF32. Requirements checked by the C API:
// d and k multiples of 16, k <= 256, k <= d, 16-byte aligned activations.
// Every launch goes on the caller's stream; nothing here synchronises.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

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

template <typename A, typename B>
constexpr A cmax(A a, B b) {
  return a > A(b) ? a : A(b);
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
  // projection (d streamed in tiles of 128 bytes per row)
  static constexpr int BD = 128 / int(sizeof(T));
  static constexpr int XLD = BD + 16 / int(sizeof(T));  // +16 bytes: conflict-free fragments
  static constexpr int WLD = BD + 16 / int(sizeof(E));
  static constexpr size_t X_BYTES = size_t(2) * BN * XLD * sizeof(T);
  static constexpr size_t W_BYTES = size_t(KPAD) * WLD * sizeof(E);  // one of hi / lo
  static constexpr size_t PROJ_BYTES = X_BYTES + 2 * W_BYTES;
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
  static constexpr size_t DQ_REGION = cmax(PROJ_BYTES, W2_PARTS * W2_BYTES + H_BYTES);

  static constexpr size_t PQ_SMEM = cmax(PROJ_BYTES, Z_BYTES);
  static constexpr size_t DQ_SMEM = Z_BYTES + SCALARS_BYTES + DQ_REGION;

  static_assert(NT >= 1 && NT <= 16 && NT2 >= 1, "bad tile configuration");
  static_assert(BD % KS == 0 && KPAD % KS == 0, "bad k step");
  static_assert(X_BYTES % 16 == 0 && W_BYTES % 16 == 0 && Z_BYTES % 16 == 0 &&
                    SCALARS_BYTES % 16 == 0 && W2_BYTES % 16 == 0,
                "shared-memory regions must stay 16-byte aligned");
};

// Weight-gradient kernel: output tile (KPAD, BDW) per CTA, rows reduced in chunks of BR.
template <int DT, int KPAD>
struct WgCfg {
  using Op = Operand<DT>;
  using T = typename Op::T;
  using E = typename Op::E;
  static constexpr int KS = Op::KS;
  static constexpr int WM = KPAD / 16 < kWarps ? KPAD / 16 : kWarps;
  static constexpr int WN = kWarps / WM;
  static constexpr int MR = KPAD / WM;  // c rows per warp
  static constexpr int MT = MR / 16;
  static constexpr int BDW = KPAD >= 256 ? 32 : 64;
  static constexpr int NW = BDW / WN;  // d columns per warp
  static constexpr int NT = NW / 8;    // acc = 4*MT*NT = KPAD*BDW/128 <= 64 regs
  static constexpr int BR = 32;
  static constexpr int XLD = BDW + 16 / int(sizeof(T));
  static constexpr int ZTLD = BR + 16 / int(sizeof(E));
  static constexpr size_t X_BYTES = size_t(BR) * XLD * sizeof(T);
  static constexpr size_t ZT_BYTES = size_t(KPAD) * ZTLD * sizeof(E);
  static constexpr size_t SMEM = X_BYTES + 2 * ZT_BYTES;
  static_assert(MT >= 1 && NT >= 1 && BR % KS == 0, "bad tile configuration");
  static_assert(X_BYTES % 16 == 0 && ZT_BYTES % 16 == 0, "16-byte aligned regions");
};

// ---- shared device helpers --------------------------------------------------------------

__device__ __forceinline__ float inv_rms(float sumsq, int64_t d, float eps) {
  return div_rn(1.0f, __fsqrt_rn(add_rn(div_rn(sumsq, float(d)), eps)));
}

__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
  v += __shfl_xor_sync(0xFFFFFFFFu, v, 2);
  return v;
}

// zhat[row][c] from the payload (codes + scales), with the shared codec functions.
__device__ __forceinline__ float dequant_at(const uint8_t* codes, const void* scales, int bits,
                                            int group, int scale_dtype, int64_t k, int64_t row,
                                            int c) {
  if (bits == 16) return bf16_to_float(reinterpret_cast<const uint16_t*>(codes)[row * k + c]);
  const int per = 8 / bits;
  const int q = unpack_field(codes[row * (k * bits / 8) + c / per], c % per, bits);
  return dequantize_value(q, load_float(scales, row * (k / group) + c / group, scale_dtype));
}

// Quantize + pack `rows` rows of an fp32 z tile (shared memory, leading dim ld)
// into the payload: one warp per row, lanes across each group (shared codec).
__device__ void quantize_rows(const float* zs, int ld, int rows, int64_t row0, int64_t n,
                              int64_t k, int bits, int group, int scale_dtype, int stochastic,
                              uint32_t key, uint8_t* codes, void* scales) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r = warp; r < rows; r += kWarps) {
    const int64_t grow = row0 + r;
    if (grow >= n) break;
    const float* z = zs + r * ld;
    if (bits == 16) {
      uint16_t* out = reinterpret_cast<uint16_t*>(codes) + grow * k;
      for (int c = lane; c < k; c += 32) out[c] = float_to_bf16(z[c]);
      continue;
    }
    const int qmax = qmax_of(bits), per = 8 / bits, nbytes = group / per;
    const int64_t groups = k / group, row_bytes = k * bits / 8;
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int c0 = int(gi) * group;
      float m = 0.0f;
      for (int j = lane; j < group; j += 32) m = absmax_update(m, z[c0 + j]);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1)
        m = absmax_update(m, __shfl_xor_sync(0xFFFFFFFFu, m, off));
      const float s = group_scale(m, qmax, scale_dtype);
      if (lane == 0) store_float(scales, grow * groups + gi, scale_dtype, s);  // non-finite shows
      const float inv = inv_scale(s);
      uint8_t* out = codes + grow * row_bytes + gi * nbytes;
      for (int b = lane; b < nbytes; b += 32) {
        uint8_t byte = 0;
        for (int j = 0; j < per; ++j) {
          const int c = c0 + b * per + j;
          const float u = stochastic ? uniform(uint32_t(grow * k + c), key) : 0.0f;
          byte |= pack_field(quantize_value(z[c], inv, qmax, stochastic != 0, u), j, bits);
        }
        out[b] = byte;
      }
    }
  }
}

// The projection loop shared by project_quantize and the RMSNorm pre-pass of
// dequant_project: acc (BN, KPAD) += a[rows] @ B where B(d index dd, c) =
// w[c*w_sc + dd*w_sd] (* gamma[dd]); optionally the rows' sums of squares.
// Uses PROJ_BYTES of `smem` and ends with a barrier (smem free again).
template <int DT, int KPAD>
__device__ __forceinline__ void project_loop(const typename Operand<DT>::T* __restrict__ a,
                                             int64_t n, int64_t d, int64_t k, int64_t row0,
                                             const typename Operand<DT>::T* __restrict__ w,
                                             int64_t w_sc, int64_t w_sd,
                                             const typename Operand<DT>::T* __restrict__ gamma,
                                             bool want_sumsq, unsigned char* smem,
                                             float (&acc)[RowCfg<DT, KPAD>::NT][4],
                                             float (&sumsq)[2]) {
  using C = RowCfg<DT, KPAD>;
  using T = typename C::T;
  using E = typename C::E;
  T* xs = reinterpret_cast<T*>(smem);  // [2][BN][XLD]
  E* whi = reinterpret_cast<E*>(smem + C::X_BYTES);  // [KPAD][WLD]
  E* wlo = reinterpret_cast<E*>(smem + C::X_BYTES + C::W_BYTES);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % C::WM, wn = warp / C::WM;
  const bool b_split = DT == kFloat32 || gamma != nullptr;
  constexpr int VEC = 16 / int(sizeof(T));  // elements per 16-byte chunk
  constexpr int CHUNKS = C::BD / VEC;       // chunks per tile row
  const int64_t tiles = (d + C::BD - 1) / C::BD;

  auto issue = [&](int64_t tile) {
    T* dst = xs + (tile & 1) * (C::BN * C::XLD);
    const int64_t d0 = tile * C::BD;
    for (int i = tid; i < C::BN * CHUNKS; i += kThreads) {
      const int r = i / CHUNKS, ch = i % CHUNKS;
      const int64_t grow = row0 + r, col = d0 + ch * VEC;
      const bool ok = grow < n && col < d;  // d % 16 == 0: chunks are all in or all out
      cp_async16(dst + r * C::XLD + ch * VEC, ok ? a + grow * d + col : a, ok ? 16 : 0);
    }
    cp_async_commit();
  };

  issue(0);
  for (int64_t tile = 0; tile < tiles; ++tile) {
    if (tile + 1 < tiles) issue(tile + 1);
    const int64_t d0 = tile * C::BD;
    // weight tile, operand-typed: whi/wlo[c][dd] = split(w(c, d0+dd) * gamma)
    for (int i = tid; i < KPAD * C::BD; i += kThreads) {
      int c, dd;
      if (w_sd == 1) {
        c = i / C::BD;
        dd = i % C::BD;
      } else {
        c = i % KPAD;
        dd = i / KPAD;
      }
      const int64_t gd = d0 + dd;
      float v = 0.0f;
      if (c < k && gd < d) {
        v = load_float(w, c * w_sc + gd * w_sd, DT);
        if (gamma != nullptr) v = v * load_float(gamma, gd, DT);
      }
      E hi, lo;
      split1<DT>(v, hi, lo);
      whi[c * C::WLD + dd] = hi;
      if (b_split) wlo[c * C::WLD + dd] = lo;
    }
    if (tile + 1 < tiles) {
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* xt = xs + (tile & 1) * (C::BN * C::XLD);
#pragma unroll
    for (int ks = 0; ks < C::BD; ks += C::KS) {
      FragA fa;
      if constexpr (DT == kFloat32) {
        load_a_f32<DT>(fa, xt, C::XLD, wm * 16, ks, lane, want_sumsq, sumsq);
      } else {
        load_a_raw16(fa, xt, C::XLD, wm * 16, ks, lane);
        if (want_sumsq) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {  // reg i holds row g + 8*(i%2)
            const float v0 = e16_to_float<DT>(uint16_t(fa.hi[i] & 0xFFFFu));
            const float v1 = e16_to_float<DT>(uint16_t(fa.hi[i] >> 16));
            sumsq[i & 1] += v0 * v0 + v1 * v1;
          }
        }
      }
#pragma unroll
      for (int j = 0; j < C::NT; ++j) {
        FragB fb;
        load_b_op<DT>(fb, whi, wlo, C::WLD, wn * C::WC + j * 8, ks, lane, b_split);
        mma_acc<DT, DT == kFloat32>(acc[j], fa, fb, b_split);
      }
    }
    __syncthreads();
  }
}

// ---- kernels ------------------------------------------------------------------------------

struct PQArgs {
  const void* a;      // (n, d) activations (x or grad_h), row-major, 16-byte aligned
  const void* w;      // B(dd, c) = w[c * w_sc + dd * w_sd]
  const void* gamma;  // (d,) RMSNorm weight or null
  int64_t n, d, k, w_sc, w_sd;
  float eps;
  int bits, group, scale_dtype, stochastic;
  uint32_t key;
  uint8_t* codes;
  void* scales;
};

template <int DT, int KPAD>
__global__ void __launch_bounds__(kThreads, 1) project_quantize_kernel(const PQArgs p) {
  using C = RowCfg<DT, KPAD>;
  using T = typename C::T;
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp % C::WM, wn = warp / C::WM, g = lane >> 2, t = lane & 3;
  const int64_t row0 = int64_t(blockIdx.x) * C::BN;
  const T* a = static_cast<const T*>(p.a);
  const bool norm = p.gamma != nullptr;

  float acc[C::NT][4];
#pragma unroll
  for (int j = 0; j < C::NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  float sumsq[2] = {0.0f, 0.0f};
  project_loop<DT, KPAD>(a, p.n, p.d, p.k, row0, static_cast<const T*>(p.w), p.w_sc, p.w_sd,
                         static_cast<const T*>(p.gamma), norm, smem, acc, sumsq);

  float rr[2] = {1.0f, 1.0f};
  if (norm) {
    rr[0] = inv_rms(quad_sum(sumsq[0]), p.d, p.eps);
    rr[1] = inv_rms(quad_sum(sumsq[1]), p.d, p.eps);
  }
  // z = r * acc + a[:, :k] into shared memory (fp32, [BN][ZLD])
  float* zs = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int j = 0; j < C::NT; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wm * 16 + g + 8 * h, col = wn * C::WC + j * 8 + 2 * t;
      const int64_t grow = row0 + r;
      float z0 = acc[j][2 * h], z1 = acc[j][2 * h + 1];
      if (norm) {
        z0 = z0 * rr[h];
        z1 = z1 * rr[h];
      }
      if (grow < p.n && col < p.k) {  // k even: col + 1 < k too
        z0 = z0 + load_float(a, grow * p.d + col, DT);
        z1 = z1 + load_float(a, grow * p.d + col + 1, DT);
      }
      *reinterpret_cast<float2*>(zs + r * C::ZLD + col) = make_float2(z0, z1);
    }
  }
  __syncthreads();
  quantize_rows(zs, C::ZLD, C::BN, row0, p.n, p.k, p.bits, p.group, p.scale_dtype, p.stochastic,
                p.key, p.codes, p.scales);
}

struct DQArgs {
  const uint8_t* codes;
  const void* scales;
  int bits, group, scale_dtype;
  const void* w;  // B(dd, c) = w[dd * w_sn + c * w_sc]
  int64_t w_sn, w_sc;
  const void* x;      // encode backward through RMSNorm: x (n, d), gamma (d,) (else null)
  const void* gamma;
  float eps;
  const void* residual;  // (n, d) of out_dtype or null
  void* out;             // (n, d) of out_dtype
  int out_dtype;
  float* rscale;         // (n,) r = 1/rms(x) when gamma is set (may be null)
  int64_t n, d, k;
};

template <int DT, int KPAD>
__global__ void __launch_bounds__(kThreads, 1) dequant_project_kernel(const DQArgs p) {
  using C = RowCfg<DT, KPAD>;
  using T = typename C::T;
  using E = typename C::E;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % C::WM, wn = warp / C::WM, g = lane >> 2, t = lane & 3;
  const int64_t row0 = int64_t(blockIdx.x) * C::BN;
  const int64_t n = p.n, d = p.d, k = p.k;

  float* zf = reinterpret_cast<float*>(smem);  // [BN][ZLD] dequantized rows, 0 beyond k / n
  float* row_r = zf + C::BN * C::ZLD;          // [BN]
  float* row_alpha = row_r + C::BN;            // [BN]
  float* dotp = row_alpha + C::BN;             // [WN][BN]
  unsigned char* region = smem + C::Z_BYTES + C::SCALARS_BYTES;
  E* w2hi = reinterpret_cast<E*>(region);  // [BD2][W2LD]
  E* w2lo = reinterpret_cast<E*>(region + C::W2_BYTES);
  float* hs = reinterpret_cast<float*>(region + C::W2_PARTS * C::W2_BYTES);  // [BN][HLD]

  for (int i = tid; i < C::BN * KPAD; i += kThreads) {
    const int r = i / KPAD, c = i % KPAD;
    const int64_t grow = row0 + r;
    zf[r * C::ZLD + c] = (grow < n && c < k) ? dequant_at(p.codes, p.scales, p.bits, p.group,
                                                          p.scale_dtype, k, grow, c)
                                             : 0.0f;
  }
  __syncthreads();

  const bool norm = p.gamma != nullptr;
  const T* x = static_cast<const T*>(p.x);
  const T* gamma = static_cast<const T*>(p.gamma);
  if (norm) {
    // s = x (gamma W)^T and sum(x^2) for these rows (the encoder's projection)
    float acc[C::NT][4];
#pragma unroll
    for (int j = 0; j < C::NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    float sumsq[2] = {0.0f, 0.0f};
    project_loop<DT, KPAD>(x, n, d, k, row0, static_cast<const T*>(p.w), p.w_sc, p.w_sn, gamma,
                           true, region, acc, sumsq);
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
      if (p.rscale != nullptr && row0 + tid < n) p.rscale[row0 + tid] = r;
    }
    __syncthreads();
  }

  constexpr bool kWSplit = DT == kFloat32;
  constexpr int CH = C::BD2 / 8;  // 8-column chunks per output tile row
  const T* w = static_cast<const T*>(p.w);
  for (int64_t d0 = 0; d0 < d; d0 += C::BD2) {
    // weight tile, operand-typed: w2[dd][c] = w(d0 + dd, c)
    for (int i = tid; i < C::BD2 * KPAD; i += kThreads) {
      int dd, c;
      if (p.w_sc == 1) {
        dd = i / KPAD;
        c = i % KPAD;
      } else {
        c = i / C::BD2;
        dd = i % C::BD2;
      }
      const int64_t gd = d0 + dd;
      const float v = (c < k && gd < d) ? load_float(w, gd * p.w_sn + c * p.w_sc, DT) : 0.0f;
      if constexpr (kWSplit) {
        E hi, lo;
        split1<DT>(v, hi, lo);
        w2hi[dd * C::W2LD + c] = hi;
        w2lo[dd * C::W2LD + c] = lo;
      } else {
        w2hi[dd * C::W2LD + c] = to_operand<DT>(v);  // exact: w is already in this dtype
      }
    }
    __syncthreads();
    float acc[C::NT2][4];
#pragma unroll
    for (int j = 0; j < C::NT2; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    float no_sq[2] = {0.0f, 0.0f};
#pragma unroll 2
    for (int ks = 0; ks < KPAD; ks += C::KS) {
      FragA fa;
      load_a_f32<DT>(fa, zf, C::ZLD, wm * 16, ks, lane, false, no_sq);
#pragma unroll
      for (int j = 0; j < C::NT2; ++j) {
        FragB fb;
        load_b_op<DT>(fb, w2hi, w2lo, C::W2LD, wn * C::NC2 + j * 8, ks, lane, kWSplit);
        mma_acc<DT, true>(acc[j], fa, fb, kWSplit);
      }
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
    __syncthreads();
    for (int i = tid; i < C::BN * CH; i += kThreads) {
      const int r = i / CH, cc = (i % CH) * 8;
      const int64_t grow = row0 + r, gcol = d0 + cc;
      if (grow >= n || gcol >= d) continue;  // d % 16 == 0: chunks are all in or all out
      float v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = hs[r * C::HLD + cc + e];
      if (norm) {
        float gm[8], xv[8];
        load8(gamma, gcol, DT, gm);
        load8(x, grow * d + gcol, DT, xv);
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
    __syncthreads();
  }
}

struct WGArgs {
  const void* a;  // (n, d) activations, 16-byte aligned
  const uint8_t* codes;
  const void* scales;
  int bits, group, scale_dtype;
  const float* rscale;  // (n,) or null
  float* out;           // out[s * out_ss + c * out_sc + j * out_sd]
  int64_t out_ss, out_sc, out_sd;
  int64_t n, d, k, rows_per_split;
};

template <int DT, int KPAD>
__global__ void __launch_bounds__(kThreads, 1) weight_grad_kernel(const WGArgs p) {
  using C = WgCfg<DT, KPAD>;
  using T = typename C::T;
  using E = typename C::E;
  extern __shared__ __align__(16) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);                     // [BR][XLD]
  E* zhi = reinterpret_cast<E*>(smem + C::X_BYTES);       // [KPAD][ZTLD]  (zhat * rscale)^T
  E* zlo = reinterpret_cast<E*>(smem + C::X_BYTES + C::ZT_BYTES);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % C::WM, wn = warp / C::WM, g = lane >> 2, t = lane & 3;
  const int64_t split = blockIdx.y, d0 = int64_t(blockIdx.x) * C::BDW;
  const int64_t start = split * p.rows_per_split;
  const int64_t end = start + p.rows_per_split < p.n ? start + p.rows_per_split : p.n;
  const T* a = static_cast<const T*>(p.a);
  constexpr int VEC = 16 / int(sizeof(T));
  constexpr int CHUNKS = C::BDW / VEC;

  float acc[C::MT][C::NT][4];
#pragma unroll
  for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < C::NT; ++nt)
      acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.0f;

  for (int64_t r0 = start; r0 < end; r0 += C::BR) {
    for (int i = tid; i < C::BR * CHUNKS; i += kThreads) {
      const int r = i / CHUNKS, ch = i % CHUNKS;
      const int64_t grow = r0 + r, col = d0 + ch * VEC;
      const bool ok = grow < end && col < p.d;
      cp_async16(xs + r * C::XLD + ch * VEC, ok ? a + grow * p.d + col : a, ok ? 16 : 0);
    }
    cp_async_commit();
    for (int i = tid; i < KPAD * C::BR; i += kThreads) {
      const int c = i % KPAD, rr = i / KPAD;
      const int64_t grow = r0 + rr;
      float v = 0.0f;
      if (grow < end && c < p.k) {
        v = dequant_at(p.codes, p.scales, p.bits, p.group, p.scale_dtype, p.k, grow, c);
        if (p.rscale != nullptr) v = v * p.rscale[grow];
      }
      split1<DT>(v, zhi[c * C::ZTLD + rr], zlo[c * C::ZTLD + rr]);
    }
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < C::BR; ks += C::KS) {
      FragA fa[C::MT];
#pragma unroll
      for (int mt = 0; mt < C::MT; ++mt)
        load_a_op<DT>(fa[mt], zhi, zlo, C::ZTLD, wm * C::MR + mt * 16, ks, lane);
#pragma unroll
      for (int nt = 0; nt < C::NT; ++nt) {
        FragB fb;
        load_b_raw_kn<DT>(fb, xs, C::XLD, wn * C::NW + nt * 8, ks, lane);
#pragma unroll
        for (int mt = 0; mt < C::MT; ++mt) mma_acc<DT, true>(acc[mt][nt], fa[mt], fb, DT == kFloat32);
      }
    }
    __syncthreads();
  }

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

// ---- launch helpers ------------------------------------------------------------------------

// Opt into more than 48 KiB of dynamic shared memory when a kernel needs it.
int prepare(const char* fn, const char* kernel, const void* func, size_t smem) {
  if (smem <= kDefaultSmem) return RESBM_OK;
  cudaError_t e = cudaFuncSetAttribute(func, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (e != cudaSuccess)
    return fail(RESBM_ERR_CUDA, fn, "%s: cannot use %zu bytes of shared memory: %s", kernel, smem,
                cudaGetErrorString(e));
  return RESBM_OK;
}

template <int DT, int KPAD>
int launch_pq(const char* fn, const PQArgs& p, cudaStream_t stream) {
  using C = RowCfg<DT, KPAD>;
  char name[80];
  std::snprintf(name, sizeof name, "project_quantize_kernel<%s,%d>", Operand<DT>::name(), KPAD);
  const void* func = reinterpret_cast<const void*>(&project_quantize_kernel<DT, KPAD>);
  int rc = prepare(fn, name, func, C::PQ_SMEM);
  if (rc != RESBM_OK) return rc;
  const int64_t blocks = (p.n + C::BN - 1) / C::BN;
  project_quantize_kernel<DT, KPAD><<<unsigned(blocks), kThreads, C::PQ_SMEM, stream>>>(p);
  return launch_status(fn, name);
}

template <int DT, int KPAD>
int launch_dq(const char* fn, const DQArgs& p, cudaStream_t stream) {
  using C = RowCfg<DT, KPAD>;
  char name[80];
  std::snprintf(name, sizeof name, "dequant_project_kernel<%s,%d>", Operand<DT>::name(), KPAD);
  const void* func = reinterpret_cast<const void*>(&dequant_project_kernel<DT, KPAD>);
  int rc = prepare(fn, name, func, C::DQ_SMEM);
  if (rc != RESBM_OK) return rc;
  const int64_t blocks = (p.n + C::BN - 1) / C::BN;
  dequant_project_kernel<DT, KPAD><<<unsigned(blocks), kThreads, C::DQ_SMEM, stream>>>(p);
  return launch_status(fn, name);
}

template <int DT, int KPAD>
int launch_wg(const char* fn, const WGArgs& p, int splits, cudaStream_t stream) {
  using C = WgCfg<DT, KPAD>;
  char name[80];
  std::snprintf(name, sizeof name, "weight_grad_kernel<%s,%d>", Operand<DT>::name(), KPAD);
  const void* func = reinterpret_cast<const void*>(&weight_grad_kernel<DT, KPAD>);
  int rc = prepare(fn, name, func, C::SMEM);
  if (rc != RESBM_OK) return rc;
  const dim3 grid(unsigned((p.d + C::BDW - 1) / C::BDW), unsigned(splits));
  weight_grad_kernel<DT, KPAD><<<grid, kThreads, C::SMEM, stream>>>(p);
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

#define RESBM_TRY(expr)               \
  do {                                \
    const int rc_ = (expr);           \
    if (rc_ != RESBM_OK) return rc_;  \
  } while (0)

}  // namespace
}  // namespace cuda
}  // namespace resbm

using namespace resbm::cuda;
using resbm::dtype_bytes;
using resbm::kBFloat16;
using resbm::kFloat16;
using resbm::kFloat32;

extern "C" {

int resbm_cuda_encode_forward(const void* x, int dtype, int64_t n, int64_t d, int64_t k,
                              const void* w_e, const void* norm_weight, float eps, int bits,
                              int group, int scale_dtype, int stochastic, uint32_t key,
                              uint8_t* codes, void* scales, void* stream) {
  const char* fn = "resbm_cuda_encode_forward";
  RESBM_TRY(check_dims(fn, n, d, k));
  RESBM_TRY(check_dtype(fn, "dtype", dtype));
  RESBM_TRY(resbm::check_args(fn, "x", x, dtype, n, k, bits, group, scale_dtype, codes, scales,
                              g_error, sizeof g_error));
  if (n == 0) return RESBM_OK;
  RESBM_TRY(check_ptr(fn, "x", x, 16, true));
  RESBM_TRY(check_ptr(fn, "w_e", w_e, dtype_bytes(dtype), true));
  RESBM_TRY(check_ptr(fn, "norm_weight", norm_weight, dtype_bytes(dtype), false));
  PQArgs p{x, w_e, norm_weight, n, d, k, /*w_sc=*/d, /*w_sd=*/1, eps, bits, group,
           scale_dtype, stochastic, key, codes, scales};
  RESBM_DISPATCH(launch_pq, dtype, k, fn, p, static_cast<cudaStream_t>(stream));
}

int resbm_cuda_decode_backward(const void* grad_h, int dtype, int64_t n, int64_t d, int64_t k,
                               const void* w_d, int bits, int group, int scale_dtype,
                               int stochastic, uint32_t key, uint8_t* codes, void* scales,
                               void* stream) {
  const char* fn = "resbm_cuda_decode_backward";
  RESBM_TRY(check_dims(fn, n, d, k));
  RESBM_TRY(check_dtype(fn, "dtype", dtype));
  RESBM_TRY(resbm::check_args(fn, "grad_h", grad_h, dtype, n, k, bits, group, scale_dtype, codes,
                              scales, g_error, sizeof g_error));
  if (n == 0) return RESBM_OK;
  RESBM_TRY(check_ptr(fn, "grad_h", grad_h, 16, true));
  RESBM_TRY(check_ptr(fn, "w_d", w_d, dtype_bytes(dtype), true));
  // g_z = grad_h @ w_d (+ identity): B(dd, c) = w_d[dd * k + c]
  PQArgs p{grad_h, w_d, nullptr, n, d, k, /*w_sc=*/1, /*w_sd=*/k, 0.0f, bits, group,
           scale_dtype, stochastic, key, codes, scales};
  RESBM_DISPATCH(launch_pq, dtype, k, fn, p, static_cast<cudaStream_t>(stream));
}

int resbm_cuda_decode_forward(const uint8_t* codes, const void* scales, int64_t n, int64_t d,
                              int64_t k, int bits, int group, int scale_dtype, const void* w_d,
                              int w_dtype, const void* residual, void* out, int out_dtype,
                              void* stream) {
  const char* fn = "resbm_cuda_decode_forward";
  RESBM_TRY(check_dims(fn, n, d, k));
  RESBM_TRY(check_dtype(fn, "w_dtype", w_dtype));
  RESBM_TRY(resbm::check_args(fn, "out", out, out_dtype, n, k, bits, group, scale_dtype, codes,
                              scales, g_error, sizeof g_error));
  if (n == 0) return RESBM_OK;
  RESBM_TRY(check_ptr(fn, "out", out, 16, true));
  RESBM_TRY(check_ptr(fn, "residual", residual, 16, false));
  RESBM_TRY(check_ptr(fn, "w_d", w_d, dtype_bytes(w_dtype), true));
  // h = zhat @ w_d^T: B(dd, c) = w_d[dd * k + c]
  DQArgs p{codes, scales, bits, group, scale_dtype, w_d, /*w_sn=*/k, /*w_sc=*/1,
           nullptr, nullptr, 0.0f, residual, out, out_dtype, nullptr, n, d, k};
  RESBM_DISPATCH(launch_dq, w_dtype, k, fn, p, static_cast<cudaStream_t>(stream));
}

int resbm_cuda_encode_backward(const uint8_t* codes, const void* scales, int64_t n, int64_t d,
                               int64_t k, int bits, int group, int scale_dtype, const void* x,
                               int dtype, const void* w_e, const void* norm_weight, float eps,
                               void* grad_x, float* rscale, void* stream) {
  const char* fn = "resbm_cuda_encode_backward";
  RESBM_TRY(check_dims(fn, n, d, k));
  RESBM_TRY(resbm::check_args(fn, "grad_x", grad_x, dtype, n, k, bits, group, scale_dtype, codes,
                              scales, g_error, sizeof g_error));
  if (n == 0) return RESBM_OK;
  RESBM_TRY(check_ptr(fn, "grad_x", grad_x, 16, true));
  RESBM_TRY(check_ptr(fn, "w_e", w_e, dtype_bytes(dtype), true));
  if (norm_weight != nullptr) {
    RESBM_TRY(check_ptr(fn, "x", x, 16, true));
    RESBM_TRY(check_ptr(fn, "norm_weight", norm_weight, 16, true));
    RESBM_TRY(check_ptr(fn, "rscale", rscale, 4, false));
  }
  // grad_x = g_z @ w_e (+ identity, + RMSNorm backward): B(dd, c) = w_e[c * d + dd]
  DQArgs p{codes, scales, bits, group, scale_dtype, w_e, /*w_sn=*/1, /*w_sc=*/d,
           norm_weight ? x : nullptr, norm_weight, eps, nullptr, grad_x, dtype,
           norm_weight ? rscale : nullptr, n, d, k};
  RESBM_DISPATCH(launch_dq, dtype, k, fn, p, static_cast<cudaStream_t>(stream));
}

int resbm_cuda_weight_grad(const void* a, int dtype, int64_t n, int64_t d, int64_t k,
                           const uint8_t* codes, const void* scales, int bits, int group,
                           int scale_dtype, const float* rscale, int splits, int transpose,
                           float* partial, void* stream) {
  const char* fn = "resbm_cuda_weight_grad";
  RESBM_TRY(check_dims(fn, n, d, k));
  RESBM_TRY(check_dtype(fn, "dtype", dtype));
  RESBM_TRY(resbm::check_args(fn, "a", a, dtype, n, k, bits, group, scale_dtype, codes, scales,
                              g_error, sizeof g_error));
  if (splits < 1 || splits > 65535)
    return fail(RESBM_ERR_ARG, fn, "bad splits=%d (1..65535)", splits);
  RESBM_TRY(check_ptr(fn, "partial", partial, 4, true));
  RESBM_TRY(check_ptr(fn, "a", a, 16, n > 0));
  RESBM_TRY(check_ptr(fn, "rscale", rscale, 4, false));
  // every split writes its whole (k, d) partial, zeros when it has no rows
  const int64_t rows_per_split = (n + splits - 1) / splits;
  WGArgs p{a, codes, scales, bits, group, scale_dtype, rscale, partial, d * k,
           transpose ? 1 : d, transpose ? k : 1, n, d, k, rows_per_split > 0 ? rows_per_split : 1};
  RESBM_DISPATCH(launch_wg, dtype, k, fn, p, splits, static_cast<cudaStream_t>(stream));
}

}  // extern "C"
