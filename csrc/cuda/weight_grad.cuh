// The weight gradient (passes.cu): weight_operand_kernel writes (rscale * zhat)^T,
// weight_grad_kernel reduces rows into per-split partials, finish_weight_grad_kernel
// sums them (and applies RMSNorm's factors).
#pragma once

#include "kernel_common.cuh"

namespace resbm {
namespace cuda {
namespace {

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
  static constexpr int MIN_BLOCKS = two_blocks_fit_sm90(SMEM) ? 2 : 1;
  static_assert(MT >= 1 && NT >= 2 && NT % 2 == 0 && BR % 16 == 0 && WM * WN == WARPS,
                "bad tile configuration (B fragments load two n tiles at a time)");
  static_assert(X_BYTES % 16 == 0 && ZT_BYTES % 16 == 0, "16-byte aligned regions");
  static_assert(SMEM <= kMaxSmemSm80, "more shared memory than an sm_80 block can have");
};

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
  int64_t n, d, k, npad, rows_per_split;  // rows_per_split: a multiple of kWgRows (aligned Z^T chunks)
};

// WG (sm_90a, 16-bit, KPAD <= 128): the products on wgmma, transposed: out^T (BDW, KPAD) =
// x^T Z, each warpgroup 64 of the tile's d columns (the wgmma rows) and all KPAD, x^T's A
// fragments from the x tile with transposing ldmatrix, Z^T from shared memory as wgmma's core
// matrices (LBO = 128 bytes along the rows, SBO = 16 BR to the next 8 c), where with mma.sync
// each warp loads the x and Z^T fragments of its own part of the tile.
template <int DT, int KPAD, bool WG>
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

  // the loads of block `it` (rows start + it * BR..) into stage it % STAGES. Every block, a
  // thread copies the same chunks (x: column chunk xch of rows xr + j * XSTEP; Z^T: chunk zch
  // of rows zr + j * ZSTEP of hi, then lo), so only the block's row offset changes.
  constexpr int XSTEP = C::THREADS / CHUNKS, ZSTEP = C::THREADS / ZCHUNKS;
  constexpr int ZROWS = C::ZPARTS * KPAD;  // Z^T rows, hi then lo
  constexpr int XPER = C::BR / XSTEP, ZPER = (ZROWS + ZSTEP - 1) / ZSTEP;
  static_assert(C::THREADS % CHUNKS == 0 && C::THREADS % ZCHUNKS == 0 && XPER * XSTEP == C::BR &&
                    (ZPER * ZSTEP == ZROWS || ZPER == 1),
                "the copies of a block must split evenly between the threads");
  static_assert(!WG || (DT != kFloat32 && KPAD <= 128 && C::BDW == 128 && C::THREADS == 256 && ZSTEP % 8 == 0),
                "wgmma: 16-bit, two warpgroups of 64 d columns, whole 8-row groups of Z^T a pass");
  // WG: Z^T row c's chunk q at 16-byte slot ((c / 8) ZCHUNKS + q) 8 + c % 8 (core matrices)
  const int xr = tid / CHUNKS, xch = tid % CHUNKS;
  const int zr = WG ? 8 * (tid / 8 / ZCHUNKS) + tid % 8 : tid / ZCHUNKS, zch = WG ? tid / 8 % ZCHUNKS : tid % ZCHUNKS;
  auto z_at = [&](int c) { return WG ? ((c / 8 * ZCHUNKS + zch) * 8 + c % 8) * ZVEC : c * C::ZTLD + zch * ZVEC; };
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
        cp_async16((part ? zlo(s) : zhi(s)) + z_at(c), zbytes ? src + c * p.npad + zcol : src, zbytes);
    }
  };
  const int64_t blocks = end > start ? (end - start + C::BR - 1) / C::BR : 0;
  float* out = p.out + split * p.out_ss;
  if constexpr (WG) {
    float acc[KPAD / 8][4];  // d column 16 w + g (+ 8) of this warp's, c columns 8 q + 2 t (+ 1)
#pragma unroll
    for (int q = 0; q < KPAD / 8; ++q) acc[q][0] = acc[q][1] = acc[q][2] = acc[q][3] = 0.0f;
    const int m0 = 64 * (warp / 4) + 16 * (warp % 4);  // this warp's first d column of the tile
    cp_async_pipeline<C::STAGES, true>(blocks, issue, [&](int64_t, int s) {
      FragA fa[C::BR / C::KS];
#pragma unroll
      for (int ks = 0; ks < C::BR / C::KS; ++ks) load_a_raw_km<DT>(fa[ks], xs(s), C::XLD, m0, ks * C::KS, lane);
      wgmma_fence();  // (the A registers were just written)
#pragma unroll
      for (int ks = 0; ks < C::BR / C::KS; ++ks) {  // k step ks: Z^T's core matrices 2 ks, 2 ks + 1
        const uint32_t at = 256 * ks, sbo = 128 * ZCHUNKS;
        wgmma_rs<DT, KPAD>(acc, fa[ks].hi, wgmma_desc(reinterpret_cast<const unsigned char*>(zhi(s)) + at, 128, sbo));
        if constexpr (C::ZPARTS == 2)
          wgmma_rs<DT, KPAD>(acc, fa[ks].hi, wgmma_desc(reinterpret_cast<const unsigned char*>(zlo(s)) + at, 128, sbo));
      }
      wgmma_commit();
      wgmma_wait<0>();
    });
#pragma unroll
    for (int q = 0; q < KPAD / 8; ++q) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t c = 8 * q + 2 * t, j = d0 + m0 + g + 8 * h;
        if (c < p.k && j < p.d) {  // k even: c + 1 < k too
          out[c * p.out_sc + j * p.out_sd] = acc[q][2 * h];
          out[(c + 1) * p.out_sc + j * p.out_sd] = acc[q][2 * h + 1];
        }
      }
    }
  } else {
    float acc[C::MT][C::NT][4];
#pragma unroll
    for (int mt = 0; mt < C::MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < C::NT; ++nt)
        acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.0f;
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

}  // namespace
}  // namespace cuda
}  // namespace resbm
