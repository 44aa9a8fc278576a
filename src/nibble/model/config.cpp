// GPT model configs: TOML in (toml++, header-only) and out, defaults and validation.
#include "nibble/model/config.h"

#include <fstream>
#include <functional>
#include <map>
#include <sstream>

#include <toml++/toml.h>

namespace nibble::model {

const char* mlp_kind_name(MlpKind k) {
  switch (k) {
    case MlpKind::kGelu: return "gelu";
    case MlpKind::kRelu2: return "relu2";
    case MlpKind::kSwiglu: return "swiglu";
  }
  return "?";
}
const char* norm_kind_name(NormKind k) { return k == NormKind::kLayerNorm ? "layernorm" : "rmsnorm"; }
const char* position_kind_name(PositionKind k) { return k == PositionKind::kLearned ? "learned" : "rope"; }

namespace {

[[noreturn]] void fail(std::string_view where, const std::string& why) {
  throw ConfigError(std::string(where) + ": " + why);
}

std::string where(std::string_view source, const toml::node& node, const std::string& key) {
  return std::string(source) + ":" + std::to_string(node.source().begin.line) + ": key '" + key + "'";
}

int64_t get_int(std::string_view source, const std::string& key, const toml::node& n) {
  if (!n.is_integer()) fail(where(source, n, key), "must be an integer");
  return *n.value<int64_t>();
}
double get_float(std::string_view source, const std::string& key, const toml::node& n) {
  if (!n.is_number()) fail(where(source, n, key), "must be a number");
  return *n.value<double>();
}
bool get_bool(std::string_view source, const std::string& key, const toml::node& n) {
  if (!n.is_boolean()) fail(where(source, n, key), "must be true or false");
  return *n.value<bool>();
}
template <typename E>
E get_enum(std::string_view source, const std::string& key, const toml::node& n,
           const std::map<std::string, E>& names) {
  std::string choices;
  for (const auto& [name, _] : names) choices += (choices.empty() ? "" : ", ") + name;
  if (!n.is_string()) fail(where(source, n, key), "must be a string (one of " + choices + ")");
  const auto it = names.find(*n.value<std::string>());
  if (it == names.end())
    fail(where(source, n, key), "unknown value '" + *n.value<std::string>() + "' (expected one of " + choices + ")");
  return it->second;
}

}  // namespace

int64_t GptConfig::parameter_count() const {
  const int64_t hd = head_dim();
  const int64_t qkv = d_model * (n_heads + 2 * n_kv_heads) * hd;
  const int64_t proj = n_heads * hd * d_model;
  const int64_t fc = d_model * mlp_hidden * (mlp == MlpKind::kSwiglu ? 2 : 1);
  const int64_t norm_params = norm == NormKind::kLayerNorm ? 2 * d_model : d_model;
  const int64_t block = qkv + proj + fc + mlp_hidden * d_model + 2 * norm_params;
  int64_t total = vocab_size * d_model + n_layers * block + norm_params;
  if (positions == PositionKind::kLearned) total += seq_len * d_model;
  if (!tied_embeddings) total += vocab_size * d_model;
  return total;
}

void finalize(GptConfig& c, std::string_view source) {
  auto positive = [&](int64_t v, const char* key) {
    if (v <= 0) fail(std::string(source) + ": key '" + key + "'", "must be positive, got " + std::to_string(v));
  };
  positive(c.vocab_size, "vocab_size");
  positive(c.seq_len, "seq_len");
  positive(c.d_model, "d_model");
  positive(c.n_layers, "n_layers");
  positive(c.n_heads, "n_heads");
  if (c.n_kv_heads == 0) c.n_kv_heads = c.n_heads;
  positive(c.n_kv_heads, "n_kv_heads");
  if (c.vocab_size > (int64_t{1} << 32))
    fail(std::string(source) + ": key 'vocab_size'", "token ids are 32-bit; got " + std::to_string(c.vocab_size));
  if (c.d_model % c.n_heads != 0)
    fail(std::string(source) + ": key 'n_heads'", "d_model " + std::to_string(c.d_model) +
                                                    " is not divisible by n_heads " + std::to_string(c.n_heads));
  if (c.n_heads % c.n_kv_heads != 0)
    fail(std::string(source) + ": key 'n_kv_heads'", "n_heads " + std::to_string(c.n_heads) +
                                                       " is not divisible by n_kv_heads " + std::to_string(c.n_kv_heads));
  if (c.positions == PositionKind::kRope && c.head_dim() % 2 != 0)
    fail(std::string(source) + ": key 'positions'", "rope needs an even head dimension, got " +
                                                      std::to_string(c.head_dim()));
  if (c.mlp_hidden == 0)
    c.mlp_hidden = c.mlp == MlpKind::kSwiglu ? (8 * c.d_model / 3 + 15) / 16 * 16 : 4 * c.d_model;
  positive(c.mlp_hidden, "mlp_hidden");
  if (!(c.norm_eps > 0.0f)) fail(std::string(source) + ": key 'norm_eps'", "must be positive");
  if (!(c.rope_theta > 1.0f)) fail(std::string(source) + ": key 'rope_theta'", "must be greater than 1");
  if (!(c.init_std > 0.0f)) fail(std::string(source) + ": key 'init_std'", "must be positive");
}

GptConfig parse_gpt_config_toml(std::string_view text, std::string_view source) {
  toml::table doc;
  try {
    doc = toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    fail(std::string(source) + ":" + std::to_string(e.source().begin.line), std::string(e.description()));
  }
  GptConfig c;
  c.name = std::filesystem::path(source).stem().string();
  using Setter = std::function<void(const std::string&, const toml::node&)>;
  const std::map<std::string, Setter> setters = {
      {"name", [&](const std::string& k, const toml::node& n) {
         if (!n.is_string()) fail(where(source, n, k), "must be a string");
         c.name = *n.value<std::string>();
       }},
      {"vocab_size", [&](const std::string& k, const toml::node& n) { c.vocab_size = get_int(source, k, n); }},
      {"seq_len", [&](const std::string& k, const toml::node& n) { c.seq_len = get_int(source, k, n); }},
      {"d_model", [&](const std::string& k, const toml::node& n) { c.d_model = get_int(source, k, n); }},
      {"n_layers", [&](const std::string& k, const toml::node& n) { c.n_layers = get_int(source, k, n); }},
      {"n_heads", [&](const std::string& k, const toml::node& n) { c.n_heads = get_int(source, k, n); }},
      {"n_kv_heads", [&](const std::string& k, const toml::node& n) {
         c.n_kv_heads = get_int(source, k, n);
         if (c.n_kv_heads <= 0) fail(where(source, n, k), "must be positive");
       }},
      {"mlp_hidden", [&](const std::string& k, const toml::node& n) {
         c.mlp_hidden = get_int(source, k, n);
         if (c.mlp_hidden <= 0) fail(where(source, n, k), "must be positive");
       }},
      {"mlp", [&](const std::string& k, const toml::node& n) {
         c.mlp = get_enum<MlpKind>(source, k, n,
                                   {{"gelu", MlpKind::kGelu}, {"relu2", MlpKind::kRelu2}, {"swiglu", MlpKind::kSwiglu}});
       }},
      {"norm", [&](const std::string& k, const toml::node& n) {
         c.norm = get_enum<NormKind>(source, k, n, {{"layernorm", NormKind::kLayerNorm}, {"rmsnorm", NormKind::kRmsNorm}});
       }},
      {"positions", [&](const std::string& k, const toml::node& n) {
         c.positions = get_enum<PositionKind>(source, k, n, {{"learned", PositionKind::kLearned}, {"rope", PositionKind::kRope}});
       }},
      {"norm_eps", [&](const std::string& k, const toml::node& n) { c.norm_eps = static_cast<float>(get_float(source, k, n)); }},
      {"rope_theta", [&](const std::string& k, const toml::node& n) { c.rope_theta = static_cast<float>(get_float(source, k, n)); }},
      {"init_std", [&](const std::string& k, const toml::node& n) { c.init_std = static_cast<float>(get_float(source, k, n)); }},
      {"tied_embeddings", [&](const std::string& k, const toml::node& n) { c.tied_embeddings = get_bool(source, k, n); }},
  };
  for (const auto& [k, node] : doc) {
    const std::string key(k.str());
    const auto it = setters.find(key);
    if (it == setters.end()) fail(where(source, node, key), "unknown key");
    it->second(key, node);
  }
  for (const char* required : {"vocab_size", "seq_len", "d_model", "n_layers", "n_heads"})
    if (!doc.contains(required)) fail(std::string(source), std::string("missing required key '") + required + "'");
  finalize(c, source);
  return c;
}

GptConfig load_gpt_config(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError(path.string() + ": cannot open model config");
  std::ostringstream text;
  text << in.rdbuf();
  return parse_gpt_config_toml(text.str(), path.string());
}

std::string to_toml(const GptConfig& c) {
  toml::table t;
  t.insert("name", c.name);
  t.insert("vocab_size", c.vocab_size);
  t.insert("seq_len", c.seq_len);
  t.insert("d_model", c.d_model);
  t.insert("n_layers", c.n_layers);
  t.insert("n_heads", c.n_heads);
  t.insert("n_kv_heads", c.n_kv_heads);
  t.insert("mlp", std::string(mlp_kind_name(c.mlp)));
  t.insert("mlp_hidden", c.mlp_hidden);
  t.insert("norm", std::string(norm_kind_name(c.norm)));
  t.insert("norm_eps", static_cast<double>(c.norm_eps));
  t.insert("positions", std::string(position_kind_name(c.positions)));
  t.insert("rope_theta", static_cast<double>(c.rope_theta));
  t.insert("tied_embeddings", c.tied_embeddings);
  t.insert("init_std", static_cast<double>(c.init_std));
  std::ostringstream out;
  out << t << "\n";
  return out.str();
}

}  // namespace nibble::model
