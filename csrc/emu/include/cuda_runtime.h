// CPU emulation (csrc/emu/runtime.h) of the CUDA runtime subset the kernels of
// csrc/cuda use: qualifiers, vector types, thread coordinates, __syncthreads,
// warp shuffles, float intrinsics and the error API. For the emulator build only.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

using cudaStream_t = void*;
enum cudaError_t : int {
  cudaSuccess = resbm_emu::kSuccess,
  cudaErrorInvalidValue = resbm_emu::kInvalidValue,
  cudaErrorLaunchFailure = resbm_emu::kLaunchFailure,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount };

inline cudaError_t cudaGetLastError() { return cudaError_t(resbm_emu::take_last_error()); }
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : resbm_emu::last_message();
}
inline cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute, int bytes) {
  if (bytes < 0 || size_t(bytes) > resbm_emu::kMaxDynamicSmem) return cudaErrorInvalidValue;
  resbm_emu::set_max_dynamic_smem(func, bytes);
  return cudaSuccess;
}

// The emulated device: resbm_emu::kSms SMs of one block each (its blocks run one after
// another; the numbers only shape grids sized to fill a GPU).
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = resbm_emu::kSms;
  return cudaSuccess;
}
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int, size_t) {
  *blocks = 1;
  return cudaSuccess;
}

inline void __syncthreads() { resbm_emu::block_barrier(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  if (mask != 0xFFFFFFFFu) resbm_emu::fault("__shfl_xor_sync with a partial mask", nullptr);
  return resbm_emu::exchange(v)[resbm_emu::lane() ^ lane_mask];
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float __fsqrt_rn(float v) { return std::sqrt(v); }
