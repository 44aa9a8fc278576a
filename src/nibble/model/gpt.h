// A decoder-only transformer (GPT) built from a GptConfig and a recipe:
//
//   x = tok_embed(ids) [+ pos_embed(t)]                  FP32
//   per block:  x += attn(norm1(x));  x += mlp(norm2(x))   pre-norm; linears follow the recipe
//   logits = norm_f(x) W_head^T                          FP32 (W_head = tok_embed when tied)
//   loss = mean cross-entropy(logits, targets)
//
// Selective high precision: blocks that recipe.keeps_bf16() names run their linear layers with the
// bf16 preset; set_bf16_everywhere(true) is the late-training switch of the whole model to bf16.
// Every layer owns its parameters and the activations it saved for backward; forward_backward()
// accumulates gradients, so micro-batches of one step add up until zero_grad().
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "nibble/model/config.h"
#include "nibble/nn/attention.h"
#include "nibble/nn/embedding.h"
#include "nibble/nn/mlp.h"
#include "nibble/nn/norm.h"
#include "nibble/nn/recipe.h"

namespace nibble::model {

// A view of one parameter tensor for the optimizer and checkpoints. Taking views marks the linear
// layers' cached weight copies stale (their values may be written through `value`).
struct Parameter {
  std::string name;  // e.g. "blocks.0.attn.qkv.weight"
  std::vector<int64_t> shape;
  std::span<float> value;
  std::span<const float> grad;
  bool weight_decay = true;  // false for norms (and biases)
};

class Gpt {
 public:
  // Weights are drawn from a normal distribution seeded by init_seed; run_seed keys the recipe's
  // stochastic rounding. Throws nn::RecipeError for an invalid recipe.
  Gpt(GptConfig config, nn::Recipe recipe, uint64_t init_seed, uint64_t run_seed);
  ~Gpt();
  Gpt(const Gpt&) = delete;
  Gpt& operator=(const Gpt&) = delete;

  const GptConfig& config() const { return config_; }
  const nn::Recipe& recipe() const { return recipe_; }
  // The recipe of block `index`'s linear layers as it is now.
  const nn::Recipe& block_recipe(int64_t index) const;
  void set_bf16_everywhere(bool on);
  bool bf16_everywhere() const { return bf16_everywhere_; }

  void set_step(uint64_t step, uint32_t microbatch = 0);
  void zero_grad();

  // inputs, targets: [batch x seq] token ids, seq <= config.seq_len. Runs forward and backward,
  // adding grad_scale * d(mean loss)/d(params) to the gradients; returns the mean loss.
  double forward_backward(std::span<const uint32_t> inputs, std::span<const uint32_t> targets, int64_t batch,
                          int64_t seq, float grad_scale = 1.0f);
  // Forward only (validation): the mean loss; gradients untouched.
  double loss(std::span<const uint32_t> inputs, std::span<const uint32_t> targets, int64_t batch, int64_t seq);

  std::vector<Parameter> parameters();
  // The transformer blocks' linear layers, named as their weights without ".weight"
  // ("blocks.0.attn.qkv", ...), in forward order.
  std::vector<std::pair<std::string, nn::Linear*>> linears();

 private:
  struct Block;
  std::vector<float> forward_hidden(std::span<const uint32_t> inputs, int64_t batch, int64_t seq);
  // Fills logits_ ([tokens x vocab]) from the final hidden states.
  void compute_logits(std::span<const float> hidden, int64_t tokens);
  void check_tokens(std::span<const uint32_t> inputs, std::span<const uint32_t> targets, int64_t batch,
                    int64_t seq) const;
  void apply_recipes();

  GptConfig config_;
  nn::Recipe recipe_;
  bool bf16_everywhere_ = false;
  nn::Embedding tok_embed_;
  std::unique_ptr<nn::Embedding> pos_embed_;
  std::vector<std::unique_ptr<Block>> blocks_;
  nn::Norm norm_f_;
  std::unique_ptr<nn::Embedding> head_;  // untied LM head only: [vocab x d_model]
  std::vector<nn::Recipe> block_recipes_;
  std::vector<uint32_t> saved_positions_;
  // The largest activation of a small model, reused across steps: reallocating it every step costs
  // page faults and a memset of hundreds of MB.
  std::vector<float> logits_;
};

}  // namespace nibble::model
