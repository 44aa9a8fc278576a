// LayerNorm (y = (x - mean) / sqrt(var + eps) * g + b) and RMSNorm (y = x / sqrt(mean(x^2) + eps) * g)
// over the last dimension, in FP32 (the recipe keeps norms in high precision). Forward saves the
// normalized rows and their reciprocal standard deviations for backward.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace nibble::nn {

enum class NormKind : uint8_t { kLayerNorm, kRmsNorm };

class Norm {
 public:
  Norm(int64_t dim, NormKind kind, float eps = 1e-5f);

  int64_t dim() const { return dim_; }
  NormKind kind() const { return kind_; }
  bool has_bias() const { return kind_ == NormKind::kLayerNorm; }
  std::span<float> weight() { return weight_; }  // gain g, starts at 1
  std::span<float> bias() { return bias_; }      // b (LayerNorm only; empty for RMSNorm), starts at 0
  std::span<const float> weight_grad() const { return weight_grad_; }
  std::span<const float> bias_grad() const { return bias_grad_; }
  void zero_grad();

  std::vector<float> forward(std::span<const float> x, int64_t rows);
  std::vector<float> backward(std::span<const float> dy);  // accumulates the parameter gradients

 private:
  int64_t dim_;
  NormKind kind_;
  float eps_;
  std::vector<float> weight_, bias_, weight_grad_, bias_grad_;
  std::vector<float> saved_xhat_, saved_rstd_;
  int64_t saved_rows_ = 0;
};

}  // namespace nibble::nn
