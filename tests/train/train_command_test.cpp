// `nibble train` through its command-line parser, in-process: a short run on token files, and the
// errors a user sees for a bad model config.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "nibble/cli/commands.h"
#include "nibble/data/token_formats.h"
#include "nn/nn_test_util.h"
#include "test_dir.h"

namespace nibble::cli {
namespace {

namespace fs = std::filesystem;

using Dir = nibble::test::TempDir;

void write(const fs::path& p, const std::string& text) { std::ofstream(p) << text; }

void run(std::vector<std::string> args) {
  CLI::App app;
  add_train_command(app);
  args.insert(args.begin(), "train");
  std::reverse(args.begin(), args.end());  // CLI11 takes them last-first
  app.parse(args);
}

TEST(TrainCommand, TrainsOnTokenFilesAndWritesTheRun) {
  std::mt19937_64 rng(nn::test::fresh_seed());
  Dir dir;
  std::vector<uint32_t> tokens(6000);
  for (auto& t : tokens) t = static_cast<uint32_t>(rng() % 48);
  data::write_llmc_file((dir.path() / "train.bin").string(), tokens, 48);
  data::write_llmc_file((dir.path() / "val.bin").string(), std::vector<uint32_t>(tokens.begin(), tokens.begin() + 1000), 48);
  write(dir.path() / "model.toml",
        "vocab_size = 48\nseq_len = 16\nd_model = 32\nn_layers = 2\nn_heads = 2\nmlp = \"swiglu\"\n"
        "norm = \"rmsnorm\"\npositions = \"rope\"\n");
  const fs::path out = dir.path() / "run";
  run({"--config", (dir.path() / "model.toml").string(), "--recipe", "nvfp4", "--recipe-set", "no_rht", "--data",
       (dir.path() / "train.bin").string(), "--val-data", (dir.path() / "val.bin").string(), "--out", out.string(),
       "--steps", "6", "--batch-size", "2", "--ckpt-every", "3", "--progress", "quiet"});
  std::ifstream metrics(out / "metrics.jsonl");
  int lines = 0;
  for (std::string line; std::getline(metrics, line);) ++lines;
  EXPECT_EQ(lines, 7);  // 6 steps + the final validation
  EXPECT_TRUE(fs::exists(out / "checkpoints" / "step_00000003" / "model.safetensors"));
  EXPECT_TRUE(fs::exists(out / "checkpoints" / "step_00000006" / "state.json"));
  // Extending the run: resume with more steps continues from step 6.
  run({"--config", (dir.path() / "model.toml").string(), "--recipe", "nvfp4", "--recipe-set", "no_rht", "--data",
       (dir.path() / "train.bin").string(), "--out", out.string(), "--steps", "8", "--batch-size", "2", "--resume",
       "--progress", "quiet"});
  EXPECT_TRUE(fs::exists(out / "checkpoints" / "step_00000008"));
}

TEST(TrainCommand, BadConfigNamesFileAndKey) {
  Dir dir;
  data::write_llmc_file((dir.path() / "train.bin").string(), std::vector<uint32_t>(100, 1), 48);
  write(dir.path() / "bad.toml", "vocab_size = 48\nseq_len = 16\nd_model = 32\nn_layers = 2\nn_heads = 3\n");
  try {
    run({"--config", (dir.path() / "bad.toml").string(), "--data", (dir.path() / "train.bin").string(), "--out",
         (dir.path() / "run").string(), "--steps", "2"});
    FAIL() << "expected an error";
  } catch (const std::exception& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("bad.toml"), std::string::npos) << msg;
    EXPECT_NE(msg.find("n_heads"), std::string::npos) << msg;
  }
  EXPECT_FALSE(fs::exists(dir.path() / "run"));  // nothing written for a run that could not start
}

// --fp4-gemm (how a Hopper GPU runs NVFP4 GEMMs) and --gelu (where a GPU computes the MLP's GELU)
// choose between GPU paths: on the CPU there is nothing to choose, so their non-default values are
// refused before anything is written; an unknown value is refused by the parser.
TEST(TrainCommand, GpuPathOptionsNeedTheGpuAndAKnownValue) {
  Dir dir;
  data::write_llmc_file((dir.path() / "train.bin").string(), std::vector<uint32_t>(100, 1), 48);
  write(dir.path() / "model.toml", "vocab_size = 48\nseq_len = 16\nd_model = 32\nn_layers = 2\nn_heads = 2\n");
  const std::vector<std::string> common = {"--config", (dir.path() / "model.toml").string(), "--data",
                                           (dir.path() / "train.bin").string(), "--out", (dir.path() / "run").string(),
                                           "--steps", "2", "--progress", "quiet"};
  struct Option {
    const char *flag, *gpu_value, *unknown;
  };
  for (const Option& o : {Option{"--fp4-gemm", "packed", "fast"}, Option{"--gelu", "kernel", "fused"}}) {
    std::vector<std::string> gpu_only = common;
    gpu_only.insert(gpu_only.end(), {o.flag, o.gpu_value});
    try {
      run(gpu_only);
      ADD_FAILURE() << o.flag << ": expected an error";
    } catch (const std::exception& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(std::string(o.flag) + " " + o.gpu_value), std::string::npos) << msg;
      EXPECT_NE(msg.find("--device cuda"), std::string::npos) << msg;
    }
    EXPECT_FALSE(fs::exists(dir.path() / "run")) << o.flag;
    std::vector<std::string> unknown = common;
    unknown.insert(unknown.end(), {o.flag, o.unknown});
    EXPECT_THROW(run(unknown), CLI::ValidationError) << o.flag;
    EXPECT_FALSE(fs::exists(dir.path() / "run")) << o.flag;
  }
}

}  // namespace
}  // namespace nibble::cli
