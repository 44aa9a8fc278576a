// `nibble prepare` through its command-line parser, in-process.
#include <gtest/gtest.h>

#include <filesystem>

#include "nibble/cli/commands.h"
#include "nibble/data/error.h"
#include "nibble/data/sampler.h"
#include "nibble/data/text_source.h"
#include "test_util.h"

namespace nibble::cli {
namespace {

using data::testing::TempDir;

void run(std::vector<std::string> args) {
  CLI::App app;
  app.require_subcommand(1);
  add_prepare_command(app);
  args.insert(args.begin(), "nibble");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  app.parse(static_cast<int>(argv.size()), argv.data());
}

TEST(PrepareCommand, WritesShardsAndManifest) {
  TempDir dir;
  auto rng = std::mt19937_64(nibble::test::fresh_seed());
  std::string text;
  for (int line = 0; line < 200; ++line) text += "Line " + std::to_string(line) + ": " + data::testing::random_text(rng, 20) + "\n";
  data::testing::write_bytes(dir / "corpus.txt", text);
  run({"prepare", "--input", dir / "corpus.txt", "--output", dir / "out", "--documents", "line", "--val-fraction", "0.1",
       "--shard-tokens", "1000", "--seed", "3", "--quiet"});
  auto manifest = nlohmann::json::parse(data::testing::read_bytes(dir / "out/manifest.json"));
  EXPECT_EQ(manifest["tokenizer"]["name"], "gpt2");
  EXPECT_EQ(manifest["seed"], 3);
  std::vector<std::string> lines;  // the random text holds line breaks of its own
  data::split_documents("corpus.txt", text, data::DocumentSplit::line, "text", lines);
  EXPECT_EQ(manifest["splits"]["train"]["documents"].get<std::size_t>() + manifest["splits"]["val"]["documents"].get<std::size_t>(),
            lines.size());
  EXPECT_TRUE(std::filesystem::exists(dir / "out/train_000000.bin"));
  EXPECT_TRUE(std::filesystem::exists(dir / "out/val_000000.bin"));
  auto train = data::TokenDataset::open_prepared(dir / "out", "train");
  EXPECT_EQ(train.tokens(), manifest["splits"]["train"]["tokens"].get<std::uint64_t>());
  // A second run into the same directory needs --force.
  EXPECT_THROW(run({"prepare", "--input", dir / "corpus.txt", "--output", dir / "out", "--quiet"}), data::DataError);
  EXPECT_NO_THROW(run({"prepare", "--input", dir / "corpus.txt", "--output", dir / "out", "--format", "megatron", "--force", "--quiet"}));
  EXPECT_TRUE(std::filesystem::exists(dir / "out/train_text_document.idx"));
  EXPECT_FALSE(std::filesystem::exists(dir / "out/train_000000.bin"));  // the old output is gone
}

TEST(PrepareCommand, RejectsBadArguments) {
  TempDir dir;
  data::testing::write_bytes(dir / "c.txt", "some text");
  const std::string in = dir / "c.txt", out = dir / "out";
  EXPECT_THROW(run({"prepare", "--input", in, "--output", out, "--tokenizer", "bogus"}), data::DataError);
  EXPECT_THROW(run({"prepare", "--input", in, "--output", out, "--format", "parquet"}), data::DataError);
  EXPECT_THROW(run({"prepare", "--input", in, "--output", out, "--documents", "pages"}), data::DataError);
  EXPECT_THROW(run({"prepare", "--input", in, "--output", out, "--invalid-utf8", "ignore"}), data::DataError);
  EXPECT_THROW(run({"prepare", "--input", in, "--output", out, "--gpt2-vocab", dir / "nope.bpe"}), data::DataError);
  EXPECT_THROW(run({"prepare", "--input", in, "--output", out, "--val-fraction", "1.5"}), CLI::ParseError);
  EXPECT_THROW(run({"prepare", "--input", in}), CLI::ParseError);
  EXPECT_FALSE(std::filesystem::exists(out + "/manifest.json"));
}

}  // namespace
}  // namespace nibble::cli
