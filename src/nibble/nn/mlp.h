// The transformer's feed-forward block, two recipe-driven linear layers around an activation:
//   gelu    Y = proj(gelu(fc(X)))            gelu: tanh approximation (GPT-2's)
//   relu2   Y = proj(relu(fc(X))^2)          squared ReLU (Primer; Nemotron-H)
//   swiglu  Y = proj(silu(a) * b), [a | b] = fc(X)   fc has 2 * hidden outputs
// Forward saves fc's output (the activation's input) for backward; the activation is FP32.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "nibble/nn/linear.h"
#include "nibble/nn/recipe.h"

namespace nibble::nn {

enum class MlpKind : uint8_t { kGelu, kRelu2, kSwiglu };

class Mlp {
 public:
  // fc and proj get layer ids first_layer_id and first_layer_id + 1.
  Mlp(int64_t d_model, int64_t hidden, MlpKind kind, const Recipe& recipe, uint32_t first_layer_id, uint64_t run_seed);

  MlpKind kind() const { return kind_; }
  Linear& fc() { return fc_; }
  Linear& proj() { return proj_; }
  void set_recipe(const Recipe& recipe);
  void set_step(uint64_t step, uint32_t microbatch);
  void zero_grad();

  std::vector<float> forward(std::span<const float> x, int64_t rows);
  std::vector<float> backward(std::span<const float> dy);

 private:
  int64_t hidden_;
  MlpKind kind_;
  Linear fc_, proj_;
  std::vector<float> saved_pre_;  // fc output
  int64_t saved_rows_ = 0;
};

}  // namespace nibble::nn
