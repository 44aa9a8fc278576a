// E8M0 (the MX power-of-two block scale) and BF16: every code decoded, round trips, ties, saturation
// and NaN by each format's own rules, random floats against double references, and stochastic
// rounding's round-up frequency over its whole random grid.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "formats/reference_codecs.h"
#include "test_seed.h"
#include "nibble/formats/minifloat.h"

namespace nibble {
namespace {


// A random finite float: a random bit pattern with the all-ones exponent avoided.
float random_finite(std::mt19937_64& rng) {
  uint32_t b = static_cast<uint32_t>(rng());
  if ((b & 0x7F800000u) == 0x7F800000u) b &= 0xBFFFFFFFu;
  return bits_float(b);
}

// ---- E8M0 ----

// Reference: |x| = 2^k * (1 + f), f in [0, 1); round up to 2^(k+1) when f > 1/2, or f == 1/2 and
// the code of 2^k (k + 127) is odd, so that the tie lands on the even code; clamp to [-127, 127].
uint8_t ref_e8m0_rne(double x) {
  const double a = std::fabs(x);
  if (a == 0) return 0;
  if (std::isinf(a)) return 254;
  int exp2;
  const double m = std::frexp(a, &exp2);  // a = m * 2^exp2, m in [0.5, 1)
  const int k = exp2 - 1;
  const double f = 2 * m - 1;
  const bool up = f > 0.5 || (f == 0.5 && ((k + 127) & 1));
  const int e = std::clamp(k + (up ? 1 : 0), -127, 127);
  return static_cast<uint8_t>(e + 127);
}

TEST(E8M0, DecodesEveryCode) {
  for (int c = 0; c < 255; ++c)
    EXPECT_EQ(static_cast<double>(E8M0::decode(static_cast<uint8_t>(c))), std::ldexp(1.0, c - 127)) << c;
  EXPECT_TRUE(std::isnan(E8M0::decode(255)));
  EXPECT_EQ(E8M0::decode(127), 1.0f);
  EXPECT_EQ(E8M0::decode(0), std::ldexp(1.0f, -127));  // a float subnormal
  EXPECT_EQ(E8M0::decode(254), std::ldexp(1.0f, 127));
}

TEST(E8M0, EncodeInvertsDecodeAndIgnoresSign) {
  for (int c = 0; c < 255; ++c) {
    const float v = E8M0::decode(static_cast<uint8_t>(c));
    for (const float s : {1.0f, -1.0f}) {
      EXPECT_EQ(E8M0::encode(s * v, Rounding::kNearestEven), c) << s * v;
      for (const uint32_t r : {0u, 0xFFFFFFFFu, 0x5A5A5A5Au}) EXPECT_EQ(E8M0::encode(s * v, Rounding::kStochastic, r), c);
    }
  }
}

TEST(E8M0, MidpointsTieToEvenCodeAndNeighboursRoundAway) {
  for (int k = -127; k <= 126; ++k) {
    const float mid = 1.5f * std::ldexp(1.0f, k);  // exact, subnormal for k = -127
    ASSERT_EQ(static_cast<double>(mid), 1.5 * std::ldexp(1.0, k));
    const int lo = k + 127, hi = k + 128;
    const int even = (lo % 2 == 0) ? lo : hi;
    for (const float s : {1.0f, -1.0f}) {
      EXPECT_EQ(E8M0::encode(s * mid, Rounding::kNearestEven), even) << "k = " << k;
      EXPECT_EQ(E8M0::encode(s * std::nextafter(mid, INFINITY), Rounding::kNearestEven), hi) << "k = " << k;
      EXPECT_EQ(E8M0::encode(s * std::nextafter(mid, 0.0f), Rounding::kNearestEven), lo) << "k = " << k;
    }
  }
}

TEST(E8M0, SaturatesAndHandlesNan) {
  // No zero: zero and everything below 2^-127 give the smallest code.
  for (const float x : {0.0f, -0.0f, 1e-45f, std::ldexp(1.0f, -140), std::ldexp(1.0f, -128), std::ldexp(1.4f, -128)}) {
    EXPECT_EQ(E8M0::encode(x, Rounding::kNearestEven), 0) << x;
    EXPECT_EQ(E8M0::encode(x, Rounding::kStochastic, 0xFFFFFFFFu), 0) << x;
  }
  // Just under 2^-127 rounds up to it under RNE; stochastic rounding may too.
  EXPECT_EQ(E8M0::encode(std::ldexp(1.9f, -128), Rounding::kNearestEven), 0);
  // Above 2^127: 1.2 * 2^127 rounds down to 2^127, 1.7 * 2^127 would need 2^128: both code 254.
  for (const float x : {std::ldexp(1.2f, 127), std::ldexp(1.7f, 127), FLT_MAX, INFINITY, -INFINITY}) {
    EXPECT_EQ(E8M0::encode(x, Rounding::kNearestEven), 254) << x;
    EXPECT_EQ(E8M0::encode(x, Rounding::kStochastic, 0u), 254) << x;
  }
  for (const float x : {std::numeric_limits<float>::quiet_NaN(), bits_float(0xFF800001u), bits_float(0x7FFFFFFFu)}) {
    EXPECT_EQ(E8M0::encode(x, Rounding::kNearestEven), 255);
    EXPECT_EQ(E8M0::encode(x, Rounding::kStochastic, 123u), 255);
  }
  EXPECT_EQ(E8M0::from_exponent(-200), 0);
  EXPECT_EQ(E8M0::from_exponent(200), 254);
  EXPECT_EQ(E8M0::from_exponent(0), 127);
}

TEST(E8M0, RandomFloatsMatchReference) {
  std::mt19937_64 rng(test::fresh_seed());
  for (int n = 0; n < 500000; ++n) {
    const float x = random_finite(rng);
    ASSERT_EQ(E8M0::encode(x, Rounding::kNearestEven), ref_e8m0_rne(x)) << x << " bits 0x" << std::hex << float_bits(x);
  }
}

TEST(E8M0, StochasticRoundUpFrequencyEqualsFractionalPosition) {
  std::mt19937_64 rng(test::fresh_seed());
  // Rounds up iff the fraction f (23 bits) exceeds the top 23 random bits: over a sweep of those
  // bits in steps of 2^s, exactly ceil(f * 2^(23-s)) draws round up.
  const auto check = [&](float x, int s) {
    const uint8_t lo = ref_e8m0_rne(std::ldexp(1.0, std::ilogb(static_cast<double>(x))));
    const double f = std::fabs(static_cast<double>(x)) / std::ldexp(1.0, std::ilogb(static_cast<double>(x))) - 1;
    if (lo == 254 || (lo == 0 && std::fabs(x) < std::ldexp(1.0f, -127))) return;  // saturated: no choice
    uint64_t ups = 0;
    for (uint32_t k = 0; k < (1u << (23 - s)); ++k) {
      const uint32_t r = (k << (9 + s)) | (static_cast<uint32_t>(rng()) & 0x1FFu);  // low 9 bits unused
      const uint8_t c = E8M0::encode(x, Rounding::kStochastic, r);
      ASSERT_TRUE(c == lo || c == lo + 1) << x;
      ups += c == lo + 1;
    }
    ASSERT_EQ(static_cast<double>(ups), std::ceil(std::ldexp(f, 23 - s))) << "x = " << x;
  };
  check(1.25f, 0);                         // a quarter of 2^23 draws
  check(-std::ldexp(1.75f, -100), 0);      // three quarters
  check(std::ldexp(1.0f + std::ldexp(1.0f, -23), 5), 0);  // exactly one draw
  check(std::ldexp(1.3f, -127), 0);        // a float subnormal: 2^-127 or 2^-126
  for (int n = 0; n < 2000; ++n) check(random_finite(rng), 13);
}

// ---- BF16 ----

// Reference RNE: the two BF16 neighbours of |x| by truncation and its successor (2^128 standing in
// for the infinity past the largest finite value), the nearer one, ties to the even code.
uint16_t ref_bf16_rne(float x) {
  const uint32_t b = float_bits(x);
  const uint16_t sign = static_cast<uint16_t>((b >> 16) & 0x8000u);
  const uint32_t lo = (b & 0x7FFFFFFFu) >> 16;
  if (lo == 0x7F80u) return static_cast<uint16_t>(sign | lo);  // infinity stays
  const double a = std::fabs(static_cast<double>(x));
  const double vlo = test::ref_bf16_decode(lo);
  const double vhi = lo + 1 == 0x7F80u ? std::ldexp(1.0, 128) : test::ref_bf16_decode(lo + 1);
  uint32_t pick;
  if (a - vlo < vhi - a) {
    pick = lo;
  } else if (a - vlo > vhi - a) {
    pick = lo + 1;
  } else {
    pick = (lo & 1) ? lo + 1 : lo;
  }
  return static_cast<uint16_t>(sign | pick);
}

TEST(BF16, DecodesEveryCode) {
  for (uint32_t c = 0; c < 65536; ++c) {
    const float got = BF16::decode(static_cast<uint16_t>(c));
    const double want = test::ref_bf16_decode(c);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << c;
    } else {
      ASSERT_EQ(static_cast<double>(got), want) << "code 0x" << std::hex << c;
      ASSERT_EQ(std::signbit(got), (c & 0x8000u) != 0) << c;
    }
  }
}

TEST(BF16, EncodeInvertsDecodeOnEveryNonNanCode) {
  for (uint32_t c = 0; c < 65536; ++c) {
    if (std::isnan(test::ref_bf16_decode(c))) continue;
    const float v = BF16::decode(static_cast<uint16_t>(c));
    ASSERT_EQ(BF16::encode(v, Rounding::kNearestEven), c) << "code 0x" << std::hex << c;
    ASSERT_EQ(BF16::encode(v, Rounding::kStochastic, 0xFFFFu), c) << "code 0x" << std::hex << c;
  }
}

TEST(BF16, RandomFloatsMatchDoubleReference) {
  std::mt19937_64 rng(test::fresh_seed());
  for (int n = 0; n < 2000000; ++n) {
    const float x = random_finite(rng);
    ASSERT_EQ(BF16::encode(x, Rounding::kNearestEven), ref_bf16_rne(x)) << "bits 0x" << std::hex << float_bits(x);
  }
}

TEST(BF16, EveryTieAndItsNeighbours) {
  // All floats exactly halfway between two BF16 values (low half 0x8000), and the floats beside them.
  for (uint32_t hi = 0; hi < 65536; ++hi) {
    if ((hi & 0x7F80u) == 0x7F80u) continue;  // Inf/NaN upper halves
    for (const uint32_t low : {0x7FFFu, 0x8000u, 0x8001u}) {
      const float x = bits_float(hi << 16 | low);
      ASSERT_EQ(BF16::encode(x, Rounding::kNearestEven), ref_bf16_rne(x)) << "bits 0x" << std::hex << (hi << 16 | low);
    }
    // The tie goes to the even code.
    const uint16_t tie = BF16::encode(bits_float(hi << 16 | 0x8000u), Rounding::kNearestEven);
    ASSERT_EQ(tie & 1u, 0u) << std::hex << hi;
  }
}

TEST(BF16, OverflowNanAndZeros) {
  EXPECT_EQ(BF16::encode(FLT_MAX, Rounding::kNearestEven), 0x7F80u);   // rounds past the max: Inf
  EXPECT_EQ(BF16::encode(-FLT_MAX, Rounding::kNearestEven), 0xFF80u);
  EXPECT_EQ(BF16::encode(bits_float(0x7F7F7FFFu), Rounding::kNearestEven), 0x7F7Fu);
  EXPECT_EQ(BF16::encode(INFINITY, Rounding::kNearestEven), 0x7F80u);
  EXPECT_EQ(BF16::encode(-INFINITY, Rounding::kStochastic, 0xFFFFu), 0xFF80u);
  EXPECT_EQ(BF16::encode(-0.0f, Rounding::kNearestEven), 0x8000u);
  EXPECT_EQ(BF16::encode(1e-45f, Rounding::kNearestEven), 0x0000u);
  // NaNs stay quiet NaNs with their sign, even with a payload only in the dropped bits.
  for (const uint32_t nan : {0x7FC00000u, 0x7F800001u, 0xFF800001u, 0xFFFFFFFFu, 0x7FA00000u}) {
    for (const Rounding r : {Rounding::kNearestEven, Rounding::kStochastic}) {
      const uint16_t c = BF16::encode(bits_float(nan), r, 0xFFFFu);
      EXPECT_TRUE(std::isnan(BF16::decode(c))) << std::hex << nan;
      EXPECT_EQ(c & 0x8000u, (nan >> 16) & 0x8000u) << std::hex << nan;
      EXPECT_NE(c & 0x0040u, 0u) << "quiet bit, input 0x" << std::hex << nan;
    }
  }
}

TEST(BF16, StochasticRoundUpFrequencyEqualsDroppedBits) {
  std::mt19937_64 rng(test::fresh_seed());
  for (int n = 0; n < 150; ++n) {
    float x = random_finite(rng);
    if ((float_bits(x) & 0x7FFFFFFFu) >= 0x7F7F0000u) x = 1.0f + static_cast<float>(n);  // keep away from Inf
    const uint32_t b = float_bits(x);
    const uint16_t trunc = static_cast<uint16_t>(b >> 16);
    uint32_t ups = 0;
    for (uint32_t r = 0; r < 65536; ++r) {
      const uint16_t c = BF16::encode(x, Rounding::kStochastic, r | (static_cast<uint32_t>(rng()) << 16));
      ASSERT_TRUE(c == trunc || c == trunc + 1) << x;
      ups += c == trunc + 1;
    }
    // Rounds away from zero with probability (dropped 16 bits) / 2^16.
    ASSERT_EQ(ups, b & 0xFFFFu) << "x = " << x;
  }
}

}  // namespace
}  // namespace nibble
