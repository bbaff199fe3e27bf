// The hardware layer of the CUDA kernels: inline PTX (tensor-core mma, ldmatrix,
// cp.async, the tf32 conversion), the kernel launch and the dynamic shared memory
// declaration. Everything above this layer is plain CUDA C++.
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
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// The same with .trans: r[i] holds elements (row 2 (lane % 4), column lane / 4) (low half)
// and (row 2 (lane % 4) + 1, same column) of matrix i: B fragments from a [k][n] tile.
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// 16-byte global -> shared copy; src_bytes = 0 zero-fills the destination.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, int src_bytes) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src),
               "r"(src_bytes));
}

// Closes this thread's open group of cp.async copies.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace cuda
}  // namespace resbm

#endif  // RESBM_CUDA_EMULATION
