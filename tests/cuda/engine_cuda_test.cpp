// The training loop on the GPU engine (train/cuda/engine_cuda.h), needs a GPU (ctest label "gpu"):
// the loss falls under bf16 and nvfp4; an interrupted and resumed GPU run repeats the uninterrupted
// one bit for bit (every GPU kernel here is deterministic: no atomics in the arithmetic, fixed
// cuBLASLt algorithms per shape); a checkpoint written on one device resumes on the other.
#include "nibble/train/cuda/engine_cuda.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "nibble/tensor/safetensors.h"
#include "nibble/train/checkpoint.h"
#include "test_seed.h"
#include "train/train_test_util.h"

namespace nibble::train {
namespace {

using namespace nibble::train::test;

TrainOptions on_gpu(TrainOptions o) {
  const uint64_t seed = o.seed;
  o.make_engine = [seed](model::Gpt& m, AdamW& opt) { return cuda::make_cuda_engine(m, opt, seed); };
  return o;
}

class GpuTrainLossFalls : public ::testing::TestWithParam<std::string> {};

TEST_P(GpuTrainLossFalls, WellBelowItsStart) {
  expect_loss_falls(GetParam(), nibble::test::fresh_seed(), on_gpu);
}

INSTANTIATE_TEST_SUITE_P(Recipes, GpuTrainLossFalls, ::testing::Values("bf16", "nvfp4"));

TEST(GpuTrain, ResumeAfterInterruptionRepeatsTheRunBitForBit) {
  expect_resume_repeats_the_run(nibble::test::fresh_seed(), on_gpu);
}

// A step whose loss is not finite is skipped on the device as on the CPU: no weight, moment or step
// count changes (the checkpoints after the first step and after the skipped ones hold the same
// bytes). A constant learning rate of 1e35 makes the first update overflow the next forward pass.
TEST(GpuTrain, SkipsNonFiniteStepsOnTheDevice) {
  const uint64_t seed = nibble::test::fresh_seed();
  TempDir dir;
  const Data d = make_data(dir, seed);
  std::vector<bool> skipped[2];
  for (const bool gpu : {false, true}) {
    TrainOptions o = options(dir / (gpu ? "gpu" : "cpu"), 4, seed);
    if (gpu) o = on_gpu(o);
    o.schedule = {ScheduleKind::kConstant, 1e35, 1e35, 0, 4, 0};
    o.skip_nonfinite = true;
    o.ckpt_every = 1;
    o.keep_checkpoints = 4;
    const TrainResult r = train(tiny_config(), nn::make_recipe("bf16"), d.train, nullptr, o);
    ASSERT_EQ(r.steps.size(), 4u);
    for (const StepRecord& s : r.steps) skipped[gpu].push_back(s.skipped);
  }
  EXPECT_EQ(skipped[1], (std::vector<bool>{false, true, true, true})) << "on the GPU";
  EXPECT_EQ(skipped[0], skipped[1]) << "the CPU skips other steps";
  const auto bytes = [](const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  const fs::path ckpts = dir / "gpu" / kCheckpointsDir;
  for (const char* file : {"model.safetensors", "optimizer.safetensors"}) {
    const std::string first = bytes(ckpts / "step_00000001" / file);
    EXPECT_FALSE(first.empty()) << file;
    EXPECT_EQ(bytes(ckpts / "step_00000004" / file), first) << file << " changed in a skipped step";
  }
}

// Checkpoints are one format: a GPU run resumes on the CPU and a CPU run on the GPU. The devices'
// arithmetic differs (BF16 attention and LM head on the GPU), so the resumed losses follow the
// other device's uninterrupted run only closely, not bit for bit.
TEST(GpuTrain, CheckpointsResumeOnTheOtherDevice) {
  const uint64_t seed = nibble::test::fresh_seed();
  TempDir dir;
  const Data d = make_data(dir, seed);
  const nn::Recipe recipe = nn::make_recipe("bf16");
  for (bool gpu_first : {true, false}) {
    const fs::path out = dir / (gpu_first ? "gpu-then-cpu" : "cpu-then-gpu");
    TrainOptions first = options(out, 8, seed), second = first;
    if (gpu_first) first = on_gpu(first);
    else second = on_gpu(second);
    first.stop_after = 4;
    first.ckpt_every = 4;
    const TrainResult a = train(tiny_config(), recipe, d.train, nullptr, first);
    ASSERT_EQ(a.end_step, 4);
    second.resume = true;
    const TrainResult b = train(tiny_config(), recipe, d.train, nullptr, second);
    ASSERT_EQ(b.start_step, 4);
    ASSERT_EQ(b.steps.size(), 4u);
    TrainOptions ref = gpu_first ? on_gpu(options(dir / "ref-gpu", 8, seed)) : options(dir / "ref-cpu", 8, seed);
    const TrainResult r = train(tiny_config(), recipe, d.train, nullptr, ref);
    for (size_t i = 0; i < 4; ++i) {
      EXPECT_TRUE(std::isfinite(b.steps[i].loss));
      EXPECT_NEAR(b.steps[i].loss, r.steps[4 + i].loss, 2e-2 * r.steps[4 + i].loss)
          << (gpu_first ? "GPU -> CPU" : "CPU -> GPU") << ", step " << 5 + i;
    }
  }
}

}  // namespace
}  // namespace nibble::train
