// Softmax cross-entropy over the vocabulary, fused with its gradient: the logits are overwritten
// by d(loss)/d(logits), so the [tokens x vocab] buffer is held once (the largest activation of a
// small model).
#pragma once

#include <cstdint>
#include <span>

namespace nibble::nn {

// Returns the sum over rows of -log softmax(logits_row)[target]. The logits are consumed: when
// `grad_scale` is non-zero each becomes grad_scale * (softmax - onehot(target)) (pass 1/tokens for
// the gradient of the mean loss), otherwise the softmax probabilities. A target >= vocab throws std::out_of_range naming it. FP32 logits, double sums.
double softmax_cross_entropy(std::span<float> logits, std::span<const uint32_t> targets, int64_t vocab,
                             float grad_scale);

}  // namespace nibble::nn
