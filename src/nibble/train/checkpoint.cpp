#include "nibble/train/checkpoint.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "nibble/tensor/atomic_file.h"
#include "nibble/tensor/safetensors.h"

namespace nibble::train {

namespace fs = std::filesystem;

namespace {

constexpr const char* kPrefix = "step_";

std::string step_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%s%08lld", kPrefix, static_cast<long long>(step));
  return buf;
}

// Complete checkpoints of a run, oldest first (hidden temporary folders are not listed).
std::vector<std::pair<int64_t, fs::path>> list_checkpoints(const fs::path& run_dir) {
  std::vector<std::pair<int64_t, fs::path>> out;
  const fs::path dir = run_dir / kCheckpointsDir;
  if (!fs::is_directory(dir)) return out;
  for (const fs::directory_entry& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (!e.is_directory() || !name.starts_with(kPrefix)) continue;
    const std::string digits = name.substr(std::string(kPrefix).size());
    if (digits.empty() || !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }))
      continue;
    if (!fs::exists(e.path() / "state.json")) continue;
    out.emplace_back(std::stoll(digits), e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

void write_text(const fs::path& path, const std::string& text) {
  AtomicFileWriter w(path);
  w.write(text.data(), text.size());
  w.commit();
}

}  // namespace

fs::path save_checkpoint(const fs::path& run_dir, model::Gpt& model, const AdamW& optimizer,
                         const CheckpointState& state, int keep) {
  const fs::path dir = run_dir / kCheckpointsDir;
  fs::create_directories(dir);
  const fs::path final_dir = dir / step_dir_name(state.step);
  std::string temp_name = ".";  // appended piecewise: GCC 12 warns falsely (-Wrestrict) on "." + string
  temp_name += step_dir_name(state.step);
  temp_name += ".tmp";
  const fs::path temp_dir = dir / temp_name;
  fs::remove_all(temp_dir);
  fs::create_directory(temp_dir);

  const std::string config_toml = model::to_toml(model.config());
  const std::string recipe_toml = nn::to_toml(model.recipe());
  std::vector<NamedTensor> weights;
  for (const model::Parameter& p : model.parameters()) weights.emplace_back(p.name, HostTensor::f32(p.shape, p.value));
  write_safetensors(temp_dir / "model.safetensors", weights,
                    {{"format", "pt"}, {"nibble_model_config", config_toml}, {"nibble_recipe", recipe_toml}});
  weights.clear();
  write_safetensors(temp_dir / "optimizer.safetensors", optimizer.state());

  nlohmann::json j;
  j["step"] = state.step;
  j["data_position"] = state.data_position.to_json();
  j["seed"] = state.seed;
  j["bf16_everywhere"] = state.bf16_everywhere;
  j["options"] = state.options;
  j["model_config"] = config_toml;
  j["recipe"] = recipe_toml;
  write_text(temp_dir / "state.json", j.dump(2) + "\n");

  // An older checkpoint of the same step (a rerun after an interrupt) is replaced whole.
  fs::remove_all(final_dir);
  fs::rename(temp_dir, final_dir);

  if (keep > 0) {
    auto all = list_checkpoints(run_dir);
    for (size_t i = 0; i + static_cast<size_t>(keep) < all.size(); ++i) fs::remove_all(all[i].second);
  }
  return final_dir;
}

std::optional<fs::path> latest_checkpoint(const fs::path& run_dir) {
  auto all = list_checkpoints(run_dir);
  if (all.empty()) return std::nullopt;
  return all.back().second;
}

CheckpointState load_checkpoint(const fs::path& checkpoint_dir, model::Gpt& model, AdamW& optimizer) {
  const fs::path state_path = checkpoint_dir / "state.json";
  std::ifstream in(state_path);
  if (!in) throw std::runtime_error(state_path.string() + ": cannot open checkpoint state");
  nlohmann::json j;
  CheckpointState s;
  try {
    j = nlohmann::json::parse(in);
    s.step = j.at("step").get<int64_t>();
    s.data_position = data::SamplerPosition::from_json(j.at("data_position"));
    s.seed = j.at("seed").get<uint64_t>();
    s.bf16_everywhere = j.at("bf16_everywhere").get<bool>();
    s.options = j.at("options");
    const std::string config_toml = j.at("model_config").get<std::string>();
    const model::GptConfig saved = model::parse_gpt_config_toml(config_toml, state_path.string() + " model_config");
    if (!(saved == model.config()))
      throw std::runtime_error("the checkpoint's model config differs from this run's:\n" + config_toml);
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(state_path.string() + ": malformed checkpoint state: " + e.what());
  } catch (const std::exception& e) {
    throw std::runtime_error(state_path.string() + ": " + e.what());
  }

  std::vector<model::Parameter> params = model.parameters();
  SafetensorsReader weights(checkpoint_dir / "model.safetensors");
  for (model::Parameter& p : params) {
    const SafetensorsEntry* e = weights.find(p.name);
    if (!e) throw std::runtime_error(weights.path().string() + ": no tensor '" + p.name + "'");
    if (e->dtype != DType::kF32 || e->shape != p.shape)
      throw std::runtime_error(weights.path().string() + ": '" + p.name + "' is " + std::string(dtype_name(e->dtype)) +
                               " " + shape_string(e->shape) + ", expected F32 " + shape_string(p.shape));
    const std::vector<float> v = weights.read(p.name).to_f32();
    std::copy(v.begin(), v.end(), p.value.begin());
  }
  SafetensorsReader opt(checkpoint_dir / "optimizer.safetensors");
  optimizer.load_state(opt, params);
  model.set_bf16_everywhere(s.bf16_everywhere);
  return s;
}

}  // namespace nibble::train
