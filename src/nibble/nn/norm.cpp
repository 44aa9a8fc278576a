#include "nibble/nn/norm.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace nibble::nn {

Norm::Norm(int64_t dim, NormKind kind, float eps)
    : dim_(dim), kind_(kind), eps_(eps), weight_(static_cast<size_t>(dim), 1.0f), weight_grad_(weight_.size()) {
  if (dim <= 0) throw std::invalid_argument("Norm: dim must be positive");
  if (has_bias()) bias_.assign(weight_.size(), 0.0f), bias_grad_.assign(weight_.size(), 0.0f);
}

void Norm::zero_grad() {
  std::fill(weight_grad_.begin(), weight_grad_.end(), 0.0f);
  std::fill(bias_grad_.begin(), bias_grad_.end(), 0.0f);
}

std::vector<float> Norm::forward(std::span<const float> x, int64_t rows) {
  if (rows <= 0 || static_cast<int64_t>(x.size()) != rows * dim_)
    throw std::invalid_argument("Norm::forward: input holds " + std::to_string(x.size()) + " elements, not rows x dim = " +
                                std::to_string(rows) + "x" + std::to_string(dim_));
  std::vector<float> y(x.size());
  saved_xhat_.resize(x.size());
  saved_rstd_.resize(static_cast<size_t>(rows));
  saved_rows_ = rows;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x.data() + r * dim_;
    // Statistics in double: one pass per row is cheap next to the GEMMs, and exact enough that
    // tests can hold backward to finite differences.
    double mean = 0.0;
    if (kind_ == NormKind::kLayerNorm) {
      for (int64_t i = 0; i < dim_; ++i) mean += xr[i];
      mean /= static_cast<double>(dim_);
    }
    double var = 0.0;
    for (int64_t i = 0; i < dim_; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    var /= static_cast<double>(dim_);
    const double rstd = 1.0 / std::sqrt(var + eps_);
    saved_rstd_[r] = static_cast<float>(rstd);
    float* xh = saved_xhat_.data() + r * dim_;
    float* yr = y.data() + r * dim_;
    for (int64_t i = 0; i < dim_; ++i) {
      xh[i] = static_cast<float>((xr[i] - mean) * rstd);
      yr[i] = xh[i] * weight_[i] + (has_bias() ? bias_[i] : 0.0f);
    }
  }
  return y;
}

std::vector<float> Norm::backward(std::span<const float> dy) {
  if (saved_rows_ == 0) throw std::logic_error("Norm::backward without a forward");
  if (static_cast<int64_t>(dy.size()) != saved_rows_ * dim_)
    throw std::invalid_argument("Norm::backward: gradient size does not match the forward's rows x dim");
  std::vector<float> dx(dy.size());
  const bool centered = kind_ == NormKind::kLayerNorm;
  for (int64_t r = 0; r < saved_rows_; ++r) {
    const float* dyr = dy.data() + r * dim_;
    const float* xh = saved_xhat_.data() + r * dim_;
    // dxhat = dy * g;  dx = rstd * (dxhat - mean(dxhat) [LayerNorm] - xhat * mean(dxhat * xhat))
    double sum_dxhat = 0.0, sum_dxhat_xhat = 0.0;
    for (int64_t i = 0; i < dim_; ++i) {
      const double dxhat = static_cast<double>(dyr[i]) * weight_[i];
      sum_dxhat += dxhat;
      sum_dxhat_xhat += dxhat * xh[i];
      weight_grad_[i] += dyr[i] * xh[i];
      if (centered) bias_grad_[i] += dyr[i];
    }
    const double mean_dxhat = centered ? sum_dxhat / static_cast<double>(dim_) : 0.0;
    const double mean_dxhat_xhat = sum_dxhat_xhat / static_cast<double>(dim_);
    const double rstd = saved_rstd_[r];
    float* dxr = dx.data() + r * dim_;
    for (int64_t i = 0; i < dim_; ++i) {
      const double dxhat = static_cast<double>(dyr[i]) * weight_[i];
      dxr[i] = static_cast<float>(rstd * (dxhat - mean_dxhat - xh[i] * mean_dxhat_xhat));
    }
  }
  saved_rows_ = 0;
  saved_xhat_.clear();
  return dx;
}

}  // namespace nibble::nn
