// `nibble quantize INPUT OUTPUT.safetensors`: see quantize_command.h and README.md.
#include "nibble/cli/quantize_command.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <map>
#include <memory>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "nibble/cli/commands.h"
#include "nibble/tensor/npy.h"
#include "nibble/tensor/safetensors.h"

namespace nibble::cli {
namespace {

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

bool is_fp4(Format f) { return f == Format::kNvfp4 || f == Format::kMxfp4; }

// A tensor chosen for quantization, read when its turn comes (checkpoints can be large).
struct Selected {
  std::string name;
  std::vector<int64_t> shape;
  DType dtype;
};

// The rows x cols matrix a tensor is quantized as: 2-D as is, 1-D as 1 x n.
std::pair<int64_t, int64_t> matrix_shape(const std::vector<int64_t>& shape) {
  return shape.size() == 1 ? std::pair{int64_t{1}, shape[0]} : std::pair{shape[0], shape[1]};
}

bool is_float_dtype(DType d) { return d == DType::kF32 || d == DType::kBF16; }

// Reads the input file's tensors on demand: a .npy file holds one, a safetensors file many.
class Input {
 public:
  explicit Input(const QuantizeOptions& o) : path_(o.input) {
    const std::string file = path_.string();
    if (!std::filesystem::exists(path_)) throw std::runtime_error(file + ": no such file");
    if (is_npy_file(path_)) {
      if (o.tensors.size() > 1)
        throw std::runtime_error(file + ": a .npy file holds one tensor: give at most one --tensor (its output name)");
      if (o.input_dtype != "auto" && o.input_dtype != "f32" && o.input_dtype != "bf16")
        throw std::invalid_argument("--input-dtype must be auto, f32 or bf16, not '" + o.input_dtype + "'");
      npy_ = read_npy(path_, {.u16_as_bf16 = o.input_dtype == "bf16"});
      if (npy_->dtype == DType::kU16)
        throw std::runtime_error(file + ": holds uint16 ('<u2') data; if these are bfloat16 bits, pass --input-dtype bf16");
      if (!is_float_dtype(npy_->dtype))
        throw std::runtime_error(file + ": holds " + std::string(dtype_name(npy_->dtype)) +
                                 " data; quantize takes float32 ('<f4') or bfloat16 bits ('<u2' with --input-dtype bf16)");
      const std::string name = o.tensors.empty() ? path_.stem().string() : o.tensors[0];
      check_rank(name, npy_->shape);
      selected_.push_back({name, npy_->shape, npy_->dtype});
      return;
    }
    if (!is_safetensors_file(path_))
      throw std::runtime_error(file + ": neither a .npy nor a .safetensors file (unrecognized first bytes)");
    if (o.input_dtype != "auto")
      throw std::invalid_argument(file + ": --input-dtype applies to .npy input only (safetensors files name their dtypes)");
    st_.emplace(path_);
    if (!o.tensors.empty()) {
      for (const std::string& name : o.tensors) {
        if (std::count(o.tensors.begin(), o.tensors.end(), name) > 1)
          throw std::invalid_argument("--tensor '" + name + "' is given more than once");
        const SafetensorsEntry* e = st_->find(name);
        if (!e) throw std::runtime_error(file + ": no tensor named '" + name + "'" + float_matrix_list());
        if (!is_float_dtype(e->dtype))
          throw std::runtime_error(file + ": tensor '" + name + "' is " + std::string(dtype_name(e->dtype)) +
                                   "; quantize takes F32 or BF16 tensors");
        check_rank(name, e->shape);
        selected_.push_back({name, e->shape, e->dtype});
      }
    } else {
      takes_all_ = true;
      for (const SafetensorsEntry& e : st_->entries()) {
        if (is_float_dtype(e.dtype) && e.shape.size() == 2)
          selected_.push_back({e.name, e.shape, e.dtype});
        else
          skipped_.push_back(e.name);
      }
      if (selected_.empty()) throw std::runtime_error(file + ": holds no 2-D F32 or BF16 tensor to quantize");
    }
  }

  const std::vector<Selected>& selected() const { return selected_; }
  const std::vector<std::string>& skipped() const { return skipped_; }
  bool takes_all() const { return st_ && takes_all_; }  // safetensors input, no --tensor

  // A .npy input was read whole up front; its one tensor is handed over, not copied.
  HostTensor read(const Selected& s) { return npy_ ? std::move(*npy_) : st_->read(s.name); }

 private:
  void check_rank(const std::string& name, const std::vector<int64_t>& shape) const {
    if (shape.size() != 1 && shape.size() != 2)
      throw std::runtime_error(path_.string() + ": tensor '" + name + "' has shape " + shape_string(shape) +
                               "; quantize takes 2-D tensors (1-D ones as 1 x n)");
  }
  std::string float_matrix_list() const {
    std::string names;
    int n = 0;
    for (const SafetensorsEntry& e : st_->entries()) {
      if (!is_float_dtype(e.dtype) || e.shape.size() != 2) continue;
      if (n++ < 8) names += (names.empty() ? "" : ", ") + e.name;
    }
    if (n == 0) return " (it holds no 2-D F32 or BF16 tensor)";
    return " (2-D float tensors: " + names + (n > 8 ? ", ..." : "") + ")";
  }

  std::filesystem::path path_;
  std::optional<HostTensor> npy_;
  std::optional<SafetensorsReader> st_;
  std::vector<Selected> selected_;
  std::vector<std::string> skipped_;
  bool takes_all_ = false;
};

std::string signs_string(RhtSigns s) {
  std::string out;
  for (int i = 0; i < kRhtBlock; ++i) out += (i ? "," : "") + std::string(s.sign(i) > 0 ? "+1" : "-1");
  return out;
}

}  // namespace

QuantSpec quant_spec_from(const QuantizeOptions& o) {
  static const std::map<std::string, Format> formats = {
      {"nvfp4", Format::kNvfp4}, {"mxfp4", Format::kMxfp4}, {"fp8_e4m3", Format::kFp8E4M3}, {"fp8_e5m2", Format::kFp8E5M2}};
  static const std::map<std::string, Block> blocks = {
      {"tensor", Block::kTensor}, {"1x16", Block::k1x16}, {"16x16", Block::k16x16}, {"1x32", Block::k1x32}};
  QuantSpec s;
  const auto f = formats.find(o.format);
  if (f == formats.end()) throw std::invalid_argument("unknown --format '" + o.format + "' (nvfp4, mxfp4, fp8_e4m3, fp8_e5m2)");
  s.format = f->second;
  if (o.block.empty()) {
    s.block = s.format == Format::kNvfp4 ? Block::k1x16 : s.format == Format::kMxfp4 ? Block::k1x32 : Block::kTensor;
  } else {
    const auto b = blocks.find(o.block);
    if (b == blocks.end()) throw std::invalid_argument("unknown --block '" + o.block + "' (1x16, 16x16, 1x32, tensor)");
    s.block = b->second;
  }
  if (o.rounding != "rne" && o.rounding != "sr")
    throw std::invalid_argument("unknown --rounding '" + o.rounding + "' (rne, sr)");
  s.rounding = o.rounding == "sr" ? Rounding::kStochastic : Rounding::kNearestEven;
  s.seed = o.seed;
  s.rht = o.rht;
  if (o.rht_seed) {
    if (!o.rht) throw std::invalid_argument("--rht-seed needs --rht");
    s.rht_signs = rht_signs_from_seed(*o.rht_seed);
  }
  s.columnwise = o.columnwise;
  return s;
}

std::vector<float> dequantize_as_input(const QuantizedTensor& q) {
  std::vector<float> m = dequantize(q);
  if (q.spec.rht) rht_blocks(m, q.rows, q.cols, q.spec.rht_signs, /*inverse=*/true);
  if (!q.spec.columnwise) return m;
  std::vector<float> t(m.size());  // q is X^T (q.rows = X's cols): transpose back
  for (int64_t r = 0; r < q.rows; ++r)
    for (int64_t c = 0; c < q.cols; ++c) t[c * q.rows + r] = m[r * q.cols + c];
  return t;
}

ErrorStats error_stats(std::span<const float> x, std::span<const float> approx) {
  double err = 0, ref = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double d = static_cast<double>(approx[i]) - x[i];
    err += d * d;
    ref += static_cast<double>(x[i]) * x[i];
  }
  ErrorStats s;
  s.relative_rms = ref > 0 ? std::sqrt(err / ref) : (err > 0 ? INFINITY : 0.0);
  s.snr_db = -20.0 * std::log10(s.relative_rms);
  return s;
}

double bits_per_element(const QuantizedTensor& q) {
  const double n = static_cast<double>(q.numel());
  const double element_bits = is_fp4(q.spec.format) ? 4.0 : 8.0;
  const double scale_bits = 8.0 * static_cast<double>(q.scales.size());
  const double tensor_scale_bits = q.spec.format == Format::kMxfp4 ? 0.0 : 32.0;
  return element_bits + (scale_bits + tensor_scale_bits) / n;
}

void run_quantize(const QuantizeOptions& o, std::ostream& log) {
  const QuantSpec spec = quant_spec_from(o);
  const std::filesystem::path out_dir = o.output.parent_path();
  if (!out_dir.empty() && !std::filesystem::is_directory(out_dir))
    throw std::runtime_error(o.output.string() + ": directory " + out_dir.string() + " does not exist");
  Input input(o);
  const std::string file = o.input.string();
  // Shape-independent errors (e.g. mxfp4 with 16x16 blocks) come from any shape the blocks fit.
  const auto combination_ok = [&] {
    try {
      validate(spec, 256, 256);
      return true;
    } catch (const std::invalid_argument&) {
      return false;
    }
  };

  std::vector<NamedTensor> outputs;
  nlohmann::json quantized_names = nlohmann::json::array();
  std::map<std::string, std::string> metadata;
  std::vector<std::string> skipped = input.skipped();
  for (const Selected& s : input.selected()) {
    const auto [rows, cols] = matrix_shape(s.shape);
    try {
      validate(spec, rows, cols);
    } catch (const std::invalid_argument& e) {
      if (o.skip_incompatible && input.takes_all() && combination_ok()) {
        log << "skipping '" << s.name << "' " << shape_string(s.shape) << ": " << e.what() << "\n";
        skipped.push_back(s.name);
        continue;
      }
      const bool hint = input.takes_all() && !o.skip_incompatible && combination_ok();
      throw std::runtime_error(file + ": tensor '" + s.name + "': " + e.what() +
                               (hint ? " (choose tensors with --tensor, or pass --skip-incompatible)" : ""));
    }
    const HostTensor t = input.read(s);
    const std::vector<float> x = t.to_f32();
    const QuantizedTensor q = t.dtype == DType::kBF16 ? quantize(std::span<const bf16_t>(t.to_bf16()), rows, cols, spec)
                                                      : quantize(std::span<const float>(x), rows, cols, spec);

    const std::vector<int64_t> data_shape = {q.rows, is_fp4(spec.format) ? q.cols / 2 : q.cols};
    const DType data_dtype = spec.format == Format::kFp8E4M3   ? DType::kF8E4M3
                             : spec.format == Format::kFp8E5M2 ? DType::kF8E5M2
                                                               : DType::kU8;
    outputs.emplace_back(s.name + ".data", HostTensor::raw(data_dtype, data_shape, q.data));
    if (!q.scales.empty()) {
      const DType scale_dtype = spec.format == Format::kMxfp4 ? DType::kF8E8M0 : DType::kF8E4M3;
      outputs.emplace_back(s.name + ".scales", HostTensor::raw(scale_dtype, {q.scale_rows(), q.scale_cols()}, q.scales));
    }
    outputs.emplace_back(s.name + ".decode_scale", HostTensor::f32({}, std::span(&q.decode_scale, 1)));
    const std::vector<float> approx = dequantize_as_input(q);
    if (o.dequantize) outputs.emplace_back(s.name + ".dequantized", HostTensor::f32(s.shape, approx));

    metadata[s.name + ".shape"] = shape_string(s.shape);
    metadata[s.name + ".dtype"] = std::string(dtype_name(s.dtype));
    metadata[s.name + ".amax"] = fmt("%.9g", q.amax);
    quantized_names.push_back(s.name);

    log << s.name << " " << shape_string(s.shape) << " " << dtype_name(s.dtype) << " -> " << describe(spec) << ": ";
    if (!q.finite()) {
      log << "input holds NaN or Inf: written as a non-finite tensor (decode_scale NaN, codes zero)\n";
    } else if (!std::isfinite(q.amax)) {  // mxfp4 marks only the blocks that hold them
      log << "input holds NaN or Inf: those blocks have the E8M0 NaN scale 0xFF and zero codes\n";
    } else {
      const ErrorStats e = error_stats(x, approx);
      log << "amax " << fmt("%.6g", q.amax) << ", relative RMS error " << fmt("%.4g", e.relative_rms) << " (SNR "
          << fmt("%.1f", e.snr_db) << " dB)\n";
    }
  }
  if (outputs.empty()) throw std::runtime_error(file + ": no tensor left to quantize");

  metadata["format"] = format_name(spec.format);
  metadata["block"] = block_name(spec.block);
  metadata["rounding"] = std::string(rounding_name(spec.rounding));
  metadata["seed"] = std::to_string(spec.seed);
  metadata["rht"] = spec.rht ? "true" : "false";
  if (spec.rht) metadata["rht_signs"] = signs_string(spec.rht_signs);
  metadata["columnwise"] = spec.columnwise ? "true" : "false";
  metadata["dequantized"] = o.dequantize ? "true" : "false";
  metadata["tensors"] = quantized_names.dump();
  metadata["source"] = o.input.filename().string();
  metadata["producer"] = "nibble quantize";
  write_safetensors(o.output, outputs, metadata);

  if (!skipped.empty()) {
    log << "left out " << skipped.size() << " tensor(s) (not 2-D F32/BF16, or not fitting the blocks):";
    for (size_t i = 0; i < skipped.size() && i < 8; ++i) log << " " << skipped[i];
    log << (skipped.size() > 8 ? " ...\n" : "\n");
  }
  log << "wrote " << o.output.string() << ": " << quantized_names.size() << " tensor(s), "
      << std::filesystem::file_size(o.output) << " bytes\n";
}

void add_quantize_command(CLI::App& app) {
  auto o = std::make_shared<QuantizeOptions>();
  CLI::App* cmd = app.add_subcommand(
      "quantize",
      "Quantize 2-D float tensors from a .npy or .safetensors file to NVFP4, MXFP4 or FP8 and write their packed "
      "codes and scales to a .safetensors file");
  cmd->add_option("input", o->input, "Input .npy (float32, or bfloat16 bits as uint16) or .safetensors (F32/BF16)")
      ->required();
  cmd->add_option("output", o->output, "Output .safetensors file (replaced only when everything succeeded)")->required();
  cmd->add_option("--tensor", o->tensors,
                  "Tensor to quantize (repeatable). Safetensors input: default every 2-D F32/BF16 tensor. "
                  ".npy input: the output name (default: the file's stem)");
  cmd->add_option("--format", o->format, "nvfp4 | mxfp4 | fp8_e4m3 | fp8_e5m2")
      ->check(CLI::IsMember({"nvfp4", "mxfp4", "fp8_e4m3", "fp8_e5m2"}))
      ->capture_default_str();
  cmd->add_option("--block", o->block, "1x16 | 16x16 | 1x32 | tensor (default: nvfp4 1x16, mxfp4 1x32, fp8 tensor)")
      ->check(CLI::IsMember({"1x16", "16x16", "1x32", "tensor"}));
  cmd->add_option("--rounding", o->rounding, "rne (round to nearest even) | sr (stochastic)")
      ->check(CLI::IsMember({"rne", "sr"}))
      ->capture_default_str();
  cmd->add_option("--seed", o->seed, "Seed of stochastic rounding")->capture_default_str();
  cmd->add_flag("--rht", o->rht, "Apply the 16-point Random Hadamard Transform before quantizing");
  cmd->add_option("--rht-seed", o->rht_seed, "Draw the RHT sign vector from this seed (default: TransformerEngine's)");
  cmd->add_flag("--columnwise", o->columnwise, "Quantize the transpose (blocks along the rows, as Wgrad's operands)");
  cmd->add_flag("--dequantize", o->dequantize, "Also write NAME.dequantized (F32, the input's layout)");
  cmd->add_option("--input-dtype", o->input_dtype, "For .npy input: auto | f32 | bf16 (read '<u2' as bfloat16 bits)")
      ->check(CLI::IsMember({"auto", "f32", "bf16"}))
      ->capture_default_str();
  cmd->add_flag("--skip-incompatible", o->skip_incompatible,
                "Without --tensor: skip tensors whose shape the blocks do not fit, instead of failing");
  cmd->callback([o] { run_quantize(*o, std::cout); });
}

}  // namespace nibble::cli
