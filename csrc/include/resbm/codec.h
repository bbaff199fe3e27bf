// Per-element codec math shared by the CPU library, the CUDA kernels and the
// host tests. It reproduces resbm_kernels/backends/reference.py bit for bit:
// every float operation is a single IEEE-754 float32 operation rounded to
// nearest even (no FMA contraction: build with -ffp-contract=off; device code
// uses the explicit _rn intrinsics).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define RESBM_HD __host__ __device__
#else
#define RESBM_HD
#endif

namespace resbm {

// dtype codes: the wire-format scale codes of codec.py, also used for z/out.
enum DType : int { kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

RESBM_HD inline bool valid_dtype(int dtype) { return dtype >= kFloat32 && dtype <= kBFloat16; }
RESBM_HD inline int dtype_bytes(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// ---- single-rounding float32 arithmetic -------------------------------------

RESBM_HD inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

RESBM_HD inline float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

RESBM_HD inline float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// ---- bit casts and 16-bit float conversions ---------------------------------

RESBM_HD inline uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

RESBM_HD inline float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

RESBM_HD inline float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

// Round to nearest even; NaN becomes 0x7FC0 (as torch does), overflow gives inf.
RESBM_HD inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

RESBM_HD inline float fp16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0)  // zero or subnormal: mant * 2^-24 is exact in float32
    return bits_float(sign | float_bits(mul_rn(float(mant), 5.9604644775390625e-8f)));
  if (exp == 31) return bits_float(sign | 0x7F800000u | (mant << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round to nearest even, subnormals included; |f| >= 65520 gives inf, NaN a quiet NaN.
RESBM_HD inline uint16_t float_to_fp16(float f) {
  uint32_t u = float_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00u;
  if (a >= 0x477FF000u) return sign | 0x7C00u;  // 65520 and above (ties to inf)
  if (a >= 0x38800000u) {                        // normal half (>= 2^-14)
    uint32_t r = a - 0x38000000u;                // rebias exponent 127 -> 15
    return sign | uint16_t((r + 0xFFFu + ((r >> 13) & 1u)) >> 13);
  }
  uint32_t e = a >> 23;
  if (e < 102) return sign;  // below 2^-25: rounds to zero
  // subnormal half: round(mantissa * 2^(e-126)) to an integer in [0, 1024]
  uint32_t m = (a & 0x7FFFFFu) | 0x800000u, shift = 126 - e;
  uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return sign | uint16_t(q);
}

// x rounded to `dtype` and read back as float32.
RESBM_HD inline float round_to_dtype(float x, int dtype) {
  if (dtype == kFloat16) return fp16_to_float(float_to_fp16(x));
  if (dtype == kBFloat16) return bf16_to_float(float_to_bf16(x));
  return x;
}

// Element i of a `dtype` array as its raw bits (16-bit types in the low half), and raw bits
// as float32: apart, a kernel can issue many loads before it converts the first value.
RESBM_HD inline uint32_t load_bits(const void* p, int64_t i, int dtype) {
  return dtype == kFloat32 ? float_bits(static_cast<const float*>(p)[i]) : static_cast<const uint16_t*>(p)[i];
}

RESBM_HD inline float bits_to_float(uint32_t bits, int dtype) {
  if (dtype == kFloat16) return fp16_to_float(uint16_t(bits));
  if (dtype == kBFloat16) return bf16_to_float(uint16_t(bits));
  return bits_float(bits);
}

RESBM_HD inline float load_float(const void* p, int64_t i, int dtype) {
  return bits_to_float(load_bits(p, i, dtype), dtype);
}

RESBM_HD inline void store_float(void* p, int64_t i, int dtype, float v) {
  if (dtype == kFloat16)
    static_cast<uint16_t*>(p)[i] = float_to_fp16(v);
  else if (dtype == kBFloat16)
    static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
  else
    static_cast<float*>(p)[i] = v;
}

// ---- stochastic rounding stream ----------------------------------------------

// The 'lowbias32' hash (Wellons), as codec.hash32.
RESBM_HD inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The stream's 32-bit key from a 64-bit seed, as codec.rng_key (the fused passes mix it in the
// kernel: their seed offset may live in device memory).
RESBM_HD inline uint32_t rng_key(uint64_t seed) {
  return hash32(uint32_t(seed) ^ hash32(uint32_t(seed >> 32)));
}

// Uniform in [0, 1) for element idx = (row*k + col) mod 2^32; key = codec.rng_key(seed).
RESBM_HD inline float uniform(uint32_t idx, uint32_t key) {
  return mul_rn(float(hash32(idx ^ key) >> 8), 5.9604644775390625e-8f);  // 2^-24, exact
}

// ---- quantization --------------------------------------------------------------

RESBM_HD inline int qmax_of(int bits) { return (1 << (bits - 1)) - 1; }

// Running max of |z| that propagates NaN (fmaxf would drop it).
RESBM_HD inline float absmax_update(float m, float z) {
  float a = std::fabs(z);
  return (a > m || a != a) ? a : m;
}

// The group scale: absmax / qmax rounded to the scale dtype, read back as float32.
RESBM_HD inline float group_scale(float absmax, int qmax, int scale_dtype) {
  return round_to_dtype(div_rn(absmax, float(qmax)), scale_dtype);
}

RESBM_HD inline float inv_scale(float s) { return s > 0.0f ? div_rn(1.0f, s) : 0.0f; }

// One code: round(z * inv) (half to even) or floor(z * inv + u), clamped to +-qmax.
// z and inv must be finite.
RESBM_HD inline int quantize_value(float z, float inv, int qmax, bool stochastic, float u) {
  float y = mul_rn(z, inv);
  float q = stochastic ? std::floor(add_rn(y, u)) : std::rint(y);
  float lim = float(qmax);
  q = q > lim ? lim : (q < -lim ? -lim : q);
  return int(q);
}

RESBM_HD inline float dequantize_value(int q, float s) { return mul_rn(float(q), s); }

// ---- packing -------------------------------------------------------------------

// Place code q (two's complement, `bits` wide) as field j of a byte.
RESBM_HD inline uint8_t pack_field(int q, int j, int bits) {
  return uint8_t((uint32_t(q) & ((1u << bits) - 1u)) << (j * bits));
}

// Sign-extended field j of a byte.
RESBM_HD inline int unpack_field(uint8_t byte, int j, int bits) {
  int f = (byte >> (j * bits)) & ((1 << bits) - 1);
  return f - ((f >> (bits - 1)) << bits);
}

// ---- the standalone codec's values (the CPU library and its CUDA kernels) --------------

// The packed byte of the 8 / bits values z[first..] of a group with inverse scale inv (each
// value's stochastic draw keyed by its flat index).
RESBM_HD inline uint8_t quantize_byte(const void* z, int z_dtype, int64_t first, int bits, float inv,
                                      bool stochastic, uint32_t key) {
  uint8_t byte = 0;
  for (int j = 0; j < 8 / bits; ++j) {
    const float u = stochastic ? uniform(uint32_t(first + j), key) : 0.0f;
    byte |= pack_field(quantize_value(load_float(z, first + j, z_dtype), inv, qmax_of(bits), stochastic, u),
                       j, bits);
  }
  return byte;
}

// Value (r, c) of an (n, k) payload: bf16 bytes for bits=16, else its code times its group's scale.
RESBM_HD inline float dequantize_at(const uint8_t* codes, const void* scales, int64_t r, int64_t c,
                                    int64_t k, int bits, int group, int scale_dtype) {
  if (bits == 16) {
    const int64_t i = r * k + c;
    return bf16_to_float(uint16_t(codes[2 * i] | (codes[2 * i + 1] << 8)));
  }
  const int per = 8 / bits;
  const float s = load_float(scales, r * (k / group) + c / group, scale_dtype);
  return dequantize_value(unpack_field(codes[r * (k * bits / 8) + c / per], int(c % per), bits), s);
}

}  // namespace resbm
