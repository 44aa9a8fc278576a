// The linear layer against references written here: FP64 finite differences (fp32, bf16 recipes),
// an independent composition of the numerics core's quantize/dequantize with a double GEMM
// (nvfp4), the RHT's invariance, and the statistics of stochastic rounding.
#include "nibble/nn/linear.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <numeric>

#include "nibble/quant/philox.h"
#include "nibble/quant/quantize.h"
#include "nn/nn_test_util.h"

namespace nibble::nn {
namespace {

using test::expect_within;
using test::fresh_seed;
using test::gemm_nt_double;
using test::kU;
using test::random_normal;
using test::transpose;

constexpr int64_t kTokens = 64, kIn = 48, kOut = 80;

Linear make_layer(const Recipe& recipe, const std::vector<float>& w, LinearOptions opt = {}) {
  Linear layer(kIn, kOut, recipe, opt);
  std::copy(w.begin(), w.end(), layer.mutable_weight().begin());
  return layer;
}

// ---- Finite differences -------------------------------------------------------------------

// L(X, W) = sum_{t,o} (X W^T)_{t,o} R_{t,o}, in double.
double loss(const std::vector<double>& x, const std::vector<double>& w, const std::vector<double>& r) {
  double l = 0.0;
  for (int64_t t = 0; t < kTokens; ++t)
    for (int64_t o = 0; o < kOut; ++o) {
      double y = 0.0;
      for (int64_t i = 0; i < kIn; ++i) y += x[t * kIn + i] * w[o * kIn + i];
      l += y * r[t * kOut + o];
    }
  return l;
}

// Central difference of the FP64 loss in one coordinate. L is linear in each coordinate, so the
// difference quotient has no truncation error; h = 2^-4 keeps v +- h exact.
double fd(std::vector<double>& v, size_t i, const std::function<double()>& l) {
  constexpr double h = 0.0625;
  const double keep = v[i];
  v[i] = keep + h;
  const double up = l();
  v[i] = keep - h;
  const double down = l();
  v[i] = keep;
  return (up - down) / (2 * h);
}

// Checks dX and dW of `recipe` against finite differences at random coordinates. `rel` bounds
// the layer's error relative to sum |a_k b_k| of each gradient element's dot product.
void check_against_finite_differences(const Recipe& recipe, double rel, uint64_t seed, bool expect_rounding) {
  std::mt19937_64 rng(seed);
  const auto x = random_normal(rng, kTokens * kIn), w = random_normal(rng, kOut * kIn, 0.2f);
  const auto r = random_normal(rng, kTokens * kOut);
  Linear layer = make_layer(recipe, w);
  const auto y = layer.forward(x, kTokens);
  const auto dx = layer.backward(r);  // dL/dY = R
  const auto dw = layer.weight_grad();

  // The same gradients in double and the scales of their rounding errors.
  const auto wt = transpose<float>(w, kOut, kIn);
  const auto rt = transpose<float>(r, kTokens, kOut), xt = transpose<float>(x, kTokens, kIn);
  const auto y_ref = gemm_nt_double<float>(x, w, kTokens, kOut, kIn);
  const auto dx_ref = gemm_nt_double<float>(r, wt, kTokens, kIn, kOut);
  const auto dw_ref = gemm_nt_double<float>(rt, xt, kOut, kIn, kTokens);
  expect_within(y, y_ref.c, y_ref.abs_sum, rel, 0.0, recipe.name + " Y");

  std::vector<double> xd(x.begin(), x.end()), wd(w.begin(), w.end()), rd(r.begin(), r.end());
  const auto l = [&] { return loss(xd, wd, rd); };
  // FD error: double rounding of two loss evaluations of magnitude <= sum |y r|, over 2h.
  double loss_scale = 0.0;
  for (size_t i = 0; i < y_ref.c.size(); ++i) loss_scale += y_ref.abs_sum[i] * std::fabs(r[i]);
  const double fd_tol = 8 * loss_scale * 0x1p-53 / 0.125 * (kIn + 2);
  std::uniform_int_distribution<size_t> pick_x(0, x.size() - 1), pick_w(0, w.size() - 1);
  int bad = 0, differs = 0;
  for (int s = 0; s < 40; ++s) {
    const size_t i = pick_x(rng), j = pick_w(rng);
    const double gx = fd(xd, i, l), gw = fd(wd, j, l);
    const bool ok_x = std::fabs(dx[i] - gx) <= rel * dx_ref.abs_sum[i] + fd_tol;
    const bool ok_w = std::fabs(dw[j] - gw) <= rel * dw_ref.abs_sum[j] + fd_tol;
    if (!ok_x || !ok_w) {
      ADD_FAILURE() << recipe.name << ": dX[" << i << "] " << dx[i] << " vs fd " << gx << ", dW[" << j << "] " << dw[j]
                    << " vs fd " << gw;
    }
    bad += !ok_x + !ok_w;
    differs += (dx[i] != static_cast<float>(gx)) + (dw[j] != static_cast<float>(gw));
  }
  EXPECT_EQ(bad, 0);
  if (expect_rounding) {
    EXPECT_GT(differs, 40) << "bf16 rounding should be visible";
  }
  // Every element, against the double GEMMs (the FD above pins these to the loss).
  expect_within(dx, dx_ref.c, dx_ref.abs_sum, rel, 0.0, recipe.name + " dX");
  expect_within(dw, dw_ref.c, dw_ref.abs_sum, rel, 0.0, recipe.name + " dW");
}

// fp32: only FP32 accumulation rounds: |error| <= (K + 1) u sum|a b| with K <= 80.
TEST(Linear, Fp32GradientsMatchFiniteDifferences) {
  check_against_finite_differences(preset("fp32"), (kOut + 2) * kU, fresh_seed(), false);
}

// bf16: each operand rounds to bf16 (8 significant bits: relative error <= u_bf16 = 2^-8), so each
// product is off by at most (2 * 2^-8 + 2^-16) |a b|; plus FP32 accumulation.
TEST(Linear, Bf16GradientsMatchFiniteDifferences) {
  check_against_finite_differences(preset("bf16"), 2 * 0x1p-8 + 0x1p-16 + (kOut + 2) * kU, fresh_seed(), true);
}

// ---- NVFP4 against an independent composition ------------------------------------------------

// The documented seed derivation, written out here: Philox4x32-10 keyed by the run seed at
// counter {step lo, step hi, layer, micro-batch}; operand k draws from stream "LIN" + k.
uint64_t documented_seed(uint64_t run_seed, uint32_t layer, uint64_t step, uint32_t microbatch) {
  const Philox4x32 out = philox4x32_10(
      Philox4x32{{static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32), layer, microbatch}},
      static_cast<uint32_t>(run_seed), static_cast<uint32_t>(run_seed >> 32));
  return out.v[0] | static_cast<uint64_t>(out.v[1]) << 32;
}

std::vector<float> quant_dequant(const std::vector<float>& x, int64_t rows, int64_t cols, Block block,
                                 Rounding rounding, bool columnwise, bool rht, uint64_t seed, uint32_t stream) {
  QuantSpec s;
  s.format = Format::kNvfp4;
  s.block = block;
  s.rounding = rounding;
  s.columnwise = columnwise;
  s.rht = rht;
  s.seed = seed;
  s.stream = stream;
  return dequantize(quantize(x, rows, cols, s));
}

// The layer's Y, dX and dW under nvfp4 equal double GEMMs of the numerics core's dequantized
// operands. The operands are exact in float on both sides; the layer accumulates K products in
// FP32 and applies alpha = g_a g_b (two more roundings), dequantize() rounds code*s*g once per
// operand (two more): |error| <= (K + 4) u sum_k |a'_k b'_k| (a', b' the dequantized operands).
TEST(Linear, Nvfp4EqualsIndependentComposition) {
  std::mt19937_64 rng(fresh_seed());
  auto x = random_normal(rng, kTokens * kIn);
  const auto w = random_normal(rng, kOut * kIn, 0.1f);
  auto dy = random_normal(rng, kTokens * kOut, 1e-3f);
  x[17] = 30.0f;  // outliers make block scales differ and the RHT matter
  dy[100] = -0.05f;
  const uint64_t run_seed = rng();
  const uint32_t layer_id = 7;
  const uint64_t step = 1000 + rng() % 1000;
  const uint32_t microbatch = 3;
  Linear layer = make_layer(preset("nvfp4"), w, {layer_id, run_seed});
  layer.set_step(step, microbatch);
  const auto y = layer.forward(x, kTokens);
  const auto dx = layer.backward(dy);
  const std::vector<float> dw(layer.weight_grad().begin(), layer.weight_grad().end());

  const uint64_t seed = documented_seed(run_seed, layer_id, step, microbatch);
  const uint64_t wseed = documented_seed(run_seed, layer_id, step, 0);
  const auto stream = [](int k) { return 0x4C494E00u + static_cast<uint32_t>(k); };
  const Rounding rne = Rounding::kNearestEven, sr = Rounding::kStochastic;
  const auto xq = quant_dequant(x, kTokens, kIn, Block::k1x16, rne, false, false, seed, stream(0));
  const auto wq = quant_dequant(w, kOut, kIn, Block::k16x16, rne, false, false, wseed, stream(1));
  const auto dyq = quant_dequant(dy, kTokens, kOut, Block::k1x16, sr, false, false, seed, stream(2));
  const auto wtq = quant_dequant(w, kOut, kIn, Block::k16x16, rne, true, false, wseed, stream(3));
  const auto dytq = quant_dequant(dy, kTokens, kOut, Block::k1x16, sr, true, true, seed, stream(4));
  const auto xtq = quant_dequant(x, kTokens, kIn, Block::k1x16, rne, true, true, seed, stream(5));

  const auto y_ref = gemm_nt_double<float>(xq, wq, kTokens, kOut, kIn);
  const auto dx_ref = gemm_nt_double<float>(dyq, wtq, kTokens, kIn, kOut);
  const auto dw_ref = gemm_nt_double<float>(dytq, xtq, kOut, kIn, kTokens);
  expect_within(y, y_ref.c, y_ref.abs_sum, (kIn + 4) * kU, 0.0, "Y");
  expect_within(dx, dx_ref.c, dx_ref.abs_sum, (kOut + 4) * kU, 0.0, "dX");
  expect_within(dw, dw_ref.c, dw_ref.abs_sum, (kTokens + 4) * kU, 0.0, "dW");

  // The quantization is not a no-op: dW differs from the unquantized dY^T X by far more.
  const auto dyt = transpose<float>(dy, kTokens, kOut), xt = transpose<float>(x, kTokens, kIn);
  const auto exact = gemm_nt_double<float>(dyt, xt, kOut, kIn, kTokens);
  double err = 0, norm = 0;
  for (size_t i = 0; i < dw.size(); ++i) err += std::pow(dw[i] - exact.c[i], 2), norm += std::pow(exact.c[i], 2);
  EXPECT_GT(std::sqrt(err / norm), 0.01);
  EXPECT_LT(std::sqrt(err / norm), 0.5);
}

// The other quantized presets (FP8 per-tensor scaling, MXFP4 with SR and RHT) against the same
// kind of composition, the specs written here from the recipe's fields. Shapes are multiples of 32
// for MXFP4's blocks. Same bound as above.
TEST(Linear, OtherQuantizedPresetsEqualIndependentComposition) {
  std::mt19937_64 rng(fresh_seed());
  const int64_t tokens = 64, in = 64, out = 96;
  auto x = random_normal(rng, tokens * in);
  const auto w = random_normal(rng, out * in, 0.1f), dy = random_normal(rng, tokens * out, 1e-3f);
  x[9] = 20.0f;
  for (const std::string name : {"fp8", "fp8_hybrid", "mxfp4"}) {
    const Recipe recipe = preset(name);
    const uint64_t run_seed = rng(), step = rng() % 100000;
    Linear layer(in, out, recipe, {1, run_seed});
    std::copy(w.begin(), w.end(), layer.mutable_weight().begin());
    layer.set_step(step);
    const auto y = layer.forward(x, tokens);
    const auto dx = layer.backward(dy);
    const std::vector<float> dw(layer.weight_grad().begin(), layer.weight_grad().end());

    const uint64_t seed = documented_seed(run_seed, 1, step, 0);
    const auto ref_operand = [&](const std::vector<float>& m, int64_t rows, int64_t cols, Operand op, bool columnwise) {
      const OperandRecipe& o = recipe[op];
      QuantSpec s;
      s.format = o.format == OperandFormat::kMxfp4     ? Format::kMxfp4
                 : o.format == OperandFormat::kFp8E5M2 ? Format::kFp8E5M2
                                                       : Format::kFp8E4M3;
      s.block = o.block;
      s.rounding = o.rounding;
      s.columnwise = columnwise;
      s.rht = o.rht;
      s.seed = seed;
      s.stream = 0x4C494E00u + static_cast<uint32_t>(op);
      return dequantize(quantize(m, rows, cols, s));
    };
    const auto xq = ref_operand(x, tokens, in, Operand::kFpropX, false);
    const auto wq = ref_operand(w, out, in, Operand::kFpropW, false);
    const auto dyq = ref_operand(dy, tokens, out, Operand::kDgradDy, false);
    const auto wtq = ref_operand(w, out, in, Operand::kDgradW, true);
    const auto dytq = ref_operand(dy, tokens, out, Operand::kWgradDy, true);
    const auto xtq = ref_operand(x, tokens, in, Operand::kWgradX, true);
    const auto y_ref = gemm_nt_double<float>(xq, wq, tokens, out, in);
    const auto dx_ref = gemm_nt_double<float>(dyq, wtq, tokens, in, out);
    const auto dw_ref = gemm_nt_double<float>(dytq, xtq, out, in, tokens);
    expect_within(y, y_ref.c, y_ref.abs_sum, (in + 4) * kU, 0.0, name + " Y");
    expect_within(dx, dx_ref.c, dx_ref.abs_sum, (out + 4) * kU, 0.0, name + " dX");
    expect_within(dw, dw_ref.c, dw_ref.abs_sum, (tokens + 4) * kU, 0.0, name + " dW");
  }
}

// 16x16 tiles: W and W^T quantize to the same values, so Fprop and Dgrad see one weight.
TEST(Linear, TwoDimensionalWeightBlocksAgreeAcrossTransposition) {
  std::mt19937_64 rng(fresh_seed());
  auto w = random_normal(rng, kOut * kIn);
  w[3] = 25.0f;
  const auto rows = quant_dequant(w, kOut, kIn, Block::k16x16, Rounding::kNearestEven, false, false, 0, 0);
  const auto cols = quant_dequant(w, kOut, kIn, Block::k16x16, Rounding::kNearestEven, true, false, 0, 0);
  EXPECT_EQ(transpose<float>(rows, kOut, kIn), cols);
  // With 1x16 blocks they differ (blocks run along different dimensions).
  const auto rows1 = quant_dequant(w, kOut, kIn, Block::k1x16, Rounding::kNearestEven, false, false, 0, 0);
  const auto cols1 = quant_dequant(w, kOut, kIn, Block::k1x16, Rounding::kNearestEven, true, false, 0, 0);
  EXPECT_NE(transpose<float>(rows1, kOut, kIn), cols1);
}

TEST(Linear, RunsAreReproducibleAndSeedsSeparateLayers) {
  std::mt19937_64 rng(fresh_seed());
  const auto x = random_normal(rng, kTokens * kIn), w = random_normal(rng, kOut * kIn);
  const auto dy = random_normal(rng, kTokens * kOut);
  const auto run = [&](uint32_t layer_id, uint64_t run_seed, uint64_t step) {
    Linear layer = make_layer(preset("nvfp4"), w, {layer_id, run_seed});
    layer.set_step(step);
    layer.forward(x, kTokens);
    return layer.backward(dy);
  };
  const uint64_t s = rng();
  EXPECT_EQ(run(1, s, 5), run(1, s, 5));
  EXPECT_NE(run(1, s, 5), run(2, s, 5));
  EXPECT_NE(run(1, s, 5), run(1, s, 6));
  EXPECT_NE(run(1, s, 5), run(1, s + 1, 5));
}

// ---- RHT --------------------------------------------------------------------------------------

// With quantization off, the RHT on both Wgrad inputs leaves dW unchanged up to float rounding.
// Bound: the transform rounds each element by at most 4 u * (its block's l1 norm)/4 <= 4u ||block||_2
// per element, i.e. <= 16 u ||a||_2 over a row; with the GEMM's (K + 1) u on both sides:
// |dW_rht - dW| <= ((2K + 2) u + 32 u) ||a||_2 ||b||_2 (norms over the token dimension).
TEST(Linear, RhtLeavesWgradUnchangedWithoutQuantization) {
  std::mt19937_64 rng(fresh_seed());
  auto x = random_normal(rng, kTokens * kIn);
  const auto w = random_normal(rng, kOut * kIn), dy = random_normal(rng, kTokens * kOut);
  x[40] = 50.0f;
  const Recipe plain = preset("fp32");
  const Recipe rht = make_recipe("fp32", std::vector<std::string>{"wgrad.dy.rht=true", "wgrad.x.rht=true"});
  const Recipe rht_seeded = make_recipe("fp32", std::vector<std::string>{"wgrad.dy.rht=true", "wgrad.x.rht=true",
                                                                         "rht_sign_seed=" + std::to_string(rng())});
  std::vector<std::vector<float>> dws;
  for (const Recipe& r : {plain, rht, rht_seeded}) {
    Linear layer = make_layer(r, w);
    layer.forward(x, kTokens);
    layer.backward(dy);
    dws.emplace_back(layer.weight_grad().begin(), layer.weight_grad().end());
  }
  const auto dyt = transpose<float>(dy, kTokens, kOut), xt = transpose<float>(x, kTokens, kIn);
  std::vector<double> norms_dy(kOut), norms_x(kIn);
  for (int64_t o = 0; o < kOut; ++o)
    for (int64_t t = 0; t < kTokens; ++t) norms_dy[o] += std::pow(dyt[o * kTokens + t], 2);
  for (int64_t i = 0; i < kIn; ++i)
    for (int64_t t = 0; t < kTokens; ++t) norms_x[i] += std::pow(xt[i * kTokens + t], 2);
  std::vector<double> want(dws[0].begin(), dws[0].end()), scale(want.size());
  for (int64_t o = 0; o < kOut; ++o)
    for (int64_t i = 0; i < kIn; ++i) scale[o * kIn + i] = std::sqrt(norms_dy[o] * norms_x[i]);
  const double rel = (2 * kTokens + 2 + 32) * kU;
  expect_within(dws[1], want, scale, rel, 0.0, "dW with the default-sign RHT");
  expect_within(dws[2], want, scale, rel, 0.0, "dW with seeded RHT signs");
  EXPECT_NE(dws[1], dws[0]) << "the RHT should change the float rounding at least somewhere";
}

// ---- Stochastic rounding ------------------------------------------------------------------------

// dY built so that NVFP4 rounding is biased under RNE: in every 16-token block (the Wgrad copy's
// blocks) one element maps to exactly +-6 and the others to 2.05..2.45 times the block's step,
// all of one sign, so RNE rounds them all down to 2 while SR rounds to 2 or 3 with mean = value.
// Block maxima are the global amax times a power of two, so each block's E4M3 scale is exact and
// no element is clamped (no bias from the scale itself).
std::vector<float> biased_gradient(std::mt19937_64& rng) {
  std::vector<float> dy(static_cast<size_t>(kTokens * kOut));
  std::uniform_real_distribution<float> mid(2.05f, 2.45f);
  for (int64_t o = 0; o < kOut; ++o) {
    for (int64_t t0 = 0; t0 < kTokens; t0 += 16) {
      // 6e-3 (block (0, 0)'s peak) is the global amax; other blocks' peaks are it times 2^-k.
      const int k = o == 0 && t0 == 0 ? 0 : static_cast<int>(rng() % 4);
      const float scale = std::ldexp(1e-3f, -k);
      const float sign = rng() % 2 ? 1.0f : -1.0f;
      const int64_t peak = t0 + static_cast<int64_t>(rng() % 16);
      for (int64_t t = t0; t < t0 + 16; ++t) dy[t * kOut + o] = sign * scale * (t == peak ? 6.0f : mid(rng));
    }
  }
  return dy;
}

TEST(Linear, StochasticRoundingIsUnbiasedWhereNearestIsNot) {
  std::mt19937_64 rng(fresh_seed());
  const auto dy = biased_gradient(rng);
  std::vector<float> x(static_cast<size_t>(kTokens * kIn));
  std::uniform_real_distribution<float> pos(0.5f, 1.5f);
  for (float& v : x) v = pos(rng);
  const auto w = random_normal(rng, kOut * kIn);
  // Only dY's Wgrad copy is quantized, so dW's deviation is that of the rounding alone.
  const Recipe sr = make_recipe("fp32", std::vector<std::string>{"wgrad.dy.format=nvfp4", "wgrad.dy.rounding=sr"});
  const Recipe rne = make_recipe("fp32", std::vector<std::string>{"wgrad.dy.format=nvfp4"});

  const auto dyt = transpose<float>(dy, kTokens, kOut), xt = transpose<float>(x, kTokens, kIn);
  const auto exact = gemm_nt_double<float>(dyt, xt, kOut, kIn, kTokens);
  const size_t n = exact.c.size();

  constexpr int kRuns = 400;
  std::vector<double> sum(n), sum_sq(n);
  const uint64_t base_seed = rng();
  for (int run = 0; run < kRuns; ++run) {
    Linear layer = make_layer(sr, w, {0, base_seed + static_cast<uint64_t>(run)});
    layer.forward(x, kTokens);
    layer.backward(dy);
    for (size_t i = 0; i < n; ++i) {
      const double v = layer.weight_grad()[i];
      sum[i] += v;
      sum_sq[i] += v * v;
    }
  }
  Linear nearest = make_layer(rne, w);
  nearest.forward(x, kTokens);
  nearest.backward(dy);

  // Each dW element sums 64 independent rounding errors (48 of them non-zero), so its mean over
  // kRuns runs is close to normal around the exact value with standard error sd / sqrt(kRuns).
  // Over 3840 elements, |z| > 5.5 happens with probability ~ 3840 * 4e-8 = 1.5e-4 when unbiased.
  // The slack (K + 4) u sum|a b| covers FP32 accumulation and the float rounding of the scales, and
  // 2^-10 sum|a b| the resolution of SR's 8 random bits (the rounding probability is within 2^-9 of a
  // step of the fraction; here a step is at most half of |dY|, whose elements lie in 2..6 steps).
  int biased_sr = 0;
  double sr_err2 = 0, rne_err2 = 0, norm2 = 0, worst_z = 0;
  for (size_t i = 0; i < n; ++i) {
    const double mean = sum[i] / kRuns;
    const double var = std::max(0.0, sum_sq[i] / kRuns - mean * mean) * kRuns / (kRuns - 1);
    const double se = std::sqrt(var / kRuns);
    const double slack = ((kTokens + 4) * kU + std::ldexp(1.0, -10)) * exact.abs_sum[i];
    const double dev = std::fabs(mean - exact.c[i]);
    if (dev > 5.5 * se + slack) ++biased_sr;
    worst_z = std::max(worst_z, (dev - slack) / se);
    sr_err2 += std::pow(mean - exact.c[i], 2);
    rne_err2 += std::pow(nearest.weight_grad()[i] - exact.c[i], 2);
    norm2 += std::pow(exact.c[i], 2);
  }
  const double sr_rel = std::sqrt(sr_err2 / norm2), rne_rel = std::sqrt(rne_err2 / norm2);
  std::printf("SR mean over %d runs: relative error %.2e (worst |z| %.2f); RNE: relative error %.2e\n", kRuns,
              sr_rel, worst_z, rne_rel);
  EXPECT_EQ(biased_sr, 0) << "worst |z| " << worst_z;
  EXPECT_GT(rne_rel, 0.05) << "the input should bias round-to-nearest";
  EXPECT_GT(rne_rel, 10 * sr_rel);
}

// ---- Memory, caching, errors ------------------------------------------------------------------

TEST(Linear, SavesPackedActivationsForBackward) {
  std::mt19937_64 rng(fresh_seed());
  const auto x = random_normal(rng, kTokens * kIn), w = random_normal(rng, kOut * kIn);
  const auto dy = random_normal(rng, kTokens * kOut);
  const int64_t n = kTokens * kIn;
  const std::vector<std::pair<std::string, int64_t>> expected = {
      {"nvfp4", n / 2 + n / 16 + 4},  // codes + E4M3 scales + FP32 tensor scale
      {"fp8", n + 4},
      {"bf16", 2 * n},
      {"fp32", 4 * n}};
  for (const auto& [name, bytes] : expected) {
    Linear layer = make_layer(preset(name), w);
    EXPECT_EQ(layer.saved_activation_bytes(), 0);
    layer.forward(x, kTokens);
    EXPECT_EQ(layer.saved_activation_bytes(), bytes) << name;
    std::printf("%-6s saves %6lld bytes for backward (X in bf16: %lld, ratio %.3f)\n", name.c_str(),
                static_cast<long long>(layer.saved_activation_bytes()),
                static_cast<long long>(layer.bf16_activation_bytes(kTokens)),
                static_cast<double>(layer.saved_activation_bytes()) / layer.bf16_activation_bytes(kTokens));
    layer.backward(dy);
    EXPECT_EQ(layer.saved_activation_bytes(), 0) << "released after backward";
  }
}

TEST(Linear, WeightIsQuantizedOncePerStep) {
  std::mt19937_64 rng(fresh_seed());
  const auto x = random_normal(rng, kTokens * kIn), w = random_normal(rng, kOut * kIn);
  const auto dy = random_normal(rng, kTokens * kOut);
  Linear layer = make_layer(preset("nvfp4"), w);
  layer.set_step(1);
  for (uint32_t mb = 0; mb < 3; ++mb) {  // three micro-batches of one step
    layer.set_step(1, mb);
    layer.forward(x, kTokens);
    layer.backward(dy);
  }
  EXPECT_EQ(layer.weight_quantizations(), 1);
  const auto y_before = layer.forward(x, kTokens);
  // An update through mutable_weight() is seen by the next GEMM.
  auto wm = layer.mutable_weight();
  for (float& v : wm) v *= 2.0f;
  const auto y_after = layer.forward(x, kTokens);
  EXPECT_EQ(layer.weight_quantizations(), 2);
  Linear fresh = make_layer(preset("nvfp4"), std::vector<float>(wm.begin(), wm.end()));
  fresh.set_step(1);
  EXPECT_EQ(fresh.forward(x, kTokens), y_after);
  EXPECT_NE(y_before, y_after);
  layer.set_step(2);
  layer.forward(x, kTokens);
  EXPECT_EQ(layer.weight_quantizations(), 3);
  layer.set_recipe(preset("bf16"));
  layer.forward(x, kTokens);
  EXPECT_EQ(layer.weight_quantizations(), 4);
}

TEST(Linear, GradientsAccumulateUntilZeroed) {
  std::mt19937_64 rng(fresh_seed());
  const auto x = random_normal(rng, kTokens * kIn), w = random_normal(rng, kOut * kIn);
  const auto dy = random_normal(rng, kTokens * kOut);
  Linear layer = make_layer(preset("fp32"), w);
  layer.forward(x, kTokens);
  layer.backward(dy);
  const std::vector<float> once(layer.weight_grad().begin(), layer.weight_grad().end());
  layer.forward(x, kTokens);
  layer.backward(dy);
  for (size_t i = 0; i < once.size(); ++i) EXPECT_EQ(layer.weight_grad()[i], 2.0f * once[i]);
  layer.zero_grad();
  for (float g : layer.weight_grad()) EXPECT_EQ(g, 0.0f);
}

TEST(Linear, BadShapesAndOrderAreErrors) {
  std::mt19937_64 rng(fresh_seed());
  const auto w = random_normal(rng, kOut * kIn);
  Linear layer = make_layer(preset("nvfp4"), w, {3, 0});
  EXPECT_THROW(layer.backward(std::vector<float>(kTokens * kOut)), std::logic_error);
  EXPECT_THROW(layer.forward(std::vector<float>(10), 1), std::invalid_argument);
  try {
    layer.forward(random_normal(rng, 8 * kIn), 8);  // 8 tokens: Wgrad's 1x16 blocks along tokens cannot fit
    ADD_FAILURE() << "expected an error";
  } catch (const std::invalid_argument& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("Linear[layer 3, 48->80, recipe nvfp4] wgrad.x"), std::string::npos) << msg;
    EXPECT_NE(msg.find("multiple of 16"), std::string::npos) << msg;
  }
  layer.forward(random_normal(rng, kTokens * kIn), kTokens);
  EXPECT_THROW(layer.backward(std::vector<float>(kTokens * kOut - 1)), std::invalid_argument);
  EXPECT_THROW(Linear(0, 16, preset("fp32")), std::invalid_argument);
  Recipe bad = preset("nvfp4");
  bad[Operand::kFpropX].rht = true;
  EXPECT_THROW(Linear(16, 16, bad), RecipeError);
  // mxfp4 needs in_features to be a multiple of 32 (its blocks run along in_features in Fprop).
  EXPECT_THROW(Linear(48, 64, preset("mxfp4")).forward(random_normal(rng, 64 * 48), 64), std::invalid_argument);
  Linear mx(64, 32, preset("mxfp4"));
  EXPECT_NO_THROW(mx.forward(random_normal(rng, 64 * 64), 64));
}

}  // namespace
}  // namespace nibble::nn
