// CUDA quantizers against the CPU reference: bit for bit, on fresh random tensors of awkward
// shapes, for every QuantSpec the library accepts and for the fused rowwise+columnwise(+RHT) pass.
// Needs a GPU (ctest label "gpu"); run on the device machine by scripts/device_check.sh.
#include "nibble/quant/cuda/quantize_cuda.h"

#include <gtest/gtest.h>

#include <bit>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "nibble/quant/quantize.h"
#include "nibble/tensor/cuda/device_buffer.h"
#include "cuda/fused_pass_spec.h"
#include "quant/test_inputs.h"

namespace nibble {
namespace {

uint64_t fresh_seed() {
  static const uint64_t seed = [] {
    std::random_device rd;
    const uint64_t s = (static_cast<uint64_t>(rd()) << 32) | rd();
    std::printf("quantize_cuda_test: random seed %llu\n", static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

enum class Dist { kGaussianOutliers, kUniform, kTiny, kSparseBlocks, kWideBlocks };

// A rows x cols matrix drawn from `dist`: activation-like Gaussians with a few outlier columns,
// uniform values, values near the bottom of E4M3's scale range, mostly-zero blocks, or Gaussians
// whose 16x16 tiles are scaled by 2^0 .. 2^-40 (block scales over E4M3's whole range, subnormals
// and zero included, where encode scales reach FLT_MAX and elements saturate).
std::vector<float> draw(int64_t rows, int64_t cols, Dist dist, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(-3.0f, 3.0f);
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      float v = 0;
      switch (dist) {
        case Dist::kGaussianOutliers: v = normal(rng) * (c % 37 == 5 ? 80.0f : 1.0f); break;
        case Dist::kUniform: v = uniform(rng); break;
        case Dist::kTiny: v = normal(rng) * 1e-30f; break;
        case Dist::kSparseBlocks: v = ((r / 16 + c / 16) % 3 == 0) ? normal(rng) : 0.0f; break;
        case Dist::kWideBlocks: v = std::ldexp(normal(rng), -static_cast<int>((r / 16 * 7 + c / 16 * 13) % 41)); break;
      }
      x[static_cast<size_t>(r * cols + c)] = v;
    }
  }
  return x;
}

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Bitwise equality of two quantized tensors, with the first differing byte in the message.
::testing::AssertionResult same_bits(const QuantizedTensor& cpu, const QuantizedTensor& gpu) {
  if (cpu.rows != gpu.rows || cpu.cols != gpu.cols) return ::testing::AssertionFailure() << "shape differs";
  const bool both_nan = cpu.decode_scale != cpu.decode_scale && gpu.decode_scale != gpu.decode_scale;
  if (!both_nan && bits(cpu.decode_scale) != bits(gpu.decode_scale))
    return ::testing::AssertionFailure() << "decode scale " << cpu.decode_scale << " vs " << gpu.decode_scale;
  const bool amax_nan = cpu.amax != cpu.amax && gpu.amax != gpu.amax;
  if (!amax_nan && bits(cpu.amax) != bits(gpu.amax))
    return ::testing::AssertionFailure() << "amax " << cpu.amax << " vs " << gpu.amax;
  for (size_t i = 0; i < cpu.scales.size(); ++i)
    if (cpu.scales[i] != gpu.scales[i])
      return ::testing::AssertionFailure() << "scale " << i << ": cpu " << int(cpu.scales[i]) << " gpu "
                                           << int(gpu.scales[i]);
  for (size_t i = 0; i < cpu.data.size(); ++i)
    if (cpu.data[i] != gpu.data[i])
      return ::testing::AssertionFailure() << "data byte " << i << ": cpu " << int(cpu.data[i]) << " gpu "
                                           << int(gpu.data[i]);
  return ::testing::AssertionSuccess();
}

struct Shape {
  int64_t rows, cols;
};
// Multiples of 16 (and of 32 where MXFP4 needs it) that leave partial 64x128 tiles.
const Shape kShapes[] = {{16, 16}, {64, 128}, {48, 80}, {112, 2064}, {1040, 272}, {32, 96}, {528, 1056}};

std::vector<QuantSpec> all_specs() {
  std::vector<QuantSpec> specs;
  for (Rounding rounding : {Rounding::kNearestEven, Rounding::kStochastic}) {
    for (bool columnwise : {false, true}) {
      for (bool rht : {false, true}) {
        QuantSpec s;
        s.rounding = rounding;
        s.columnwise = columnwise;
        s.rht = rht;
        s.seed = fresh_seed();
        s.stream = 3;
        s.format = Format::kNvfp4;
        s.block = Block::k1x16;
        specs.push_back(s);
        s.format = Format::kMxfp4;
        s.block = Block::k1x32;
        specs.push_back(s);
        if (!rht) {
          s.format = Format::kNvfp4;
          s.block = Block::k16x16;
          specs.push_back(s);
        }
        s.format = Format::kFp8E4M3;
        s.block = Block::kTensor;
        specs.push_back(s);
        s.format = Format::kFp8E5M2;
        specs.push_back(s);
      }
    }
  }
  return specs;
}

bool shape_ok(const QuantSpec& s, Shape sh) {
  try {
    validate(s, sh.rows, sh.cols);
  } catch (const std::invalid_argument&) {
    return false;
  }
  return true;
}

TEST(CudaQuantize, GenericPathEqualsCpuBitForBit) {
  std::mt19937_64 rng(fresh_seed());
  int compared = 0;
  for (Shape sh : kShapes) {
    for (Dist dist : {Dist::kGaussianOutliers, Dist::kUniform, Dist::kTiny, Dist::kSparseBlocks}) {
      const std::vector<float> xf = draw(sh.rows, sh.cols, dist, rng);
      const std::vector<bf16_t> xb = test::to_bf16(xf);
      for (const QuantSpec& s : all_specs()) {
        if (!shape_ok(s, sh)) continue;
        SCOPED_TRACE(describe(s) + " " + std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + " dist " +
                     std::to_string(static_cast<int>(dist)));
        EXPECT_TRUE(same_bits(quantize(std::span<const float>(xf), sh.rows, sh.cols, s),
                              cuda::quantize_on_gpu(std::span<const float>(xf), sh.rows, sh.cols, s)))
            << "float input";
        EXPECT_TRUE(same_bits(quantize(std::span<const bf16_t>(xb), sh.rows, sh.cols, s),
                              cuda::quantize_on_gpu(std::span<const bf16_t>(xb), sh.rows, sh.cols, s)))
            << "bf16 input";
        compared += 2;
        if (s.block == Block::k16x16) {  // quantize_on_gpu takes the 16x16 kernel for RNE: the generic one too
          EXPECT_TRUE(same_bits(quantize(std::span<const float>(xf), sh.rows, sh.cols, s),
                                cuda::quantize_on_gpu_generic(std::span<const float>(xf), sh.rows, sh.cols, s)))
              << "float input, generic kernels";
          EXPECT_TRUE(same_bits(quantize(std::span<const bf16_t>(xb), sh.rows, sh.cols, s),
                                cuda::quantize_on_gpu_generic(std::span<const bf16_t>(xb), sh.rows, sh.cols, s)))
              << "bf16 input, generic kernels";
          compared += 2;
        }
      }
    }
  }
  std::printf("generic path: %d quantizations compared bit for bit\n", compared);
  EXPECT_GT(compared, 500);
}

using test::fused_pass_spec;

// Every case of the fused-pass tests below: shapes x distributions x RHT x each side's rounding,
// fn(shape, x as float, x as BF16, spec) under a trace naming the case; each spec's seed is
// fresh_seed() ^ salt.
template <typename Fn>
void for_each_fused_case(std::mt19937_64& rng, uint64_t salt, Fn fn) {
  for (Shape sh : kShapes) {
    for (Dist dist : {Dist::kGaussianOutliers, Dist::kUniform, Dist::kTiny, Dist::kSparseBlocks, Dist::kWideBlocks}) {
      const std::vector<float> xf = draw(sh.rows, sh.cols, dist, rng);
      const std::vector<bf16_t> xb = test::to_bf16(xf);
      for (bool rht : {false, true}) {
        for (Rounding rr : {Rounding::kNearestEven, Rounding::kStochastic}) {
          for (Rounding cr : {Rounding::kNearestEven, Rounding::kStochastic}) {
            SCOPED_TRACE(std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + " dist " +
                         std::to_string(static_cast<int>(dist)) + " rht " + std::to_string(rht) + " row " +
                         std::string(rounding_name(rr)) + " col " + std::string(rounding_name(cr)));
            fn(sh, xf, xb, fused_pass_spec(rht, rr, cr, fresh_seed() ^ salt));
          }
        }
      }
    }
  }
}

// Both copies of the fused pass on x (BF16 and float) against the CPU reference; returns the number
// of copies compared.
int check_fused(const std::vector<float>& xf, const std::vector<bf16_t>& xb, Shape sh, const cuda::RowColSpec& spec) {
  const auto [row_b, col_b] = cuda::quantize_rowcol_on_gpu(std::span<const bf16_t>(xb), sh.rows, sh.cols, spec);
  EXPECT_TRUE(same_bits(quantize(std::span<const bf16_t>(xb), sh.rows, sh.cols, cuda::row_spec(spec)), row_b));
  EXPECT_TRUE(same_bits(quantize(std::span<const bf16_t>(xb), sh.rows, sh.cols, cuda::col_spec(spec)), col_b));
  const auto [row_f, col_f] = cuda::quantize_rowcol_on_gpu(std::span<const float>(xf), sh.rows, sh.cols, spec);
  EXPECT_TRUE(same_bits(quantize(std::span<const float>(xf), sh.rows, sh.cols, cuda::row_spec(spec)), row_f));
  EXPECT_TRUE(same_bits(quantize(std::span<const float>(xf), sh.rows, sh.cols, cuda::col_spec(spec)), col_f));
  return 4;
}

TEST(CudaQuantize, FusedRowColEqualsCpuBitForBit) {
  std::mt19937_64 rng(fresh_seed() + 1);
  int compared = 0;
  for_each_fused_case(rng, 0x1234, [&](Shape sh, const std::vector<float>& xf, const std::vector<bf16_t>& xb,
                                       const cuda::RowColSpec& spec) {
    compared += check_fused(xf, xb, sh, spec);
  });
  std::printf("fused path: %d quantized copies compared bit for bit\n", compared);
}

// Tensors of more tiles than the GPU holds blocks at once, so that each block of the fused pass's
// persistent grid loops over several tiles (the small shapes above give one tile per block), with
// partial tiles at both edges, and of whole tiles only (BF16 input: the kernels without the
// partial-tile checks, full_tiles).
TEST(CudaQuantize, FusedRowColLoopsOverTilesBitForBit) {
  std::mt19937_64 rng(fresh_seed() + 5);
  const Shape shapes[] = {{2064, 4112}, {4160, 1296}, {2048, 4224}};
  int compared = 0;
  for (Shape sh : shapes) {
    const std::vector<float> xf = draw(sh.rows, sh.cols, Dist::kGaussianOutliers, rng);
    const std::vector<bf16_t> xb = test::to_bf16(xf);
    for (bool sr : {false, true}) {
      const Rounding r = sr ? Rounding::kStochastic : Rounding::kNearestEven;
      const cuda::RowColSpec spec = fused_pass_spec(true, r, r, fresh_seed() ^ 0x5678);
      SCOPED_TRACE(std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + (sr ? " sr" : " rne"));
      compared += check_fused(xf, xb, sh, spec);
    }
  }
  std::printf("fused path, many tiles: %d quantized copies compared bit for bit\n", compared);
}

TEST(CudaQuantize, FusedSidesCanBeSwitchedOff) {
  std::mt19937_64 rng(fresh_seed() + 2);
  const std::vector<float> x = draw(96, 160, Dist::kGaussianOutliers, rng);
  cuda::RowColSpec spec;
  spec.columnwise = false;
  const auto [row, col] = cuda::quantize_rowcol_on_gpu(std::span<const float>(x), 96, 160, spec);
  EXPECT_TRUE(same_bits(quantize(std::span<const float>(x), 96, 160, cuda::row_spec(spec)), row));
  spec.columnwise = true;
  spec.rowwise = false;
  spec.col_rht = true;
  const auto [row2, col2] = cuda::quantize_rowcol_on_gpu(std::span<const float>(x), 96, 160, spec);
  EXPECT_TRUE(same_bits(quantize(std::span<const float>(x), 96, 160, cuda::col_spec(spec)), col2));
}

TEST(CudaQuantize, NonFiniteAndZeroTensorsMatchCpu) {
  std::mt19937_64 rng(fresh_seed() + 3);
  for (float poison : {NAN, INFINITY, -INFINITY}) {
    std::vector<float> x = draw(64, 96, Dist::kUniform, rng);
    x[std::uniform_int_distribution<size_t>(0, x.size() - 1)(rng)] = poison;
    for (const QuantSpec& s : all_specs()) {
      SCOPED_TRACE(describe(s) + " poison " + std::to_string(poison));
      const QuantizedTensor cpu = quantize(std::span<const float>(x), 64, 96, s);
      EXPECT_TRUE(same_bits(cpu, cuda::quantize_on_gpu(std::span<const float>(x), 64, 96, s)));
      if (s.format != Format::kMxfp4) {
        EXPECT_FALSE(cpu.finite());
      }
    }
    cuda::RowColSpec spec;
    spec.col_rht = true;
    const auto [row, col] = cuda::quantize_rowcol_on_gpu(std::span<const float>(x), 64, 96, spec);
    EXPECT_TRUE(same_bits(quantize(std::span<const float>(x), 64, 96, cuda::row_spec(spec)), row));
    EXPECT_TRUE(same_bits(quantize(std::span<const float>(x), 64, 96, cuda::col_spec(spec)), col));
    EXPECT_FALSE(row.finite());
  }
  const std::vector<float> zeros(64 * 96, 0.0f);
  for (const QuantSpec& s : all_specs()) {
    EXPECT_TRUE(same_bits(quantize(std::span<const float>(zeros), 64, 96, s),
                          cuda::quantize_on_gpu(std::span<const float>(zeros), 64, 96, s)))
        << describe(s);
  }
}

// The fused pass's decoded output against the BF16 decode of its packed output.
::testing::AssertionResult decoded_matches(const QuantizedTensor& q, const std::vector<uint16_t>& decoded) {
  const std::vector<uint16_t> expected = test::nvfp4_decoded_bf16(q);
  if (decoded.size() != expected.size())
    return ::testing::AssertionFailure() << "decoded size " << decoded.size() << ", expected " << expected.size();
  for (size_t i = 0; i < expected.size(); ++i)
    if (decoded[i] != expected[i])
      return ::testing::AssertionFailure() << "decoded element " << i << " (row " << i / q.cols << ", col "
                                           << i % q.cols << "): expected 0x" << std::hex << expected[i] << ", got 0x"
                                           << decoded[i];
  return ::testing::AssertionSuccess();
}

// A GEMM alpha the pass wrote against the float product of the two decode scales (NaN when the
// tensor is not finite).
::testing::AssertionResult alpha_matches(float alpha, float decode_scale, float partner) {
  const float want = decode_scale * partner;
  if (float_bits(alpha) == float_bits(want) || (std::isnan(want) && std::isnan(alpha)))
    return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "alpha " << alpha << ", expected " << want;
}

// The pass with decoded output and GEMM alphas: packed copies unchanged from the pass without
// them, decoded values equal to decoding those copies, alphas the products of the decode scales;
// and the same decoded values and alphas from the pass that writes no packed copies.
// `what` names the case in failure messages.
template <typename T>
void check_decoded_pass(const std::vector<T>& x, int64_t rows, int64_t cols, const cuda::RowColSpec& spec,
                        const char* what) {
  SCOPED_TRACE(what);
  cuda::RowColExtras dec;
  dec.row_partner = 0.625f;
  dec.col_partner = 3.1e-5f;
  const auto [row, col] = cuda::quantize_rowcol_on_gpu(std::span<const T>(x), rows, cols, spec, &dec);
  const auto [row0, col0] = cuda::quantize_rowcol_on_gpu(std::span<const T>(x), rows, cols, spec);
  // The decoded values alone (no packed codes or scales written): the same values and alphas.
  cuda::RowColExtras only = dec;
  only.packed = false;
  cuda::quantize_rowcol_on_gpu(std::span<const T>(x), rows, cols, spec, &only);
  EXPECT_TRUE(only.row == dec.row && only.col == dec.col) << "decoded values without the packed copies";
  EXPECT_EQ(float_bits(only.row_alpha), float_bits(dec.row_alpha));
  EXPECT_EQ(float_bits(only.col_alpha), float_bits(dec.col_alpha));
  if (spec.rowwise) {
    EXPECT_TRUE(same_bits(row0, row)) << "rowwise copy changed by the decoded output";
    EXPECT_TRUE(decoded_matches(row, dec.row)) << "rowwise";
    EXPECT_TRUE(alpha_matches(dec.row_alpha, row.decode_scale, dec.row_partner)) << "rowwise";
  } else {
    EXPECT_TRUE(dec.row.empty());
  }
  if (spec.columnwise) {
    EXPECT_TRUE(same_bits(col0, col)) << "columnwise copy changed by the decoded output";
    EXPECT_TRUE(decoded_matches(col, dec.col)) << "columnwise";
    EXPECT_TRUE(alpha_matches(dec.col_alpha, col.decode_scale, dec.col_partner)) << "columnwise";
  } else {
    EXPECT_TRUE(dec.col.empty());
  }
}

TEST(CudaQuantize, FusedDecodedOutputEqualsDecodedPackedBitForBit) {
  std::mt19937_64 rng(fresh_seed() + 6);
  int cases = 0;
  for_each_fused_case(rng, 0x9ABC, [&](Shape sh, const std::vector<float>& xf, const std::vector<bf16_t>& xb,
                                       const cuda::RowColSpec& spec) {
    check_decoded_pass(xb, sh.rows, sh.cols, spec, "bf16 input");
    check_decoded_pass(xf, sh.rows, sh.cols, spec, "float input");
    cases += 2;
  });
  std::printf("fused path with decoded output: %d cases compared bit for bit\n", cases);
}

// Each side alone, and non-finite and all-zero tensors (decoded values all zero). Small enough for
// compute-sanitizer (scripts/device_check.sh).
TEST(CudaQuantize, FusedDecodedOutputSidesAndSpecialTensors) {
  std::mt19937_64 rng(fresh_seed() + 7);
  const std::vector<float> x = draw(96, 160, Dist::kGaussianOutliers, rng);
  for (bool rht : {false, true}) {
    cuda::RowColSpec spec;
    spec.col_rht = rht;
    spec.rht_signs = rht_signs_from_seed(rng());
    spec.columnwise = false;
    check_decoded_pass(x, 96, 160, spec, "rowwise only");
    check_decoded_pass(test::to_bf16(x), 96, 160, spec, "rowwise only, bf16");
    spec.columnwise = true;
    spec.rowwise = false;
    check_decoded_pass(x, 96, 160, spec, "columnwise only");
    check_decoded_pass(test::to_bf16(x), 96, 160, spec, "columnwise only, bf16");
  }


  cuda::RowColSpec spec;
  spec.col_rht = true;
  for (float poison : {NAN, INFINITY, -INFINITY}) {
    std::vector<float> p = draw(64, 96, Dist::kUniform, rng);
    p[std::uniform_int_distribution<size_t>(0, p.size() - 1)(rng)] = poison;
    cuda::RowColExtras dec;
    cuda::quantize_rowcol_on_gpu(std::span<const float>(p), 64, 96, spec, &dec);
    for (const auto* side : {&dec.row, &dec.col})
      for (size_t i = 0; i < side->size(); ++i) ASSERT_EQ((*side)[i], 0) << "poison " << poison << " element " << i;
    check_decoded_pass(p, 64, 96, spec, "non-finite");
  }
  const std::vector<float> zeros(64 * 96, 0.0f);
  cuda::RowColExtras dec;
  cuda::quantize_rowcol_on_gpu(std::span<const float>(zeros), 64, 96, spec, &dec);
  for (const auto* side : {&dec.row, &dec.col})
    for (size_t i = 0; i < side->size(); ++i) ASSERT_EQ((*side)[i], 0) << "zeros, element " << i;
  check_decoded_pass(zeros, 64, 96, spec, "all zero");
}

// A grid whose blocks loop over several tiles (with the next tile's loads in flight on the
// stochastic-rounding variants): partial tiles at both edges, and whole tiles only (full_tiles).
TEST(CudaQuantize, FusedDecodedOutputLoopsOverTiles) {
  std::mt19937_64 rng(fresh_seed() + 8);
  for (Shape sh : {Shape{2064, 4112}, Shape{2048, 4224}}) {
    SCOPED_TRACE(std::to_string(sh.rows) + "x" + std::to_string(sh.cols));
    const std::vector<float> x = draw(sh.rows, sh.cols, Dist::kGaussianOutliers, rng);
    const std::vector<bf16_t> xb = test::to_bf16(x);
    for (bool sr : {false, true}) {
      const Rounding r = sr ? Rounding::kStochastic : Rounding::kNearestEven;
      const cuda::RowColSpec spec = fused_pass_spec(true, r, r, rng());
      check_decoded_pass(xb, sh.rows, sh.cols, spec, sr ? "bf16, sr" : "bf16, rne");
      check_decoded_pass(x, sh.rows, sh.cols, spec, sr ? "float, sr" : "float, rne");
    }
  }
}

// The NVFP4 16x16 weight kernel (W alone, W^T alone, and both from one pass) against the CPU
// reference and the generic kernels, on input T (float or bf16_t) of shape rows x cols.
template <typename T>
int check_tile16(const std::vector<T>& x, int64_t rows, int64_t cols) {
  const std::span<const T> in(x);
  const QuantSpec w_spec = make_spec(Format::kNvfp4, Block::k16x16);
  const QuantSpec t_spec = make_spec(Format::kNvfp4, Block::k16x16, Rounding::kNearestEven, /*columnwise=*/true);
  EXPECT_TRUE(cuda::nvfp4_tile16_applies(w_spec) && cuda::nvfp4_tile16_applies(t_spec));
  const QuantizedTensor cpu_w = quantize(in, rows, cols, w_spec), cpu_t = quantize(in, rows, cols, t_spec);
  const auto [w, wt] = cuda::quantize_tile16_pair_on_gpu(in, rows, cols);
  EXPECT_TRUE(same_bits(cpu_w, w)) << "W from the pair pass";
  EXPECT_TRUE(same_bits(cpu_t, wt)) << "W^T from the pair pass";
  EXPECT_TRUE(same_bits(cpu_w, cuda::quantize_on_gpu(in, rows, cols, w_spec))) << "W alone";
  EXPECT_TRUE(same_bits(cpu_t, cuda::quantize_on_gpu(in, rows, cols, t_spec))) << "W^T alone";
  // The pair equals two separate quantizations by the generic kernels.
  EXPECT_TRUE(same_bits(cuda::quantize_on_gpu_generic(in, rows, cols, w_spec), w)) << "W vs generic";
  EXPECT_TRUE(same_bits(cuda::quantize_on_gpu_generic(in, rows, cols, t_spec), wt)) << "W^T vs generic";
  return 6;
}

// Shapes with every remainder of rows mod 32 and of cols mod 64 (the kernel's 32 x 64 warp tiles),
// and tile scales over E4M3's whole range (kWideBlocks: subnormal and zero scales, saturation).
TEST(CudaQuantize, Tile16KernelEqualsCpuBitForBit) {
  std::mt19937_64 rng(fresh_seed() + 6);
  std::vector<Shape> shapes(std::begin(kShapes), std::end(kShapes));
  shapes.push_back({96, 176});
  shapes.push_back({160, 48});
  int compared = 0;
  for (Shape sh : shapes) {
    for (Dist dist : {Dist::kGaussianOutliers, Dist::kUniform, Dist::kTiny, Dist::kSparseBlocks, Dist::kWideBlocks}) {
      SCOPED_TRACE(std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + " dist " +
                   std::to_string(static_cast<int>(dist)));
      const std::vector<float> xf = draw(sh.rows, sh.cols, dist, rng);
      compared += check_tile16(xf, sh.rows, sh.cols);
      compared += check_tile16(test::to_bf16(xf), sh.rows, sh.cols);
    }
  }
  std::printf("16x16 kernel: %d quantized copies compared bit for bit\n", compared);
}

// More warp tiles than the GPU holds warps at once, so that each warp of the persistent grid loops.
TEST(CudaQuantize, Tile16KernelLoopsOverWarpTilesBitForBit) {
  std::mt19937_64 rng(fresh_seed() + 7);
  for (Shape sh : {Shape{2064, 4112}, Shape{4160, 1296}}) {
    SCOPED_TRACE(std::to_string(sh.rows) + "x" + std::to_string(sh.cols));
    const std::vector<float> xf = draw(sh.rows, sh.cols, Dist::kWideBlocks, rng);
    check_tile16(xf, sh.rows, sh.cols);
    check_tile16(test::to_bf16(xf), sh.rows, sh.cols);
  }
}

// Many weights in one call of nvfp4_quantize_tile16_jobs (33: more than one launch takes), each with
// W's and W^T's packed copies and W's decoded values, give each weight its own call's bits (which the
// tests above hold to the CPU reference), and the CPU reference's W; a job with nothing to write is
// skipped, and a bad job refused.
TEST(CudaQuantize, Tile16JobsGiveEachWeightItsOwnCallsBits) {
  std::mt19937_64 rng(fresh_seed() + 10);
  struct Weight {
    int64_t rows, cols;
    std::vector<float> x;
    cuda::DeviceBuffer<float> dx;
    cuda::DeviceBuffer<uint32_t> amax{1};
    cuda::DeviceBuffer<uint8_t> data[2][2], scales[2][2];  // [batched, alone][W, W^T]
    cuda::DeviceBuffer<uint16_t> decoded[2];
    cuda::DeviceBuffer<float> g[2][2];
  };
  std::vector<Weight> ws(33);
  std::vector<cuda::Tile16Job> jobs;
  std::uniform_int_distribution<int64_t> tiles(1, 9);
  const QuantSpec w_spec = make_spec(Format::kNvfp4, Block::k16x16);
  for (Weight& w : ws) {
    w.rows = 16 * tiles(rng), w.cols = 16 * tiles(rng);
    const size_t n = static_cast<size_t>(w.rows * w.cols);
    w.x = draw(w.rows, w.cols, &w == &ws[5] ? Dist::kWideBlocks : Dist::kGaussianOutliers, rng);
    w.dx = cuda::DeviceBuffer<float>(std::span<const float>(w.x));
    cuda::quantize_amax(w.dx.data(), w.rows, w.cols, w_spec, w.amax.data(), nullptr);
    cuda::QuantBuffers out[2][2];
    for (int v = 0; v < 2; ++v) {
      for (int side = 0; side < 2; ++side) {
        w.data[v][side] = cuda::DeviceBuffer<uint8_t>(n / 2);
        w.scales[v][side] = cuda::DeviceBuffer<uint8_t>(n / 256);
        w.g[v][side] = cuda::DeviceBuffer<float>(1);
        out[v][side] = {w.data[v][side].data(), w.scales[v][side].data(), w.g[v][side].data()};
      }
      w.decoded[v] = cuda::DeviceBuffer<uint16_t>(n);
      out[v][0].decoded = w.decoded[v].data();
    }
    jobs.push_back({w.dx.data(), w.rows, w.cols, w.amax.data(), out[0][0], out[0][1]});
    cuda::nvfp4_quantize_tile16(w.dx.data(), w.rows, w.cols, w.amax.data(), out[1][0], out[1][1], nullptr);
  }
  jobs.push_back({ws[0].dx.data(), ws[0].rows, ws[0].cols, ws[0].amax.data(), {}, {}});  // nothing to write
  cuda::nvfp4_quantize_tile16_jobs(jobs, nullptr);
  NIBBLE_CUDA_CHECK(cudaDeviceSynchronize());
  for (size_t i = 0; i < ws.size(); ++i) {
    Weight& w = ws[i];
    SCOPED_TRACE("weight " + std::to_string(i) + ", " + std::to_string(w.rows) + "x" + std::to_string(w.cols));
    for (int side = 0; side < 2; ++side) {
      EXPECT_EQ(w.data[0][side].download(), w.data[1][side].download()) << "codes, side " << side;
      EXPECT_EQ(w.scales[0][side].download(), w.scales[1][side].download()) << "scales, side " << side;
      EXPECT_EQ(std::bit_cast<uint32_t>(w.g[0][side].download()[0]), std::bit_cast<uint32_t>(w.g[1][side].download()[0]));
    }
    EXPECT_EQ(w.decoded[0].download(), w.decoded[1].download()) << "W's decoded values";
    const QuantizedTensor cpu = quantize(std::span<const float>(w.x), w.rows, w.cols, w_spec);
    EXPECT_EQ(w.data[0][0].download(), cpu.data);
    EXPECT_EQ(w.scales[0][0].download(), cpu.scales);
  }
  std::vector<cuda::Tile16Job> bad = {jobs[0]};
  bad[0].cols = 40;  // not a multiple of 16
  EXPECT_THROW(cuda::nvfp4_quantize_tile16_jobs(bad, nullptr), std::invalid_argument);
}

TEST(CudaQuantize, Tile16KernelNonFiniteAndZeroTensors) {
  std::mt19937_64 rng(fresh_seed() + 8);
  for (float poison : {NAN, INFINITY, -INFINITY}) {
    SCOPED_TRACE("poison " + std::to_string(poison));
    std::vector<float> x = draw(80, 208, Dist::kUniform, rng);
    x[std::uniform_int_distribution<size_t>(0, x.size() - 1)(rng)] = poison;
    check_tile16(x, 80, 208);
    check_tile16(test::to_bf16(x), 80, 208);
    EXPECT_FALSE(cuda::quantize_tile16_pair_on_gpu(std::span<const float>(x), 80, 208).second.finite());
  }
  const std::vector<float> zeros(80 * 208, 0.0f);
  check_tile16(zeros, 80, 208);
  EXPECT_EQ(cuda::quantize_tile16_pair_on_gpu(std::span<const float>(zeros), 80, 208).first.decode_scale,
            1.0f / FLT_MAX);
}

// An input that is not 16-byte aligned: quantize_amax + quantize_segments fall back to the generic
// kernels (same bits); the 16x16 kernel itself refuses it.
TEST(CudaQuantize, Tile16UnalignedInputTakesTheGenericKernels) {
  std::mt19937_64 rng(fresh_seed() + 9);
  const int64_t rows = 64, cols = 96, n = rows * cols;
  const std::vector<float> x = draw(rows, cols, Dist::kGaussianOutliers, rng);
  const QuantSpec spec = make_spec(Format::kNvfp4, Block::k16x16);
  float* dx = nullptr;
  uint8_t *data = nullptr, *scales = nullptr;
  float* g = nullptr;
  uint32_t* amax = nullptr;
  ASSERT_EQ(cudaMalloc(&dx, (n + 1) * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&data, n / 2), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&scales, n / 256), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&g, sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&amax, sizeof(uint32_t)), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dx + 1, x.data(), n * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  const cuda::QuantBuffers out{data, scales, g};
  EXPECT_THROW(cuda::nvfp4_quantize_tile16(dx + 1, rows, cols, amax, out, cuda::QuantBuffers{}, nullptr),
               std::invalid_argument);
  cuda::quantize_amax(dx + 1, rows, cols, spec, amax, nullptr);
  cuda::quantize_segments(dx + 1, rows, cols, spec, amax, out, nullptr);
  QuantizedTensor q = quantize(std::span<const float>(x), rows, cols, spec);
  const QuantizedTensor cpu = q;
  uint32_t amax_bits = 0;
  ASSERT_EQ(cudaMemcpy(q.data.data(), data, q.data.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(q.scales.data(), scales, q.scales.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(&q.decode_scale, g, sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(&amax_bits, amax, sizeof(uint32_t), cudaMemcpyDeviceToHost), cudaSuccess);
  q.amax = std::bit_cast<float>(amax_bits);
  EXPECT_TRUE(same_bits(cpu, q));
  // Decoded values are the fused 1x16 pass's alone: asked of either 16x16 kernel, a refusal, not silence.
  cuda::QuantBuffers with_decoded = out;
  with_decoded.decoded = reinterpret_cast<uint16_t*>(dx);  // never written: the call throws first
  EXPECT_THROW(cuda::quantize_segments(dx, rows, cols, spec, amax, with_decoded, nullptr), std::invalid_argument);
  EXPECT_THROW(cuda::quantize_segments(dx + 1, rows, cols, spec, amax, with_decoded, nullptr), std::invalid_argument);
  cuda::QuantBuffers with_alpha = out;  // so are GEMM alphas
  with_alpha.alpha_partner = g;
  with_alpha.alpha = reinterpret_cast<float*>(dx);
  EXPECT_THROW(cuda::quantize_segments(dx, rows, cols, spec, amax, with_alpha, nullptr), std::invalid_argument);
  for (void* p : {static_cast<void*>(dx), static_cast<void*>(data), static_cast<void*>(scales), static_cast<void*>(g),
                  static_cast<void*>(amax)})
    cudaFree(p);
}

TEST(CudaQuantize, DequantizeEqualsCpuBitForBit) {
  std::mt19937_64 rng(fresh_seed() + 4);
  const std::vector<float> x = draw(128, 2080, Dist::kGaussianOutliers, rng);
  for (const QuantSpec& s : all_specs()) {
    SCOPED_TRACE(describe(s));
    const QuantizedTensor q = quantize(std::span<const float>(x), 128, 2080, s);
    const std::vector<float> cpu = dequantize(q), gpu = cuda::dequantize_on_gpu(q);
    ASSERT_EQ(cpu.size(), gpu.size());
    EXPECT_EQ(std::memcmp(cpu.data(), gpu.data(), cpu.size() * sizeof(float)), 0);
  }
}

TEST(CudaQuantize, RejectsShapesItCannotQuantize) {
  const std::vector<float> x(40 * 24, 1.0f);
  EXPECT_THROW(cuda::quantize_rowcol_on_gpu(std::span<const float>(x), 40, 24, cuda::RowColSpec{}), std::invalid_argument);
  QuantSpec s;
  EXPECT_THROW(cuda::quantize_on_gpu(std::span<const float>(x), 40, 24, s), std::invalid_argument);
  // Only the fused pass writes decoded values.
  uint16_t decoded = 0;
  EXPECT_THROW(cuda::quantize_segments(static_cast<const float*>(nullptr), 32, 32, s, nullptr,
                                       cuda::QuantBuffers{nullptr, nullptr, nullptr, &decoded}, nullptr),
               std::invalid_argument);

  EXPECT_THROW(cuda::quantize_tile16_pair_on_gpu(std::span<const float>(x), 40, 24), std::invalid_argument);
  EXPECT_THROW(cuda::quantize_tile16_pair_on_gpu(std::span<const float>(x), 24, 40), std::invalid_argument);
}

}  // namespace
}  // namespace nibble
