// `nibble quantize` end to end, in-process, on temporary files.
#include "nibble/cli/quantize_command.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>

#include "nibble/cli/commands.h"
#include "nibble/tensor/npy.h"
#include "nibble/tensor/safetensors.h"
#include "nn/nn_test_util.h"
#include "tensor/tensor_test_util.h"

namespace nibble::cli {
namespace {

using test::expect_error;
using test::TempDir;

using nn::test::random_normal;

std::vector<bf16_t> to_bf16(const std::vector<float>& v) {
  std::vector<bf16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i].bits = BF16::encode(v[i], Rounding::kNearestEven);
  return out;
}

float scalar(const HostTensor& t) {
  EXPECT_TRUE(t.shape.empty());
  return t.to_f32().at(0);
}

// Checks that OUTPUT holds exactly what the library makes of x with `spec` under `name`.
void expect_output_matches(SafetensorsReader& out, const std::string& name, const QuantizedTensor& q,
                           const std::vector<int64_t>& input_shape, bool dequantized) {
  SCOPED_TRACE(name + " " + describe(q.spec));
  const bool fp4 = q.spec.format == Format::kNvfp4 || q.spec.format == Format::kMxfp4;
  const HostTensor data = out.read(name + ".data");
  EXPECT_EQ(data.dtype, !fp4 ? (q.spec.format == Format::kFp8E4M3 ? DType::kF8E4M3 : DType::kF8E5M2) : DType::kU8);
  EXPECT_EQ(data.shape, (std::vector<int64_t>{q.rows, fp4 ? q.cols / 2 : q.cols}));
  EXPECT_EQ(data.bytes, q.data);
  if (q.scales.empty()) {
    EXPECT_EQ(out.find(name + ".scales"), nullptr);
  } else {
    const HostTensor scales = out.read(name + ".scales");
    EXPECT_EQ(scales.dtype, q.spec.format == Format::kMxfp4 ? DType::kF8E8M0 : DType::kF8E4M3);
    EXPECT_EQ(scales.shape, (std::vector<int64_t>{q.scale_rows(), q.scale_cols()}));
    EXPECT_EQ(scales.bytes, q.scales);
  }
  const float g = scalar(out.read(name + ".decode_scale"));
  if (q.finite()) {
    EXPECT_EQ(g, q.decode_scale);
  } else {
    EXPECT_TRUE(std::isnan(g));
  }
  if (dequantized) {
    const HostTensor d = out.read(name + ".dequantized");
    EXPECT_EQ(d.dtype, DType::kF32);
    EXPECT_EQ(d.shape, input_shape);
    const std::vector<float> want = dequantize_as_input(q), got = d.to_f32();
    ASSERT_EQ(got.size(), want.size());
    EXPECT_EQ(std::memcmp(got.data(), want.data(), 4 * got.size()), 0);
  } else {
    EXPECT_EQ(out.find(name + ".dequantized"), nullptr);
  }
  EXPECT_EQ(out.metadata().at(name + ".shape"), shape_string(input_shape));
}

TEST(QuantizeCommand, NpyFloat32EveryFormatAndOption) {
  const uint64_t seed = test::fresh_seed();
  std::mt19937_64 rng(seed);
  TempDir dir;
  const int64_t rows = 64, cols = 64;
  std::vector<float> x = random_normal(rng, rows * cols);
  x[5] *= 40.0f;  // an outlier
  write_npy(dir / "act.npy", HostTensor::f32({rows, cols}, x));

  struct Case {
    std::string format, block, rounding;
    bool rht, columnwise;
  };
  const std::vector<Case> cases = {
      {"nvfp4", "", "rne", false, false},      {"nvfp4", "16x16", "rne", false, false},
      {"nvfp4", "1x16", "sr", false, false},   {"nvfp4", "1x16", "rne", true, true},
      {"nvfp4", "16x16", "rne", false, true},  {"mxfp4", "", "rne", false, false},
      {"mxfp4", "1x32", "sr", true, true},     {"fp8_e4m3", "", "rne", false, false},
      {"fp8_e5m2", "tensor", "sr", false, true},
  };
  for (const Case& c : cases) {
    QuantizeOptions o;
    o.input = dir / "act.npy";
    o.output = dir / "q.safetensors";
    o.format = c.format;
    o.block = c.block;
    o.rounding = c.rounding;
    o.seed = seed;
    o.rht = c.rht;
    o.columnwise = c.columnwise;
    o.dequantize = true;
    std::ostringstream log;
    run_quantize(o, log);
    const QuantSpec spec = quant_spec_from(o);
    const QuantizedTensor q = quantize(std::span<const float>(x), rows, cols, spec);
    SafetensorsReader out(o.output);
    expect_output_matches(out, "act", q, {rows, cols}, true);
    EXPECT_EQ(out.metadata().at("format"), c.format);
    EXPECT_EQ(out.metadata().at("block"), block_name(spec.block));
    EXPECT_EQ(out.metadata().at("rounding"), c.rounding);
    EXPECT_EQ(out.metadata().at("seed"), std::to_string(seed));
    EXPECT_EQ(out.metadata().at("rht"), c.rht ? "true" : "false");
    EXPECT_EQ(out.metadata().at("columnwise"), c.columnwise ? "true" : "false");
    EXPECT_EQ(out.metadata().at("tensors"), "[\"act\"]");
    EXPECT_EQ(out.metadata().count("rht_signs"), c.rht ? 1u : 0u);
    EXPECT_NE(log.str().find("act [64, 64] F32 -> " + describe(spec)), std::string::npos) << log.str();
    // The dequantized tensor approximates the input in its own layout (RHT and transpose undone).
    const ErrorStats e = error_stats(x, dequantize_as_input(q));
    EXPECT_LT(e.relative_rms, c.format.rfind("fp8", 0) == 0 ? 0.08 : 0.25) << describe(spec);
  }
  EXPECT_EQ(dir.files().size(), 2u);
}

TEST(QuantizeCommand, DefaultBlocksFollowTheFormat) {
  QuantizeOptions o;
  EXPECT_EQ(quant_spec_from(o).block, Block::k1x16);
  o.format = "mxfp4";
  EXPECT_EQ(quant_spec_from(o).block, Block::k1x32);
  o.format = "fp8_e4m3";
  EXPECT_EQ(quant_spec_from(o).block, Block::kTensor);
  o.format = "int4";
  expect_error([&] { quant_spec_from(o); }, {"unknown --format 'int4'"});
  o = {};
  o.rht_seed = 5;
  expect_error([&] { quant_spec_from(o); }, {"--rht-seed needs --rht"});
  o.rht = true;
  EXPECT_EQ(quant_spec_from(o).rht_signs.negative_mask, rht_signs_from_seed(5).negative_mask);
}

TEST(QuantizeCommand, NpyBf16BitsNeedTheFlag) {
  std::mt19937_64 rng(test::fresh_seed());
  TempDir dir;
  const std::vector<bf16_t> x = to_bf16(random_normal(rng, 16 * 32, 2.0f));
  write_npy(dir / "b.npy", HostTensor::bf16({16, 32}, x));
  QuantizeOptions o;
  o.input = dir / "b.npy";
  o.output = dir / "q.safetensors";
  std::ostringstream log;
  expect_error([&] { run_quantize(o, log); }, {(dir / "b.npy").string(), "--input-dtype bf16"});
  o.input_dtype = "f32";
  expect_error([&] { run_quantize(o, log); }, {(dir / "b.npy").string(), "'<u2'"});
  EXPECT_FALSE(std::filesystem::exists(o.output));
  o.input_dtype = "bf16";
  o.tensors = {"renamed"};
  run_quantize(o, log);
  SafetensorsReader out(o.output);
  expect_output_matches(out, "renamed", quantize(std::span<const bf16_t>(x), 16, 32, QuantSpec{}), {16, 32}, false);
  EXPECT_EQ(out.metadata().at("renamed.dtype"), "BF16");
}

TEST(QuantizeCommand, SafetensorsCheckpointAllOrChosenTensors) {
  std::mt19937_64 rng(test::fresh_seed());
  TempDir dir;
  const std::vector<float> w = random_normal(rng, 64 * 32, 0.02f);
  const std::vector<bf16_t> a = to_bf16(random_normal(rng, 32 * 48));
  const std::vector<float> norm = random_normal(rng, 32);
  const int64_t step = 7;
  write_safetensors(dir / "ckpt.safetensors",
                    {{"wte", HostTensor::f32({64, 32}, w)},
                     {"h.0.attn", HostTensor::bf16({32, 48}, a)},
                     {"ln.weight", HostTensor::f32({32}, norm)},
                     {"step", HostTensor::raw(DType::kI64, {}, std::vector<uint8_t>(reinterpret_cast<const uint8_t*>(&step),
                                                                                   reinterpret_cast<const uint8_t*>(&step) + 8))}},
                    {{"format", "pt"}});
  QuantizeOptions o;
  o.input = dir / "ckpt.safetensors";
  o.output = dir / "q.safetensors";
  o.block = "16x16";
  std::ostringstream log;
  run_quantize(o, log);
  QuantSpec spec;
  spec.block = Block::k16x16;
  {
    SafetensorsReader out(o.output);
    expect_output_matches(out, "wte", quantize(std::span<const float>(w), 64, 32, spec), {64, 32}, false);
    expect_output_matches(out, "h.0.attn", quantize(std::span<const bf16_t>(a), 32, 48, spec), {32, 48}, false);
    EXPECT_EQ(out.entries().size(), 6u) << "data, scales, decode_scale of two tensors";
    EXPECT_EQ(out.metadata().at("tensors"), "[\"wte\",\"h.0.attn\"]") << "in the input's data order";
    EXPECT_NE(log.str().find("left out 2 tensor(s)"), std::string::npos) << log.str();
  }
  o.tensors = {"wte", "wte"};
  expect_error([&] { run_quantize(o, log); }, {"--tensor 'wte' is given more than once"});
  o.tensors = {"step"};
  expect_error([&] { run_quantize(o, log); }, {"ckpt.safetensors", "'step' is I64"});
  o.tensors = {"wpe"};
  expect_error([&] { run_quantize(o, log); }, {"ckpt.safetensors", "no tensor named 'wpe'", "wte, h.0.attn"});
  // Chosen by name: a 1-D tensor is quantized as 1 x n.
  o.tensors = {"ln.weight"};
  o.block = "";
  run_quantize(o, log);
  SafetensorsReader out(o.output);
  expect_output_matches(out, "ln.weight", quantize(std::span<const float>(norm), 1, 32, QuantSpec{}), {32}, false);
  EXPECT_EQ(out.entries().size(), 3u);
}

TEST(QuantizeCommand, SkipsIncompatibleShapesOnlyWhenAsked) {
  std::mt19937_64 rng(test::fresh_seed());
  TempDir dir;
  const std::vector<float> good = random_normal(rng, 32 * 32), odd = random_normal(rng, 5 * 32);
  write_safetensors(dir / "in.safetensors", {{"good", HostTensor::f32({32, 32}, good)}, {"odd", HostTensor::f32({5, 32}, odd)}});
  QuantizeOptions o;
  o.input = dir / "in.safetensors";
  o.output = dir / "q.safetensors";
  o.block = "16x16";
  std::ostringstream log;
  expect_error([&] { run_quantize(o, log); }, {"in.safetensors", "tensor 'odd'", "--skip-incompatible"});
  EXPECT_FALSE(std::filesystem::exists(o.output));
  o.skip_incompatible = true;
  run_quantize(o, log);
  SafetensorsReader out(o.output);
  EXPECT_NE(out.find("good.data"), nullptr);
  EXPECT_EQ(out.find("odd.data"), nullptr);
  EXPECT_NE(log.str().find("skipping 'odd'"), std::string::npos);
  // An invalid combination is never skipped: it is no shape problem.
  o.format = "mxfp4";
  expect_error([&] { run_quantize(o, log); }, {"mxfp4 takes 1x32 blocks"});
}

TEST(QuantizeCommand, NonFiniteInputIsMarked) {
  std::mt19937_64 rng(test::fresh_seed());
  TempDir dir;
  std::vector<float> x = random_normal(rng, 16 * 32);
  x[rng() % x.size()] = NAN;
  write_npy(dir / "nan.npy", HostTensor::f32({16, 32}, x));
  QuantizeOptions o;
  o.input = dir / "nan.npy";
  o.output = dir / "q.safetensors";
  std::ostringstream log;
  run_quantize(o, log);
  EXPECT_NE(log.str().find("NaN or Inf"), std::string::npos);
  {
    SafetensorsReader out(o.output);
    EXPECT_TRUE(std::isnan(scalar(out.read("nan.decode_scale"))));
  }
  o.format = "mxfp4";
  std::ostringstream mx_log;
  run_quantize(o, mx_log);
  EXPECT_NE(mx_log.str().find("E8M0 NaN scale"), std::string::npos) << mx_log.str();
  SafetensorsReader out(o.output);
  const HostTensor scales = out.read("nan.scales");
  EXPECT_EQ(std::count(scales.bytes.begin(), scales.bytes.end(), uint8_t{0xFF}), 1);
}

TEST(QuantizeCommand, FailuresLeaveNoOutputAndKeepAnExistingOne) {
  std::mt19937_64 rng(test::fresh_seed());
  TempDir dir;
  const std::vector<float> x = random_normal(rng, 32 * 48);
  write_npy(dir / "x.npy", HostTensor::f32({32, 48}, x));
  write_npy(dir / "cube.npy", HostTensor::f32({2, 4, 4}, std::vector<float>(32, 1.0f)));
  test::write_bytes(dir / "junk.bin", "this is neither format");
  test::write_bytes(dir / "existing.safetensors", "previous result");
  struct Case {
    std::string label;
    std::function<void(QuantizeOptions&)> change;
    std::vector<std::string> expect;
  };
  const std::string x_npy = (dir / "x.npy").string();
  const std::vector<Case> cases = {
      {"mxfp4 16x16", [](QuantizeOptions& o) { o.format = "mxfp4"; o.block = "16x16"; }, {x_npy, "mxfp4 takes 1x32 blocks"}},
      {"fp8 1x16", [](QuantizeOptions& o) { o.format = "fp8_e4m3"; o.block = "1x16"; }, {x_npy, "per-tensor"}},
      {"rht 16x16", [](QuantizeOptions& o) { o.rht = true; o.block = "16x16"; }, {x_npy, "RHT"}},
      {"48 not /32", [](QuantizeOptions& o) { o.format = "mxfp4"; }, {x_npy, "multiple of 32"}},
      {"missing input", [&](QuantizeOptions& o) { o.input = dir / "absent.npy"; }, {"absent.npy", "no such file"}},
      {"junk input", [&](QuantizeOptions& o) { o.input = dir / "junk.bin"; }, {"junk.bin", "neither a .npy nor"}},
      {"3-D input", [&](QuantizeOptions& o) { o.input = dir / "cube.npy"; }, {"cube.npy", "2-D"}},
      {"two names for one npy", [](QuantizeOptions& o) { o.tensors = {"a", "b"}; }, {x_npy, "at most one --tensor"}},
      {"unknown rounding", [](QuantizeOptions& o) { o.rounding = "up"; }, {"unknown --rounding 'up'"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.label);
    QuantizeOptions o;
    o.input = dir / "x.npy";
    o.output = dir / "existing.safetensors";
    c.change(o);
    std::ostringstream log;
    expect_error([&] { run_quantize(o, log); }, c.expect);
    EXPECT_EQ(test::read_bytes(dir / "existing.safetensors"), "previous result");
    o.output = dir / "fresh.safetensors";
    expect_error([&] { run_quantize(o, log); }, c.expect);
    EXPECT_FALSE(std::filesystem::exists(o.output));
  }
  QuantizeOptions o;
  o.input = dir / "x.npy";
  o.output = dir / "no_dir" / "q.safetensors";
  std::ostringstream log;
  expect_error([&] { run_quantize(o, log); }, {"no_dir", "does not exist"});
  const std::vector<std::string> left = dir.files();
  EXPECT_EQ(left.size(), 4u) << "only the inputs and the untouched output remain";
  // And a successful run does replace it.
  o.output = dir / "existing.safetensors";
  run_quantize(o, log);
  EXPECT_NE(SafetensorsReader(o.output).find("x.data"), nullptr);
}

// Through the CLI11 front end, as `nibble quantize ...` parses it.
TEST(QuantizeCommand, ParsesTheCommandLine) {
  std::mt19937_64 rng(test::fresh_seed());
  TempDir dir;
  const std::vector<float> x = random_normal(rng, 32 * 32);
  write_npy(dir / "x.npy", HostTensor::f32({32, 32}, x));
  const std::string in = (dir / "x.npy").string(), out = (dir / "o.safetensors").string();
  const auto parse = [](std::vector<std::string> args) {
    CLI::App app;
    app.require_subcommand(1);
    add_quantize_command(app);
    std::vector<char*> argv;
    args.insert(args.begin(), "nibble");
    for (std::string& a : args) argv.push_back(a.data());
    app.parse(static_cast<int>(argv.size()), argv.data());
  };
  ::testing::internal::CaptureStdout();
  parse({"quantize", in, out, "--format", "nvfp4", "--block", "1x16", "--rounding", "sr", "--seed", "11", "--rht",
         "--rht-seed", "3", "--columnwise", "--dequantize", "--tensor", "act"});
  const std::string printed = ::testing::internal::GetCapturedStdout();
  EXPECT_NE(printed.find("wrote " + out), std::string::npos) << printed;
  QuantSpec spec;
  spec.rounding = Rounding::kStochastic;
  spec.seed = 11;
  spec.rht = true;
  spec.rht_signs = rht_signs_from_seed(3);
  spec.columnwise = true;
  SafetensorsReader r(out);
  expect_output_matches(r, "act", quantize(std::span<const float>(x), 32, 32, spec), {32, 32}, true);
  EXPECT_THROW(parse({"quantize", in, out, "--format", "int4"}), CLI::ParseError);
  EXPECT_THROW(parse({"quantize", in}), CLI::ParseError);
}

}  // namespace
}  // namespace nibble::cli
