// The Random Hadamard Transform: equal to x @ diag(signs) @ H16 / 4 computed from the matrix's
// definition, orthogonal (dot products and norms kept, inverse recovers the input) to float
// rounding, TransformerEngine's default signs, seeded signs, and its place in the quantizer.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <set>
#include <stdexcept>
#include <vector>

#include "nibble/quant/quantize.h"
#include "nibble/quant/rht.h"
#include "quant/test_inputs.h"

namespace nibble {
namespace {

using test::Dist;

// Sylvester's H16: H[i][j] = (-1)^popcount(i & j).
double hadamard(int i, int j) { return std::popcount(static_cast<unsigned>(i & j)) % 2 ? -1.0 : 1.0; }

// y_j = sum_i x_i * s_i * H[i][j] / 4 in double.
std::vector<double> reference_rht(const float* x, RhtSigns s) {
  std::vector<double> y(16, 0.0);
  for (int j = 0; j < 16; ++j)
    for (int i = 0; i < 16; ++i) y[j] += static_cast<double>(x[i]) * s.sign(i) * hadamard(i, j) / 4;
  return y;
}

double dot(const float* a, const float* b) {
  double d = 0;
  for (int i = 0; i < 16; ++i) d += static_cast<double>(a[i]) * b[i];
  return d;
}

TEST(Rht, DefaultSignsAreTransformerEngines) {
  // DESIGN.md: [+1,+1,+1,-1,+1,-1,-1,-1,-1,-1,-1,+1,-1,+1,-1,-1].
  const float te[16] = {1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1};
  for (int i = 0; i < 16; ++i) EXPECT_EQ(kDefaultRhtSigns.sign(i), te[i]) << i;
  EXPECT_EQ(QuantSpec{}.rht_signs.negative_mask, kDefaultRhtSigns.negative_mask);  // the default spec uses them
}

TEST(Rht, UnitVectorsGiveSignedHadamardRows) {
  // rht16(e_k) = s_k * H[k][:] / 4 exactly: this pins the matrix (and that the signs apply to the
  // input side, x diag(s) H, not to the output).
  for (const RhtSigns s : {kDefaultRhtSigns, RhtSigns{0}, RhtSigns{0xFFFF}, rht_signs_from_seed(7)}) {
    for (int k = 0; k < 16; ++k) {
      float v[16] = {};
      v[k] = 1.0f;
      rht16(v, s);
      for (int j = 0; j < 16; ++j) ASSERT_EQ(v[j], static_cast<float>(s.sign(k) * hadamard(k, j) / 4)) << k << "," << j;
    }
  }
}

TEST(Rht, MatchesTheMatrixProductToFloatRounding) {
  std::mt19937_64 rng(test::fresh_seed());
  for (const Dist d : test::kAllDists) {
    const std::vector<float> x = test::draw_matrix(1, 16 * 500, d, rng);
    for (size_t b = 0; b < x.size(); b += 16) {
      const RhtSigns s = (b / 16) % 2 ? kDefaultRhtSigns : RhtSigns{static_cast<uint16_t>(rng())};
      float v[16];
      std::copy(x.begin() + b, x.begin() + b + 16, v);
      rht16(v, s);
      const std::vector<double> want = reference_rht(&x[b], s);
      double l1 = 0;
      for (int i = 0; i < 16; ++i) l1 += std::fabs(x[b + i]);
      // Four butterfly stages, each rounding once with error <= 2^-24 * sum|x|; then * 0.25 (exact).
      for (int j = 0; j < 16; ++j)
        ASSERT_LE(std::fabs(v[j] - want[j]), std::ldexp(l1, -24)) << test::dist_name(d) << " block " << b / 16 << " j " << j;
    }
  }
}

TEST(Rht, KeepsDotProductsAndNorms) {
  std::mt19937_64 rng(test::fresh_seed());
  for (const Dist d : test::kAllDists) {
    const std::vector<float> x = test::draw_matrix(1, 16 * 400, d, rng);
    const std::vector<float> y = test::draw_matrix(1, 16 * 400, d, rng);
    for (const RhtSigns s : {kDefaultRhtSigns, rht_signs_from_seed(rng())}) {
      std::vector<float> tx = x, ty = y;
      rht_blocks(tx, 1, static_cast<int64_t>(x.size()), s);
      rht_blocks(ty, 1, static_cast<int64_t>(y.size()), s);
      for (size_t b = 0; b < x.size(); b += 16) {
        const double nx = std::sqrt(dot(&x[b], &x[b])), ny = std::sqrt(dot(&y[b], &y[b]));
        // Relative to the norms (a dot product near zero has no relative accuracy to speak of).
        // Each transformed component is off by <= 2^-24 |x|_1 <= 2^-22 |x|_2 (see above), so the
        // error vector's norm is <= 16 * 2^-24 |x|_2 and the dot product moves by at most
        // (16 + 16 + tiny) * 2^-24 |x| |y|, about 2e-6 relative.
        const double bound = 33 * std::ldexp(1.0, -24);
        EXPECT_LE(std::fabs(dot(&tx[b], &ty[b]) - dot(&x[b], &y[b])), bound * nx * ny) << test::dist_name(d);
        EXPECT_LE(std::fabs(dot(&tx[b], &tx[b]) - nx * nx), bound * nx * nx) << test::dist_name(d);
      }
    }
  }
}

TEST(Rht, InverseRecoversTheInput) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t rows = 48, cols = 80;
  for (const Dist d : test::kAllDists) {
    const std::vector<float> x = test::draw_matrix(rows, cols, d, rng);
    const RhtSigns s = rht_signs_from_seed(rng());
    for (const bool inverse_first : {false, true}) {
      std::vector<float> y = x;
      rht_blocks(y, rows, cols, s, inverse_first);
      rht_blocks(y, rows, cols, s, !inverse_first);
      // First pass: error <= 2^-24 |x|_1 per component, which the second (orthogonal) pass spreads
      // to <= 4 * 2^-24 |x|_1; the second pass adds its own 2^-24 |y|_1. With |.|_1 <= 4 |.|_2:
      // <= 20 * 2^-24 |x|_2, about 1.2e-6 of the block's norm.
      const double bound = 20 * std::ldexp(1.0, -24);
      for (int64_t b = 0; b < rows * cols; b += 16) {
        const double norm = std::sqrt(dot(&x[b], &x[b]));
        for (int i = 0; i < 16; ++i) ASSERT_LE(std::fabs(y[b + i] - x[b + i]), bound * norm) << test::dist_name(d);
      }
    }
    // The inverse is the transpose of the forward matrix: H16 diag(s) / 4.
    float v[16];
    std::copy(x.begin(), x.begin() + 16, v);
    rht_blocks(std::span<float>(v, 16), 1, 16, s, true);
    for (int j = 0; j < 16; ++j) {
      double want = 0;
      for (int i = 0; i < 16; ++i) want += hadamard(j, i) * s.sign(j) * x[i] / 4;
      double l1 = 0;
      for (int i = 0; i < 16; ++i) l1 += std::fabs(x[i]);
      EXPECT_LE(std::fabs(v[j] - want), std::ldexp(l1, -23));
    }
  }
}

TEST(Rht, BlocksAreIndependentAlongRows) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t rows = 3, cols = 64;
  const std::vector<float> x = test::draw_matrix(rows, cols, Dist::kNormal, rng);
  std::vector<float> y = x;
  rht_blocks(y, rows, cols, kDefaultRhtSigns);
  for (int64_t b = 0; b < rows * cols; b += 16) {
    float v[16];
    std::copy(x.begin() + b, x.begin() + b + 16, v);
    rht16(v, kDefaultRhtSigns);
    for (int i = 0; i < 16; ++i) ASSERT_EQ(y[b + i], v[i]);
  }
  std::vector<float> bad(3 * 24);
  EXPECT_THROW(rht_blocks(bad, 3, 24, kDefaultRhtSigns), std::invalid_argument);
}

TEST(Rht, SeededSignsAreReproducibleAndDiffer) {
  // Fixed seeds, so the outcome is deterministic.
  std::set<uint16_t> masks;
  int negatives = 0;
  for (uint64_t seed = 0; seed < 4096; ++seed) {
    const RhtSigns s = rht_signs_from_seed(seed);
    EXPECT_EQ(s.negative_mask, rht_signs_from_seed(seed).negative_mask);
    // Documented draw: the low 16 bits of one Philox word on the RHT stream.
    EXPECT_EQ(s.negative_mask, random_word(seed, kRhtSignStream, 0) & 0xFFFFu);
    if (seed < 200) masks.insert(s.negative_mask);
    negatives += std::popcount(static_cast<unsigned>(s.negative_mask));
  }
  EXPECT_GE(masks.size(), 195u);  // 200 draws from 65536 masks: ~0.3 collisions expected
  EXPECT_NE(rht_signs_from_seed(1).negative_mask, rht_signs_from_seed(2).negative_mask);
  // Fair signs: 65536 of them, mean 32768, standard deviation 128.
  EXPECT_NEAR(negatives, 32768, 6 * 128);
}

// The quantizer's RHT is rht_blocks on the quantized matrix (after the columnwise transpose),
// with the amax taken after the transform.
TEST(Rht, QuantizeWithRhtEqualsQuantizeOfTheTransformedMatrix) {
  std::mt19937_64 rng(test::fresh_seed());
  for (const test::Shape sh : test::kAwkwardShapes) {
    for (const Dist d : {Dist::kOutliers, Dist::kHeavyTail}) {
      const std::vector<float> x = test::draw_matrix(sh.rows, sh.cols, d, rng);
      for (const bool columnwise : {false, true}) {
        for (const Rounding r : {Rounding::kNearestEven, Rounding::kStochastic}) {
          QuantSpec s = make_spec(Format::kNvfp4, Block::k1x16, r, columnwise, true);
          s.rht_signs = rht_signs_from_seed(rng());
          s.seed = rng();
          const int64_t qr = columnwise ? sh.cols : sh.rows, qc = columnwise ? sh.rows : sh.cols;
          std::vector<float> m = columnwise ? test::transpose(x, sh.rows, sh.cols) : x;
          rht_blocks(m, qr, qc, s.rht_signs);
          QuantSpec plain = s;
          plain.rht = false;
          plain.columnwise = false;
          const QuantizedTensor a = quantize(x, sh.rows, sh.cols, s);
          const QuantizedTensor b = quantize(m, qr, qc, plain);
          EXPECT_TRUE(test::same_quantized(a, b)) << sh.rows << "x" << sh.cols << " " << describe(s);
          float amax = 0;
          for (const float v : m) amax = std::max(amax, std::fabs(v));
          EXPECT_EQ(a.amax, amax);
        }
      }
    }
  }
}

}  // namespace
}  // namespace nibble
