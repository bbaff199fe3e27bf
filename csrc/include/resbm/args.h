// Host-side argument validation and error messages shared by the CPU and CUDA libraries.
#pragma once

#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>

#include "resbm/c_api.h"
#include "resbm/codec.h"

namespace resbm {

// Writes "<fn>: <printf-formatted message>" to err and returns `code`.
inline int vformat_error(char* err, size_t len, int code, const char* fn, const char* fmt, va_list ap) {
  int used = std::snprintf(err, len, "%s: ", fn);
  if (used < 0 || size_t(used) >= len) return code;
  std::vsnprintf(err + used, len - size_t(used), fmt, ap);
  return code;
}

inline int format_error(char* err, size_t len, int code, const char* fn, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vformat_error(err, len, code, fn, fmt, ap);
  va_end(ap);
  return code;
}

// Checks the arguments of a quantize_pack / unpack_dequantize call. `data` is
// z (quantize) or out (dequantize), named `data_name` in messages. Returns
// RESBM_OK, or RESBM_ERR_ARG with the message written to err.
inline int check_args(const char* fn, const char* data_name, const void* data, int data_dtype,
                      int64_t n, int64_t k, int bits, int group, int scale_dtype,
                      const void* codes, const void* scales, char* err, size_t len) {
  const int A = RESBM_ERR_ARG;
  const long long N = n, K = k;
  if (bits != 16 && bits != 8 && bits != 4 && bits != 2)
    return format_error(err, len, A, fn, "bad bits=%d (supported: 16, 8, 4, 2)", bits);
  if (n < 0 || k <= 0)
    return format_error(err, len, A, fn, "bad shape n=%lld, k=%lld (need n >= 0, k > 0)", N, K);
  if (k > (int64_t(1) << 31) || n > INT64_MAX / 4 / k)  // (k * bits below stays in range)
    return format_error(err, len, A, fn, "shape n=%lld, k=%lld is too large", N, K);
  if (!valid_dtype(data_dtype))
    return format_error(err, len, A, fn, "bad %s_dtype=%d (1 fp32, 2 fp16, 3 bf16)", data_name,
                        data_dtype);
  if ((k * bits) % 8)
    return format_error(err, len, A, fn, "k=%lld x bits=%d is not a whole number of bytes", K, bits);
  if (bits != 16) {
    if (!valid_dtype(scale_dtype))
      return format_error(err, len, A, fn, "bad scale_dtype=%d (1 fp32, 2 fp16, 3 bf16)",
                          scale_dtype);
    if (group <= 0 || k % group)
      return format_error(err, len, A, fn, "group=%d does not divide k=%lld", group, K);
    if ((int64_t(group) * bits) % 8)
      return format_error(err, len, A, fn, "group=%d x bits=%d is not a whole number of bytes",
                          group, bits);
  }
  if (n > 0 && data == nullptr)
    return format_error(err, len, A, fn, "null pointer %s", data_name);
  if (n > 0 && codes == nullptr) return format_error(err, len, A, fn, "null pointer codes");
  if (n > 0 && bits != 16 && scales == nullptr)
    return format_error(err, len, A, fn, "null pointer scales");
  // element alignment: the kernels access values, codes (uint16 when bits == 16) and scales whole
  const int scale_bytes = bits == 16 ? 1 : dtype_bytes(scale_dtype);
  if (n > 0 && reinterpret_cast<uintptr_t>(data) % dtype_bytes(data_dtype))
    return format_error(err, len, A, fn, "%s is not %d-byte aligned", data_name,
                        dtype_bytes(data_dtype));
  if (n > 0 && reinterpret_cast<uintptr_t>(codes) % (bits == 16 ? 2 : 1))
    return format_error(err, len, A, fn, "codes is not 2-byte aligned (bits=16)");
  if (n > 0 && reinterpret_cast<uintptr_t>(scales) % scale_bytes)
    return format_error(err, len, A, fn, "scales is not %d-byte aligned", scale_bytes);
  return RESBM_OK;
}

}  // namespace resbm
