// Causal multi-head self-attention with grouped-query attention (n_kv_heads divides n_heads) and
// either no position encoding of its own (learned positions are added to the embeddings) or
// rotary embeddings (RoPE, rotate-half pairing (i, i + head_dim/2), as in GPT-NeoX and Llama).
//
//   qkv = X Wqkv^T      Linear, recipe-driven; columns [q heads | k heads | v heads]
//   q, k <- RoPE(q, k)
//   P_h = softmax(q_h k_g^T / sqrt(head_dim) + causal mask)    FP32, g = h / (n_heads / n_kv_heads)
//   O_h = P_h v_g                                               FP32
//   Y = O Wproj^T       Linear, recipe-driven
// The softmax and the two batched matmuls stay FP32 (the recipe's high-precision parts); forward
// saves qkv (after RoPE) and the probabilities P for backward.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "nibble/nn/linear.h"
#include "nibble/nn/recipe.h"

namespace nibble::nn {

struct AttentionShape {
  int64_t d_model = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  bool rope = false;
  float rope_theta = 10000.0f;
  int64_t head_dim() const { return d_model / n_heads; }
};

class CausalSelfAttention {
 public:
  // qkv and proj get layer ids first_layer_id and first_layer_id + 1.
  CausalSelfAttention(AttentionShape shape, const Recipe& recipe, uint32_t first_layer_id, uint64_t run_seed);

  const AttentionShape& shape() const { return shape_; }
  Linear& qkv() { return qkv_; }
  Linear& proj() { return proj_; }
  void set_recipe(const Recipe& recipe);
  void set_step(uint64_t step, uint32_t microbatch);
  void zero_grad();

  // x: [batch * seq x d_model], sequences one after another.
  std::vector<float> forward(std::span<const float> x, int64_t batch, int64_t seq);
  std::vector<float> backward(std::span<const float> dy);

 private:
  void rope_tables(int64_t seq);
  // Rotates the q and k columns of qkv (rows = batch * seq) by +angle (forward) or -angle (backward).
  void apply_rope(std::span<float> qkv, int64_t batch, int64_t seq, bool inverse) const;

  AttentionShape shape_;
  Linear qkv_, proj_;
  std::vector<float> rope_cos_, rope_sin_;  // [seq x head_dim/2]
  std::vector<float> saved_qkv_, saved_probs_;
  int64_t saved_batch_ = 0, saved_seq_ = 0;
};

}  // namespace nibble::nn
