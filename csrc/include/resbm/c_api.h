/* C ABI of libresbm_cpu and libresbm_cuda (loaded with ctypes by resbm_kernels.native).
 *
 * Layout (that of codec.payload_views): `codes` is n rows of k*bits/8 bytes,
 * row-major; `scales` is n x (k/group) values of `scale_dtype`, row-major
 * (unused, may be NULL, for bits=16). dtype codes: 1 float32, 2 float16,
 * 3 bfloat16 (the wire-format scale codes) for z, scales and out alike.
 * `key` is codec.rng_key(seed), used when `stochastic` is nonzero.
 *
 * Every function returns 0 on success, nonzero on error; resbm_last_error()
 * then returns a message naming the problem (thread-local, valid until the
 * next failing call on this thread).
 */
#ifndef RESBM_C_API_H
#define RESBM_C_API_H

#include <stdint.h>

#if defined(_WIN32)
#define RESBM_API __declspec(dllexport)
#else
#define RESBM_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

enum { RESBM_OK = 0, RESBM_ERR_ARG = 1, RESBM_ERR_NONFINITE = 2, RESBM_ERR_CUDA = 3 };

RESBM_API int resbm_abi_version(void);
RESBM_API const char* resbm_last_error(void);

/* CPU: quantize z (n x k of z_dtype) and pack into codes/scales. Fails with
 * RESBM_ERR_NONFINITE ("non-finite input" / "scale overflow") like the reference. */
RESBM_API int resbm_cpu_quantize_pack(const void* z, int z_dtype, int64_t n, int64_t k, int bits,
                                      int group, int scale_dtype, int stochastic, uint32_t key,
                                      uint8_t* codes, void* scales);
RESBM_API int resbm_cpu_unpack_dequantize(const uint8_t* codes, const void* scales, int64_t n,
                                          int64_t k, int bits, int group, int scale_dtype,
                                          int out_dtype, void* out);

/* CUDA: same arguments (device pointers), launched asynchronously on `stream`
 * (a cudaStream_t; NULL is the default stream). Only argument and launch errors
 * are reported: a non-finite group yields a non-finite scale (bits=16: a
 * non-finite code), which the caller checks. */
RESBM_API int resbm_cuda_quantize_pack(const void* z, int z_dtype, int64_t n, int64_t k, int bits,
                                       int group, int scale_dtype, int stochastic, uint32_t key,
                                       uint8_t* codes, void* scales, void* stream);
RESBM_API int resbm_cuda_unpack_dequantize(const uint8_t* codes, const void* scales, int64_t n,
                                           int64_t k, int bits, int group, int scale_dtype,
                                           int out_dtype, void* out, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* RESBM_C_API_H */
