// CPU emulation of the cuda_fp16.h subset the kernels use (round to nearest even).
#pragma once

#include <cstdint>

#include "resbm/codec.h"

struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};

inline float __half2float(__half h) { return resbm::fp16_to_float(h.bits); }
inline __half __ushort_as_half(uint16_t u) { return {u}; }
inline uint16_t __half_as_ushort(__half h) { return h.bits; }
inline __half __float2half_rn(float v) { return {resbm::float_to_fp16(v)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
