// The row kernels' tile configuration (RowCfg) and their projection loops over d
// (mma.sync, and wgmma on sm_90a): project_quantize's main loop and the RMSNorm
// pre-pass of dequant_project (passes.cu).
#pragma once

#include "kernel_common.cuh"

namespace resbm {
namespace cuda {
namespace {

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
  // weight tiles' PS buffers fit sm_80's shared memory)
  static constexpr int BD = (KPAD > 128 ? 64 : 128) / int(sizeof(T));
  static constexpr int XLD = BD + 16 / int(sizeof(T));  // +16 bytes: conflict-free fragments
  static constexpr int WLD = BD + 16 / int(sizeof(E));
  static constexpr int WVEC = 16 / int(sizeof(E));  // operand elements per 16-byte chunk
  static constexpr bool W_SPLIT = DT == kFloat32;  // tf32 hi + lo; 16-bit weights: one part
  static constexpr size_t X_TILE_BYTES = size_t(BN) * XLD * sizeof(T);  // one buffer of x
  static constexpr size_t W_BYTES = size_t(KPAD) * WLD * sizeof(E);  // one buffer of hi or lo
  // buffers of the projection's cp.async pipeline: a block keeps PS - 1 input tiles in flight
  // (8 KB at 64 rows), so as many as let two blocks share an sm_90 SM, up to five (16-bit:
  // four at KPAD = 128, 56-112 KB). With three (two blocks an SM: 32 KB in flight) the H200's ncu had
  // project_quantize at k=32 at 42 % of DRAM bandwidth (2026-11-28), where Triton's kernel
  // (128 x 128 tiles, three stages, one program an SM: 64 KB in flight) reached 75 %. fp32
  // (two weight parts) stays at two: three would not fit sm_80's shared memory at KPAD = 128.
  // Sized for sm_90 (the GPUs measured): an sm_80 SM (164 KB) then holds one block at
  // KPAD >= 64, two below (untimed there)
  static constexpr size_t PROJ_STAGE_BYTES = X_TILE_BYTES + W_BYTES;
  static constexpr int PS = W_SPLIT                                        ? 2
                            : two_blocks_fit_sm90(5 * PROJ_STAGE_BYTES) ? 5
                            : two_blocks_fit_sm90(4 * PROJ_STAGE_BYTES) ? 4
                                                                        : 3;
  static constexpr size_t X_BYTES = PS * X_TILE_BYTES;
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
  // project_loop_wgmma (16-bit, KPAD <= 128): blocks of WG_THREADS, two warpgroups, each
  // multiplying 64 of the block's WG_BN = 128 rows by the same weight tile: with 64-row
  // blocks every row block reads the whole weight matrix from L2, at k=128 twice x's bytes.
  // Dense d tiles through four buffers, 256 bytes a row up to KPAD = 32, twice the mma.sync
  // loop's (on the H100 at k=32 both backends' projections made about one loop trip per us
  // per SM, whatever their tiles' width: Triton's first config, 64 x 128, did 2.1 tiles of
  // 64 x 64 per us per SM, this loop with 64 x 64 tiles 0.9), and 128 bytes from KPAD = 64
  // (24 / 32 KB a stage at KPAD = 64 / 128: two / one 8-warp blocks an SM). Untimed. The
  // stages start at the first 1024-byte boundary of the block's shared memory (the swizzle's
  // pattern; up to WG_ALIGN - 16 bytes in).
  static constexpr int WG_THREADS = 2 * kThreads, WG_BN = 2 * BN;
  static constexpr int WG_ROW_BYTES = KPAD <= 32 ? 256 : 128;
  static constexpr int WG_BD = WG_ROW_BYTES / int(sizeof(T));
  static constexpr size_t WG_STAGE_BYTES = size_t(WG_BN + KPAD) * WG_ROW_BYTES;  // the x tile, then the weights'
  static constexpr size_t WG_ALIGN = 1024;
  static constexpr int WG_PS = 4;
  static constexpr size_t WG_FINISH_BYTES = size_t(WG_BN) * ZLD * 4 + size_t(WG_BN) * 4;
  static constexpr size_t WG_SMEM = cmax(WG_PS * WG_STAGE_BYTES + WG_ALIGN, WG_FINISH_BYTES);
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

// project_loop on sm_90a's warpgroup mma (16-bit inputs, KPAD <= 128: the CTA's 256
// threads are two warpgroups, each 64 of its 128 rows one m64 tile, KPAD one n), with the
// tiles of RowCfg::WG_BD columns (RowCfg::WG_ROW_BYTES a row: CH 16-byte chunks) through WG_PS
// buffers, multiplied from shared memory (no thread loads fragments). Each stage's x and
// weight tiles are in wgmma's 128-byte swizzled layout, as Triton lays out its tiles: a tile
// of R rows is CH / 8 column halves of R x 128 bytes, 16-byte chunk c of row r of a half at
// byte 128 r + 16 (c ^ r % 8) (SBO = 1024 to the next 8 rows). Thread `tid` copies chunk
// tid % CH of rows RP j + tid / CH (RP = 256 / CH rows a pass): a warp whole rows, whole
// 128-byte lines, each quarter-warp one row of a half over all 32 banks. The core-matrix
// layout without swizzle before (16-byte rows, 128 bytes to the next 8 columns) had a warp
// copy 8 rows x 64 bytes, 8 half-used lines, and the H100's ncu (2026-11-27) had that loop
// bound by L2 (60-68 % busy at 14-29 % of DRAM bandwidth) with 2.3-way conflicts on its
// shared stores.
// acc: warp w's rows 16 w + g (+ 8) of the block, all KPAD columns. With want_sumsq,
// sumsq[h] of lane t = 0 of each quad holds the full sum of squares of row 16 w + g + 8 h
// (the other lanes 0), so that quad_sum gives it as in project_loop.
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
  constexpr int BN = C::WG_BN, THREADS = C::WG_THREADS;
  constexpr int CH = C::WG_ROW_BYTES / 16, RP = THREADS / CH, S = C::WG_PS;
  static_assert(DT != kFloat32 && C::WN == 1 && BN == 128 && THREADS == 256 && (CH == 8 || CH == 16) && KPAD % RP == 0,
                "two warpgroups of 64 rows, rows of one or two 128-byte halves, whole passes of rows");
  static_assert(S * C::WG_STAGE_BYTES + C::WG_ALIGN <= kMaxSmemSm80, "the stages fit sm_80's (the emulator's) limit");
  constexpr uint32_t X_HALF = BN * 128, W_HALF = KPAD * 128;  // a column half of each tile
  constexpr size_t X_STAGE = (CH / 8) * X_HALF, STAGE = C::WG_STAGE_BYTES;
  static_assert(STAGE % C::WG_ALIGN == 0 && X_HALF % C::WG_ALIGN == 0 && W_HALF % C::WG_ALIGN == 0,
                "every tile half starts on the swizzle's 1024-byte pattern");
  constexpr uint32_t SBO = 1024;  // 8 rows of 128 bytes
  unsigned char* stages = smem + ((0u - smem_address(smem)) & uint32_t(C::WG_ALIGN - 1));
  const int tid = threadIdx.x;
  const int chunk = tid % CH, row_base = tid / CH;
  // this thread's destination in a stage's tiles (row RP j: + 128 RP j) and sources in tile 0
  // (row RP j: + RP j d; tile t: + t WG_BD), set up once
  const uint32_t swizzled = 128 * row_base + 16 * ((chunk % 8) ^ (row_base % 8));
  const uint32_t x_dst = (chunk / 8) * X_HALF + swizzled, w_dst = X_STAGE + (chunk / 8) * W_HALF + swizzled;
  const int64_t rows_left = n - row0 - row_base, step = RP * d;
  const T* x_src = a + (row0 + row_base) * d + chunk * 8;
  const E* w_src = w_g + int64_t(row_base) * d + chunk * 8;
  auto issue = [&](int64_t i) {  // tile i of the run into stage i % S: x, then the weights
    unsigned char* stage = stages + (i % S) * STAGE;
    const int64_t col = (run.first + i) * C::WG_BD;
    const bool col_ok = col + chunk * 8 < d;  // d % 16 == 0: chunks are all in or all out
#pragma unroll
    for (int j = 0; j < BN / RP; ++j) {
      const bool ok = col_ok && RP * j < rows_left;
      cp_async16(stage + x_dst + 128 * RP * j, ok ? x_src + j * step + col : a, ok ? 16 : 0);
    }
#pragma unroll
    for (int j = 0; j < KPAD / RP; ++j)
      cp_async16(stage + w_dst + 128 * RP * j, col_ok ? w_src + j * step + col : w_g, col_ok ? 16 : 0);
  };
  // the sums of squares: thread tid takes chunks CH / 2 (tid / BN).. of row tid % BN
  const int sq_row = tid % BN, sq_first = (CH / 2) * (tid / BN);
  // this warpgroup's 64 rows of each x half
  const uint32_t x_rows = 64 * 128 * (tid / 128);
  float sq = 0.0f;
  // each tile's wgmma group stays in flight until the next tile's is issued (as Triton's
  // loop), its buffers refilled after that: two tiles' copies in flight meanwhile
  static_assert(S >= 4, "a group in flight and two tiles' copies");
  cp_async_pipeline<S, true, true>(run.count, issue, [&](int64_t, int buf) {
    const unsigned char* xt = stages + buf * STAGE;
    const unsigned char* wt = xt + X_STAGE;
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < CH / 2; ++ks) {  // k steps of 16: four 32-byte steps along a half's rows, then the next half
      const uint32_t at = (ks / 4) * X_HALF + x_rows + 32 * (ks % 4), bt = (ks / 4) * W_HALF + 32 * (ks % 4);
      wgmma<DT, KPAD>(acc, wgmma_desc(xt + at, 16, SBO, kSwizzle128), wgmma_desc(wt + bt, 16, SBO, kSwizzle128));
    }
    wgmma_commit();
    if (want_sumsq) {
#pragma unroll
      for (int i = 0; i < CH / 2; ++i) {  // chunk sq_first + i of the row, in order
        const int c = sq_first + i;
        const uint4 raw = *reinterpret_cast<const uint4*>(xt + (c / 8) * X_HALF + 128 * sq_row + 16 * ((c % 8) ^ (sq_row % 8)));
        const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float v0 = e16_to_float<DT>(uint16_t(w[e] & 0xFFFFu)), v1 = e16_to_float<DT>(uint16_t(w[e] >> 16));
          sq += v0 * v0 + v1 * v1;
        }
      }
    }
    wgmma_wait<1>();  // the group whose buffers the next refill reuses is complete
  });
  wgmma_wait<0>();  // the last group: acc final, then for every warp the shared memory free
  __syncthreads();
  if (want_sumsq) {  // rows' totals: two threads per row, through shared memory
    float* part = reinterpret_cast<float*>(smem);  // [2][BN]
    part[tid] = sq;
    __syncthreads();
    const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = 16 * warp + g + 8 * h;
      sumsq[h] = t == 0 ? part[r] + part[BN + r] : 0.0f;
    }
    __syncthreads();  // the caller's epilogue reuses the shared memory
  }
}

}  // namespace
}  // namespace cuda
}  // namespace resbm
