// Runs the LayerNorm / RMSNorm backward kernels (src/nibble/nn/cuda/norm_kernels.cuh) on the CPU,
// without a GPU: the header compiled as host C++, every CUDA thread of a block a std::thread (blocks
// one after another), warp shuffles and block barriers emulated, the dynamic shared memory filled
// with NaNs at each launch. It holds the vector-row backward that also makes the parameter-gradient
// partials (norm_backward_params_vec_kernel) to the strided kernels it replaced for such rows:
// - dx (and its BF16 copy) to norm_backward_kernel: the same double expressions per element; the
//   row sums s1, s2 are added in another order, so the two agree to a few float ulps, not bit for bit;
// - the partials to norm_param_partials_kernel's double sums over the same 64-row chunks: the new
//   kernel adds each warp's 8 rows in FP32 first (relative error about 8 x 2^-24 of the terms);
// - the finished gradients (norm_param_finish_kernel over them) to double sums over all rows.
// Shapes: a partial last chunk, GPT-2's width with a bias and FP32 dy, RMSNorm (no bias) with BF16
// dy and accumulate, and 1024 wide (64 KiB of shared memory). Two cases also compute the fused
// NVFP4 pass's amax over dx16 (with and without the RHT; one with a partial last chunk of 16 rows),
// checked against the CPU's maxima over dx16. The ThreadSanitizer build runs the
// first case: without the block barrier before the cross-warp sums, it reports the race.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "test_seed.h"

// ---------------------------------------------------------------- the emulated device

namespace emu {
alignas(16) unsigned char shared[128 * 1024];  // the dynamic shared memory
}  // namespace emu

#include "cuda_emulation/emulated_kernel_syntax.h"

inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

namespace nibble::nn::cuda {
namespace {
float4* dynamic_sums() { return reinterpret_cast<float4*>(emu::shared); }
}  // namespace
}  // namespace nibble::nn::cuda

namespace nibble::cuda {
namespace {
// max.NaN.f32 of m and |v| (amax_device.cuh): the inputs here are finite.
float fmax_abs_nan(float m, float v) { return std::max(m, std::fabs(v)); }
}  // namespace
}  // namespace nibble::cuda

#define NIBBLE_NORM_HOST_EMULATION
#define NIBBLE_ROWCOL_HOST_EMULATION
#include "../../src/nibble/nn/cuda/norm_kernels.cuh"
#include "nibble/quant/rht.h"
#include "cuda_emulation/amax_reference.h"

namespace emu {

// Runs kernel() as every thread of every block of `grid`, `threads` a block, one block after
// another; `shared_bytes` of dynamic shared memory, NaN-filled (no kernel may read what it did not write).
template <typename Kernel>
void launch(dim3 grid, unsigned threads, size_t shared_bytes, Kernel kernel) {
  if (shared_bytes > sizeof(shared)) throw std::runtime_error("emulated shared memory too small");
  std::memset(shared, 0xff, sizeof(shared));
  block_dim = {threads, 1, 1};
  run_grid(grid, threads, start_block, kernel);
}

}  // namespace emu

namespace nibble::nn::cuda {
namespace {

struct Case {
  int64_t rows, dim;
  bool centered, bf16_dy, accumulate, bf16_xhat;  // bf16_xhat: the rows a forward with BF16 output saves
  enum Amax { kNone, kPlain, kRht } amax = kNone;  // the fused NVFP4 pass's amax over dx16
};

std::vector<float> normal(std::mt19937_64& rng, int64_t n, float scale) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}

// The values as T: FP32 as they are, BF16 rounded to nearest even.
template <typename T>
std::vector<T> as(const std::vector<float>& values) {
  if constexpr (std::is_same_v<T, float>) {
    return values;
  } else {
    std::vector<T> out(values.size());
    for (size_t i = 0; i < values.size(); ++i)
      out[i].bits = static_cast<uint16_t>(BF16::encode(values[i], Rounding::kNearestEven));
    return out;
  }
}

// The words nvfp4_amax gives for y [rows x dim] (amax_reference.h).
std::pair<uint32_t, uint32_t> amax_words(const std::vector<bf16_t>& y, int64_t rows, int64_t dim, bool rht,
                                         const RhtSigns& signs) {
  const auto at = [&](int64_t r, int64_t c) { return to_float(y[static_cast<size_t>(r * dim + c)]); };
  return nibble::test::amax_words(rows, dim, at, rht, signs);
}

template <typename DyT, typename XhT>
void check_case(const Case& k, std::mt19937_64& rng) {
  SCOPED_TRACE(std::to_string(k.rows) + " x " + std::to_string(k.dim) + (k.centered ? " LayerNorm" : " RMSNorm") +
               (k.bf16_dy ? ", BF16 dy" : "") + (k.accumulate ? ", accumulate" : "") +
               (k.bf16_xhat ? ", BF16 rows" : "") +
               (k.amax == Case::kNone ? "" : k.amax == Case::kRht ? ", amax with RHT" : ", amax"));
  const int64_t n = k.rows * k.dim, chunks = (k.rows + kChunkRows - 1) / kChunkRows;
  const bool with_bias = k.centered;
  const std::vector<DyT> dy = as<DyT>(normal(rng, n, 1.0f));
  const std::vector<XhT> xhat = as<XhT>(normal(rng, n, 1.0f));
  const std::vector<float> weight = normal(rng, k.dim, 1.0f);
  std::vector<float> rstd = normal(rng, k.rows, 1.0f);
  for (float& r : rstd) r = 0.5f + std::fabs(r);
  const std::vector<float> dx0 = normal(rng, n, 1.0f);  // what accumulate adds onto

  // The strided kernels: dx, then the partials.
  std::vector<float> dx_ref = dx0;
  std::vector<bf16_t> dx16_ref(static_cast<size_t>(n));
  std::vector<double> partials_ref(static_cast<size_t>(2 * chunks * k.dim), NAN);
  double* pw_ref = partials_ref.data();
  double* pb_ref = pw_ref + chunks * k.dim;
  emu::launch(dim3(static_cast<unsigned>((k.rows + kRowsPerBlock - 1) / kRowsPerBlock)), kRowThreads, 0, [&] {
    norm_backward_kernel<DyT, XhT>(dy.data(), xhat.data(), rstd.data(), weight.data(), k.rows, k.dim, k.centered,
                              k.accumulate, dx_ref.data(), dx16_ref.data());
  });
  emu::launch(dim3(static_cast<unsigned>((k.dim + 127) / 128), static_cast<unsigned>(chunks)), 128, 0, [&] {
    norm_param_partials_kernel<DyT, XhT>(dy.data(), xhat.data(), k.rows, k.dim, with_bias, pw_ref, pb_ref);
  });

  // The vector kernel with the partials.
  std::vector<float> dx = dx0;
  std::vector<bf16_t> dx16(static_cast<size_t>(n));
  std::vector<double> partials(static_cast<size_t>(2 * chunks * k.dim), NAN);
  double* pw = partials.data();
  double* pb = pw + chunks * k.dim;
  const size_t smem = static_cast<size_t>((with_bias ? 2 : 1) * kRowsPerBlock * k.dim) * sizeof(float);
  uint32_t words[4] = {0, 0, 0xDEADBEEFu, 0xDEADBEEFu};
  nibble::cuda::ProducerAmax amax;
  if (k.amax != Case::kNone) {
    amax.slots = {words, words + 2};
    amax.col_rht = k.amax == Case::kRht;
    amax.rht_signs = rht_signs_from_seed(rng());
  }
  emu::launch(dim3(static_cast<unsigned>(chunks)), kRowThreads, smem, [&] {
    norm_backward_params_vec_kernel<DyT, XhT>(dy.data(), xhat.data(), rstd.data(), weight.data(), k.rows, k.dim,
                                         k.centered, k.accumulate, dx.data(), dx16.data(), with_bias, pw, pb, amax);
  });
  if (k.amax != Case::kNone) {  // the words of nvfp4_amax over dx16, the next slot zeroed
    const auto [row_word, col_word] = amax_words(dx16, k.rows, k.dim, amax.col_rht, amax.rht_signs);
    EXPECT_EQ(words[0], row_word) << "rowwise amax";
    EXPECT_EQ(words[1], col_word) << "columnwise amax";
    EXPECT_EQ(words[2], 0u);
    EXPECT_EQ(words[3], 0u);
  }

  // dx: the same per-element double expression, the row sums in another order.
  int64_t dx_wrong = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float tol = 4e-7f * (std::fabs(dx_ref[i]) + 1.0f);
    if (!(std::fabs(dx[i] - dx_ref[i]) <= tol) && dx_wrong++ < 3)
      ADD_FAILURE() << "dx " << i << ": " << dx[i] << " vs " << dx_ref[i];
    const uint16_t want16 = static_cast<uint16_t>(BF16::encode(dx[i], Rounding::kNearestEven));
    if (dx16[i].bits != want16 && dx_wrong++ < 3) ADD_FAILURE() << "dx16 " << i << " is not dx rounded";
  }
  EXPECT_EQ(dx_wrong, 0);

  // Partials: FP32 sums of 8 rows, then double, against double sums; bound by the sum of |terms|.
  int64_t p_wrong = 0;
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t col = 0; col < k.dim; ++col) {
      double abs_w = 0.0, abs_b = 0.0;
      for (int64_t r = c * kChunkRows; r < std::min(k.rows, (c + 1) * kChunkRows); ++r) {
        const double d = to_float(dy[static_cast<size_t>(r * k.dim + col)]);
        abs_w += std::fabs(d * to_float(xhat[static_cast<size_t>(r * k.dim + col)]));
        abs_b += std::fabs(d);
      }
      const int64_t i = c * k.dim + col;
      if (!(std::fabs(pw[i] - pw_ref[i]) <= 1e-6 * abs_w) && p_wrong++ < 3)
        ADD_FAILURE() << "weight partial, chunk " << c << " column " << col << ": " << pw[i] << " vs " << pw_ref[i];
      if (with_bias && !(std::fabs(pb[i] - pb_ref[i]) <= 1e-6 * abs_b) && p_wrong++ < 3)
        ADD_FAILURE() << "bias partial, chunk " << c << " column " << col << ": " << pb[i] << " vs " << pb_ref[i];
    }
  EXPECT_EQ(p_wrong, 0);

  // The finished gradients (norm_param_finish_kernel over the new partials) against double sums
  // over all rows.
  std::vector<float> gw(static_cast<size_t>(k.dim), 0.0f), gb(static_cast<size_t>(k.dim), 0.0f);
  emu::launch(dim3(static_cast<unsigned>((k.dim + 31) / 32)), 32 * kFinishWarps, 0, [&] {
    norm_param_finish_kernel(NormFinishJob{pw, pb, chunks, k.dim, gw.data(), with_bias ? gb.data() : nullptr});
  });
  int64_t g_wrong = 0;
  for (int64_t col = 0; col < k.dim; ++col) {
    double sw = 0.0, sb = 0.0, abs_w = 0.0, abs_b = 0.0;
    for (int64_t r = 0; r < k.rows; ++r) {
      const double d = to_float(dy[static_cast<size_t>(r * k.dim + col)]);
      const double h = to_float(xhat[static_cast<size_t>(r * k.dim + col)]);
      sw += d * h;
      abs_w += std::fabs(d * h);
      sb += d;
      abs_b += std::fabs(d);
    }
    // 1e-6 of the terms for the FP32 sums of 8, 1e-7 of the result for its rounding to float.
    if (!(std::fabs(gw[col] - sw) <= 1e-6 * abs_w + 1e-7 * std::fabs(sw)) && g_wrong++ < 3)
      ADD_FAILURE() << "weight gradient " << col << ": " << gw[col] << " vs " << sw;
    if (with_bias && !(std::fabs(gb[col] - sb) <= 1e-6 * abs_b + 1e-7 * std::fabs(sb)) && g_wrong++ < 3)
      ADD_FAILURE() << "bias gradient " << col << ": " << gb[col] << " vs " << sb;
  }
  EXPECT_EQ(g_wrong, 0);
}

void check(const Case& k, std::mt19937_64& rng) {
  if (k.bf16_dy) {
    if (k.bf16_xhat) check_case<bf16_t, bf16_t>(k, rng);
    else check_case<bf16_t, float>(k, rng);
  } else {
    if (k.bf16_xhat) check_case<float, bf16_t>(k, rng);
    else check_case<float, float>(k, rng);
  }
}

// Several norms' parameter gradients finished in one launch (NormCuda::finish_deferred) get the bits
// of one launch each: GPT-2's width with a bias and 256 chunks, a narrow RMSNorm (no bias) of 3
// chunks, and a wider one, onto gradients already there.
TEST(NormEmulation, FinishJobsGiveTheSingleFinishBits) {
  std::mt19937_64 rng(test::fresh_seed());
  struct Shape {
    int64_t dim, chunks;
    bool bias;
  };
  const std::vector<Shape> shapes = {{768, 256, true}, {100, 3, false}, {1024, 17, true}};
  std::vector<std::vector<double>> partials;
  std::vector<std::vector<float>> start, single, batched;  // per shape: weight gradient, then bias gradient
  NormFinishJobs jobs{};
  unsigned col_blocks = 0;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const Shape& sh = shapes[i];
    std::normal_distribution<double> d(0.0, 1.0);
    std::vector<double> p(static_cast<size_t>(2 * sh.chunks * sh.dim));
    for (double& v : p) v = d(rng);
    partials.push_back(std::move(p));
    start.push_back(normal(rng, 2 * sh.dim, 1.0f));
    single.push_back(start.back());
    batched.push_back(start.back());
    col_blocks = std::max(col_blocks, static_cast<unsigned>((sh.dim + 31) / 32));
  }
  const auto job = [&](size_t i, std::vector<float>& g) {
    const Shape& sh = shapes[i];
    const double* pw = partials[i].data();
    return NormFinishJob{pw, pw + sh.chunks * sh.dim, sh.chunks, sh.dim, g.data(), sh.bias ? g.data() + sh.dim : nullptr};
  };
  for (size_t i = 0; i < shapes.size(); ++i) {
    const NormFinishJob one = job(i, single[i]);
    emu::launch(dim3(static_cast<unsigned>((shapes[i].dim + 31) / 32)), 32 * kFinishWarps, 0,
                [&] { norm_param_finish_kernel(one); });
    jobs.job[i] = job(i, batched[i]);
  }
  emu::launch(dim3(col_blocks, static_cast<unsigned>(shapes.size())), 32 * kFinishWarps, 0,
              [&] { norm_param_finish_jobs_kernel(jobs); });
  for (size_t i = 0; i < shapes.size(); ++i) {
    EXPECT_EQ(0, std::memcmp(single[i].data(), batched[i].data(), single[i].size() * sizeof(float))) << "norm " << i;
    const auto dim = static_cast<size_t>(shapes[i].dim);
    EXPECT_NE(batched[i][dim - 1], start[i][dim - 1]) << "norm " << i << ": the last column was finished";
    if (!shapes[i].bias) {
      EXPECT_TRUE(std::equal(batched[i].begin() + dim, batched[i].end(), start[i].begin() + dim)) << "no bias";
    }
  }
}

TEST(NormEmulation, BackwardWithPartialsMatchesTheStridedKernels) {
  std::mt19937_64 rng(test::fresh_seed());
  check(Case{111, 768, true, false, false, false}, rng);  // a partial last chunk (47 rows)
  // The GPU model's case (BF16 dy and rows), with the amax over a partial last chunk (16 rows).
  check(Case{80, 768, true, true, true, true, Case::kRht}, rng);
#ifndef NIBBLE_NORM_EMULATION_TSAN
  check(Case{128, 256, false, true, true, false, Case::kPlain}, rng);
  check(Case{70, 1024, true, true, false, false}, rng);
  check(Case{111, 768, true, false, false, true}, rng);
  check(Case{96, 1024, false, true, true, true}, rng);
#endif
}

// The forward kernels save the normalized rows in their output's precision: with BF16 output, the
// rows and y are the FP32-output kernel's rounded to nearest even (the same FP32 values, rounded
// once), and the FP32 rows are (x - mean) * rstd (double statistics of the row) rounded to float.
void check_forward_rows(int64_t rows, int64_t dim, bool centered, bool vector, std::mt19937_64& rng) {
  SCOPED_TRACE(std::to_string(rows) + " x " + std::to_string(dim) + (centered ? " LayerNorm" : " RMSNorm") +
               (vector ? ", vector kernel" : ", strided kernel"));
  const int64_t n = rows * dim;
  std::vector<float> x = normal(rng, n, 2.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < dim; ++i) x[static_cast<size_t>(r * dim + i)] += static_cast<float>(r % 5);
  const std::vector<float> weight = normal(rng, dim, 1.0f), bias = normal(rng, dim, 0.5f);
  const float* b = centered ? bias.data() : nullptr;
  const auto run = [&]<typename Out>(std::vector<Out>& y, std::vector<Out>& xhat, std::vector<float>& rstd) {
    y.resize(static_cast<size_t>(n)), xhat.resize(static_cast<size_t>(n)), rstd.resize(static_cast<size_t>(rows));
    emu::launch(dim3(static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock)), kRowThreads, 0, [&] {
      const auto kernel = vector ? norm_forward_vec_kernel<Out> : norm_forward_kernel<Out>;
      kernel(x.data(), rows, dim, centered, 1e-5f, weight.data(), b, y.data(), xhat.data(), rstd.data());
    });
  };
  std::vector<float> y32, xhat32, rstd32, rstd16;
  std::vector<bf16_t> y16, xhat16;
  run(y32, xhat32, rstd32);
  run(y16, xhat16, rstd16);
  EXPECT_EQ(0, std::memcmp(rstd16.data(), rstd32.data(), rstd32.size() * sizeof(float)));
  const std::vector<bf16_t> y_rounded = as<bf16_t>(y32), xhat_rounded = as<bf16_t>(xhat32);
  int64_t wrong = 0;
  for (int64_t r = 0; r < rows; ++r) {
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < dim; ++i) mean += centered ? x[static_cast<size_t>(r * dim + i)] : 0.0;
    mean /= static_cast<double>(dim);
    for (int64_t i = 0; i < dim; ++i) var += std::pow(x[static_cast<size_t>(r * dim + i)] - mean, 2);
    const double rstd = 1.0 / std::sqrt(var / static_cast<double>(dim) + 1e-5);
    for (int64_t i = 0; i < dim; ++i) {
      const size_t e = static_cast<size_t>(r * dim + i);
      const double want = (x[e] - mean) * rstd;
      if (!(std::fabs(xhat32[e] - want) <= 1e-6 * (std::fabs(want) + 1.0)) && wrong++ < 3)
        ADD_FAILURE() << "FP32 row " << r << ", element " << i << ": " << xhat32[e] << " vs " << want;
      if ((xhat16[e].bits != xhat_rounded[e].bits || y16[e].bits != y_rounded[e].bits) && wrong++ < 3)
        ADD_FAILURE() << "BF16 row " << r << ", element " << i << ": not the FP32 kernel's values rounded";
    }
  }
  EXPECT_EQ(wrong, 0);
}

TEST(NormEmulation, ForwardSavesTheRowsInTheOutputsPrecision) {
  std::mt19937_64 rng(test::fresh_seed());
  check_forward_rows(37, 96, true, false, rng);
  check_forward_rows(40, 768, true, true, rng);
  check_forward_rows(24, 256, false, true, rng);
  check_forward_rows(19, 768, false, false, rng);
}

// The vector forward with BF16 output that also computes the fused NVFP4 pass's amax
// (norm_forward_vec_amax_kernel: 16 warps a block, the rows staged in shared memory): y, xhat and
// rstd equal to the plain vector kernel's, and the two words equal to the maxima over its y: max |y|
// and, with the RHT, max |rht16(16-row column block)| (quant/rht.h, the CPU reference), the next
// slot zeroed.
void check_forward_amax(int64_t rows, int64_t dim, bool centered, bool rht, std::mt19937_64& rng) {
  SCOPED_TRACE(std::to_string(rows) + " x " + std::to_string(dim) + (centered ? " LayerNorm" : " RMSNorm") +
               (rht ? ", RHT" : ""));
  const int64_t n = rows * dim;
  std::vector<float> x = normal(rng, n, 2.0f);
  x[static_cast<size_t>(n / 3)] = 60.0f;  // an outlier
  const std::vector<float> weight = normal(rng, dim, 1.0f), bias = normal(rng, dim, 0.5f);
  const float* b = centered ? bias.data() : nullptr;
  std::vector<bf16_t> y_ref(static_cast<size_t>(n)), y(static_cast<size_t>(n));
  std::vector<bf16_t> xhat_ref(static_cast<size_t>(n)), xhat(static_cast<size_t>(n));
  std::vector<float> rstd_ref(static_cast<size_t>(rows)), rstd(static_cast<size_t>(rows));
  emu::launch(dim3(static_cast<unsigned>(rows / kRowsPerBlock)), kRowThreads, 0, [&] {
    norm_forward_vec_kernel<bf16_t>(x.data(), rows, dim, centered, 1e-5f, weight.data(), b, y_ref.data(),
                                    xhat_ref.data(), rstd_ref.data());
  });
  uint32_t words[4] = {0, 0, 0xDEADBEEFu, 0xDEADBEEFu};
  nibble::cuda::ProducerAmax amax;
  amax.slots = {words, words + 2};
  amax.col_rht = rht;
  amax.rht_signs = rht_signs_from_seed(rng());
  emu::launch(dim3(static_cast<unsigned>(rows / kAmaxRows)), 32 * kAmaxRows, 0, [&] {
    norm_forward_vec_amax_kernel(x.data(), dim, centered, 1e-5f, weight.data(), b, y.data(), xhat.data(), rstd.data(),
                                 amax);
  });
  int64_t wrong = 0;
  for (int64_t i = 0; i < n; ++i)
    if ((y[i].bits != y_ref[i].bits || xhat[i].bits != xhat_ref[i].bits) && wrong++ < 3)
      ADD_FAILURE() << "element " << i << ": y " << y[i].bits << " vs " << y_ref[i].bits;
  EXPECT_EQ(wrong, 0);
  EXPECT_EQ(0, std::memcmp(rstd.data(), rstd_ref.data(), rstd.size() * sizeof(float)));
  const auto [row_word, col_word] = amax_words(y_ref, rows, dim, rht, amax.rht_signs);
  EXPECT_EQ(words[0], row_word);
  EXPECT_EQ(words[1], col_word);
  EXPECT_EQ(words[2], 0u);
  EXPECT_EQ(words[3], 0u);
}

TEST(NormEmulation, ForwardComputesTheNvfp4PassAmax) {
  std::mt19937_64 rng(test::fresh_seed());
  check_forward_amax(48, 768, true, true, rng);
#ifndef NIBBLE_NORM_EMULATION_TSAN
  check_forward_amax(32, 1024, false, true, rng);
  check_forward_amax(32, 256, true, false, rng);
#endif
}

}  // namespace
}  // namespace nibble::nn::cuda
