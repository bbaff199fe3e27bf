// libresbm_cuda: the four fused ResBM passes and the weight-gradient reduction
// (same math as resbm_kernels/backends/reference.py and the Triton backend).
//
// Three kernel families, each a template over the input dtype DT and the
// padded bottleneck width KPAD (16, 32, 64, 128 or 256 >= k), and
// prepare_operand_kernel, which first writes a pass's weights in the tensor
// cores' operand types (RMSNorm weight folded in, tf32 hi + lo for fp32,
// zero-padded to KPAD) to the caller's workspace, once per call, so that no
// block converts weights: they stream in with cp.async like the activations.
//
//  project_quantize_kernel  (encode forward, decode backward)
//      One CTA of 128 threads per BN rows (BN = 64, or 32 when KPAD = 256).
//      Streams the (BN, d) input and the prepared (KPAD, d) weights through
//      shared memory in 128-byte-wide d tiles (64 when KPAD = 256; 16-byte
//      cp.async through PS buffers: up to four tiles in flight while one is
//      multiplied, fp32 double buffered), multiplies them on tensor cores (mma.sync; fp32
//      accumulators for all k columns stay in registers), gathers the row sums
//      of squares of the folded RMSNorm from the same A fragments (16-bit inputs:
//      on the tensor cores, the diagonal of A A^T), then scales,
//      adds the identity path x[:, :k], and quantizes + packs through the shared
//      codec functions of resbm/codec.h (bit-exact with the reference given z).
//      On sm_90a, 16-bit inputs with KPAD <= 128 (project_loop_wgmma): blocks of two
//      warpgroups, 64 rows each of the block's 128, both multiplying the same weight tiles
//      of 256 bytes a row up to KPAD = 32, 128 above (four buffers), in wgmma's 128-byte
//      swizzled layout, straight from shared memory (wgmma m64nKPADk16; each tile's wgmma
//      stays in flight while the next one's are issued), the sums of squares read
//      from the same tiles; the default there (0.61-0.81x mma.sync's time on an H200,
//      2026-11-28; RESBM_CUDA_WGMMA=0 keeps mma.sync).
//      For small n, grid.y splits d (pq_splits): each CTA then projects a run of d
//      tiles and writes fp32 partials, and finish_rows_kernel sums them in split
//      order and does the rest (finish_rows, shared with the unsplit kernel).
//  dequant_project_kernel   (decode forward, encode backward)
//      One CTA per BN rows and run of d (grid.y splits d while the row blocks alone
//      would leave the GPU part idle or its last wave half empty, dq_splits; output
//      columns are independent):
//      dequantizes its (BN, k) payload rows into shared
//      memory once (shared codec functions, eight elements' loads in flight per thread:
//      for_block_elements, as finish_rows reads x[:, :k]; for 16-bit inputs up to KPAD = 128
//      also into the tensor cores' A fragments once), then walks its d run in BD2-column tiles:
//      tensor-core product with the (BD2, KPAD) weight tile (w_d's rows as
//      they are for 16-bit decode forward, else prepared; the weight tiles
//      stream through a ring of RowCfg::WS cp.async buffers, the next ones
//      loading while this one is used), identity pad, residual, and the RMSNorm
//      backward terms, written with 16-byte stores (a whole tile with none of them
//      through store_plain_tile16 / store_plain_tile, without the per-chunk tests).
//      With RESBM_CUDA_WGMMA=1 (sm_90a, 16-bit, KPAD <= 128; slower on an H200) each tile's
//      product is one wgmma m64n64k16 a k step, A from the hoisted fragments, the
//      weight tile from shared memory as wgmma's core matrices.
//      Encode backward through RMSNorm first re-runs the projection loop of
//      the encoder over x for r = 1/rms(x) and s = x (gamma W)^T (as Triton),
//      unless given encode forward's row statistics. Its main loop's x tiles come
//      through the weight tiles' ring, copied with them (RowCfg::STAGE_X), unless
//      that leaves an SM one block (stage_x_wanted).
//  weight_grad_kernel       (grad W_d, grad W_e)
//      out[split][c][j] = sum_rows rscale[r] * zhat[r][c] * a[r][j]: a separate
//      pass over the big input; grid (d tiles, row splits), deterministic
//      per-split fp32 partials summed by the caller (no atomics). Its operand
//      (rscale * zhat)^T is written once per call by weight_operand_kernel (a block
//      per BN tokens, transposed through shared memory), split
//      in the tensor cores' type (hi + lo, see dequant_parts), to the caller's workspace, so every
//      d-tile block streams it with cp.async (with the input, blocks of 64 rows, 32 for
//      fp32, up to three stages) instead of dequantizing the payload. With
//      RESBM_CUDA_WGMMA=1 (sm_90a, 16-bit, KPAD <= 128; slower on an H200) the transposed product
//      x^T Z on wgmma: each warpgroup 64 d columns, x^T's fragments from registers, Z^T
//      from shared memory as wgmma's core matrices.
//
// Files: kernel_common.cuh (constants and device helpers), projection.cuh (RowCfg, the
// projection loops), row_kernels.cuh, weight_grad.cuh, launch.cuh (launchers, dispatch);
// this file validates the C API's arguments and launches through them.
//
// Precision (see mma.cuh): bf16/fp16 on 16-bit tensor cores with fp32
// accumulation, dequantized zhat rounded to bf16 (bf16) or split hi + lo (fp16), gamma-folded weights rounded
// once to the input dtype; fp32 inputs use 3xTF32. Requirements checked by the C API:
// d and k multiples of 16, k <= 256, k <= d, 16-byte aligned activations.
// Every launch goes on the caller's stream; nothing here synchronises.
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.cuh"
#include "resbm/c_api.h"

namespace resbm {
namespace cuda {
namespace {

int check_dims(const char* fn, int64_t n, int64_t d, int64_t k) {
  const long long N = n, D = d, K = k;
  if (n < 0 || d <= 0 || k <= 0)
    return fail(RESBM_ERR_ARG, fn, "bad shape n=%lld, d=%lld, k=%lld (need n >= 0, d > 0, k > 0)",
                N, D, K);
  if (d % 16 || k % 16)
    return fail(RESBM_ERR_ARG, fn, "d=%lld and k=%lld must both be multiples of 16", D, K);
  if (k > 256) return fail(RESBM_ERR_ARG, fn, "k=%lld is too large (at most 256)", K);
  if (k > d) return fail(RESBM_ERR_ARG, fn, "k=%lld exceeds d=%lld", K, D);
  if (d > (int64_t(1) << 31) || n > (int64_t(1) << 34) || n > INT64_MAX / 4 / d)
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

// A split count (grid.y of the kernel that takes it).
int check_splits(const char* fn, int splits) {
  if (splits < 1 || splits > kMaxGridY) return fail(RESBM_ERR_ARG, fn, "bad splits=%d (1..65535)", splits);
  return RESBM_OK;
}

// ---- workspace: the prepared weight operands of one call ------------------------------------

// The caller's workspace holds, in this order, the projection operand (KPAD, d): hi [, lo]
// (encode forward, decode backward, the RMSNorm pre-pass of encode backward), then the
// output projection's operand (d, KPAD): hi [, lo] (encode backward, and decode forward in
// fp32; 16-bit w_d streams as it is). One layout for the size query and the launches.
struct Workspace {
  int proj_parts = 0, w2_parts = 0;  // 0 (absent), 1 (hi) or 2 (hi, lo)
  size_t part = 0;                   // bytes of one part: KPAD x d operand elements

  size_t bytes() const { return size_t(proj_parts + w2_parts) * part; }
  void* part_at(void* base, int index) const {
    return static_cast<unsigned char*>(base) + size_t(index) * part;
  }
  void* proj(void* base, int lo) const { return lo < proj_parts ? part_at(base, lo) : nullptr; }
  void* w2(void* base, int lo) const {
    return lo < w2_parts ? part_at(base, proj_parts + lo) : nullptr;
  }
};

Workspace workspace_for(int pass, int dtype, int64_t d, int64_t k, bool norm) {
  const bool fp32 = dtype == kFloat32;
  Workspace w;
  w.part = size_t(kpad_of(k)) * size_t(d) * (fp32 ? 4 : 2);
  if (pass == RESBM_PASS_ENCODE_FORWARD || pass == RESBM_PASS_DECODE_BACKWARD ||
      (pass == RESBM_PASS_ENCODE_BACKWARD && norm))
    w.proj_parts = fp32 ? 2 : 1;  // tf32 hi + lo; 16-bit (gamma-folded or not): one part
  if (pass == RESBM_PASS_ENCODE_BACKWARD || (pass == RESBM_PASS_DECODE_FORWARD && fp32))
    w.w2_parts = fp32 ? 2 : 1;
  return w;
}

// The weight gradient's workspace: its Z^T operand, (KPAD, npad) hi [, lo]; bytes of one part.
size_t weight_grad_part(int dtype, int64_t n, int64_t k) {
  return size_t(kpad_of(k)) * size_t(operand_rows(n)) * (dtype == kFloat32 ? 4 : 2);
}

}  // namespace
}  // namespace cuda
}  // namespace resbm

using namespace resbm::cuda;
using resbm::dtype_bytes;
using resbm::kBFloat16;
using resbm::kFloat16;
using resbm::kFloat32;

extern "C" {

int resbm_cuda_workspace_bytes(int pass, int dtype, int64_t d, int64_t k, int norm,
                               int64_t* bytes) {
  const char* fn = "resbm_cuda_workspace_bytes";
  if (pass < RESBM_PASS_ENCODE_FORWARD || pass > RESBM_PASS_ENCODE_BACKWARD)
    return fail(RESBM_ERR_ARG, fn, "bad pass=%d (0 encode forward, 1 decode forward, "
                "2 decode backward, 3 encode backward)", pass);
  RESBM_TRY(check_dims(fn, 0, d, k));
  RESBM_TRY(check_dtype(fn, "dtype", dtype));
  RESBM_TRY(check_ptr(fn, "bytes", bytes, alignof(int64_t), true));
  *bytes = int64_t(workspace_for(pass, dtype, d, k, norm != 0).bytes());
  return RESBM_OK;
}

int resbm_cuda_projection_splits(int dtype, int64_t n, int64_t d, int64_t k, int* splits) {
  const char* fn = "resbm_cuda_projection_splits";
  RESBM_TRY(check_dims(fn, n, d, k));
  RESBM_TRY(check_dtype(fn, "dtype", dtype));
  RESBM_TRY(check_ptr(fn, "splits", splits, alignof(int), true));
  RESBM_DISPATCH(pq_splits, dtype, k, fn, n, d, splits);
}

int resbm_cuda_encode_forward(const void* x, int dtype, int64_t n, int64_t d, int64_t k,
                              const void* w_e, const void* norm_weight, float eps, int bits,
                              int group, int scale_dtype, int stochastic, uint64_t seed,
                              const int64_t* seed_offset, uint8_t* codes, void* scales,
                              const int32_t* header, float* row_stats, float* partial,
                              int splits, void* workspace, void* stream) {
  const char* fn = "resbm_cuda_encode_forward";
  RESBM_TRY(check_dims(fn, n, d, k));
  RESBM_TRY(check_dtype(fn, "dtype", dtype));
  RESBM_TRY(resbm::check_args(fn, "x", x, dtype, n, k, bits, group, scale_dtype, codes, scales,
                              g_error, sizeof g_error));
  if (n == 0) return RESBM_OK;
  RESBM_TRY(check_ptr(fn, "x", x, 16, true));
  RESBM_TRY(check_ptr(fn, "w_e", w_e, dtype_bytes(dtype), true));
  RESBM_TRY(check_ptr(fn, "norm_weight", norm_weight, dtype_bytes(dtype), false));
  RESBM_TRY(check_ptr(fn, "row_stats", row_stats, sizeof(float), false));
  RESBM_TRY(check_ptr(fn, "seed_offset", seed_offset, alignof(int64_t), false));
  RESBM_TRY(check_splits(fn, splits));
  RESBM_TRY(check_ptr(fn, "partial", partial, sizeof(float), splits > 1));  // (splits, n, k + 1) fp32
  RESBM_TRY(check_ptr(fn, "workspace", workspace, 16, true));
  const bool norm = norm_weight != nullptr;
  if (row_stats != nullptr && !norm)
    return fail(RESBM_ERR_ARG, fn, "row_stats are RMSNorm statistics: they need norm_weight");
  const Workspace ws = workspace_for(RESBM_PASS_ENCODE_FORWARD, dtype, d, k, norm);
  // operand (KPAD, d): B(dd, c) = w_e[c * d + dd] * gamma[dd]
  const PrepArgs prep{w_e, /*s_r=*/d, /*s_c=*/1, norm_weight, kpad_of(k), d, k, d,
                      ws.proj(workspace, 0), ws.proj(workspace, 1)};
  const PQArgs p = with_header({x, prep.hi, prep.lo, norm, n, d, k, eps, bits, group, scale_dtype,
                                stochastic, seed, seed_offset, codes, scales, row_stats, partial,
                                splits, 0, {}},
                               header);
  RESBM_DISPATCH(launch_pq, dtype, k, fn, p, prep, static_cast<cudaStream_t>(stream));
}

int resbm_cuda_decode_backward(const void* grad_h, int dtype, int64_t n, int64_t d, int64_t k,
                               const void* w_d, int bits, int group, int scale_dtype,
                               int stochastic, uint64_t seed, const int64_t* seed_offset,
                               uint8_t* codes, void* scales, const int32_t* header,
                               float* partial, int splits, void* workspace, void* stream) {
  const char* fn = "resbm_cuda_decode_backward";
  RESBM_TRY(check_dims(fn, n, d, k));
  RESBM_TRY(check_dtype(fn, "dtype", dtype));
  RESBM_TRY(resbm::check_args(fn, "grad_h", grad_h, dtype, n, k, bits, group, scale_dtype, codes,
                              scales, g_error, sizeof g_error));
  if (n == 0) return RESBM_OK;
  RESBM_TRY(check_ptr(fn, "grad_h", grad_h, 16, true));
  RESBM_TRY(check_ptr(fn, "w_d", w_d, dtype_bytes(dtype), true));
  RESBM_TRY(check_ptr(fn, "seed_offset", seed_offset, alignof(int64_t), false));
  RESBM_TRY(check_splits(fn, splits));
  RESBM_TRY(check_ptr(fn, "partial", partial, sizeof(float), splits > 1));  // (splits, n, k + 1) fp32
  RESBM_TRY(check_ptr(fn, "workspace", workspace, 16, true));
  const Workspace ws = workspace_for(RESBM_PASS_DECODE_BACKWARD, dtype, d, k, false);
  // g_z = grad_h @ w_d (+ identity): operand (KPAD, d), B(dd, c) = w_d[dd * k + c]
  const PrepArgs prep{w_d, /*s_r=*/1, /*s_c=*/k, nullptr, kpad_of(k), d, k, d,
                      ws.proj(workspace, 0), ws.proj(workspace, 1)};
  const PQArgs p = with_header({grad_h, prep.hi, prep.lo, 0, n, d, k, 0.0f, bits, group, scale_dtype,
                                stochastic, seed, seed_offset, codes, scales, nullptr, partial,
                                splits, 0, {}},
                               header);
  RESBM_DISPATCH(launch_pq, dtype, k, fn, p, prep, static_cast<cudaStream_t>(stream));
}

int resbm_cuda_decode_forward(const uint8_t* codes, const void* scales, int64_t n, int64_t d,
                              int64_t k, int bits, int group, int scale_dtype, const void* w_d,
                              int w_dtype, const void* residual, void* out, int out_dtype,
                              void* workspace, void* stream) {
  const char* fn = "resbm_cuda_decode_forward";
  RESBM_TRY(check_dims(fn, n, d, k));
  RESBM_TRY(check_dtype(fn, "w_dtype", w_dtype));
  RESBM_TRY(resbm::check_args(fn, "out", out, out_dtype, n, k, bits, group, scale_dtype, codes,
                              scales, g_error, sizeof g_error));
  if (n == 0) return RESBM_OK;
  const Workspace ws = workspace_for(RESBM_PASS_DECODE_FORWARD, w_dtype, d, k, false);
  RESBM_TRY(check_ptr(fn, "out", out, 16, true));
  RESBM_TRY(check_ptr(fn, "residual", residual, 16, false));
  RESBM_TRY(check_ptr(fn, "w_d", w_d, 16, true));
  RESBM_TRY(check_ptr(fn, "workspace", workspace, 16, ws.bytes() > 0));
  // h = zhat @ w_d^T: B(dd, c) = w_d[dd * k + c], (d, k) rows streamed as they are (16-bit
  // weights are exact operands), or prepared as (d, KPAD) hi + lo (fp32)
  const PrepArgs prep{w_d, /*s_r=*/k, /*s_c=*/1, nullptr, d, kpad_of(k), d, k,
                      ws.w2(workspace, 0), ws.w2(workspace, 1)};
  const bool prepared = ws.w2_parts > 0;
  const DQArgs p{codes, scales, bits, group, scale_dtype,
                 prepared ? prep.hi : w_d, prep.lo, prepared ? kpad_of(k) : k,
                 prepared ? kpad_of(k) : k, nullptr, nullptr, nullptr, nullptr, 0.0f, residual,
                 out, out_dtype, nullptr, nullptr, n, d, k};
  RESBM_DISPATCH(launch_dq, w_dtype, k, fn, p, &prep, prepared ? 1 : 0,
                 static_cast<cudaStream_t>(stream));
}

int resbm_cuda_encode_backward(const uint8_t* codes, const void* scales, int64_t n, int64_t d,
                               int64_t k, int bits, int group, int scale_dtype, const void* x,
                               int dtype, const void* w_e, const void* norm_weight, float eps,
                               void* grad_x, float* rscale, const float* row_stats,
                               void* workspace, void* stream) {
  const char* fn = "resbm_cuda_encode_backward";
  RESBM_TRY(check_dims(fn, n, d, k));
  RESBM_TRY(resbm::check_args(fn, "grad_x", grad_x, dtype, n, k, bits, group, scale_dtype, codes,
                              scales, g_error, sizeof g_error));
  if (n == 0) return RESBM_OK;
  RESBM_TRY(check_ptr(fn, "grad_x", grad_x, 16, true));
  RESBM_TRY(check_ptr(fn, "w_e", w_e, dtype_bytes(dtype), true));
  const bool norm = norm_weight != nullptr;
  if (norm) {
    RESBM_TRY(check_ptr(fn, "x", x, 16, true));
    RESBM_TRY(check_ptr(fn, "norm_weight", norm_weight, 16, true));
    RESBM_TRY(check_ptr(fn, "rscale", rscale, 4, false));
    RESBM_TRY(check_ptr(fn, "row_stats", row_stats, sizeof(float), false));
  } else if (row_stats != nullptr) {
    return fail(RESBM_ERR_ARG, fn, "row_stats are RMSNorm statistics: they need norm_weight");
  }
  RESBM_TRY(check_ptr(fn, "workspace", workspace, 16, true));
  const Workspace ws = workspace_for(RESBM_PASS_ENCODE_BACKWARD, dtype, d, k, norm);
  // grad_x = g_z @ w_e (+ identity, + RMSNorm backward): operand (d, KPAD),
  // B(dd, c) = w_e[c * d + dd]; the pre-pass's (KPAD, d) as in encode forward
  const PrepArgs preps[2] = {
      {w_e, /*s_r=*/1, /*s_c=*/d, nullptr, d, kpad_of(k), d, k, ws.w2(workspace, 0),
       ws.w2(workspace, 1)},
      {w_e, /*s_r=*/d, /*s_c=*/1, norm_weight, kpad_of(k), d, k, d, ws.proj(workspace, 0),
       ws.proj(workspace, 1)}};
  const DQArgs p{codes, scales, bits, group, scale_dtype, preps[0].hi, preps[0].lo,
                 kpad_of(k), kpad_of(k), preps[1].hi, preps[1].lo, norm ? x : nullptr,
                 norm_weight, eps, nullptr, grad_x, dtype, norm ? rscale : nullptr, row_stats,
                 n, d, k};
  // the pre-pass's operand only without the statistics
  RESBM_DISPATCH(launch_dq, dtype, k, fn, p, preps, norm && row_stats == nullptr ? 2 : 1,
                 static_cast<cudaStream_t>(stream));
}

int resbm_cuda_weight_grad_workspace_bytes(int dtype, int64_t n, int64_t k, int64_t* bytes) {
  const char* fn = "resbm_cuda_weight_grad_workspace_bytes";
  if (n < 0 || n > (int64_t(1) << 34)) return fail(RESBM_ERR_ARG, fn, "bad n=%lld (0..2^34)", (long long)n);
  if (k <= 0 || k % 16 || k > 256)
    return fail(RESBM_ERR_ARG, fn, "bad k=%lld (a positive multiple of 16, at most 256)", (long long)k);
  RESBM_TRY(check_dtype(fn, "dtype", dtype));
  RESBM_TRY(check_ptr(fn, "bytes", bytes, alignof(int64_t), true));
  *bytes = dequant_parts(dtype) * int64_t(weight_grad_part(dtype, n, k));
  return RESBM_OK;
}

int resbm_cuda_weight_grad(const void* a, int dtype, int64_t n, int64_t d, int64_t k,
                           const uint8_t* codes, const void* scales, int bits, int group,
                           int scale_dtype, const float* rscale, int splits, int transpose,
                           float* partial, void* workspace, void* stream) {
  const char* fn = "resbm_cuda_weight_grad";
  RESBM_TRY(check_dims(fn, n, d, k));
  RESBM_TRY(check_dtype(fn, "dtype", dtype));
  RESBM_TRY(resbm::check_args(fn, "a", a, dtype, n, k, bits, group, scale_dtype, codes, scales,
                              g_error, sizeof g_error));
  RESBM_TRY(check_splits(fn, splits));
  RESBM_TRY(check_ptr(fn, "partial", partial, 4, true));
  RESBM_TRY(check_ptr(fn, "a", a, 16, n > 0));
  RESBM_TRY(check_ptr(fn, "rscale", rscale, 4, false));
  RESBM_TRY(check_ptr(fn, "workspace", workspace, 16, n > 0));
  // every split writes its whole (k, d) partial, zeros when it has no rows; split starts are
  // multiples of kWgRows, so the Z^T chunks they copy stay 16-byte aligned
  const int64_t rows_per_split = ((n + splits - 1) / splits + kWgRows - 1) / kWgRows * kWgRows;
  const int64_t npad = operand_rows(n), kpad = kpad_of(k);
  void* zlo = dequant_parts(dtype) == 2 ? static_cast<unsigned char*>(workspace) + weight_grad_part(dtype, n, k)
                                        : nullptr;
  const WOArgs op{codes, scales, bits, group, scale_dtype, rscale, workspace, zlo, n, k, kpad, npad};
  const WGArgs p{a, workspace, zlo, partial, d * k, transpose ? 1 : d, transpose ? k : 1,
                 n, d, k, npad, rows_per_split > 0 ? rows_per_split : kWgRows};
  RESBM_DISPATCH(launch_wg, dtype, k, fn, op, p, splits, static_cast<cudaStream_t>(stream));
}

int resbm_cuda_finish_weight_grad(const float* partial, int splits, int64_t rows, int64_t cols,
                                  void* out, int out_dtype, const void* norm_weight, const void* w,
                                  void* grad_norm, int norm_dtype, void* stream) {
  const char* fn = "resbm_cuda_finish_weight_grad";
  if (rows <= 0 || cols <= 0 || rows > (int64_t(1) << 31) || cols > (int64_t(1) << 31))
    return fail(RESBM_ERR_ARG, fn, "bad shape rows=%lld cols=%lld", (long long)rows, (long long)cols);
  RESBM_TRY(check_splits(fn, splits));
  RESBM_TRY(check_dtype(fn, "out_dtype", out_dtype));
  RESBM_TRY(check_ptr(fn, "partial", partial, 4, true));
  RESBM_TRY(check_ptr(fn, "out", out, dtype_bytes(out_dtype), true));
  const bool norm = norm_weight != nullptr;
  if (norm) {
    RESBM_TRY(check_dtype(fn, "norm_dtype", norm_dtype));
    RESBM_TRY(check_ptr(fn, "norm_weight", norm_weight, dtype_bytes(norm_dtype), true));
    RESBM_TRY(check_ptr(fn, "w", w, dtype_bytes(out_dtype), true));
    RESBM_TRY(check_ptr(fn, "grad_norm", grad_norm, dtype_bytes(norm_dtype), true));
  }
  const FinishArgs p{partial, splits, rows, cols, out, out_dtype, norm_weight, w, grad_norm, norm_dtype};
  const int64_t per_block = norm ? kFinishCols : kFinishThreads * kSumElems;  // columns, else elements
  const int64_t items = norm ? cols : rows * cols;
  const int64_t blocks = (items + per_block - 1) / per_block < 4096 ? (items + per_block - 1) / per_block : 4096;
  const size_t smem = norm ? kFinishThreads * sizeof(float) : 0;  // the slices' partial grad_gamma
  launch(finish_weight_grad_kernel, unsigned(blocks), kFinishThreads, smem, static_cast<cudaStream_t>(stream), p);
  return launch_status(fn, "finish_weight_grad_kernel");
}

}  // extern "C"
