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
 * next failing call on this thread). The functions check shapes, dtypes,
 * pointers and their alignment, not buffer sizes, which the ABI does not
 * carry: each buffer must hold what the shapes say (resbm_kernels checks the
 * tensors' sizes before it calls).
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

/* returned by resbm_abi_version() of both libraries; raised on any signature change */
#define RESBM_ABI_VERSION 7

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

/* ---- CUDA: the four fused passes (csrc/cuda/passes.cu) -----------------------------
 *
 * Device pointers, launched asynchronously on `stream` (a cudaStream_t; NULL
 * is the default stream); nothing synchronises. Activations (x, grad_h, out,
 * grad_x, residual) are row-major (n, d) with rows of exactly d elements and
 * 16-byte aligned; w_e is (k, d) and w_d is (d, k), row-major (w_d 16-byte
 * aligned in decode forward, whose 16-bit rows stream as they are); norm_weight is
 * (d,) or NULL (no RMSNorm). `dtype` is that of x / grad_h and of the weights
 * and norm weight. The payload arguments (codes, scales, bits, group,
 * scale_dtype, stochastic) are those of resbm_cuda_quantize_pack; instead of its
 * key, the kernels take `seed` and `seed_offset` (device memory, one int64, or
 * NULL for 0) and round with key codec.rng_key(seed + *seed_offset), read on the
 * device: a captured CUDA graph whose offset moves draws anew at each replay. d and
 * k must be multiples of 16, k <= 256 and k <= d. Errors: RESBM_ERR_ARG for
 * bad arguments (found before any CUDA call), RESBM_ERR_CUDA naming the
 * kernel when a launch fails; non-finite values are not reported.
 *
 * `workspace`: device memory, 16-byte aligned, of at least the size
 * resbm_cuda_workspace_bytes gives for the pass (NULL allowed when that is 0),
 * not used by anything else until the pass has run on `stream`: each call first
 * writes its weights there in the tensor cores' operand types (RMSNorm folded
 * in, tf32 hi + lo for float32), once, instead of in every block. */

enum {
  RESBM_PASS_ENCODE_FORWARD = 0,
  RESBM_PASS_DECODE_FORWARD = 1,
  RESBM_PASS_DECODE_BACKWARD = 2,
  RESBM_PASS_ENCODE_BACKWARD = 3
};

/* *bytes = the workspace a pass needs for (dtype, d, k, norm: norm_weight given) */
RESBM_API int resbm_cuda_workspace_bytes(int pass, int dtype, int64_t d, int64_t k, int norm,
                                         int64_t* bytes);

/* *splits = the d splits (>= 1) to give resbm_cuda_encode_forward / _decode_backward for n
 * rows of (d, k, dtype) on the current device: more than one while their blocks of rows alone
 * would leave the GPU part idle (small n); then each split's blocks write float32 partials
 * [projection | sum of squares] of their run of d to `partial` ((splits, n, k+1) float32,
 * 4-byte aligned, not used by anything else until the pass has run), which a second kernel
 * sums in split order and finishes (the result does not depend on timing). */
RESBM_API int resbm_cuda_projection_splits(int dtype, int64_t n, int64_t d, int64_t k, int* splits);

/* payload of z = RMSNorm(x) w_e^T + x[:, :k] (no norm when norm_weight is NULL);
 * row_stats (float32 (n, k+1), or NULL; needs norm_weight) receives [RMSNorm(x) w_e^T | 1/rms(x)].
 * header (host memory, 4 int32 words, or NULL; this pass and decode backward): written, with
 * n > 0, as the 16 bytes before codes, and the codes region's padding to 16 bytes is zeroed
 * (the payload layout of resbm_kernels/codec.py), by the kernel that writes the codes */
RESBM_API int resbm_cuda_encode_forward(const void* x, int dtype, int64_t n, int64_t d, int64_t k,
                                        const void* w_e, const void* norm_weight, float eps,
                                        int bits, int group, int scale_dtype, int stochastic,
                                        uint64_t seed, const int64_t* seed_offset,
                                        uint8_t* codes, void* scales,
                                        const int32_t* header, float* row_stats, float* partial,
                                        int splits, void* workspace, void* stream);
/* out (n, d) of out_dtype = zhat w_d^T + pad_d(zhat) (+ residual, of out_dtype, or NULL) */
RESBM_API int resbm_cuda_decode_forward(const uint8_t* codes, const void* scales, int64_t n,
                                        int64_t d, int64_t k, int bits, int group,
                                        int scale_dtype, const void* w_d, int w_dtype,
                                        const void* residual, void* out, int out_dtype,
                                        void* workspace, void* stream);
/* gradient payload of g_z = grad_h w_d + grad_h[:, :k] (grad_w_d: resbm_cuda_weight_grad) */
RESBM_API int resbm_cuda_decode_backward(const void* grad_h, int dtype, int64_t n, int64_t d,
                                         int64_t k, const void* w_d, int bits, int group,
                                         int scale_dtype, int stochastic, uint64_t seed,
                                         const int64_t* seed_offset, uint8_t* codes,
                                         void* scales, const int32_t* header,
                                         float* partial, int splits, void* workspace, void* stream);
/* grad_x (n, d) of dtype from the gradient payload g_z: g_z w_e + pad_d(g_z), through the
 * RMSNorm backward when norm_weight is set (then x is read and, if rscale is not NULL,
 * r = 1/rms(x) is written to rscale (n,) float32 for the weight gradient); row_stats (or
 * NULL; needs norm_weight): resbm_cuda_encode_forward's for this x, which spare a pre-pass */
RESBM_API int resbm_cuda_encode_backward(const uint8_t* codes, const void* scales, int64_t n,
                                         int64_t d, int64_t k, int bits, int group,
                                         int scale_dtype, const void* x, int dtype,
                                         const void* w_e, const void* norm_weight, float eps,
                                         void* grad_x, float* rscale, const float* row_stats,
                                         void* workspace, void* stream);
/* bytes of the device workspace resbm_cuda_weight_grad needs for n rows and k columns */
RESBM_API int resbm_cuda_weight_grad_workspace_bytes(int dtype, int64_t n, int64_t k, int64_t* bytes);
/* partial[s] = sum over the rows of split s of (rscale[r] * zhat[r])^T a[r]: float32
 * (splits, k, d), or (splits, d, k) when transpose; rscale may be NULL (1). The caller
 * sums the splits (deterministic). zhat is read from the payload codes/scales, once, into
 * the workspace (16-byte aligned, resbm_cuda_weight_grad_workspace_bytes). */
RESBM_API int resbm_cuda_weight_grad(const void* a, int dtype, int64_t n, int64_t d, int64_t k,
                                     const uint8_t* codes, const void* scales, int bits,
                                     int group, int scale_dtype, const float* rscale,
                                     int splits, int transpose, float* partial, void* workspace,
                                     void* stream);
/* The weight gradient from resbm_cuda_weight_grad's partials (splits, rows, cols): m = the
 * sum over splits in order; out (rows, cols) of out_dtype = m, or with norm_weight (cols,)
 * of norm_dtype, the RMSNorm-folded encoder's m * norm_weight[j] (one rounding) and
 * grad_norm[j] = sum over rows of w[r][j] * m[r][j] (w: the encoder weight, out_dtype). */
RESBM_API int resbm_cuda_finish_weight_grad(const float* partial, int splits, int64_t rows,
                                            int64_t cols, void* out, int out_dtype,
                                            const void* norm_weight, const void* w,
                                            void* grad_norm, int norm_dtype, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* RESBM_C_API_H */
