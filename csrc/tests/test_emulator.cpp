// Tests of the CUDA emulator (csrc/emu) against the semantics the PTX ISA gives the
// primitives the kernels use, and of its launch checks. Built with the emulator's
// headers in place of CUDA's (RESBM_CUDA_EMULATION); exit status 0 when all pass.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <vector>

#include "cuda/mma.cuh"

using resbm::cuda::launch;

namespace {

int g_failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what);
    ++g_failures;
  }
}

// ---- mma: C = A (16 x K) * B (K x 8) from fragments laid out as the PTX ISA says ----------

constexpr int M = 16, N = 8;

template <int DT>
struct MmaData {
  static constexpr int K = DT == resbm::kFloat32 ? 8 : 16;
  float a[M][K], b[K][N];
  float c[M][N];  // in: accumulator, out: result
};

uint16_t to16(int dt, float v) {
  return dt == resbm::kFloat16 ? resbm::float_to_fp16(v) : resbm::float_to_bf16(v);
}

template <int DT>
__global__ void mma_kernel(MmaData<DT>* m) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  uint32_t a[4], b[2];
  float c[4];
  for (int i = 0; i < 4; ++i) {
    if constexpr (DT == resbm::kFloat32) {
      a[i] = resbm::cuda::to_tf32(m->a[g + 8 * (i % 2)][t + 4 * (i / 2)]);
    } else {
      const int row = g + 8 * (i % 2), col = 2 * t + 8 * (i / 2);
      a[i] = to16(DT, m->a[row][col]) | uint32_t(to16(DT, m->a[row][col + 1])) << 16;
    }
    c[i] = m->c[g + 8 * (i / 2)][2 * t + i % 2];
  }
  for (int i = 0; i < 2; ++i) {
    if constexpr (DT == resbm::kFloat32) {
      b[i] = resbm::cuda::to_tf32(m->b[t + 4 * i][g]);
    } else {
      const int k = 2 * t + 8 * i;
      b[i] = to16(DT, m->b[k][g]) | uint32_t(to16(DT, m->b[k + 1][g])) << 16;
    }
  }
  resbm::cuda::mma<DT>(c, a, b);
  __syncthreads();  // every lane has read its inputs before results overwrite m->c
  for (int i = 0; i < 4; ++i) m->c[g + 8 * (i / 2)][2 * t + i % 2] = c[i];
}

template <int DT>
void test_mma(const char* name) {
  MmaData<DT> m;
  constexpr int K = MmaData<DT>::K;
  float want[M][N];
  for (int r = 0; r < M; ++r)
    for (int k = 0; k < K; ++k) m.a[r][k] = float((r * 7 + k * 3) % 11 - 5);  // exact in every type
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < N; ++n) m.b[k][n] = float((k * 5 + n * 2) % 9 - 4) * 0.5f;
  for (int r = 0; r < M; ++r)
    for (int n = 0; n < N; ++n) {
      m.c[r][n] = float(r - n);
      want[r][n] = m.c[r][n];
      for (int k = 0; k < K; ++k) want[r][n] += m.a[r][k] * m.b[k][n];
    }
  launch(mma_kernel<DT>, dim3(1), dim3(32), 0, nullptr, &m);
  expect(cudaGetLastError() == cudaSuccess, name);
  expect(std::memcmp(m.c, want, sizeof want) == 0, name);
}

// cvt.rna.tf32.f32: nearest, ties away from zero, 10 mantissa bits.
void test_to_tf32() {
  const float ulp = 1.0f / 1024;  // of tf32 at 1
  const float cases[][2] = {{1 + ulp / 2, 1 + ulp},   {-(1 + ulp / 2), -(1 + ulp)},
                            {1 + ulp / 4, 1},         {1 + 3 * ulp / 4, 1 + ulp},
                            {1 + 3 * ulp / 2, 1 + 2 * ulp}};
  bool ok = true;
  for (const auto& c : cases) ok = ok && resbm::bits_float(resbm::cuda::to_tf32(c[0])) == c[1];
  expect(ok, "to_tf32 rounding");
}

// ---- ldmatrix.x4 ------------------------------------------------------------------------

__global__ void ldsm_kernel(uint32_t* out) {
  RESBM_DYNAMIC_SMEM(smem);
  uint16_t* s = reinterpret_cast<uint16_t*>(smem);  // 4 matrices of 8 x 8, rows 16 bytes apart
  const int lane = threadIdx.x;
  for (int e = lane; e < 256; e += 32) s[e] = uint16_t(e);
  __syncthreads();
  uint32_t r[4], rt[4];
  resbm::cuda::ldsm_x4(r, s + 8 * lane);  // lane l: row l % 8 of matrix l / 8
  resbm::cuda::ldsm_x4_trans(rt, s + 8 * lane);
  for (int i = 0; i < 4; ++i) {
    out[lane * 4 + i] = r[i];
    out[128 + lane * 4 + i] = rt[i];
  }
}

void test_ldmatrix() {
  std::vector<uint32_t> out(256);
  launch(ldsm_kernel, dim3(1), dim3(32), 512, nullptr, out.data());
  expect(cudaGetLastError() == cudaSuccess, "ldmatrix launch");
  bool ok = true, ok_trans = true;
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {  // element (row, column) of matrix i is 64 i + 8 row + column
      const uint32_t e = uint32_t(64 * i + 8 * (lane / 4) + 2 * (lane % 4));  // row lane / 4
      ok = ok && out[lane * 4 + i] == (e | (e + 1) << 16);
      const uint32_t et = uint32_t(64 * i + 8 * 2 * (lane % 4) + lane / 4);  // column lane / 4
      ok_trans = ok_trans && out[128 + lane * 4 + i] == (et | (et + 8) << 16);
    }
  expect(ok, "ldmatrix fragments");
  expect(ok_trans, "ldmatrix .trans fragments");
}

// ---- cp.async: lands at the wait, zero-fills, faults outside shared memory ----------------

__global__ void cp_async_kernel(const unsigned char* src, unsigned char* out, int offset) {
  RESBM_DYNAMIC_SMEM(smem);
  if (threadIdx.x != 0) return;
  resbm::cuda::cp_async16(smem + offset, src, 4);  // 4 bytes read, 12 zero-filled
  resbm::cuda::cp_async_commit();
  const bool inside = offset + 16 <= 64;  // (the launches' 64 bytes)
  if (inside) std::memcpy(out, smem + offset, 16);  // before the wait: nothing valid
  resbm::cuda::cp_async_wait<0>();
  if (inside) std::memcpy(out + 16, smem + offset, 16);
}

void test_cp_async() {
  alignas(16) unsigned char src[16];
  unsigned char out[32];
  for (int i = 0; i < 16; ++i) src[i] = uint8_t(i + 1);
  launch(cp_async_kernel, dim3(1), dim3(32), 64, nullptr, src, out, 16);
  expect(cudaGetLastError() == cudaSuccess, "cp.async launch");
  bool before = true, after = true;
  for (int i = 0; i < 16; ++i) {
    before = before && out[i] == 0xFF;
    after = after && out[16 + i] == (i < 4 ? i + 1 : 0);
  }
  expect(before, "cp.async destination before the wait");
  expect(after, "cp.async copy and zero fill after the wait");
  launch(cp_async_kernel, dim3(1), dim3(32), 64, nullptr, src, out, 56);  // past the end
  const cudaError_t e = cudaGetLastError();
  expect(e != cudaSuccess && std::strstr(cudaGetErrorString(e), "cp.async destination"),
         "cp.async outside shared memory fails the launch");
  expect(cudaGetLastError() == cudaSuccess, "cudaGetLastError clears the error");
}

// ---- wgmma: D = A (64 x 16) B^T (n x 16) through no-swizzle descriptors ------------------

constexpr int kWgN = 32;
constexpr int kWgB = 64 * 16 * 2;  // B's tile after A's

// Byte offset of element (row, kk) of a k-major tile of 16 columns in core matrices:
// LBO = 128 (the next 8 columns), SBO = 256 (the next 8 rows).
int core_offset(int row, int kk) { return (row / 8) * 256 + (kk / 8) * 128 + (row % 8) * 16 + (kk % 8) * 2; }

// mode 0: d = 1 + A B^T; 1: thread 0 changes an A element before its wait; 2: no wait.
__global__ void wgmma_kernel(const uint16_t* a, const uint16_t* b, float* out, int mode) {
  RESBM_DYNAMIC_SMEM(smem);
  for (int e = threadIdx.x; e < 64 * 16; e += blockDim.x)
    std::memcpy(smem + core_offset(e / 16, e % 16), a + e, 2);
  for (int e = threadIdx.x; e < kWgN * 16; e += blockDim.x)
    std::memcpy(smem + kWgB + core_offset(e / 16, e % 16), b + e, 2);
  __syncthreads();
  float d[kWgN / 8][4];
  for (auto& tile : d)
    for (float& v : tile) v = 1.0f;
  resbm::cuda::wgmma_fence();
  resbm::cuda::wgmma<resbm::kBFloat16, kWgN>(d, resbm::cuda::wgmma_desc(smem, 128, 256),
                                              resbm::cuda::wgmma_desc(smem + kWgB, 128, 256));
  resbm::cuda::wgmma_commit();
  if (mode == 1 && threadIdx.x == 0) smem[core_offset(0, 3)] ^= 1;
  if (mode == 2) return;
  resbm::cuda::wgmma_wait<0>();
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, row0 = 16 * (threadIdx.x / 32);
  for (int j = 0; j < kWgN / 8; ++j)
    for (int i = 0; i < 4; ++i) out[(row0 + g + 8 * (i / 2)) * kWgN + 8 * j + 2 * t + i % 2] = d[j][i];
}

void test_wgmma() {
  std::vector<uint16_t> a(64 * 16), b(kWgN * 16);
  for (size_t i = 0; i < a.size(); ++i) a[i] = resbm::float_to_bf16(float(int(i * 7 % 13) - 6));
  for (size_t i = 0; i < b.size(); ++i) b[i] = resbm::float_to_bf16(float(int(i * 5 % 11) - 5) / 4);
  std::vector<float> out(64 * kWgN, -1.0f);
  launch(wgmma_kernel, dim3(1), dim3(128), 2 * kWgB, nullptr, a.data(), b.data(), out.data(), 0);
  expect(cudaGetLastError() == cudaSuccess, "wgmma launch");
  bool ok = true;
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < kWgN; ++c) {
      float want = 1.0f;
      for (int kk = 0; kk < 16; ++kk) want += resbm::bf16_to_float(a[r * 16 + kk]) * resbm::bf16_to_float(b[c * 16 + kk]);
      ok = ok && out[r * kWgN + c] == want;
    }
  expect(ok, "wgmma m64n32k16 bf16: accumulators in the mma.sync C layout per warp");
  launch(wgmma_kernel, dim3(1), dim3(128), 2 * kWgB, nullptr, a.data(), b.data(), out.data(), 1);
  cudaError_t e = cudaGetLastError();
  expect(e != cudaSuccess && std::strstr(cudaGetErrorString(e), "changed before wgmma.wait_group"),
         "an operand overwritten before the wait fails the launch");
  launch(wgmma_kernel, dim3(1), dim3(128), 2 * kWgB, nullptr, a.data(), b.data(), out.data(), 2);
  e = cudaGetLastError();
  expect(e != cudaSuccess && std::strstr(cudaGetErrorString(e), "wgmma still pending"),
         "exiting with a wgmma not waited for fails the launch");
}

// ---- wgmma with A from registers: D = A (64 x 16) B^T (64 x 16), B without swizzle ------

__global__ void wgmma_rs_kernel(const uint16_t* a, const uint16_t* b, float* out) {
  RESBM_DYNAMIC_SMEM(smem);
  for (int e = threadIdx.x; e < 64 * 16; e += blockDim.x) std::memcpy(smem + core_offset(e / 16, e % 16), b + e, 2);
  __syncthreads();
  // the mma.sync A layout of the warp's rows 16 w..: reg i = row g + 8 (i % 2), columns 2t + 8 (i / 2) (+ 1)
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, row0 = 16 * (threadIdx.x / 32);
  uint32_t regs[4];
  for (int i = 0; i < 4; ++i) {
    const int e = (row0 + g + 8 * (i % 2)) * 16 + 2 * t + 8 * (i / 2);
    regs[i] = uint32_t(a[e]) | uint32_t(a[e + 1]) << 16;
  }
  float d[8][4] = {};
  resbm::cuda::wgmma_fence();
  resbm::cuda::wgmma_rs<resbm::kBFloat16, 64>(d, regs, resbm::cuda::wgmma_desc(smem, 128, 256));
  resbm::cuda::wgmma_commit();
  resbm::cuda::wgmma_wait<0>();
  for (int j = 0; j < 8; ++j)
    for (int i = 0; i < 4; ++i) out[(row0 + g + 8 * (i / 2)) * 64 + 8 * j + 2 * t + i % 2] = d[j][i];
}

void test_wgmma_rs() {
  std::vector<uint16_t> a(64 * 16), b(64 * 16);
  for (size_t i = 0; i < a.size(); ++i) a[i] = resbm::float_to_bf16(float(int(i * 7 % 13) - 6));
  for (size_t i = 0; i < b.size(); ++i) b[i] = resbm::float_to_bf16(float(int(i * 5 % 11) - 5) / 4);
  std::vector<float> out(64 * 64, -1.0f);
  launch(wgmma_rs_kernel, dim3(1), dim3(128), 64 * 16 * 2, nullptr, a.data(), b.data(), out.data());
  expect(cudaGetLastError() == cudaSuccess, "wgmma (A from registers) launch");
  bool ok = true;
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < 64; ++c) {
      float want = 0.0f;
      for (int kk = 0; kk < 16; ++kk) want += resbm::bf16_to_float(a[r * 16 + kk]) * resbm::bf16_to_float(b[c * 16 + kk]);
      ok = ok && out[r * 64 + c] == want;
    }
  expect(ok, "wgmma m64n64k16 bf16, A from registers in the mma.sync layout");
}

// ---- wgmma through 128-byte swizzled descriptors: D = A (64 x 64) B^T (n x 64) -----------
// Rows of 64 elements (128 bytes), 16-byte chunk c of row r at chunk c ^ (r % 8), 8-row groups
// 1024 bytes apart; the four k steps of 16 start 32 bytes apart in the rows.

constexpr int kSwK = 64;
constexpr int kSwB = 64 * kSwK * 2;  // B's tile after A's (1024-byte aligned)

int swizzled_offset(int row, int kk) { return row * 128 + ((kk / 8) ^ (row % 8)) * 16 + (kk % 8) * 2; }

// shift: bytes added to both tiles' starts (a multiple of 128 that is not one of 1024 fails)
__global__ void wgmma_swizzled_kernel(const uint16_t* a, const uint16_t* b, float* out, int shift) {
  RESBM_DYNAMIC_SMEM(smem);
  for (int e = threadIdx.x; e < 64 * kSwK; e += blockDim.x)
    std::memcpy(smem + swizzled_offset(e / kSwK, e % kSwK), a + e, 2);
  for (int e = threadIdx.x; e < kWgN * kSwK; e += blockDim.x)
    std::memcpy(smem + kSwB + swizzled_offset(e / kSwK, e % kSwK), b + e, 2);
  __syncthreads();
  float d[kWgN / 8][4] = {};
  resbm::cuda::wgmma_fence();
  for (int ks = 0; ks < kSwK / 16; ++ks)
    resbm::cuda::wgmma<resbm::kBFloat16, kWgN>(
        d, resbm::cuda::wgmma_desc(smem + shift + 32 * ks, 16, 1024, resbm::cuda::kSwizzle128),
        resbm::cuda::wgmma_desc(smem + kSwB + shift + 32 * ks, 16, 1024, resbm::cuda::kSwizzle128));
  resbm::cuda::wgmma_commit();
  resbm::cuda::wgmma_wait<0>();
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, row0 = 16 * (threadIdx.x / 32);
  for (int j = 0; j < kWgN / 8; ++j)
    for (int i = 0; i < 4; ++i) out[(row0 + g + 8 * (i / 2)) * kWgN + 8 * j + 2 * t + i % 2] = d[j][i];
}

void test_wgmma_swizzled() {
  std::vector<uint16_t> a(64 * kSwK), b(kWgN * kSwK);
  for (size_t i = 0; i < a.size(); ++i) a[i] = resbm::float_to_bf16(float(int(i * 7 % 13) - 6));
  for (size_t i = 0; i < b.size(); ++i) b[i] = resbm::float_to_bf16(float(int(i * 5 % 11) - 5) / 4);
  std::vector<float> out(64 * kWgN, -1.0f);
  const size_t smem = kSwB + kWgN * kSwK * 2 + 1024;
  launch(wgmma_swizzled_kernel, dim3(1), dim3(128), smem, nullptr, a.data(), b.data(), out.data(), 0);
  expect(cudaGetLastError() == cudaSuccess, "swizzled wgmma launch");
  bool ok = true;
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < kWgN; ++c) {
      float want = 0.0f;
      for (int kk = 0; kk < kSwK; ++kk) want += resbm::bf16_to_float(a[r * kSwK + kk]) * resbm::bf16_to_float(b[c * kSwK + kk]);
      ok = ok && out[r * kWgN + c] == want;
    }
  expect(ok, "wgmma m64n32k16 bf16, 128-byte swizzle: four k steps 32 bytes apart");
  launch(wgmma_swizzled_kernel, dim3(1), dim3(128), smem, nullptr, a.data(), b.data(), out.data(), 128);
  const cudaError_t e = cudaGetLastError();
  expect(e != cudaSuccess && std::strstr(cudaGetErrorString(e), "not 1024-byte aligned"),
         "a swizzled operand off the 1024-byte pattern fails the launch");
}

// ---- barriers: a warp collective and __syncthreads waiting on each other deadlock ---------

__global__ void deadlock_kernel() {
  if (threadIdx.x % 32 < 16) {
    __syncthreads();
  } else {
    (void)__shfl_xor_sync(0xFFFFFFFFu, 1.0f, 1);
  }
}

__global__ void shuffle_kernel(float* out) {
  float v = float(threadIdx.x);
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
  out[threadIdx.x] = v;  // every lane: the sum over its warp
}

void test_barriers() {
  launch(deadlock_kernel, dim3(2), dim3(64), 0, nullptr);
  const cudaError_t e = cudaGetLastError();
  expect(e != cudaSuccess && std::strstr(cudaGetErrorString(e), "deadlock"), "deadlock is reported");
  std::vector<float> out(64);
  launch(shuffle_kernel, dim3(1), dim3(64), 0, nullptr, out.data());
  expect(cudaGetLastError() == cudaSuccess, "shuffle launch");
  expect(out[0] == 496.0f && out[31] == 496.0f && out[32] == 1520.0f && out[63] == 1520.0f,
         "warp sums by __shfl_xor_sync");
}

// ---- launch checks: dynamic shared memory beyond the opt-in ------------------------------

__global__ void empty_kernel() {}

void test_smem_limits() {
  launch(empty_kernel, dim3(1), dim3(32), 64 * 1024, nullptr);
  expect(cudaGetLastError() == cudaErrorInvalidValue, "64 KB without the opt-in fails");
  const void* f = reinterpret_cast<const void*>(&empty_kernel);
  expect(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) == cudaSuccess,
         "opt into 64 KB");
  launch(empty_kernel, dim3(1), dim3(32), 64 * 1024, nullptr);
  expect(cudaGetLastError() == cudaSuccess, "64 KB after the opt-in");
  expect(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024) ==
             cudaErrorInvalidValue,
         "more than an sm_80 block can have is refused");
}

// A launch from inside a kernel (dynamic parallelism, which the kernels never use) fails
// with a message instead of waiting forever for the running launch.
__global__ void nested_launch_kernel(int* error) {
  if (threadIdx.x == 0) {
    launch(empty_kernel, dim3(1), dim3(32), 0, nullptr);
    const cudaError_t e = cudaGetLastError();
    *error = e != cudaSuccess && std::strstr(cudaGetErrorString(e), "inside a kernel") ? 1 : 0;
  }
}

void test_nested_launch() {
  int error = 0;
  launch(nested_launch_kernel, dim3(1), dim3(32), 0, nullptr, &error);
  expect(cudaGetLastError() == cudaSuccess && error == 1, "a launch inside a kernel is refused");
  launch(empty_kernel, dim3(1), dim3(32), 0, nullptr);
  expect(cudaGetLastError() == cudaSuccess, "launches work again after it");
}

}  // namespace

int main() {
  test_mma<resbm::kBFloat16>("mma bf16");
  test_mma<resbm::kFloat16>("mma fp16");
  test_mma<resbm::kFloat32>("mma tf32");
  test_to_tf32();
  test_ldmatrix();
  test_cp_async();
  test_barriers();
  test_smem_limits();
  test_nested_launch();
  test_wgmma();
  test_wgmma_swizzled();
  test_wgmma_rs();
  if (g_failures == 0) std::printf("emulator: all tests passed\n");
  return g_failures == 0 ? 0 : 1;
}
