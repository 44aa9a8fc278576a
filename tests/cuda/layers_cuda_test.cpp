// The GPU high-precision layers (nn/cuda/layers_cuda.h, train/cuda/adamw_cuda.h) against the CPU
// classes, on fresh random inputs of awkward sizes (needs a GPU; ctest label "gpu").
//
// Error measure: max_i |gpu_i - cpu_i| / max_i |cpu_i| (normwise relative error), printed for
// every comparison with its tolerance. Where the GPU claims the CPU's bits (embedding, residual
// add, AdamW) the test asks for equality instead.
//
// The attention core and the MLP activation sit between two Linear layers in the CPU classes. To
// compare the core alone, the CPU layer runs under the fp32 recipe with inputs that make both
// linears exact copies: X holds one-hot rows (row r = e_r, so X W^T returns W's column r and the
// weight gradient dY^T X returns dY's row r in column r) and the output layer's weight is the
// identity. Each such product has one non-zero term, so it is exact in any summation order.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "nibble/formats/minifloat.h"
#include "nibble/nn/attention.h"
#include "nibble/nn/cuda/attention_flash.cuh"
#include "nibble/nn/cuda/layers_cuda.h"
#include "nibble/nn/embedding.h"
#include "nibble/nn/loss.h"
#include "nibble/nn/mlp.h"
#include "nibble/nn/norm.h"
#include "nibble/tensor/cuda/gemm_cuda.h"
#include "nibble/train/cuda/adamw_cuda.h"
#include "nibble/train/optimizer.h"
#include "cuda/cuda_test_util.h"
#include "model/attention_bf16_tolerance.h"
#include "nn/nn_test_util.h"
#include "test_seed.h"

namespace nibble::nn {
namespace {

using cuda::DeviceBuffer;
using nibble::test::fresh_seed;

using nibble::test::download;
template <typename T>
void upload(T* device, const std::vector<T>& host) {
  NIBBLE_CUDA_CHECK(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
}

// Normwise relative error, printed; fails the test when above `tol`.
void expect_close(std::span<const float> gpu, std::span<const float> cpu, double tol, const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  double err = 0.0, scale = 0.0;
  size_t worst = 0;
  bool nan = false;
  for (size_t i = 0; i < cpu.size(); ++i) {
    const double e = std::fabs(static_cast<double>(gpu[i]) - cpu[i]);
    if (std::isnan(e)) {
      if (!nan) worst = i;
      nan = true;
    } else if (e > err && !nan) {
      err = e, worst = i;
    }
    scale = std::max(scale, std::fabs(static_cast<double>(cpu[i])));
  }
  ASSERT_GT(scale, 0.0) << what << ": the reference is all zeros";
  const double rel = nan ? std::nan("") : err / scale;
  std::printf("[ compare  ] %-44s max rel err %.3e (tol %.1e)\n", what.c_str(), rel, tol);
  EXPECT_LE(rel, tol) << what << ": worst element " << worst << " gpu " << gpu[worst] << " cpu " << cpu[worst];
}

// Root-mean-square relative error ||gpu - cpu||_2 / ||cpu||_2: a far steadier statistic than the
// maximum over elements, so it can be held to a tighter tolerance.
void expect_close_rms(std::span<const float> gpu, std::span<const float> cpu, double tol, const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  double err = 0.0, norm = 0.0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    const double e = static_cast<double>(gpu[i]) - cpu[i];
    err += e * e;
    norm += static_cast<double>(cpu[i]) * cpu[i];
  }
  ASSERT_GT(norm, 0.0) << what << ": the reference is all zeros";
  const double rel = std::sqrt(err / norm);
  std::printf("[ compare  ] %-44s rms rel err %.3e (tol %.1e)\n", what.c_str(), rel, tol);
  EXPECT_LE(rel, tol) << what;  // NaN fails too
}

void expect_bits_equal(std::span<const float> gpu, std::span<const float> cpu, const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < cpu.size(); ++i)
    if (std::memcmp(&gpu[i], &cpu[i], sizeof(float)) != 0 && bad++ == 0) first = i;
  std::printf("[ compare  ] %-44s %zu of %zu elements differ in bits (want 0)\n", what.c_str(), bad, cpu.size());
  EXPECT_EQ(bad, 0u) << what << ": first at " << first << " gpu " << gpu[first] << " cpu " << cpu[first];
}

// Linear-layer probes of the module comment: X = one-hot rows, W[c][r] = values[r][c].
std::vector<float> one_hot_rows(int64_t rows, int64_t dim) {
  std::vector<float> x(static_cast<size_t>(rows * dim), 0.0f);
  for (int64_t r = 0; r < rows; ++r) x[r * dim + r] = 1.0f;
  return x;
}
void plant(Linear& layer, const std::vector<float>& values, int64_t rows) {
  const int64_t out = layer.out_features(), in = layer.in_features();
  ASSERT_LE(rows, in);
  std::span<float> w = layer.mutable_weight();
  std::fill(w.begin(), w.end(), 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < out; ++c) w[c * in + r] = values[r * out + c];
}
std::vector<float> harvest_grad(const Linear& layer, int64_t rows) {  // dvalues[r][c] = dW[c][r]
  const int64_t out = layer.out_features(), in = layer.in_features();
  std::vector<float> d(static_cast<size_t>(rows * out));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < out; ++c) d[r * out + c] = layer.weight_grad()[c * in + r];
  return d;
}
void set_identity(Linear& layer) {
  ASSERT_EQ(layer.in_features(), layer.out_features());
  std::span<float> w = layer.mutable_weight();
  std::fill(w.begin(), w.end(), 0.0f);
  for (int64_t i = 0; i < layer.in_features(); ++i) w[i * layer.in_features() + i] = 1.0f;
}

class Stream {
 public:
  Stream() { NIBBLE_CUDA_CHECK(cudaStreamCreate(&s_)); }
  ~Stream() { cudaStreamDestroy(s_); }
  operator cudaStream_t() const { return s_; }

 private:
  cudaStream_t s_{};
};

// ---------------------------------------------------------------- embedding

TEST(EmbeddingCuda, MatchesCpuBitForBit) {
  std::mt19937_64 rng(fresh_seed());
  const int64_t vocab = 1000, dim = 96, n = 3 * 37;
  Stream stream;
  Embedding cpu(vocab, dim);
  cuda::EmbeddingCuda gpu(vocab, dim);
  const auto w = nibble::nn::test::random_normal(rng, vocab * dim, 1.0f);
  std::copy(w.begin(), w.end(), cpu.weight().begin());
  upload(gpu.weight(), w);
  // Half the ids from a small range, so that rows repeat and their gradients must add up.
  std::vector<uint32_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = static_cast<uint32_t>(rng() % 2 == 0 ? rng() % 7 : rng() % vocab);
  DeviceBuffer<uint32_t> d_ids{std::span<const uint32_t>(ids)};

  // forward, then forward with accumulate (learned positions add onto token embeddings)
  auto base = nibble::nn::test::random_normal(rng, n * dim, 1.0f);
  std::vector<float> out_cpu(base.size()), acc_cpu = base;
  cpu.forward(ids, out_cpu);
  cpu.forward(ids, acc_cpu, /*accumulate=*/true);
  DeviceBuffer<float> out(base.size()), acc{std::span<const float>(base)};
  gpu.forward(d_ids.data(), n, out.data(), false, stream);
  gpu.forward(d_ids.data(), n, acc.data(), true, stream);
  expect_bits_equal(download(out.data(), n * dim), out_cpu, "embedding forward");
  expect_bits_equal(download(acc.data(), n * dim), acc_cpu, "embedding forward (accumulate)");

  // two backward passes: the second adds onto the first
  cpu.zero_grad();
  gpu.zero_grad(stream);
  for (int pass = 0; pass < 2; ++pass) {
    const auto dout = nibble::nn::test::random_normal(rng, n * dim, 1.0f);
    cpu.backward(ids, dout);
    DeviceBuffer<float> d_dout{std::span<const float>(dout)};
    gpu.backward(d_ids.data(), n, d_dout.data(), stream);
  }
  const std::vector<float> grad_cpu(cpu.weight_grad().begin(), cpu.weight_grad().end());
  expect_bits_equal(download(gpu.weight_grad(), vocab * dim), grad_cpu, "embedding weight grad (2 passes)");
  EXPECT_NO_THROW(gpu.check_ids(stream));

  ids[17] = static_cast<uint32_t>(vocab);  // out of range: flagged, then thrown by check_ids
  d_ids.upload(ids);
  gpu.forward(d_ids.data(), n, out.data(), false, stream);
  EXPECT_THROW(gpu.check_ids(stream), std::out_of_range);
  EXPECT_NO_THROW(gpu.check_ids(stream));  // the flag is cleared after the throw
}

// A frequent token, as in real text: one id in about 60% of 1000 positions (runs of many batches of
// the scatter kernel, not a multiple of its batch), rows wider than a block has threads.
TEST(EmbeddingCuda, LongRunsAddInPositionOrder) {
  std::mt19937_64 rng(fresh_seed());
  const int64_t vocab = 50, dim = 1100, n = 1000;
  Stream stream;
  Embedding cpu(vocab, dim);
  cuda::EmbeddingCuda gpu(vocab, dim);
  std::vector<uint32_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = static_cast<uint32_t>(rng() % 5 < 3 ? 3 : rng() % vocab);
  DeviceBuffer<uint32_t> d_ids{std::span<const uint32_t>(ids)};
  const auto dout = nibble::nn::test::random_normal(rng, n * dim, 1.0f);
  cpu.zero_grad();
  gpu.zero_grad(stream);
  cpu.backward(ids, dout);
  DeviceBuffer<float> d_dout{std::span<const float>(dout)};
  gpu.backward(d_ids.data(), n, d_dout.data(), stream);
  const std::vector<float> grad_cpu(cpu.weight_grad().begin(), cpu.weight_grad().end());
  expect_bits_equal(download(gpu.weight_grad(), vocab * dim), grad_cpu, "embedding weight grad, long runs");
}

// The learned positions' backward without the sort: the CPU's bits for ids r % seq (rows p, seq + p,
// ... added in that order), onto gradients already there; a table longer than seq keeps its other
// rows; a seq beyond the table is rejected.
TEST(EmbeddingCuda, BackwardPositionsAddsTheBatchInPositionOrder) {
  std::mt19937_64 rng(fresh_seed());
  const int64_t rows = 40, dim = 300, seq = 37, batch = 5, n = batch * seq;
  Stream stream;
  Embedding cpu(rows, dim);
  cuda::EmbeddingCuda gpu(rows, dim);
  std::vector<uint32_t> ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ids[i] = static_cast<uint32_t>(i % seq);
  cpu.zero_grad();
  gpu.zero_grad(stream);
  for (int pass = 0; pass < 2; ++pass) {  // the second adds onto the first
    const auto dout = nibble::nn::test::random_normal(rng, n * dim, 1.0f);
    cpu.backward(ids, dout);
    DeviceBuffer<float> d_dout{std::span<const float>(dout)};
    gpu.backward_positions(batch, seq, d_dout.data(), stream);
  }
  const std::vector<float> grad_cpu(cpu.weight_grad().begin(), cpu.weight_grad().end());
  expect_bits_equal(download(gpu.weight_grad(), rows * dim), grad_cpu, "position embedding grad");
  DeviceBuffer<float> d_dout(static_cast<size_t>(n * dim));
  EXPECT_THROW(gpu.backward_positions(1, rows + 1, d_dout.data(), stream), std::invalid_argument);
}

// Token rows plus the learned positions' rows i % seq in one pass: the CPU's two passes bit for bit,
// at a width of 16-byte columns (96) and one of single columns (98), a table of positions longer
// than seq; bad ids flagged in the token table; a seq beyond the positions, or another width, rejected.
TEST(EmbeddingCuda, ForwardWithPositionsIsTheTwoPassesInOne) {
  std::mt19937_64 rng(fresh_seed());
  for (const int64_t dim : {96, 98}) {
    SCOPED_TRACE("dim " + std::to_string(dim));
    const int64_t vocab = 500, pos_rows = 40, batch = 3, seq = 37, n = batch * seq;
    Stream stream;
    Embedding cpu_tok(vocab, dim), cpu_pos(pos_rows, dim);
    cuda::EmbeddingCuda tok(vocab, dim), pos(pos_rows, dim);
    const auto w = nibble::nn::test::random_normal(rng, vocab * dim, 1.0f);
    const auto p = nibble::nn::test::random_normal(rng, pos_rows * dim, 1.0f);
    std::copy(w.begin(), w.end(), cpu_tok.weight().begin());
    std::copy(p.begin(), p.end(), cpu_pos.weight().begin());
    upload(tok.weight(), w);
    upload(pos.weight(), p);
    std::vector<uint32_t> ids(static_cast<size_t>(n)), positions(static_cast<size_t>(n));
    for (auto& id : ids) id = static_cast<uint32_t>(rng() % vocab);
    for (int64_t i = 0; i < n; ++i) positions[i] = static_cast<uint32_t>(i % seq);
    std::vector<float> want(static_cast<size_t>(n * dim));
    cpu_tok.forward(ids, want);
    cpu_pos.forward(positions, want, /*accumulate=*/true);
    DeviceBuffer<uint32_t> d_ids{std::span<const uint32_t>(ids)};
    DeviceBuffer<float> out(want.size());
    tok.forward_with_positions(d_ids.data(), batch, seq, pos, out.data(), stream);
    expect_bits_equal(download(out.data(), n * dim), want, "tokens + positions");
    EXPECT_NO_THROW(tok.check_ids(stream));

    ids[23] = static_cast<uint32_t>(vocab);
    d_ids.upload(ids);
    tok.forward_with_positions(d_ids.data(), batch, seq, pos, out.data(), stream);
    EXPECT_THROW(tok.check_ids(stream), std::out_of_range);
    EXPECT_THROW(tok.forward_with_positions(d_ids.data(), 1, pos_rows + 1, pos, out.data(), stream),
                 std::invalid_argument);
    cuda::EmbeddingCuda narrower(pos_rows, dim - 2);
    EXPECT_THROW(tok.forward_with_positions(d_ids.data(), batch, seq, narrower, out.data(), stream),
                 std::invalid_argument);
  }
}

// ---------------------------------------------------------------- norms

class NormCudaTest : public ::testing::TestWithParam<NormKind> {};

// Forward and dx: the same double statistics as the CPU; what differs is FMA contraction and the
// summation order inside double sums, ~1e-7 of the output's scale: tolerance 1e-5.
// Gain/bias gradients: the CPU adds rows one by one in float (error up to rows * 2^-24 of the sum
// of |terms|, ~7e-6 for 111 rows); the GPU sums in double: tolerance 5e-5.
// Random rows [rows x dim] for the norm tests, with row means (0 to 4) for the norm to remove.
std::vector<float> norm_test_rows(std::mt19937_64& rng, int64_t rows, int64_t dim) {
  auto x = nibble::nn::test::random_normal(rng, rows * dim, 2.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < dim; ++i) x[r * dim + i] += static_cast<float>(r % 5);
  return x;
}

void check_norm_against_cpu(NormKind kind, int64_t dim) {
  SCOPED_TRACE("dim " + std::to_string(dim));
  std::mt19937_64 rng(fresh_seed());
  const int64_t rows = 3 * 37;
  Stream stream;
  Norm cpu(dim, kind);
  cuda::NormCuda gpu(dim, kind);
  const auto g = nibble::nn::test::random_normal(rng, dim, 1.0f);
  std::copy(g.begin(), g.end(), cpu.weight().begin());
  upload(gpu.weight(), g);
  if (cpu.has_bias()) {
    const auto b = nibble::nn::test::random_normal(rng, dim, 1.0f);
    std::copy(b.begin(), b.end(), cpu.bias().begin());
    upload(gpu.bias(), b);
  }
  cpu.zero_grad();
  gpu.zero_grad(stream);
  DeviceBuffer<float> y(static_cast<size_t>(rows * dim)), dx(y.size());
  for (int pass = 0; pass < 2; ++pass) {  // gradients accumulate over two passes
    const auto x = norm_test_rows(rng, rows, dim);
    const auto dy = nibble::nn::test::random_normal(rng, rows * dim, 1.0f);
    const auto y_cpu = cpu.forward(x, rows);
    const auto dx_cpu = cpu.backward(dy);
    DeviceBuffer<float> d_x{std::span<const float>(x)}, d_dy{std::span<const float>(dy)};
    gpu.forward(d_x.data(), rows, y.data(), stream);
    gpu.backward(d_dy.data(), dx.data(), stream);
    const std::string p = " (pass " + std::to_string(pass + 1) + ")";
    expect_close(download(y.data(), rows * dim), y_cpu, 1e-5, "norm forward" + p);
    expect_close(download(dx.data(), rows * dim), dx_cpu, 1e-5, "norm dx" + p);
  }
  expect_close(download(gpu.weight_grad(), dim), cpu.weight_grad(), 5e-5, "norm gain grad");
  if (cpu.has_bias()) expect_close(download(gpu.bias_grad(), dim), cpu.bias_grad(), 5e-5, "norm bias grad");
}

// Widths: 96 takes the strided kernels, 768 the vector ones (rows of a multiple of 128 elements).
TEST_P(NormCudaTest, MatchesCpu) {
  for (const int64_t dim : {int64_t{96}, int64_t{768}}) check_norm_against_cpu(GetParam(), dim);
}

// nn::Norm's backward in double for x and dy, with the normalized rows rounded to BF16 to nearest
// even, as NormCuda saves them after a forward with BF16 output; adds the gain and bias gradients
// to gain and bias.
std::vector<float> norm_backward_bf16_rows(NormKind kind, const std::vector<float>& x, const std::vector<float>& dy,
                                           const std::vector<float>& weight, int64_t rows, int64_t dim,
                                           std::vector<double>& gain, std::vector<double>& bias) {
  const bool centered = kind == NormKind::kLayerNorm;
  std::vector<float> dx(x.size());
  std::vector<double> xh(static_cast<size_t>(dim));
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x.data() + r * dim;
    double mean = 0.0, var = 0.0;
    if (centered) {
      for (int64_t i = 0; i < dim; ++i) mean += xr[i];
      mean /= static_cast<double>(dim);
    }
    for (int64_t i = 0; i < dim; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    const double rstd = 1.0 / std::sqrt(var / static_cast<double>(dim) + 1e-5);
    double s1 = 0.0, s2 = 0.0;
    for (int64_t i = 0; i < dim; ++i) {
      const float h = static_cast<float>((xr[i] - mean) * rstd);
      xh[i] = BF16::decode(static_cast<uint16_t>(BF16::encode(h, Rounding::kNearestEven)));
      const double d = static_cast<double>(dy[r * dim + i]) * weight[i];
      s1 += d;
      s2 += d * xh[i];
      gain[i] += dy[r * dim + i] * xh[i];
      bias[i] += dy[r * dim + i];
    }
    const double m1 = centered ? s1 / static_cast<double>(dim) : 0.0, m2 = s2 / static_cast<double>(dim);
    for (int64_t i = 0; i < dim; ++i)
      dx[r * dim + i] = static_cast<float>(rstd * (static_cast<double>(dy[r * dim + i]) * weight[i] - m1 - xh[i] * m2));
  }
  return dx;
}

// After a forward with BF16 output (the GPU model's case) the rows are saved in BF16: backward as
// the CPU's formulas in double with those rows. Rounding the rows moves dx by 0.8-2.6e-4 and the
// gain gradient by 1.4-2.0e-3 here (rms relative, against FP32 rows; computed on the CPU), far
// above these tolerances; rows the GPU rounds the other way (its statistics add in another order, so
// an FP32 row value may differ by an ulp next to a BF16 tie) stay below them: with two of every
// three row values moved by an ulp at random, the CPU computation moved by at most 7e-7 and 5e-5.
TEST_P(NormCudaTest, Bf16OutputSavesTheRowsInBf16) {
  for (const int64_t dim : {int64_t{96}, int64_t{768}}) {  // the strided and the vector kernels
    SCOPED_TRACE("dim " + std::to_string(dim));
    std::mt19937_64 rng(fresh_seed());
    const int64_t rows = 3 * 37;
    Stream stream;
    cuda::NormCuda gpu(dim, GetParam());
    const auto g = nibble::nn::test::random_normal(rng, dim, 1.0f);
    upload(gpu.weight(), g);
    if (gpu.has_bias()) upload(gpu.bias(), nibble::nn::test::random_normal(rng, dim, 1.0f));
    gpu.zero_grad(stream);
    std::vector<double> gain(static_cast<size_t>(dim)), bias(static_cast<size_t>(dim));
    DeviceBuffer<bf16_t> y(static_cast<size_t>(rows * dim));
    DeviceBuffer<float> dx(y.size());
    for (int pass = 0; pass < 2; ++pass) {  // gradients accumulate over two passes
      const auto x = norm_test_rows(rng, rows, dim);
      const auto dy = nibble::nn::test::random_normal(rng, rows * dim, 1.0f);
      DeviceBuffer<float> d_x{std::span<const float>(x)}, d_dy{std::span<const float>(dy)};
      gpu.forward(d_x.data(), rows, y.data(), stream);
      gpu.backward(d_dy.data(), dx.data(), stream);
      const auto want = norm_backward_bf16_rows(GetParam(), x, dy, g, rows, dim, gain, bias);
      expect_close_rms(download(dx.data(), rows * dim), want, 1e-5, "norm dx from BF16 rows, pass " +
                                                                        std::to_string(pass + 1));
    }
    expect_close_rms(download(gpu.weight_grad(), dim), std::vector<float>(gain.begin(), gain.end()), 1e-4,
                     "norm gain grad from BF16 rows");
    if (gpu.has_bias())
      expect_close(download(gpu.bias_grad(), dim), std::vector<float>(bias.begin(), bias.end()), 5e-5,
                   "norm bias grad");
  }
}

// Norms whose parameter gradients are finished together (set_defer_param_finish, finish_deferred:
// one launch for all, as the GPU model runs them) get the bits of norms finishing their own, over two
// passes of each and at three widths (the strided kernels at 96, the vector ones at 768 and 1024);
// a second backward before the finish is refused.
TEST_P(NormCudaTest, DeferredParamFinishGivesTheSameBits) {
  std::mt19937_64 rng(fresh_seed());
  const int64_t rows = 3 * 37;
  Stream stream;
  std::vector<std::unique_ptr<cuda::NormCuda>> own, deferred;
  for (const int64_t dim : {int64_t{768}, int64_t{96}, int64_t{1024}}) {
    own.push_back(std::make_unique<cuda::NormCuda>(dim, GetParam()));
    deferred.push_back(std::make_unique<cuda::NormCuda>(dim, GetParam()));
    deferred.back()->set_defer_param_finish(true);
    const auto g = nibble::nn::test::random_normal(rng, dim, 1.0f), b = nibble::nn::test::random_normal(rng, dim, 1.0f);
    for (auto* n : {own.back().get(), deferred.back().get()}) {
      upload(n->weight(), g);
      if (n->has_bias()) upload(n->bias(), b);
      n->zero_grad(stream);
    }
  }
  std::vector<cuda::NormCuda*> batch;
  for (auto& n : deferred) batch.push_back(n.get());
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t i = 0; i < own.size(); ++i) {
      const int64_t dim = own[i]->dim();
      const auto x = norm_test_rows(rng, rows, dim);
      const auto dy = nibble::nn::test::random_normal(rng, rows * dim, 1.0f);
      DeviceBuffer<float> d_x{std::span<const float>(x)}, d_dy{std::span<const float>(dy)};
      DeviceBuffer<bf16_t> y(x.size());
      DeviceBuffer<float> dx(x.size());
      for (auto* n : {own[i].get(), deferred[i].get()}) {
        n->forward(d_x.data(), rows, y.data(), stream);
        n->backward(d_dy.data(), dx.data(), stream);
      }
      EXPECT_TRUE(deferred[i]->param_finish_pending());
      deferred[i]->forward(d_x.data(), rows, y.data(), stream);
      EXPECT_THROW(deferred[i]->backward(d_dy.data(), dx.data(), stream), std::logic_error);
    }
    cuda::NormCuda::finish_deferred(batch, stream);
  }
  for (size_t i = 0; i < own.size(); ++i) {
    const int64_t dim = own[i]->dim();
    EXPECT_FALSE(deferred[i]->param_finish_pending());
    expect_bits_equal(download(deferred[i]->weight_grad(), dim), download(own[i]->weight_grad(), dim), "gain grad");
    if (own[i]->has_bias())
      expect_bits_equal(download(deferred[i]->bias_grad(), dim), download(own[i]->bias_grad(), dim), "bias grad");
  }
}

// backward(accumulate = true) adds the same dx onto what the buffer holds, in one FP32 addition:
// the residual connection's gradient the GPU model adds there instead of in a separate pass.
TEST_P(NormCudaTest, BackwardAccumulatesTheSameDx) {
  for (const int64_t dim : {int64_t{160}, int64_t{1024}}) {  // the strided and the vector kernels
    SCOPED_TRACE("dim " + std::to_string(dim));
    std::mt19937_64 rng(fresh_seed());
    const int64_t rows = 2 * 41;
    Stream stream;
    cuda::NormCuda gpu(dim, GetParam());
    upload(gpu.weight(), nibble::nn::test::random_normal(rng, dim, 1.0f));
    const auto x = nibble::nn::test::random_normal(rng, rows * dim, 2.0f);
    const auto dy = nibble::nn::test::random_normal(rng, rows * dim, 1.0f);
    auto residual = nibble::nn::test::random_normal(rng, rows * dim, 1.0f);
    DeviceBuffer<float> d_x{std::span<const float>(x)}, d_dy{std::span<const float>(dy)};
    DeviceBuffer<float> y(x.size()), dx(x.size()), acc{std::span<const float>(residual)};
    gpu.forward(d_x.data(), rows, y.data(), stream);
    gpu.backward(d_dy.data(), dx.data(), stream);
    gpu.forward(d_x.data(), rows, y.data(), stream);
    gpu.backward(d_dy.data(), acc.data(), stream, /*accumulate=*/true);
    const auto g = download(dx.data(), rows * dim);
    for (size_t i = 0; i < residual.size(); ++i) residual[i] += g[i];
    expect_bits_equal(download(acc.data(), rows * dim), residual, "norm dx accumulated");
  }
}

// A producer's amax (nibble::cuda::ProducerAmax) against nvfp4_amax over the plain kernel's output.
// start() hands out fresh slots (the next slot poisoned); check() compares the producer's output with
// the plain kernel's bit for bit, the two words with nvfp4_amax's over the plain output, and checks
// that the next slot was zeroed. expected() holds nvfp4_amax's words after check().
class ProducerAmaxCheck {
 public:
  ProducerAmaxCheck() : slots_(4), want_(2) {}
  nibble::cuda::ProducerAmax start(bool rht, RhtSigns signs) {
    slots_.upload(std::vector<uint32_t>{0, 0, 0xDEADBEEFu, 0xDEADBEEFu});
    amax_.slots = {slots_.data(), slots_.data() + 2};
    amax_.col_rht = rht;
    amax_.rht_signs = signs;
    return amax_;
  }
  void check(const DeviceBuffer<bf16_t>& plain, const DeviceBuffer<bf16_t>& produced, int64_t rows, int64_t cols,
             cudaStream_t stream) {
    nibble::cuda::RowColSpec spec;
    spec.col_rht = amax_.col_rht;
    spec.rht_signs = amax_.rht_signs;
    nibble::cuda::nvfp4_amax(plain.data(), rows, cols, spec, want_.data(), stream);
    NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
    const std::vector<bf16_t> a = plain.download(), b = produced.download();
    ASSERT_TRUE(std::equal(a.begin(), a.end(), b.begin(), [](bf16_t x, bf16_t y) { return x.bits == y.bits; }))
        << "the output differs from the plain kernel's";
    const std::vector<uint32_t> got = slots_.download();
    expected_ = want_.download();
    EXPECT_EQ(got[0], expected_[0]) << "rowwise amax";
    EXPECT_EQ(got[1], expected_[1]) << "columnwise amax";
    EXPECT_EQ(got[2], 0u);
    EXPECT_EQ(got[3], 0u);
  }
  const std::vector<uint32_t>& expected() const { return expected_; }

 private:
  DeviceBuffer<uint32_t> slots_, want_;
  nibble::cuda::ProducerAmax amax_;
  std::vector<uint32_t> expected_;
};

// The producer-amax cases of a norm: dims 768 (the kernels compute the amax) and 208 (not a multiple
// of 128: the plain kernels, then the amax pass), with and without the RHT; 176 rows (the backward's
// last chunk of rows partial). body(gpu, rows, dim, rng, check, amax) runs one, with random
// parameters and fresh amax slots.
template <typename Body>
void for_each_norm_amax_case(NormKind kind, Body body) {
  for (const int64_t dim : {int64_t{208}, int64_t{768}})
    for (bool rht : {false, true}) {
      SCOPED_TRACE("dim " + std::to_string(dim) + (rht ? ", RHT" : ", no RHT"));
      std::mt19937_64 rng(fresh_seed());
      cuda::NormCuda gpu(dim, kind);
      upload(gpu.weight(), nibble::nn::test::random_normal(rng, dim, 1.0f));
      if (gpu.has_bias()) upload(gpu.bias(), nibble::nn::test::random_normal(rng, dim, 0.5f));
      ProducerAmaxCheck check;
      const nibble::cuda::ProducerAmax amax = check.start(rht, rht_signs_from_seed(rng()));
      body(gpu, int64_t{16 * 11}, dim, rng, check, amax);
    }
}

// forward() with the amax of the fused NVFP4 pass over its BF16 output (ProducerAmax): the y bits
// of the plain forward, and the two words nvfp4_amax computes from y, the next slot zeroed.
TEST_P(NormCudaTest, ForwardComputesTheNvfp4PassAmax) {
  for_each_norm_amax_case(GetParam(), [](cuda::NormCuda& gpu, int64_t rows, int64_t dim, std::mt19937_64& rng,
                                         ProducerAmaxCheck& check, const nibble::cuda::ProducerAmax& amax) {
    Stream stream;
    auto x = nibble::nn::test::random_normal(rng, rows * dim, 2.0f);
    x[x.size() / 3] = 90.0f;  // an outlier row
    DeviceBuffer<float> d_x{std::span<const float>(x)};
    DeviceBuffer<bf16_t> plain(x.size()), produced(x.size());
    gpu.forward(d_x.data(), rows, plain.data(), stream);
    gpu.forward(d_x.data(), rows, produced.data(), stream, amax);
    check.check(plain, produced, rows, dim, stream);
  });
}

// backward() with the amax of the fused NVFP4 pass over its BF16 dx (the next linear layer's dY), as
// the forward above.
TEST_P(NormCudaTest, BackwardComputesTheNvfp4PassAmax) {
  for_each_norm_amax_case(GetParam(), [](cuda::NormCuda& gpu, int64_t rows, int64_t dim, std::mt19937_64& rng,
                                         ProducerAmaxCheck& check, const nibble::cuda::ProducerAmax& amax) {
    Stream stream;
    const auto x = nibble::nn::test::random_normal(rng, rows * dim, 2.0f);
    auto dy = nibble::nn::test::random_normal(rng, rows * dim, 1.0f);
    dy[dy.size() / 5] = 70.0f;  // an outlier
    DeviceBuffer<float> d_x{std::span<const float>(x)}, d_dy{std::span<const float>(dy)}, y(x.size()), dx(x.size());
    DeviceBuffer<bf16_t> plain(x.size()), produced(x.size());
    gpu.forward(d_x.data(), rows, y.data(), stream);
    gpu.backward(d_dy.data(), dx.data(), stream, /*accumulate=*/false, plain.data());
    gpu.forward(d_x.data(), rows, y.data(), stream);
    gpu.backward(d_dy.data(), dx.data(), stream, /*accumulate=*/false, produced.data(), amax);
    check.check(plain, produced, rows, dim, stream);
  });
}

INSTANTIATE_TEST_SUITE_P(Kinds, NormCudaTest, ::testing::Values(NormKind::kLayerNorm, NormKind::kRmsNorm),
                         [](const auto& info) { return info.param == NormKind::kLayerNorm ? "LayerNorm" : "RmsNorm"; });

// ---------------------------------------------------------------- MLP activations

class ActivationCudaTest : public ::testing::TestWithParam<MlpKind> {};

// Elementwise FP32 with the CPU's formulas; tanhf/expf differ from glibc by a few ulp and FMA
// contraction by one rounding: a few 1e-7 of the scale. Tolerance 1e-5.
TEST_P(ActivationCudaTest, MatchesCpuMlpActivation) {
  std::mt19937_64 rng(fresh_seed());
  const MlpKind kind = GetParam();
  const int64_t rows = 3 * 37, d = 128, hidden = d;  // hidden = d: proj can be the identity
  const int64_t width = kind == MlpKind::kSwiglu ? 2 * hidden : hidden;
  Stream stream;
  Mlp cpu(d, hidden, kind, preset("fp32"), 0, 1);
  const auto pre = nibble::nn::test::random_normal(rng, rows * width, 2.0f);  // wide: GELU's tails, ReLU's negatives
  plant(cpu.fc(), pre, rows);
  set_identity(cpu.proj());
  const auto act_cpu = cpu.forward(one_hot_rows(rows, d), rows);
  const auto dact = nibble::nn::test::random_normal(rng, rows * hidden, 1.0f);
  cpu.backward(dact);
  const auto dpre_cpu = harvest_grad(cpu.fc(), rows);

  DeviceBuffer<float> d_pre{std::span<const float>(pre)}, d_dact{std::span<const float>(dact)};
  DeviceBuffer<float> act(static_cast<size_t>(rows * hidden)), dpre(pre.size());
  cuda::activation_forward(kind, d_pre.data(), rows, hidden, act.data(), stream);
  cuda::activation_backward(kind, d_pre.data(), d_dact.data(), rows, hidden, dpre.data(), stream);
  expect_close(download(act.data(), rows * hidden), act_cpu, 1e-5, "activation forward");
  expect_close(download(dpre.data(), rows * width), dpre_cpu, 1e-5, "activation backward");
}

INSTANTIATE_TEST_SUITE_P(Kinds, ActivationCudaTest,
                         ::testing::Values(MlpKind::kGelu, MlpKind::kRelu2, MlpKind::kSwiglu), [](const auto& info) {
                           return info.param == MlpKind::kGelu ? "Gelu" : info.param == MlpKind::kRelu2 ? "Relu2" : "Swiglu";
                         });

// GELU forward and backward with the amax of the fused NVFP4 pass over their BF16 output
// (ProducerAmax): the output bits of the plain kernels, the two words nvfp4_amax computes from that
// output (with and without the RHT, random signs), and the next slot zeroed.
// The larger shape has more 4-column items than the grid has threads (the kernel loops).
class GeluAmaxTest : public ::testing::TestWithParam<std::pair<int64_t, int64_t>> {};

TEST_P(GeluAmaxTest, ComputesTheNvfp4PassAmax) {
  std::mt19937_64 rng(fresh_seed());
  const auto [rows, hidden] = GetParam();
  const size_t n = static_cast<size_t>(rows * hidden);
  Stream stream;
  std::vector<float> pre = nibble::nn::test::random_normal(rng, n, 2.0f);
  std::vector<float> dact = nibble::nn::test::random_normal(rng, n, 1e-3f);
  pre[n / 3] = 40.0f, dact[n / 5] = -0.5f;  // outliers: one element decides each amax
  const auto bf16 = [](const std::vector<float>& v) {
    std::vector<bf16_t> b(v.size());
    for (size_t i = 0; i < v.size(); ++i) b[i].bits = static_cast<uint16_t>(BF16::encode(v[i], Rounding::kNearestEven));
    return b;
  };
  const std::vector<bf16_t> pre16 = bf16(pre), dact16 = bf16(dact);
  DeviceBuffer<bf16_t> d_pre{std::span<const bf16_t>(pre16)}, d_dact{std::span<const bf16_t>(dact16)};
  DeviceBuffer<bf16_t> plain(n), produced(n);
  ProducerAmaxCheck check;
  for (bool backward : {false, true})
    for (bool rht : {false, true}) {
      SCOPED_TRACE(std::string(backward ? "backward" : "forward") + (rht ? ", RHT" : ", no RHT"));
      const nibble::cuda::ProducerAmax amax = check.start(rht, rht_signs_from_seed(rng()));
      const auto run = [&](bf16_t* out, nibble::cuda::ProducerAmax a) {
        if (backward)
          cuda::activation_backward(MlpKind::kGelu, d_pre.data(), d_dact.data(), rows, hidden, out, stream, a);
        else
          cuda::activation_forward(MlpKind::kGelu, d_pre.data(), rows, hidden, out, stream, a);
      };
      run(plain.data(), {});
      run(produced.data(), amax);
      check.check(plain, produced, rows, hidden, stream);
      if (rht && !HasFatalFailure()) {
        EXPECT_NE(check.expected()[0], check.expected()[1]) << "the RHT should change the columnwise amax";
      }
    }
  // Shapes the kernel cannot take are refused, not computed wrong.
  const nibble::cuda::ProducerAmax amax = check.start(false, kDefaultRhtSigns);
  EXPECT_THROW(cuda::activation_forward(MlpKind::kGelu, d_pre.data(), rows - 8, hidden, plain.data(), stream, amax),
               std::invalid_argument);
  EXPECT_THROW(cuda::activation_forward(MlpKind::kRelu2, d_pre.data(), rows, hidden, plain.data(), stream, amax),
               std::invalid_argument);
}

INSTANTIATE_TEST_SUITE_P(Shapes, GeluAmaxTest,
                         ::testing::Values(std::pair<int64_t, int64_t>{16 * 13, 400},
                                           std::pair<int64_t, int64_t>{16 * 96, 3072}),
                         [](const auto& info) {
                           return std::to_string(info.param.first) + "x" + std::to_string(info.param.second);
                         });

// ---------------------------------------------------------------- attention core

struct AttentionCase {
  int64_t d_model, heads, kv_heads, batch, seq;
  bool rope;
};

// The kernel under test: the fused kernels with the Hopper (wgmma) forward where it applies (HD 64,
// Tp a multiple of 128, an sm_90 device), the fused kernels with mma.sync only, or the GEMM core.
struct AttentionKernelChoice {
  cuda::AttentionKernel kernel;
  bool wgmma;
  const char* name;
};
// Sets the process-wide choice of the fused forward for a scope.
class FlashWgmmaScope {
 public:
  explicit FlashWgmmaScope(bool on) { cuda::detail::set_flash_wgmma(on); }
  ~FlashWgmmaScope() { cuda::detail::set_flash_wgmma(true); }
};

class AttentionCudaTest : public ::testing::TestWithParam<std::tuple<AttentionCase, AttentionKernelChoice>> {};

// Tolerances and input scale: see model/attention_bf16_tolerance.h (both kernels' roundings are
// emulated there).
using nibble::test::kAttnMaxBwd;
using nibble::test::kAttnMaxFwd;
using nibble::test::kAttnRmsBwd;
using nibble::test::kAttnRmsFwd;

// A part of d_qkv whose exact value is zero (dq and dk at seq 1, where each row attends only to
// itself, so dS = P (dP - rowsum(P dP)) = 0): the GPU's may differ by FP32 rounding of dP against
// the row sum, ~1e-7 of the gradients' scale.
void expect_near_zero(std::span<const float> gpu, double scale, const std::string& what) {
  double worst = 0.0;
  for (float x : gpu) worst = std::max(worst, std::fabs(static_cast<double>(x)));  // NaN fails below
  const double rel = worst / scale;
  std::printf("[ compare  ] %-44s max |gpu| %.3e of the scale (want <= 1e-5, exact 0)\n", what.c_str(), rel);
  EXPECT_LE(rel, 1e-5) << what;
}

TEST_P(AttentionCudaTest, MatchesCpuCore) {
  std::mt19937_64 rng(fresh_seed());
  const auto [c, choice] = GetParam();
  const cuda::AttentionKernel kernel = choice.kernel;
  const FlashWgmmaScope wgmma(choice.wgmma);
  const AttentionShape shape{c.d_model, c.heads, c.kv_heads, c.rope, 10000.0f};
  nibble::cuda::GemmRunner gemm;
  cuda::AttentionWorkspace workspace;
  if (kernel == cuda::AttentionKernel::kFused && shape.head_dim() > 128) {  // beyond the fused kernels
    EXPECT_THROW({ cuda::AttentionCoreCuda core(shape, gemm, workspace, kernel); }, std::invalid_argument);
    EXPECT_EQ(cuda::AttentionCoreCuda(shape, gemm, workspace).kernel(), cuda::AttentionKernel::kGemm);
    return;
  }
  const int64_t rows = c.batch * c.seq;
  ASSERT_LE(rows, c.d_model);  // one-hot input rows
  CausalSelfAttention cpu(shape, preset("fp32"), 0, 1);
  cuda::AttentionCoreCuda gpu(shape, gemm, workspace, kernel);
  ASSERT_EQ(gpu.kernel(), kernel);
  const int64_t width = gpu.qkv_width(), out_width = gpu.out_width();
  ASSERT_EQ(out_width, c.d_model);  // proj can be the identity
  Stream stream;

  const auto qkv = nibble::nn::test::random_normal(rng, rows * width, nibble::test::kAttnQkvStddev);
  plant(cpu.qkv(), qkv, rows);
  set_identity(cpu.proj());
  const auto out_cpu = cpu.forward(one_hot_rows(rows, c.d_model), c.batch, c.seq);
  const auto dout = nibble::nn::test::random_normal(rng, rows * out_width, 1.0f);
  cpu.zero_grad();
  cpu.backward(dout);
  const auto dqkv_cpu = harvest_grad(cpu.qkv(), rows);

  DeviceBuffer<float> d_qkv_in{std::span<const float>(qkv)}, d_dout{std::span<const float>(dout)};
  DeviceBuffer<float> out(static_cast<size_t>(rows * out_width)), dqkv(qkv.size());
  gpu.forward(d_qkv_in.data(), c.batch, c.seq, out.data(), stream);
  {  // another layer sharing the workspace runs in between: nothing gpu saved may live there
    cuda::AttentionCoreCuda other(shape, gemm, workspace, kernel);
    DeviceBuffer<float> other_qkv{std::span<const float>(nibble::nn::test::random_normal(rng, rows * width, 1.0f))};
    DeviceBuffer<float> other_out(out.size()), other_dqkv(dqkv.size());
    other.forward(other_qkv.data(), c.batch, c.seq, other_out.data(), stream);
    other.backward(other_out.data(), other_dqkv.data(), stream);
  }
  gpu.backward(d_dout.data(), dqkv.data(), stream);
  const auto dq = download(dqkv.data(), rows * width);
  const auto out_gpu = download(out.data(), rows * out_width);
  expect_close(out_gpu, out_cpu, kAttnMaxFwd, "attention forward");
  expect_close_rms(out_gpu, out_cpu, kAttnRmsFwd, "attention forward");
  expect_close(dq, dqkv_cpu, kAttnMaxBwd, "attention d_qkv");
  double scale = 0.0;
  for (float x : dqkv_cpu) scale = std::max(scale, std::fabs(static_cast<double>(x)));
  // The q, k and v parts separately (each has its own scale).
  const int64_t hd = shape.head_dim(), qw = c.heads * hd, kw = c.kv_heads * hd;
  const char* names[3] = {"attention dq", "attention dk", "attention dv"};
  const int64_t begin[3] = {0, qw, qw + kw}, size[3] = {qw, kw, kw};
  for (int part = 0; part < 3; ++part) {
    std::vector<float> g, r;
    for (int64_t row = 0; row < rows; ++row)
      for (int64_t j = begin[part]; j < begin[part] + size[part]; ++j)
        g.push_back(dq[row * width + j]), r.push_back(dqkv_cpu[row * width + j]);
    if (std::all_of(r.begin(), r.end(), [](float x) { return x == 0.0f; })) {
      ASSERT_EQ(c.seq, 1) << names[part] << ": the CPU reference is all zeros";
      expect_near_zero(g, scale, names[part]);
      continue;
    }
    expect_close(g, r, kAttnMaxBwd, names[part]);
    expect_close_rms(g, r, kAttnRmsBwd, names[part]);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, AttentionCudaTest,
    ::testing::Combine(
        ::testing::Values(AttentionCase{96, 6, 2, 2, 37, true},       // hd 16, GQA groups of 3, RoPE
                          AttentionCase{96, 6, 6, 3, 31, false},      // multi-head, no RoPE
                          AttentionCase{192, 6, 3, 3, 37, true},      // hd 32, groups of 2
                          AttentionCase{120, 6, 2, 2, 45, true},      // hd 20: padded head dimension
                          AttentionCase{90, 3, 1, 2, 37, true},       // hd 30: d_qkv's scalar stores
                          AttentionCase{64, 4, 1, 1, 64, false},      // multi-query, seq one whole tile
                          AttentionCase{192, 3, 3, 2, 67, false},     // hd 64, seq one past a tile
                          AttentionCase{256, 2, 1, 2, 100, true},     // hd 128, multi-query, 2 tiles
                          AttentionCase{256, 4, 2, 3, 1, true},       // seq 1
                          AttentionCase{256, 4, 2, 1, 200, false},    // hd 64, 4 tiles, groups of 2
                          AttentionCase{1024, 16, 4, 1, 1024, false}, // hd 64, seq 1024, groups of 4
                          AttentionCase{1024, 8, 2, 1, 1024, true},   // hd 128, seq 1024, RoPE
                          AttentionCase{288, 2, 2, 1, 37, false}),    // hd 144: the GEMM kernel only
        ::testing::Values(AttentionKernelChoice{cuda::AttentionKernel::kFused, true, "Fused"},
                          AttentionKernelChoice{cuda::AttentionKernel::kFused, false, "FusedMmaSync"},
                          AttentionKernelChoice{cuda::AttentionKernel::kGemm, true, "Gemm"})),
    [](const auto& info) {
      const AttentionCase& c = std::get<0>(info.param);
      return "D" + std::to_string(c.d_model) + "H" + std::to_string(c.heads) + "KV" + std::to_string(c.kv_heads) + "B" +
             std::to_string(c.batch) + "T" + std::to_string(c.seq) + (c.rope ? "Rope" : "NoRope") +
             std::get<1>(info.param).name;
    });

// The producers of a linear layer's input can write it in BF16 (LinearCuda::bf16_input): those
// values must be the nearest-even rounding of the FP32 outputs, bit for bit, whatever path the
// kernels take (vectorised or not, even or odd head dimensions).
std::vector<uint16_t> rounded(const std::vector<float>& x) {
  std::vector<uint16_t> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = BF16::encode(x[i], Rounding::kNearestEven);
  return r;
}
std::vector<uint16_t> download_bits(const DeviceBuffer<bf16_t>& b, int64_t n) {
  const std::vector<bf16_t> v = download(b.data(), n);
  std::vector<uint16_t> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = v[i].bits;
  return r;
}

// BF16 values drawn at random, on the device as BF16 and as the same values in FP32.
struct Bf16Values {
  DeviceBuffer<bf16_t> b16;
  DeviceBuffer<float> f32;
};
Bf16Values bf16_values(std::mt19937_64& rng, int64_t n, float scale) {
  const std::vector<uint16_t> bits = rounded(nibble::nn::test::random_normal(rng, n, scale));
  std::vector<bf16_t> b(bits.size());
  std::vector<float> f(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) {
    b[i].bits = bits[i];
    f[i] = BF16::decode(bits[i]);
  }
  return {DeviceBuffer<bf16_t>{std::span<const bf16_t>(b)}, DeviceBuffer<float>{std::span<const float>(f)}};
}

TEST(Bf16Outputs, AreTheFp32OutputsRoundedToNearestEven) {
  std::mt19937_64 rng(fresh_seed());
  Stream stream;
  for (const NormKind kind : {NormKind::kLayerNorm, NormKind::kRmsNorm})
    for (const int64_t dim : {int64_t{96}, int64_t{256}}) {  // the strided and the vector norm kernels
      const int64_t rows = 53;
      cuda::NormCuda norm(dim, kind);
      upload(norm.weight(), nibble::nn::test::random_normal(rng, dim, 1.0f));
      DeviceBuffer<float> x{std::span<const float>(nibble::nn::test::random_normal(rng, rows * dim, 2.0f))};
      DeviceBuffer<float> y(static_cast<size_t>(rows * dim));
      DeviceBuffer<bf16_t> y16(y.size());
      norm.forward(x.data(), rows, y.data(), stream);
      norm.forward(x.data(), rows, y16.data(), stream);
      EXPECT_EQ(download_bits(y16, rows * dim), rounded(download(y.data(), rows * dim))) << "norm";
      // Backward's BF16 copy of dx: the final dx (after adding onto the residual gradient) rounded.
      DeviceBuffer<float> dy{std::span<const float>(nibble::nn::test::random_normal(rng, rows * dim, 1.0f))};
      DeviceBuffer<float> dx{std::span<const float>(nibble::nn::test::random_normal(rng, rows * dim, 1.0f))};
      DeviceBuffer<bf16_t> dx16(dx.size());
      norm.backward(dy.data(), dx.data(), stream, /*accumulate=*/true, dx16.data());
      EXPECT_EQ(download_bits(dx16, rows * dim), rounded(download(dx.data(), rows * dim))) << "norm backward";
    }
  for (const MlpKind kind : {MlpKind::kGelu, MlpKind::kRelu2, MlpKind::kSwiglu})
    for (const int64_t hidden : {int64_t{64}, int64_t{37}}) {  // 37: not a multiple of 4, the scalar kernel
      const int64_t rows = 29, width = kind == MlpKind::kSwiglu ? 2 * hidden : hidden;
      DeviceBuffer<float> pre{std::span<const float>(nibble::nn::test::random_normal(rng, rows * width, 2.0f))};
      DeviceBuffer<float> act(static_cast<size_t>(rows * hidden));
      DeviceBuffer<bf16_t> act16(act.size());
      cuda::activation_forward(kind, pre.data(), rows, hidden, act.data(), stream);
      cuda::activation_forward(kind, pre.data(), rows, hidden, act16.data(), stream);
      EXPECT_EQ(download_bits(act16, rows * hidden), rounded(download(act.data(), rows * hidden)))
          << "activation " << static_cast<int>(kind) << ", hidden " << hidden;
      DeviceBuffer<float> dact{std::span<const float>(nibble::nn::test::random_normal(rng, rows * hidden, 1.0f))};
      DeviceBuffer<float> dpre(static_cast<size_t>(rows * width));
      DeviceBuffer<bf16_t> dpre16(dpre.size());
      cuda::activation_backward(kind, pre.data(), dact.data(), rows, hidden, dpre.data(), stream);
      cuda::activation_backward(kind, pre.data(), dact.data(), rows, hidden, dpre16.data(), stream);
      EXPECT_EQ(download_bits(dpre16, rows * width), rounded(download(dpre.data(), rows * width)))
          << "activation backward " << static_cast<int>(kind) << ", hidden " << hidden;
      // `pre` in BF16 (the GPU model's fc output): the outputs of the FP32 kernels given the same
      // values, bit for bit (a BF16 value is exact in FP32).
      const Bf16Values pre16 = bf16_values(rng, rows * width, 2.0f);
      cuda::activation_forward(kind, pre16.f32.data(), rows, hidden, act16.data(), stream);
      DeviceBuffer<bf16_t> act16b(act.size());
      cuda::activation_forward(kind, pre16.b16.data(), rows, hidden, act16b.data(), stream);
      EXPECT_EQ(download_bits(act16b, rows * hidden), download_bits(act16, rows * hidden))
          << "activation of BF16 pre " << static_cast<int>(kind) << ", hidden " << hidden;
      cuda::activation_backward(kind, pre16.f32.data(), dact.data(), rows, hidden, dpre16.data(), stream);
      DeviceBuffer<bf16_t> dpre16b(dpre.size());
      cuda::activation_backward(kind, pre16.b16.data(), dact.data(), rows, hidden, dpre16b.data(), stream);
      EXPECT_EQ(download_bits(dpre16b, rows * width), download_bits(dpre16, rows * width))
          << "activation backward of BF16 pre " << static_cast<int>(kind) << ", hidden " << hidden;
    }
  for (const AttentionShape shape : {AttentionShape{96, 6, 2, true, 10000.0f}, AttentionShape{105, 7, 7, false},
                                     AttentionShape{256, 2, 1, false}}) {  // hd 16, 15 (odd), 128
    nibble::cuda::GemmRunner gemm;
    cuda::AttentionWorkspace workspace;
    cuda::AttentionCoreCuda core(shape, gemm, workspace, cuda::AttentionKernel::kFused);
    ASSERT_TRUE(core.writes_bf16_output());
    const int64_t batch = 2, seq = 70, rows = batch * seq;
    DeviceBuffer<float> qkv{std::span<const float>(nibble::nn::test::random_normal(rng, rows * core.qkv_width(), 1.0f))};
    DeviceBuffer<float> out(static_cast<size_t>(rows * core.out_width()));
    DeviceBuffer<bf16_t> out16(out.size());
    core.forward(qkv.data(), batch, seq, out.data(), stream);
    core.forward(qkv.data(), batch, seq, out16.data(), stream);
    EXPECT_EQ(download_bits(out16, rows * core.out_width()), rounded(download(out.data(), rows * core.out_width())))
        << "attention, head_dim " << shape.head_dim();
    DeviceBuffer<float> dout{std::span<const float>(nibble::nn::test::random_normal(rng, rows * core.out_width(), 1.0f))};
    DeviceBuffer<float> dqkv(qkv.size());
    DeviceBuffer<bf16_t> dqkv16(qkv.size());
    core.backward(dout.data(), dqkv.data(), stream);
    core.forward(qkv.data(), batch, seq, out.data(), stream);  // backward consumed the saved forward
    core.backward(dout.data(), dqkv16.data(), stream);
    EXPECT_EQ(download_bits(dqkv16, rows * core.qkv_width()), rounded(download(dqkv.data(), rows * core.qkv_width())))
        << "attention backward, head_dim " << shape.head_dim();
  }
  {  // the batched-GEMM attention has no BF16 output
    nibble::cuda::GemmRunner gemm;
    cuda::AttentionWorkspace workspace;
    cuda::AttentionCoreCuda core(AttentionShape{96, 6, 2, false}, gemm, workspace, cuda::AttentionKernel::kGemm);
    EXPECT_FALSE(core.writes_bf16_output());
    DeviceBuffer<float> qkv(static_cast<size_t>(4 * core.qkv_width()));
    DeviceBuffer<bf16_t> out16(static_cast<size_t>(4 * core.out_width()));
    EXPECT_THROW(core.forward(qkv.data(), 1, 4, out16.data(), stream), std::logic_error);
  }
}

// The kernels that read a linear layer's output in BF16 (the GPU model's qkv output and Dgrad
// outputs under bf16 and quantized recipes): the bits they give for the same values in FP32 (exact
// in FP32).
TEST(Bf16Inputs, GiveTheBitsOfTheSameValuesInFp32) {
  std::mt19937_64 rng(fresh_seed());
  Stream stream;
  for (const NormKind kind : {NormKind::kLayerNorm, NormKind::kRmsNorm})
    for (const int64_t dim : {int64_t{96}, int64_t{256}}) {  // the strided and the vector norm kernels
      const int64_t rows = 53;
      cuda::NormCuda norm(dim, kind);
      upload(norm.weight(), nibble::nn::test::random_normal(rng, dim, 1.0f));
      DeviceBuffer<float> x{std::span<const float>(nibble::nn::test::random_normal(rng, rows * dim, 2.0f))};
      DeviceBuffer<float> y(x.size()), dx(x.size()), dx16(x.size());
      const Bf16Values dy = bf16_values(rng, rows * dim, 1.0f);
      std::vector<float> grads[2];
      for (int path = 0; path < 2; ++path) {
        norm.zero_grad(stream);
        norm.forward(x.data(), rows, y.data(), stream);
        if (path == 0)
          norm.backward(dy.f32.data(), dx.data(), stream);
        else
          norm.backward(dy.b16.data(), dx16.data(), stream);
        grads[path] = download(norm.weight_grad(), dim);
        if (norm.has_bias()) {
          const std::vector<float> gb = download(norm.bias_grad(), dim);
          grads[path].insert(grads[path].end(), gb.begin(), gb.end());
        }
      }
      expect_bits_equal(download(dx16.data(), rows * dim), download(dx.data(), rows * dim), "norm dx from BF16 dy");
      expect_bits_equal(grads[1], grads[0], "norm parameter gradients from BF16 dy");
    }
  for (const MlpKind kind : {MlpKind::kGelu, MlpKind::kRelu2, MlpKind::kSwiglu})
    for (const int64_t hidden : {int64_t{64}, int64_t{37}}) {  // 37: the scalar kernel
      const int64_t rows = 29, width = kind == MlpKind::kSwiglu ? 2 * hidden : hidden;
      const Bf16Values pre = bf16_values(rng, rows * width, 2.0f), dact = bf16_values(rng, rows * hidden, 1.0f);
      DeviceBuffer<bf16_t> a(static_cast<size_t>(rows * width)), b(a.size());
      cuda::activation_backward(kind, pre.b16.data(), dact.f32.data(), rows, hidden, a.data(), stream);
      cuda::activation_backward(kind, pre.b16.data(), dact.b16.data(), rows, hidden, b.data(), stream);
      EXPECT_EQ(download_bits(b, rows * width), download_bits(a, rows * width))
          << "activation backward of BF16 dact " << static_cast<int>(kind) << ", hidden " << hidden;
    }
  // The attention core's forward from BF16 qkv (the GPU model's qkv output), with and without RoPE:
  // the outputs, and the backward from what the forward saved.
  for (const cuda::AttentionKernel kernel : {cuda::AttentionKernel::kFused, cuda::AttentionKernel::kGemm})
    for (const bool rope : {true, false}) {
      nibble::cuda::GemmRunner gemm;
      cuda::AttentionWorkspace workspace;
      cuda::AttentionCoreCuda core(AttentionShape{96, 6, 2, rope, 10000.0f}, gemm, workspace, kernel);
      const int64_t batch = 2, seq = 70, rows = batch * seq;
      const Bf16Values qkv = bf16_values(rng, rows * core.qkv_width(), 1.0f);
      DeviceBuffer<float> dout{std::span<const float>(nibble::nn::test::random_normal(rng, rows * core.out_width(), 1.0f))};
      std::vector<float> results[2][2];  // [path][out, dqkv]
      for (int path = 0; path < 2; ++path) {
        DeviceBuffer<float> out(static_cast<size_t>(rows * core.out_width())), dqkv(qkv.f32.size());
        if (path == 0)
          core.forward(qkv.f32.data(), batch, seq, out.data(), stream);
        else
          core.forward(qkv.b16.data(), batch, seq, out.data(), stream);
        core.backward(dout.data(), dqkv.data(), stream);
        results[path][0] = download(out.data(), rows * core.out_width());
        results[path][1] = download(dqkv.data(), rows * core.qkv_width());
      }
      const std::string what = std::string(kernel == cuda::AttentionKernel::kFused ? "fused" : "GEMM") +
                               " attention from BF16 qkv" + (rope ? ", RoPE" : "");
      expect_bits_equal(results[1][0], results[0][0], what + ": out");
      expect_bits_equal(results[1][1], results[0][1], what + ": dqkv");
    }
  for (const cuda::AttentionKernel kernel : {cuda::AttentionKernel::kFused, cuda::AttentionKernel::kGemm}) {
    nibble::cuda::GemmRunner gemm;
    cuda::AttentionWorkspace workspace;
    cuda::AttentionCoreCuda core(AttentionShape{96, 6, 2, true, 10000.0f}, gemm, workspace, kernel);
    const int64_t batch = 2, seq = 70, rows = batch * seq;
    DeviceBuffer<float> qkv{std::span<const float>(nibble::nn::test::random_normal(rng, rows * core.qkv_width(), 1.0f))};
    DeviceBuffer<float> out(static_cast<size_t>(rows * core.out_width())), dqkv(qkv.size()), dqkv16(qkv.size());
    const Bf16Values dout = bf16_values(rng, rows * core.out_width(), 1.0f);
    core.forward(qkv.data(), batch, seq, out.data(), stream);
    core.backward(dout.f32.data(), dqkv.data(), stream);
    core.forward(qkv.data(), batch, seq, out.data(), stream);
    core.backward(dout.b16.data(), dqkv16.data(), stream);
    expect_bits_equal(download(dqkv16.data(), rows * core.qkv_width()), download(dqkv.data(), rows * core.qkv_width()),
                      kernel == cuda::AttentionKernel::kFused ? "fused attention, BF16 d_out" : "GEMM attention, BF16 d_out");
  }
}

// forward_kept + backward with BF16 d_out and d_qkv, where nothing is padded: the kernels read q, k,
// v and dO in place and write d_qkv in place; the bits of the packed route (FP32 qkv and d_out,
// rounded). Also at pointers one element into larger buffers, where the layer packs instead.
TEST(Bf16Inputs, AttentionReadsKeptQkvInPlace) {
  std::mt19937_64 rng(fresh_seed());
  Stream stream;
  for (const AttentionShape shape : {AttentionShape{256, 4, 2, false}, AttentionShape{256, 2, 2, false}}) {  // hd 64 GQA, 128
    SCOPED_TRACE("head_dim " + std::to_string(shape.head_dim()));
    nibble::cuda::GemmRunner gemm;
    cuda::AttentionWorkspace workspace;
    cuda::AttentionCoreCuda core(shape, gemm, workspace, cuda::AttentionKernel::kFused);
    const int64_t batch = 2, seq = 128, rows = batch * seq;
    const int64_t n_out = rows * core.out_width(), n_qkv = rows * core.qkv_width();
    EXPECT_TRUE(core.reads_kept_qkv(seq));
    EXPECT_FALSE(core.reads_kept_qkv(seq - 1));
    const Bf16Values qkv = bf16_values(rng, n_qkv, 1.0f), dout = bf16_values(rng, n_out, 1.0f);
    DeviceBuffer<float> out(static_cast<size_t>(n_out)), dqkv(static_cast<size_t>(n_qkv));
    core.forward(qkv.f32.data(), batch, seq, out.data(), stream);
    core.backward(dout.f32.data(), dqkv.data(), stream);
    const std::vector<uint16_t> want_out = rounded(download(out.data(), n_out));
    const std::vector<uint16_t> want_dqkv = rounded(download(dqkv.data(), n_qkv));
    for (const int64_t offset : {int64_t{0}, int64_t{1}}) {
      SCOPED_TRACE("offset " + std::to_string(offset));
      DeviceBuffer<bf16_t> qkv_at(static_cast<size_t>(n_qkv + offset)), dout_at(static_cast<size_t>(n_out + offset));
      NIBBLE_CUDA_CHECK(cudaMemcpy(qkv_at.data() + offset, qkv.b16.data(), n_qkv * 2, cudaMemcpyDeviceToDevice));
      NIBBLE_CUDA_CHECK(cudaMemcpy(dout_at.data() + offset, dout.b16.data(), n_out * 2, cudaMemcpyDeviceToDevice));
      DeviceBuffer<bf16_t> out16(static_cast<size_t>(n_out + offset)), dqkv16(static_cast<size_t>(n_qkv + offset));
      core.forward_kept(qkv_at.data() + offset, batch, seq, out16.data() + offset, stream);
      core.backward(dout_at.data() + offset, dqkv16.data() + offset, stream);
      std::vector<uint16_t> got_out = download_bits(out16, n_out + offset), got_dqkv = download_bits(dqkv16, n_qkv + offset);
      got_out.erase(got_out.begin(), got_out.begin() + offset);
      got_dqkv.erase(got_dqkv.begin(), got_dqkv.begin() + offset);
      EXPECT_EQ(got_out, want_out) << "out";
      EXPECT_EQ(got_dqkv, want_dqkv) << "d_qkv";
    }
  }
  nibble::cuda::GemmRunner gemm;
  cuda::AttentionWorkspace workspace;
  EXPECT_FALSE(cuda::AttentionCoreCuda(AttentionShape{256, 4, 2, true, 10000.0f}, gemm, workspace).reads_kept_qkv(128))
      << "RoPE";
  EXPECT_FALSE(cuda::AttentionCoreCuda(AttentionShape{192, 4, 2, false}, gemm, workspace).reads_kept_qkv(128))
      << "head_dim 48, padded";
  EXPECT_FALSE(cuda::AttentionCoreCuda(AttentionShape{256, 4, 2, false}, gemm, workspace, cuda::AttentionKernel::kGemm)
                   .reads_kept_qkv(128))
      << "batched-GEMM kernels";
}

// The attention core computing the amax of the fused NVFP4 pass over its BF16 output (proj's X) and
// its BF16 d_qkv (qkv's dY) (ProducerAmax): the bits of the calls without it, the two words
// nvfp4_amax computes from those outputs, the next slot zeroed. On Hopper: seq 128 (the kernels
// compute both, the backward in place), seq 80 (the forward kernel, past T within Tp = 128; the
// backward's pass after the packed route), seq 72 (T not a multiple of 16: the pass after both);
// then the mma.sync kernels (the pass after each). Head dimensions 64 and 48 (padded to 64: the
// forward kernel's zero columns; the backward packed). The core's count says which computed them.
TEST(AttentionCudaAmax, ComputesTheNvfp4PassAmax) {
  std::mt19937_64 rng(fresh_seed());
  Stream stream;
  const bool hopper = nibble::cuda::device_attribute(cudaDevAttrComputeCapabilityMajor) == 9 &&
                      nibble::cuda::device_attribute(cudaDevAttrComputeCapabilityMinor) == 0;
  for (const AttentionShape shape : {AttentionShape{256, 4, 2, false}, AttentionShape{192, 4, 2, false}})
    for (const bool wgmma : {true, false})
      for (const int64_t seq : {int64_t{128}, int64_t{80}, int64_t{72}})
        for (const bool rht : {false, true}) {
          SCOPED_TRACE("head_dim " + std::to_string(shape.head_dim()) + (wgmma ? ", wgmma" : ", mma.sync") + ", seq " +
                       std::to_string(seq) + (rht ? ", RHT" : ", no RHT"));
          FlashWgmmaScope scope(wgmma);
          nibble::cuda::GemmRunner gemm;
          cuda::AttentionWorkspace workspace;
          cuda::AttentionCoreCuda core(shape, gemm, workspace, cuda::AttentionKernel::kFused);
          const int64_t batch = 2, rows = batch * seq;
          const int64_t n_out = rows * core.out_width(), n_qkv = rows * core.qkv_width();
          const Bf16Values qkv = bf16_values(rng, n_qkv, 1.0f), dout = bf16_values(rng, n_out, 1.0f);
          DeviceBuffer<bf16_t> out(static_cast<size_t>(n_out)), out_amax(out.size());
          DeviceBuffer<bf16_t> dqkv(static_cast<size_t>(n_qkv)), dqkv_amax(dqkv.size());
          core.forward_kept(qkv.b16.data(), batch, seq, out.data(), stream);
          core.backward(dout.b16.data(), dqkv.data(), stream);
          ProducerAmaxCheck check;
          core.forward_kept(qkv.b16.data(), batch, seq, out_amax.data(), stream,
                            check.start(rht, rht_signs_from_seed(rng())));
          check.check(out, out_amax, rows, core.out_width(), stream);
          core.backward(dout.b16.data(), dqkv_amax.data(), stream, check.start(rht, rht_signs_from_seed(rng())));
          check.check(dqkv, dqkv_amax, rows, core.qkv_width(), stream);
          const bool in_kernels = hopper && wgmma && seq % 16 == 0;
          const bool backward_in_place = seq == 128 && shape.head_dim() == 64;
          EXPECT_EQ(core.amaxes_in_kernels(), in_kernels ? (backward_in_place ? 2 : 1) : 0);
        }
}

// The attention core's outputs through pointers into larger buffers, one element in (a caller's
// chunk of a bigger array): the kernels' paired and 4-element stores need aligned destinations, so
// they must fall back to narrower stores there, with the same bits. hd 16 and 64: the vector paths.
TEST(Bf16Outputs, AttentionTakesPointersIntoLargerBuffers) {
  std::mt19937_64 rng(fresh_seed());
  Stream stream;
  for (const cuda::AttentionKernel kernel : {cuda::AttentionKernel::kFused, cuda::AttentionKernel::kGemm})
    for (const AttentionShape shape : {AttentionShape{96, 6, 2, true, 10000.0f}, AttentionShape{128, 2, 1, false}}) {
      SCOPED_TRACE("head_dim " + std::to_string(shape.head_dim()) +
                   (kernel == cuda::AttentionKernel::kFused ? ", fused" : ", gemm"));
      nibble::cuda::GemmRunner gemm;
      cuda::AttentionWorkspace workspace;
      cuda::AttentionCoreCuda core(shape, gemm, workspace, kernel);
      const int64_t batch = 2, seq = 37, rows = batch * seq;
      const int64_t n_out = rows * core.out_width(), n_qkv = rows * core.qkv_width();
      DeviceBuffer<float> qkv{std::span<const float>(nibble::nn::test::random_normal(rng, n_qkv, 1.0f))};
      DeviceBuffer<float> dout{std::span<const float>(nibble::nn::test::random_normal(rng, n_out, 1.0f))};
      DeviceBuffer<float> out(static_cast<size_t>(n_out)), dqkv(static_cast<size_t>(n_qkv));
      DeviceBuffer<float> dqkv_in(static_cast<size_t>(n_qkv + 1));
      DeviceBuffer<bf16_t> dqkv16_in(static_cast<size_t>(n_qkv + 1));
      core.forward(qkv.data(), batch, seq, out.data(), stream);
      core.backward(dout.data(), dqkv.data(), stream);
      core.forward(qkv.data(), batch, seq, out.data(), stream);
      core.backward(dout.data(), dqkv_in.data() + 1, stream);
      core.forward(qkv.data(), batch, seq, out.data(), stream);
      core.backward(dout.data(), dqkv16_in.data() + 1, stream);
      const std::vector<float> want = download(dqkv.data(), n_qkv);
      expect_bits_equal(download(dqkv_in.data() + 1, n_qkv), want, "d_qkv one element into a buffer");
      std::vector<uint16_t> got16 = download_bits(dqkv16_in, n_qkv + 1);
      got16.erase(got16.begin());
      EXPECT_EQ(got16, rounded(want)) << "BF16 d_qkv one element into a buffer";
      if (kernel != cuda::AttentionKernel::kFused) continue;
      DeviceBuffer<bf16_t> out16_in(static_cast<size_t>(n_out + 1));
      core.forward(qkv.data(), batch, seq, out16_in.data() + 1, stream);
      std::vector<uint16_t> got = download_bits(out16_in, n_out + 1);
      got.erase(got.begin());
      EXPECT_EQ(got, rounded(download(out.data(), n_out))) << "BF16 out one element into a buffer";
      core.backward(dout.data(), dqkv.data(), stream);  // consume the saved forward
    }
}

// Training resumes bit for bit only if backward is deterministic: the fused kernels use no
// atomics, so two backward passes over the same saved forward give the same bits (and two
// forwards the same outputs). Several key and query tiles, GQA, RoPE, both head sizes.
TEST(AttentionCudaDeterminism, FusedBackwardRepeatsBitForBit) {
  std::mt19937_64 rng(fresh_seed());
  for (const AttentionShape shape : {AttentionShape{512, 8, 2, true, 10000.0f}, AttentionShape{512, 4, 2, false}}) {
    const int64_t batch = 2, seq = 300;
    nibble::cuda::GemmRunner gemm;
    cuda::AttentionWorkspace workspace;
    cuda::AttentionCoreCuda gpu(shape, gemm, workspace, cuda::AttentionKernel::kFused);
    Stream stream;
    const int64_t rows = batch * seq;
    const auto qkv = nibble::nn::test::random_normal(rng, rows * gpu.qkv_width(), nibble::test::kAttnQkvStddev);
    const auto dout = nibble::nn::test::random_normal(rng, rows * gpu.out_width(), 1.0f);
    DeviceBuffer<float> d_qkv_in{std::span<const float>(qkv)}, d_dout{std::span<const float>(dout)};
    DeviceBuffer<float> out(static_cast<size_t>(rows * gpu.out_width())), dqkv(qkv.size());
    std::vector<float> outs[2], grads[2];
    for (int run = 0; run < 2; ++run) {
      gpu.forward(d_qkv_in.data(), batch, seq, out.data(), stream);
      gpu.backward(d_dout.data(), dqkv.data(), stream);
      outs[run] = download(out.data(), rows * gpu.out_width());
      grads[run] = download(dqkv.data(), rows * gpu.qkv_width());
    }
    const std::string hd = " (hd " + std::to_string(shape.head_dim()) + ")";
    expect_bits_equal(outs[1], outs[0], "fused attention forward, run 2 vs 1" + hd);
    expect_bits_equal(grads[1], grads[0], "fused attention d_qkv, run 2 vs 1" + hd);
  }
}

// ---------------------------------------------------------------- loss

// Float exps (the GPU's ex2.approx of x log2(e) - max log2(e) against glibc's expf: a few ulp where
// the terms are large, about 1e-6 relative at x - max ~ -20 where they are tiny) and double sums:
// the loss to 1e-6, the gradient to 1e-5 of its scale.
TEST(CrossEntropyCuda, MatchesCpu) {
  std::mt19937_64 rng(fresh_seed());
  const int64_t rows = 3 * 37, vocab = 1000;
  Stream stream;
  cuda::CrossEntropyCuda gpu;
  DeviceBuffer<double> loss(1);
  std::vector<uint32_t> targets(static_cast<size_t>(rows));
  for (auto& t : targets) t = static_cast<uint32_t>(rng() % vocab);
  DeviceBuffer<uint32_t> d_targets{std::span<const uint32_t>(targets)};
  for (const float grad_scale : {0.5f / static_cast<float>(rows), 0.0f}) {
    const auto logits = nibble::nn::test::random_normal(rng, rows * vocab, 3.0f);
    auto cpu = logits;
    const double want = softmax_cross_entropy(cpu, targets, vocab, grad_scale) / static_cast<double>(rows);
    DeviceBuffer<float> d_logits{std::span<const float>(logits)};
    gpu.forward_backward(d_logits.data(), d_targets.data(), rows, vocab, grad_scale, loss.data(), stream);
    const double got = download(loss.data(), 1)[0];
    const std::string what = grad_scale != 0.0f ? "gradient" : "probabilities";
    std::printf("[ compare  ] cross-entropy mean loss %.9f gpu, %.9f cpu (rel err %.2e, tol 1e-6)\n", got, want,
                std::fabs(got - want) / want);
    EXPECT_NEAR(got, want, 1e-6 * want);
    expect_close(download(d_logits.data(), rows * vocab), cpu, 1e-5, "cross-entropy " + what);
  }
  EXPECT_NO_THROW(gpu.check_ids(vocab, stream));
  targets[5] = static_cast<uint32_t>(vocab);
  d_targets.upload(targets);
  DeviceBuffer<float> d_logits(static_cast<size_t>(rows * vocab));
  d_logits.zero();
  gpu.forward_backward(d_logits.data(), d_targets.data(), rows, vocab, 1.0f, loss.data(), stream);
  EXPECT_THROW(gpu.check_ids(vocab, stream), std::out_of_range);
}

// The chunked form (what the chunked LM head runs): chunks of rows that do not divide the batch,
// BF16 logits, the gradient written in BF16 to another buffer and in place. Claims, each checked exactly:
// - the loss equals forward_backward()'s on the whole batch of the same values in FP32 bit for bit
//   (same device code, same row sums, same fixed-order mean), with or without the gradient;
// - every BF16 gradient is the nearest-even rounding of forward_backward()'s FP32 value (the
//   conversion the unchunked head's operand preparation applied), in place or not;
// - against the CPU: where the CPU's FP32 gradient has the GPU's bits, so does the BF16 value's
//   source, hence the BF16 value is the rounding of the CPU's; elsewhere the GPU's exp and the
//   CPU's std::exp differ by an ulp or so (the FP32 results agree to 1e-5, MatchesCpu above), which
//   can move the BF16 rounding by one step at most, so there the BF16 codes differ by at most 1.
TEST(CrossEntropyCuda, ChunkedBf16GradientIsTheRoundedFp32Gradient) {
  std::mt19937_64 rng(fresh_seed());
  const int64_t rows = 3 * 37, vocab = 1000, chunk = 25;  // chunks of 25, 25, 25, 25, 11 rows
  const float grad_scale = 0.5f / static_cast<float>(rows);
  Stream stream;
  std::vector<uint32_t> targets(static_cast<size_t>(rows));
  for (auto& t : targets) t = static_cast<uint32_t>(rng() % vocab);
  DeviceBuffer<uint32_t> d_targets{std::span<const uint32_t>(targets)};
  Bf16Values in = bf16_values(rng, rows * vocab, 3.0f);
  const std::vector<float> logits = download(in.f32.data(), rows * vocab);  // the BF16 values widened
  const std::vector<uint16_t> logit_bits = download_bits(in.b16, rows * vocab);
  DeviceBuffer<bf16_t> d_out(static_cast<size_t>(rows * vocab)), d_in_place{download(in.b16.data(), rows * vocab)};
  const auto at = [&](DeviceBuffer<bf16_t>& b, int64_t r0) {
    return reinterpret_cast<__nv_bfloat16*>(b.data()) + r0 * vocab;
  };
  // Every chunk of the batch, gradient to out (nullptr: losses only), then the mean loss.
  const auto run_chunks = [&](cuda::CrossEntropyCuda& ce, DeviceBuffer<bf16_t>& logits16, DeviceBuffer<bf16_t>* out,
                              float scale) {
    for (int64_t r0 = 0; r0 < rows; r0 += chunk)
      ce.chunk(at(logits16, r0), d_targets.data(), r0, std::min(chunk, rows - r0), rows, vocab, scale,
               out != nullptr ? at(*out, r0) : nullptr, stream);
    DeviceBuffer<double> loss(1);
    ce.mean(rows, loss.data(), stream);
    return download(loss.data(), 1)[0];
  };

  cuda::CrossEntropyCuda whole, chunked;
  DeviceBuffer<double> loss_whole(1);
  whole.forward_backward(in.f32.data(), d_targets.data(), rows, vocab, grad_scale, loss_whole.data(), stream);
  const double l_whole = download(loss_whole.data(), 1)[0];
  const double l_chunked = run_chunks(chunked, in.b16, &d_out, grad_scale);
  const double l_in_place = run_chunks(chunked, d_in_place, &d_in_place, grad_scale);
  const double l_eval = run_chunks(chunked, in.b16, nullptr, 0.0f);
  std::printf("[ compare  ] cross-entropy loss whole %.17g, chunked %.17g, in place %.17g, eval %.17g (want equal)\n",
              l_whole, l_chunked, l_in_place, l_eval);
  EXPECT_EQ(l_chunked, l_whole);
  EXPECT_EQ(l_in_place, l_whole);
  EXPECT_EQ(l_eval, l_whole);
  EXPECT_EQ(download_bits(in.b16, rows * vocab), logit_bits) << "chunk() wrote its input, not its output";

  const std::vector<float> g32 = download(in.f32.data(), rows * vocab);
  std::vector<uint16_t> g16 = download_bits(d_out, rows * vocab);
  EXPECT_EQ(download_bits(d_in_place, rows * vocab), g16) << "the gradient in place differs";
  auto cpu = logits;
  softmax_cross_entropy(cpu, targets, vocab, grad_scale);
  size_t not_rounded = 0, first_not_rounded = 0, same_fp32 = 0, wrong_where_same = 0, beyond_one_step = 0;
  for (size_t i = 0; i < g32.size(); ++i) {
    if (g16[i] != BF16::encode(g32[i], Rounding::kNearestEven) && not_rounded++ == 0) first_not_rounded = i;
    const uint16_t from_cpu = BF16::encode(cpu[i], Rounding::kNearestEven);
    if (std::memcmp(&g32[i], &cpu[i], sizeof(float)) == 0) {
      ++same_fp32;
      if (g16[i] != from_cpu) ++wrong_where_same;
    } else if (std::abs(static_cast<int>(g16[i]) - static_cast<int>(from_cpu)) > 1) {
      ++beyond_one_step;
    }
  }
  std::printf("[ compare  ] chunked BF16 gradient: %zu of %zu not the RNE rounding of the FP32 kernel's (want 0)\n",
              not_rounded, g32.size());
  std::printf("[ compare  ] vs the CPU: FP32 bits equal in %zu of %zu elements, of those %zu BF16 mismatches (want "
              "0); elsewhere %zu BF16 codes more than one step apart (want 0)\n",
              same_fp32, g32.size(), wrong_where_same, beyond_one_step);
  EXPECT_EQ(not_rounded, 0u) << "first at " << first_not_rounded << ": fp32 " << g32[first_not_rounded] << " bf16 0x"
                             << std::hex << g16[first_not_rounded];
  EXPECT_EQ(wrong_where_same, 0u);
  EXPECT_EQ(beyond_one_step, 0u);
  EXPECT_GT(same_fp32, 0u) << "no element where the CPU's FP32 gradient has the GPU's bits: the claim is untested";

  // A bad target in the third chunk: reported at its batch position, its BF16 row zeroed.
  EXPECT_NO_THROW(chunked.check_ids(vocab, stream));
  targets[60] = static_cast<uint32_t>(vocab + 7);
  d_targets.upload(targets);
  run_chunks(chunked, in.b16, &d_out, grad_scale);
  g16 = download_bits(d_out, rows * vocab);
  EXPECT_TRUE(std::all_of(g16.begin() + 60 * vocab, g16.begin() + 61 * vocab, [](uint16_t b) { return b == 0; }));
  try {
    chunked.check_ids(vocab, stream);
    ADD_FAILURE() << "a bad target was not reported";
  } catch (const std::out_of_range& e) {
    EXPECT_NE(std::string(e.what()).find("position 60"), std::string::npos) << e.what();
  }
}

// The staged kernel (the default where the row fits) against the strided one (the fallback)
// through both calls, bit for bit: the losses' mean, the FP32 gradient in place, the BF16 chunk
// gradient in place (from the logits rounded to BF16), the probabilities (grad_scale 0), losses
// only, and the bad targets reported. Vocabs within one copy chunk, one and a sliver, and GPT-2's;
// more rows than the staged grid holds at once (each block takes several rows). A second batch makes
// the order of the double row sums show in the loss: every row's max (its target, so the loss is
// log(sum) ~ 1e-12) is one thread's first element and every other exp is ~0.6 * 2^-53 (-37.2 and
// its BF16 rounding -37.25), which rounds away when added to that thread's running 1 one at a time,
// and would not all round away in another order.
TEST(CrossEntropyCuda, StagedMatchesStridedBitForBit) {
  std::mt19937_64 rng(fresh_seed());
  Stream stream;
  cuda::CrossEntropyCuda probe;
  ASSERT_TRUE(probe.staged(50304)) << "the staged kernel does not run GPT-2's vocab on this device";
  EXPECT_TRUE(probe.staged(1000));
  EXPECT_FALSE(probe.staged(1003)) << "vocab not a multiple of 4";
  EXPECT_FALSE(probe.staged(1 << 20)) << "row beyond shared memory";
  EXPECT_FALSE(cuda::CrossEntropyCuda(cuda::CrossEntropyKernel::kStrided).staged(1000));
  int sms = 0;
  NIBBLE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  struct Case {
    int64_t vocab, rows;
  };
  // More rows than the staged grid holds (at most 8 blocks per SM, by threads; 1 at vocab 50304).
  for (const Case c : {Case{1000, 8 * sms + 100}, Case{8200, 7 * sms + 50}, Case{50304, 2 * sms + 37}}) {
    for (const bool sensitive : {false, true}) {
      const int64_t rows = c.rows, vocab = c.vocab;
      SCOPED_TRACE("vocab " + std::to_string(vocab) + (sensitive ? ", order-sensitive rows" : ""));
      std::vector<float> logits;
      std::vector<uint32_t> targets(static_cast<size_t>(rows));
      if (sensitive) {
        logits.assign(static_cast<size_t>(rows * vocab), -37.2f);
        for (int64_t r = 0; r < rows; ++r) {
          targets[r] = static_cast<uint32_t>(rng() % 256);
          logits[r * vocab + targets[r]] = 0.0f;
        }
      } else {
        logits = nibble::nn::test::random_normal(rng, rows * vocab, 3.0f);
        for (auto& t : targets) t = static_cast<uint32_t>(rng() % vocab);
        targets[7] = static_cast<uint32_t>(vocab + 3);  // bad targets: row zeroed, first reported
        targets[rows - 2] = ~0u;
      }
      DeviceBuffer<uint32_t> d_targets{std::span<const uint32_t>(targets)};
      std::vector<__nv_bfloat16> logits16(logits.size());  // the chunk path's logits
      for (size_t i = 0; i < logits.size(); ++i)
        logits16[i] = std::bit_cast<__nv_bfloat16>(BF16::encode(logits[i], Rounding::kNearestEven));
      const float grad_scale = 1.0f / static_cast<float>(rows);
      struct Out {
        std::vector<double> loss;  // in place with and without gradient, chunked with, losses only
        std::vector<float> fp32[2];
        std::vector<__nv_bfloat16> bf16;
        std::string bad;
      };
      const auto run = [&](cuda::CrossEntropyKernel kernel) {
        cuda::CrossEntropyCuda ce(kernel);
        Out out;
        DeviceBuffer<double> loss(1);
        for (int i = 0; i < 2; ++i) {
          DeviceBuffer<float> d_logits{std::span<const float>(logits)};
          ce.forward_backward(d_logits.data(), d_targets.data(), rows, vocab, i == 0 ? grad_scale : 0.0f, loss.data(),
                              stream);
          out.loss.push_back(download(loss.data(), 1)[0]);
          out.fp32[i] = download(d_logits.data(), rows * vocab);
        }
        DeviceBuffer<__nv_bfloat16> d_bf16{std::span<const __nv_bfloat16>(logits16)};
        const int64_t chunk = rows / 2 + 1;  // two chunks, the second shorter
        for (int64_t r0 = 0; r0 < rows; r0 += chunk)
          ce.chunk(d_bf16.data() + r0 * vocab, d_targets.data(), r0, std::min(chunk, rows - r0), rows, vocab,
                   grad_scale, d_bf16.data() + r0 * vocab, stream);
        ce.mean(rows, loss.data(), stream);
        out.loss.push_back(download(loss.data(), 1)[0]);
        out.bf16 = download(d_bf16.data(), rows * vocab);
        d_bf16.upload(logits16);
        for (int64_t r0 = 0; r0 < rows; r0 += chunk)
          ce.chunk(d_bf16.data() + r0 * vocab, d_targets.data(), r0, std::min(chunk, rows - r0), rows, vocab, 0.0f,
                   nullptr, stream);
        ce.mean(rows, loss.data(), stream);
        out.loss.push_back(download(loss.data(), 1)[0]);
        try {
          ce.check_ids(vocab, stream);
        } catch (const std::out_of_range& e) {
          out.bad = e.what();
        }
        return out;
      };
      const Out strided = run(cuda::CrossEntropyKernel::kStrided);
      const Out staged = run(cuda::CrossEntropyKernel::kStaged), again = run(cuda::CrossEntropyKernel::kStaged);
      for (size_t i = 0; i < strided.loss.size(); ++i) {
        EXPECT_EQ(std::memcmp(&staged.loss[i], &strided.loss[i], sizeof(double)), 0)
            << "loss " << i << ": staged " << staged.loss[i] << " strided " << strided.loss[i];
        EXPECT_EQ(std::memcmp(&again.loss[i], &staged.loss[i], sizeof(double)), 0) << "loss " << i << ", run 2";
      }
      std::printf("[ compare  ] vocab %lld, %lld rows%s: mean loss staged %.17g, strided %.17g (want equal)\n",
                  static_cast<long long>(vocab), static_cast<long long>(rows), sensitive ? " (order-sensitive)" : "",
                  staged.loss[0], strided.loss[0]);
      expect_bits_equal(staged.fp32[0], strided.fp32[0], "cross-entropy staged gradient, in place");
      expect_bits_equal(staged.fp32[1], strided.fp32[1], "cross-entropy staged probabilities, in place");
      expect_bits_equal(again.fp32[0], staged.fp32[0], "cross-entropy staged gradient, run 2");
      size_t bf16_diff = 0;
      for (size_t i = 0; i < strided.bf16.size(); ++i)
        bf16_diff += std::memcmp(&staged.bf16[i], &strided.bf16[i], 2) != 0 ||
                     std::memcmp(&again.bf16[i], &staged.bf16[i], 2) != 0;
      std::printf("[ compare  ] cross-entropy staged BF16 chunk gradient: %zu elements differ (want 0)\n", bf16_diff);
      EXPECT_EQ(bf16_diff, 0u);
      EXPECT_EQ(staged.bad, strided.bad);
      if (sensitive) {
        EXPECT_TRUE(staged.bad.empty()) << staged.bad;
      } else {
        EXPECT_NE(staged.bad.find("position 7"), std::string::npos) << staged.bad;
      }
    }
  }
}

}  // namespace
}  // namespace nibble::nn

// ---------------------------------------------------------------- optimizer

namespace nibble::train {
namespace {

using nibble::cuda::DeviceBuffer;
using nibble::test::download;
using nibble::nn::expect_bits_equal;
using nibble::test::fresh_seed;

// Three parameters of awkward sizes in one flat array; the middle one is not decayed (a norm gain).
TEST(AdamWCuda, MatchesCpuBitForBit) {
  std::mt19937_64 rng(fresh_seed());
  const std::vector<int64_t> sizes = {1000 * 96, 96, 37 * 5};
  const std::vector<bool> decays = {true, false, true};
  int64_t numel = 0;
  std::vector<cuda::ParamRange> ranges;
  for (size_t i = 0; i < sizes.size(); ++i) {
    ranges.push_back({numel, sizes[i], decays[i]});
    numel += sizes[i];
  }
  std::vector<float> w = nn::test::random_normal(rng, numel, 0.5f), g(static_cast<size_t>(numel));
  std::vector<model::Parameter> params;
  for (size_t i = 0; i < sizes.size(); ++i)
    params.push_back({"p" + std::to_string(i), {sizes[i]}, std::span<float>(w).subspan(ranges[i].offset, sizes[i]),
                      std::span<const float>(g).subspan(ranges[i].offset, sizes[i]), decays[i]});
  const AdamWOptions options{0.9f, 0.95f, 1e-8f, 0.1f};
  AdamW cpu(options);
  cuda::AdamWCuda gpu(options, numel);
  DeviceBuffer<float> d_w{std::span<const float>(w)}, d_g(g.size());
  DeviceBuffer<cuda::StepControl> d_control(1);
  for (int step = 0; step < 3; ++step) {
    const auto grad = nn::test::random_normal(rng, numel, step == 1 ? 1e-3f : 1.0f);
    std::copy(grad.begin(), grad.end(), g.begin());
    d_g.upload(g);
    const double lr = 1e-3 * (step + 1);
    const float mult = step == 2 ? 0.37f : 1.0f;  // a clipping factor on the last step
    d_control.upload(std::vector<cuda::StepControl>{{mult, 0}});
    cpu.step(params, lr, mult);
    gpu.step(d_w.data(), d_g.data(), ranges, lr, step == 2 ? d_control.data() : nullptr, nullptr);
    expect_bits_equal(download(d_w.data(), numel), w, "adamw weights after step " + std::to_string(step + 1));
  }
  // Moments: the CPU's checkpoint tensors, in parameter order.
  std::vector<float> m_cpu, v_cpu;
  for (const auto& [name, tensor] : cpu.state()) {
    if (name.ends_with(".exp_avg")) {
      const auto f = tensor.to_f32();
      m_cpu.insert(m_cpu.end(), f.begin(), f.end());
    } else if (name.ends_with(".exp_avg_sq")) {
      const auto f = tensor.to_f32();
      v_cpu.insert(v_cpu.end(), f.begin(), f.end());
    }
  }
  expect_bits_equal(download(gpu.exp_avg(), numel), m_cpu, "adamw exp_avg");
  expect_bits_equal(download(gpu.exp_avg_sq(), numel), v_cpu, "adamw exp_avg_sq");
  EXPECT_EQ(gpu.steps(), cpu.steps());
}

// The engine's form: tensors in separate allocations, updated in one launch from a table of segments,
// with the list of tensors changing between steps (the table is uploaded again) and an empty tensor.
TEST(AdamWCuda, TensorsInSeparateAllocationsMatchCpuBitForBit) {
  std::mt19937_64 rng(fresh_seed());
  const std::vector<int64_t> sizes = {3 * 1024 + 5, 1, 0, 2048, 333};
  const std::vector<bool> decays = {true, false, true, false, true};
  const std::vector<std::string> names = {"a", "b", "c", "d", "e"};
  const AdamWOptions options{0.9f, 0.95f, 1e-8f, 0.1f};
  std::vector<std::vector<float>> w, g;
  std::vector<DeviceBuffer<float>> d_w, d_g;
  std::vector<int64_t> offsets;
  int64_t numel = 0;
  for (int64_t n : sizes) {
    w.push_back(nn::test::random_normal(rng, n, 0.5f));
    g.emplace_back(static_cast<size_t>(n));
    d_w.emplace_back(std::span<const float>(w.back()));
    d_g.emplace_back(static_cast<size_t>(n));
    offsets.push_back(numel);
    numel += n;
  }
  AdamW cpu(options);
  cuda::AdamWCuda gpu(options, numel);
  const std::vector<std::vector<size_t>> lists = {{0, 1, 2, 3, 4}, {4, 0, 2}, {0, 1, 2, 3, 4}};
  for (size_t step = 0; step < lists.size(); ++step) {
    std::vector<model::Parameter> params;
    std::vector<cuda::ParamTensor> tensors;
    for (size_t i : lists[step]) {
      g[i] = nn::test::random_normal(rng, sizes[i], 1.0f);
      if (sizes[i] > 0) d_g[i].upload(g[i]);
      params.push_back({names[i], {sizes[i]}, w[i], g[i], decays[i]});
      tensors.push_back({d_w[i].data(), d_g[i].data(), sizes[i], decays[i], offsets[i]});
    }
    const double lr = 1e-3 * static_cast<double>(step + 1);
    cpu.step(params, lr, 1.0f);
    gpu.step(tensors, lr, nullptr, nullptr);
    for (size_t i = 0; i < sizes.size(); ++i) {
      char what[64];
      std::snprintf(what, sizeof what, "tensor %zu after step %zu", i, step + 1);
      if (sizes[i] > 0) expect_bits_equal(download(d_w[i].data(), sizes[i]), w[i], what);
    }
  }
}

// ParamTensor::amax: the step writes max |w| of the updated tensor into the slot's word 0 (the
// bits of the maximum of |w| over the downloaded values; NaN where w holds one), leaves word 1 as it
// was, and zeroes both words of amax.zero_next; tensors without a slot are updated alike.
TEST(AdamWCuda, WritesTheUpdatedTensorsAmax) {
  std::mt19937_64 rng(fresh_seed());
  const std::vector<int64_t> sizes = {3 * 1024 + 5, 2048, 333};
  std::vector<DeviceBuffer<float>> d_w, d_g;
  int64_t numel = 0;
  for (int64_t n : sizes) {
    std::vector<float> w = nn::test::random_normal(rng, n, 0.5f);
    w[static_cast<size_t>(rng() % n)] = (rng() & 1 ? 1.0f : -1.0f) * 40.0f;  // a peak somewhere, either sign
    d_w.emplace_back(std::span<const float>(w));
    const std::vector<float> g = nn::test::random_normal(rng, n, 1.0f);
    d_g.emplace_back(std::span<const float>(g));
    numel += n;
  }
  cuda::AdamWCuda gpu(AdamWOptions{}, numel);
  for (const bool with_nan : {false, true}) {
    SCOPED_TRACE(with_nan ? "a NaN in tensor 0" : "finite");
    if (with_nan) {
      const float nan = std::numeric_limits<float>::quiet_NaN();
      NIBBLE_CUDA_CHECK(cudaMemcpy(d_w[0].data() + 17, &nan, sizeof nan, cudaMemcpyHostToDevice));
    }
    // Slots 0 and 1 for tensors 0 and 2 (current, zero_next); junk everywhere first but in the
    // current slots' word 0, which the caller's slot protocol hands over zeroed.
    std::vector<uint32_t> init(8, 0xDEADBEEFu);
    init[0] = init[4] = 0;
    DeviceBuffer<uint32_t> words{std::span<const uint32_t>(init)};
    std::vector<cuda::ParamTensor> tensors;
    int64_t offset = 0;
    for (size_t i = 0; i < sizes.size(); ++i) {
      tensors.push_back({d_w[i].data(), d_g[i].data(), sizes[i], true, offset});
      offset += sizes[i];
    }
    tensors[0].amax = {words.data(), words.data() + 2};
    tensors[2].amax = {words.data() + 4, words.data() + 6};
    gpu.step(tensors, 1e-3, nullptr, nullptr);
    const std::vector<uint32_t> got = download(words.data(), 8);
    for (const auto& [t, slot] : {std::pair{0, 0}, std::pair{2, 4}}) {
      const std::vector<float> w = download(d_w[t].data(), sizes[t]);
      uint32_t want = 0;
      for (float v : w) want = std::isnan(v) ? 0x7FFFFFFFu : std::max(want, std::bit_cast<uint32_t>(std::fabs(v)));
      EXPECT_EQ(got[slot], want) << "tensor " << t << "'s amax";
      EXPECT_EQ(got[slot + 1], 0xDEADBEEFu) << "tensor " << t << "'s second word";
      EXPECT_EQ(got[slot + 2], 0u) << "tensor " << t << "'s next slot";
      EXPECT_EQ(got[slot + 3], 0u) << "tensor " << t << "'s next slot";
    }
  }
  std::vector<cuda::ParamTensor> bad = {{d_w[0].data(), d_g[0].data(), sizes[0], true, 0}};
  uint32_t* dummy = reinterpret_cast<uint32_t*>(d_g[0].data());
  bad[0].amax = {dummy, nullptr};
  EXPECT_THROW(gpu.step(bad, 1e-3, nullptr, nullptr), std::invalid_argument);
}

// One launch zeroes every array it is given, of sizes below, at and across its blocks' chunks of
// 4096 elements, and nothing around them: the arrays are pieces of one buffer of random values with
// gaps between them; a second call with another list zeroes only that list.
TEST(GradZeroCuda, ZeroesTheArraysAndNothingElse) {
  std::mt19937_64 rng(fresh_seed());
  const std::vector<std::pair<int64_t, int64_t>> pieces = {{0, 1}, {3, 4096}, {4100, 4097}, {8200, 20000}, {28300, 0}};
  std::vector<float> host = nn::test::random_normal(rng, 30000, 1.0f);
  for (float& v : host) v = v == 0.0f ? 1.0f : v;  // no zeros before the call
  DeviceBuffer<float> buf{std::span<const float>(host)};
  std::vector<cuda::GradSpan> arrays;
  for (const auto& [offset, count] : pieces) arrays.push_back({buf.data() + offset, count});
  cuda::GradZeroCuda zero;
  zero.zero(arrays, nullptr);
  std::vector<float> want = host;
  for (const auto& [offset, count] : pieces) std::fill_n(want.begin() + offset, count, 0.0f);
  expect_bits_equal(download(buf.data(), static_cast<int64_t>(host.size())), want, "after zeroing the arrays");
  buf.upload(std::span<const float>(host));
  zero.zero(std::vector<cuda::GradSpan>{arrays[2]}, nullptr);  // another table
  want = host;
  std::fill_n(want.begin() + pieces[2].first, pieces[2].second, 0.0f);
  expect_bits_equal(download(buf.data(), static_cast<int64_t>(host.size())), want, "after zeroing one array");
}

// Both sides sum squares in double (different orders: ~1e-16 relative); the GPU's order is fixed,
// so two runs agree bit for bit.
TEST(GradNormCuda, MatchesCpuAndIsDeterministic) {
  std::mt19937_64 rng(fresh_seed());
  const std::vector<int64_t> sizes = {1000 * 96 + 3, 96, 1, 37 * 5};
  std::vector<std::vector<float>> grads;
  std::vector<DeviceBuffer<float>> device;
  std::vector<std::vector<float>> values;
  std::vector<model::Parameter> params;
  std::vector<cuda::GradSpan> spans;
  for (int64_t n : sizes) {
    grads.push_back(nn::test::random_normal(rng, n, 0.01f));
    values.emplace_back(static_cast<size_t>(n));
  }
  for (size_t i = 0; i < sizes.size(); ++i) {
    device.emplace_back(std::span<const float>(grads[i]));
    spans.push_back({device[i].data(), sizes[i]});
    params.push_back({"g" + std::to_string(i), {sizes[i]}, values[i], grads[i], true});
  }
  const double want = global_grad_norm(params);
  cuda::GradNormCuda norm;
  DeviceBuffer<double> out(2), sub(1);
  norm.compute(spans, out.data(), nullptr);
  norm.compute(std::vector<cuda::GradSpan>{spans[3], spans[0]}, sub.data(), nullptr);  // another table between
  norm.compute(spans, out.data() + 1, nullptr);
  const auto got = download(out.data(), 2);
  std::printf("[ compare  ] grad norm gpu %.17g cpu %.17g (rel err %.2e, tol 1e-12)\n", got[0], want,
              std::fabs(got[0] - want) / want);
  EXPECT_NEAR(got[0], want, 1e-12 * want);
  EXPECT_EQ(std::memcmp(&got[0], &got[1], sizeof(double)), 0) << "two runs differ";
  const double want_sub = global_grad_norm(std::vector<model::Parameter>{params[3], params[0]});
  EXPECT_NEAR(download(sub.data(), 1)[0], want_sub, 1e-12 * want_sub) << "norm of two of the arrays";

}

// step_control decides as the trainer does: the clipping factor for a threshold below, above and
// off the norm; the update skipped where one micro-batch's loss or the norm is NaN or infinite (and
// only there). The CPU engine applies the same rule (train/engine.h).
TEST(StepControl, ClipsAndSkipsAsTheTrainer) {
  std::mt19937_64 rng(fresh_seed());
  std::uniform_real_distribution<double> u(0.5, 11.0);
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  DeviceBuffer<double> d_losses(3), d_norm(1);
  DeviceBuffer<cuda::StepControl> d_control(1);
  const auto control = [&](const std::vector<double>& losses, double norm, double clip) {
    d_losses.upload(losses);
    d_norm.upload(std::vector<double>{norm});
    cuda::step_control(d_losses.data(), static_cast<int>(losses.size()), d_norm.data(), clip, d_control.data(),
                       nullptr);
    return download(d_control.data(), 1)[0];
  };
  const std::vector<double> losses = {u(rng), u(rng), u(rng)};
  const double norm = u(rng);
  for (const double clip : {0.5 * norm, 2.0 * norm, 0.0}) {
    const cuda::StepControl c = control(losses, norm, clip);
    const float expected = clip > 0 && norm > clip ? static_cast<float>(clip / norm) : 1.0f;
    EXPECT_EQ(c.grad_multiplier, expected) << "clip " << clip;
    EXPECT_EQ(c.skip, 0u) << "clip " << clip;
  }
  for (const double bad : {nan, inf, -inf}) {
    for (size_t i = 0; i < losses.size(); ++i) {
      std::vector<double> l = losses;
      l[i] = bad;
      EXPECT_NE(control(l, norm, 1.0).skip, 0u) << "loss " << i << " = " << bad;
    }
    EXPECT_NE(control(losses, bad, 1.0).skip, 0u) << "norm " << bad;
  }
  // Finite losses whose step loss is finite, at the edge of what a double holds: not skipped.
  EXPECT_EQ(control({1e308, 1e308, 1e308}, norm, 0.0).skip, 0u);
  EXPECT_THROW(cuda::step_control(d_losses.data(), 0, d_norm.data(), 1.0, d_control.data(), nullptr),
               std::invalid_argument);
}

// A skipped step (StepControl::skip) leaves weights and moments as they were, bit for bit, and
// still writes each tensor's amax and BF16 copy; after undo_step() the next step matches the CPU
// optimizer's (which never took the skipped one), bias corrections included. The BF16 copy is the
// nearest-even rounding of the weights after each step.
TEST(AdamWCuda, SkippedStepChangesNothingButWritesTheAmax) {
  std::mt19937_64 rng(fresh_seed());
  const int64_t n = 3 * 1024 + 7;
  std::vector<float> w = nn::test::random_normal(rng, n, 0.5f), g(static_cast<size_t>(n));
  const AdamWOptions options{0.9f, 0.95f, 1e-8f, 0.1f};
  AdamW cpu(options);
  cuda::AdamWCuda gpu(options, n);
  DeviceBuffer<float> d_w{std::span<const float>(w)}, d_g(g.size());
  DeviceBuffer<cuda::StepControl> d_control(1);
  std::vector<uint32_t> init(4, 0xDEADBEEFu);
  init[0] = init[2] = 0;
  DeviceBuffer<uint32_t> words{std::span<const uint32_t>(init)};
  DeviceBuffer<bf16_t> copy(static_cast<size_t>(n));
  for (int step = 0; step < 3; ++step) {
    const bool skip = step == 1;
    SCOPED_TRACE("step " + std::to_string(step + 1) + (skip ? " (skipped)" : ""));
    g = nn::test::random_normal(rng, n, 1.0f);
    d_g.upload(g);
    const std::vector<float> w_before = download(d_w.data(), n), m_before = download(gpu.exp_avg(), n),
                             v_before = download(gpu.exp_avg_sq(), n);
    d_control.upload(std::vector<cuda::StepControl>{{0.5f, skip ? 1u : 0u}});
    // The amax slots alternate between steps, as the engine's do.
    std::vector<cuda::ParamTensor> tensors = {{d_w.data(), d_g.data(), n, true, 0}};
    tensors[0].amax = step % 2 == 0 ? nibble::cuda::AmaxSlots{words.data(), words.data() + 2}
                                    : nibble::cuda::AmaxSlots{words.data() + 2, words.data()};
    tensors[0].bf16 = copy.data();
    copy.upload(std::vector<bf16_t>(static_cast<size_t>(n), bf16_t{0x7FC1}));  // a NaN the step never writes
    gpu.step(tensors, 1e-2, d_control.data(), nullptr);
    const std::vector<float> w_after = download(d_w.data(), n);
    EXPECT_EQ(nn::download_bits(copy, n), nn::rounded(w_after)) << "the BF16 copy";
    if (skip) {
      gpu.undo_step();
      expect_bits_equal(w_after, w_before, "weights");
      expect_bits_equal(download(gpu.exp_avg(), n), m_before, "exp_avg");
      expect_bits_equal(download(gpu.exp_avg_sq(), n), v_before, "exp_avg_sq");
    } else {
      std::vector<model::Parameter> params = {{"p", {n}, w, g, true}};
      cpu.step(params, 1e-2, 0.5f);
      expect_bits_equal(w_after, w, "weights against the CPU's");
    }
    uint32_t want = 0;
    for (float v : w_after) want = std::max(want, std::bit_cast<uint32_t>(std::fabs(v)));
    const std::vector<uint32_t> got = download(words.data(), 4);
    EXPECT_EQ(got[step % 2 == 0 ? 0 : 2], want) << "the amax";
    EXPECT_EQ(got[step % 2 == 0 ? 2 : 0], 0u) << "the next slot, zeroed";
    EXPECT_EQ(gpu.steps(), cpu.steps());
  }
}

}  // namespace
}  // namespace nibble::train
