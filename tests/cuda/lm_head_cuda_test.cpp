// The chunked LM head and loss (nn/cuda/lm_head_cuda.h) against the unchunked head it replaced
// (LinearCuda under the bf16 recipe, its FP32 logits rounded to BF16 as the chunked head's GEMM
// writes them, CrossEntropyCuda::forward_backward on them) and against exact sums, with chunk sizes
// that do and do not divide the rows (needs a GPU; ctest label "gpu").
//
// The inputs are drawn on a grid: H and W hold multiples of 2^-6 in [-1/2, 1/2] (exact in BF16).
// Every product is then a multiple of 2^-12 below 1/4 in magnitude and every logit, a sum of
// d = 96 of them, a multiple of 2^-12 below 24: exact in FP32 whatever the order of the additions
// or the GEMM kernel. So all chunkings see the same logits bit for bit (and the same BF16 roundings
// of them), the loss kernel makes the same losses and the same BF16 dlogits from them, and the only
// differences left are the backward GEMMs' FP32 accumulation orders. That makes the checks exact or
// rigorous:
// - the loss equals the unchunked head's bit for bit (training and evaluation);
// - dH and dW are held to the exact sums (in double, from the BF16 dlogits of the unchunked path)
//   within the bound of any FP32 evaluation order: |got - exact| <= 2 (k + 1) 2^-24 sum|terms|
//   (Higham's gamma_k with k terms, the +1 for dW's starting value; the factor 2 is headroom for
//   the tensor cores' accumulation). Chunking, wrong rows or a lost chunk give errors of the size
//   of the values themselves, far above that bound.
#include "nibble/nn/cuda/lm_head_cuda.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "nibble/formats/minifloat.h"
#include "nibble/nn/cuda/linear_cuda.h"
#include "nibble/nn/recipe.h"
#include "cuda/cuda_test_util.h"
#include "nn/nn_test_util.h"
#include "test_seed.h"

namespace nibble::nn {
namespace {

using cuda::DeviceBuffer;

using nibble::test::download;

std::vector<float> grid_values(std::mt19937_64& rng, int64_t n) {
  std::uniform_int_distribution<int> q(-32, 32);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = std::ldexp(static_cast<float>(q(rng)), -6);
  return v;
}

// Exact sums (double) and sums of |terms| of C = A^T B or A B for the bound.
struct Exact {
  std::vector<double> value, abs_sum;
};

// Checks got against exact + start within 2 (k + 1) 2^-24 (abs_sum + |start|) per element; prints the
// worst ratio error / bound and the normwise relative difference to `other` (the unchunked result).
void expect_within_bound(const std::vector<float>& got, const Exact& exact, const std::vector<float>& start, int64_t k,
                         const std::vector<float>& other, const std::string& what) {
  ASSERT_EQ(got.size(), exact.value.size()) << what;
  const double u = std::ldexp(1.0, -24);
  double worst = 0, diff_other = 0, scale = 0;
  size_t worst_i = 0, violations = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double s = start.empty() ? 0.0 : start[i];
    const double want = exact.value[i] + s;
    const double bound = 2.0 * static_cast<double>(k + 1) * u * (exact.abs_sum[i] + std::fabs(s)) + 1e-30;
    const double ratio = std::fabs(got[i] - want) / bound;
    if (!(ratio <= 1.0)) ++violations;
    if (!(ratio <= worst)) worst = ratio, worst_i = i;
    diff_other = std::max(diff_other, std::fabs(static_cast<double>(got[i]) - other[i]));
    scale = std::max(scale, std::fabs(want));
  }
  std::printf("[ compare  ] %-40s worst |err| / bound %.3f (want <= 1), max |diff| to unchunked / max %.2e\n",
              what.c_str(), worst, diff_other / scale);
  EXPECT_EQ(violations, 0u) << what << ": worst element " << worst_i << " got " << got[worst_i] << " want "
                            << exact.value[worst_i] + (start.empty() ? 0.0 : start[worst_i]);
}

struct Shape {
  int64_t rows, d, vocab;
};

class LmHeadLossCudaTest : public ::testing::TestWithParam<Shape> {};

TEST_P(LmHeadLossCudaTest, ChunkedMatchesUnchunkedHead) {
  const auto [rows, d, vocab] = GetParam();
  ASSERT_LE(d * 32 * 32, 1 << 24) << "the logits must stay exact in FP32 (see the file comment)";
  std::mt19937_64 rng(test::fresh_seed());
  const std::vector<float> h = grid_values(rng, rows * d), w = grid_values(rng, vocab * d);
  // dW accumulates onto g0, drawn at about dW's own size (|dlogits| ~ 0.5 / vocab, sqrt(rows) terms of
  // |h| ~ 0.3) so that the bound, which grows with |g0|, stays tight on dW's part.
  const std::vector<float> g0 = test::random_normal(rng, vocab * d, 1e-3f);
  std::vector<uint32_t> targets(static_cast<size_t>(rows));
  for (auto& t : targets) t = static_cast<uint32_t>(rng() % static_cast<uint64_t>(vocab));
  const float grad_scale = 0.5f;  // the model passes grad_scale / rows; any scale does here
  cudaStream_t stream = nullptr;
  DeviceBuffer<float> d_h{std::span<const float>(h)}, d_w{std::span<const float>(w)};
  DeviceBuffer<uint32_t> d_targets{std::span<const uint32_t>(targets)};

  // The unchunked head, as GptCuda ran it before, with its logits rounded to BF16 in between.
  cuda::LinearContext ctx;
  cuda::LinearCuda ref(d, vocab, preset("bf16"), LinearOptions{}, ctx);
  ref.upload_weight(w);
  cuda::CrossEntropyCuda ce;
  DeviceBuffer<float> d_logits(static_cast<size_t>(rows * vocab)), d_dh_ref(static_cast<size_t>(rows * d));
  DeviceBuffer<double> d_loss(1);
  ref.forward(d_h.data(), rows, d_logits.data(), stream);
  std::vector<float> logits = download(d_logits.data(), rows * vocab);
  size_t inexact = 0;  // logits that BF16 does not hold: the rounding is exercised
  for (float& z : logits) {
    const float r = BF16::decode(BF16::encode(z, Rounding::kNearestEven));
    inexact += r != z;
    z = r;
  }
  EXPECT_GT(inexact, logits.size() / 2);
  d_logits.upload(logits);
  ce.forward_backward(d_logits.data(), d_targets.data(), rows, vocab, grad_scale, d_loss.data(), stream);
  const double loss_ref = download(d_loss.data(), 1)[0];
  const std::vector<float> dlogits32 = download(d_logits.data(), rows * vocab);
  ref.backward(d_logits.data(), d_dh_ref.data(), stream);
  const std::vector<float> dh_ref = download(d_dh_ref.data(), rows * d), dw_ref = download(ref.weight_grad(), vocab * d);
  ce.check_ids(vocab, stream);

  // Exact dH = dlogits W and dW = dlogits^T H from the BF16 dlogits both paths feed their GEMMs.
  std::vector<double> dl(dlogits32.size());
  for (size_t i = 0; i < dl.size(); ++i) dl[i] = BF16::decode(BF16::encode(dlogits32[i], Rounding::kNearestEven));
  Exact dh_exact{std::vector<double>(h.size()), std::vector<double>(h.size())};
  Exact dw_exact{std::vector<double>(w.size()), std::vector<double>(w.size())};
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t v = 0; v < vocab; ++v) {
      const double g = dl[r * vocab + v];
      for (int64_t c = 0; c < d; ++c) {
        const double a = g * w[v * d + c], b = g * h[r * d + c];
        dh_exact.value[r * d + c] += a;
        dh_exact.abs_sum[r * d + c] += std::fabs(a);
        dw_exact.value[v * d + c] += b;
        dw_exact.abs_sum[v * d + c] += std::fabs(b);
      }
    }
  // The premise: the unchunked path itself is within the bound.
  expect_within_bound(dh_ref, dh_exact, {}, vocab, dh_ref, "unchunked dH");
  expect_within_bound(dw_ref, dw_exact, {}, rows, dw_ref, "unchunked dW");

  nibble::cuda::GemmRunner gemm;
  // One chunk (chunk >= rows), chunks dividing the rows or not, and tiny ones.
  for (const int64_t chunk : {rows + 5, int64_t{128}, int64_t{64}, int64_t{37}, int64_t{7}}) {
    SCOPED_TRACE("chunk rows " + std::to_string(chunk));
    const std::string tag = "chunk " + std::to_string(chunk) + " ";
    cuda::LmHeadLossCuda head(d, vocab, gemm);
    head.set_chunk_rows(chunk);
    DeviceBuffer<float> d_dh(static_cast<size_t>(rows * d)), d_dw{std::span<const float>(g0)};
    DeviceBuffer<double> d_l(1), d_l_eval(1);
    head.forward_backward(d_w.data(), d_h.data(), d_targets.data(), rows, grad_scale, d_l.data(), d_dh.data(),
                          d_dw.data(), stream);
    head.loss(d_w.data(), d_h.data(), d_targets.data(), rows, d_l_eval.data(), stream);
    const double l = download(d_l.data(), 1)[0], l_eval = download(d_l_eval.data(), 1)[0];
    std::printf("[ compare  ] chunk %4lld rows: loss %.17g, eval %.17g, unchunked %.17g (want equal)\n",
                static_cast<long long>(chunk), l, l_eval, loss_ref);
    EXPECT_EQ(l, loss_ref);
    EXPECT_EQ(l_eval, loss_ref);
    std::vector<float> dw_ref_g0(dw_ref.size());  // the unchunked dW started from zero
    for (size_t i = 0; i < dw_ref.size(); ++i) dw_ref_g0[i] = dw_ref[i] + g0[i];
    expect_within_bound(download(d_dh.data(), rows * d), dh_exact, {}, vocab, dh_ref, tag + "dH");
    expect_within_bound(download(d_dw.data(), vocab * d), dw_exact, g0, rows, dw_ref_g0, tag + "dW (+= start)");
    EXPECT_NO_THROW(head.check_ids(stream));
    std::printf("[ memory   ] chunk %4lld rows: chunk buffers %lld bytes, unchunked FP32 logits %lld bytes\n",
                static_cast<long long>(chunk), static_cast<long long>(head.chunk_buffer_bytes()),
                static_cast<long long>(rows * vocab * 4));
  }
}

// GPT-2-like proportions at test size; an odd vocabulary (odd BF16 leading dimensions) as well.
INSTANTIATE_TEST_SUITE_P(Shapes, LmHeadLossCudaTest,
                         ::testing::Values(Shape{300, 96, 1000}, Shape{200, 64, 1003}),
                         [](const auto& info) {
                           return "rows" + std::to_string(info.param.rows) + "_d" + std::to_string(info.param.d) +
                                  "_vocab" + std::to_string(info.param.vocab);
                         });

TEST(LmHeadLossCuda, DefaultChunkRows) {
  // GPT-2's padded vocabulary: floor(512 MiB / (50304 x 2 B)) = 5336 rows, down to a multiple of 64.
  EXPECT_EQ(cuda::LmHeadLossCuda::default_chunk_rows(50304), 5312);
  EXPECT_EQ(cuda::LmHeadLossCuda::default_chunk_rows(8192), 32768);
  EXPECT_EQ(cuda::LmHeadLossCuda::default_chunk_rows(int64_t{1} << 30), 64);  // at least 64
}

TEST(LmHeadLossCuda, ChunksOfEqualSize) {
  nibble::cuda::GemmRunner gemm;
  cuda::LmHeadLossCuda head(768, 50304, gemm);
  EXPECT_EQ(head.rows_per_chunk(16384), 4096);  // GPT-2 at 16 x 1024 tokens: 4 chunks, not 3 of 5312 and 448
  EXPECT_EQ(head.rows_per_chunk(5312), 5312);
  EXPECT_EQ(head.rows_per_chunk(5313), 2657);  // 2657 + 2656
  EXPECT_EQ(head.rows_per_chunk(1), 1);
  head.set_chunk_rows(64);
  EXPECT_EQ(head.rows_per_chunk(300), 60);
  EXPECT_EQ(head.rows_per_chunk(64), 64);
  EXPECT_EQ(head.rows_per_chunk(65), 33);  // 33 + 32
}

// A bad target fails with its position in the batch, not in its chunk; the head then works again.
TEST(LmHeadLossCuda, RejectsOutOfRangeTargets) {
  const int64_t rows = 100, d = 32, vocab = 50;
  std::mt19937_64 rng(test::fresh_seed());
  const std::vector<float> h = test::random_normal(rng, rows * d), w = test::random_normal(rng, vocab * d, 0.1f);
  std::vector<uint32_t> targets(static_cast<size_t>(rows), 3);
  targets[77] = static_cast<uint32_t>(vocab);
  DeviceBuffer<float> d_h{std::span<const float>(h)}, d_w{std::span<const float>(w)};
  DeviceBuffer<float> d_dh(static_cast<size_t>(rows * d)), d_dw(static_cast<size_t>(vocab * d));
  d_dw.zero();
  DeviceBuffer<uint32_t> d_targets{std::span<const uint32_t>(targets)};
  DeviceBuffer<double> d_l(1);
  nibble::cuda::GemmRunner gemm;
  cuda::LmHeadLossCuda head(d, vocab, gemm);
  head.set_chunk_rows(30);
  head.forward_backward(d_w.data(), d_h.data(), d_targets.data(), rows, 1.0f / rows, d_l.data(), d_dh.data(),
                        d_dw.data(), nullptr);
  try {
    head.check_ids(nullptr);
    ADD_FAILURE() << "the bad target was not reported";
  } catch (const std::out_of_range& e) {
    EXPECT_NE(std::string(e.what()).find("position 77"), std::string::npos) << e.what();
  }
  targets[77] = 4;
  d_targets.upload(targets);
  head.loss(d_w.data(), d_h.data(), d_targets.data(), rows, d_l.data(), nullptr);
  EXPECT_NO_THROW(head.check_ids(nullptr));
  EXPECT_TRUE(std::isfinite(download(d_l.data(), 1)[0]));
}

// The head keeps a BF16 copy of the weight: weight_changed() (called by GptCuda after every
// optimizer step) must make the next call re-read it; without it, the old copy is used. A head that
// never saw the old weight gives the reference bits.
TEST(LmHeadLossCuda, WeightChangedRereadsTheWeight) {
  const int64_t rows = 64, d = 32, vocab = 40;
  std::mt19937_64 rng(test::fresh_seed());
  const std::vector<float> h = test::random_normal(rng, rows * d), w1 = test::random_normal(rng, vocab * d, 0.5f),
                           w2 = test::random_normal(rng, vocab * d, 0.5f);
  std::vector<uint32_t> targets(static_cast<size_t>(rows));
  for (auto& t : targets) t = static_cast<uint32_t>(rng() % static_cast<uint64_t>(vocab));
  DeviceBuffer<float> d_h{std::span<const float>(h)}, d_w{std::span<const float>(w1)};
  DeviceBuffer<uint32_t> d_targets{std::span<const uint32_t>(targets)};
  DeviceBuffer<double> d_l(1);
  nibble::cuda::GemmRunner gemm;
  cuda::LmHeadLossCuda head(d, vocab, gemm), fresh(d, vocab, gemm);
  const auto loss = [&](cuda::LmHeadLossCuda& x) {
    x.loss(d_w.data(), d_h.data(), d_targets.data(), rows, d_l.data(), nullptr);
    return download(d_l.data(), 1)[0];
  };
  const double l1 = loss(head);
  d_w.upload(w2);
  const double stale = loss(head);
  head.weight_changed();
  const double l2 = loss(head), want = loss(fresh);
  std::printf("[ compare  ] loss with w1 %.17g, w2 before weight_changed %.17g, after %.17g, fresh head %.17g\n", l1,
              stale, l2, want);
  EXPECT_EQ(stale, l1) << "the BF16 copy is kept until weight_changed()";
  EXPECT_EQ(l2, want);
  EXPECT_NE(l2, l1);
  // grad_scale 0 would make the loss kernel write probabilities where the gradient goes.
  DeviceBuffer<float> d_dh(static_cast<size_t>(rows * d)), d_dw(static_cast<size_t>(vocab * d));
  EXPECT_THROW(head.forward_backward(d_w.data(), d_h.data(), d_targets.data(), rows, 0.0f, d_l.data(), d_dh.data(),
                                     d_dw.data(), nullptr),
               std::invalid_argument);
}

// The GPU model's final norm writes the head's input in BF16 into bf16_hidden(): the *_bf16_hidden
// calls on hidden rounded to nearest even give the FP32 forms' bits (loss, dH, dW onto a start),
// in chunks that do not divide the rows; a call for more rows than bf16_hidden() handed out is refused.
TEST(LmHeadLossCuda, Bf16HiddenGivesTheFp32FormsBits) {
  const int64_t rows = 150, d = 64, vocab = 300;
  std::mt19937_64 rng(test::fresh_seed());
  const std::vector<float> h = test::random_normal(rng, rows * d), w = test::random_normal(rng, vocab * d, 0.2f),
                           g0 = test::random_normal(rng, vocab * d, 1e-3f);
  std::vector<uint16_t> h16(h.size());
  for (size_t i = 0; i < h.size(); ++i) h16[i] = BF16::encode(h[i], Rounding::kNearestEven);
  std::vector<uint32_t> targets(static_cast<size_t>(rows));
  for (auto& t : targets) t = static_cast<uint32_t>(rng() % static_cast<uint64_t>(vocab));
  DeviceBuffer<float> d_h{std::span<const float>(h)}, d_w{std::span<const float>(w)};
  DeviceBuffer<uint32_t> d_targets{std::span<const uint32_t>(targets)};
  nibble::cuda::GemmRunner gemm;
  struct Result {
    double loss, eval;
    std::vector<float> dh, dw;
  };
  const auto run = [&](bool bf16) {
    cuda::LmHeadLossCuda head(d, vocab, gemm);
    head.set_chunk_rows(64);
    DeviceBuffer<float> d_dh(static_cast<size_t>(rows * d)), d_dw{std::span<const float>(g0)};
    DeviceBuffer<double> d_l(2);
    if (bf16) {
      EXPECT_THROW(head.loss_bf16_hidden(d_w.data(), d_targets.data(), rows, d_l.data(), nullptr), std::logic_error);
      head.bf16_hidden(rows - 1);  // fewer rows handed out than then asked for
      EXPECT_THROW(head.loss_bf16_hidden(d_w.data(), d_targets.data(), rows, d_l.data(), nullptr), std::logic_error);
      NIBBLE_CUDA_CHECK(cudaMemcpy(head.bf16_hidden(rows), h16.data(), h16.size() * 2, cudaMemcpyHostToDevice));
      head.forward_backward_bf16_hidden(d_w.data(), d_targets.data(), rows, 0.25f, d_l.data(), d_dh.data(),
                                        d_dw.data(), nullptr);
      head.loss_bf16_hidden(d_w.data(), d_targets.data(), rows, d_l.data() + 1, nullptr);
    } else {
      head.forward_backward(d_w.data(), d_h.data(), d_targets.data(), rows, 0.25f, d_l.data(), d_dh.data(),
                            d_dw.data(), nullptr);
      head.loss(d_w.data(), d_h.data(), d_targets.data(), rows, d_l.data() + 1, nullptr);
    }
    const std::vector<double> l = download(d_l.data(), 2);
    return Result{l[0], l[1], download(d_dh.data(), rows * d), download(d_dw.data(), vocab * d)};
  };
  const Result fp32 = run(false), bf16 = run(true);
  std::printf("[ compare  ] loss FP32 hidden %.17g, BF16 hidden %.17g (want equal)\n", fp32.loss, bf16.loss);
  EXPECT_EQ(bf16.loss, fp32.loss);
  EXPECT_EQ(bf16.eval, fp32.eval);
  EXPECT_EQ(bf16.loss, bf16.eval);
  EXPECT_EQ(bf16.dh, fp32.dh);
  EXPECT_EQ(bf16.dw, fp32.dw);
  EXPECT_NE(bf16.dw, g0);
}

}  // namespace
}  // namespace nibble::nn
