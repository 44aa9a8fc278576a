// AdamW (Loshchilov & Hutter) on FP32 master weights with FP32 moments:
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p -= lr * (m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd * p)     (wd only where decayed)
// g is the parameter's gradient times `grad_multiplier` (the clipping factor), so clipping never
// rewrites the gradients. Moments are keyed by parameter name; state() / load_state() exchange them
// with checkpoints.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "nibble/model/gpt.h"
#include "nibble/tensor/safetensors.h"

namespace nibble::train {

struct AdamWOptions {
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;
};

class AdamW {
 public:
  explicit AdamW(AdamWOptions options) : options_(options) {}

  const AdamWOptions& options() const { return options_; }
  int64_t steps() const { return t_; }
  void step(std::span<model::Parameter> params, double lr, float grad_multiplier);

  // "<name>.exp_avg" and "<name>.exp_avg_sq" F32 tensors, plus "step" (I64 [1]).
  std::vector<NamedTensor> state() const;
  // Throws std::runtime_error when a parameter's moments are missing or shaped differently.
  void load_state(SafetensorsReader& reader, std::span<const model::Parameter> params);

  // The exchange with an optimizer that runs elsewhere (the GPU's): a parameter's moments (false
  // when it has none yet, before its first step), their replacement, and the step count.
  bool moments(const std::string& name, std::vector<float>& m, std::vector<float>& v) const;
  void set_moments(const model::Parameter& p, std::vector<float> m, std::vector<float> v);
  void set_steps(int64_t t) { t_ = t; }

 private:
  struct Moments {
    std::vector<int64_t> shape;
    std::vector<float> m, v;
  };
  AdamWOptions options_;
  int64_t t_ = 0;
  std::map<std::string, Moments> moments_;
};

// sqrt(sum of squared gradients) over all parameters, accumulated in double.
double global_grad_norm(std::span<const model::Parameter> params);

}  // namespace nibble::train
