#include "nibble/quant/philox.h"

#include <gtest/gtest.h>

#include <vector>

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

TEST(Philox, Fp4ElementTakesItsOwnByteAsTheTopBits) {
  // Element i of an FP4 stream: byte i%4 of word (i%16)/4 of the group i/16 (low byte first), in
  // bits 24..31, with bit 23 set (the threshold in the middle of the byte's 1/256 interval).
  for (uint64_t i = 0; i < 256; ++i) {
    const uint32_t word = random_words(42, 7, i / 16).v[(i % 16) / 4];
    const uint32_t byte = (word >> (8 * (i % 4))) & 0xFFu;
    EXPECT_EQ(fp4_random_word(42, 7, i), (byte << 24) | 0x00800000u) << "element " << i;
  }
  // Neighbours draw different bytes often enough (a shared byte would correlate their roundings).
  int equal = 0;
  for (uint64_t i = 0; i + 1 < 4096; ++i) equal += fp4_random_word(42, 7, i) == fp4_random_word(42, 7, i + 1);
  EXPECT_LT(equal, 40);  // about 4096 / 256 = 16 expected by chance
  // Every byte value turns up (the generator's bytes are uniform).
  std::vector<int> seen(256, 0);
  for (uint64_t i = 0; i < 16384; ++i) seen[fp4_random_word(42, 9, i) >> 24]++;
  for (int b = 0; b < 256; ++b) {
    EXPECT_GT(seen[b], 20) << "byte " << b;  // 64 expected: P(< 21) is below 1e-10 per byte
    EXPECT_LT(seen[b], 120) << "byte " << b;
  }
}

}  // namespace
}  // namespace nibble
