// Properties of the quantizers on fresh random inputs of awkward shapes and several distributions:
// every code and scale equals an independent reference built from DESIGN.md's steps and the double
// codecs of reference_codecs.h, RNE errors stay within half a step, 16x16 weights quantize the same
// as their transpose, and stochastic rounding is unbiased where RNE is not.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <vector>

#include "formats/reference_codecs.h"
#include "nibble/quant/quantize.h"
#include "quant/test_inputs.h"

namespace nibble {
namespace {

using test::Dist;
using test::RefMinifloat;

const RefMinifloat& element_format(Format f) {
  return f == Format::kFp8E4M3 ? test::kRefE4M3 : f == Format::kFp8E5M2 ? test::kRefE5M2 : test::kRefE2M1;
}

// Tensor encode scales from the tensor's amax, as DESIGN.md gives them (1/g is not always S in float).
float nvfp4_encode_scale(float amax) {
  float S = std::fmin(6.0f * 448.0f / amax, FLT_MAX);
  return S == 0 ? 1.0f : S;
}
float fp8_encode_scale(const QuantizedTensor& q) {
  const float max = static_cast<float>(element_format(q.spec.format).max_value());
  return q.amax == 0 ? 1.0f : std::fmin(max / q.amax, FLT_MAX);
}

// How element (r, c) of the quantized matrix meets its element codec, computed the way DESIGN.md
// writes it: y is what the codec rounds (NVFP4: clamp(x * e_b, -6, 6); MXFP4: x / X; FP8: x * S),
// `unit` what one unit of y dequantizes to (NVFP4: s_b * g; MXFP4: X; FP8: g).
// `clamped` marks FP4 elements whose scaled value lay beyond 6 before the clamp (the block max
// when its E4M3 scale rounded down, or MXFP4 values above 6 X).
struct ElementView {
  float y;
  double unit;
  bool clamped;
  double block_scale;  // s_b (NVFP4), X (MXFP4), 1 (FP8)
};

// fp8_scale: the FP8 tensor's encode scale S (unused for FP4).
ElementView element_view(const QuantizedTensor& q, const std::vector<float>& m, int64_t r, int64_t c,
                         float fp8_scale) {
  const float x = m[static_cast<size_t>(r * q.cols + c)];
  switch (q.spec.format) {
    case Format::kNvfp4: {
      const float sb = static_cast<float>(test::kRefE4M3.decode(test::scale_at(q, r, c)));
      const float e_b = std::fmin(1.0f / (sb * q.decode_scale), FLT_MAX);
      const float y = x * e_b;
      return {std::fmin(std::fmax(y, -6.0f), 6.0f), static_cast<double>(sb) * q.decode_scale, std::fabs(y) > 6.0f, sb};
    }
    case Format::kMxfp4: {
      const double X = std::ldexp(1.0, static_cast<int>(test::scale_at(q, r, c)) - 127);
      const float y = x * static_cast<float>(1.0 / X);
      return {y, X, std::fabs(y) > 6.0f, X};
    }
    default:
      return {x * fp8_scale, q.decode_scale, false, 1.0};
  }
}

// The matrix that gets quantized: X or X^T (no RHT in these tests).
std::vector<float> quantized_matrix(const std::vector<float>& x, int64_t rows, int64_t cols, const QuantSpec& s) {
  return s.columnwise ? test::transpose(x, rows, cols) : x;
}

// Block amax over the elements sharing scale (r, c)'s block.
float block_amax(const QuantizedTensor& q, const std::vector<float>& m, int64_t r, int64_t c) {
  const int64_t h = q.spec.block == Block::k16x16 ? 16 : 1, w = q.spec.block == Block::k1x32 ? 32 : 16;
  const int64_t r0 = r / h * h, c0 = c / w * w;
  float a = 0;
  for (int64_t i = r0; i < r0 + h; ++i)
    for (int64_t j = c0; j < c0 + w; ++j) a = std::fmax(a, std::fabs(m[static_cast<size_t>(i * q.cols + j)]));
  return a;
}

// Checks the tensor scale, every block scale and every element code of an RNE quantization
// against the reference, and that each element's error is within half a step of its format.
void check_rne_against_reference(const std::vector<float>& x, int64_t rows, int64_t cols, const QuantSpec& spec) {
  const QuantizedTensor q = quantize(x, rows, cols, spec);
  const std::vector<float> m = quantized_matrix(x, rows, cols, spec);
  float amax = 0;
  for (const float v : m) amax = std::fmax(amax, std::fabs(v));
  ASSERT_EQ(q.amax, amax);
  const RefMinifloat& fmt = element_format(spec.format);
  const std::vector<RefMinifloat::Entry> mags = fmt.magnitudes();
  const double fmt_max = mags.back().value;
  const std::vector<RefMinifloat::Entry> e4m3_mags = test::kRefE4M3.magnitudes();
  const float fp8_scale = fp8_encode_scale(q);
  // Tensor scale.
  if (spec.format == Format::kNvfp4) {
    ASSERT_EQ(q.decode_scale, 1.0f / nvfp4_encode_scale(amax));
  } else if (spec.format == Format::kMxfp4) {
    ASSERT_EQ(q.decode_scale, 1.0f);
  } else {
    ASSERT_EQ(q.decode_scale, 1.0f / fp8_scale);
  }
  const std::vector<float> deq = dequantize(q), raw = dequantize_unscaled(q);
  for (int64_t r = 0; r < q.rows; ++r) {
    for (int64_t c = 0; c < q.cols; ++c) {
      const int64_t i = r * q.cols + c;
      // Block scale, at each block's first element: NVFP4 E4M3_rne(min(amax_b * (S * (1/6)), 448));
      // MXFP4 2^(floor(log2 amax_b) - 2).
      const bool block_start = r % (spec.block == Block::k16x16 ? 16 : 1) == 0 && c % 16 == 0;
      if (block_start && spec.format == Format::kNvfp4) {
        const float S = nvfp4_encode_scale(amax);
        const float scaled = std::fmin(block_amax(q, m, r, c) * (S * (1.0f / 6.0f)), 448.0f);
        ASSERT_EQ(test::scale_at(q, r, c), test::kRefE4M3.round_nearest_even(scaled, e4m3_mags)) << "block of " << r << "," << c;
      } else if (block_start && spec.format == Format::kMxfp4 && c % 32 == 0) {
        const float a = block_amax(q, m, r, c);
        const int e = a == 0 ? -127 : std::clamp(std::ilogb(static_cast<double>(a)) - 2, -127, 127);
        ASSERT_EQ(test::scale_at(q, r, c), e + 127) << "block of " << r << "," << c << " amax " << a;
      }
      const ElementView v = element_view(q, m, r, c, fp8_scale);
      const uint8_t code = test::code_at(q, i);
      ASSERT_EQ(code, fmt.round_nearest_even(v.y, mags)) << "element " << r << "," << c << " y = " << v.y;
      const double a = std::fabs(static_cast<double>(v.y));
      if (a <= fmt_max) {
        // Half the spacing at |y|: 0.25 / 0.5 / 1 for E2M1 below 2 / in [2, 4) / in [4, 6];
        // half an ulp of the FP8 format (its subnormal spacing below the smallest normal).
        const double half_step =
            spec.format == Format::kNvfp4 || spec.format == Format::kMxfp4
                ? test::e2m1_spacing(a) / 2
                : std::ldexp(1.0, std::max(a == 0 ? -1000 : std::ilogb(a), 1 - fmt.bias) - fmt.man_bits) / 2;
        ASSERT_LE(std::fabs(v.y - fmt.decode(code)), half_step) << "element " << r << "," << c;
      }
      // Dequantized value = code value * unit (to one float rounding).
      ASSERT_NEAR(deq[i], fmt.decode(code) * v.unit, std::fabs(deq[i]) * 0x1p-23) << r << "," << c;
      // Without g (the GEMM operand): exactly code value * block scale.
      ASSERT_EQ(static_cast<double>(raw[i]), fmt.decode(code) * v.block_scale) << r << "," << c;
    }
  }
}

TEST(QuantizeProperties, Nvfp4MatchesReferenceWithinHalfStep) {
  std::mt19937_64 rng(test::fresh_seed());
  for (const test::Shape sh : test::kAwkwardShapes) {
    for (const Dist d : test::kAllDists) {
      SCOPED_TRACE(std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + " " + test::dist_name(d));
      const std::vector<float> x = test::draw_matrix(sh.rows, sh.cols, d, rng);
      for (const Block b : {Block::k1x16, Block::k16x16})
        for (const bool columnwise : {false, true})
          check_rne_against_reference(x, sh.rows, sh.cols, make_spec(Format::kNvfp4, b, Rounding::kNearestEven, columnwise));
    }
  }
}

TEST(QuantizeProperties, Mxfp4MatchesReferenceWithinHalfStep) {
  std::mt19937_64 rng(test::fresh_seed());
  for (const test::Shape sh : test::kAwkwardShapes32) {
    for (const Dist d : test::kAllDists) {
      SCOPED_TRACE(std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + " " + test::dist_name(d));
      const std::vector<float> x = test::draw_matrix(sh.rows, sh.cols, d, rng);
      check_rne_against_reference(x, sh.rows, sh.cols, make_spec(Format::kMxfp4, Block::k1x32));
      // Columnwise: the 32 rows of each column block form an MX block.
      if (sh.rows % 32 == 0)
        check_rne_against_reference(x, sh.rows, sh.cols,
                                    make_spec(Format::kMxfp4, Block::k1x32, Rounding::kNearestEven, true));
    }
  }
}

TEST(QuantizeProperties, Fp8MatchesReferenceWithinHalfStep) {
  std::mt19937_64 rng(test::fresh_seed());
  for (const test::Shape sh : test::kAwkwardShapes) {
    for (const Dist d : test::kAllDists) {
      SCOPED_TRACE(std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + " " + test::dist_name(d));
      const std::vector<float> x = test::draw_matrix(sh.rows, sh.cols, d, rng);
      for (const Format f : {Format::kFp8E4M3, Format::kFp8E5M2})
        check_rne_against_reference(x, sh.rows, sh.cols, make_spec(f, Block::kTensor));
    }
  }
}

TEST(QuantizeProperties, WeightTilesQuantizeLikeTheirTranspose) {
  std::mt19937_64 rng(test::fresh_seed());
  for (const test::Shape sh : test::kAwkwardShapes) {
    for (const Dist d : test::kAllDists) {
      SCOPED_TRACE(std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + " " + test::dist_name(d));
      const std::vector<float> w = test::draw_matrix(sh.rows, sh.cols, d, rng);
      const QuantizedTensor a = quantize(w, sh.rows, sh.cols, make_spec(Format::kNvfp4, Block::k16x16));
      const QuantizedTensor b =
          quantize(w, sh.rows, sh.cols, make_spec(Format::kNvfp4, Block::k16x16, Rounding::kNearestEven, true));
      ASSERT_EQ(b.rows, sh.cols);
      ASSERT_EQ(a.decode_scale, b.decode_scale);
      const std::vector<float> da = dequantize(a), db = dequantize(b);
      for (int64_t r = 0; r < sh.rows; ++r) {
        for (int64_t c = 0; c < sh.cols; ++c) {
          ASSERT_EQ(test::float_bits_of(da[r * sh.cols + c]), test::float_bits_of(db[c * sh.rows + r])) << r << "," << c;
          ASSERT_EQ(test::code_at(a, r * sh.cols + c), test::code_at(b, c * sh.rows + r)) << r << "," << c;
          ASSERT_EQ(test::scale_at(a, r, c), test::scale_at(b, c, r)) << r << "," << c;
        }
      }
      // Also W^T given directly: the same values as the columnwise copy of W.
      const QuantizedTensor t =
          quantize(test::transpose(w, sh.rows, sh.cols), sh.cols, sh.rows, make_spec(Format::kNvfp4, Block::k16x16));
      EXPECT_TRUE(test::same_quantized(t, b));
    }
  }
}

// ---- Stochastic rounding ----

// Mean over `seeds` stochastic quantizations of x against x, element by element. Each draw D of an
// element lies in [lo, hi] (its two neighbours, width w = hi - lo, dequantized), so Hoeffding's
// inequality bounds the mean of N independent draws: P(|mean - E[D]| >= t) <= 2 exp(-2 N t^2 / w^2).
// With t = k * w / (2 sqrt(N)) that is 2 exp(-k^2 / 2) (the variance of one draw is at most
// w^2 / 4); k = sqrt(2 ln(2 M / 1e-9)) keeps the odds of any false failure over M elements below
// 1e-9. E[D] equals x up to float rounding of the scales (|E[D] - x| <= 1e-6 |x|). FP4 elements
// clamped to 6 before rounding (MXFP4 values beyond 6 X; an NVFP4 block max whose E4M3 scale
// rounded down, up to 6 * 17/16) are biased by design and left out.
struct SrCase {
  QuantSpec spec;
  test::Shape shape;
  Dist dist;
};

TEST(StochasticRounding, MeanOverSeedsApproachesTheInput) {
  std::mt19937_64 rng(test::fresh_seed());
  const int kSeeds = 1000;
  std::vector<SrCase> cases = {
      {make_spec(Format::kNvfp4, Block::k1x16, Rounding::kStochastic), {48, 80}, Dist::kNormal},
      {make_spec(Format::kNvfp4, Block::k16x16, Rounding::kStochastic, true), {112, 48}, Dist::kHeavyTail},
      // Heavy tails rather than the x300-column-times-1e4-spike outliers: with those, the RHT'd
      // tensor's amax (up to ~1e6) pushes most blocks below E4M3's smallest scale (flushed, nothing
      // left to round; seen at 94% of the elements), and the case tests nothing.
      {make_spec(Format::kNvfp4, Block::k1x16, Rounding::kStochastic, true, true), {48, 80}, Dist::kHeavyTail},
      {make_spec(Format::kMxfp4, Block::k1x32, Rounding::kStochastic), {48, 96}, Dist::kUniform},
      {make_spec(Format::kFp8E4M3, Block::kTensor, Rounding::kStochastic), {16, 208}, Dist::kNormal},
      {make_spec(Format::kFp8E5M2, Block::kTensor, Rounding::kStochastic), {16, 208}, Dist::kHeavyTail},
  };
  int64_t total = 0;
  for (const SrCase& c : cases) total += c.shape.rows * c.shape.cols;
  const double k = std::sqrt(2 * std::log(2 * static_cast<double>(total) / 1e-9));
  for (SrCase& c : cases) {
    SCOPED_TRACE(describe(c.spec));
    const int64_t rows = c.shape.rows, cols = c.shape.cols;
    const std::vector<float> x = test::draw_matrix(rows, cols, c.dist, rng);
    c.spec.stream = static_cast<uint32_t>(rng());
    const uint64_t seed0 = rng();
    std::vector<double> sum(static_cast<size_t>(rows * cols), 0.0);
    QuantizedTensor first;
    for (int n = 0; n < kSeeds; ++n) {
      c.spec.seed = seed0 + static_cast<uint64_t>(n);
      const QuantizedTensor q = quantize(x, rows, cols, c.spec);
      if (n == 0) first = q;
      ASSERT_EQ(q.scales, first.scales);  // scales never depend on the random bits
      const std::vector<float> d = dequantize(q);
      for (size_t i = 0; i < d.size(); ++i) sum[i] += d[i];
    }
    // The values SR aims at: the quantized matrix (transposed and/or transformed as the spec says).
    std::vector<float> m = quantized_matrix(x, rows, cols, c.spec);
    if (c.spec.rht) rht_blocks(m, first.rows, first.cols, c.spec.rht_signs);
    const RefMinifloat& fmt = element_format(c.spec.format);
    const std::vector<RefMinifloat::Entry> mags = fmt.magnitudes();
    const float fp8_scale = fp8_encode_scale(first);
    int64_t checked = 0, flushed = 0;
    for (int64_t r = 0; r < first.rows; ++r) {
      for (int64_t cc = 0; cc < first.cols; ++cc) {
        const ElementView v = element_view(first, m, r, cc, fp8_scale);
        if (v.block_scale == 0) {  // a block below E4M3's range: flushed to zero, nothing to round
          ++flushed;
          continue;
        }
        if (v.clamped) continue;
        RefMinifloat::Entry lo, hi;
        fmt.neighbours(std::fabs(static_cast<double>(v.y)), mags, lo, hi);
        const double width = (hi.value - lo.value) * v.unit;
        const size_t i = static_cast<size_t>(r * first.cols + cc);
        const double xv = m[i];
        const double mean = sum[i] / kSeeds;
        // Slack for float rounding of the scales (1e-6 |x|) and for the resolution of SR's draw: FP4
        // elements take 8 random bits (the rounding probability within 2^-9 of a step of the
        // fraction), FP8 elements 24 (2^-23 w).
        const int draw_bits = c.spec.format == Format::kNvfp4 || c.spec.format == Format::kMxfp4 ? 8 : 24;
        const double slack = 1e-6 * std::fabs(xv) + std::ldexp(width, -draw_bits - 1);
        ASSERT_LE(std::fabs(mean - xv), k * width / (2 * std::sqrt(static_cast<double>(kSeeds))) + slack)
            << "element " << r << "," << cc << ": x = " << xv << ", mean " << mean << ", step " << width;
        ++checked;
      }
    }
    // All but the clamped block maxima are checked, apart from whole blocks flushed to zero: with
    // outlier inputs (a 1e4 spike in a x300 column, then the RHT), ordinary blocks can fall below
    // E4M3's smallest scale relative to the tensor's amax; seen flushing up to 88% of one case.
    std::printf("[ coverage ] %s: %lld of %lld elements checked, %lld in flushed blocks\n",
                describe(c.spec).c_str(), static_cast<long long>(checked), static_cast<long long>(first.numel()),
                static_cast<long long>(flushed));
    EXPECT_GT(checked, (first.numel() - flushed) * 9 / 10);
    EXPECT_GE(checked, 256);  // never vacuous
  }
}

// Inputs placed 30% of a step above an E2M1 value (in magnitude): RNE always rounds them toward
// zero (a bias of -0.3 steps in magnitude), SR's average error over all elements and seeds is zero
// within Hoeffding's bound.
TEST(StochasticRounding, RemovesTheBiasOfNearestRounding) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t rows = 16, cols = 256;
  const float c = std::uniform_real_distribution<float>(0.5f, 2.0f)(rng);
  std::vector<float> x(static_cast<size_t>(rows * cols));
  std::vector<double> step(x.size(), 0.0);  // in units of x; 0 for the block maxima
  for (size_t i = 0; i < x.size(); ++i) {
    const float sign = (rng() & 1) ? -1.0f : 1.0f;
    if (i % 16 == 0) {
      x[i] = sign * 6 * c;  // every block's amax is the tensor's: s_b = 448, e_b ~ 1/c
      continue;
    }
    const int lo = static_cast<int>(rng() % 7);  // E2M1 index 0..6; the next one up is lo + 1
    const double w = test::kE2M1Table[lo + 1] - test::kE2M1Table[lo];
    x[i] = sign * c * static_cast<float>(test::kE2M1Table[lo] + 0.3 * w);
    step[i] = w * c;
  }
  const auto mean_normalized_error = [&](const QuantSpec& spec, int seeds) {
    double total = 0;
    int64_t n = 0;
    QuantSpec s = spec;
    for (int k = 0; k < seeds; ++k) {
      s.seed = rng();
      const std::vector<float> d = dequantize(quantize(x, rows, cols, s));
      for (size_t i = 0; i < x.size(); ++i) {
        if (step[i] == 0) continue;
        // (|D| - |x|) / w lies in [-0.3, 0.7]: Hoeffding on its mean over n draws.
        total += (std::fabs(static_cast<double>(d[i])) - std::fabs(x[i])) / step[i];
        ++n;
      }
    }
    return std::pair<double, int64_t>{total / static_cast<double>(n), n};
  };
  const auto [rne_bias, rne_n] = mean_normalized_error(make_spec(Format::kNvfp4, Block::k1x16), 1);
  EXPECT_NEAR(rne_bias, -0.3, 1e-3) << "RNE rounds every element down";
  const auto [sr_bias, sr_n] =
      mean_normalized_error(make_spec(Format::kNvfp4, Block::k1x16, Rounding::kStochastic), 300);
  // Width 1 per term: P(|mean| >= t) <= 2 exp(-2 n t^2) = 1e-9 at t = sqrt(ln(2e9) / (2n)). SR's 8
  // random bits resolve the rounding probability to 2^-9 of a step (at 0.3 of a step it is 77/256).
  const double t = std::sqrt(std::log(2e9) / (2.0 * static_cast<double>(sr_n)));
  EXPECT_LE(std::fabs(sr_bias), t + std::ldexp(1.0, -9) + 1e-5)
      << "SR mean error " << sr_bias << " over " << sr_n << " draws";
}

}  // namespace
}  // namespace nibble
