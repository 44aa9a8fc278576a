#include "nibble/nn/loss.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace nibble::nn {

double softmax_cross_entropy(std::span<float> logits, std::span<const uint32_t> targets, int64_t vocab,
                             float grad_scale) {
  if (vocab <= 0 || logits.size() != targets.size() * static_cast<size_t>(vocab))
    throw std::invalid_argument("softmax_cross_entropy: logits hold " + std::to_string(logits.size()) +
                                " elements, not targets x vocab = " + std::to_string(targets.size()) + "x" +
                                std::to_string(vocab));
  double total = 0.0;
  for (size_t r = 0; r < targets.size(); ++r) {
    if (targets[r] >= vocab)
      throw std::out_of_range("softmax_cross_entropy: target " + std::to_string(targets[r]) + " at row " +
                              std::to_string(r) + " is not below the vocabulary size " + std::to_string(vocab));
    float* row = logits.data() + static_cast<int64_t>(r) * vocab;
    const float mx = *std::max_element(row, row + vocab);
    const float target_logit = row[targets[r]];
    // exp in float (the vocabulary is wide: this loop is a large part of a small model's step), sums in double.
    double sum = 0.0;
    for (int64_t j = 0; j < vocab; ++j) sum += row[j] = std::exp(row[j] - mx);
    total += std::log(sum) - static_cast<double>(target_logit - mx);
    const float scale = static_cast<float>((grad_scale != 0.0f ? grad_scale : 1.0f) / sum);
    for (int64_t j = 0; j < vocab; ++j) row[j] *= scale;
    if (grad_scale != 0.0f) row[targets[r]] -= grad_scale;
  }
  return total;
}

}  // namespace nibble::nn
