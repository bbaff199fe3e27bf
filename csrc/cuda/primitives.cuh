// The hardware layer of the CUDA kernels: inline PTX (tensor-core mma, ldmatrix,
// cp.async, the tf32 conversion, sm_90a's warpgroup mma), the kernel launch and the
// dynamic shared memory declaration. Everything above this layer is plain CUDA C++.
//
// Built with RESBM_CUDA_EMULATION (the CPU test build of libresbm_cuda, see
// csrc/emu/), the same functions come from the emulator instead, with the
// semantics the PTX ISA gives them, so that the kernels run unchanged on the CPU.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "resbm/codec.h"

#if defined(RESBM_CUDA_EMULATION)
#include "emu/primitives.h"
#else

// The block's dynamic shared memory, 16-byte aligned, as `unsigned char name[]`.
#define RESBM_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

namespace resbm {
namespace cuda {

// kernel<<<grid, block, smem, stream>>>(args...); the caller checks cudaGetLastError.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            Args... args) {
  kernel<<<grid, block, smem, stream>>>(args...);
}

// Address of a generic pointer into shared memory, in the shared window (ldmatrix, cp.async, wgmma descriptors).
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// fp32 -> tf32 rounded to nearest, ties away from zero (the low 13 bits cleared).
__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return r;
}

// c += a * b for one warp: m16n8k8 on tf32 (fp32 inputs), m16n8k16 on fp16 / bf16, fp32
// accumulators; fragment layouts as described in mma.cuh.
template <int DT>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (DT == kFloat32) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else if constexpr (DT == kFloat16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// Four 8x8 matrices of 16-bit elements from shared memory (ldmatrix .x4): lane l gives
// the address of row l % 8 of matrix l / 8 (16-byte aligned); r[i] holds row lane / 4,
// elements 2 * (lane % 4) and + 1 (low half) of matrix i.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
  const uint32_t a = smem_address(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// The same with .trans: r[i] holds elements (row 2 (lane % 4), column lane / 4) (low half)
// and (row 2 (lane % 4) + 1, same column) of matrix i: B fragments from a [k][n] tile.
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row) {
  const uint32_t a = smem_address(row);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// 16-byte global -> shared copy; src_bytes = 0 zero-fills the destination.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, int src_bytes) {
  const uint32_t dst = smem_address(smem_dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src),
               "r"(src_bytes));
}

// Asks for the 128-byte line holding p to be brought into L2: a hint, nothing waits for it.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }

// Closes this thread's open group of cp.async copies.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- sm_90a: warpgroup MMA (wgmma), issued by the 128 threads of a warpgroup -----------
// Compiled for other targets these trap; the C API launches wgmma kernels only on sm_90
// devices with a library built for sm_90a (see launch.cuh, wgmma_enabled).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define RESBM_SM90A_ONLY(...) __VA_ARGS__
#else
#define RESBM_SM90A_ONLY(...) __trap()
#endif

// Orders this thread's earlier shared-memory writes (cp.async included, once waited for)
// before later reads by the async proxy (wgmma operands): before the barrier that
// publishes them.
__device__ __forceinline__ void fence_proxy_async() {
  RESBM_SM90A_ONLY(asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"));
}

// wgmma.fence: before the first wgmma of a group reads accumulators other instructions wrote.
__device__ __forceinline__ void wgmma_fence() {
  RESBM_SM90A_ONLY(asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"));
}

// Closes this warpgroup's open wgmma group.
__device__ __forceinline__ void wgmma_commit() {
  RESBM_SM90A_ONLY(asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"));
}

// Waits until at most N of the warpgroup's wgmma groups are pending: then their
// accumulators may be read and their shared-memory operands overwritten.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  RESBM_SM90A_ONLY(asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"));
}

// The accumulator operands of a wgmma m64nNk16 (N / 2 a thread) and their placeholders.
#define RESBM_WGMMA_D16 \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3])
#define RESBM_WGMMA_P16 \
  "%0, %1, %2, %3, %4, %5, %6, %7"
#define RESBM_WGMMA_D32 \
  RESBM_WGMMA_D16, \
  "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
#define RESBM_WGMMA_P32 \
  RESBM_WGMMA_P16 ", " \
  "%8, %9, %10, %11, %12, %13, %14, %15"
#define RESBM_WGMMA_D64 \
  RESBM_WGMMA_D32, \
  "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
  "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
#define RESBM_WGMMA_P64 \
  RESBM_WGMMA_P32 ", " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define RESBM_WGMMA_D128 \
  RESBM_WGMMA_D64, \
  "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), \
  "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), \
  "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), \
  "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
#define RESBM_WGMMA_P128 \
  RESBM_WGMMA_P64 ", " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

// wgmma m64nNk16 with A and B from shared memory (SS) or A from registers (RS); the scale-d
// predicate is always true (d accumulates).
#define RESBM_WGMMA_SS_N16(TYPE) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n16k16.f32." TYPE "." TYPE " {" RESBM_WGMMA_P16 \
               "}, %8, %9, p, 1, 1, 0, 0;\n}\n" \
               : RESBM_WGMMA_D16 \
               : "l"(desc_a), "l"(desc_b), "r"(1))
#define RESBM_WGMMA_RS_N16(TYPE) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n16k16.f32." TYPE "." TYPE " {" RESBM_WGMMA_P16 \
               "}, {%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n" \
               : RESBM_WGMMA_D16 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
#define RESBM_WGMMA_SS_N32(TYPE) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE " {" RESBM_WGMMA_P32 \
               "}, %16, %17, p, 1, 1, 0, 0;\n}\n" \
               : RESBM_WGMMA_D32 \
               : "l"(desc_a), "l"(desc_b), "r"(1))
#define RESBM_WGMMA_RS_N32(TYPE) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE " {" RESBM_WGMMA_P32 \
               "}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n" \
               : RESBM_WGMMA_D32 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
#define RESBM_WGMMA_SS_N64(TYPE) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " {" RESBM_WGMMA_P64 \
               "}, %32, %33, p, 1, 1, 0, 0;\n}\n" \
               : RESBM_WGMMA_D64 \
               : "l"(desc_a), "l"(desc_b), "r"(1))
#define RESBM_WGMMA_RS_N64(TYPE) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " {" RESBM_WGMMA_P64 \
               "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n" \
               : RESBM_WGMMA_D64 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
#define RESBM_WGMMA_SS_N128(TYPE) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {" RESBM_WGMMA_P128 \
               "}, %64, %65, p, 1, 1, 0, 0;\n}\n" \
               : RESBM_WGMMA_D128 \
               : "l"(desc_a), "l"(desc_b), "r"(1))
#define RESBM_WGMMA_RS_N128(TYPE) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {" RESBM_WGMMA_P128 \
               "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n" \
               : RESBM_WGMMA_D128 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))

// KIND_N<N>("bf16" or "f16") for the template's N (16, 32, 64 or 128) and 16-bit DT.
#define RESBM_WGMMA_DISPATCH(KIND)                                                       \
  static_assert(DT != kFloat32 && (N == 16 || N == 32 || N == 64 || N == 128), "wgmma: bf16 / fp16, N 16..128"); \
  if constexpr (N == 16) {                                                               \
    RESBM_WGMMA_TYPED(KIND##_N16)                                                        \
  } else if constexpr (N == 32) {                                                        \
    RESBM_WGMMA_TYPED(KIND##_N32)                                                        \
  } else if constexpr (N == 64) {                                                        \
    RESBM_WGMMA_TYPED(KIND##_N64)                                                        \
  } else {                                                                               \
    RESBM_WGMMA_TYPED(KIND##_N128)                                                       \
  }
#define RESBM_WGMMA_TYPED(M)                                     \
  if constexpr (DT == kBFloat16) RESBM_SM90A_ONLY(M("bf16")); \
  else RESBM_SM90A_ONLY(M("f16"));

// d += A (64 x 16) * B^T (N x 16) for the warpgroup, fp32 accumulators, A and B from
// shared memory through descriptors (wgmma_desc, mma.cuh), both k-major; 16-bit DT.
// Warp w (of the warpgroup) holds rows 16 w.. of d in the mma.sync C layout, n tile j in
// d[j]: d[j][i] = row g + 8 (i / 2), column 8 j + 2 t + (i % 2).
template <int DT, int N>
__device__ __forceinline__ void wgmma(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b) {
  RESBM_WGMMA_DISPATCH(RESBM_WGMMA_SS)
}

// The same with A from registers: each warp's a[4] in the mma.sync m16n8k16 A layout
// (mma.cuh) of its rows 16 w... The registers must stay unchanged until the
// wgmma.wait_group for the group.
template <int DT, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  RESBM_WGMMA_DISPATCH(RESBM_WGMMA_RS)
}

#undef RESBM_WGMMA_TYPED
#undef RESBM_WGMMA_DISPATCH

}  // namespace cuda
}  // namespace resbm

#endif  // RESBM_CUDA_EMULATION
