// The training loop end to end on a tiny model and synthetic data: the loss falls under bf16 and
// nvfp4, resume after an interruption repeats the uninterrupted run bit for bit, checkpoints
// rotate, non-finite steps stop (or are skipped), the late switch to bf16 happens on time, and the
// engine gets each step whole and is waited for once.
#include "nibble/train/trainer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "nibble/data/token_formats.h"
#include "nibble/tensor/safetensors.h"
#include "nibble/train/checkpoint.h"
#include "nibble/train/engine.h"
#include "nn/nn_test_util.h"
#include "train/train_test_util.h"

namespace nibble::train {
namespace {

using namespace nibble::train::test;

class TrainLossFalls : public ::testing::TestWithParam<std::string> {};

TEST_P(TrainLossFalls, WellBelowItsStart) {
  expect_loss_falls(GetParam(), nn::test::fresh_seed(), [](TrainOptions o) { return o; });
}

INSTANTIATE_TEST_SUITE_P(Recipes, TrainLossFalls, ::testing::Values("bf16", "nvfp4"));

TEST(Train, ResumeAfterInterruptionRepeatsTheRunBitForBit) {
  expect_resume_repeats_the_run(nn::test::fresh_seed(), [](TrainOptions o) { return o; });
}

TEST(Train, StopRequestCheckpointsAfterTheCurrentStep) {
  const uint64_t seed = nn::test::fresh_seed();
  TempDir dir;
  const Data d = make_data(dir, seed);
  std::atomic<bool> stop{false};
  TrainOptions o = options(dir / "run", 6, seed);
  o.stop_requested = &stop;
  o.on_step_start = [&](int64_t step, model::Gpt&) {
    if (step == 2) stop = true;  // as a SIGINT during step 3 would
  };
  const TrainResult r = train(tiny_config(), nn::make_recipe("bf16"), d.train, nullptr, o);
  EXPECT_EQ(r.end_step, 3);
  EXPECT_EQ(r.steps.size(), 3u);
  ASSERT_TRUE(r.last_checkpoint.has_value());
  EXPECT_EQ(r.last_checkpoint->filename(), "step_00000003");
}

TEST(Train, KeepsTheLastCheckpointsAndWritesReadableWeights) {
  const uint64_t seed = nn::test::fresh_seed();
  TempDir dir;
  const Data d = make_data(dir, seed);
  TrainOptions o = options(dir / "run", 5, seed);
  o.ckpt_every = 1;
  o.keep_checkpoints = 2;
  train(tiny_config(), nn::make_recipe("bf16"), d.train, nullptr, o);
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir / "run" / kCheckpointsDir)) names.push_back(e.path().filename());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"step_00000004", "step_00000005"}));
  SafetensorsReader w(dir / "run" / kCheckpointsDir / "step_00000005" / "model.safetensors");
  const SafetensorsEntry* qkv = w.find("blocks.1.attn.qkv.weight");
  ASSERT_NE(qkv, nullptr);
  EXPECT_EQ(qkv->shape, (std::vector<int64_t>{96, 32}));
  EXPECT_NE(w.metadata().at("nibble_model_config").find("d_model = 32"), std::string::npos);
  // A second run into the same directory without --resume is refused; nothing is touched.
  EXPECT_THROW(train(tiny_config(), nn::make_recipe("bf16"), d.train, nullptr, o), TrainError);
  EXPECT_TRUE(fs::exists(dir / "run" / kCheckpointsDir / "step_00000005"));
  TrainOptions fresh = options(dir / "empty", 5, seed);
  fresh.resume = true;
  EXPECT_THROW(train(tiny_config(), nn::make_recipe("bf16"), d.train, nullptr, fresh), TrainError);
}

TEST(Train, NonFiniteLossStopsAndLeavesTheLastGoodCheckpoint) {
  const uint64_t seed = nn::test::fresh_seed();
  TempDir dir;
  const Data d = make_data(dir, seed);
  TrainOptions o = options(dir / "run", 6, seed);
  o.ckpt_every = 2;
  o.on_step_start = [](int64_t step, model::Gpt& m) {
    if (step == 2) m.parameters()[0].value[0] = NAN;  // a fault in step 3
  };
  try {
    train(tiny_config(), nn::make_recipe("bf16"), d.train, nullptr, o);
    FAIL() << "expected a TrainError";
  } catch (const TrainError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("step 3: non-finite loss"), std::string::npos) << msg;
    EXPECT_NE(msg.find("step_00000002"), std::string::npos) << msg;
  }
  const auto latest = latest_checkpoint(dir / "run");
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->filename(), "step_00000002");
  // The checkpoint is intact: it resumes (the fault hook is gone) and the run completes.
  o.on_step_start = nullptr;
  o.resume = true;
  const TrainResult r = train(tiny_config(), nn::make_recipe("bf16"), d.train, nullptr, o);
  EXPECT_EQ(r.start_step, 2);
  for (const StepRecord& s : r.steps) EXPECT_TRUE(std::isfinite(s.loss));
}

TEST(Train, SkipsNonFiniteStepsWhenAsked) {
  const uint64_t seed = nn::test::fresh_seed();
  TempDir dir;
  const Data d = make_data(dir, seed);
  TrainOptions o = options(dir / "run", 5, seed);
  o.skip_nonfinite = true;
  float kept = 0.0f;
  o.on_step_start = [&](int64_t step, model::Gpt& m) {
    float& w = m.parameters()[0].value[0];
    if (step == 2) kept = w, w = INFINITY;  // a transient fault in step 3 only
    if (step == 3) w = kept;
  };
  const TrainResult r = train(tiny_config(), nn::make_recipe("bf16"), d.train, nullptr, o);
  ASSERT_EQ(r.steps.size(), 5u);
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(r.steps[i].skipped, i == 2) << "step " << i + 1;
    if (i != 2) {
      EXPECT_TRUE(std::isfinite(r.steps[i].loss)) << "step " << i + 1;
    }
  }
  const auto lines = read_jsonl(dir / "run" / "metrics.jsonl");
  EXPECT_TRUE(lines[2]["skipped"].get<bool>());
}

// An engine that records the trainer's calls and passes them to the CPU engine; `flip_update`
// makes it report the opposite of its update decision.
class RecordingEngine final : public Engine {
 public:
  RecordingEngine(std::unique_ptr<Engine> inner, std::vector<std::string>& calls, bool flip_update)
      : inner_(std::move(inner)), calls_(calls), flip_update_(flip_update) {}
  std::string device() const override { return inner_->device(); }
  void set_bf16_everywhere(bool on) override { inner_->set_bf16_everywhere(on); }
  void zero_grad() override {
    calls_.push_back("zero_grad");
    inner_->zero_grad();
  }
  void forward_backward(uint64_t step, uint32_t microbatch, std::span<const uint32_t> inputs,
                        std::span<const uint32_t> targets, int64_t batch, int64_t seq, float grad_scale) override {
    calls_.push_back("forward_backward " + std::to_string(step) + "." + std::to_string(microbatch));
    inner_->forward_backward(step, microbatch, inputs, targets, batch, seq, grad_scale);
  }
  void update(double lr, double grad_clip) override {
    calls_.push_back("update");
    inner_->update(lr, grad_clip);
  }
  StepOutcome finish_step() override {
    calls_.push_back("finish_step");
    StepOutcome o = inner_->finish_step();
    if (flip_update_) o.updated = !o.updated;
    o.device_wait_s = 0.125 * static_cast<double>(calls_.size());  // as a GPU engine's wait, distinct a step
    return o;
  }
  double loss(std::span<const uint32_t> inputs, std::span<const uint32_t> targets, int64_t batch,
              int64_t seq) override {
    calls_.push_back("loss");
    return inner_->loss(inputs, targets, batch, seq);
  }
  double memory_mib() override { return inner_->memory_mib(); }

 private:
  std::unique_ptr<Engine> inner_;
  std::vector<std::string>& calls_;
  bool flip_update_;
};

// The trainer hands the engine each step whole (zero_grad, every micro-batch, the update) and waits
// for it once (finish_step); the result equals the plain CPU run's. An engine whose update decision
// differs from the trainer's rule stops the run. The time an engine reports waiting for its device
// goes into each step's metrics line (device_wait_s); the CPU engine, which has none, reports none.
TEST(Train, EnginesGetEachStepWholeAndAreWaitedForOnce) {
  const uint64_t seed = nn::test::fresh_seed();
  TempDir dir;
  const Data d = make_data(dir, seed);
  for (const bool flip : {false, true}) {
    std::vector<std::string> calls;
    TrainOptions o = options(dir / (flip ? "flipped" : "recorded"), 3, seed);
    o.grad_accum = 2;
    o.make_engine = [&](model::Gpt& m, AdamW& opt) {
      return std::make_unique<RecordingEngine>(make_cpu_engine(m, opt), calls, flip);
    };
    if (flip) {
      try {
        train(tiny_config(), nn::make_recipe("bf16"), d.train, nullptr, o);
        ADD_FAILURE() << "an engine that applied a step the trainer would skip (or the reverse) went unnoticed";
      } catch (const std::logic_error& e) {
        EXPECT_NE(std::string(e.what()).find("step 1: the engine skipped the update"), std::string::npos) << e.what();
      }
      continue;
    }
    const TrainResult r = train(tiny_config(), nn::make_recipe("bf16"), d.train, nullptr, o);
    std::vector<std::string> want;
    for (int step = 0; step < 3; ++step)
      for (const std::string& c : {std::string("zero_grad"), "forward_backward " + std::to_string(step) + ".0",
                                   "forward_backward " + std::to_string(step) + ".1", std::string("update"),
                                   std::string("finish_step")})
        want.push_back(c);
    EXPECT_EQ(calls, want);
    const auto lines = read_jsonl(dir / "recorded" / "metrics.jsonl");
    ASSERT_EQ(lines.size(), 3u);
    for (size_t i = 0; i < 3; ++i) EXPECT_EQ(lines[i]["device_wait_s"], 0.125 * static_cast<double>(5 * (i + 1)));
    TrainOptions plain = options(dir / "plain", 3, seed);
    plain.grad_accum = 2;
    const TrainResult p = train(tiny_config(), nn::make_recipe("bf16"), d.train, nullptr, plain);
    EXPECT_FALSE(read_jsonl(dir / "plain" / "metrics.jsonl")[0].contains("device_wait_s"));
    ASSERT_EQ(r.steps.size(), p.steps.size());
    for (size_t i = 0; i < r.steps.size(); ++i) {
      EXPECT_EQ(r.steps[i].loss, p.steps[i].loss) << "step " << i + 1;
      EXPECT_EQ(r.steps[i].grad_norm, p.steps[i].grad_norm) << "step " << i + 1;
    }
  }
}

TEST(Train, ValidationDataTooShortFailsBeforeTraining) {
  const uint64_t seed = nn::test::fresh_seed();
  TempDir dir;
  const Data d = make_data(dir, seed);
  data::write_llmc_file((dir / "short.bin").string(), markov_tokens(seed, 20), kVocab);  // < one 33-token window
  const auto short_val = data::TokenDataset::open_files({(dir / "short.bin").string()}, data::TokenFormat::llmc, kVocab);
  EXPECT_ANY_THROW(train(tiny_config(), nn::make_recipe("bf16"), d.train, &short_val, options(dir / "run", 3, seed)));
  EXPECT_FALSE(fs::exists(dir / "run" / "metrics.jsonl"));
}

TEST(Train, ValidationVocabularyLargerThanTheModelsFailsBeforeTraining) {
  const uint64_t seed = nn::test::fresh_seed();
  TempDir dir;
  const Data d = make_data(dir, seed);
  data::write_llmc_file((dir / "wide.bin").string(), markov_tokens(seed, 4000), 2 * kVocab);
  const auto wide_val = data::TokenDataset::open_files({(dir / "wide.bin").string()}, data::TokenFormat::llmc, 2 * kVocab);
  try {
    train(tiny_config(), nn::make_recipe("bf16"), d.train, &wide_val, options(dir / "run", 3, seed));
    FAIL() << "expected a TrainError";
  } catch (const TrainError& e) {
    EXPECT_NE(std::string(e.what()).find("validation data's vocabulary"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(dir / "run" / "metrics.jsonl"));
}

TEST(Train, SwitchesToBf16AfterTheRecipesFraction) {
  const uint64_t seed = nn::test::fresh_seed();
  TempDir dir;
  const Data d = make_data(dir, seed);
  nn::Recipe recipe = nn::make_recipe("nvfp4");
  recipe.bf16_switch_fraction = 0.5;
  train(tiny_config(), recipe, d.train, nullptr, options(dir / "run", 4, seed));
  const auto lines = read_jsonl(dir / "run" / "metrics.jsonl");
  ASSERT_EQ(lines.size(), 4u);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(lines[i]["bf16_everywhere"].get<bool>(), i >= 2) << "step " << i + 1;
}

}  // namespace
}  // namespace nibble::train
