#include "nibble/nn/embedding.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace nibble::nn {

Embedding::Embedding(int64_t rows, int64_t dim)
    : rows_(rows), dim_(dim), weight_(static_cast<size_t>(rows * dim)), grad_(weight_.size()) {
  if (rows <= 0 || dim <= 0) throw std::invalid_argument("Embedding: rows and dim must be positive");
}

void Embedding::zero_grad() { std::fill(grad_.begin(), grad_.end(), 0.0f); }

void Embedding::forward(std::span<const uint32_t> ids, std::span<float> out, bool accumulate) const {
  if (out.size() != ids.size() * static_cast<size_t>(dim_))
    throw std::invalid_argument("Embedding::forward: output holds " + std::to_string(out.size()) +
                                " elements, not ids x dim = " + std::to_string(ids.size()) + "x" + std::to_string(dim_));
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] >= rows_)
      throw std::out_of_range("Embedding: id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                              " is not below the table's " + std::to_string(rows_) + " rows");
    const float* row = weight_.data() + static_cast<int64_t>(ids[i]) * dim_;
    float* o = out.data() + static_cast<int64_t>(i) * dim_;
    if (accumulate)
      for (int64_t d = 0; d < dim_; ++d) o[d] += row[d];
    else
      std::copy(row, row + dim_, o);
  }
}

void Embedding::backward(std::span<const uint32_t> ids, std::span<const float> dout) {
  if (dout.size() != ids.size() * static_cast<size_t>(dim_))
    throw std::invalid_argument("Embedding::backward: gradient size does not match ids x dim");
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] >= rows_) throw std::out_of_range("Embedding::backward: id " + std::to_string(ids[i]) + " out of range");
    float* g = grad_.data() + static_cast<int64_t>(ids[i]) * dim_;
    const float* d = dout.data() + static_cast<int64_t>(i) * dim_;
    for (int64_t k = 0; k < dim_; ++k) g[k] += d[k];
  }
}

}  // namespace nibble::nn
