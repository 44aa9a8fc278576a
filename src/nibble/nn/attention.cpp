#include "nibble/nn/attention.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "nibble/nn/matmul.h"

namespace nibble::nn {

namespace {
int64_t qkv_width(const AttentionShape& s) { return (s.n_heads + 2 * s.n_kv_heads) * s.head_dim(); }

AttentionShape checked(AttentionShape s) {
  if (s.d_model <= 0 || s.n_heads <= 0 || s.n_kv_heads <= 0 || s.d_model % s.n_heads != 0 ||
      s.n_heads % s.n_kv_heads != 0 || (s.rope && s.head_dim() % 2 != 0))
    throw std::invalid_argument("CausalSelfAttention: d_model " + std::to_string(s.d_model) + ", n_heads " +
                                std::to_string(s.n_heads) + ", n_kv_heads " + std::to_string(s.n_kv_heads) +
                                " do not form valid heads (rope needs an even head dimension)");
  return s;
}
}  // namespace

CausalSelfAttention::CausalSelfAttention(AttentionShape shape, const Recipe& recipe, uint32_t first_layer_id,
                                         uint64_t run_seed)
    : shape_(checked(shape)),
      qkv_(shape.d_model, qkv_width(shape), recipe, {first_layer_id, run_seed}),
      proj_(shape.n_heads * shape.head_dim(), shape.d_model, recipe, {first_layer_id + 1, run_seed}) {}

void CausalSelfAttention::set_recipe(const Recipe& recipe) {
  qkv_.set_recipe(recipe);
  proj_.set_recipe(recipe);
}
void CausalSelfAttention::set_step(uint64_t step, uint32_t microbatch) {
  qkv_.set_step(step, microbatch);
  proj_.set_step(step, microbatch);
}
void CausalSelfAttention::zero_grad() {
  qkv_.zero_grad();
  proj_.zero_grad();
}

void CausalSelfAttention::rope_tables(int64_t seq) {
  const int64_t half = shape_.head_dim() / 2;
  if (static_cast<int64_t>(rope_cos_.size()) >= seq * half) return;
  rope_cos_.resize(static_cast<size_t>(seq * half));
  rope_sin_.resize(rope_cos_.size());
  for (int64_t t = 0; t < seq; ++t)
    for (int64_t i = 0; i < half; ++i) {
      // Angles in double: positions times frequencies lose bits in float at long contexts.
      const double freq = std::pow(static_cast<double>(shape_.rope_theta), -2.0 * static_cast<double>(i) /
                                                                               static_cast<double>(shape_.head_dim()));
      const double angle = static_cast<double>(t) * freq;
      rope_cos_[t * half + i] = static_cast<float>(std::cos(angle));
      rope_sin_[t * half + i] = static_cast<float>(std::sin(angle));
    }
}

void CausalSelfAttention::apply_rope(std::span<float> qkv, int64_t batch, int64_t seq, bool inverse) const {
  const int64_t hd = shape_.head_dim(), half = hd / 2, width = qkv_width(shape_);
  const int64_t rotated_heads = shape_.n_heads + shape_.n_kv_heads;  // q and k, not v
  const float sign = inverse ? -1.0f : 1.0f;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < seq; ++t) {
      float* row = qkv.data() + (b * seq + t) * width;
      const float* c = rope_cos_.data() + t * half;
      const float* s = rope_sin_.data() + t * half;
      for (int64_t h = 0; h < rotated_heads; ++h) {
        float* x = row + h * hd;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = x[i], x2 = x[i + half], si = sign * s[i];
          x[i] = x1 * c[i] - x2 * si;
          x[i + half] = x2 * c[i] + x1 * si;
        }
      }
    }
}

std::vector<float> CausalSelfAttention::forward(std::span<const float> x, int64_t batch, int64_t seq) {
  if (batch <= 0 || seq <= 0 || static_cast<int64_t>(x.size()) != batch * seq * shape_.d_model)
    throw std::invalid_argument("CausalSelfAttention::forward: input holds " + std::to_string(x.size()) +
                                " elements, not batch x seq x d_model = " + std::to_string(batch) + "x" +
                                std::to_string(seq) + "x" + std::to_string(shape_.d_model));
  const int64_t hd = shape_.head_dim(), H = shape_.n_heads, width = qkv_width(shape_);
  const int64_t group = H / shape_.n_kv_heads, att_width = H * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  saved_qkv_ = qkv_.forward(x, batch * seq);
  if (shape_.rope) {
    rope_tables(seq);
    apply_rope(saved_qkv_, batch, seq, /*inverse=*/false);
  }
  saved_probs_.assign(static_cast<size_t>(batch * H * seq * seq), 0.0f);
  std::vector<float> att(static_cast<size_t>(batch * seq * att_width));
  for (int64_t b = 0; b < batch; ++b) {
    const float* base = saved_qkv_.data() + b * seq * width;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / group;
      const float* q = base + h * hd;
      const float* k = base + (H + g) * hd;
      const float* v = base + (H + shape_.n_kv_heads + g) * hd;
      float* p = saved_probs_.data() + (b * H + h) * seq * seq;
      matmul(false, true, seq, seq, hd, scale, q, width, k, width, 0.0f, p, seq);  // S = q k^T / sqrt(hd)
      for (int64_t i = 0; i < seq; ++i) {
        float* row = p + i * seq;
        float mx = row[0];
        for (int64_t j = 1; j <= i; ++j) mx = std::max(mx, row[j]);
        float sum = 0.0f;
        for (int64_t j = 0; j <= i; ++j) sum += row[j] = std::exp(row[j] - mx);
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
        std::fill(row + i + 1, row + seq, 0.0f);  // the causal mask
      }
      matmul(false, false, seq, hd, seq, 1.0f, p, seq, v, width, 0.0f, att.data() + b * seq * att_width + h * hd,
             att_width);  // O = P v
    }
  }
  saved_batch_ = batch;
  saved_seq_ = seq;
  return proj_.forward(att, batch * seq);
}

std::vector<float> CausalSelfAttention::backward(std::span<const float> dy) {
  if (saved_batch_ == 0) throw std::logic_error("CausalSelfAttention::backward without a forward");
  const int64_t batch = saved_batch_, seq = saved_seq_;
  const int64_t hd = shape_.head_dim(), H = shape_.n_heads, KV = shape_.n_kv_heads, width = qkv_width(shape_);
  const int64_t group = H / KV, att_width = H * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  const std::vector<float> datt = proj_.backward(dy);
  std::vector<float> dqkv(saved_qkv_.size(), 0.0f);
  std::vector<float> dp(static_cast<size_t>(seq * seq));
  for (int64_t b = 0; b < batch; ++b) {
    const float* base = saved_qkv_.data() + b * seq * width;
    float* dbase = dqkv.data() + b * seq * width;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / group;
      const float* q = base + h * hd;
      const float* k = base + (H + g) * hd;
      const float* v = base + (H + KV + g) * hd;
      const float* p = saved_probs_.data() + (b * H + h) * seq * seq;
      const float* dout = datt.data() + b * seq * att_width + h * hd;
      matmul(false, true, seq, seq, hd, 1.0f, dout, att_width, v, width, 0.0f, dp.data(), seq);  // dP = dO v^T
      matmul(true, false, seq, hd, seq, 1.0f, p, seq, dout, att_width, 1.0f, dbase + (H + KV + g) * hd,
             width);  // dv += P^T dO (heads of a group add up)
      // Softmax backward, with the 1/sqrt(hd) of the scores folded in: dS = scale * P (dP - rowsum(P dP)).
      for (int64_t i = 0; i < seq; ++i) {
        const float* pr = p + i * seq;
        float* dr = dp.data() + i * seq;
        float dot = 0.0f;
        for (int64_t j = 0; j <= i; ++j) dot += pr[j] * dr[j];
        for (int64_t j = 0; j <= i; ++j) dr[j] = scale * pr[j] * (dr[j] - dot);
        std::fill(dr + i + 1, dr + seq, 0.0f);
      }
      matmul(false, false, seq, hd, seq, 1.0f, dp.data(), seq, k, width, 0.0f, dbase + h * hd, width);  // dq = dS k
      matmul(true, false, seq, hd, seq, 1.0f, dp.data(), seq, q, width, 1.0f, dbase + (H + g) * hd,
             width);  // dk += dS^T q
    }
  }
  if (shape_.rope) apply_rope(dqkv, batch, seq, /*inverse=*/true);  // the rotation's transpose
  saved_qkv_.clear();
  saved_probs_.clear();
  saved_batch_ = 0;
  return qkv_.backward(dqkv);
}

}  // namespace nibble::nn
