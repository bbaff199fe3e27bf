// libresbm_cuda: the standalone codec kernels, from the same headers as the CPU library.
#include <cuda_runtime.h>

#include <cstdarg>
#include <cstdint>

#include "errors.cuh"
#include "primitives.cuh"
#include "resbm/args.h"
#include "resbm/c_api.h"
#include "resbm/codec.h"

namespace resbm_cuda_detail {

thread_local char g_error[512] = "";

int fail(int code, const char* fn, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  resbm::vformat_error(g_error, sizeof g_error, code, fn, fmt, ap);
  va_end(ap);
  return code;
}

int launch_status(const char* fn, const char* kernel) {
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return RESBM_OK;
  return fail(RESBM_ERR_CUDA, fn, "%s launch failed: %s", kernel, cudaGetErrorString(e));
}

}  // namespace resbm_cuda_detail

namespace {

using resbm_cuda_detail::g_error;
using resbm_cuda_detail::launch_status;
using resbm::cuda::launch;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride loops cover the rest

int blocks_for(int64_t items, int64_t items_per_block) {
  int64_t b = (items + items_per_block - 1) / items_per_block;
  return int(b < kMaxBlocks ? b : kMaxBlocks);
}

// bits=16: codes are the little-endian bf16 bytes of z, one thread per value.
__global__ void pack_bf16_kernel(const void* z, int z_dtype, int64_t count, uint8_t* codes) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint16_t h = resbm::float_to_bf16(resbm::load_float(z, i, z_dtype));
    codes[2 * i] = uint8_t(h & 0xFF);
    codes[2 * i + 1] = uint8_t(h >> 8);
  }
}

// One warp per (row, group): warp-wide absmax, then each lane packs whole bytes.
__global__ void quantize_pack_kernel(const void* z, int z_dtype, int64_t n, int64_t k, int bits,
                                     int group, int scale_dtype, int stochastic, uint32_t key,
                                     uint8_t* codes, void* scales) {
  const int lane = threadIdx.x % 32, warps_per_block = blockDim.x / 32;
  const int qmax = resbm::qmax_of(bits), per = 8 / bits;
  const int64_t groups = k / group, total = n * groups, row_bytes = k * bits / 8;
  for (int64_t w = int64_t(blockIdx.x) * warps_per_block + threadIdx.x / 32; w < total;
       w += int64_t(gridDim.x) * warps_per_block) {
    const int64_t r = w / groups, gi = w % groups, base = r * k + gi * group;
    float absmax = 0.0f;
    for (int64_t j = lane; j < group; j += 32)
      absmax = resbm::absmax_update(absmax, resbm::load_float(z, base + j, z_dtype));
    for (int off = 16; off > 0; off /= 2)
      absmax = resbm::absmax_update(absmax, __shfl_xor_sync(0xFFFFFFFFu, absmax, off));
    const float s = resbm::group_scale(absmax, qmax, scale_dtype);
    if (lane == 0) resbm::store_float(scales, w, scale_dtype, s);  // non-finite stays visible
    const float inv = resbm::inv_scale(s);
    uint8_t* out = codes + r * row_bytes + gi * group * bits / 8;
    for (int64_t b = lane; b < group / per; b += 32)
      out[b] = resbm::quantize_byte(z, z_dtype, base + b * per, bits, inv, stochastic != 0, key);
  }
}

// One thread per output value.
__global__ void unpack_dequantize_kernel(const uint8_t* codes, const void* scales, int64_t n,
                                         int64_t k, int bits, int group, int scale_dtype,
                                         int out_dtype, void* out) {
  const int64_t count = n * k;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    resbm::store_float(out, i, out_dtype,
                       resbm::dequantize_at(codes, scales, i / k, i % k, k, bits, group, scale_dtype));
}

}  // namespace

extern "C" {

int resbm_abi_version(void) { return RESBM_ABI_VERSION; }

const char* resbm_last_error(void) { return g_error; }

int resbm_cuda_quantize_pack(const void* z, int z_dtype, int64_t n, int64_t k, int bits, int group,
                             int scale_dtype, int stochastic, uint32_t key, uint8_t* codes,
                             void* scales, void* stream) {
  const char* fn = "resbm_cuda_quantize_pack";
  int rc = resbm::check_args(fn, "z", z, z_dtype, n, k, bits, group, scale_dtype, codes, scales,
                             g_error, sizeof g_error);
  if (rc != RESBM_OK || n == 0) return rc;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (bits == 16) {
    launch(pack_bf16_kernel, blocks_for(n * k, kThreads), kThreads, 0, s, z, z_dtype, n * k, codes);
    return launch_status(fn, "pack_bf16_kernel");
  }
  launch(quantize_pack_kernel, blocks_for(n * (k / group), kThreads / 32), kThreads, 0, s, z, z_dtype, n, k,
         bits, group, scale_dtype, stochastic, key, codes, scales);
  return launch_status(fn, "quantize_pack_kernel");
}

int resbm_cuda_unpack_dequantize(const uint8_t* codes, const void* scales, int64_t n, int64_t k,
                                 int bits, int group, int scale_dtype, int out_dtype, void* out,
                                 void* stream) {
  const char* fn = "resbm_cuda_unpack_dequantize";
  int rc = resbm::check_args(fn, "out", out, out_dtype, n, k, bits, group, scale_dtype, codes,
                             scales, g_error, sizeof g_error);
  if (rc != RESBM_OK || n == 0) return rc;
  launch(unpack_dequantize_kernel, blocks_for(n * k, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream),
         codes, scales, n, k, bits, group, scale_dtype, out_dtype, out);
  return launch_status(fn, "unpack_dequantize_kernel");
}

}  // extern "C"
