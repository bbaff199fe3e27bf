// CPU emulation of the cuda_bf16.h subset the kernels use (round to nearest even).
#pragma once

#include <cstdint>

#include "resbm/codec.h"

struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __bfloat162float(__nv_bfloat16 h) { return resbm::bf16_to_float(h.bits); }
inline __nv_bfloat16 __ushort_as_bfloat16(uint16_t u) { return {u}; }
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return {resbm::float_to_bf16(v)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }
