// The CPU GEMM emulation against double-precision GEMMs written here.
#include "nibble/tensor/gemm_cpu.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "nibble/quant/quantize.h"
#include "nn/nn_test_util.h"

namespace nibble {
namespace {

using nn::test::expect_within;
using nn::test::fresh_seed;
using nn::test::gemm_nt_double;
using nn::test::kU;
using nn::test::random_normal;

// FP32 accumulation of K products: |error| <= gamma_K * sum|a b| with gamma_K ~ K u (Higham); the
// extra terms cover alpha's two roundings (alpha = g_a g_b, then alpha * acc).
double fp32_dot_rel(int64_t k) { return (static_cast<double>(k) + 3.0) * kU; }

TEST(GemmCpu, SgemmMatchesDoubleOnOddShapes) {
  std::mt19937_64 rng(fresh_seed());
  const int64_t m = 37, n = 53, k = 29;
  const auto a = random_normal(rng, m * k), b = random_normal(rng, n * k);
  auto c = random_normal(rng, m * n);
  const auto old = c;
  const auto ref = gemm_nt_double<float>(a, b, m, n, k);
  sgemm_nt(a.data(), b.data(), c.data(), m, n, k, 0.5f, 1.0f);  // c = 0.5 A B^T + c
  std::vector<double> want(ref.c.size()), scale(ref.c.size());
  for (size_t i = 0; i < want.size(); ++i) {
    want[i] = 0.5 * ref.c[i] + old[i];
    scale[i] = 0.5 * ref.abs_sum[i] + std::fabs(old[i]);
  }
  expect_within(c, want, scale, fp32_dot_rel(k), 0.0, "0.5 A B^T + C");
}

TEST(GemmCpu, DequantizeUnscaledTimesDecodeScaleIsDequantize) {
  std::mt19937_64 rng(fresh_seed());
  const auto x = random_normal(rng, 32 * 64, 3.0f);
  for (const auto& [format, block] : {std::pair{Format::kNvfp4, Block::k1x16}, std::pair{Format::kNvfp4, Block::k16x16},
                                      std::pair{Format::kMxfp4, Block::k1x32}, std::pair{Format::kFp8E4M3, Block::kTensor},
                                      std::pair{Format::kFp8E5M2, Block::kTensor}}) {
    QuantSpec s;
    s.format = format;
    s.block = block;
    const QuantizedTensor q = quantize(x, 32, 64, s);
    const auto full = dequantize(q), raw = dequantize_unscaled(q);
    int mismatches = 0, nonzero = 0;
    for (size_t i = 0; i < full.size(); ++i) {
      if (raw[i] * q.decode_scale != full[i]) ++mismatches;  // the same float product, bit for bit
      nonzero += raw[i] != 0.0f;
    }
    EXPECT_EQ(mismatches, 0) << describe(s);
    EXPECT_GT(nonzero, static_cast<int>(full.size()) / 2) << describe(s);
  }
}

// A quantized GEMM equals the double-precision product of the two dequantized matrices up to
// FP32 accumulation: the operands are exact in float, only the sum's order and alpha round.
TEST(GemmCpu, QuantizedGemmEqualsProductOfDequantizedOperands) {
  std::mt19937_64 rng(fresh_seed());
  const int64_t m = 48, n = 32, k = 64;
  auto a = random_normal(rng, m * k), b = random_normal(rng, n * k, 0.01f);
  a[5] = 40.0f;  // an outlier, so block scales differ widely
  for (const auto& [format, block_a, block_b] :
       {std::tuple{Format::kNvfp4, Block::k1x16, Block::k16x16}, std::tuple{Format::kMxfp4, Block::k1x32, Block::k1x32},
        std::tuple{Format::kFp8E4M3, Block::kTensor, Block::kTensor}}) {
    QuantSpec sa, sb;
    sa.format = sb.format = format;
    sa.block = block_a;
    sb.block = block_b;
    sa.rounding = Rounding::kStochastic;
    sa.seed = rng();
    const QuantizedTensor qa = quantize(a, m, k, sa), qb = quantize(b, n, k, sb);
    const auto da = dequantize(qa), db = dequantize(qb);
    const auto ref = gemm_nt_double<float>(da, db, m, n, k);
    std::vector<float> c(static_cast<size_t>(m * n));
    gemm_nt(gemm_operand(qa), gemm_operand(qb), c);
    // + 2: dequantize() rounds once more per operand (code * s_b * g), the GEMM does not.
    expect_within(c, ref.c, ref.abs_sum, fp32_dot_rel(k) + 2 * kU, 0.0, describe(sa));
  }
}

TEST(GemmCpu, Bf16OperandRoundsToNearestEven) {
  std::mt19937_64 rng(fresh_seed());
  const auto x = random_normal(rng, 16 * 16);
  const GemmOperand op = gemm_operand_bf16(x, 16, 16);
  int changed = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &op.values[i], 4);
    EXPECT_EQ(bits & 0xFFFFu, 0u);                                    // representable in bf16
    // Within half an ulp: 2^(e - 8) for x in [2^e, 2^(e+1)).
    EXPECT_LE(std::fabs(op.values[i] - x[i]), std::ldexp(1.0f, std::ilogb(x[i]) - 8));
    changed += op.values[i] != x[i];
  }
  EXPECT_GT(changed, 200);
  // Ties go to even: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7.
  const float tie = 1.0f + std::ldexp(1.0f, -8), tie_up = 1.0f + 3 * std::ldexp(1.0f, -8);
  const GemmOperand t = gemm_operand_bf16(std::vector<float>{tie, tie_up}, 1, 2);
  EXPECT_EQ(t.values[0], 1.0f);
  EXPECT_EQ(t.values[1], 1.0f + std::ldexp(1.0f, -6));
}

TEST(GemmCpu, NonFiniteOperandGivesNaN) {
  std::mt19937_64 rng(fresh_seed());
  auto a = random_normal(rng, 16 * 16);
  const auto b = random_normal(rng, 16 * 16);
  a[7] = INFINITY;
  QuantSpec s;
  const QuantizedTensor qa = quantize(a, 16, 16, s), qb = quantize(b, 16, 16, s);
  std::vector<float> c(256);
  gemm_nt(gemm_operand(qa), gemm_operand(qb), c);
  for (float v : c) EXPECT_TRUE(std::isnan(v));
}

TEST(GemmCpu, ShapeMismatchThrows) {
  const GemmOperand a{4, 16, std::vector<float>(64, 1.0f), 1.0f}, b{8, 32, std::vector<float>(256, 1.0f), 1.0f};
  std::vector<float> c(32);
  EXPECT_THROW(gemm_nt(a, b, c), std::invalid_argument);
  const GemmOperand b2{8, 16, std::vector<float>(128, 1.0f), 1.0f};
  std::vector<float> wrong(31);
  EXPECT_THROW(gemm_nt(a, b2, wrong), std::invalid_argument);
  gemm_nt(a, b2, c);
  for (float v : c) EXPECT_EQ(v, 16.0f);
  EXPECT_THROW(gemm_operand_bf16(std::vector<float>(5), 2, 3), std::invalid_argument);
}

}  // namespace
}  // namespace nibble
