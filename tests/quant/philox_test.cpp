#include "nibble/quant/philox.h"

#include <gtest/gtest.h>

namespace nibble {
namespace {

// Random123's published known-answer vectors for Philox4x32-10 (its kat_vectors file).
TEST(Philox, KnownAnswerVectors) {
  struct Case {
    Philox4x32 ctr;
    uint32_t k0, k1;
    Philox4x32 expected;
  };
  const Case cases[] = {
      {{{0, 0, 0, 0}}, 0, 0, {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}}},
      {{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}},
       0xffffffffu,
       0xffffffffu,
       {{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}}},
      {{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},
       0xa4093822u,
       0x299f31d0u,
       {{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}}},
  };
  for (const Case& c : cases) {
    const Philox4x32 got = philox4x32_10(c.ctr, c.k0, c.k1);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(got.v[i], c.expected.v[i]) << "word " << i;
  }
}

TEST(Philox, ElementWordIsIndependentOfGrouping) {
  // random_word(i) must equal word i%4 of the group i/4, whoever computes it.
  for (uint64_t i = 0; i < 64; ++i) {
    EXPECT_EQ(random_word(42, 7, i), random_words(42, 7, i / 4).v[i % 4]);
  }
  EXPECT_NE(random_word(42, 7, 0), random_word(42, 8, 0));  // streams differ
  EXPECT_NE(random_word(42, 7, 0), random_word(43, 7, 0));  // seeds differ
}

TEST(Philox, Fp4ElementTakesItsOwnHalfWordAsTheTopBits) {
  // Element i of an FP4 stream: half-word i%8 of the group i/8 (low half first), in bits 16..31.
  for (uint64_t i = 0; i < 128; ++i) {
    const uint32_t word = random_words(42, 7, i / 8).v[(i % 8) / 2];
    const uint32_t half = i % 2 == 0 ? word & 0xFFFFu : word >> 16;
    EXPECT_EQ(fp4_random_word(42, 7, i), half << 16) << "element " << i;
  }
  // Neighbours draw different bits (a shared half-word would correlate their roundings).
  int equal = 0;
  for (uint64_t i = 0; i + 1 < 4096; ++i) equal += fp4_random_word(42, 7, i) == fp4_random_word(42, 7, i + 1);
  EXPECT_LT(equal, 4);  // about 4096 / 65536 expected by chance
}

}  // namespace
}  // namespace nibble
