// Known-vector tests of the shared codec math (resbm/codec.h) on the host.
// Expected values are derived by hand from IEEE-754 rounding rules; the hash
// values were computed independently with resbm_kernels.codec.hash32 and rng_key.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>

#include "resbm/codec.h"

using namespace resbm;

static int failures = 0;

#define CHECK_EQ(actual, expected)                                                         \
  do {                                                                                     \
    auto a_ = (actual);                                                                    \
    auto e_ = (expected);                                                                  \
    if (!(a_ == e_)) {                                                                     \
      std::printf("FAIL %s:%d: %s == %.9g, expected %.9g\n", __FILE__, __LINE__, #actual, \
                  double(a_), double(e_));                                                 \
      ++failures;                                                                          \
    }                                                                                      \
  } while (0)

static float ldexpf_(float m, int e) { return std::ldexp(m, e); }

static void test_bf16() {
  CHECK_EQ(float_to_bf16(1.0f), uint16_t(0x3F80));
  CHECK_EQ(float_to_bf16(-2.0f), uint16_t(0xC000));
  CHECK_EQ(float_to_bf16(1.00390625f), uint16_t(0x3F80));  // 1 + 2^-8: tie -> even (1.0)
  CHECK_EQ(float_to_bf16(1.01171875f), uint16_t(0x3F82));  // 1 + 3*2^-8: tie -> even (1.015625)
  CHECK_EQ(float_to_bf16(1.00390625f + ldexpf_(1, -20)), uint16_t(0x3F81));  // above the tie
  CHECK_EQ(float_to_bf16(1.0f / 127.0f), uint16_t(0x3C01));  // 2^-7 * (1 + 1/128)
  CHECK_EQ(float_to_bf16(std::numeric_limits<float>::max()), uint16_t(0x7F80));  // -> inf
  CHECK_EQ(float_to_bf16(std::numeric_limits<float>::quiet_NaN()), uint16_t(0x7FC0));
  CHECK_EQ(float_to_bf16(bits_float(0x00018000u)), uint16_t(0x0002));  // subnormal tie, odd -> up
  CHECK_EQ(float_to_bf16(bits_float(0x00008000u)), uint16_t(0x0000));  // subnormal tie, even
  CHECK_EQ(bf16_to_float(0x3F82), 1.015625f);
  CHECK_EQ(bf16_to_float(0xFF80), -std::numeric_limits<float>::infinity());
}

static void test_fp16() {
  CHECK_EQ(float_to_fp16(1.0f), uint16_t(0x3C00));
  CHECK_EQ(float_to_fp16(-0.0f), uint16_t(0x8000));
  CHECK_EQ(float_to_fp16(1.0f + ldexpf_(1, -11)), uint16_t(0x3C00));      // tie -> even
  CHECK_EQ(float_to_fp16(1.0f + ldexpf_(3, -11)), uint16_t(0x3C02));      // tie -> even
  CHECK_EQ(float_to_fp16(65504.0f), uint16_t(0x7BFF));                    // largest half
  CHECK_EQ(float_to_fp16(65519.996f), uint16_t(0x7BFF));                  // just below the tie
  CHECK_EQ(float_to_fp16(65520.0f), uint16_t(0x7C00));                    // tie -> inf
  CHECK_EQ(float_to_fp16(-1e30f), uint16_t(0xFC00));
  CHECK_EQ(float_to_fp16(ldexpf_(1, -24)), uint16_t(0x0001));             // smallest subnormal
  CHECK_EQ(float_to_fp16(ldexpf_(1, -25)), uint16_t(0x0000));             // tie -> even (0)
  CHECK_EQ(float_to_fp16(ldexpf_(1.0000001f, -25)), uint16_t(0x0001));    // above the tie
  CHECK_EQ(float_to_fp16(ldexpf_(1.5f, -24)), uint16_t(0x0002));          // tie -> even (2)
  CHECK_EQ(float_to_fp16(ldexpf_(2.5f, -24)), uint16_t(0x0002));          // tie -> even (2)
  CHECK_EQ(float_to_fp16(ldexpf_(1023.5f, -24)), uint16_t(0x0400));       // carries to normal
  CHECK_EQ(float_to_fp16(1e-10f), uint16_t(0x0000));
  CHECK_EQ(float_to_fp16(1.0f / 3.0f), uint16_t(0x3555));
  CHECK_EQ(float_to_fp16(std::numeric_limits<float>::quiet_NaN()) & 0x7E00, 0x7E00);
  CHECK_EQ(fp16_to_float(0x0001), ldexpf_(1, -24));
  CHECK_EQ(fp16_to_float(0x8400), -ldexpf_(1, -14));
  CHECK_EQ(fp16_to_float(0x3555), 0.333251953125f);
  CHECK_EQ(fp16_to_float(0x7C00), std::numeric_limits<float>::infinity());
}

static void test_hash_and_uniform() {
  CHECK_EQ(hash32(0u), 0u);
  CHECK_EQ(hash32(1u), 0x688990C0u);
  CHECK_EQ(hash32(2u), 0xD1132181u);
  CHECK_EQ(hash32(12345u), 0x912EFCF7u);
  CHECK_EQ(hash32(0xDEADBEEFu), 0xE628C683u);
  CHECK_EQ(hash32(0xFFFFFFFFu), 0x6768824Au);
  CHECK_EQ(rng_key(0u), 0u);
  CHECK_EQ(rng_key(1u), 0x688990C0u);  // hash32(1 ^ hash32(0))
  CHECK_EQ(rng_key(2000006u), 0xCCEC640Fu);
  CHECK_EQ(rng_key(uint64_t(1) << 32), 0x58F54975u);  // the high word mixed in
  CHECK_EQ(rng_key(uint64_t(1) << 63), 0x88D91857u);
  CHECK_EQ(rng_key(~uint64_t(0)), 0x9945545Du);
  CHECK_EQ(rng_key(~uint64_t(1)), 0x53C77DBDu);  // seed -2 (a negative offset wraps)
  CHECK_EQ(uniform(0u, 0u), 0.0f);
  CHECK_EQ(uniform(0u, 1u), float(0x688990) / 16777216.0f);  // idx ^ key = 1
  CHECK_EQ(uniform(3u, 1u), float(0xD11321) / 16777216.0f);  // idx ^ key = 2
}

static void test_quantize() {
  CHECK_EQ(qmax_of(8), 127);
  CHECK_EQ(qmax_of(4), 7);
  CHECK_EQ(qmax_of(2), 1);
  CHECK_EQ(group_scale(7.0f, 7, kFloat32), 1.0f);
  CHECK_EQ(group_scale(1.0f, 127, kBFloat16), 0.00787353515625f);
  CHECK_EQ(group_scale(254.0f, 127, kFloat16), 2.0f);
  CHECK_EQ(std::isinf(group_scale(1e6f, 7, kFloat16)), true);   // scale overflow
  CHECK_EQ(group_scale(ldexpf_(1, -30), 1, kFloat16), 0.0f);    // underflows to zero
  CHECK_EQ(inv_scale(0.0f), 0.0f);
  CHECK_EQ(inv_scale(4.0f), 0.25f);
  CHECK_EQ(std::isnan(absmax_update(absmax_update(0.0f, NAN), 5.0f)), true);  // NaN sticks
  CHECK_EQ(absmax_update(absmax_update(0.0f, -3.0f), 2.0f), 3.0f);

  // qmax 7, scale 1: [0.5, -1, 3.5, 7, -7, 2.5, -2.5, 0.25] -> half to even.
  const float z[8] = {0.5f, -1.0f, 3.5f, 7.0f, -7.0f, 2.5f, -2.5f, 0.25f};
  const int expect[8] = {0, -1, 4, 7, -7, 2, -2, 0};
  const uint8_t packed[4] = {0xF0, 0x74, 0x29, 0x0E};
  for (int i = 0; i < 8; ++i) CHECK_EQ(quantize_value(z[i], 1.0f, 7, false, 0.0f), expect[i]);
  for (int b = 0; b < 4; ++b) {
    uint8_t byte = pack_field(expect[2 * b], 0, 4) | pack_field(expect[2 * b + 1], 1, 4);
    CHECK_EQ(byte, packed[b]);
    CHECK_EQ(unpack_field(packed[b], 0, 4), expect[2 * b]);
    CHECK_EQ(unpack_field(packed[b], 1, 4), expect[2 * b + 1]);
  }
  CHECK_EQ(quantize_value(7.6f, 1.0f, 7, false, 0.0f), 7);      // clamped
  CHECK_EQ(quantize_value(-300.0f, 1.0f, 127, false, 0.0f), -127);
  CHECK_EQ(quantize_value(0.5f, 1.0f, 7, true, 0.49f), 0);      // floor(0.99)
  CHECK_EQ(quantize_value(0.5f, 1.0f, 7, true, 0.5f), 1);       // floor(1.0)
  CHECK_EQ(quantize_value(-0.25f, 1.0f, 7, true, 0.0f), -1);    // floor(-0.25)
  CHECK_EQ(quantize_value(6.0f, 0.5f, 7, false, 0.0f), 3);      // 6 * 0.5

  // 2-bit: [1, -1, 0, -1] -> 1 | 3<<2 | 0<<4 | 3<<6 = 0xCD.
  uint8_t b2 = pack_field(1, 0, 2) | pack_field(-1, 1, 2) | pack_field(0, 2, 2) | pack_field(-1, 3, 2);
  CHECK_EQ(b2, uint8_t(0xCD));
  CHECK_EQ(unpack_field(0xCD, 1, 2), -1);
  CHECK_EQ(unpack_field(0x80, 3, 2), -2);  // field 0b10 sign-extends to -2
  CHECK_EQ(unpack_field(0x80, 0, 8), -128);
  CHECK_EQ(dequantize_value(-3, 0.5f), -1.5f);
}

int main() {
  test_bf16();
  test_fp16();
  test_hash_and_uniform();
  test_quantize();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all codec known-vector checks passed\n");
  return 0;
}
