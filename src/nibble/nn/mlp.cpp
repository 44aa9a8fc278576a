#include "nibble/nn/mlp.h"

#include <cmath>
#include <stdexcept>

namespace nibble::nn {

namespace {
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCubic = 0.044715f;

float gelu(float x) { return 0.5f * x * (1.0f + std::tanh(kSqrt2OverPi * (x + kGeluCubic * x * x * x))); }
float gelu_grad(float x) {
  const float t = std::tanh(kSqrt2OverPi * (x + kGeluCubic * x * x * x));
  return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluCubic * x * x);
}
float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
}  // namespace

Mlp::Mlp(int64_t d_model, int64_t hidden, MlpKind kind, const Recipe& recipe, uint32_t first_layer_id,
         uint64_t run_seed)
    : hidden_(hidden),
      kind_(kind),
      fc_(d_model, kind == MlpKind::kSwiglu ? 2 * hidden : hidden, recipe, {first_layer_id, run_seed}),
      proj_(hidden, d_model, recipe, {first_layer_id + 1, run_seed}) {}

void Mlp::set_recipe(const Recipe& recipe) {
  fc_.set_recipe(recipe);
  proj_.set_recipe(recipe);
}
void Mlp::set_step(uint64_t step, uint32_t microbatch) {
  fc_.set_step(step, microbatch);
  proj_.set_step(step, microbatch);
}
void Mlp::zero_grad() {
  fc_.zero_grad();
  proj_.zero_grad();
}

std::vector<float> Mlp::forward(std::span<const float> x, int64_t rows) {
  saved_pre_ = fc_.forward(x, rows);
  saved_rows_ = rows;
  std::vector<float> act(static_cast<size_t>(rows * hidden_));
  const float* pre = saved_pre_.data();
  switch (kind_) {
    case MlpKind::kGelu:
      for (size_t i = 0; i < act.size(); ++i) act[i] = gelu(pre[i]);
      break;
    case MlpKind::kRelu2:
      for (size_t i = 0; i < act.size(); ++i) act[i] = pre[i] > 0.0f ? pre[i] * pre[i] : 0.0f;
      break;
    case MlpKind::kSwiglu:
      for (int64_t r = 0; r < rows; ++r) {
        const float* a = pre + r * 2 * hidden_;
        const float* b = a + hidden_;
        for (int64_t i = 0; i < hidden_; ++i) act[r * hidden_ + i] = a[i] * sigmoid(a[i]) * b[i];
      }
      break;
  }
  return proj_.forward(act, rows);
}

std::vector<float> Mlp::backward(std::span<const float> dy) {
  if (saved_rows_ == 0) throw std::logic_error("Mlp::backward without a forward");
  const std::vector<float> dact = proj_.backward(dy);
  std::vector<float> dpre(saved_pre_.size());
  const float* pre = saved_pre_.data();
  switch (kind_) {
    case MlpKind::kGelu:
      for (size_t i = 0; i < dact.size(); ++i) dpre[i] = dact[i] * gelu_grad(pre[i]);
      break;
    case MlpKind::kRelu2:
      for (size_t i = 0; i < dact.size(); ++i) dpre[i] = pre[i] > 0.0f ? 2.0f * pre[i] * dact[i] : 0.0f;
      break;
    case MlpKind::kSwiglu:
      for (int64_t r = 0; r < saved_rows_; ++r) {
        const float* a = pre + r * 2 * hidden_;
        const float* b = a + hidden_;
        float* da = dpre.data() + r * 2 * hidden_;
        float* db = da + hidden_;
        for (int64_t i = 0; i < hidden_; ++i) {
          const float s = sigmoid(a[i]), d = dact[r * hidden_ + i];
          db[i] = d * a[i] * s;
          da[i] = d * b[i] * s * (1.0f + a[i] * (1.0f - s));  // silu'(a) = s (1 + a (1 - s))
        }
      }
      break;
  }
  saved_pre_.clear();
  saved_rows_ = 0;
  return fc_.backward(dpre);
}

}  // namespace nibble::nn
