// The quantizers' documented edge behaviour (quantize.h): all-zero tensors and blocks, NaN and
// infinities, rejected shapes and specs, bf16 input, and stochastic rounding's reproducibility
// from (seed, stream) and its per-element random words.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "nibble/quant/philox.h"
#include "nibble/quant/quantize.h"
#include "nibble/quant/scaling.h"
#include "quant/test_inputs.h"

namespace nibble {
namespace {

using test::Dist;

// Every spec the CPU quantizer accepts, on a shape all of them take (rows and cols multiples of 32).
std::vector<QuantSpec> all_specs(Rounding r) {
  std::vector<QuantSpec> specs;
  for (const bool cw : {false, true}) {
    specs.push_back(make_spec(Format::kNvfp4, Block::k1x16, r, cw));
    specs.push_back(make_spec(Format::kNvfp4, Block::k1x16, r, cw, true));
    specs.push_back(make_spec(Format::kNvfp4, Block::k16x16, r, cw));
    specs.push_back(make_spec(Format::kMxfp4, Block::k1x32, r, cw));
    specs.push_back(make_spec(Format::kMxfp4, Block::k1x32, r, cw, true));
    specs.push_back(make_spec(Format::kFp8E4M3, Block::kTensor, r, cw));
    specs.push_back(make_spec(Format::kFp8E5M2, Block::kTensor, r, cw));
  }
  return specs;
}

bool all_zero(const std::vector<uint8_t>& v) {
  for (const uint8_t b : v)
    if (b != 0) return false;
  return true;
}

TEST(QuantizeEdges, AllZeroTensor) {
  const int64_t rows = 32, cols = 64;
  const std::vector<float> x(rows * cols, 0.0f);
  for (const Rounding r : {Rounding::kNearestEven, Rounding::kStochastic}) {
    for (const QuantSpec& s : all_specs(r)) {
      SCOPED_TRACE(describe(s));
      const QuantizedTensor q = quantize(x, rows, cols, s);
      EXPECT_EQ(q.amax, 0.0f);
      EXPECT_TRUE(q.finite());
      EXPECT_TRUE(all_zero(q.data));
      EXPECT_TRUE(all_zero(q.scales));  // E4M3 0, or E8M0 code 0 (2^-127, the smallest scale)
      if (s.format == Format::kNvfp4) {  // S = FLT_MAX
        EXPECT_EQ(q.decode_scale, 1.0f / FLT_MAX);
      }
      if (s.format == Format::kFp8E4M3 || s.format == Format::kFp8E5M2) {
        EXPECT_EQ(q.decode_scale, 1.0f);
      }
      for (const float v : dequantize(q)) ASSERT_EQ(test::float_bits_of(v), 0u);
    }
  }
  // Negative zeros keep their sign: code 8 in both nibbles, dequantized -0.
  const std::vector<float> nz(rows * cols, -0.0f);
  const QuantizedTensor q = quantize(nz, rows, cols, make_spec(Format::kNvfp4, Block::k1x16));
  for (const uint8_t b : q.data) ASSERT_EQ(b, 0x88);
  for (const float v : dequantize(q)) ASSERT_TRUE(v == 0.0f && std::signbit(v));
}

TEST(QuantizeEdges, ZeroAndUnderflowingBlocksInsideATensor) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t rows = 16, cols = 64;
  std::vector<float> x = test::draw_matrix(rows, cols, Dist::kNormal, rng);
  x[0] = 100.0f;  // the tensor amax: S = 26.88
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 16; c < 32; ++c) x[r * cols + c] = 0.0f;        // an all-zero column of blocks
    for (int64_t c = 32; c < 48; ++c) x[r * cols + c] *= 1e-8f;      // blocks whose E4M3 scale underflows
  }
  for (const Block b : {Block::k1x16, Block::k16x16}) {
    SCOPED_TRACE(block_name(b));
    const QuantizedTensor q = quantize(x, rows, cols, make_spec(Format::kNvfp4, b));
    const std::vector<float> d = dequantize(q);
    for (int64_t r = 0; r < rows; ++r) {
      // amax_b * S / 6 < 1e-7 * 4.5, far below half the smallest E4M3 subnormal (2^-10): scale 0,
      // e_b = FLT_MAX, and the block dequantizes to zeros, not NaN.
      EXPECT_EQ(test::scale_at(q, r, 16), 0);
      EXPECT_EQ(test::scale_at(q, r, 32), 0);
      for (int64_t c = 16; c < 48; ++c) {
        ASSERT_EQ(std::fabs(d[r * cols + c]), 0.0f) << r << "," << c;
        if (c < 32) {
          ASSERT_EQ(test::code_at(q, r * cols + c), 0) << r << "," << c;
        }
      }
      for (int64_t c : {0, 1, 50, 63}) EXPECT_TRUE(std::isfinite(d[r * cols + c]));
    }
  }
}

TEST(QuantizeEdges, NanAndInfinityMarkTheTensorNonFinite) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t rows = 32, cols = 64;
  const float bad_values[] = {std::numeric_limits<float>::quiet_NaN(), INFINITY, -INFINITY};
  for (const float bad : bad_values) {
    std::vector<float> x = test::draw_matrix(rows, cols, Dist::kNormal, rng);
    const int64_t at = static_cast<int64_t>(rng() % static_cast<uint64_t>(rows * cols));
    x[static_cast<size_t>(at)] = bad;
    for (const Rounding r : {Rounding::kNearestEven, Rounding::kStochastic}) {
      for (const QuantSpec& s : all_specs(r)) {
        SCOPED_TRACE(describe(s) + " with " + std::to_string(bad) + " at " + std::to_string(at));
        const QuantizedTensor q = quantize(x, rows, cols, s);
        EXPECT_FALSE(std::isfinite(q.amax));
        if (!s.rht && !std::isnan(bad)) {
          EXPECT_EQ(q.amax, INFINITY);
        }
        if (s.format == Format::kMxfp4) continue;  // per block, below
        // NVFP4 and FP8: the whole tensor is marked, its data and scales zero, dequantized NaN.
        EXPECT_FALSE(q.finite());
        EXPECT_TRUE(std::isnan(q.decode_scale));
        EXPECT_TRUE(all_zero(q.data));
        EXPECT_TRUE(all_zero(q.scales));
        for (const float v : dequantize(q)) ASSERT_TRUE(std::isnan(v));
      }
    }
  }
}

TEST(QuantizeEdges, Mxfp4MarksOnlyTheNonFiniteBlock) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t rows = 4, cols = 96;
  const std::vector<float> clean = test::draw_matrix(rows, cols, Dist::kOutliers, rng);
  const QuantizedTensor ref = quantize(clean, rows, cols, make_spec(Format::kMxfp4, Block::k1x32));
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), INFINITY, -INFINITY}) {
    std::vector<float> x = clean;
    const int64_t r = 2, c = 40 + static_cast<int64_t>(rng() % 24);  // block (2, 1)
    x[r * cols + c] = bad;
    const QuantizedTensor q = quantize(x, rows, cols, make_spec(Format::kMxfp4, Block::k1x32));
    EXPECT_TRUE(q.finite());
    EXPECT_EQ(q.decode_scale, 1.0f);
    const std::vector<float> d = dequantize(q), dref = dequantize(ref);
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) {
        const bool in_bad_block = i == r && j / 32 == 1;
        if (j % 32 == 0) {
          EXPECT_EQ(test::scale_at(q, i, j), in_bad_block ? E8M0::kNanCode : test::scale_at(ref, i, j));
        }
        if (in_bad_block) {
          ASSERT_EQ(test::code_at(q, i * cols + j), 0) << "elements of a NaN-scale block stay zero";
          ASSERT_TRUE(std::isnan(d[i * cols + j]));
        } else {
          ASSERT_EQ(test::code_at(q, i * cols + j), test::code_at(ref, i * cols + j));
          ASSERT_EQ(test::float_bits_of(d[i * cols + j]), test::float_bits_of(dref[i * cols + j]));
        }
      }
    }
  }
}

// Each rejected case with a phrase its message must contain.
struct Rejected {
  QuantSpec spec;
  int64_t rows, cols;
  const char* phrase;
};

TEST(QuantizeEdges, RejectsShapesAndSpecsWithAMessage) {
  const Rejected cases[] = {
      {make_spec(Format::kNvfp4, Block::k1x16), 4, 24, "number of columns must be a multiple of 16"},
      {make_spec(Format::kNvfp4, Block::k1x16), 16, 8, "number of columns must be a multiple of 16"},
      {make_spec(Format::kNvfp4, Block::k1x16, Rounding::kNearestEven, true), 24, 16, "number of rows must be a multiple of 16"},
      {make_spec(Format::kNvfp4, Block::k16x16), 24, 32, "16x16 tiles need both dimensions to be multiples of 16"},
      {make_spec(Format::kNvfp4, Block::k16x16), 32, 40, "multiple of 16"},
      {make_spec(Format::kMxfp4, Block::k1x32), 2, 48, "number of columns must be a multiple of 32"},
      {make_spec(Format::kMxfp4, Block::k1x32, Rounding::kNearestEven, true), 48, 32, "number of rows must be a multiple of 32"},
      {make_spec(Format::kNvfp4, Block::k16x16, Rounding::kNearestEven, false, true), 32, 32, "RHT"},
      {make_spec(Format::kNvfp4, Block::k1x32), 32, 32, "nvfp4 takes 1x16 or 16x16 blocks"},
      {make_spec(Format::kMxfp4, Block::k1x16), 32, 32, "mxfp4 takes 1x32 blocks"},
      {make_spec(Format::kFp8E4M3, Block::k1x16), 32, 32, "fp8 uses one per-tensor scale"},
      {make_spec(Format::kNvfp4, Block::k1x16), 0, 32, "empty"},
      {make_spec(Format::kFp8E5M2, Block::kTensor), 3, 0, "empty"},
  };
  for (const Rejected& c : cases) {
    const std::vector<float> x(static_cast<size_t>(std::max<int64_t>(c.rows * c.cols, 1)), 1.0f);
    std::span<const float> in(x.data(), static_cast<size_t>(c.rows * c.cols));
    try {
      quantize(in, c.rows, c.cols, c.spec);
      ADD_FAILURE() << describe(c.spec) << " accepted a " << c.rows << "x" << c.cols << " tensor";
    } catch (const std::invalid_argument& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(c.phrase), std::string::npos) << "message: " << msg;
      // The message names the tensor's shape too.
      EXPECT_NE(msg.find(std::to_string(c.rows) + "x" + std::to_string(c.cols)), std::string::npos) << msg;
    }
  }
  // An input that does not hold rows * cols elements.
  const std::vector<float> short_input(100, 1.0f);
  EXPECT_THROW(quantize(short_input, 16, 16, make_spec(Format::kNvfp4, Block::k1x16)), std::invalid_argument);
  // FP8 takes any shape.
  const std::vector<float> odd(7 * 5, 1.0f);
  EXPECT_NO_THROW(quantize(odd, 7, 5, make_spec(Format::kFp8E4M3, Block::kTensor)));
}

TEST(QuantizeEdges, Bf16InputEqualsFloatInputOfTheSameValues) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t rows = 96, cols = 160;
  for (const Dist d : test::kAllDists) {
    const std::vector<float> f = test::draw_matrix(rows, cols, d, rng);
    std::vector<bf16_t> b(f.size());
    std::vector<float> fb(f.size());
    for (size_t i = 0; i < f.size(); ++i) {
      b[i] = bf16_t{BF16::encode(f[i], Rounding::kNearestEven)};
      fb[i] = BF16::decode(b[i].bits);
    }
    for (const Rounding r : {Rounding::kNearestEven, Rounding::kStochastic}) {
      for (QuantSpec s : all_specs(r)) {
        s.seed = rng();
        SCOPED_TRACE(describe(s) + " " + test::dist_name(d));
        EXPECT_TRUE(test::same_quantized(quantize(std::span<const bf16_t>(b), rows, cols, s),
                                         quantize(std::span<const float>(fb), rows, cols, s)));
      }
    }
  }
}

TEST(QuantizeEdges, StochasticRoundingIsReproducibleAndStreamsDiffer) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t rows = 64, cols = 96;
  const std::vector<float> x = test::draw_matrix(rows, cols, Dist::kNormal, rng);
  for (QuantSpec s : all_specs(Rounding::kStochastic)) {
    SCOPED_TRACE(describe(s));
    s.seed = rng();
    s.stream = static_cast<uint32_t>(rng());
    const QuantizedTensor a = quantize(x, rows, cols, s);
    EXPECT_TRUE(test::same_quantized(a, quantize(x, rows, cols, s)));
    // Another stream or another seed: the scales stay, a good share of the codes change (an
    // element rounds the other way with probability 2 p (1 - p); on N(0,1) data that is
    // well above 10% on average; 6144 elements make a share below 5% impossible in practice).
    QuantSpec other_stream = s, other_seed = s;
    other_stream.stream ^= 1u;
    other_seed.seed += 1;
    for (const QuantSpec& o : {other_stream, other_seed}) {
      const QuantizedTensor b = quantize(x, rows, cols, o);
      EXPECT_EQ(a.scales, b.scales);
      int64_t differ = 0;
      for (int64_t i = 0; i < a.numel(); ++i) differ += test::code_at(a, i) != test::code_at(b, i);
      EXPECT_GT(differ, a.numel() / 20) << "only " << differ << " of " << a.numel() << " codes differ";
    }
  }
}

// Element i of the quantized matrix (row-major, after any transpose) draws fp4_random_word(seed, stream, i)
// (FP4: 8 bits per element) or random_word(seed, stream, i) (FP8).
TEST(QuantizeEdges, StochasticRoundingUsesEachElementsOwnRandomWord) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t rows = 32, cols = 48;
  const std::vector<float> x = test::draw_matrix(rows, cols, Dist::kHeavyTail, rng);
  for (const bool columnwise : {false, true}) {
    QuantSpec s = make_spec(Format::kNvfp4, Block::k1x16, Rounding::kStochastic, columnwise);
    s.seed = rng();
    s.stream = static_cast<uint32_t>(rng());
    const QuantizedTensor q = quantize(x, rows, cols, s);
    const std::vector<float> m = columnwise ? test::transpose(x, rows, cols) : x;
    for (int64_t r = 0; r < q.rows; ++r) {
      for (int64_t c = 0; c < q.cols; ++c) {
        const int64_t i = r * q.cols + c;
        const float e_b = std::fmin(1.0f / (E4M3::decode(test::scale_at(q, r, c)) * q.decode_scale), FLT_MAX);
        const float y = std::fmin(std::fmax(m[i] * e_b, -6.0f), 6.0f);
        const uint32_t word = fp4_random_word(s.seed, s.stream, static_cast<uint64_t>(i));
        ASSERT_EQ(test::code_at(q, i), E2M1::encode(y, Rounding::kStochastic, word)) << "element " << i;
      }
    }
  }
  // FP8 likewise.
  QuantSpec s = make_spec(Format::kFp8E4M3, Block::kTensor, Rounding::kStochastic);
  s.seed = rng();
  const QuantizedTensor q = quantize(x, rows, cols, s);
  const float S = 448.0f / q.amax;
  for (int64_t i = 0; i < q.numel(); ++i)
    ASSERT_EQ(q.data[i], E4M3::encode(x[i] * S, Rounding::kStochastic, random_word(s.seed, s.stream, i)));
}

}  // namespace
}  // namespace nibble
