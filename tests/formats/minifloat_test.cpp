// Exhaustive tests of the E2M1, E4M3 and E5M2 codecs against the double references in
// reference_codecs.h: every code decoded, every finite code round-tripped, every midpoint between
// neighbours and its float neighbours rounded, saturation, NaN, -0, subnormals, and stochastic
// rounding's choice of neighbour and its round-up frequency.
#include "nibble/formats/minifloat.h"

#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "formats/reference_codecs.h"
#include "test_seed.h"

namespace nibble {
namespace {

using test::RefMinifloat;


template <typename F>
struct Ref;
template <>
struct Ref<E2M1> {
  static const RefMinifloat& get() { return test::kRefE2M1; }
};
template <>
struct Ref<E4M3> {
  static const RefMinifloat& get() { return test::kRefE4M3; }
};
template <>
struct Ref<E5M2> {
  static const RefMinifloat& get() { return test::kRefE5M2; }
};

template <typename F>
class MinifloatTest : public ::testing::Test {
 protected:
  const RefMinifloat& ref = Ref<F>::get();
  const std::vector<RefMinifloat::Entry> mags = ref.magnitudes();

  static uint8_t rne(float x) { return F::encode(x, Rounding::kNearestEven); }
  static uint8_t sr(float x, uint32_t r) { return F::encode(x, Rounding::kStochastic, r); }
  // The reference code of x (sign included), as the codec's 8-bit code.
  uint8_t ref_rne(double x) const { return static_cast<uint8_t>(ref.round_nearest_even(x, mags)); }
};

using Formats = ::testing::Types<E2M1, E4M3, E5M2>;
class FormatNames {
 public:
  template <typename T>
  static std::string GetName(int) {
    if (std::is_same_v<T, E2M1>) return "E2M1";
    if (std::is_same_v<T, E4M3>) return "E4M3";
    return "E5M2";
  }
};
TYPED_TEST_SUITE(MinifloatTest, Formats, FormatNames);

TYPED_TEST(MinifloatTest, LayoutConstantsMatchReference) {
  EXPECT_EQ(TypeParam::kBits, this->ref.bits());
  EXPECT_EQ(TypeParam::kSignBit, this->ref.sign_bit());
  EXPECT_EQ(TypeParam::kMaxCode, this->ref.max_code());
  EXPECT_EQ(static_cast<double>(TypeParam::kMax), this->ref.max_value());
}

TYPED_TEST(MinifloatTest, DecodesEveryCode) {
  for (uint32_t c = 0; c < this->ref.num_codes(); ++c) {
    const float got = TypeParam::decode(static_cast<uint8_t>(c));
    const double want = this->ref.decode(c);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << "code 0x" << std::hex << c;
      continue;
    }
    EXPECT_EQ(static_cast<double>(got), want) << "code 0x" << std::hex << c;
    EXPECT_EQ(std::signbit(got), (c & this->ref.sign_bit()) != 0) << "sign of code 0x" << std::hex << c;
  }
}

TEST(E2M1, DecodesTheHandTable) {
  for (uint32_t c = 0; c < 16; ++c) {
    const double mag = test::kE2M1Table[c & 7];
    EXPECT_EQ(static_cast<double>(E2M1::decode(static_cast<uint8_t>(c))), (c & 8) ? -mag : mag) << "code " << c;
  }
}

// Hand-checked anchors of each format (OCP FP8 spec, MX v1.0).
TEST(Minifloat, KnownValues) {
  EXPECT_EQ(E4M3::decode(0x7E), 448.0f);          // S.1111.110: max
  EXPECT_EQ(E4M3::decode(0x01), std::ldexp(1.0f, -9));   // min subnormal
  EXPECT_EQ(E4M3::decode(0x08), std::ldexp(1.0f, -6));   // min normal
  EXPECT_EQ(E4M3::decode(0x38), 1.0f);            // field 7 = bias
  EXPECT_TRUE(std::isnan(E4M3::decode(0x7F)));
  EXPECT_TRUE(std::isnan(E4M3::decode(0xFF)));
  EXPECT_EQ(E4M3::decode(0x78), 256.0f);          // 0x78 is finite in E4M3 "fn"
  EXPECT_EQ(E5M2::decode(0x7B), 57344.0f);
  EXPECT_EQ(E5M2::decode(0x01), std::ldexp(1.0f, -16));
  EXPECT_EQ(E5M2::decode(0x04), std::ldexp(1.0f, -14));
  EXPECT_EQ(E5M2::decode(0x3C), 1.0f);
  EXPECT_EQ(E5M2::decode(0x7C), INFINITY);
  EXPECT_EQ(E5M2::decode(0xFC), -INFINITY);
  for (uint8_t c : {0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF}) EXPECT_TRUE(std::isnan(E5M2::decode(c))) << int(c);
  EXPECT_EQ(E2M1::decode(0x7), 6.0f);
  EXPECT_EQ(E2M1::decode(0xD), -3.0f);
}

TYPED_TEST(MinifloatTest, EncodeInvertsDecodeOnEveryFiniteCode) {
  std::mt19937 rng(static_cast<uint32_t>(test::fresh_seed()));
  for (uint32_t c = 0; c < this->ref.num_codes(); ++c) {
    if (!this->ref.is_finite(c)) continue;
    const float v = TypeParam::decode(static_cast<uint8_t>(c));
    EXPECT_EQ(this->rne(v), c) << "value " << v;
    // An exactly representable value has nothing to round, whatever the random bits.
    for (uint32_t r : {0u, 0xFFFFFFFFu, 0x80000000u, static_cast<uint32_t>(rng())})
      EXPECT_EQ(this->sr(v, r), c) << "value " << v << " bits " << r;
  }
}

TYPED_TEST(MinifloatTest, MidpointsTieToEvenAndTheirNeighboursRoundAway) {
  const auto& mags = this->mags;
  for (size_t i = 0; i + 1 < mags.size(); ++i) {
    const double lo = mags[i].value, hi = mags[i + 1].value;
    const double mid = (lo + hi) / 2;
    const float m = static_cast<float>(mid);
    ASSERT_EQ(static_cast<double>(m), mid);  // every midpoint here is a float
    const uint32_t even = (mags[i].code & 1) == 0 ? mags[i].code : mags[i + 1].code;
    ASSERT_NE(mags[i].code & 1, mags[i + 1].code & 1);  // neighbours differ in the last bit
    for (const uint32_t sign : {0u, this->ref.sign_bit()}) {
      const float s = sign ? -1.0f : 1.0f;
      EXPECT_EQ(this->rne(s * m), sign | even) << "midpoint " << s * m;
      EXPECT_EQ(this->rne(s * std::nextafter(m, INFINITY)), sign | mags[i + 1].code) << "above " << s * m;
      EXPECT_EQ(this->rne(s * std::nextafter(m, 0.0f)), sign | mags[i].code) << "below " << s * m;
    }
  }
}

TYPED_TEST(MinifloatTest, SaturatesBeyondMax) {
  const float max = TypeParam::kMax;
  const double step = max - this->mags[this->mags.size() - 2].value;
  const uint8_t pos = TypeParam::kMaxCode, neg = static_cast<uint8_t>(TypeParam::kSignBit | TypeParam::kMaxCode);
  // Includes the first value past max (max + step, which a non-saturating encoder would take or
  // overflow to), the midpoint to it, and infinity.
  const float beyond[] = {std::nextafter(max, INFINITY), static_cast<float>(max + step / 2),
                          static_cast<float>(max + step), 2 * max, 1e30f, FLT_MAX, INFINITY};
  for (const float x : beyond) {
    EXPECT_EQ(this->rne(x), pos) << x;
    EXPECT_EQ(this->rne(-x), neg) << -x;
    EXPECT_EQ(this->sr(x, 0u), pos) << x;
    EXPECT_EQ(this->sr(-x, 0xFFFFFFFFu), neg) << -x;
  }
  // Just below max still rounds to max, or to its lower neighbour below the midpoint.
  EXPECT_EQ(this->rne(std::nextafter(max, 0.0f)), pos);
  EXPECT_EQ(this->rne(-std::nextafter(max, 0.0f)), neg);
}

TYPED_TEST(MinifloatTest, NanHandling) {
  const float nans[] = {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN(),
                        std::numeric_limits<float>::signaling_NaN(), bits_float(0x7F800001u), bits_float(0xFFFFFFFFu),
                        bits_float(0x7FC12345u)};
  for (const float x : nans) {
    const uint8_t sign = std::signbit(x) ? TypeParam::kSignBit : 0;
    for (const Rounding r : {Rounding::kNearestEven, Rounding::kStochastic}) {
      const uint8_t code = TypeParam::encode(x, r, 0x12345678u);
      if constexpr (std::is_same_v<TypeParam, E2M1>) {
        EXPECT_EQ(code, 0x7) << "E2M1 has no NaN: documented to give +6";
      } else {
        EXPECT_EQ(code, sign | TypeParam::kNanCode) << "bits " << std::hex << float_bits(x);
        EXPECT_TRUE(std::isnan(TypeParam::decode(code)));
      }
    }
  }
}

TYPED_TEST(MinifloatTest, NegativeZeroAndSubnormals) {
  const uint8_t sb = TypeParam::kSignBit;
  const float min_sub = static_cast<float>(this->mags[1].value);
  EXPECT_EQ(min_sub, TypeParam::decode(1));
  EXPECT_EQ(this->rne(0.0f), 0);
  EXPECT_EQ(this->rne(-0.0f), sb);
  EXPECT_TRUE(std::signbit(TypeParam::decode(sb)));
  EXPECT_EQ(TypeParam::decode(sb), 0.0f);
  // Negative values that round to zero keep the sign; half the smallest subnormal ties to 0 (even).
  for (const float tiny : {min_sub / 4, min_sub / 2, 1e-40f, 1e-45f}) {
    EXPECT_EQ(this->rne(tiny), 0) << tiny;
    EXPECT_EQ(this->rne(-tiny), sb) << -tiny;
  }
  EXPECT_EQ(this->rne(std::nextafter(min_sub / 2, 1.0f)), 1);
  EXPECT_EQ(this->rne(-min_sub), sb | 1);
  // Every subnormal code: value m * 2^(emin - M), encoded back from its value and from just off it.
  for (uint32_t c = 1; c < (1u << TypeParam::kManBits); ++c) {
    const float v = TypeParam::decode(static_cast<uint8_t>(c));
    EXPECT_EQ(static_cast<double>(v), c * std::ldexp(1.0, TypeParam::kEmin - TypeParam::kManBits));
    EXPECT_EQ(this->rne(std::nextafter(v, 0.0f)), c);
    EXPECT_EQ(this->rne(std::nextafter(v, INFINITY)), c);
  }
  // Float subnormal inputs with stochastic rounding stay tiny: zero or the smallest subnormal.
  EXPECT_EQ(this->sr(1e-40f, 0xFFFFFFFFu), 0);
  EXPECT_EQ(this->sr(-1e-40f, 0u), sb | 1);  // any positive fraction beats a draw of 0
}

// Random float bit patterns, most in and around the format's range, the rest anywhere.
float draw_float_near_range(std::mt19937_64& rng, int lowest_exp, int highest_exp) {
  const uint32_t b = static_cast<uint32_t>(rng());
  if ((b & 7) == 0) {
    const uint32_t any = static_cast<uint32_t>(rng());
    return (any & 0x7F800000u) == 0x7F800000u ? bits_float(any & 0xFF7FFFFFu) : bits_float(any);
  }
  const int e = lowest_exp + static_cast<int>(rng() % static_cast<uint64_t>(highest_exp - lowest_exp + 1));
  return bits_float((b & 0x807FFFFFu) | (static_cast<uint32_t>(e + 127) << 23));
}

TYPED_TEST(MinifloatTest, RandomFloatsMatchNearestEvenReference) {
  std::mt19937_64 rng(test::fresh_seed());
  const int lowest = TypeParam::kEmin - TypeParam::kManBits - 3;
  const int highest = static_cast<int>(std::ilogb(TypeParam::kMax)) + 2;
  for (int n = 0; n < 300000; ++n) {
    const float x = draw_float_near_range(rng, lowest, highest);
    ASSERT_EQ(this->rne(x), this->ref_rne(x)) << "x = " << x << " (bits 0x" << std::hex << float_bits(x) << ")";
  }
}

TYPED_TEST(MinifloatTest, StochasticRoundingPicksANeighbour) {
  std::mt19937_64 rng(test::fresh_seed());
  const int lowest = TypeParam::kEmin - TypeParam::kManBits - 3;
  const int highest = static_cast<int>(std::ilogb(TypeParam::kMax)) + 1;
  RefMinifloat::Entry lo, hi;
  for (int n = 0; n < 200000; ++n) {
    const float x = draw_float_near_range(rng, lowest, highest);
    const uint8_t got = this->sr(x, static_cast<uint32_t>(rng()));
    this->ref.neighbours(std::fabs(x), this->mags, lo, hi);
    const uint8_t sign = std::signbit(x) ? TypeParam::kSignBit : 0;
    ASSERT_TRUE(got == (sign | lo.code) || got == (sign | hi.code))
        << "x = " << x << " gave code " << int(got) << ", neighbours " << lo.value << " and " << hi.value;
  }
}

// Number of draws that round up when the top 24 random bits sweep the grid k * 2^stride_log2 for
// k in [0, 2^(24 - stride_log2)), the low 8 bits (unused by the codec) random. Rounding up happens
// iff frac > k * 2^(s - 24).
template <typename F>
uint64_t count_round_ups(float x, uint8_t hi_code, int stride_log2, std::mt19937_64& rng) {
  uint64_t ups = 0;
  const uint32_t n = 1u << (24 - stride_log2);
  for (uint32_t k = 0; k < n; ++k) {
    const uint32_t r = (k << (8 + stride_log2)) | (static_cast<uint32_t>(rng()) & 0xFFu);
    ups += F::encode(x, Rounding::kStochastic, r) == hi_code;
  }
  return ups;
}

TYPED_TEST(MinifloatTest, StochasticRoundUpFrequencyEqualsFractionalPosition) {
  std::mt19937_64 rng(test::fresh_seed());
  const int lowest = TypeParam::kEmin - TypeParam::kManBits - 2;
  const int highest = static_cast<int>(std::ilogb(TypeParam::kMax));
  RefMinifloat::Entry lo, hi;
  const auto check = [&](float x, int stride_log2) {
    this->ref.neighbours(std::fabs(x), this->mags, lo, hi);
    if (lo.value == hi.value) return;  // exact or saturated: nothing to round
    const double frac = (std::fabs(x) - lo.value) / (hi.value - lo.value);  // exact in double
    // Rounds up iff frac > k * 2^(s-24): exactly ceil(frac * 2^(24-s)) of the k.
    const double want = std::ceil(std::ldexp(frac, 24 - stride_log2));
    const uint8_t sign = std::signbit(x) ? TypeParam::kSignBit : 0;
    const uint64_t ups = count_round_ups<TypeParam>(x, static_cast<uint8_t>(sign | hi.code), stride_log2, rng);
    ASSERT_EQ(static_cast<double>(ups), want) << "x = " << x << " between " << lo.value << " and " << hi.value;
  };
  // The whole 2^24 grid for a few values: fractions 1/4, 0.3-ish and 1 - 2^-20 of a step.
  const float step_above_one = static_cast<float>(this->mags[this->mags.size() / 2 + 1].value -
                                                  this->mags[this->mags.size() / 2].value);
  const float base = static_cast<float>(this->mags[this->mags.size() / 2].value);
  check(base + step_above_one * 0.25f, 0);
  check(-(base + step_above_one * (1.0f - std::ldexp(1.0f, -20))), 0);
  check(std::nextafter(base, INFINITY), 0);  // fraction of a few 2^-24: a handful of round-ups
  // A stride of 2^10 on many random values.
  for (int n = 0; n < 300; ++n) check(draw_float_near_range(rng, lowest, highest), 10);
}

// ---- e2m1_encode_rne_fast: the comparison form the CUDA kernels use ----

TEST(E2M1Fast, EqualsTheCodecOnFloatPatternsUpTo8) {
  const uint32_t top = float_bits(8.0f);
  const uint32_t stride = 61;  // ~17.8M patterns per sign: every binade densely covered
  for (uint32_t b = 0; b <= top; b += stride) {
    for (const uint32_t sign : {0u, 0x80000000u}) {
      const float x = bits_float(b | sign);
      ASSERT_EQ(e2m1_encode_rne_fast(x), E2M1::encode(x, Rounding::kNearestEven)) << "bits 0x" << std::hex << (b | sign);
    }
  }
}

TEST(E2M1Fast, EqualsTheCodecAroundEveryMidpointAndAtTheEdges) {
  std::vector<float> xs = {0.0f, 6.0f, 8.0f, 1e30f, FLT_MAX, INFINITY, 1e-45f, 1e-40f, FLT_MIN,
                           std::numeric_limits<float>::quiet_NaN(), bits_float(0xFFC00001u)};
  for (int c = 0; c < 7; ++c) {
    const float mid = static_cast<float>((test::kE2M1Table[c] + test::kE2M1Table[c + 1]) / 2);
    float up = mid, down = mid;
    for (int k = 0; k < 4096; ++k) {  // 4096 floats on each side of each midpoint
      xs.push_back(up);
      xs.push_back(down);
      up = std::nextafter(up, INFINITY);
      down = std::nextafter(down, 0.0f);
    }
  }
  for (const float x : xs) {
    for (const float s : {1.0f, -1.0f}) {
      EXPECT_EQ(e2m1_encode_rne_fast(s * x), E2M1::encode(s * x, Rounding::kNearestEven)) << s * x;
      if (!std::isnan(x)) {
        EXPECT_EQ(e2m1_encode_rne_fast(s * x), test::ref_e2m1_rne(s * x)) << s * x;
      }
    }
  }
}

// ---- e2m1_encode_sr_fast: the integer-compare stochastic rounding the CUDA kernels use ----

// The random words that matter for x: those whose top 24 bits sit just below, at and just above
// frac * 2^24 (where the decision flips), plus a few random ones.
std::vector<uint32_t> words_around_threshold(float x, std::mt19937_64& rng) {
  RefMinifloat::Entry lo, hi;
  static const std::vector<RefMinifloat::Entry> mags = test::kRefE2M1.magnitudes();
  std::vector<uint32_t> words = {0u, 0xFFFFFFFFu, static_cast<uint32_t>(rng()), static_cast<uint32_t>(rng())};
  const double a = std::fabs(static_cast<double>(x));
  if (std::isnan(a)) return words;
  test::kRefE2M1.neighbours(a, mags, lo, hi);
  if (lo.value == hi.value) return words;
  const double t = std::floor(std::ldexp((a - lo.value) / (hi.value - lo.value), 24));
  for (const double d : {-1.0, 0.0, 1.0}) {
    const double k = t + d;
    if (k < 0 || k >= 16777216.0) continue;
    words.push_back(static_cast<uint32_t>(k) << 8 | (static_cast<uint32_t>(rng()) & 0xFFu));
  }
  return words;
}

TEST(E2M1Fast, StochasticEqualsTheCodecOnFloatPatternsUpTo8) {
  std::mt19937_64 rng(test::fresh_seed());
  const uint32_t top = float_bits(8.0f);
  for (uint32_t b = 0; b <= top; b += 1021) {
    for (const uint32_t sign : {0u, 0x80000000u}) {
      const float x = bits_float(b | sign);
      for (const uint32_t w : words_around_threshold(x, rng))
        ASSERT_EQ(e2m1_encode_sr_fast(x, w), E2M1::encode(x, Rounding::kStochastic, w))
            << "bits 0x" << std::hex << (b | sign) << " word 0x" << w;
    }
  }
}

TEST(E2M1Fast, StochasticEqualsTheCodecAroundGridPointsAndAtTheEdges) {
  std::mt19937_64 rng(test::fresh_seed());
  std::vector<float> xs = {0.0f, 6.0f, 7.0f, 8.0f, 1e30f, FLT_MAX, INFINITY, 1e-45f, 1e-40f, FLT_MIN,
                           std::numeric_limits<float>::quiet_NaN(), bits_float(0xFFC00001u)};
  // Every E2M1 value and midpoint, and 512 floats on each side of them.
  for (int c = 0; c < 8; ++c) {
    for (const double p : {test::kE2M1Table[c], c < 7 ? (test::kE2M1Table[c] + test::kE2M1Table[c + 1]) / 2 : 6.0}) {
      float up = static_cast<float>(p), down = static_cast<float>(p);
      for (int k = 0; k < 512; ++k) {
        xs.push_back(up);
        xs.push_back(down);
        up = std::nextafter(up, INFINITY);
        down = std::nextafter(down, 0.0f);
      }
    }
  }
  for (const float x : xs) {
    for (const float s : {1.0f, -1.0f}) {
      for (const uint32_t w : words_around_threshold(s * x, rng))
        ASSERT_EQ(e2m1_encode_sr_fast(s * x, w), E2M1::encode(s * x, Rounding::kStochastic, w))
            << s * x << " word 0x" << std::hex << w;
    }
  }
}

}  // namespace
}  // namespace nibble
