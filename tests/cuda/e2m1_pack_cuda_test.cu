// The fused passes' E2M1 encoders (e2m1_pack.cuh) against the reference encoders of minifloat.h,
// run on the device: every float in [0, 16] (past the saturation point 6 and the grids' crossings),
// with random words and the extreme words 0 and 0xFFFF, and whole packed words of random signed
// values.
#include <gtest/gtest.h>

#include <cstdint>
#include <cmath>
#include <random>
#include <span>
#include <vector>

#include "nibble/tensor/cuda/device_buffer.h"
#include "test_seed.h"
#include "nibble/formats/minifloat.h"
#include "nibble/quant/cuda/e2m1_pack.cuh"
#include "nibble/quant/philox.h"

namespace nibble::cuda {
namespace {

struct Mismatches {
  unsigned long long count;
  uint32_t first_bits;  // the input's float bits
  uint32_t first_word;  // the random word (stochastic rounding)
};

__device__ void record(Mismatches* m, uint32_t bits, uint32_t word) {
  if (atomicAdd(&m->count, 1ull) == 0) {
    m->first_bits = bits;
    m->first_word = word;
  }
}

// Every non-negative float with bits in [0, end], plus +inf: the magnitude code of e2m1_rne_magic and
// of e2m1_sr_magic with three random bytes (one drawn per float from `seed`, and 0 and 0xFF).
__global__ void magnitude_codes_kernel(uint32_t end, uint64_t seed, Mismatches* rne, Mismatches* sr) {
  for (uint64_t i = blockIdx.x * static_cast<uint64_t>(blockDim.x) + threadIdx.x; i <= end + 1ull;
       i += static_cast<uint64_t>(gridDim.x) * blockDim.x) {
    const uint32_t bits = i <= end ? static_cast<uint32_t>(i) : 0x7F800000u;
    const float y = bits_float(bits);
    const uint32_t rne_code = float_bits(e2m1_rne_magic<true>(y)) - float_bits(kE2m1RneMagic);
    if (rne_code != e2m1_encode_rne_fast(y)) record(rne, bits, 0);
    if (y < 7.0f && float_bits(e2m1_rne_magic<false>(y)) != float_bits(e2m1_rne_magic<true>(y))) record(rne, bits, 1);
    const Philox4x32 group = random_words(seed, 0, i);
    const uint32_t bytes[3] = {group.v[0] & 0xFFu, 0u, 0xFFu};
    for (uint32_t b : bytes) {
      Philox4x32 g{{b, 0, 0, 0}};  // element 0 of a group draws the low byte of word 0
      const uint32_t sr_code = float_bits(e2m1_sr_magic(y, sr_threshold(g, 0))) - float_bits(kE2m1SrMagic);
      if (sr_code != e2m1_encode_sr_fast(y, fp4_random_word(g, 0))) record(sr, bits, b);
    }
  }
}

// Packed words of eight random signed values times a scale against the element encoders.
__global__ void packed_words_kernel(const float* v, const float* scales, int words, uint64_t seed, Mismatches* rne,
                                    Mismatches* sr) {
  const int w = blockIdx.x * blockDim.x + threadIdx.x;
  if (w >= words) return;
  const float* x = v + 8 * w;
  const float scale = scales[w];
  const Philox4x32 group = random_words(seed, 3, w / 2);  // word w takes half w % 2 of a group's bytes
  const int half = w % 2;
  uint32_t want_rne = 0, want_sr = 0;
  for (int k = 0; k < 8; ++k) {
    want_rne |= static_cast<uint32_t>(e2m1_encode_rne_fast(x[k] * scale)) << (4 * k);
    want_sr |= static_cast<uint32_t>(e2m1_encode_sr_fast(x[k] * scale, fp4_random_word(group, 8 * half + k))) << (4 * k);
  }
  if (pack8_rne<true>(x, scale) != want_rne) record(rne, w, 0);
  const uint32_t got_sr = half == 0 ? pack8_sr<0>(x, scale, group) : pack8_sr<1>(x, scale, group);
  if (got_sr != want_sr) record(sr, w, group.v[0]);
}


TEST(E2m1PackCuda, MagnitudeCodesEqualTheReferenceOnEveryFloatUpTo16) {
  const uint64_t seed = test::fresh_seed();
  DeviceBuffer<Mismatches> m(2);
  m.zero();
  magnitude_codes_kernel<<<132 * 16, 256>>>(float_bits(16.0f), seed, m.data(), m.data() + 1);
  NIBBLE_CUDA_CHECK_LAUNCH();
  const std::vector<Mismatches> found = m.download();
  const Mismatches& r = found[0];
  const Mismatches& s = found[1];
  EXPECT_EQ(r.count, 0u) << "round to nearest: first at float bits 0x" << std::hex << r.first_bits << " (check "
                         << r.first_word << ")";
  EXPECT_EQ(s.count, 0u) << "stochastic rounding: first at float bits 0x" << std::hex << s.first_bits
                         << ", random byte 0x" << s.first_word << " (seed " << std::dec << seed << ")";
}

TEST(E2m1PackCuda, PackedWordsOfSignedValuesEqualTheElementEncoders) {
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  constexpr int kWords = 1 << 16;
  std::vector<float> v(8 * kWords), scales(kWords);
  std::uniform_real_distribution<float> mag(0.0f, 1.0f);
  for (int w = 0; w < kWords; ++w) {
    scales[w] = std::ldexp(1.0f + mag(rng), static_cast<int>(rng() % 8) - 4);
    for (int k = 0; k < 8; ++k) {
      float x = std::ldexp(mag(rng), static_cast<int>(rng() % 8) - 4);  // |x * scale| up to past 6
      if (rng() % 16 == 0) x = 0.0f;
      v[8 * w + k] = rng() % 2 ? -x : x;
    }
  }
  const DeviceBuffer<float> dv{std::span<const float>(v)}, ds{std::span<const float>(scales)};
  DeviceBuffer<Mismatches> m(2);
  m.zero();
  packed_words_kernel<<<(kWords + 255) / 256, 256>>>(dv.data(), ds.data(), kWords, seed, m.data(), m.data() + 1);
  NIBBLE_CUDA_CHECK_LAUNCH();
  const std::vector<Mismatches> found = m.download();
  const Mismatches& r = found[0];
  const Mismatches& s = found[1];
  EXPECT_EQ(r.count, 0u) << "round to nearest: first at word " << r.first_bits << " (seed " << seed << ")";
  EXPECT_EQ(s.count, 0u) << "stochastic rounding: first at word " << s.first_bits << " (seed " << seed << ")";
}

}  // namespace
}  // namespace nibble::cuda
