// The row kernels (passes.cu): project_quantize_kernel and finish_rows_kernel
// (encode forward, decode backward), dequant_project_kernel (decode forward, encode
// backward).
#pragma once

#include "projection.cuh"

namespace resbm {
namespace cuda {
namespace {

struct PQArgs {
  const void* a;    // (n, d) activations (x or grad_h), row-major, 16-byte aligned
  const void* whi;  // prepared operand (KPAD, d): B(dd, c) = whi[c][dd] (+ wlo[c][dd])
  const void* wlo;  // fp32 only (tf32 lo part), else null
  int norm;         // RMSNorm folded into the weights: scale rows by 1/rms(a)
  int64_t n, d, k;
  float eps;
  int bits, group, scale_dtype, stochastic;
  uint64_t seed;               // stochastic rounding: key rng_key(seed + *seed_offset)
  const int64_t* seed_offset;  // device memory (read here, so a CUDA graph's replay draws anew), or null
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

// The BN rows of block row0 (THREADS threads) from their projection (zs: fp32 [BN][ZLD], the
// raw acc, overwritten with z) and sums of squares (row_sq, [BN]; replaced by r = 1/rms with
// the norm): z = r * acc + a[:, :k], the row statistics if asked, then quantize + pack
// through the shared codec functions; the first block also writes the payload header.
template <int DT, int KPAD, int BN = RowCfg<DT, KPAD>::BN, int THREADS = kThreads>
__device__ void finish_rows(const PQArgs& p, float* zs, float* row_sq, int64_t row0) {
  using C = RowCfg<DT, KPAD>;
  using T = typename C::T;
  const T* a = static_cast<const T*>(p.a);
  const int tid = threadIdx.x;
  if (p.norm && tid < BN) row_sq[tid] = inv_rms(row_sq[tid], p.d, p.eps);
  __syncthreads();
  // z = r * acc + a[:, :k] (a's bits loaded eight elements at a time)
  for_block_elements<BN, KPAD, THREADS>(
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
  const uint32_t key = p.stochastic ? rng_key(p.seed + uint64_t(p.seed_offset ? *p.seed_offset : 0)) : 0u;
  quantize_rows<THREADS / 32>(zs, C::ZLD, BN, row0, p.n, p.k, p.bits, p.group, p.scale_dtype, p.stochastic,
                              key, p.codes, p.scales);
  if (p.write_header && row0 == 0) store_header(p.header, p.codes, p.n * p.k * p.bits / 8);
}

// WG: the projection on wgmma (project_loop_wgmma: 256 threads, 128 rows), else on mma.sync.
// With grid.y > 1 each block projects its run of d only and writes that as partials for
// finish_rows_kernel.
template <int DT, int KPAD, bool WG>
__global__ void __launch_bounds__(WG ? RowCfg<DT, KPAD>::WG_THREADS : kThreads, 1)
    project_quantize_kernel(const PQArgs p) {
  using C = RowCfg<DT, KPAD>;
  using T = typename C::T;
  constexpr int BN = WG ? C::WG_BN : C::BN, THREADS = WG ? C::WG_THREADS : kThreads;
  RESBM_DYNAMIC_SMEM(smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp % C::WM, wn = warp / C::WM, g = lane >> 2, t = lane & 3;
  // this warp's accumulators: rows acc_row + g (+ 8), columns acc_col + 8 j + 2 t (+ 1)
  const int acc_row = WG ? 16 * warp : 16 * wm, acc_col = WG ? 0 : wn * C::WC;
  const int64_t row0 = int64_t(blockIdx.x) * BN;
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
  float* row_sq = zs + BN * C::ZLD;            // [BN]
  float* part = split ? p.partial + int64_t(blockIdx.y) * p.n * (p.k + 1) : nullptr;
#pragma unroll
  for (int j = 0; j < C::NT; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = acc_row + g + 8 * h, col = acc_col + j * 8 + 2 * t;
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
    const int r = acc_row + g + 8 * h;
    if (acc_col == 0 && t == 0) {
      if (!split) {
        row_sq[r] = ssum;
      } else if (row0 + r < p.n) {
        part[(row0 + r) * (p.k + 1) + p.k] = ssum;
      }
    }
  }
  if (split) return;
  __syncthreads();
  finish_rows<DT, KPAD, BN, THREADS>(p, zs, row_sq, row0);
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
// WG: the output tiles on wgmma (sm_90a; 16-bit inputs, KPAD <= 128), zhat's hoisted
// fragments from registers and the weight tile from shared memory in wgmma's core matrices
// (no swizzle: each 8-row group's 16-byte chunks in order, chunk-major), so no warp loads B
// fragments: with mma.sync each of the four warps reads the whole weight tile (ldmatrix).
template <int DT, int KPAD, bool WG>
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
  // wr + j * WSTEP of every tile (only d0 moves). WG: chunk c of row r at 16-byte slot
  // ((r / 8) W2CH + c) 8 + r % 8 (wgmma's core matrices: LBO = 128 bytes along k, SBO = 16 KPAD
  // to the next 8 rows), which is slot tid + 128 j for the thread's chunk of row wr + j WSTEP:
  // each warp stores 512 contiguous bytes
  constexpr int WSTEP = kThreads / W2CH, WPER = C::BD2 / WSTEP;
  static_assert(kThreads % W2CH == 0 && WPER * WSTEP == C::BD2, "weight tile copies split evenly");
  static_assert(!WG || (16 % W2CH == 0 && C::BD2 == 64 && C::WN == 1), "wgmma: n = 64, whole 8-row groups a pass");
  const int wr = WG ? 8 * (tid / 8 / W2CH) + tid % 8 : tid / W2CH, wch = WG ? tid / 8 % W2CH : tid % W2CH;
  auto w2_slot = [&](int j) { return WG ? (tid + kThreads * j) * C::WVEC : (wr + j * WSTEP) * C::W2LD + wch * C::WVEC; };
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
      for (int j = 0; j < WPER; ++j) cp_async16(w2hi(b) + w2_slot(j), src + j * w_row_step, w_col_ok ? 16 : 0);
    } else {
#pragma unroll
      for (int j = 0; j < WPER; ++j) {
        const bool ok = w_col_ok && d0 + wr + j * WSTEP < d;
        const int64_t src = ok ? w_off + (d0 + j * WSTEP) * p.w2_ld : 0;
        const int dst = w2_slot(j);
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
  static_assert(!WG || kHoistA, "wgmma takes zhat from its hoisted fragments");
  float no_sq[2] = {0.0f, 0.0f};
  FragA fa_all[kHoistA ? KSTEPS : 1];
  if constexpr (kHoistA) {
#pragma unroll
    for (int s = 0; s < KSTEPS; ++s) load_a_f32<DT>(fa_all[s], zf, C::ZLD, wm * 16, s * C::KS, lane, false, no_sq);
  }
  cp_async_pipeline<C::WS, WG>(run.count, issue_w2, [&](int64_t i, int b) {  // (WG: wgmma reads the weight tiles)
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
    if constexpr (WG) {  // k step s: the weight tile's core matrices 2 s and 2 s + 1 along k
      wgmma_fence();
#pragma unroll
      for (int s = 0; s < KSTEPS; ++s) {
        const uint64_t desc = wgmma_desc(reinterpret_cast<const unsigned char*>(w2hi(b)) + 256 * s, 128, 16 * KPAD);
        wgmma_rs<DT, 64>(acc, fa_all[s].hi, desc);
        if constexpr (kZSplit) wgmma_rs<DT, 64>(acc, fa_all[s].lo, desc);
      }
      wgmma_commit();
      wgmma_wait<0>();
    } else if constexpr (kHoistA) {
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

}  // namespace
}  // namespace cuda
}  // namespace resbm
