// The GPU linear layer against the CPU layer, under every preset and the nvfp4 ablations, on fresh
// random inputs (needs a GPU; ctest label "gpu").
//
// What is exact and what is not:
// - Operand preparation (quantization, packing, RHT, stochastic-rounding bits) is exact: the saved
//   Wgrad copy of X equals the CPU's bit for bit.
// - The GEMMs multiply the same operand values (products exact in FP32) and differ from the CPU
//   only in the order of FP32 accumulation. Each result therefore lies within gamma_K * B of the
//   exact sum on both sides, with B_ij = |alpha| sum_k |a_ik b_jk| and gamma_K ~ K u (u = 2^-24),
//   so we require |gpu - cpu| <= 2 K u B_ij (+ a denormal floor). A wrong seed, scale, layout or
//   transpose moves results by a quantization step, orders of magnitude beyond this bound.
// - Except FP8 x FP8 GEMMs, which run on Hopper's FP8 tensor cores: those add products in a
//   fixed-point accumulator of about 14 bits before cuBLASLt promotes partial sums to FP32, so each
//   result may be off by up to about 2^-13 of its largest term per addition: we allow K 2^-13 B_ij
//   (measured: about 1e-3 B_ij at K = 160). The FP8 codes themselves are still checked bit for bit.
#include "nibble/nn/cuda/linear_cuda.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "nibble/nn/linear.h"
#include "nibble/nn/operand.h"
#include "cuda/cuda_test_util.h"
#include "nn/nn_test_util.h"
#include "quant/test_inputs.h"
#include "test_seed.h"

namespace nibble::nn {
namespace {

using cuda::DeviceBuffer;
using cuda::LinearContext;
using cuda::LinearCuda;

// B_ij = |g_a g_b| sum_k |a_ik| |b_jk| for the CPU's operands (a: M x K, b: N x K).
std::vector<double> magnitude(const GemmOperand& a, const GemmOperand& b) {
  const double g = std::fabs(static_cast<double>(a.decode_scale) * b.decode_scale);
  std::vector<double> m(static_cast<size_t>(a.rows * b.rows));
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < b.rows; ++j) {
      double s = 0;
      for (int64_t k = 0; k < a.cols; ++k)
        s += std::fabs(static_cast<double>(a.values[i * a.cols + k]) * b.values[j * b.cols + k]);
      m[static_cast<size_t>(i * b.rows + j)] = g * s;
    }
  return m;
}

// Checks |gpu - cpu| <= 2 K u B elementwise; returns the largest ratio seen (for the log).
double expect_within_accumulation_bound(const std::vector<float>& gpu, const std::vector<float>& cpu,
                                        const std::vector<double>& bound, int64_t k, bool fp8_tensor_cores,
                                        const std::string& what) {
  const double u = fp8_tensor_cores ? std::ldexp(1.0, -14) : std::ldexp(1.0, -24);
  double worst = 0;
  int failures = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    const double tol = 2.0 * static_cast<double>(k) * u * bound[i] + 1e-30;
    const double err = std::fabs(static_cast<double>(gpu[i]) - cpu[i]);
    worst = std::max(worst, err / tol);
    if (!(err <= tol) && ++failures <= 3)
      ADD_FAILURE() << what << "[" << i << "]: gpu " << gpu[i] << " cpu " << cpu[i] << " bound " << tol;
  }
  return worst;
}

// Whether the GPU runs the GEMM of operands a and b on FP8 tensor cores (see gemm_types).
bool fp8_gemm(const Recipe& r, Operand a, Operand b) {
  const auto f8 = [&](Operand op) {
    return r[op].format == OperandFormat::kFp8E4M3 || r[op].format == OperandFormat::kFp8E5M2;
  };
  return f8(a) && f8(b) && !(r[a].format == OperandFormat::kFp8E5M2 && r[b].format == OperandFormat::kFp8E5M2);
}

using nibble::test::download;

struct RecipeCase {
  std::string base;
  std::vector<std::string> overrides;
};

class LinearCudaTest : public ::testing::TestWithParam<RecipeCase> {};

TEST_P(LinearCudaTest, MatchesCpuLayer) {
  const RecipeCase& rc = GetParam();
  const Recipe recipe = make_recipe(rc.base, rc.overrides);
  std::mt19937_64 rng(test::fresh_seed());
  // Multiples of 32 (MXFP4 blocks run along every dimension somewhere), otherwise uneven.
  const int64_t tokens = 96, in = 160, out = 224;
  const LinearOptions options{/*layer_id=*/7, /*run_seed=*/rng()};
  const uint64_t step = 11;
  const uint32_t microbatch = 2;

  Linear cpu(in, out, recipe, options);
  const std::vector<float> w = test::random_normal(rng, in * out, 0.05f);
  std::copy(w.begin(), w.end(), cpu.mutable_weight().begin());
  std::vector<float> x = test::random_normal(rng, tokens * in, 1.0f);
  for (int64_t t = 0; t < tokens; ++t) x[static_cast<size_t>(t * in + 13)] *= 40.0f;  // an outlier channel
  const std::vector<float> dy = test::random_normal(rng, tokens * out, 1e-3f);

  LinearContext ctx;
  LinearCuda gpu(in, out, recipe, options, ctx);
  gpu.upload_weight(w);
  cpu.set_step(step, microbatch);
  gpu.set_step(step, microbatch);
  DeviceBuffer<float> d_x{std::span<const float>(x)}, d_dy{std::span<const float>(dy)};
  DeviceBuffer<float> d_y(static_cast<size_t>(tokens * out)), d_dx(static_cast<size_t>(tokens * in));

  const std::vector<float> y_cpu = cpu.forward(x, tokens);
  gpu.forward(d_x.data(), tokens, d_y.data(), nullptr);
  const std::vector<float> y_gpu = download(d_y.data(), tokens * out);

  // The CPU's operands, prepared independently with the layer's seeds.
  const uint64_t seed = layer_step_seed(options.run_seed, options.layer_id, step, microbatch);
  const uint64_t wseed = layer_step_seed(options.run_seed, options.layer_id, step, 0);
  const auto operand = [&](std::span<const float> m, int64_t rows, int64_t cols, Operand op, uint64_t s) {
    return OperandCopy::make(m, rows, cols, recipe[op], op, recipe.rht_signs(), s);
  };
  const OperandCopy x_t = operand(x, tokens, in, Operand::kWgradX, seed);

  // The saved Wgrad copy of X: same bytes, and bit-identical when quantized.
  const int64_t saved_bytes = gpu.saved_activation_bytes();
  EXPECT_EQ(saved_bytes, cpu.saved_activation_bytes());
  EXPECT_GT(saved_bytes, 0);
  if (x_t.packed()) {
    const QuantizedTensor q = gpu.saved_x_t().download();
    EXPECT_EQ(q.data, x_t.packed()->data) << "wgrad.x codes";
    EXPECT_EQ(q.scales, x_t.packed()->scales) << "wgrad.x block scales";
    EXPECT_EQ(q.decode_scale, x_t.packed()->decode_scale) << "wgrad.x tensor scale";
  }

  // The weight's copies (W and W^T from one pass under 16x16 NVFP4 weights): bit-identical too. On
  // the BF16 decode path they are W's decoded values alone (W^T reads them transposed): those against
  // the CPU's codes x tile scales, and g.
  for (Operand op : {Operand::kFpropW, Operand::kDgradW}) {
    const OperandCopy cw = operand(w, out, in, op, wseed);
    if (!cw.packed()) continue;
    const cuda::OperandCuda& o = op == Operand::kFpropW ? gpu.fprop_w() : gpu.dgrad_w();
    if (o.has_packed()) {
      const QuantizedTensor q = o.download();
      EXPECT_EQ(q.data, cw.packed()->data) << operand_name(op) << " codes";
      EXPECT_EQ(q.scales, cw.packed()->scales) << operand_name(op) << " block scales";
      EXPECT_EQ(q.decode_scale, cw.packed()->decode_scale) << operand_name(op) << " tensor scale";
      continue;
    }
    ASSERT_TRUE(o.has_decoded()) << operand_name(op);
    const float g = download(o.decode_scale(), 1)[0];
    EXPECT_EQ(std::bit_cast<uint32_t>(g), std::bit_cast<uint32_t>(cw.packed()->decode_scale))
        << operand_name(op) << " tensor scale";
    DeviceBuffer<uint8_t> scratch;
    const cuda::GemmMatrix m = o.gemm_matrix(cuda::GemmType::kBF16, /*as_b=*/false, scratch, nullptr);
    const int64_t r = o.rows(), c = o.cols();
    const std::vector<uint16_t> got = download(static_cast<const uint16_t*>(m.data), r * c);
    const std::vector<uint16_t> want = nibble::test::nvfp4_decoded_bf16(*cw.packed());
    size_t wrong = 0;
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < c; ++j)  // as A: [r x c], stored transposed where m.transposed
        if (got[static_cast<size_t>(m.transposed ? j * r + i : i * c + j)] != want[static_cast<size_t>(i * c + j)] &&
            wrong++ < 3)
          ADD_FAILURE() << operand_name(op) << " decoded element (" << i << ", " << j << ")";
    EXPECT_EQ(wrong, 0u) << operand_name(op);
  }

  std::vector<float> dx_cpu = cpu.backward(dy);
  gpu.backward(d_dy.data(), d_dx.data(), nullptr);
  const std::vector<float> dx_gpu = download(d_dx.data(), tokens * in);
  const std::vector<float> dw_gpu = download(gpu.weight_grad(), in * out);
  const std::vector<float> dw_cpu(cpu.weight_grad().begin(), cpu.weight_grad().end());

  const double ry = expect_within_accumulation_bound(
      y_gpu, y_cpu,
      magnitude(operand(x, tokens, in, Operand::kFpropX, seed).gemm_operand(),
                operand(w, out, in, Operand::kFpropW, wseed).gemm_operand()),
      in, fp8_gemm(recipe, Operand::kFpropX, Operand::kFpropW), "Y");
  const double rdx = expect_within_accumulation_bound(
      dx_gpu, dx_cpu,
      magnitude(operand(dy, tokens, out, Operand::kDgradDy, seed).gemm_operand(),
                operand(w, out, in, Operand::kDgradW, wseed).gemm_operand()),
      out, fp8_gemm(recipe, Operand::kDgradDy, Operand::kDgradW), "dX");
  const double rdw = expect_within_accumulation_bound(
      dw_gpu, dw_cpu, magnitude(operand(dy, tokens, out, Operand::kWgradDy, seed).gemm_operand(), x_t.gemm_operand()),
      tokens, fp8_gemm(recipe, Operand::kWgradDy, Operand::kWgradX), "dW");
  std::string label = rc.base;
  for (const auto& o : rc.overrides) label += " " + o;
  std::printf("[ linear   ] %-48s worst |gpu-cpu| / (2 K u B): Y %.3f  dX %.3f  dW %.3f  saved %lld bytes\n",
              label.c_str(), ry, rdx, rdw,
              static_cast<long long>(saved_bytes));
}

INSTANTIATE_TEST_SUITE_P(Recipes, LinearCudaTest,
                         ::testing::Values(RecipeCase{"fp32", {}}, RecipeCase{"bf16", {}}, RecipeCase{"fp8", {}},
                                           RecipeCase{"fp8_hybrid", {}}, RecipeCase{"nvfp4", {}},
                                           RecipeCase{"nvfp4", {"no_rht"}}, RecipeCase{"nvfp4", {"no_2d"}},
                                           RecipeCase{"nvfp4", {"no_sr"}}, RecipeCase{"mxfp4", {}},
                                           RecipeCase{"bf16", {"wgrad.x.rht=true", "wgrad.dy.rht=true"}},
                                           RecipeCase{"nvfp4", {"fprop.x.format=bf16", "wgrad.x.format=fp32"}}),
                         [](const auto& info) {
                           std::string n = info.param.base;
                           for (const auto& o : info.param.overrides) n += "_" + o;
                           for (char& c : n)
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return n;
                         });

// The weight is quantized once per step, not once per GEMM, and again after it changes.
TEST(LinearCuda, QuantizesTheWeightOncePerStep) {
  std::mt19937_64 rng(test::fresh_seed());
  LinearContext ctx;
  LinearCuda gpu(64, 32, preset("nvfp4"), {}, ctx);
  gpu.upload_weight(test::random_normal(rng, 64 * 32, 0.1f));
  const std::vector<float> x = test::random_normal(rng, 48 * 64, 1.0f), dy = test::random_normal(rng, 48 * 32, 1.0f);
  DeviceBuffer<float> d_x{std::span<const float>(x)}, d_dy{std::span<const float>(dy)}, d_y(48 * 32), d_dx(48 * 64);
  gpu.set_step(1);
  gpu.forward(d_x.data(), 48, d_y.data(), nullptr);
  gpu.backward(d_dy.data(), d_dx.data(), nullptr);
  EXPECT_EQ(gpu.weight_quantizations(), 1);
  gpu.set_step(2);
  gpu.forward(d_x.data(), 48, d_y.data(), nullptr);
  gpu.weight_changed();
  gpu.backward(d_dy.data(), d_dx.data(), nullptr);
  EXPECT_EQ(gpu.weight_quantizations(), 3);
  EXPECT_THROW(gpu.backward(d_dy.data(), d_dx.data(), nullptr), std::logic_error);
  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
}

// The saved X^T decoded by the fused dY pass after its tiles (LinearContext::decode_x_t_in_dy_pass, the
// default) gives Wgrad the values of its own decode pass: dW and dX bit for bit over two steps, with
// X^T of several widths (the layer's in) and a shape of partial 64 x 128 tiles; the default's dY
// pass decoded X^T at each step, the other's never, so the two took different routes.
TEST(LinearCuda, XtDecodedInTheDyPassGivesTheSameBits) {
  std::mt19937_64 rng(test::fresh_seed());
  for (const auto& [tokens, in, out] : {std::tuple{256, 192, 320}, std::tuple{144, 96, 80}}) {
    SCOPED_TRACE(std::to_string(tokens) + " tokens, " + std::to_string(in) + " -> " + std::to_string(out));
    LinearContext ctx_tail, ctx_own;
    ctx_tail.native_fp4 = ctx_own.native_fp4 = false;  // the Hopper decode path, on any GPU
    ctx_own.decode_x_t_in_dy_pass = false;
    LinearCuda a(in, out, preset("nvfp4"), {}, ctx_tail), b(in, out, preset("nvfp4"), {}, ctx_own);
    const std::vector<float> w = test::random_normal(rng, in * out, 0.1f);
    a.upload_weight(w);
    b.upload_weight(w);
    for (uint64_t step : {1u, 2u}) {
      const std::vector<float> x = test::random_normal(rng, tokens * in, 1.0f);
      const std::vector<float> dy = test::random_normal(rng, tokens * out, 1.0f);
      DeviceBuffer<float> d_x{std::span<const float>(x)}, d_dy{std::span<const float>(dy)}, d_y(tokens * out);
      DeviceBuffer<float> dx_a(tokens * in), dx_b(tokens * in);
      for (auto [l, dx] : {std::pair{&a, &dx_a}, std::pair{&b, &dx_b}}) {
        l->set_step(step);
        l->forward(d_x.data(), tokens, d_y.data(), nullptr);
        l->backward(d_dy.data(), dx->data(), nullptr);
      }
      EXPECT_EQ(dx_a.download(), dx_b.download()) << "dX, step " << step;
      const std::vector<float> ga = nibble::test::download(a.weight_grad(), in * out);
      const std::vector<float> gb = nibble::test::download(b.weight_grad(), in * out);
      EXPECT_EQ(0, std::memcmp(ga.data(), gb.data(), ga.size() * sizeof(float))) << "dW, step " << step;
    }
    EXPECT_EQ(ctx_tail.x_t_decodes_in_dy_pass, 2) << "the dY pass decoded X^T at both steps";
    EXPECT_EQ(ctx_own.x_t_decodes_in_dy_pass, 0);
  }
}

// The fused pass's decoded BF16 values are what the separate decode pass makes of the packed codes,
// and the pass writes the same packed codes with them: both operands of make_pair, float and bf16
// input, with and without the RHT and stochastic rounding, shapes of partial 64 x 128 tiles.
TEST(OperandCuda, DecodedValuesEqualTheDecodePass) {
  std::mt19937_64 rng(test::fresh_seed());
  struct Shape {
    int64_t rows, cols;
  };
  for (const Shape sh : {Shape{96, 160}, Shape{48, 80}, Shape{1040, 272}}) {
    for (const std::vector<std::string>& overrides :
         {std::vector<std::string>{}, std::vector<std::string>{"no_rht"}, std::vector<std::string>{"no_sr"}}) {
      const Recipe recipe = make_recipe("nvfp4", overrides);
      std::vector<float> x = test::random_normal(rng, sh.rows * sh.cols, 1.0f);
      for (int64_t r = 0; r < sh.rows; ++r) x[static_cast<size_t>(r * sh.cols + 3)] *= 30.0f;
      std::vector<bf16_t> xb(x.size());
      for (size_t i = 0; i < x.size(); ++i) xb[i] = bf16_t{BF16::encode(x[i], Rounding::kNearestEven)};
      DeviceBuffer<float> d_x{std::span<const float>(x)};
      DeviceBuffer<bf16_t> d_xb{std::span<const bf16_t>(xb)};
      for (const bool bf16_input : {false, true}) {
        for (const auto& [row_op, col_op] : {std::pair{Operand::kFpropX, Operand::kWgradX},
                                            std::pair{Operand::kDgradDy, Operand::kWgradDy}}) {
          SCOPED_TRACE(std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + " " + recipe.name +
                       (bf16_input ? " bf16" : " float") + " " + operand_name(row_op));
          cuda::OperandCuda row, col, row0, col0;
          const uint64_t seed = rng();
          // With the values, the GEMM alphas against a partner (another NVFP4 operand, of x / 8).
          cuda::OperandCuda partner, partner_col;
          std::vector<float> x8(x);
          for (float& v : x8) v *= 0.125f;
          const DeviceBuffer<float> d_x8{std::span<const float>(x8)};
          const auto make_partner = [&] {
            cuda::OperandCuda::make_pair(d_x8.data(), sh.rows, sh.cols, recipe, row_op, col_op, seed + 1, partner,
                                         partner_col, nullptr);
          };
          make_partner();
          const auto make = [&](cuda::OperandCuda& r, cuda::OperandCuda& c, bool decoded) {
            const cuda::OperandForGemm for_gemm{decoded, decoded ? &partner : nullptr};
            if (bf16_input)
              cuda::OperandCuda::make_pair(d_xb.data(), sh.rows, sh.cols, recipe, row_op, col_op, seed, r, c, nullptr,
                                           for_gemm, for_gemm);
            else
              cuda::OperandCuda::make_pair(d_x.data(), sh.rows, sh.cols, recipe, row_op, col_op, seed, r, c, nullptr,
                                           for_gemm, for_gemm);
          };
          make(row, col, true);
          make(row0, col0, false);
          const float g_partner = partner.download().decode_scale;
          for (const auto* o : {&row, &col}) {
            ASSERT_NE(o->alpha_with(partner), nullptr);
            const float alpha = download(o->alpha_with(partner), 1)[0];
            EXPECT_EQ(std::bit_cast<uint32_t>(alpha), std::bit_cast<uint32_t>(o->download().decode_scale * g_partner))
                << "alpha " << alpha;
            EXPECT_EQ(o->alpha_with(partner_col), nullptr) << "an alpha for an operand it was not made for";
          }
          EXPECT_EQ(row0.alpha_with(partner), nullptr);
          make_partner();  // the partner made again: the alphas are stale
          EXPECT_EQ(row.alpha_with(partner), nullptr);
          EXPECT_EQ(col.alpha_with(partner), nullptr);
          for (const auto& [o, o0] : {std::pair{&row, &row0}, std::pair{&col, &col0}}) {
            ASSERT_TRUE(o->has_decoded());
            ASSERT_FALSE(o0->has_decoded());
            const QuantizedTensor q = o->download(), q0 = o0->download();
            EXPECT_EQ(q.data, q0.data) << "codes";
            EXPECT_EQ(q.scales, q0.scales) << "block scales";
            EXPECT_EQ(q.decode_scale, q0.decode_scale) << "tensor scale";
            DeviceBuffer<uint8_t> scratch, scratch0;
            for (const bool as_b : {false, true}) {
              const cuda::GemmMatrix m = o->gemm_matrix(cuda::GemmType::kBF16, as_b, scratch, nullptr);
              const cuda::GemmMatrix m0 = o0->gemm_matrix(cuda::GemmType::kBF16, as_b, scratch0, nullptr);
              EXPECT_EQ(m.transposed, m0.transposed);
              EXPECT_EQ(scratch.size(), 0u) << "decoded into scratch despite the fused pass's values";
              EXPECT_GT(scratch0.size(), 0u);
              const int64_t n = o->rows() * o->cols();
              const std::vector<uint16_t> got = download(static_cast<const uint16_t*>(m.data), n);
              const std::vector<uint16_t> want = download(static_cast<const uint16_t*>(m0.data), n);
              size_t first = 0;
              while (first < got.size() && got[first] == want[first]) ++first;
              EXPECT_EQ(first, got.size()) << "first difference at element " << first << " of " << n;
            }
          }
          // A make without the request drops the values.
          make(row, col, false);
          EXPECT_FALSE(row.has_decoded());
          EXPECT_FALSE(col.has_decoded());
        }
      }
    }
  }
}

// make_tile16_pair with `decoded`: W reads the values its 16x16 pass wrote, and W^T reads the same
// buffer with the transpose flag flipped; both equal the separate decode pass of the packed copies
// made without `decoded` element for element, as GEMM operand A and B, with the same g.
TEST(OperandCuda, Tile16PairSharesWsDecodedValuesWithWt) {
  std::mt19937_64 rng(test::fresh_seed());
  const Recipe recipe = make_recipe("nvfp4");
  for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{224, 160}, std::pair<int64_t, int64_t>{1040, 272}}) {
    SCOPED_TRACE(std::to_string(rows) + "x" + std::to_string(cols));
    std::vector<float> w = test::random_normal(rng, rows * cols, 0.05f);
    for (int64_t i = 0; i < rows * cols; i += 41) w[static_cast<size_t>(i)] *= 300.0f;  // wide tile scales
    const DeviceBuffer<float> d_w{std::span<const float>(w)};
    const uint64_t seed = rng();
    cuda::OperandCuda row, col, row0, col0;
    ASSERT_TRUE(cuda::OperandCuda::make_tile16_pair(d_w.data(), rows, cols, recipe, Operand::kFpropW,
                                                    Operand::kDgradW, seed, row, col, nullptr, /*decoded=*/true));
    ASSERT_TRUE(cuda::OperandCuda::make_tile16_pair(d_w.data(), rows, cols, recipe, Operand::kFpropW,
                                                    Operand::kDgradW, seed, row0, col0, nullptr));
    EXPECT_TRUE(row.has_decoded() && col.has_decoded());
    EXPECT_FALSE(row0.has_decoded() || col0.has_decoded());
    EXPECT_FALSE(row.has_packed() || col.has_packed());
    for (const auto& [o, o0] : {std::pair{&row, &row0}, std::pair{&col, &col0}}) {
      const float g = download(o->decode_scale(), 1)[0], g0 = download(o0->decode_scale(), 1)[0];
      EXPECT_EQ(std::bit_cast<uint32_t>(g), std::bit_cast<uint32_t>(g0)) << "g";
    }
    for (const auto& [o, o0] : {std::pair{&row, &row0}, std::pair{&col, &col0}}) {
      const int64_t r = o->rows(), c = o->cols();
      for (const bool as_b : {false, true}) {
        DeviceBuffer<uint8_t> scratch, scratch0;
        const cuda::GemmMatrix m = o->gemm_matrix(cuda::GemmType::kBF16, as_b, scratch, nullptr);
        const cuda::GemmMatrix m0 = o0->gemm_matrix(cuda::GemmType::kBF16, as_b, scratch0, nullptr);
        EXPECT_EQ(scratch.size(), 0u) << "decoded into scratch despite the 16x16 pass's values";
        const std::vector<uint16_t> got = download(static_cast<const uint16_t*>(m.data), r * c);
        const std::vector<uint16_t> want = download(static_cast<const uint16_t*>(m0.data), r * c);
        // m0 holds the operand [r x c] as stored; W^T's m holds W, its transpose [c x r].
        const bool flipped = o == &col;
        EXPECT_EQ(m.transposed, flipped ? !m0.transposed : m0.transposed);
        size_t wrong = 0;
        for (int64_t i = 0; i < r; ++i)
          for (int64_t j = 0; j < c; ++j) {
            const uint16_t g = got[static_cast<size_t>(flipped ? j * r + i : i * c + j)];
            if (g != want[static_cast<size_t>(i * c + j)] && wrong++ < 3)
              ADD_FAILURE() << (flipped ? "W^T" : "W") << " element (" << i << ", " << j << ")";
          }
        EXPECT_EQ(wrong, 0u);
      }
    }
  }
}

// The separate decode pass (gemm_matrix into scratch: the GEMM input of operands made without the
// fused pass's values, such as the saved X^T and the weights) against the CPU's code x block scale,
// bit for bit: NVFP4 1x16 and 16x16 (the BF16 kernel of decode8_bf16), MXFP4 (the generic kernel);
// rows of fewer segments than a warp and of more than a block. With `for_gemm.decoded`, the values
// the quantizing pass writes itself (NVFP4: the fused 1x16 pass, and the 16x16 pass for W), which the
// GEMM then reads instead of decoding.
TEST(OperandCuda, DecodePassEqualsTheCpuDecode) {
  std::mt19937_64 rng(test::fresh_seed());
  struct Case {
    const char* recipe;
    Operand op;
  };
  for (const Case c : {Case{"nvfp4", Operand::kFpropX}, Case{"nvfp4", Operand::kFpropW}, Case{"mxfp4", Operand::kFpropX}})
    for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{48, 160}, std::pair<int64_t, int64_t>{272, 4352}})
    for (const bool pass_decodes : {false, true}) {
      SCOPED_TRACE(std::string(c.recipe) + " " + operand_name(c.op) + " " + std::to_string(rows) + "x" +
                   std::to_string(cols) + (pass_decodes ? " decoded by the quantizing pass" : ""));
      const Recipe recipe = make_recipe(c.recipe);
      std::vector<float> x = test::random_normal(rng, rows * cols, 1.0f);
      for (int64_t i = 0; i < rows * cols; i += 37) x[static_cast<size_t>(i)] *= 1e3f;  // wide block scales
      const DeviceBuffer<float> d_x{std::span<const float>(x)};
      cuda::OperandCuda o;
      o.make(d_x.data(), rows, cols, recipe[c.op], c.op, recipe.rht_signs(), rng(), nullptr,
             cuda::OperandForGemm{pass_decodes, nullptr});
      EXPECT_EQ(o.has_decoded(), pass_decodes && std::string(c.recipe) == "nvfp4");
      const QuantizedTensor q = o.download();
      DeviceBuffer<uint8_t> scratch;
      const cuda::GemmMatrix m = o.gemm_matrix(cuda::GemmType::kBF16, /*as_b=*/false, scratch, nullptr);
      EXPECT_EQ(scratch.size() == 0, o.has_decoded()) << "a decode pass for an operand with decoded values";
      const std::vector<uint16_t> got = download(static_cast<const uint16_t*>(m.data), rows * cols);
      const bool tiles16 = q.spec.block == Block::k16x16, mx = q.spec.format == Format::kMxfp4;
      size_t wrong = 0;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t col = 0; col < cols; ++col) {
          const int64_t i = r * cols + col;
          const float scale = mx ? E8M0::decode(q.scales[static_cast<size_t>(i / 32)])
                                 : E4M3::decode(q.scales[static_cast<size_t>(
                                       tiles16 ? (r / 16) * (cols / 16) + col / 16 : i / 16)]);
          const uint8_t byte = q.data[static_cast<size_t>(i / 2)];
          const float value = E2M1::decode(i % 2 == 0 ? byte & 0xF : byte >> 4) * scale;
          const auto want = static_cast<uint16_t>(std::bit_cast<uint32_t>(value) >> 16);
          if (got[static_cast<size_t>(i)] != want && wrong++ < 3)
            ADD_FAILURE() << "element (" << r << ", " << col << "): " << got[static_cast<size_t>(i)] << ", expected " << want;
        }
      EXPECT_EQ(wrong, 0u);
    }
}

// The linear layer with the fused pass's decoded values (x_rows, dy_rows, dy_cols, which then have
// no packed copy; never the saved X^T) and the 16x16 pass's decoded W (read by Fprop, and transposed
// by Dgrad) computes exactly what it computes with the packed copies and the separate decode pass:
// the GEMMs read the same BF16 values.
TEST(LinearCuda, FusedDecodeGivesTheSameBits) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t tokens = 96, in = 160, out = 224;
  for (const std::vector<std::string>& overrides :
       {std::vector<std::string>{}, std::vector<std::string>{"no_rht"}, std::vector<std::string>{"no_sr"}}) {
    const Recipe recipe = make_recipe("nvfp4", overrides);
    SCOPED_TRACE(recipe.name);
    const std::vector<float> w = test::random_normal(rng, in * out, 0.05f);
    const std::vector<float> x = test::random_normal(rng, tokens * in, 1.0f);
    const std::vector<float> dy = test::random_normal(rng, tokens * out, 1e-3f);
    DeviceBuffer<float> d_x{std::span<const float>(x)}, d_dy{std::span<const float>(dy)};
    const LinearOptions options{/*layer_id=*/3, /*run_seed=*/rng()};
    struct Result {
      std::vector<float> y, dx, dw;
    };
    const auto run = [&](bool fused_decode) {
      LinearContext ctx;
      ctx.native_fp4 = false;  // the BF16 decode path, also on Blackwell
      ctx.packed_gemm = false;
      ctx.fused_decode = fused_decode;
      LinearCuda layer(in, out, recipe, options, ctx);
      layer.upload_weight(w);
      layer.set_step(5);
      DeviceBuffer<float> d_y(static_cast<size_t>(tokens * out)), d_dx(static_cast<size_t>(tokens * in));
      layer.forward(d_x.data(), tokens, d_y.data(), nullptr);
      EXPECT_EQ(ctx.x_rows.has_decoded(), fused_decode);
      EXPECT_EQ(ctx.x_rows.has_packed(), !fused_decode);  // the decoded values alone
      EXPECT_FALSE(layer.saved_x_t().has_decoded());
      EXPECT_TRUE(layer.saved_x_t().has_packed());
      EXPECT_EQ(layer.fprop_w().has_decoded(), fused_decode);
      EXPECT_EQ(layer.dgrad_w().has_decoded(), fused_decode);
      EXPECT_EQ(layer.fprop_w().has_packed(), !fused_decode);
      EXPECT_EQ(layer.dgrad_w().has_packed(), !fused_decode);
      layer.backward(d_dy.data(), d_dx.data(), nullptr);
      EXPECT_EQ(ctx.dy_rows.has_decoded(), fused_decode);
      EXPECT_EQ(ctx.dy_cols.has_decoded(), fused_decode);
      EXPECT_EQ(ctx.dy_rows.has_packed(), !fused_decode);
      EXPECT_EQ(ctx.dy_cols.has_packed(), !fused_decode);
      return Result{download(d_y.data(), tokens * out), download(d_dx.data(), tokens * in),
                    download(layer.weight_grad(), in * out)};
    };
    const Result fused = run(true), separate = run(false);
    EXPECT_EQ(fused.y, separate.y) << "Y";
    EXPECT_EQ(fused.dx, separate.dx) << "dX";
    EXPECT_EQ(fused.dw, separate.dw) << "dW";
  }
}

// forward(accumulate = true) adds X W^T onto y in the GEMM (the GPU model's residual connections):
// the bits of y + forward() where the GEMM's scale is 1 (bf16); under nvfp4 the epilogue may fuse
// the scale and the addition into one rounding: within 2^-22 of |y| + |X W^T|.
TEST(LinearCuda, ForwardAccumulatesOntoY) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t tokens = 64, in = 96, out = 128;
  for (const char* name : {"bf16", "nvfp4"}) {
    SCOPED_TRACE(name);
    const Recipe recipe = make_recipe(name, {});
    const std::vector<float> w = test::random_normal(rng, in * out, 0.05f);
    const std::vector<float> x = test::random_normal(rng, tokens * in, 1.0f);
    const std::vector<float> y0 = test::random_normal(rng, tokens * out, 1.0f);
    LinearContext ctx;
    LinearCuda layer(in, out, recipe, LinearOptions{/*layer_id=*/1, /*run_seed=*/rng()}, ctx);
    layer.upload_weight(w);
    DeviceBuffer<float> d_x{std::span<const float>(x)}, d_y(y0.size()), d_acc{std::span<const float>(y0)};
    layer.forward(d_x.data(), tokens, d_y.data(), nullptr);
    layer.forward(d_x.data(), tokens, d_acc.data(), nullptr, /*accumulate=*/true);
    const std::vector<float> y = download(d_y.data(), tokens * out), acc = download(d_acc.data(), tokens * out);
    for (size_t i = 0; i < y.size(); ++i) {
      const float want = y0[i] + y[i];
      if (recipe.name == "bf16")
        ASSERT_EQ(acc[i], want) << "element " << i;
      else
        ASSERT_LE(std::fabs(acc[i] - want), std::ldexp(std::fabs(y0[i]) + std::fabs(y[i]), -22)) << "element " << i;
    }
  }
}

// "base key=value ..." as the recipe tests write them.
Recipe recipe_named(const std::string& text) {
  std::vector<std::string> words;
  for (size_t i = 0; i < text.size();) {
    const size_t j = std::min(text.find(' ', i), text.size());
    if (j > i) words.push_back(text.substr(i, j - i));
    i = j + 1;
  }
  return make_recipe(words.front(), std::span<const std::string>(words).subspan(1));
}

// A BF16 input written by its producer (bf16_input + forward_bf16_input, bf16_dy_input +
// backward_bf16_input) gives the bits of forward()/backward() given the same values in FP32: Y, dX,
// dW and the saved bytes, under every recipe without an FP32 operand (bf16 operands are then the
// producer's buffer itself; quantized ones are made from it). Recipes with FP32 operands refuse.
TEST(LinearCuda, Bf16InputGivesTheBitsOfTheSameValuesInFp32) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t tokens = 64, in = 64, out = 32;  // multiples of 32: MXFP4 blocks X^T along tokens
  const std::vector<float> w = test::random_normal(rng, in * out, 0.1f);
  const auto to_bf16 = [](const std::vector<float>& v) {
    std::vector<bf16_t> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i].bits = BF16::encode(v[i], Rounding::kNearestEven);
    return r;
  };
  const auto to_float = [](const std::vector<bf16_t>& v) {
    std::vector<float> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = BF16::decode(v[i].bits);
    return r;
  };
  const std::vector<bf16_t> x16 = to_bf16(test::random_normal(rng, tokens * in, 1.0f));
  const std::vector<bf16_t> dy16 = to_bf16(test::random_normal(rng, tokens * out, 1.0f));
  DeviceBuffer<float> d_x{std::span<const float>(to_float(x16))}, d_dy{std::span<const float>(to_float(dy16))};
  for (const char* name : {"bf16", "nvfp4", "fp8", "mxfp4", "nvfp4 wgrad.x.format=bf16 wgrad.x.rht=true"}) {
    LinearContext ctx;
    std::vector<float> results[2][3];  // [path][Y, dX, dW]
    int64_t saved[2] = {};
    for (int path = 0; path < 2; ++path) {
      LinearCuda gpu(in, out, recipe_named(name), {}, ctx);
      ASSERT_TRUE(gpu.takes_bf16_input()) << name;
      ASSERT_TRUE(gpu.takes_bf16_dy()) << name;
      gpu.upload_weight(w);
      gpu.set_step(3);
      DeviceBuffer<float> y(static_cast<size_t>(tokens * out)), dx(static_cast<size_t>(tokens * in));
      if (path == 0) {
        gpu.forward(d_x.data(), tokens, y.data(), nullptr);
      } else {
        NIBBLE_CUDA_CHECK(cudaMemcpy(gpu.bf16_input(tokens), x16.data(), x16.size() * sizeof(bf16_t),
                                     cudaMemcpyHostToDevice));
        gpu.forward_bf16_input(tokens, y.data(), nullptr);
      }
      saved[path] = gpu.saved_activation_bytes();
      if (path == 0) {
        gpu.backward(d_dy.data(), dx.data(), nullptr);
      } else {
        NIBBLE_CUDA_CHECK(cudaMemcpy(gpu.bf16_dy_input(), dy16.data(), dy16.size() * sizeof(bf16_t),
                                     cudaMemcpyHostToDevice));
        gpu.backward_bf16_input(dx.data(), nullptr);
      }
      results[path][0] = download(y.data(), tokens * out);
      results[path][1] = download(dx.data(), tokens * in);
      results[path][2] = download(gpu.weight_grad(), in * out);
    }
    EXPECT_EQ(saved[0], saved[1]) << name;
    for (int k = 0; k < 3; ++k) EXPECT_EQ(results[0][k], results[1][k]) << name << ": output " << k << " (Y, dX, dW)";
  }
  struct Refusal {
    const char* name;
    bool x, dy;  // takes_bf16_input(), takes_bf16_dy()
  };
  for (const Refusal& c : {Refusal{"fp32", false, false}, Refusal{"nvfp4 wgrad.x.format=fp32", false, true},
                           Refusal{"bf16 dgrad.dy.format=fp32", true, false}}) {
    LinearContext ctx;
    LinearCuda other(in, out, recipe_named(c.name), {}, ctx);
    EXPECT_EQ(other.takes_bf16_input(), c.x) << c.name;
    EXPECT_EQ(other.takes_bf16_dy(), c.dy) << c.name;
    DeviceBuffer<float> y(static_cast<size_t>(tokens * out));
    if (!c.x) {
      EXPECT_THROW(other.forward_bf16_input(tokens, y.data(), nullptr), std::logic_error) << c.name;
    }
  }
}

// Y (dX) written in BF16 by the GEMM's epilogue (forward_bf16_input with a bf16_t* Y, how the GPU
// model keeps the MLP's fc output; backward_bf16_input with a bf16_t* dX, its linear layers' dX) is
// the FP32 Y (dX) rounded to BF16, up to the FP32 accumulation order of the algorithm cuBLASLt picks
// for each output type: never more than one BF16 ulp from RN(Y).
TEST(LinearCuda, Bf16OutputIsTheFp32OutputRounded) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t tokens = 256, in = 512, out = 384;
  const std::vector<float> w = test::random_normal(rng, in * out, 0.05f);
  std::vector<bf16_t> x16(static_cast<size_t>(tokens * in));
  std::vector<bf16_t> dy16(static_cast<size_t>(tokens * out));
  for (auto* v : {&x16, &dy16})
    for (bf16_t& e : *v) e.bits = BF16::encode(std::normal_distribution<float>(0.0f, 1.0f)(rng), Rounding::kNearestEven);
  for (const char* name : {"bf16", "nvfp4"}) {
    LinearContext ctx;
    LinearCuda gpu(in, out, recipe_named(name), {}, ctx);
    gpu.upload_weight(w);
    gpu.set_step(5);
    DeviceBuffer<float> y(static_cast<size_t>(tokens * out)), dx(static_cast<size_t>(tokens * in));
    DeviceBuffer<bf16_t> y16(y.size()), dx16(dx.size());
    for (int pass = 0; pass < 2; ++pass) {  // the same operands both times (same step, same inputs)
      NIBBLE_CUDA_CHECK(
          cudaMemcpy(gpu.bf16_input(tokens), x16.data(), x16.size() * sizeof(bf16_t), cudaMemcpyHostToDevice));
      if (pass == 0)
        gpu.forward_bf16_input(tokens, y.data(), nullptr);
      else
        gpu.forward_bf16_input(tokens, y16.data(), nullptr);
      NIBBLE_CUDA_CHECK(
          cudaMemcpy(gpu.bf16_dy_input(), dy16.data(), dy16.size() * sizeof(bf16_t), cudaMemcpyHostToDevice));
      if (pass == 0)
        gpu.backward_bf16_input(dx.data(), nullptr);
      else
        gpu.backward_bf16_input(dx16.data(), nullptr);
    }
    for (const auto& [f32, b16, what] : {std::tuple{&y, &y16, "Y"}, std::tuple{&dx, &dx16, "dX"}}) {
      const std::vector<float> want32 = download(f32->data(), static_cast<int64_t>(f32->size()));
      const std::vector<bf16_t> got = download(b16->data(), static_cast<int64_t>(b16->size()));
      int64_t exact = 0, worst = 0;
      for (size_t i = 0; i < want32.size(); ++i) {
        const int64_t want = BF16::encode(want32[i], Rounding::kNearestEven);
        // Adjacent BF16 values of one sign differ by one in their bits (zeros of either sign count as equal).
        const int64_t ulps =
            want32[i] == 0.0f && (got[i].bits & 0x7FFF) == 0 ? 0 : std::abs(int64_t{got[i].bits} - want);
        exact += ulps == 0;
        worst = std::max(worst, ulps);
      }
      EXPECT_LE(worst, 1) << name << " " << what;
      std::printf("[ linear   ] %s BF16 %s: %lld of %zu elements equal RN(FP32 %s), the rest one ulp away\n", name,
                  what, static_cast<long long>(exact), want32.size(), what);
    }
  }
}

// GELU's tanh form and its derivative, in double (nn::Mlp's formulas).
double gelu_tanh(double x) { return 0.5 * x * (1.0 + std::tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))); }
double gelu_tanh_grad(double x) {
  const double t = std::tanh(0.7978845608028654 * (x + 0.044715 * x * x * x));
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x);
}

// One BF16 ulp of |v| (normal range).
double bf16_ulp(double v) { return std::ldexp(1.0, std::ilogb(std::max(std::fabs(v), 0x1p-126)) - 7); }

// The MLP's GELU in the GEMM epilogues (cuBLASLt GELU_AUX in the up projection's Fprop, DGELU in the
// down projection's Dgrad), against the same layers' FP32 results and GELU's tanh form in double:
// - pre is RN(Y) for the FP32 Y within one BF16 ulp (the FP32 accumulation order of the algorithm
//   cuBLASLt picks; plus 1e-6 of max(1, |Y|)).
// - act is GELU(Y) and the up projection's dY is dH GELU'(pre) for the FP32 dH, each within one BF16
//   ulp plus what an FP32 evaluation with a hardware tanh (tanh.approx: 2^-11 relative) may add:
//   2^-10 max(1, |Y|) for act; for GELU' = (1 + t) / 2 + x (1 - t^2) u' / 2 with
//   u' = 0.798 (1 + 0.134 x^2), 2^-10 |dH| (1 + |x| (1 + 0.134 x^2)). Such an error can hide the
//   difference between the tanh form and the erf form (under 5e-4 on [-4, -1]), not a wrong formula,
//   alpha, layout or operand (errors of the values' own size).
// - The dY lands where the up projection's backward reads it: its dX and dW are the bits of a backward
//   from the same values written by hand.
// - The epilogues run first in a fresh context, so under nvfp4 down's input grows the context's buffer
//   after up's operands are made from it (the GPU model's first step).
// Under bf16 and nvfp4 (FP4 decoded to BF16: the decode path is forced on Blackwell).
TEST(LinearCuda, GeluInGemmIsTheTanhFormOfTheFp32Results) {
  std::mt19937_64 rng(test::fresh_seed());
  const int64_t tokens = 256, d = 256, hidden = 512;  // hidden > d, as in the MLP
  const std::vector<float> w_up = test::random_normal(rng, d * hidden, 0.05f);
  const std::vector<float> w_down = test::random_normal(rng, hidden * d, 0.05f);
  const auto random_bf16 = [&](int64_t n) {
    std::vector<bf16_t> v(static_cast<size_t>(n));
    for (bf16_t& e : v) e.bits = BF16::encode(std::normal_distribution<float>(0.0f, 1.0f)(rng), Rounding::kNearestEven);
    return v;
  };
  const std::vector<bf16_t> x16 = random_bf16(tokens * d), h16 = random_bf16(tokens * hidden),
                            dy16 = random_bf16(tokens * d);
  const auto put = [](bf16_t* dst, const std::vector<bf16_t>& v) {
    NIBBLE_CUDA_CHECK(cudaMemcpy(dst, v.data(), v.size() * sizeof(bf16_t), cudaMemcpyHostToDevice));
  };
  const auto value = [](bf16_t b) { return static_cast<double>(BF16::decode(b.bits)); };
  // |got - want| <= one ulp of want + allowance; returns the elements that fail (reports 3).
  const auto check = [&](const std::vector<bf16_t>& got, const std::vector<double>& want,
                         const std::vector<double>& allowance, const std::string& what) {
    int64_t failures = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const double err = std::fabs(value(got[i]) - want[i]);
      if (!(err <= bf16_ulp(want[i]) + allowance[i]) && ++failures <= 3)
        ADD_FAILURE() << what << "[" << i << "]: got " << value(got[i]) << " want " << want[i];
    }
    return failures;
  };
  for (const char* name : {"bf16", "nvfp4"}) {
    LinearContext ctx;
    ctx.native_fp4 = false;
    LinearCuda up(d, hidden, recipe_named(name), {2, 7}, ctx), down(hidden, d, recipe_named(name), {3, 7}, ctx);
    up.upload_weight(w_up);
    down.upload_weight(w_down);
    up.set_step(4);
    down.set_step(4);
    ASSERT_TRUE(up.fprop_takes_gelu()) << name;
    ASSERT_TRUE(down.dgrad_takes_gelu()) << name;
    DeviceBuffer<float> y32(static_cast<size_t>(tokens * hidden)), dh32(y32.size());
    DeviceBuffer<float> down_y(static_cast<size_t>(tokens * d));
    DeviceBuffer<bf16_t> pre(y32.size()), dx_a(static_cast<size_t>(tokens * d)), dx_b(dx_a.size());
    const auto down_forward = [&] {
      put(down.bf16_input(tokens), h16);
      down.forward_bf16_input(tokens, down_y.data(), nullptr);
      put(down.bf16_dy_input(), dy16);
    };
    // The epilogues first, in the fresh context: under nvfp4 down's input outgrows the context's BF16
    // buffer inside forward_bf16_input_gelu, as in the GPU model's first step. GELU(Y) lands in down's
    // BF16 input (read back before down's forward overwrites it); then up's backward from fc's dY.
    put(up.bf16_input(tokens), x16);
    up.forward_bf16_input_gelu(tokens, down, pre.data(), nullptr);
    const std::vector<bf16_t> got_act = download(down.bf16_input(tokens), tokens * hidden);
    const std::vector<bf16_t> got_pre = download(pre.data(), tokens * hidden);
    down_forward();
    down.backward_bf16_input_gelu(up, pre.data(), nullptr);
    const std::vector<bf16_t> got_dy = download(up.bf16_dy_input(), tokens * hidden);
    up.backward_bf16_input(dx_a.data(), nullptr);
    const std::vector<float> dw_a = download(up.weight_grad(), d * hidden);
    // The FP32 results of the same layers and step: Y, and dH from the down projection's Dgrad.
    up.zero_grad(nullptr);
    put(up.bf16_input(tokens), x16);
    up.forward_bf16_input(tokens, y32.data(), nullptr);
    down_forward();
    down.backward_bf16_input(dh32.data(), nullptr);
    const std::vector<float> y = download(y32.data(), tokens * hidden), dh = download(dh32.data(), tokens * hidden);
    std::vector<double> want_pre(y.size()), want_act(y.size()), want_dy(y.size());
    std::vector<double> allow_pre(y.size()), allow_act(y.size()), allow_dy(y.size());
    for (size_t i = 0; i < y.size(); ++i) {
      const double yi = y[i], x = value(got_pre[i]), scale = std::max(1.0, std::fabs(yi));
      want_pre[i] = BF16::decode(BF16::encode(y[i], Rounding::kNearestEven));
      want_act[i] = gelu_tanh(yi);
      want_dy[i] = dh[i] * gelu_tanh_grad(x);
      allow_pre[i] = 1e-6 * scale;
      allow_act[i] = 0x1p-10 * scale;
      allow_dy[i] = 0x1p-10 * std::fabs(static_cast<double>(dh[i])) * (1.0 + std::fabs(x) * (1.0 + 0.134 * x * x));
    }
    EXPECT_EQ(check(got_pre, want_pre, allow_pre, std::string(name) + " pre"), 0);
    EXPECT_EQ(check(got_act, want_act, allow_act, std::string(name) + " act"), 0);
    EXPECT_EQ(check(got_dy, want_dy, allow_dy, std::string(name) + " fc dY"), 0);
    // up's backward from the same dY values written by hand (its forward above saved the same X^T)
    // gives the bits of the one that took them from down's Dgrad epilogue.
    put(up.bf16_dy_input(), got_dy);
    up.backward_bf16_input(dx_b.data(), nullptr);
    const auto bits = [&](const DeviceBuffer<bf16_t>& v) {
      std::vector<uint16_t> r;
      for (bf16_t e : download(v.data(), static_cast<int64_t>(v.size()))) r.push_back(e.bits);
      return r;
    };
    EXPECT_EQ(bits(dx_a), bits(dx_b)) << name << " fc dX";
    EXPECT_EQ(dw_a, download(up.weight_grad(), d * hidden)) << name << " fc dW";
  }
  // Where the GEMM cannot take the epilogue (FP32 operands, or the context's switch off), the calls refuse.
  LinearContext ctx;
  LinearCuda fp32(d, hidden, recipe_named("fp32"), {}, ctx);
  EXPECT_FALSE(fp32.fprop_takes_gelu());
  ctx.gelu_in_gemm = false;
  LinearCuda off(d, hidden, recipe_named("bf16"), {}, ctx), above(hidden, d, recipe_named("bf16"), {1, 0}, ctx);
  EXPECT_FALSE(off.fprop_takes_gelu());
  EXPECT_FALSE(off.dgrad_takes_gelu());
  DeviceBuffer<bf16_t> p(static_cast<size_t>(tokens * hidden));
  put(off.bf16_input(tokens), x16);
  EXPECT_THROW(off.forward_bf16_input_gelu(tokens, above, p.data(), nullptr), std::logic_error);
}

}  // namespace
}  // namespace nibble::nn
