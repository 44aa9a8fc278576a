// A lookup table: row `id` of the weight for each token id (token embeddings, learned positions).
// FP32 always (the recipe keeps embeddings in high precision).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace nibble::nn {

class Embedding {
 public:
  Embedding(int64_t rows, int64_t dim);

  int64_t rows() const { return rows_; }
  int64_t dim() const { return dim_; }
  std::span<float> weight() { return weight_; }  // [rows x dim]
  std::span<const float> weight() const { return weight_; }
  std::span<float> weight_grad() { return grad_; }
  std::span<const float> weight_grad() const { return grad_; }
  void zero_grad();

  // out[i] (+)= weight[ids[i]]; an id >= rows() throws std::out_of_range naming it.
  void forward(std::span<const uint32_t> ids, std::span<float> out, bool accumulate = false) const;
  // weight_grad[ids[i]] += dout[i]. Takes the ids again (nothing is saved: they are the input).
  void backward(std::span<const uint32_t> ids, std::span<const float> dout);

 private:
  int64_t rows_, dim_;
  std::vector<float> weight_, grad_;
};

}  // namespace nibble::nn
