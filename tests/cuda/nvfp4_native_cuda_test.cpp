// GEMMs that read NVFP4 operands as stored (packed codes and E4M3 block scales), against the
// decode path (the same operands decoded exactly to BF16, cuBLASLt BF16 GEMM, FP32 accumulation):
// - Blackwell: cuBLASLt's native block-scaled NVFP4 GEMM (GemmType::kNvfp4). On a GPU of compute
//   capability < 10.0 (Hopper) these comparisons are skipped with the reason; what runs there: the
//   device rearrangement of the block scales (the same index function as the CPU-tested layout,
//   tensor/block_scale_layout.h), GemmRunner's refusal of kNvfp4, and the layer's selection of the
//   Hopper path. As of this commit the native GEMM has never run on hardware.
// - Hopper: the wgmma kernel that decodes the packed operands in its operand load
//   (tensor/cuda/gemm_nvfp4_sm90.h), compute capability 9.0 only.
//
// Tolerance. Both paths multiply the same values: code x block scale is exact in BF16, and every
// product of two such values is exact in FP32; alpha = g_a g_b is the same float. So the two
// results differ only in the order (and grouping) of FP32 accumulation: each lies within
// gamma_K * B of the exact sum, B_ij = |alpha| sum_k |a_ik b_jk|, gamma_K ~ K u, u = 2^-24, and we
// require |packed - decoded| <= 2 K u B_ij (+ a denormal floor). A wrong layout, nibble order,
// transpose or scale moves results by whole block scales: ratios of 1e5 and more to that bound.
// If Blackwell's FP4 tensor cores accumulated in fewer than 24 bits between promotions (as
// Hopper's FP8 ones do, about 14), ratios would land in between, around 1e1 to 1e4: the message
// then says so rather than blaming the layout.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "cuda/cuda_test_util.h"
#include "nibble/formats/minifloat.h"
#include "nibble/nn/cuda/linear_cuda.h"
#include "nibble/nn/linear.h"
#include "nibble/nn/operand.h"
#include "nibble/quant/quantize.h"
#include "nibble/tensor/block_scale_layout.h"
#include "nibble/tensor/cuda/device_buffer.h"
#include "nibble/tensor/cuda/gemm_cuda.h"
#include "nibble/tensor/cuda/gemm_nvfp4_sm90.h"
#include "nn/nn_test_util.h"
#include "test_seed.h"

namespace nibble {
namespace {

using cuda::DeviceBuffer;
using cuda::GemmMatrix;
using cuda::GemmOutput;
using cuda::GemmRunner;
using cuda::GemmType;
using nibble::test::download;

constexpr const char* kNotBlackwell =
    "needs compute capability >= 10.0 (Blackwell) for cuBLASLt's native NVFP4 GEMM; this GPU has "
    "none, so the native path was NOT run (the Hopper path is what runs here)";

int compute_capability_major() {
  int device = 0, major = 0;
  NIBBLE_CUDA_CHECK(cudaGetDevice(&device));
  NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major;
}

// Checks |got - want| <= 2 K u B elementwise (plus `rel` |want| for a rounded output); returns the
// worst ratio to the bound. Failures print the ratio's meaning (see the top of this file).
double expect_within_accumulation_bound(const std::vector<float>& got, const std::vector<float>& want,
                                        const std::vector<double>& bound, int64_t k, double rel,
                                        const std::string& what) {
  const double u = std::ldexp(1.0, -24);
  double worst = 0;
  int failures = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double tol = 2.0 * static_cast<double>(k) * u * bound[i] + rel * std::fabs(want[i]) + 1e-30;
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    worst = std::max(worst, err / tol);
    if (!(err <= tol) && ++failures <= 3)
      ADD_FAILURE() << what << "[" << i << "]: packed " << got[i] << " decoded " << want[i] << " bound " << tol;
  }
  if (failures > 0) {
    ADD_FAILURE() << what << ": " << failures << " of " << want.size() << " outside the bound, worst ratio " << worst
                  << (worst < 1e4 ? " (small: the tensor cores may accumulate in fewer than 24 bits)"
                                  : " (large: layout, nibble order, transpose or scales are wrong)");
  }
  return worst;
}

// B_ij = |alpha| sum_k |a_ik b_jk| (a: m x k, b: n x k, unscaled operand values).
std::vector<double> magnitude(const std::vector<float>& a, const std::vector<float>& b, int64_t m, int64_t n,
                              int64_t k, float alpha) {
  std::vector<double> out(static_cast<size_t>(m * n));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t t = 0; t < k; ++t) s += std::fabs(static_cast<double>(a[i * k + t]) * b[j * k + t]);
      out[static_cast<size_t>(i * n + j)] = std::fabs(static_cast<double>(alpha)) * s;
    }
  return out;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {  // exact for decoded FP4 operands
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = BF16::encode(v[i], Rounding::kNearestEven);
  return out;
}

// Activation-like values: Gaussian with a few large channels, so that block scales vary.
std::vector<float> random_matrix(std::mt19937_64& rng, int64_t rows, int64_t cols, float stddev) {
  std::vector<float> x = nn::test::random_normal(rng, rows * cols, stddev);
  for (int64_t r = 0; r < rows; ++r) x[static_cast<size_t>(r * cols + 5 % cols)] *= 30.0f;
  return x;
}

// The rearrangement kernel gives the host function's bytes, padding zeroed (the output buffer
// starts as garbage), for 1x16 blocks and 16x16 tiles, aligned and unaligned shapes. Any GPU.
TEST(Nvfp4Native, TileKernelMatchesHostLayout) {
  std::mt19937_64 rng(test::fresh_seed());
  std::uniform_int_distribution<int> code(0, 0x7E);
  for (const int64_t rows_per : {1, 16}) {
    for (const auto& [rows, sc] : {std::pair<int64_t, int64_t>{768, 48}, {96, 5}, {272, 20}, {16, 2}}) {
      const int64_t scale_rows = (rows + rows_per - 1) / rows_per;
      std::vector<uint8_t> scales(static_cast<size_t>(scale_rows * sc));
      for (uint8_t& s : scales) s = static_cast<uint8_t>(code(rng));
      const std::vector<uint8_t> want = tile_block_scales(scales.data(), rows, sc, rows_per);
      DeviceBuffer<uint8_t> d_scales{std::span<const uint8_t>(scales)}, d_tiled(want.size());
      NIBBLE_CUDA_CHECK(cudaMemset(d_tiled.data(), 0xAB, want.size()));
      cuda::tile_block_scales(d_scales.data(), rows, sc, rows_per, d_tiled.data(), nullptr);
      const std::vector<uint8_t> got = download(d_tiled.data(), static_cast<int64_t>(want.size()));
      int64_t mismatches = 0, first = -1;
      for (size_t i = 0; i < want.size(); ++i)
        if (got[i] != want[i] && mismatches++ == 0) first = static_cast<int64_t>(i);
      EXPECT_EQ(mismatches, 0) << rows << " rows, " << sc << " scales per row, " << rows_per
                               << " rows per scale row: first wrong byte " << first;
    }
  }
}

// Before Blackwell, GemmRunner refuses kNvfp4 with a message, and a layer never selects it.
TEST(Nvfp4Native, HopperRefusesAndSelectsTheDecodePath) {
  if (compute_capability_major() >= 10) GTEST_SKIP() << "a Blackwell GPU: the native tests below cover it";
  EXPECT_FALSE(cuda::native_fp4_available());
  DeviceBuffer<uint8_t> codes(64 * 64 / 2), tiled(static_cast<size_t>(tiled_scale_bytes(64, 4)));
  const GemmMatrix a{codes.data(), GemmType::kNvfp4, false, 0, tiled.data()};
  const GemmMatrix b{codes.data(), GemmType::kNvfp4, true, 0, tiled.data()};
  DeviceBuffer<float> c(64 * 64);
  GemmRunner runner;
  EXPECT_THROW(runner.run(64, 64, 64, a, b, GemmOutput{c.data(), GemmType::kF32}, nullptr, false, nullptr),
               std::invalid_argument);

  std::mt19937_64 rng(test::fresh_seed());
  nn::cuda::LinearContext ctx;
  EXPECT_FALSE(ctx.native_fp4);
  nn::cuda::LinearCuda layer(64, 64, nn::preset("nvfp4"), {}, ctx);
  layer.upload_weight(nn::test::random_normal(rng, 64 * 64, 0.1f));
  const std::vector<float> x = nn::test::random_normal(rng, 64 * 64), dy = nn::test::random_normal(rng, 64 * 64);
  DeviceBuffer<float> d_x{std::span<const float>(x)}, d_dy{std::span<const float>(dy)}, d_y(64 * 64), d_dx(64 * 64);
  layer.forward(d_x.data(), 64, d_y.data(), nullptr);
  layer.backward(d_dy.data(), d_dx.data(), nullptr);
  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  EXPECT_EQ(layer.gemms(), 3);
  EXPECT_EQ(layer.native_fp4_gemms(), 0);
}

struct GemmCase {
  int64_t m, n, k;
  Block b_block;  // A is an activation (1x16); B a weight in 16x16 tiles or 1x16 blocks
  GemmType out;
  bool accumulate;
};

// One GemmCase's quantized operands on the device, codes and block scales as the quantizers store them.
struct DeviceNvfp4 {
  DeviceBuffer<uint8_t> codes, scales;
  int64_t rows = 0;
  int rows_per_scale = 1;
};

// Runs a GEMM that reads the packed operands: C (FP32 or BF16, holding C0 when accumulating) =
// alpha A B^T (+ C0).
using PackedGemm =
    std::function<void(const GemmCase&, const DeviceNvfp4& a, const DeviceNvfp4& b, const GemmOutput& c, const float* alpha)>;

// `run` against the BF16 GEMM (cuBLASLt) of the same operands decoded exactly, same alpha; returns
// the worst ratio of |packed - decoded| to the accumulation-order bound.
double check_packed_gemm(const GemmCase& gc, const PackedGemm& run, const char* label) {
  const int64_t m = gc.m, n = gc.n, k = gc.k;
  std::mt19937_64 rng(test::fresh_seed());
  const QuantizedTensor qa = quantize(random_matrix(rng, m, k, 1.0f), m, k, make_spec(Format::kNvfp4, Block::k1x16));
  const QuantizedTensor qb = quantize(random_matrix(rng, n, k, 0.05f), n, k, make_spec(Format::kNvfp4, gc.b_block));
  const float alpha = qa.decode_scale * qb.decode_scale;  // the float product multiply_scalars computes
  const std::vector<float> va = dequantize_unscaled(qa), vb = dequantize_unscaled(qb);
  const DeviceNvfp4 da{DeviceBuffer<uint8_t>{std::span<const uint8_t>(qa.data)},
                       DeviceBuffer<uint8_t>{std::span<const uint8_t>(qa.scales)}, m, 1};
  const DeviceNvfp4 db{DeviceBuffer<uint8_t>{std::span<const uint8_t>(qb.data)},
                       DeviceBuffer<uint8_t>{std::span<const uint8_t>(qb.scales)}, n,
                       gc.b_block == Block::k16x16 ? 16 : 1};
  // Decoded: the same values in BF16.
  const std::vector<uint16_t> a16 = to_bf16(va), b16 = to_bf16(vb);
  DeviceBuffer<uint16_t> d_a16{std::span<const uint16_t>(a16)}, d_b16{std::span<const uint16_t>(b16)};
  const float alpha_host[1] = {alpha};
  DeviceBuffer<float> d_alpha{std::span<const float>(alpha_host)};

  // C starts random when accumulating (beta = 1); both paths add the same values (BF16 ones when
  // the packed path's output is BF16).
  std::vector<float> c0 = nn::test::random_normal(rng, m * n, 1.0f);
  if (gc.out == GemmType::kBF16)
    for (float& v : c0) v = BF16::decode(BF16::encode(v, Rounding::kNearestEven));
  DeviceBuffer<float> ref{std::span<const float>(c0)};
  GemmRunner runner;
  runner.run(m, n, k, GemmMatrix{d_a16.data(), GemmType::kBF16, false}, GemmMatrix{d_b16.data(), GemmType::kBF16, true},
             GemmOutput{ref.data(), GemmType::kF32}, d_alpha.data(), gc.accumulate, nullptr);
  const std::vector<float> want = download(ref.data(), m * n);

  std::vector<float> got(static_cast<size_t>(m * n));
  double rel = 0;
  if (gc.out == GemmType::kF32) {
    DeviceBuffer<float> out{std::span<const float>(c0)};
    run(gc, da, db, GemmOutput{out.data(), GemmType::kF32}, d_alpha.data());
    got = download(out.data(), m * n);
  } else {  // BF16 output: one more rounding, at most half a BF16 ulp = 2^-8 of |result| (2^-9 of its binade)
    const std::vector<uint16_t> c16 = to_bf16(c0);
    DeviceBuffer<uint16_t> out{std::span<const uint16_t>(c16)};
    run(gc, da, db, GemmOutput{out.data(), GemmType::kBF16}, d_alpha.data());
    const std::vector<uint16_t> got16 = download(out.data(), m * n);
    for (size_t i = 0; i < got.size(); ++i) got[i] = BF16::decode(got16[i]);
    rel = std::ldexp(1.0, -8);
  }
  std::vector<double> bound = magnitude(va, vb, m, n, k, alpha);
  if (gc.accumulate)  // adding C is one more rounded addition of a term of size |C|
    for (size_t i = 0; i < bound.size(); ++i) bound[i] += std::fabs(c0[i]);
  const double worst = expect_within_accumulation_bound(got, want, bound, k, rel, "C");
  std::printf("[ nvfp4    ] %s m=%lld n=%lld k=%lld B %s out %s%s: worst |packed-decoded| / bound %.3f\n", label,
              static_cast<long long>(m), static_cast<long long>(n), static_cast<long long>(k),
              block_name(gc.b_block), gc.out == GemmType::kF32 ? "fp32" : "bf16", gc.accumulate ? " +C" : "", worst);
  return worst;
}

std::string case_name(const ::testing::TestParamInfo<GemmCase>& info) {
  const GemmCase& g = info.param;
  return "m" + std::to_string(g.m) + "_n" + std::to_string(g.n) + "_k" + std::to_string(g.k) +
         (g.b_block == Block::k16x16 ? "_w16x16" : "_w1x16") + (g.out == GemmType::kF32 ? "_f32" : "_bf16") +
         (g.accumulate ? "_acc" : "");
}

class Nvfp4NativeGemm : public ::testing::TestWithParam<GemmCase> {};

// GemmRunner's kNvfp4 (scales tiled on the device) against the BF16 GEMM of the decoded operands.
TEST_P(Nvfp4NativeGemm, MatchesDecodedBf16Gemm) {
  if (compute_capability_major() < 10) GTEST_SKIP() << kNotBlackwell;
  GemmRunner runner;
  check_packed_gemm(
      GetParam(),
      [&](const GemmCase& gc, const DeviceNvfp4& a, const DeviceNvfp4& b, const GemmOutput& c, const float* alpha) {
        DeviceBuffer<uint8_t> a_tiled(static_cast<size_t>(tiled_scale_bytes(gc.m, gc.k / 16))),
            b_tiled(static_cast<size_t>(tiled_scale_bytes(gc.n, gc.k / 16)));
        cuda::tile_block_scales(a.scales.data(), gc.m, gc.k / 16, a.rows_per_scale, a_tiled.data(), nullptr);
        cuda::tile_block_scales(b.scales.data(), gc.n, gc.k / 16, b.rows_per_scale, b_tiled.data(), nullptr);
        runner.run(gc.m, gc.n, gc.k, GemmMatrix{a.codes.data(), GemmType::kNvfp4, false, 0, a_tiled.data()},
                   GemmMatrix{b.codes.data(), GemmType::kNvfp4, true, 0, b_tiled.data()}, c, alpha, gc.accumulate,
                   nullptr);
        NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());  // before the tiled scales are freed
      },
      "native");
}

INSTANTIATE_TEST_SUITE_P(Shapes, Nvfp4NativeGemm,
                         ::testing::Values(
                             // GPT-2 124M's shapes: nothing padded.
                             GemmCase{1024, 768, 768, Block::k16x16, GemmType::kF32, false},
                             GemmCase{1024, 3072, 768, Block::k16x16, GemmType::kF32, false},
                             // Rows not a multiple of 128, K/16 = 10 and 6 not multiples of 4: padded tiles.
                             GemmCase{144, 208, 160, Block::k16x16, GemmType::kF32, false},
                             GemmCase{48, 80, 160, Block::k1x16, GemmType::kF32, true},
                             GemmCase{272, 96, 96, Block::k1x16, GemmType::kBF16, false},
                             GemmCase{256, 128, 512, Block::k1x16, GemmType::kBF16, true}),
                         case_name);

// Hopper's GEMM that decodes the packed operands in its operand load (gemm_nvfp4_sm90.h): same
// comparison. Shapes: one tile and one k-tile; k-tiles that cycle through the four stages; GPT-2's
// shapes with 16x16 weights; BF16 outputs and accumulation; more tiles than SMs; k split.
class Nvfp4PackedGemm : public ::testing::TestWithParam<GemmCase> {};

TEST_P(Nvfp4PackedGemm, MatchesDecodedBf16Gemm) {
  if (compute_capability_major() != 9) GTEST_SKIP() << "the packed-operand GEMM runs on compute capability 9.0 only";
  DeviceBuffer<float> split_workspace;
  check_packed_gemm(
      GetParam(),
      [&](const GemmCase& gc, const DeviceNvfp4& a, const DeviceNvfp4& b, const GemmOutput& c, const float* alpha) {
        const cuda::Nvfp4Operand fa{a.codes.data(), a.scales.data(), a.rows_per_scale};
        const cuda::Nvfp4Operand fb{b.codes.data(), b.scales.data(), b.rows_per_scale};
        ASSERT_TRUE(cuda::nvfp4_packed_gemm_applies(gc.m, gc.n, gc.k, fa, fb, c));
        cuda::nvfp4_packed_gemm(gc.m, gc.n, gc.k, fa, fb, c, alpha, gc.accumulate, nullptr, &split_workspace);
        NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
      },
      "packed");
}

INSTANTIATE_TEST_SUITE_P(Shapes, Nvfp4PackedGemm,
                         ::testing::Values(GemmCase{128, 256, 64, Block::k1x16, GemmType::kF32, false},
                                           GemmCase{256, 512, 192, Block::k16x16, GemmType::kF32, false},
                                           GemmCase{384, 256, 1024, Block::k1x16, GemmType::kF32, true},
                                           GemmCase{1024, 768, 768, Block::k16x16, GemmType::kF32, false},
                                           GemmCase{512, 2304, 768, Block::k16x16, GemmType::kBF16, false},
                                           GemmCase{256, 768, 3072, Block::k16x16, GemmType::kBF16, true},
                                           // More tiles than an H100 or H200 has SMs: CTAs take
                                           // several, the stage ring runs on across them.
                                           GemmCase{2048, 2304, 128, Block::k16x16, GemmType::kF32, true},
                                           GemmCase{4352, 1024, 64, Block::k1x16, GemmType::kBF16, false},
                                           // Few tiles, long k (Wgrad): k split 4 and 8 ways.
                                           GemmCase{256, 256, 2048, Block::k1x16, GemmType::kBF16, true},
                                           GemmCase{384, 512, 4096, Block::k16x16, GemmType::kF32, true},
                                           GemmCase{768, 768, 16384, Block::k16x16, GemmType::kF32, false}),
                         case_name);

// Shapes and pointers the kernel does not take are refused with a message, not run.
TEST(Nvfp4PackedGemm, RefusesShapesItDoesNotTake) {
  if (compute_capability_major() != 9) GTEST_SKIP() << "the packed-operand GEMM runs on compute capability 9.0 only";
  DeviceBuffer<uint8_t> codes(256 * 128 / 2), scales(256 * 128 / 16);
  DeviceBuffer<float> c(256 * 256);
  const cuda::Nvfp4Operand op{codes.data(), scales.data(), 1};
  const GemmOutput out{c.data(), GemmType::kF32};
  EXPECT_TRUE(cuda::nvfp4_packed_gemm_applies(256, 256, 128, op, op, out));
  EXPECT_FALSE(cuda::nvfp4_packed_gemm_applies(144, 256, 128, op, op, out));  // m not a multiple of 128
  EXPECT_FALSE(cuda::nvfp4_packed_gemm_applies(256, 128, 128, op, op, out));  // n not a multiple of 256
  EXPECT_FALSE(cuda::nvfp4_packed_gemm_applies(256, 256, 96, op, op, out));   // k not a multiple of 64
  const cuda::Nvfp4Operand odd{codes.data() + 8, scales.data(), 1};
  EXPECT_FALSE(cuda::nvfp4_packed_gemm_applies(128, 256, 64, odd, op, out));  // codes not 16-byte aligned
  EXPECT_THROW(cuda::nvfp4_packed_gemm(144, 256, 128, op, op, out, nullptr, false, nullptr), std::invalid_argument);
}

// A whole linear layer under the nvfp4 recipe (16x16 weights, 1x16 activations, stochastic
// rounding and RHT on the gradients), a path that reads the packed operands (Blackwell's native GEMM,
// or Hopper's packed-operand GEMM) against forced decode: the operands are bit-identical (same
// kernels, same seeds), so Y, dX and dW differ only by accumulation order. All three GEMMs must
// have taken the packed path.
enum class PackedPath { kNative, kHopper };

void check_layer_against_decode_path(PackedPath path, int64_t tokens, int64_t in, int64_t out) {
  std::mt19937_64 rng(test::fresh_seed());
  const nn::Recipe recipe = nn::preset("nvfp4");
  const nn::LinearOptions options{/*layer_id=*/3, /*run_seed=*/rng()};
  const std::vector<float> w = nn::test::random_normal(rng, in * out, 0.05f);
  const std::vector<float> x = random_matrix(rng, tokens, in, 1.0f);
  const std::vector<float> dy = nn::test::random_normal(rng, tokens * out, 1e-3f);
  DeviceBuffer<float> d_x{std::span<const float>(x)}, d_dy{std::span<const float>(dy)};

  struct Result {
    std::vector<float> y, dx, dw;
    int64_t packed;
  };
  const auto run = [&](bool packed) {
    nn::cuda::LinearContext ctx;
    ctx.native_fp4 = packed && path == PackedPath::kNative;
    ctx.packed_gemm = packed && path == PackedPath::kHopper;
    nn::cuda::LinearCuda layer(in, out, recipe, options, ctx);
    layer.upload_weight(w);
    layer.set_step(5);
    DeviceBuffer<float> y(static_cast<size_t>(tokens * out)), dx(static_cast<size_t>(tokens * in));
    layer.forward(d_x.data(), tokens, y.data(), nullptr);
    layer.backward(d_dy.data(), dx.data(), nullptr);
    return Result{download(y.data(), tokens * out), download(dx.data(), tokens * in),
                  download(layer.weight_grad(), in * out),
                  path == PackedPath::kNative ? layer.native_fp4_gemms() : layer.packed_gemms()};
  };
  const Result fast = run(true), dec = run(false);
  EXPECT_EQ(fast.packed, 3) << "Fprop, Dgrad and Wgrad should all read the packed operands";
  EXPECT_EQ(dec.packed, 0);

  // Bounds from the CPU's operands (bit-identical to the GPU's, tests/cuda/linear_cuda_test.cpp).
  const uint64_t seed = nn::layer_step_seed(options.run_seed, options.layer_id, 5, 0);
  const auto operand = [&](const std::vector<float>& m, int64_t rows, int64_t cols, nn::Operand op) {
    return nn::OperandCopy::make(m, rows, cols, recipe[op], op, recipe.rht_signs(), seed).gemm_operand();
  };
  const auto bound = [&](const GemmOperand& a, const GemmOperand& b) {
    return magnitude(a.values, b.values, a.rows, b.rows, a.cols, a.decode_scale * b.decode_scale);
  };
  const double ry = expect_within_accumulation_bound(
      fast.y, dec.y, bound(operand(x, tokens, in, nn::Operand::kFpropX), operand(w, out, in, nn::Operand::kFpropW)),
      in, 0, "Y");
  const double rdx = expect_within_accumulation_bound(
      fast.dx, dec.dx,
      bound(operand(dy, tokens, out, nn::Operand::kDgradDy), operand(w, out, in, nn::Operand::kDgradW)), out, 0,
      "dX");
  const double rdw = expect_within_accumulation_bound(
      fast.dw, dec.dw,
      bound(operand(dy, tokens, out, nn::Operand::kWgradDy), operand(x, tokens, in, nn::Operand::kWgradX)), tokens,
      0, "dW");
  std::printf("[ nvfp4    ] %s linear %lld->%lld, %lld tokens: worst |packed-decoded| / (2 K u B): Y %.3f dX %.3f "
              "dW %.3f\n",
              path == PackedPath::kNative ? "native" : "hopper", static_cast<long long>(in),
              static_cast<long long>(out), static_cast<long long>(tokens), ry, rdx, rdw);
}

TEST(Nvfp4Native, LinearLayerMatchesDecodePath) {
  if (compute_capability_major() < 10) GTEST_SKIP() << kNotBlackwell;
  check_layer_against_decode_path(PackedPath::kNative, 256, 192, 320);
}

// Every GEMM's sizes fit the packed-operand GEMM's tiles (m multiples of 128, n of 256).
TEST(Nvfp4PackedGemm, LinearLayerMatchesDecodePath) {
  if (compute_capability_major() != 9) GTEST_SKIP() << "the packed-operand GEMM runs on compute capability 9.0 only";
  check_layer_against_decode_path(PackedPath::kHopper, 256, 256, 512);
}

}  // namespace
}  // namespace nibble
