// Helpers of the training-loop tests (tests/train/trainer_test.cpp on the CPU,
// tests/cuda/engine_cuda_test.cpp on the GPU): a learnable synthetic token stream, a tiny model
// and the options of a short run.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "nibble/data/token_formats.h"
#include "nibble/model/config.h"
#include "nibble/nn/recipe.h"
#include "nibble/tensor/safetensors.h"
#include "nibble/train/checkpoint.h"
#include "nibble/train/trainer.h"
#include "test_dir.h"

namespace nibble::train::test {

namespace fs = std::filesystem;
using nibble::test::TempDir;

constexpr int64_t kVocab = 64;

// A learnable stream: each token is a fixed random successor of the previous one, except for one
// token in ten drawn uniformly. A bigram model reaches ~0.1 * ln(64) + small; a constant guess
// stays at ln(64) = 4.16.
inline std::vector<uint32_t> markov_tokens(uint64_t seed, size_t n) {
  std::mt19937_64 rng(seed);
  std::vector<uint32_t> next(kVocab);
  for (uint32_t i = 0; i < kVocab; ++i) next[i] = i;
  std::shuffle(next.begin(), next.end(), rng);
  std::vector<uint32_t> t(n);
  t[0] = 0;
  for (size_t i = 1; i < n; ++i) t[i] = rng() % 10 == 0 ? static_cast<uint32_t>(rng() % kVocab) : next[t[i - 1]];
  return t;
}

struct Data {
  data::TokenDataset train, val;
};

inline Data make_data(const TempDir& dir, uint64_t seed) {
  data::write_llmc_file((dir / "train.bin").string(), markov_tokens(seed, 40000), kVocab);
  data::write_llmc_file((dir / "val.bin").string(), markov_tokens(seed, 4000), kVocab);  // same chain, other draws
  return {data::TokenDataset::open_files({(dir / "train.bin").string()}, data::TokenFormat::llmc, kVocab),
          data::TokenDataset::open_files({(dir / "val.bin").string()}, data::TokenFormat::llmc, kVocab)};
}

inline model::GptConfig tiny_config() {
  model::GptConfig c;
  c.name = "test";
  c.vocab_size = kVocab;
  c.seq_len = 32;
  c.d_model = 32;
  c.n_layers = 2;
  c.n_heads = 2;
  model::finalize(c, "test");
  return c;
}

inline TrainOptions options(const fs::path& out, int64_t steps, uint64_t seed) {
  TrainOptions o;
  o.out_dir = out;
  o.steps = steps;
  o.batch_size = 4;  // 4 x 32 = 128 tokens per micro-batch: whole 16-element blocks along tokens
  o.schedule = {ScheduleKind::kCosine, 1e-2, 1e-3, std::min<int64_t>(5, steps), steps, 0};
  o.seed = seed;
  o.progress = Progress::Mode::kQuiet;
  return o;
}

inline std::vector<nlohmann::json> read_jsonl(const fs::path& p) {
  std::ifstream in(p);
  std::vector<nlohmann::json> out;
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line));
  return out;
}

// Trains the tiny model 60 steps under `recipe` (validation at 30 and 60): the loss starts near
// ln(vocab) and ends well below half of it, and metrics.jsonl has one line per step plus the two
// validation lines. `on_device` sets the engine (identity: the CPU).
inline void expect_loss_falls(const std::string& recipe, uint64_t seed,
                              const std::function<TrainOptions(TrainOptions)>& on_device) {
  TempDir dir;
  const Data d = make_data(dir, seed);
  TrainOptions o = on_device(options(dir / "run", 60, seed));
  o.val_every = 30;
  o.val_batches = 4;
  const TrainResult r = train(tiny_config(), nn::make_recipe(recipe), d.train, &d.val, o);
  ASSERT_EQ(r.steps.size(), 60u);
  const double first = r.steps.front().loss;
  double last = 0.0;
  for (size_t i = 55; i < 60; ++i) last += r.steps[i].loss / 5.0;
  std::printf("%s: loss %.3f -> %.3f, validation %.3f\n", recipe.c_str(), first, last, r.val.back().second);
  EXPECT_NEAR(first, std::log(double(kVocab)), 0.5);  // small init: near-uniform predictions
  EXPECT_LT(last, 0.5 * first);
  ASSERT_EQ(r.val.size(), 2u);
  EXPECT_LT(r.val.back().second, 0.5 * first);
  // One metrics line per step, validation lines at 30 and 60.
  const auto lines = read_jsonl(dir / "run" / "metrics.jsonl");
  ASSERT_EQ(lines.size(), 62u);
  EXPECT_EQ(lines[0]["step"], 1);
  for (const char* key : {"loss", "lr", "grad_norm", "tokens_per_s", "peak_rss_mib", "memory_mib", "tokens"})
    EXPECT_TRUE(lines[0].contains(key)) << key;
  EXPECT_EQ(lines[30]["val_loss"], r.val[0].second);
}

// Trains 8 steps (nvfp4: stochastic rounding and RHT, 2 micro-batches, checkpoint at 4) once
// uninterrupted and once interrupted after step 5 and resumed: the resumed run must repeat the
// uninterrupted one bit for bit (losses, gradient norms, final weights, one metrics line a step).
// `on_device` sets the engine (identity: the CPU).
inline void expect_resume_repeats_the_run(uint64_t seed, const std::function<TrainOptions(TrainOptions)>& on_device) {
  TempDir dir;
  const Data d = make_data(dir, seed);
  const nn::Recipe recipe = nn::make_recipe("nvfp4");
  TrainOptions whole = on_device(options(dir / "a", 8, seed));
  whole.grad_accum = 2;
  whole.ckpt_every = 4;
  const TrainResult a = train(tiny_config(), recipe, d.train, nullptr, whole);

  TrainOptions part = whole;
  part.out_dir = dir / "b";
  part.stop_after = 5;  // checkpoint at 4, then one more step that is lost: an interruption
  const TrainResult b1 = train(tiny_config(), recipe, d.train, nullptr, part);
  ASSERT_EQ(b1.end_step, 5);
  part.stop_after = 0;
  part.resume = true;
  const TrainResult b2 = train(tiny_config(), recipe, d.train, nullptr, part);
  ASSERT_EQ(b2.start_step, 4);
  ASSERT_EQ(b2.steps.size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(b1.steps[i].loss, a.steps[i].loss) << "step " << i + 1;
    EXPECT_EQ(b2.steps[i].loss, a.steps[4 + i].loss) << "step " << 5 + i;
    EXPECT_EQ(b2.steps[i].grad_norm, a.steps[4 + i].grad_norm) << "step " << 5 + i;
  }
  // The final weights are identical too.
  SafetensorsReader wa(dir / "a" / kCheckpointsDir / "step_00000008" / "model.safetensors");
  SafetensorsReader wb(dir / "b" / kCheckpointsDir / "step_00000008" / "model.safetensors");
  ASSERT_EQ(wa.entries().size(), wb.entries().size());
  for (const auto& e : wa.entries()) EXPECT_EQ(wa.read(e.name).bytes, wb.read(e.name).bytes) << e.name;
  // metrics.jsonl of the resumed run reads as one run: steps 1..8 once each.
  const auto lines = read_jsonl(dir / "b" / "metrics.jsonl");
  ASSERT_EQ(lines.size(), 8u);
  for (size_t i = 0; i < 8; ++i) EXPECT_EQ(lines[i]["step"], i + 1);
  EXPECT_EQ(lines[4]["loss"].get<double>(), a.steps[4].loss);
}

}  // namespace nibble::train::test
