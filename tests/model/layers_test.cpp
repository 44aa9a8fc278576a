// The transformer layers' backward passes against finite differences (see gradcheck.h for the
// tolerances), under the fp32 recipe so that the linear layers add no quantization.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "model/gradcheck.h"
#include "nibble/nn/attention.h"
#include "nibble/nn/embedding.h"
#include "nibble/nn/loss.h"
#include "nibble/nn/mlp.h"
#include "nibble/nn/norm.h"
#include "nn/nn_test_util.h"

namespace nibble::nn {
namespace {

using model::test::check_gradient;
using model::test::dot;
using test::fresh_seed;
using test::random_normal;

void randomize(std::span<float> w, std::mt19937_64& rng, float stddev) {
  const auto v = random_normal(rng, static_cast<int64_t>(w.size()), stddev);
  std::copy(v.begin(), v.end(), w.begin());
}

TEST(Embedding, BackwardMatchesFiniteDifferences) {
  std::mt19937_64 rng(fresh_seed());
  Embedding emb(11, 6);
  randomize(emb.weight(), rng, 1.0f);
  std::vector<uint32_t> ids(20);
  for (auto& id : ids) id = static_cast<uint32_t>(rng() % 11);  // repeats: gradients must add up
  const auto r = random_normal(rng, 20 * 6);
  std::vector<float> out(20 * 6);
  emb.forward(ids, out);
  emb.backward(ids, r);
  check_gradient(emb.weight(), emb.weight_grad(), [&] {
    emb.forward(ids, out);
    return dot(r, out);
  }, rng, 40, "embedding weight");
  EXPECT_THROW(emb.forward(std::vector<uint32_t>{11}, std::span<float>(out.data(), 6)), std::out_of_range);
}

class NormTest : public ::testing::TestWithParam<NormKind> {};

TEST_P(NormTest, BackwardMatchesFiniteDifferences) {
  std::mt19937_64 rng(fresh_seed());
  const int64_t rows = 7, dim = 24;
  Norm norm(dim, GetParam());
  randomize(norm.weight(), rng, 1.0f);
  randomize(norm.bias(), rng, 1.0f);
  auto x = random_normal(rng, rows * dim, 2.0f);
  for (int64_t i = 0; i < dim; ++i) x[i] += 3.0f;  // a row with a large mean: LayerNorm must remove it
  const auto r = random_normal(rng, rows * dim);
  norm.forward(x, rows);
  const auto dx = norm.backward(r);
  const std::vector<float> dw(norm.weight_grad().begin(), norm.weight_grad().end());
  const std::vector<float> db(norm.bias_grad().begin(), norm.bias_grad().end());
  auto loss = [&] { return dot(r, norm.forward(x, rows)); };
  check_gradient(x, dx, loss, rng, 60, "norm input");
  check_gradient(norm.weight(), dw, loss, rng, 20, "norm gain");
  if (norm.has_bias()) check_gradient(norm.bias(), db, loss, rng, 20, "norm bias");
}

TEST_P(NormTest, NormalizesRows) {
  std::mt19937_64 rng(fresh_seed());
  const int64_t rows = 5, dim = 64;
  Norm norm(dim, GetParam());
  const auto x = random_normal(rng, rows * dim, 3.0f);
  const auto y = norm.forward(x, rows);  // gain 1, bias 0
  for (int64_t r = 0; r < rows; ++r) {
    double mean = 0.0, sq = 0.0;
    for (int64_t i = 0; i < dim; ++i) mean += y[r * dim + i], sq += y[r * dim + i] * y[r * dim + i];
    if (GetParam() == NormKind::kLayerNorm) {
      EXPECT_NEAR(mean / dim, 0.0, 1e-5);
    }
    EXPECT_NEAR(sq / dim, 1.0, 1e-3);  // eps = 1e-5 against variances near 9
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, NormTest, ::testing::Values(NormKind::kLayerNorm, NormKind::kRmsNorm),
                         [](const auto& info) { return info.param == NormKind::kLayerNorm ? "LayerNorm" : "RmsNorm"; });

TEST(SoftmaxCrossEntropy, GradientMatchesFiniteDifferencesAndLossIsExact) {
  std::mt19937_64 rng(fresh_seed());
  const int64_t rows = 6, vocab = 37;
  auto logits = random_normal(rng, rows * vocab, 3.0f);
  std::vector<uint32_t> targets(rows);
  for (auto& t : targets) t = static_cast<uint32_t>(rng() % vocab);
  // The loss against a direct double evaluation.
  double want = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    double s = 0.0;
    for (int64_t j = 0; j < vocab; ++j) s += std::exp(static_cast<double>(logits[r * vocab + j]));
    want += std::log(s) - logits[r * vocab + targets[r]];
  }
  auto grad = logits;
  const double got = softmax_cross_entropy(grad, targets, vocab, 0.5f);
  EXPECT_NEAR(got, want, 1e-5 * want);
  for (auto& g : grad) g *= 2.0f;  // undo grad_scale 0.5
  check_gradient(logits, grad, [&] {
    auto copy = logits;
    return softmax_cross_entropy(copy, targets, vocab, 0.0f);
  }, rng, 60, "cross-entropy logits");
  std::vector<uint32_t> bad = {static_cast<uint32_t>(vocab)};
  std::vector<float> one(static_cast<size_t>(vocab));
  EXPECT_THROW(softmax_cross_entropy(one, bad, vocab, 1.0f), std::out_of_range);
}

struct AttentionCase {
  int64_t heads, kv_heads;
  bool rope;
};

class AttentionTest : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(AttentionTest, BackwardMatchesFiniteDifferences) {
  std::mt19937_64 rng(fresh_seed());
  const AttentionCase c = GetParam();
  const int64_t d = 32, batch = 2, seq = 9;
  CausalSelfAttention attn({d, c.heads, c.kv_heads, c.rope, 10000.0f}, preset("fp32"), 0, 1);
  randomize(attn.qkv().mutable_weight(), rng, 0.3f);
  randomize(attn.proj().mutable_weight(), rng, 0.3f);
  auto x = random_normal(rng, batch * seq * d);
  const auto r = random_normal(rng, batch * seq * d);
  attn.forward(x, batch, seq);
  const auto dx = attn.backward(r);
  const std::vector<float> dqkv(attn.qkv().weight_grad().begin(), attn.qkv().weight_grad().end());
  const std::vector<float> dproj(attn.proj().weight_grad().begin(), attn.proj().weight_grad().end());
  auto loss = [&] {
    attn.qkv().mutable_weight();  // marks the cached weight copies stale after a perturbation
    attn.proj().mutable_weight();
    return dot(r, attn.forward(x, batch, seq));
  };
  check_gradient(x, dx, loss, rng, 60, "attention input");
  check_gradient(attn.qkv().mutable_weight(), dqkv, loss, rng, 60, "attention qkv weight");
  check_gradient(attn.proj().mutable_weight(), dproj, loss, rng, 30, "attention proj weight");
}

TEST_P(AttentionTest, IsCausal) {
  // Changing the last position's input changes no earlier output.
  std::mt19937_64 rng(fresh_seed());
  const AttentionCase c = GetParam();
  const int64_t d = 32, seq = 6;
  CausalSelfAttention attn({d, c.heads, c.kv_heads, c.rope, 10000.0f}, preset("fp32"), 0, 1);
  randomize(attn.qkv().mutable_weight(), rng, 0.3f);
  randomize(attn.proj().mutable_weight(), rng, 0.3f);
  auto x = random_normal(rng, seq * d);
  const auto y0 = attn.forward(x, 1, seq);
  for (int64_t i = 0; i < d; ++i) x[(seq - 1) * d + i] += 1.0f;
  const auto y1 = attn.forward(x, 1, seq);
  for (int64_t i = 0; i < (seq - 1) * d; ++i) ASSERT_EQ(y0[i], y1[i]) << "element " << i;
  bool last_changed = false;
  for (int64_t i = (seq - 1) * d; i < seq * d; ++i) last_changed |= y0[i] != y1[i];
  EXPECT_TRUE(last_changed);
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionTest,
                         ::testing::Values(AttentionCase{4, 4, false}, AttentionCase{4, 2, true},
                                           AttentionCase{2, 1, true}),
                         [](const auto& info) {
                           return "H" + std::to_string(info.param.heads) + "KV" + std::to_string(info.param.kv_heads) +
                                  (info.param.rope ? "Rope" : "NoRope");
                         });

class MlpTest : public ::testing::TestWithParam<MlpKind> {};

TEST_P(MlpTest, BackwardMatchesFiniteDifferences) {
  std::mt19937_64 rng(fresh_seed());
  const int64_t d = 16, hidden = 40, rows = 10;
  Mlp mlp(d, hidden, GetParam(), preset("fp32"), 0, 1);
  randomize(mlp.fc().mutable_weight(), rng, 0.4f);
  randomize(mlp.proj().mutable_weight(), rng, 0.4f);
  auto x = random_normal(rng, rows * d);
  const auto r = random_normal(rng, rows * d);
  mlp.forward(x, rows);
  const auto dx = mlp.backward(r);
  const std::vector<float> dfc(mlp.fc().weight_grad().begin(), mlp.fc().weight_grad().end());
  const std::vector<float> dproj(mlp.proj().weight_grad().begin(), mlp.proj().weight_grad().end());
  auto loss = [&] {
    mlp.fc().mutable_weight();  // marks the cached weight copies stale after a perturbation
    mlp.proj().mutable_weight();
    return dot(r, mlp.forward(x, rows));
  };
  check_gradient(x, dx, loss, rng, 60, "mlp input");
  check_gradient(mlp.fc().mutable_weight(), dfc, loss, rng, 60, "mlp fc weight");
  check_gradient(mlp.proj().mutable_weight(), dproj, loss, rng, 60, "mlp proj weight");
}

INSTANTIATE_TEST_SUITE_P(Kinds, MlpTest, ::testing::Values(MlpKind::kGelu, MlpKind::kRelu2, MlpKind::kSwiglu),
                         [](const auto& info) {
                           return info.param == MlpKind::kGelu ? "Gelu" : info.param == MlpKind::kRelu2 ? "Relu2" : "Swiglu";
                         });

}  // namespace
}  // namespace nibble::nn
