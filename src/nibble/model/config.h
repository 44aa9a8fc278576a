// The shape of a decoder-only transformer, read from a TOML file (configs/models/*.toml):
//
//   name = "tiny"              # default: the file name without .toml
//   vocab_size = 50304         # rows of the embedding (GPT-2's 50257 padded to a multiple of 64)
//   seq_len = 128              # context length (learned positions have this many rows)
//   d_model = 128              # width
//   n_layers = 4
//   n_heads = 4
//   n_kv_heads = 4             # default n_heads; fewer gives grouped-query attention (must divide n_heads)
//   mlp = "gelu"               # gelu (tanh approximation, as GPT-2) | relu2 (squared ReLU) | swiglu
//   mlp_hidden = 512           # default 4 * d_model; for swiglu 8/3 * d_model rounded up to a multiple of 16
//   norm = "layernorm"         # layernorm | rmsnorm
//   norm_eps = 1e-5
//   positions = "learned"      # learned | rope
//   rope_theta = 10000.0
//   tied_embeddings = true     # LM head shares the token embedding
//   init_std = 0.02            # normal init of weights; residual projections get init_std / sqrt(2 n_layers)
//
// Linear layers have no biases. Unknown keys, wrong types and inconsistent shapes are errors that
// name the file and the key (ConfigError).
#pragma once

#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>

#include "nibble/nn/mlp.h"
#include "nibble/nn/norm.h"

namespace nibble::model {

class ConfigError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

using nn::MlpKind;
using nn::NormKind;
enum class PositionKind : uint8_t { kLearned, kRope };

const char* mlp_kind_name(MlpKind k);
const char* norm_kind_name(NormKind k);
const char* position_kind_name(PositionKind k);

struct GptConfig {
  std::string name = "gpt";
  int64_t vocab_size = 0;
  int64_t seq_len = 0;
  int64_t d_model = 0;
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;  // 0 in a file means n_heads (resolved by parsing)
  MlpKind mlp = MlpKind::kGelu;
  int64_t mlp_hidden = 0;  // 0 means the default for the MLP kind (resolved by parsing)
  NormKind norm = NormKind::kLayerNorm;
  float norm_eps = 1e-5f;
  PositionKind positions = PositionKind::kLearned;
  float rope_theta = 10000.0f;
  bool tied_embeddings = true;
  float init_std = 0.02f;

  int64_t head_dim() const { return d_model / n_heads; }
  int64_t parameter_count() const;
  bool operator==(const GptConfig&) const = default;
};

// Fills the defaults (n_kv_heads, mlp_hidden) and checks every field; `source` starts messages.
void finalize(GptConfig& config, std::string_view source);

GptConfig parse_gpt_config_toml(std::string_view text, std::string_view source);
GptConfig load_gpt_config(const std::filesystem::path& path);
// A complete TOML document that parses back to an equal config.
std::string to_toml(const GptConfig& config);

}  // namespace nibble::model
