// GemmRunner's kernel tuning: on the first call of a shape it times cuBLASLt's candidates and keeps
// the fastest of those giving the heuristic's first choice's bits. The tuned runner must give the
// untuned one's bits (so results never depend on timings), leave an accumulated C as it found it,
// and compute the product (against a double GEMM). Shapes with a long K and a small output are
// where cuBLASLt lists split-K kernels, whose different order of additions the tuner must refuse.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/cuda_test_util.h"
#include "nibble/formats/minifloat.h"
#include "nibble/tensor/cuda/device_buffer.h"
#include "nibble/tensor/cuda/gemm_cuda.h"
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
using nibble::test::fresh_seed;

struct TuneCase {
  int64_t m, n, k, batch;
  bool ta, tb;
  GemmType in, out;
  bool accumulate;
};

// Operand values exact in the input type; the device copy holds its codes.
struct Operand {
  std::vector<float> values;
  std::vector<uint8_t> bytes;
};

Operand random_operand(std::mt19937_64& rng, size_t count, GemmType type) {
  Operand o;
  o.values = nn::test::random_normal(rng, static_cast<int64_t>(count), 1.0f);
  const size_t width = type == GemmType::kF32 ? 4 : type == GemmType::kBF16 ? 2 : 1;
  o.bytes.resize(count * width);
  for (size_t i = 0; i < count; ++i) {
    float& v = o.values[i];
    if (type == GemmType::kBF16) {
      const uint16_t code = BF16::encode(v, Rounding::kNearestEven);
      v = BF16::decode(code);
      std::memcpy(&o.bytes[2 * i], &code, 2);
    } else if (type == GemmType::kE4M3) {
      o.bytes[i] = E4M3::encode(v, Rounding::kNearestEven);
      v = E4M3::decode(o.bytes[i]);
    } else {
      std::memcpy(&o.bytes[4 * i], &v, 4);
    }
  }
  return o;
}

class GemmTuneTest : public ::testing::TestWithParam<TuneCase> {};

TEST_P(GemmTuneTest, GivesTheUntunedBits) {
  const TuneCase c = GetParam();
  GemmRunner tuned, untuned(false);
  ASSERT_TRUE(tuned.tunes()) << "NIBBLE_GEMM_TUNE=0 is set: this test checks the tuner and needs it on";
  std::mt19937_64 rng(fresh_seed());
  // Stored shapes: A [m x k] ([k x m] transposed), B [k x n] ([n x k] transposed), C [m x n].
  const size_t a_count = c.m * c.k, b_count = c.k * c.n, c_count = c.m * c.n;
  const Operand a = random_operand(rng, a_count * c.batch, c.in), b = random_operand(rng, b_count * c.batch, c.in);
  const Operand c0 = random_operand(rng, c_count * c.batch, c.out);
  DeviceBuffer<uint8_t> d_a{std::span<const uint8_t>(a.bytes)}, d_b{std::span<const uint8_t>(b.bytes)};
  const GemmMatrix ma{d_a.data(), c.in, c.ta, static_cast<int64_t>(a_count)};
  const GemmMatrix mb{d_b.data(), c.in, c.tb, static_cast<int64_t>(b_count)};

  std::vector<std::vector<uint8_t>> results;
  for (GemmRunner* runner : {&untuned, &tuned, &tuned}) {  // the second tuned call uses the kept choice
    DeviceBuffer<uint8_t> d_c{std::span<const uint8_t>(c0.bytes)};
    runner->run(c.m, c.n, c.k, ma, mb, GemmOutput{d_c.data(), c.out, static_cast<int64_t>(c_count)}, nullptr,
                c.accumulate, nullptr, c.batch);
    results.push_back(download(d_c.data(), static_cast<int64_t>(c0.bytes.size())));
  }
  EXPECT_TRUE(results[1] == results[0]) << "the tuning call's result differs from the untuned runner's";
  EXPECT_TRUE(results[2] == results[0]) << "the tuned kernel's result differs from the untuned runner's";

  // The product itself: |C - C_double| <= 2 k u sum |a b| (+ |C0| when accumulating, + the output's
  // rounding), u = 2^-24, or 2^-14 for FP8 tensor cores (about 14 bits between promotions to FP32,
  // docs/numerics.md "GEMMs").
  const double u = std::ldexp(1.0, c.in == GemmType::kE4M3 ? -14 : -24);
  const double out_rel = c.out == GemmType::kBF16 ? std::ldexp(1.0, -8) : 0.0;
  int failures = 0;
  for (int64_t t = 0; t < c.batch; ++t)
    for (int64_t i = 0; i < c.m; ++i)
      for (int64_t j = 0; j < c.n; ++j) {
        double sum = 0, mag = 0;
        for (int64_t l = 0; l < c.k; ++l) {
          const double x = a.values[t * a_count + (c.ta ? l * c.m + i : i * c.k + l)];
          const double y = b.values[t * b_count + (c.tb ? j * c.k + l : l * c.n + j)];
          sum += x * y, mag += std::fabs(x * y);
        }
        const size_t at = t * c_count + i * c.n + j;
        if (c.accumulate) sum += c0.values[at], mag += std::fabs(c0.values[at]);
        float got = 0;
        if (c.out == GemmType::kF32) {
          std::memcpy(&got, &results[2][4 * at], 4);
        } else {
          uint16_t code = 0;
          std::memcpy(&code, &results[2][2 * at], 2);
          got = BF16::decode(code);
        }
        const double tol = 2.0 * static_cast<double>(c.k + 1) * u * mag + out_rel * std::fabs(sum) + 1e-30;
        if (!(std::fabs(got - sum) <= tol) && ++failures <= 3)
          ADD_FAILURE() << "C[" << t << "][" << i << "][" << j << "] = " << got << ", double " << sum << ", bound "
                        << tol;
      }
  EXPECT_EQ(failures, 0);
}

std::string tune_case_name(const ::testing::TestParamInfo<TuneCase>& info) {
  const TuneCase& c = info.param;
  auto type = [](GemmType t) { return t == GemmType::kF32 ? "f32" : t == GemmType::kBF16 ? "bf16" : "e4m3"; };
  char name[128];
  std::snprintf(name, sizeof(name), "m%lld_n%lld_k%lld_b%lld%s%s_%s_to_%s%s", static_cast<long long>(c.m),
                static_cast<long long>(c.n), static_cast<long long>(c.k), static_cast<long long>(c.batch),
                c.ta ? "_At" : "", c.tb ? "_Bt" : "", type(c.in), type(c.out), c.accumulate ? "_acc" : "");
  return name;
}

// Fprop with the residual added (FP32 C), a long K (split-K land), Wgrad's and Dgrad's layouts, FP8,
// a batch, and FP32 operands of odd sizes.
constexpr GemmType kBf16 = GemmType::kBF16, kF32 = GemmType::kF32;
INSTANTIATE_TEST_SUITE_P(Shapes, GemmTuneTest,
                         ::testing::Values(TuneCase{512, 384, 768, 1, false, true, kBf16, kF32, true},
                                           TuneCase{64, 64, 8192, 1, false, true, kBf16, kBf16, false},
                                           TuneCase{96, 256, 4096, 1, true, false, kBf16, kF32, true},
                                           TuneCase{256, 128, 512, 1, false, false, kBf16, kBf16, false},
                                           TuneCase{128, 256, 1024, 1, false, true, GemmType::kE4M3, kF32, false},
                                           TuneCase{128, 64, 64, 3, false, true, kBf16, kF32, true},
                                           TuneCase{200, 72, 40, 1, false, false, kF32, kF32, true}),
                         tune_case_name);

// The GELU epilogues (GELU_AUX in the Fprop layout, DGELU in the Dgrad layout): a tuned runner gives
// the untuned one's bits in C and in the GELU input it writes (the values themselves are checked
// against GELU's tanh form in linear_cuda_test.cpp); what the epilogues do not take is refused.
TEST(GemmRunner, GeluEpiloguesTunedGiveTheUntunedBits) {
  std::mt19937_64 rng(fresh_seed());
  const int64_t m = 256, n = 384, k = 512;
  const Operand a = random_operand(rng, m * k, kBf16), b = random_operand(rng, n * k, kBf16);
  const Operand pre = random_operand(rng, m * n, kBf16);
  DeviceBuffer<uint8_t> da{std::span<const uint8_t>(a.bytes)}, db{std::span<const uint8_t>(b.bytes)};
  const auto halfwords = [](const DeviceBuffer<uint16_t>& v) {
    return download(v.data(), static_cast<int64_t>(v.size()));
  };
  for (const bool forward : {true, false}) {
    std::vector<uint16_t> outputs[2][2];  // [untuned, tuned][C, aux]
    for (int tuned = 0; tuned < 2; ++tuned) {
      GemmRunner runner(tuned == 1);
      DeviceBuffer<uint16_t> c(static_cast<size_t>(m * n));
      DeviceBuffer<uint8_t> aux{std::span<const uint8_t>(pre.bytes)};  // written (forward) or read
      const GemmMatrix ma{da.data(), kBf16, false}, mb{db.data(), kBf16, forward};  // B [n x k] or [k x n]
      GemmOutput out{c.data(), kBf16};
      out.epilogue = forward ? cuda::GemmEpilogue::kGeluAux : cuda::GemmEpilogue::kGeluGrad;
      out.aux = aux.data();
      for (int call = 0; call < 2; ++call) runner.run(m, n, k, ma, mb, out, nullptr, false, nullptr);
      outputs[tuned][0] = halfwords(c);
      outputs[tuned][1] = download(reinterpret_cast<const uint16_t*>(aux.data()), m * n);
      if (tuned == 0) {
        GemmOutput f32{c.data(), kF32, 0, out.epilogue, aux.data()};
        EXPECT_THROW(runner.run(m, n, k, ma, mb, f32, nullptr, false, nullptr), std::invalid_argument);
        EXPECT_THROW(runner.run(m, n, k, ma, mb, out, nullptr, /*accumulate=*/true, nullptr), std::invalid_argument);
        EXPECT_THROW(runner.run(m, n - 4, k, ma, mb, out, nullptr, false, nullptr), std::invalid_argument);
        GemmOutput no_aux = out;
        no_aux.aux = nullptr;
        EXPECT_THROW(runner.run(m, n, k, ma, mb, no_aux, nullptr, false, nullptr), std::invalid_argument);
      }
    }
    EXPECT_EQ(outputs[0][0], outputs[1][0]) << (forward ? "GELU_AUX" : "DGELU") << " C";
    EXPECT_EQ(outputs[0][1], outputs[1][1]) << (forward ? "GELU_AUX" : "DGELU") << " aux";
    if (!forward) {
      std::vector<uint16_t> pre_codes(static_cast<size_t>(m * n));
      std::memcpy(pre_codes.data(), pre.bytes.data(), pre.bytes.size());
      EXPECT_EQ(outputs[0][1], pre_codes) << "DGELU reads its GELU input and leaves it";
    }
  }
}

}  // namespace
}  // namespace nibble
