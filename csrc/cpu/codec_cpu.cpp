// libresbm_cpu: the codec on the CPU, from the same headers as the CUDA kernels.
#include <cmath>
#include <cstdint>

#include "resbm/args.h"
#include "resbm/c_api.h"
#include "resbm/codec.h"

namespace {

thread_local char g_error[512] = "";

const char* dtype_name(int dtype) {
  return dtype == resbm::kFloat16 ? "fp16" : dtype == resbm::kBFloat16 ? "bf16" : "fp32";
}

// bits=16: codes are the little-endian bf16 bytes of z.
int pack_bf16(const void* z, int z_dtype, int64_t count, uint8_t* codes) {
  for (int64_t i = 0; i < count; ++i) {
    float v = resbm::load_float(z, i, z_dtype);
    if (!std::isfinite(v))
      return resbm::format_error(g_error, sizeof g_error, RESBM_ERR_NONFINITE,
                                 "resbm_cpu_quantize_pack",
                                 "non-finite input (inf or nan) at element %lld", (long long)i);
    uint16_t h = resbm::float_to_bf16(v);
    codes[2 * i] = uint8_t(h & 0xFF);
    codes[2 * i + 1] = uint8_t(h >> 8);
  }
  return RESBM_OK;
}

}  // namespace

extern "C" {

int resbm_abi_version(void) { return RESBM_ABI_VERSION; }

const char* resbm_last_error(void) { return g_error; }

int resbm_cpu_quantize_pack(const void* z, int z_dtype, int64_t n, int64_t k, int bits, int group,
                            int scale_dtype, int stochastic, uint32_t key, uint8_t* codes,
                            void* scales) {
  const char* fn = "resbm_cpu_quantize_pack";
  int rc = resbm::check_args(fn, "z", z, z_dtype, n, k, bits, group, scale_dtype, codes, scales,
                             g_error, sizeof g_error);
  if (rc != RESBM_OK) return rc;
  if (bits == 16) return pack_bf16(z, z_dtype, n * k, codes);

  const int qmax = resbm::qmax_of(bits), per = 8 / bits;
  const int64_t groups = k / group, row_bytes = k * bits / 8;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t base = r * k + gi * group;
      float absmax = 0.0f;
      for (int64_t j = 0; j < group; ++j)
        absmax = resbm::absmax_update(absmax, resbm::load_float(z, base + j, z_dtype));
      if (!std::isfinite(absmax))
        return resbm::format_error(g_error, sizeof g_error, RESBM_ERR_NONFINITE, fn,
                                   "non-finite input (inf or nan) in row %lld, group %lld",
                                   (long long)r, (long long)gi);
      const float s = resbm::group_scale(absmax, qmax, scale_dtype);
      if (!std::isfinite(s))
        return resbm::format_error(g_error, sizeof g_error, RESBM_ERR_NONFINITE, fn,
                                   "scale overflow: absmax %g / %d does not fit the %s scale "
                                   "(row %lld, group %lld)",
                                   double(absmax), qmax, dtype_name(scale_dtype), (long long)r,
                                   (long long)gi);
      resbm::store_float(scales, r * groups + gi, scale_dtype, s);
      const float inv = resbm::inv_scale(s);
      uint8_t* out = codes + r * row_bytes + gi * group * bits / 8;
      for (int64_t b = 0; b < group / per; ++b)
        out[b] = resbm::quantize_byte(z, z_dtype, base + b * per, bits, inv, stochastic != 0, key);
    }
  }
  return RESBM_OK;
}

int resbm_cpu_unpack_dequantize(const uint8_t* codes, const void* scales, int64_t n, int64_t k,
                                int bits, int group, int scale_dtype, int out_dtype, void* out) {
  int rc = resbm::check_args("resbm_cpu_unpack_dequantize", "out", out, out_dtype, n, k, bits,
                             group, scale_dtype, codes, scales, g_error, sizeof g_error);
  if (rc != RESBM_OK) return rc;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c)
      resbm::store_float(out, r * k + c, out_dtype,
                         resbm::dequantize_at(codes, scales, r, c, k, bits, group, scale_dtype));
  return RESBM_OK;
}

}  // extern "C"
