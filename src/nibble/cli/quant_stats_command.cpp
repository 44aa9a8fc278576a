// `nibble quant-stats`: see quant_stats_command.h and README.md.
#include "nibble/cli/quant_stats_command.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>

#include "nibble/cli/commands.h"
#include "nibble/cli/quantize_command.h"
#include "nibble/data/sampler.h"
#include "nibble/model/config.h"
#include "nibble/nn/linear.h"
#include "nibble/nn/recipe.h"
#include "nibble/quant/quantize.h"
#include "nibble/tensor/atomic_file.h"
#include "nibble/tensor/safetensors.h"
#include "nibble/train/checkpoint.h"

namespace nibble::cli {
namespace fs = std::filesystem;
namespace {

QuantScheme scheme(const char* name, Format f, Block b, bool columnwise, bool rht, const char* layout) {
  return {name, make_spec(f, b, Rounding::kNearestEven, columnwise, rht), layout};
}

std::string join_names(const std::vector<QuantScheme>& schemes) {
  std::string s;
  for (const QuantScheme& q : schemes) s += (s.empty() ? "" : ", ") + q.name;
  return s;
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

// JSON has no NaN or infinity: those become null.
nlohmann::json number(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }

std::string shape_text(int64_t rows, int64_t cols) { return std::to_string(rows) + "x" + std::to_string(cols); }

TensorStats measure(std::string layer, std::string tensor, std::span<const float> x, int64_t rows, int64_t cols,
                    const std::vector<QuantScheme>& schemes) {
  TensorStats t{std::move(layer), std::move(tensor), rows, cols, 0.0, 0.0, {}};
  double sum_sq = 0;
  for (float v : x) {
    t.amax = std::max(t.amax, std::fabs(static_cast<double>(v)));
    sum_sq += static_cast<double>(v) * v;
    if (std::isnan(v)) t.amax = std::numeric_limits<double>::quiet_NaN();
  }
  t.rms = std::sqrt(sum_sq / static_cast<double>(x.size()));
  for (const QuantScheme& s : schemes) t.errors.push_back(scheme_error(x, rows, cols, s.spec));
  return t;
}

// ---- checkpoint source ----

// The model.safetensors that `path` names: the file itself, a checkpoint folder, or a run
// directory's newest checkpoint.
fs::path find_weights(const fs::path& path) {
  if (!fs::exists(path)) throw std::runtime_error(path.string() + ": no such checkpoint, checkpoint folder or run directory");
  if (fs::is_regular_file(path)) return path;
  if (fs::exists(path / "model.safetensors")) return path / "model.safetensors";
  if (const std::optional<fs::path> latest = train::latest_checkpoint(path)) return *latest / "model.safetensors";
  throw std::runtime_error(path.string() + ": neither a checkpoint folder (with model.safetensors) nor a run directory "
                           "with checkpoints/step_*");
}

// A directory written by `nibble prepare` (it has manifest.json), else token files of other tools.
data::TokenDataset open_data(const std::vector<std::string>& paths, const std::string& split, uint64_t vocab) {
  if (paths.size() == 1 && fs::is_directory(paths[0])) {
    if (!fs::exists(fs::path(paths[0]) / "manifest.json"))
      throw std::runtime_error(paths[0] + ": a directory without manifest.json (prepare it with `nibble prepare`, "
                               "or pass the token files themselves)");
    return data::TokenDataset::open_prepared(paths[0], split);
  }
  for (const std::string& p : paths)
    if (!fs::exists(p)) throw std::runtime_error(p + ": no such token file");
  return data::TokenDataset::open_files(paths, std::nullopt, vocab);
}

void from_checkpoint(const QuantStatsOptions& o, QuantStatsReport& r) {
  const fs::path weights_path = find_weights(*o.checkpoint);
  SafetensorsReader weights(weights_path);
  const std::string file = weights_path.string();
  const auto meta = [&](const char* key) -> std::optional<std::string> {
    const auto it = weights.metadata().find(key);
    return it == weights.metadata().end() ? std::nullopt : std::optional<std::string>(it->second);
  };
  model::GptConfig config;
  if (o.config) {
    config = model::load_gpt_config(*o.config);
  } else if (const auto text = meta("nibble_model_config")) {
    config = model::parse_gpt_config_toml(*text, file + " metadata nibble_model_config");
  } else {
    throw std::runtime_error(file + ": no model config in its metadata (not written by `nibble train`?); pass --config");
  }
  nn::Recipe recipe = nn::preset("fp32");
  if (o.recipe) {
    recipe = nn::make_recipe(*o.recipe);
  } else if (const auto text = meta("nibble_recipe")) {
    recipe = nn::parse_recipe_toml(*text, file + " metadata nibble_recipe");
  }

  model::Gpt model(config, recipe, /*init_seed=*/0, o.seed);
  // A checkpoint taken after the late switch to bf16 trained every layer in bf16: so does the pass.
  bool bf16_everywhere = false;
  if (!o.recipe && fs::exists(weights_path.parent_path() / "state.json")) {
    std::ifstream in(weights_path.parent_path() / "state.json");
    const nlohmann::json state = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    bf16_everywhere = state.is_object() && state.value("bf16_everywhere", false);
    model.set_bf16_everywhere(bf16_everywhere);
  }
  for (model::Parameter& p : model.parameters()) {
    const SafetensorsEntry* e = weights.find(p.name);
    if (!e) throw std::runtime_error(file + ": no tensor '" + p.name + "' (does the model config match?)");
    if (e->shape != p.shape)
      throw std::runtime_error(file + ": '" + p.name + "' is " + shape_string(e->shape) + ", the model config wants " +
                               shape_string(p.shape));
    const std::vector<float> v = weights.read(p.name).to_f32();
    std::copy(v.begin(), v.end(), p.value.begin());
  }

  // Per layer: W now, X and dY from the pass; printed in layer order, W X dY.
  std::map<std::string, std::vector<TensorStats>> by_layer;
  const auto linears = model.linears();
  for (const auto& [name, layer] : linears) {
    const std::span<const float> w = layer->weight();
    by_layer[name].push_back(measure(name, "W", w, layer->out_features(), layer->in_features(), r.schemes));
  }
  r.source = {{"kind", "checkpoint"}, {"path", file}, {"model", config.name},
              {"recipe", bf16_everywhere ? recipe.name + " (switched to bf16)" : recipe.name}};
  if (!o.data.empty()) {
    const int64_t seq = o.seq_len > 0 ? o.seq_len : config.seq_len;
    if (o.batch_size <= 0 || seq <= 0 || seq > config.seq_len)
      throw std::invalid_argument("--batch-size must be positive and --seq-len in [1, " + std::to_string(config.seq_len) +
                                  "] (the model's seq_len)");
    const data::TokenDataset dataset = open_data(o.data, o.split, static_cast<uint64_t>(config.vocab_size));
    if (dataset.vocab_size() > static_cast<uint64_t>(config.vocab_size))
      throw std::runtime_error(o.data[0] + ": the data's vocabulary (" + std::to_string(dataset.vocab_size()) +
                               " ids) does not fit the model's vocab_size " + std::to_string(config.vocab_size));
    data::WindowSampler sampler(dataset, static_cast<size_t>(seq + 1), static_cast<size_t>(seq), o.seed);
    std::vector<uint32_t> windows(static_cast<size_t>(o.batch_size * (seq + 1))), inputs, targets;
    sampler.next(static_cast<size_t>(o.batch_size), windows.data());
    for (int64_t b = 0; b < o.batch_size; ++b) {
      const auto w = windows.begin() + b * (seq + 1);
      inputs.insert(inputs.end(), w, w + seq);
      targets.insert(targets.end(), w + 1, w + seq + 1);
    }
    const double loss = capture_linear_tensors(
        model, inputs, targets, o.batch_size, seq,
        [&](const std::string& layer, const char* tensor, std::span<const float> x, int64_t rows, int64_t cols) {
          by_layer[layer].push_back(measure(layer, tensor, x, rows, cols, r.schemes));
        });
    r.source["data"] = o.data;
    r.source["batch"] = o.batch_size;
    r.source["seq_len"] = seq;
    r.source["loss"] = number(loss);
  }
  r.source["seed"] = o.seed;
  for (const auto& [name, layer] : linears)
    for (TensorStats& t : by_layer[name]) r.tensors.push_back(std::move(t));
}

// ---- output ----

void print_table(const QuantStatsReport& r, std::ostream& out) {
  const nlohmann::json& src = r.source;
  if (src.value("kind", "") == "checkpoint") {
    out << "checkpoint " << src["path"].get<std::string>() << " (model " << src["model"].get<std::string>()
        << ", recipe " << src["recipe"].get<std::string>() << "): ";
    if (src.contains("batch"))
      out << "W, and X and dY from one forward/backward pass on " << src["batch"].get<int64_t>() << " x "
          << src["seq_len"].get<int64_t>() << " tokens (loss "
          << (src["loss"].is_null() ? std::string("non-finite") : fmt("%.4f", src["loss"].get<double>())) << ")\n";
    else
      out << "weights only (give --data for activations and gradients)\n";
  }
  out << "schemes (every one rounds to nearest even; error measured in the tensor's own layout and domain):\n";
  size_t name_w = 0;
  for (const QuantScheme& s : r.schemes) name_w = std::max(name_w, s.name.size());
  for (const QuantScheme& s : r.schemes) {
    std::string pad(name_w - s.name.size(), ' ');
    out << "  " << s.name << pad << "  " << describe(s.spec) << ": " << s.layout << "\n";
  }
  out << "SNR in dB = -10 log10(||x - q(x)||^2 / ||x||^2), higher is better; '-': the blocks do not fit the shape\n";

  size_t layer_w = 5, shape_w = 5;
  for (const TensorStats& t : r.tensors)
    layer_w = std::max(layer_w, t.layer.size()), shape_w = std::max(shape_w, shape_text(t.rows, t.cols).size());
  size_t tensor_w = 6;
  for (const TensorStats& t : r.tensors) tensor_w = std::max(tensor_w, t.tensor.size());
  char buf[256];
  std::snprintf(buf, sizeof buf, "%-*s  %-*s  %-*s  %10s", static_cast<int>(layer_w), "layer", static_cast<int>(tensor_w),
                "tensor", static_cast<int>(shape_w), "shape", "amax");
  out << buf;
  for (const QuantScheme& s : r.schemes) out << "  " << std::string(s.name.size() < 8 ? 8 - s.name.size() : 0, ' ') << s.name;
  out << "\n";
  for (const TensorStats& t : r.tensors) {
    std::snprintf(buf, sizeof buf, "%-*s  %-*s  %-*s  %10.4g", static_cast<int>(layer_w), t.layer.c_str(),
                  static_cast<int>(tensor_w), t.tensor.c_str(), static_cast<int>(shape_w),
                  shape_text(t.rows, t.cols).c_str(), t.amax);
    out << buf;
    for (size_t i = 0; i < r.schemes.size(); ++i) {
      const std::string v = !t.errors[i] ? "-" : std::isnan(t.errors[i]->snr_db) ? "nan" : fmt("%.2f", t.errors[i]->snr_db);
      out << "  " << std::string(std::max<size_t>(r.schemes[i].name.size(), 8) - v.size(), ' ') << v;
    }
    out << "\n";
  }
  // Where error concentrates: the worst tensor under each scheme.
  if (r.tensors.size() > 1) {
    out << "lowest SNR per scheme:\n";
    for (size_t i = 0; i < r.schemes.size(); ++i) {
      const TensorStats* worst = nullptr;
      for (const TensorStats& t : r.tensors)
        if (t.errors[i] && !std::isnan(t.errors[i]->snr_db) && (!worst || t.errors[i]->snr_db < worst->errors[i]->snr_db))
          worst = &t;
      if (worst)
        out << "  " << r.schemes[i].name << std::string(name_w - r.schemes[i].name.size(), ' ') << "  "
            << fmt("%.2f", worst->errors[i]->snr_db) << " dB  " << worst->layer << " " << worst->tensor << "\n";
    }
  }
}

}  // namespace

const std::vector<QuantScheme>& quant_schemes() {
  static const std::vector<QuantScheme> all = {
      scheme("nvfp4_1x16", Format::kNvfp4, Block::k1x16, false, false, "blocks along each row (Fprop/Dgrad layout)"),
      scheme("nvfp4_1x16_col", Format::kNvfp4, Block::k1x16, true, false,
             "blocks along each column (Wgrad layout of X and dY: along tokens)"),
      scheme("nvfp4_1x16_col_rht", Format::kNvfp4, Block::k1x16, true, true,
             "RHT then blocks along each column (the nvfp4 recipe's Wgrad inputs)"),
      scheme("nvfp4_16x16", Format::kNvfp4, Block::k16x16, false, false, "16x16 tiles (the nvfp4 recipe's weights)"),
      scheme("mxfp4_1x32", Format::kMxfp4, Block::k1x32, false, false, "blocks along each row"),
      scheme("fp8_e4m3", Format::kFp8E4M3, Block::kTensor, false, false, "one per-tensor scale"),
      scheme("fp8_e5m2", Format::kFp8E5M2, Block::kTensor, false, false, "one per-tensor scale"),
  };
  return all;
}

std::vector<QuantScheme> select_schemes(const std::vector<std::string>& names) {
  if (names.empty()) return quant_schemes();
  std::vector<QuantScheme> out;
  for (const std::string& n : names) {
    const auto it = std::find_if(quant_schemes().begin(), quant_schemes().end(),
                                 [&](const QuantScheme& s) { return s.name == n; });
    if (it == quant_schemes().end())
      throw std::invalid_argument("unknown scheme '" + n + "' (known: " + join_names(quant_schemes()) + ")");
    if (std::any_of(out.begin(), out.end(), [&](const QuantScheme& s) { return s.name == n; }))
      throw std::invalid_argument("scheme '" + n + "' is given more than once");
    out.push_back(*it);
  }
  return out;
}

std::optional<SchemeError> scheme_error(std::span<const float> x, int64_t rows, int64_t cols, const QuantSpec& spec) {
  try {
    validate(spec, rows, cols);
  } catch (const std::invalid_argument&) {
    return std::nullopt;
  }
  const std::vector<float> approx = dequantize_as_input(quantize(x, rows, cols, spec));
  double err = 0, ref = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double d = static_cast<double>(approx[i]) - static_cast<double>(x[i]);
    err += d * d;
    ref += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  }
  SchemeError e;
  if (!std::isfinite(err) || !std::isfinite(ref)) {
    e.rel_mse = std::numeric_limits<double>::quiet_NaN();  // NaN/Inf in the tensor
  } else {
    // An all-zero tensor quantizes exactly: 0/0 is taken as no error.
    e.rel_mse = ref > 0 ? err / ref : 0.0;
  }
  e.snr_db = -10.0 * std::log10(e.rel_mse);
  return e;
}

std::pair<int64_t, int64_t> parse_shape(const std::string& text) {
  const auto bad = [&] {
    return std::invalid_argument("--synthetic '" + text + "': expected ROWSxCOLS with positive integers, e.g. 1024x768");
  };
  const size_t x = text.find('x');
  if (x == std::string::npos || x == 0 || x + 1 == text.size()) throw bad();
  const auto parse = [&](const std::string& s) {
    if (s.size() > 12 || !std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; })) throw bad();
    const int64_t v = std::stoll(s);
    if (v <= 0) throw bad();
    return v;
  };
  const int64_t rows = parse(text.substr(0, x)), cols = parse(text.substr(x + 1));
  if (rows > (int64_t{1} << 40) / cols) throw std::invalid_argument("--synthetic '" + text + "': too many elements");
  return {rows, cols};
}

std::vector<float> synthetic_tensor(int64_t rows, int64_t cols, const QuantStatsOptions& o) {
  std::mt19937_64 rng(o.seed);
  std::vector<float> x(static_cast<size_t>(rows * cols));
  const std::string& d = o.distribution;
  if (d == "heavy-tailed") {
    std::student_t_distribution<double> t(3.0);
    for (float& v : x) v = static_cast<float>(t(rng));
    return x;
  }
  if (d != "gaussian" && d != "outlier-channels")
    throw std::invalid_argument("unknown --distribution '" + d + "' (gaussian, outlier-channels, heavy-tailed)");
  std::normal_distribution<double> n(0.0, 1.0);
  for (float& v : x) v = static_cast<float>(n(rng));
  if (d == "gaussian") return x;
  if (!(o.outlier_fraction > 0 && o.outlier_fraction <= 1) || !(o.outlier_scale > 0))
    throw std::invalid_argument("--outlier-fraction must be in (0, 1] and --outlier-scale positive");
  // Outlier channels: a random subset of the columns, each offset by +-outlier_scale on every row.
  std::vector<int64_t> channels(static_cast<size_t>(cols));
  std::iota(channels.begin(), channels.end(), 0);
  std::shuffle(channels.begin(), channels.end(), rng);
  const int64_t k = std::max<int64_t>(1, std::llround(o.outlier_fraction * static_cast<double>(cols)));
  for (int64_t i = 0; i < k; ++i) {
    const int64_t c = channels[static_cast<size_t>(i)];
    const float offset = static_cast<float>((rng() & 1) ? o.outlier_scale : -o.outlier_scale);
    for (int64_t r = 0; r < rows; ++r) x[r * cols + c] += offset;
  }
  return x;
}

double capture_linear_tensors(model::Gpt& model, std::span<const uint32_t> inputs, std::span<const uint32_t> targets,
                              int64_t batch, int64_t seq, const LinearTensorVisitor& visit) {
  struct Observer : nn::LinearObserver {
    std::map<const nn::Linear*, std::string> names;
    const LinearTensorVisitor* visit = nullptr;
    void on_forward(const nn::Linear& l, std::span<const float> x, int64_t tokens) override {
      (*visit)(names.at(&l), "X", x, tokens, l.in_features());
    }
    void on_backward(const nn::Linear& l, std::span<const float> dy, int64_t tokens) override {
      (*visit)(names.at(&l), "dY", dy, tokens, l.out_features());
    }
  } observer;
  observer.visit = &visit;
  const auto linears = model.linears();
  for (const auto& [name, layer] : linears) {
    observer.names[layer] = name;
    layer->set_observer(&observer);
  }
  // The observer lives on this stack frame: detach it whatever happens.
  struct Detach {
    const std::vector<std::pair<std::string, nn::Linear*>>& layers;
    ~Detach() {
      for (const auto& l : layers) l.second->set_observer(nullptr);
    }
  } detach{linears};
  return model.forward_backward(inputs, targets, batch, seq);
}

nlohmann::json to_json(const QuantStatsReport& r) {
  nlohmann::json j;
  j["source"] = r.source;
  j["schemes"] = nlohmann::json::array();
  for (const QuantScheme& s : r.schemes)
    j["schemes"].push_back({{"name", s.name}, {"spec", describe(s.spec)}, {"layout", s.layout}});
  j["tensors"] = nlohmann::json::array();
  for (const TensorStats& t : r.tensors) {
    nlohmann::json e;
    e["layer"] = t.layer;
    e["tensor"] = t.tensor;
    e["shape"] = {t.rows, t.cols};
    e["amax"] = number(t.amax);
    e["rms"] = number(t.rms);
    nlohmann::json res = nlohmann::json::object();
    for (size_t i = 0; i < r.schemes.size(); ++i)
      res[r.schemes[i].name] = t.errors[i] ? nlohmann::json{{"rel_mse", number(t.errors[i]->rel_mse)},
                                                            {"snr_db", number(t.errors[i]->snr_db)}}
                                           : nlohmann::json(nullptr);
    e["errors"] = std::move(res);
    j["tensors"].push_back(std::move(e));
  }
  return j;
}

QuantStatsReport run_quant_stats(const QuantStatsOptions& o, std::ostream& out) {
  if (o.checkpoint.has_value() == o.synthetic.has_value())
    throw std::invalid_argument("give exactly one source: --checkpoint PATH or --synthetic ROWSxCOLS");
  QuantStatsReport r;
  r.schemes = select_schemes(o.schemes);
  if (o.json) {
    const fs::path dir = o.json->parent_path();
    if (!dir.empty() && !fs::is_directory(dir))
      throw std::runtime_error(o.json->string() + ": directory " + dir.string() + " does not exist");
  }
  if (o.synthetic && (!o.data.empty() || o.config || o.recipe))
    throw std::invalid_argument("--data, --config and --recipe apply to --checkpoint, not to --synthetic");
  if (o.synthetic) {
    const auto [rows, cols] = parse_shape(*o.synthetic);
    const std::vector<float> x = synthetic_tensor(rows, cols, o);
    r.tensors.push_back(measure("synthetic", o.distribution, x, rows, cols, r.schemes));
    if (std::none_of(r.tensors[0].errors.begin(), r.tensors[0].errors.end(), [](const auto& e) { return e.has_value(); }))
      throw std::invalid_argument("--synthetic " + *o.synthetic + ": no selected scheme's blocks fit this shape "
                                  "(1x16 blocks need multiples of 16, 1x32 of 32)");
    r.source = {{"kind", "synthetic"}, {"shape", {rows, cols}}, {"distribution", o.distribution}, {"seed", o.seed}};
    if (o.distribution.starts_with("outlier-")) {
      r.source["outlier_fraction"] = o.outlier_fraction;
      r.source["outlier_scale"] = o.outlier_scale;
    }
  } else {
    from_checkpoint(o, r);
  }
  print_table(r, out);
  if (o.json) {
    const std::string text = to_json(r).dump(2) + "\n";
    AtomicFileWriter w(*o.json);
    w.write(text.data(), text.size());
    w.commit();
    out << "json: " << o.json->string() << "\n";
  }
  return r;
}

void add_quant_stats_command(CLI::App& app) {
  auto o = std::make_shared<QuantStatsOptions>();
  auto checkpoint = std::make_shared<std::string>();
  auto config = std::make_shared<std::string>();
  auto recipe = std::make_shared<std::string>();
  auto json = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand(
      "quant-stats",
      "Quantization error (relative MSE, SNR in dB) of each linear layer's weights, activations and gradients, or of a "
      "synthetic tensor, under nvfp4 (1x16, 16x16, with and without RHT), mxfp4 and fp8");
  CLI::Option* ck = cmd->add_option("--checkpoint", *checkpoint,
                                    "A checkpoint folder (step_*), its model.safetensors, or a run directory (newest checkpoint)");
  auto synthetic = std::make_shared<std::string>();
  CLI::Option* syn = cmd->add_option("--synthetic", *synthetic, "A synthetic ROWSxCOLS tensor instead of a checkpoint");
  ck->excludes(syn);
  syn->excludes(ck);
  cmd->add_option("--config", *config, "Model config (default: the one in the checkpoint's metadata)")
      ->check(CLI::ExistingFile);
  cmd->add_option("--recipe", *recipe,
                  "Recipe of the forward/backward pass (preset or .toml; default: the checkpoint's recipe)");
  cmd->add_option("--data", o->data, "A `nibble prepare` directory or token files: one batch for activations and gradients");
  cmd->add_option("--split", o->split, "Split of a prepared directory")->capture_default_str();
  cmd->add_option("--batch-size", o->batch_size, "Sequences in the batch")->capture_default_str();
  cmd->add_option("--seq-len", o->seq_len, "Tokens per sequence (default: the model's seq_len)");
  cmd->add_option("--distribution", o->distribution, "gaussian, outlier-channels or heavy-tailed (Student's t, 3 dof)")
      ->capture_default_str();
  cmd->add_option("--outlier-fraction", o->outlier_fraction, "outlier-channels: fraction of the columns that are outliers")->capture_default_str();
  cmd->add_option("--outlier-scale", o->outlier_scale, "outlier-channels: their offset, in standard deviations of the others")->capture_default_str();
  cmd->add_option("--seed", o->seed, "Seed of the batch, the synthetic tensor and the pass's stochastic rounding")
      ->capture_default_str();
  cmd->add_option("--schemes", o->schemes, "Schemes to measure, comma-separated (default: all)")->delimiter(',');
  cmd->add_option("--json", *json, "Also write the numbers to this JSON file");
  cmd->callback([o, checkpoint, synthetic, config, recipe, json] {
    if (!checkpoint->empty()) o->checkpoint = *checkpoint;
    if (!synthetic->empty()) o->synthetic = *synthetic;
    if (!config->empty()) o->config = *config;
    if (!recipe->empty()) o->recipe = *recipe;
    if (!json->empty()) o->json = *json;
    run_quant_stats(*o, std::cout);
  });
}

}  // namespace nibble::cli
