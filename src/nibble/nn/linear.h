// A linear layer Y = X W^T driven by a recipe: explicit forward and backward, no autograd.
//
//   forward(X [tokens x in])  -> Y [tokens x out]        Fprop  Y  = X W^T
//   backward(dY [tokens x out]) -> dX [tokens x in]      Dgrad  dX = dY W
//                                  and dW += dY^T X      Wgrad  dW = dY^T X
// Each GEMM's operands are prepared as the recipe says (see recipe.h) and multiplied by the CPU
// GEMM emulation (tensor/gemm_cpu.h). The master weight and its gradient are FP32.
//
// Memory: forward saves for backward only the Wgrad copy of X (X^T, already quantized and packed
// when the recipe quantizes wgrad.x), never X itself; saved_activation_bytes() reports it.
// The weight's two operand copies (fprop.w, dgrad.w) are made once per step and reused until the
// master weight changes (mutable_weight()), the step changes (set_step()) or the recipe changes.
//
// Stochastic rounding draws are reproducible: the seed of step s, micro-batch m of layer L is
// layer_step_seed(run_seed, L, s, m) (operand.h), each operand on its own Philox stream; the
// weight copies use micro-batch 0 of their step, so all micro-batches of a step see the same weight.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "nibble/nn/operand.h"
#include "nibble/nn/recipe.h"

namespace nibble::nn {

class Linear;

// Sees the high-precision tensors a linear layer receives before it prepares its GEMM operands
// (`nibble quant-stats` measures their quantization error on a real forward/backward pass).
class LinearObserver {
 public:
  virtual ~LinearObserver() = default;
  virtual void on_forward(const Linear& layer, std::span<const float> x, int64_t tokens) = 0;  // X
  virtual void on_backward(const Linear& layer, std::span<const float> dy, int64_t tokens) = 0;  // dY
};

struct LinearOptions {
  uint32_t layer_id = 0;  // distinct per layer of a model: separates the layers' random draws
  uint64_t run_seed = 0;
};

class Linear {
 public:
  // Throws RecipeError for an invalid recipe, std::invalid_argument for empty shapes.
  Linear(int64_t in_features, int64_t out_features, Recipe recipe, LinearOptions options = {});

  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }
  const Recipe& recipe() const { return recipe_; }
  void set_recipe(Recipe recipe);  // e.g. the switch to bf16 late in training

  // The step (and micro-batch within it) whose random draws the next GEMMs use.
  void set_step(uint64_t step, uint32_t microbatch = 0);

  std::span<const float> weight() const { return weight_; }  // [out x in], row-major
  std::span<float> mutable_weight();  // call for every update: marks the weight copies stale
  std::span<const float> weight_grad() const { return weight_grad_; }
  void zero_grad();

  // Shape errors (and shapes the recipe's block sizes cannot take) throw std::invalid_argument
  // naming the layer and the operand.
  std::vector<float> forward(std::span<const float> x, int64_t tokens);
  std::vector<float> backward(std::span<const float> dy);  // needs a forward first

  // Bytes forward saved for backward (0 when nothing is saved), and what keeping X in BF16 would take.
  int64_t saved_activation_bytes() const;
  int64_t bf16_activation_bytes(int64_t tokens) const { return tokens * in_ * 2; }

  // Not owned; nullptr (the default) observes nothing.
  void set_observer(LinearObserver* observer) { observer_ = observer; }

  // How many times the weight copies have been made (tests: once per step, not once per GEMM).
  int64_t weight_quantizations() const { return weight_quantizations_; }
  // Seed of the current step's draws for activations/gradients (micro-batch included) and weights.
  uint64_t sr_seed() const;
  uint64_t weight_sr_seed() const;

 private:
  std::string context(Operand op) const;
  OperandCopy prepare(std::span<const float> x, int64_t rows, int64_t cols, Operand op, uint64_t seed) const;
  void refresh_weight_copies();

  int64_t in_, out_;
  Recipe recipe_;
  LinearOptions options_;
  uint64_t step_ = 0;
  uint32_t microbatch_ = 0;
  std::vector<float> weight_, weight_grad_;

  bool weight_copies_valid_ = false;
  std::optional<GemmOperand> fprop_w_, dgrad_w_;
  int64_t weight_quantizations_ = 0;

  std::optional<OperandCopy> saved_x_t_;  // wgrad.x, saved by forward
  int64_t saved_tokens_ = 0;
  LinearObserver* observer_ = nullptr;
};

}  // namespace nibble::nn
