// Philox4x32-10 (Salmon et al., SC'11), the counter-based generator behind stochastic rounding and
// random sign vectors. The random bits of element i depend only on (seed, stream, i), never on
// which thread computes them, so the CPU reference and every CUDA launch shape draw the same bits
// and a run is reproducible from its seed.
#pragma once

#include <cstdint>

#include "nibble/formats/host_device.h"

namespace nibble {

struct Philox4x32 {
  uint32_t v[4];
};

// The ten round keys of a key (k0, k1): round r uses k0 + r W0 and k1 + r W1. Computed once, they
// let a kernel keep them for all its calls (they depend on the seed only, so they are the same in
// every thread) instead of adding the constants again in every call.
struct PhiloxKeys {
  uint32_t k0[10], k1[10];
};
NIBBLE_HD PhiloxKeys philox_round_keys(uint32_t k0, uint32_t k1) {
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  PhiloxKeys k;
NIBBLE_UNROLL
  for (int round = 0; round < 10; ++round) {
    k.k0[round] = k0 + static_cast<uint32_t>(round) * kW0;
    k.k1[round] = k1 + static_cast<uint32_t>(round) * kW1;
  }
  return k;
}

NIBBLE_HD Philox4x32 philox4x32_10(Philox4x32 ctr, const PhiloxKeys& keys) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
NIBBLE_UNROLL
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * ctr.v[0];
    const uint64_t p1 = static_cast<uint64_t>(kM1) * ctr.v[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    ctr = Philox4x32{{hi1 ^ ctr.v[1] ^ keys.k0[round], lo1, hi0 ^ ctr.v[3] ^ keys.k1[round], lo0}};
  }
  return ctr;
}

NIBBLE_HD Philox4x32 philox4x32_10(Philox4x32 ctr, uint32_t k0, uint32_t k1) {
  return philox4x32_10(ctr, philox_round_keys(k0, k1));
}

inline constexpr uint32_t kCounterTag = 0x6E69626Cu;  // "nibl"

// The round keys of a 64-bit seed (low word k0, high word k1).
NIBBLE_HD PhiloxKeys philox_round_keys(uint64_t seed) {
  return philox_round_keys(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}
// The four random words for elements 4*group .. 4*group+3 of a stream (seed_keys: philox_round_keys(seed)).
NIBBLE_HD Philox4x32 random_words(const PhiloxKeys& seed_keys, uint32_t stream, uint64_t group) {
  return philox4x32_10(
      Philox4x32{{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), stream, kCounterTag}}, seed_keys);
}
NIBBLE_HD Philox4x32 random_words(uint64_t seed, uint32_t stream, uint64_t group) {
  return random_words(philox_round_keys(seed), stream, group);
}

NIBBLE_HD uint32_t random_word(uint64_t seed, uint32_t stream, uint64_t index) {
  return random_words(seed, stream, index >> 2).v[index & 3];
}

// FP4 (E2M1) elements draw 8 random bits each, as Blackwell's stochastic conversion does (one 32-bit
// word for four values in cvt.rs.satfinite.e2m1x4.f32), so one generator call serves a 16-element
// block (the generator is what stochastic rounding's quantization pass spends most of its time on).
// Element `index` takes byte index % 4 of word index % 16 / 4 of random_words(seed, stream, index / 16).
// With byte b the element's random word is b * 2^24 + 2^23: E2M1's stochastic encoder rounds up when
// the fraction below the kept bit exceeds the word's top 24 bits, u = (b + 1/2) / 256, so the
// threshold sits in the middle of each 1/256 interval and the rounding probability is within 2^-9 of
// a step of the exact fraction, with no bias on average over the fraction.
inline constexpr int kFp4ElementsPerGroup = 16;
inline constexpr uint32_t kFp4RandomHalfStep = 0x00800000u;  // the 1/2 in (b + 1/2) / 256
NIBBLE_HD uint32_t fp4_random_word(const Philox4x32& group_words, int element_in_group) {
  const uint32_t byte = (group_words.v[element_in_group >> 2] >> (8 * (element_in_group & 3))) & 0xFFu;
  return (byte << 24) | kFp4RandomHalfStep;
}
NIBBLE_HD uint32_t fp4_random_word(uint64_t seed, uint32_t stream, uint64_t index) {
  return fp4_random_word(random_words(seed, stream, index / kFp4ElementsPerGroup),
                         static_cast<int>(index % kFp4ElementsPerGroup));
}

}  // namespace nibble
