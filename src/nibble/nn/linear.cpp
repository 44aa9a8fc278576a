#include "nibble/nn/linear.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>

namespace nibble::nn {

Linear::Linear(int64_t in_features, int64_t out_features, Recipe recipe, LinearOptions options)
    : in_(in_features), out_(out_features), recipe_(std::move(recipe)), options_(options) {
  if (in_ <= 0 || out_ <= 0)
    throw std::invalid_argument("Linear: in_features and out_features must be positive, got " +
                                std::to_string(in_) + " and " + std::to_string(out_));
  validate(recipe_);
  weight_.assign(static_cast<size_t>(in_ * out_), 0.0f);
  weight_grad_.assign(weight_.size(), 0.0f);
}

void Linear::set_recipe(Recipe recipe) {
  validate(recipe);
  recipe_ = std::move(recipe);
  weight_copies_valid_ = false;
  saved_x_t_.reset();
}

void Linear::set_step(uint64_t step, uint32_t microbatch) {
  if (step != step_) weight_copies_valid_ = false;
  step_ = step;
  microbatch_ = microbatch;
}

std::span<float> Linear::mutable_weight() {
  weight_copies_valid_ = false;
  return weight_;
}

void Linear::zero_grad() { std::fill(weight_grad_.begin(), weight_grad_.end(), 0.0f); }

uint64_t Linear::sr_seed() const { return layer_step_seed(options_.run_seed, options_.layer_id, step_, microbatch_); }
uint64_t Linear::weight_sr_seed() const { return layer_step_seed(options_.run_seed, options_.layer_id, step_, 0); }

std::string Linear::context(Operand op) const {
  return "Linear[layer " + std::to_string(options_.layer_id) + ", " + std::to_string(in_) + "->" +
         std::to_string(out_) + ", recipe " + recipe_.name + "] " + operand_name(op);
}

OperandCopy Linear::prepare(std::span<const float> x, int64_t rows, int64_t cols, Operand op, uint64_t seed) const {
  try {
    return OperandCopy::make(x, rows, cols, recipe_[op], op, recipe_.rht_signs(), seed);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(context(op) + ": " + e.what());
  }
}

void Linear::refresh_weight_copies() {
  if (weight_copies_valid_) return;
  const uint64_t seed = weight_sr_seed();
  fprop_w_ = prepare(weight_, out_, in_, Operand::kFpropW, seed).gemm_operand();
  dgrad_w_ = prepare(weight_, out_, in_, Operand::kDgradW, seed).gemm_operand();
  weight_copies_valid_ = true;
  ++weight_quantizations_;
}

std::vector<float> Linear::forward(std::span<const float> x, int64_t tokens) {
  if (tokens <= 0 || static_cast<int64_t>(x.size()) != tokens * in_)
    throw std::invalid_argument(context(Operand::kFpropX) + ": X holds " + std::to_string(x.size()) +
                                " elements, not tokens x in_features = " + std::to_string(tokens) + "x" +
                                std::to_string(in_));
  if (observer_) observer_->on_forward(*this, x, tokens);
  refresh_weight_copies();
  const uint64_t seed = sr_seed();
  const GemmOperand a = prepare(x, tokens, in_, Operand::kFpropX, seed).gemm_operand();
  std::vector<float> y(static_cast<size_t>(tokens * out_));
  gemm_nt(a, *fprop_w_, y);
  // X^T for Wgrad, quantized now from the high-precision X (which is then not kept).
  saved_x_t_ = prepare(x, tokens, in_, Operand::kWgradX, seed);
  saved_tokens_ = tokens;
  return y;
}

std::vector<float> Linear::backward(std::span<const float> dy) {
  if (!saved_x_t_)
    throw std::logic_error(context(Operand::kWgradX) + ": backward() without a forward() to pair with");
  const int64_t tokens = saved_tokens_;
  if (static_cast<int64_t>(dy.size()) != tokens * out_)
    throw std::invalid_argument(context(Operand::kDgradDy) + ": dY holds " + std::to_string(dy.size()) +
                                " elements, not tokens x out_features = " + std::to_string(tokens) + "x" +
                                std::to_string(out_));
  if (observer_) observer_->on_backward(*this, dy, tokens);
  refresh_weight_copies();
  const uint64_t seed = sr_seed();
  // Dgrad: dX [tokens x in] = dY [tokens x out] . (W^T [in x out])^T
  const GemmOperand dy_rows = prepare(dy, tokens, out_, Operand::kDgradDy, seed).gemm_operand();
  std::vector<float> dx(static_cast<size_t>(tokens * in_));
  gemm_nt(dy_rows, *dgrad_w_, dx);
  // Wgrad: dW [out x in] += dY^T [out x tokens] . (X^T [in x tokens])^T
  const GemmOperand dy_cols = prepare(dy, tokens, out_, Operand::kWgradDy, seed).gemm_operand();
  gemm_nt(dy_cols, saved_x_t_->gemm_operand(), weight_grad_, /*accumulate=*/true);
  saved_x_t_.reset();
  return dx;
}

int64_t Linear::saved_activation_bytes() const { return saved_x_t_ ? saved_x_t_->bytes() : 0; }

}  // namespace nibble::nn
