#include "nibble/model/gpt.h"

#include <cmath>
#include <random>
#include <stdexcept>
#include <string>

#include "nibble/nn/loss.h"
#include "nibble/nn/matmul.h"

namespace nibble::model {

struct Gpt::Block {
  nn::Norm norm1;
  nn::CausalSelfAttention attn;
  nn::Norm norm2;
  nn::Mlp mlp;

  Block(const GptConfig& c, const nn::Recipe& recipe, uint32_t index, uint64_t run_seed)
      : norm1(c.d_model, c.norm, c.norm_eps),
        attn({c.d_model, c.n_heads, c.n_kv_heads, c.positions == PositionKind::kRope, c.rope_theta}, recipe,
             4 * index, run_seed),
        norm2(c.d_model, c.norm, c.norm_eps),
        mlp(c.d_model, c.mlp_hidden, c.mlp, recipe, 4 * index + 2, run_seed) {}

  void forward(std::vector<float>& x, int64_t batch, int64_t seq) {
    const int64_t rows = batch * seq;
    const std::vector<float> a = attn.forward(norm1.forward(x, rows), batch, seq);
    for (size_t i = 0; i < x.size(); ++i) x[i] += a[i];
    const std::vector<float> m = mlp.forward(norm2.forward(x, rows), rows);
    for (size_t i = 0; i < x.size(); ++i) x[i] += m[i];
  }
  void backward(std::vector<float>& dx) {
    const std::vector<float> dm = norm2.backward(mlp.backward(dx));
    for (size_t i = 0; i < dx.size(); ++i) dx[i] += dm[i];
    const std::vector<float> da = norm1.backward(attn.backward(dx));
    for (size_t i = 0; i < dx.size(); ++i) dx[i] += da[i];
  }
};

namespace {
GptConfig finalized(GptConfig c) {
  finalize(c, "model config " + c.name);
  return c;
}

void fill_normal(std::span<float> w, float stddev, std::mt19937_64& rng) {
  std::normal_distribution<float> d(0.0f, stddev);
  for (float& x : w) x = d(rng);
}
}  // namespace

Gpt::Gpt(GptConfig config, nn::Recipe recipe, uint64_t init_seed, uint64_t run_seed)
    : config_(finalized(std::move(config))),
      recipe_(std::move(recipe)),
      tok_embed_(config_.vocab_size, config_.d_model),
      norm_f_(config_.d_model, config_.norm, config_.norm_eps) {
  nn::validate(recipe_);
  if (config_.positions == PositionKind::kLearned)
    pos_embed_ = std::make_unique<nn::Embedding>(config_.seq_len, config_.d_model);
  if (!config_.tied_embeddings) head_ = std::make_unique<nn::Embedding>(config_.vocab_size, config_.d_model);
  for (int64_t i = 0; i < config_.n_layers; ++i)
    blocks_.push_back(std::make_unique<Block>(config_, recipe_, static_cast<uint32_t>(i), run_seed));
  apply_recipes();

  // GPT-2's initialization: N(0, std) everywhere, residual projections scaled by 1/sqrt(2 n_layers)
  // so the residual stream's variance does not grow with depth; norms start at gain 1, bias 0.
  std::mt19937_64 rng(init_seed);
  const float std_ = config_.init_std;
  const float resid_std = std_ / std::sqrt(2.0f * static_cast<float>(config_.n_layers));
  for (Parameter& p : parameters()) {
    if (!p.weight_decay) continue;  // norms keep their identity start
    const bool residual = p.name.ends_with("attn.proj.weight") || p.name.ends_with("mlp.proj.weight");
    fill_normal(p.value, residual ? resid_std : std_, rng);
  }
}

Gpt::~Gpt() = default;

const nn::Recipe& Gpt::block_recipe(int64_t index) const { return block_recipes_.at(static_cast<size_t>(index)); }

void Gpt::apply_recipes() {
  const int n = static_cast<int>(config_.n_layers);
  std::vector<nn::Recipe> next;
  for (int i = 0; i < n; ++i) {
    nn::Recipe r = recipe_;
    if (bf16_everywhere_ || recipe_.keeps_bf16(i, n)) {
      r = nn::preset("bf16");
      r.rht_sign_seed = recipe_.rht_sign_seed;
    }
    if (block_recipes_.size() <= static_cast<size_t>(i) || !(block_recipes_[i] == r)) {
      blocks_[i]->attn.set_recipe(r);
      blocks_[i]->mlp.set_recipe(r);
    }
    next.push_back(std::move(r));
  }
  block_recipes_ = std::move(next);
}

void Gpt::set_bf16_everywhere(bool on) {
  if (on == bf16_everywhere_) return;
  bf16_everywhere_ = on;
  apply_recipes();
}

void Gpt::set_step(uint64_t step, uint32_t microbatch) {
  for (auto& b : blocks_) {
    b->attn.set_step(step, microbatch);
    b->mlp.set_step(step, microbatch);
  }
}

void Gpt::zero_grad() {
  tok_embed_.zero_grad();
  if (pos_embed_) pos_embed_->zero_grad();
  if (head_) head_->zero_grad();
  norm_f_.zero_grad();
  for (auto& b : blocks_) {
    b->norm1.zero_grad();
    b->attn.zero_grad();
    b->norm2.zero_grad();
    b->mlp.zero_grad();
  }
}

void Gpt::check_tokens(std::span<const uint32_t> inputs, std::span<const uint32_t> targets, int64_t batch,
                       int64_t seq) const {
  if (batch <= 0 || seq <= 0 || seq > config_.seq_len)
    throw std::invalid_argument("Gpt: batch " + std::to_string(batch) + " x seq " + std::to_string(seq) +
                                " is empty or longer than the model's seq_len " + std::to_string(config_.seq_len));
  const size_t n = static_cast<size_t>(batch * seq);
  if (inputs.size() != n || targets.size() != n)
    throw std::invalid_argument("Gpt: expected " + std::to_string(n) + " input and target ids, got " +
                                std::to_string(inputs.size()) + " and " + std::to_string(targets.size()));
}

std::vector<float> Gpt::forward_hidden(std::span<const uint32_t> inputs, int64_t batch, int64_t seq) {
  const int64_t rows = batch * seq;
  std::vector<float> x(static_cast<size_t>(rows * config_.d_model));
  tok_embed_.forward(inputs, x);
  if (pos_embed_) {
    saved_positions_.resize(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) saved_positions_[r] = static_cast<uint32_t>(r % seq);
    pos_embed_->forward(saved_positions_, x, /*accumulate=*/true);
  }
  for (auto& b : blocks_) b->forward(x, batch, seq);
  return norm_f_.forward(x, rows);
}

void Gpt::compute_logits(std::span<const float> hidden, int64_t tokens) {
  const nn::Embedding& head = head_ ? *head_ : tok_embed_;
  logits_.resize(static_cast<size_t>(tokens * config_.vocab_size));
  nn::matmul(false, true, tokens, config_.vocab_size, config_.d_model, 1.0f, hidden.data(), config_.d_model,
             head.weight().data(), config_.d_model, 0.0f, logits_.data(), config_.vocab_size);
}

double Gpt::loss(std::span<const uint32_t> inputs, std::span<const uint32_t> targets, int64_t batch, int64_t seq) {
  check_tokens(inputs, targets, batch, seq);
  const int64_t rows = batch * seq;
  compute_logits(forward_hidden(inputs, batch, seq), rows);
  return nn::softmax_cross_entropy(logits_, targets, config_.vocab_size, 0.0f) / static_cast<double>(rows);
}

double Gpt::forward_backward(std::span<const uint32_t> inputs, std::span<const uint32_t> targets, int64_t batch,
                             int64_t seq, float grad_scale) {
  check_tokens(inputs, targets, batch, seq);
  const int64_t rows = batch * seq, d = config_.d_model, v = config_.vocab_size;
  const std::vector<float> hidden = forward_hidden(inputs, batch, seq);
  compute_logits(hidden, rows);
  const double loss_sum = nn::softmax_cross_entropy(logits_, targets, v, grad_scale / static_cast<float>(rows));
  const float* dlogits = logits_.data();  // now the gradient

  // LM head backward (FP32): dh = dlogits W, dW += dlogits^T h.
  nn::Embedding& head = head_ ? *head_ : tok_embed_;
  std::vector<float> dx(static_cast<size_t>(rows * d));
  nn::matmul(false, false, rows, d, v, 1.0f, dlogits, v, head.weight().data(), d, 0.0f, dx.data(), d);
  nn::matmul(true, false, v, d, rows, 1.0f, dlogits, v, hidden.data(), d, 1.0f, head.weight_grad().data(), d);

  dx = norm_f_.backward(dx);
  for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) (*it)->backward(dx);
  tok_embed_.backward(inputs, dx);
  if (pos_embed_) pos_embed_->backward(saved_positions_, dx);
  return loss_sum / static_cast<double>(rows);
}

std::vector<Parameter> Gpt::parameters() {
  std::vector<Parameter> ps;
  const int64_t d = config_.d_model;
  auto linear = [&](const std::string& name, nn::Linear& l) {
    ps.push_back({name, {l.out_features(), l.in_features()}, l.mutable_weight(), l.weight_grad(), true});
  };
  auto norm = [&](const std::string& name, nn::Norm& n) {
    ps.push_back({name + ".weight", {d}, n.weight(), n.weight_grad(), false});
    if (n.has_bias()) ps.push_back({name + ".bias", {d}, n.bias(), n.bias_grad(), false});
  };
  ps.push_back({"embed.weight", {config_.vocab_size, d}, tok_embed_.weight(), tok_embed_.weight_grad(), true});
  if (pos_embed_)
    ps.push_back({"pos_embed.weight", {config_.seq_len, d}, pos_embed_->weight(), pos_embed_->weight_grad(), true});
  for (size_t i = 0; i < blocks_.size(); ++i) {
    Block& b = *blocks_[i];
    const std::string p = "blocks." + std::to_string(i) + ".";
    norm(p + "norm1", b.norm1);
    linear(p + "attn.qkv.weight", b.attn.qkv());
    linear(p + "attn.proj.weight", b.attn.proj());
    norm(p + "norm2", b.norm2);
    linear(p + "mlp.fc.weight", b.mlp.fc());
    linear(p + "mlp.proj.weight", b.mlp.proj());
  }
  norm("norm_f", norm_f_);
  if (head_) ps.push_back({"lm_head.weight", {config_.vocab_size, d}, head_->weight(), head_->weight_grad(), true});
  return ps;
}

std::vector<std::pair<std::string, nn::Linear*>> Gpt::linears() {
  std::vector<std::pair<std::string, nn::Linear*>> out;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    Block& b = *blocks_[i];
    const std::string p = "blocks." + std::to_string(i) + ".";
    out.emplace_back(p + "attn.qkv", &b.attn.qkv());
    out.emplace_back(p + "attn.proj", &b.attn.proj());
    out.emplace_back(p + "mlp.fc", &b.mlp.fc());
    out.emplace_back(p + "mlp.proj", &b.mlp.proj());
  }
  return out;
}

}  // namespace nibble::model
