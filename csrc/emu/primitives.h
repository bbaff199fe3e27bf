// The hardware layer of csrc/cuda/primitives.cuh on the CPU emulator
// (runtime.h): the same functions with the semantics the PTX ISA gives them.
#pragma once

#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "resbm/codec.h"
#include "runtime.h"

#define RESBM_DYNAMIC_SMEM(name) unsigned char* name = resbm_emu::dynamic_smem()

namespace resbm {
namespace cuda {

// Runs the grid now (streams are not modelled); errors come back through cudaGetLastError.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, void* /*stream*/,
            Args... args) {
  const std::tuple<std::decay_t<Params>...> params(args...);
  resbm_emu::run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem,
                      [&] { std::apply(kernel, params); });
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits.
inline uint32_t to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7F800000u) != 0x7F800000u) u += 0x1000u;  // inf and NaN stay as they are
  return u & 0xFFFFE000u;
}

namespace emu_detail {

// The value of one operand element: 16-bit halves of a register, or tf32 (the tensor
// cores ignore the low 13 bits).
template <int DT>
inline float element(uint32_t reg, int half) {
  if constexpr (DT == kFloat32) {
    return bits_float(reg & 0xFFFFE000u);
  } else {
    const uint16_t h = uint16_t(half ? reg >> 16 : reg & 0xFFFFu);
    return DT == kFloat16 ? fp16_to_float(h) : bf16_to_float(h);
  }
}

struct MmaFrag {
  uint32_t a[4], b[2];
};

// The 32 row addresses of an ldmatrix .x4 (lane l gives row l % 8 of matrix l / 8).
inline const void* const* ldmatrix_rows(const void* row) {
  if (!resbm_emu::in_smem(row, 16) || reinterpret_cast<uintptr_t>(row) % 16)
    resbm_emu::fault("ldmatrix row outside shared memory or not 16-byte aligned", row);
  return resbm_emu::exchange(row);
}

}  // namespace emu_detail

// mma.sync m16n8k16 (fp16 / bf16) or m16n8k8 (tf32), fp32 accumulate. Fragment layouts
// (PTX ISA), g = lane / 4, t = lane % 4:
//   16-bit: A reg i = row g + 8 (i % 2), cols 2t + 8 (i / 2) + {0, 1};
//           B reg i = k rows 2t + 8 i + {0, 1}, column g
//   tf32:   A reg i = row g + 8 (i % 2), col t + 4 (i / 2); B reg i = k row t + 4 i, column g
//   C reg i = row g + 8 (i / 2), col 2t + (i % 2)
template <int DT>
inline void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using emu_detail::element;
  const emu_detail::MmaFrag mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  const emu_detail::MmaFrag* all = resbm_emu::exchange(mine);
  const int lane = resbm_emu::lane(), g = lane >> 2, t = lane & 3;
  constexpr int K = DT == kFloat32 ? 8 : 16;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
    float acc = c[i];
    for (int kk = 0; kk < K; ++kk) {
      float av, bv;
      if constexpr (DT == kFloat32) {
        av = element<DT>(all[(row % 8) * 4 + kk % 4].a[(kk / 4) * 2 + row / 8], 0);
        bv = element<DT>(all[col * 4 + kk % 4].b[kk / 4], 0);
      } else {
        av = element<DT>(all[(row % 8) * 4 + (kk % 8) / 2].a[(kk / 8) * 2 + row / 8], kk % 2);
        bv = element<DT>(all[col * 4 + (kk % 8) / 2].b[kk / 8], kk % 2);
      }
      acc += av * bv;  // exact products of the operand types; fp32 sums
    }
    c[i] = acc;
  }
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane l gives the address of row l % 8 of
// matrix l / 8; r[i] of lane l holds row l / 4, elements 2 (l % 4) and + 1 of matrix i.
inline void ldsm_x4(uint32_t (&r)[4], const void* row) {
  const void* const* rows = emu_detail::ldmatrix_rows(row);
  const int lane = resbm_emu::lane();
  for (int i = 0; i < 4; ++i) {
    const unsigned char* p = static_cast<const unsigned char*>(rows[8 * i + lane / 4]);
    if (resbm_emu::in_smem(p, 16)) std::memcpy(&r[i], p + 4 * (lane % 4), 4);
  }
}

// ldmatrix .x4 .trans: r[i] of lane l holds elements (row 2 (l % 4), column l / 4) and
// (row 2 (l % 4) + 1, column l / 4) of matrix i.
inline void ldsm_x4_trans(uint32_t (&r)[4], const void* row) {
  const void* const* rows = emu_detail::ldmatrix_rows(row);
  const int lane = resbm_emu::lane();
  for (int i = 0; i < 4; ++i) {
    uint16_t e[2] = {0, 0};
    for (int h = 0; h < 2; ++h) {
      const unsigned char* p = static_cast<const unsigned char*>(rows[8 * i + 2 * (lane % 4) + h]);
      if (resbm_emu::in_smem(p, 16)) std::memcpy(&e[h], p + 2 * (lane / 4), 2);
    }
    r[i] = uint32_t(e[0]) | uint32_t(e[1]) << 16;
  }
}

// cp.async.cg.shared.global 16 bytes (src_bytes of them read, the rest zero-filled).
inline void cp_async16(void* smem_dst, const void* gmem_src, int src_bytes) {
  resbm_emu::cp_async(smem_dst, gmem_src, src_bytes);
}

inline void cp_async_commit() { resbm_emu::cp_async_commit(); }

// prefetch.global.L2: a hint with no effect here, but the address is read, so that the
// sanitizer builds report a prefetch outside a tensor (on a GPU it would pass silently).
inline void prefetch_l2(const void* p) { (void)*static_cast<const volatile unsigned char*>(p); }

template <int N>
inline void cp_async_wait() {
  resbm_emu::cp_async_wait(N);
}

// The emulator's shared window: offsets into the block's dynamic shared memory.
inline uint32_t smem_address(const void* p) {
  if (!resbm_emu::in_smem(p, 1)) resbm_emu::fault("shared-memory address of a pointer outside shared memory", p);
  return uint32_t(static_cast<const unsigned char*>(p) - resbm_emu::dynamic_smem());
}

// wgmma and its fences (see runtime.h: operands checked at the wait, accumulators written
// then; the proxy fence and wgmma.fence order nothing here).
inline void fence_proxy_async() {}
inline void wgmma_fence() {}
inline void wgmma_commit() { resbm_emu::wgmma_commit(); }

template <int N>
inline void wgmma_wait() {
  resbm_emu::wgmma_wait(N);
}

template <int DT, int N>
inline void wgmma(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b) {
  static_assert(DT != kFloat32 && (N == 16 || N == 32 || N == 64 || N == 128), "wgmma: bf16 / fp16, N 16..128");
  resbm_emu::wgmma(&d[0][0], N, DT, desc_a, desc_b);
}

// wgmma with A from registers: the warp's a[4] in the mma.sync A layout (the lanes'
// registers are exchanged as mma's are: a warp collective here), B as wgmma's.
template <int DT, int N>
inline void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  static_assert(DT != kFloat32 && (N == 16 || N == 32 || N == 64 || N == 128), "wgmma: bf16 / fp16, N 16..128");
  const emu_detail::MmaFrag mine{{a[0], a[1], a[2], a[3]}, {0u, 0u}};
  const emu_detail::MmaFrag* all = resbm_emu::exchange(mine);
  const int g = resbm_emu::lane() >> 2;
  uint16_t rows[32];  // this thread's A rows g and g + 8 of its warp, k = 0..15
  for (int h = 0; h < 2; ++h)
    for (int kk = 0; kk < 16; ++kk) {
      const uint32_t reg = all[g * 4 + (kk % 8) / 2].a[(kk / 8) * 2 + h];
      rows[16 * h + kk] = uint16_t(kk % 2 ? reg >> 16 : reg & 0xFFFFu);
    }
  resbm_emu::wgmma_rs(&d[0][0], N, DT, rows, desc_b);
}

}  // namespace cuda
}  // namespace resbm
