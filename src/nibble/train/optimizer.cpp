#include "nibble/train/optimizer.h"

#include <cmath>
#include <cstring>
#include <stdexcept>

namespace nibble::train {

void AdamW::step(std::span<model::Parameter> params, double lr, float grad_multiplier) {
  ++t_;
  const float b1 = options_.beta1, b2 = options_.beta2;
  const float bias1 = 1.0f - static_cast<float>(std::pow(static_cast<double>(b1), static_cast<double>(t_)));
  const float bias2 = 1.0f - static_cast<float>(std::pow(static_cast<double>(b2), static_cast<double>(t_)));
  const float lr_f = static_cast<float>(lr);
  for (model::Parameter& p : params) {
    Moments& st = moments_[p.name];
    if (st.m.empty()) {
      st.shape = p.shape;
      st.m.assign(p.value.size(), 0.0f);
      st.v.assign(p.value.size(), 0.0f);
    }
    if (st.m.size() != p.value.size()) throw std::logic_error("AdamW: parameter " + p.name + " changed size");
    const float decay = p.weight_decay ? options_.weight_decay : 0.0f;
    float* w = p.value.data();
    const float* g = p.grad.data();
    float* m = st.m.data();
    float* v = st.v.data();
    for (size_t i = 0; i < p.value.size(); ++i) {
      const float gi = g[i] * grad_multiplier;
      m[i] = b1 * m[i] + (1.0f - b1) * gi;
      v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
      const float update = (m[i] / bias1) / (std::sqrt(v[i] / bias2) + options_.eps);
      w[i] -= lr_f * (update + decay * w[i]);
    }
  }
}

std::vector<NamedTensor> AdamW::state() const {
  std::vector<NamedTensor> out;
  for (const auto& [name, st] : moments_) {
    out.emplace_back(name + ".exp_avg", HostTensor::f32(st.shape, st.m));
    out.emplace_back(name + ".exp_avg_sq", HostTensor::f32(st.shape, st.v));
  }
  std::vector<uint8_t> step_bytes(8);
  std::memcpy(step_bytes.data(), &t_, 8);
  out.emplace_back("step", HostTensor::raw(DType::kI64, {1}, std::move(step_bytes)));
  return out;
}

void AdamW::load_state(SafetensorsReader& reader, std::span<const model::Parameter> params) {
  auto fail = [&](const std::string& why) {
    throw std::runtime_error(reader.path().string() + ": " + why);
  };
  const SafetensorsEntry* step = reader.find("step");
  if (!step || step->dtype != DType::kI64 || step->shape != std::vector<int64_t>{1})
    fail("missing or malformed 'step' (I64 [1])");
  const HostTensor st = reader.read("step");
  std::memcpy(&t_, st.bytes.data(), 8);
  moments_.clear();
  for (const model::Parameter& p : params) {
    // Before the first update (every step so far skipped as non-finite) there are no moments yet.
    if (t_ == 0 && !reader.find(p.name + ".exp_avg") && !reader.find(p.name + ".exp_avg_sq")) continue;
    Moments m;
    m.shape = p.shape;
    for (const char* suffix : {".exp_avg", ".exp_avg_sq"}) {
      const std::string name = p.name + suffix;
      const SafetensorsEntry* e = reader.find(name);
      if (!e) fail("optimizer state lacks '" + name + "'");
      if (e->dtype != DType::kF32 || e->shape != p.shape)
        fail("'" + name + "' is " + std::string(dtype_name(e->dtype)) + " " + shape_string(e->shape) +
             ", expected F32 " + shape_string(p.shape));
      (std::strcmp(suffix, ".exp_avg") == 0 ? m.m : m.v) = reader.read(name).to_f32();
    }
    moments_[p.name] = std::move(m);
  }
}

bool AdamW::moments(const std::string& name, std::vector<float>& m, std::vector<float>& v) const {
  const auto it = moments_.find(name);
  if (it == moments_.end()) return false;
  m = it->second.m;
  v = it->second.v;
  return true;
}

void AdamW::set_moments(const model::Parameter& p, std::vector<float> m, std::vector<float> v) {
  if (m.size() != p.value.size() || v.size() != p.value.size())
    throw std::logic_error("AdamW::set_moments: " + p.name + " has " + std::to_string(p.value.size()) + " elements");
  moments_[p.name] = Moments{p.shape, std::move(m), std::move(v)};
}

double global_grad_norm(std::span<const model::Parameter> params) {
  double sum = 0.0;
  for (const model::Parameter& p : params)
    for (float g : p.grad) sum += static_cast<double>(g) * g;
  return std::sqrt(sum);
}

}  // namespace nibble::train
