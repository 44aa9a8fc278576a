// The BF16 decode of packed NVFP4 codes that the fused CUDA quantization pass writes
// (quant/fp4_decode_bf16.h), run on the host with its PTX instructions emulated: every E2M1 code at
// every position of a word, under every E4M3 block scale, against E2M1::decode * E4M3::decode in
// float32. The device's own instructions are checked against the same reference by
// tests/cuda/quantize_cuda_test.cpp.
#include "nibble/quant/fp4_decode_bf16.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <random>

#include "test_seed.h"

namespace nibble {
namespace {

constexpr uint32_t kMaxScaleCode = 0x7E;  // 448: the largest finite E4M3 code

// The float32 product decode_fp4_kernel computes, which must be exact in BF16.
uint32_t reference_bits(uint32_t nibble, uint32_t scale_code) {
  return float_bits(E2M1::decode(static_cast<uint8_t>(nibble)) * E4M3::decode(static_cast<uint8_t>(scale_code)));
}

TEST(Fp4DecodeBf16, BytePermFollowsPtx) {
  const uint32_t a = 0x33221100u, b = 0xF7E6D5C4u;
  EXPECT_EQ(byte_perm(a, b, 0x3210u), a);
  EXPECT_EQ(byte_perm(a, b, 0x7654u), b);
  EXPECT_EQ(byte_perm(a, b, 0x5140u), 0xD511C400u);
  EXPECT_EQ(byte_perm(a, b, 0x0123u), 0x00112233u);
  // Sign replication: byte 4 (0xC4) and byte 7 (0xF7) have their top bit set, byte 3 (0x33) not.
  EXPECT_EQ(byte_perm(a, b, 0xCF4Bu), 0xFFFFC400u);
  EXPECT_EQ(byte_perm(a, b, 0x76543210u), a) << "only the low 16 bits of the selector count";
}

TEST(Fp4DecodeBf16, ScaleCodesAreExactBf16) {
  for (uint32_t code = 0; code <= kMaxScaleCode; ++code) {
    const uint32_t s = e4m3_scale_bf16x2(code);
    const uint32_t expected = float_bits(E4M3::decode(static_cast<uint8_t>(code)));
    ASSERT_EQ(expected & 0xFFFFu, 0u);
    EXPECT_EQ(s & 0xFFFFu, expected >> 16) << "code " << code;
    EXPECT_EQ(s >> 16, expected >> 16) << "code " << code;
  }
}

// Every code at every position, under every scale code, with random neighbours (so that one
// element's bits leaking into another's shows up).
TEST(Fp4DecodeBf16, EveryCodeEveryPositionEveryScale) {
  std::mt19937_64 rng(test::fresh_seed());
  int64_t checked = 0;
  for (uint32_t scale = 0; scale <= kMaxScaleCode; ++scale) {
    const uint32_t scale2 = e4m3_scale_bf16x2(scale);
    for (int k = 0; k < 8; ++k) {
      for (uint32_t nibble = 0; nibble < 16; ++nibble) {
        uint32_t codes = static_cast<uint32_t>(rng());
        codes = (codes & ~(0xFu << (4 * k))) | nibble << (4 * k);
        uint32_t out[4];
        decode8_bf16(codes, scale2, out);
        for (int e = 0; e < 8; ++e) {
          const uint32_t ref = reference_bits((codes >> (4 * e)) & 0xFu, scale);
          ASSERT_EQ(ref & 0xFFFFu, 0u) << "the product is not exact in BF16";
          const uint32_t got = (out[e / 2] >> (16 * (e % 2))) & 0xFFFFu;
          ASSERT_EQ(got, ref >> 16) << "codes " << std::hex << codes << " element " << std::dec << e
                                    << " scale code " << scale;
          ++checked;
        }
      }
    }
  }
  EXPECT_EQ(checked, 127 * 8 * 16 * 8);
}

// Whole words at random, the zero word and the all-negative-zero word.
TEST(Fp4DecodeBf16, RandomWords) {
  std::mt19937_64 rng(test::fresh_seed());
  std::uniform_int_distribution<uint32_t> scale_code(0, kMaxScaleCode);
  for (int i = 0; i < 200000; ++i) {
    const uint32_t codes = i == 0 ? 0u : i == 1 ? 0x88888888u : static_cast<uint32_t>(rng());
    const uint32_t scale = scale_code(rng);
    uint32_t out[4];
    decode8_bf16(codes, e4m3_scale_bf16x2(scale), out);
    for (int e = 0; e < 8; ++e) {
      const uint32_t got = (out[e / 2] >> (16 * (e % 2))) & 0xFFFFu;
      ASSERT_EQ(got, reference_bits((codes >> (4 * e)) & 0xFu, scale) >> 16)
          << "codes " << std::hex << codes << " element " << std::dec << e << " scale code " << scale;
    }
  }
}

}  // namespace
}  // namespace nibble
