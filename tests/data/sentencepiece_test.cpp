#include "nibble/data/sentencepiece_tokenizer.h"

#include <gtest/gtest.h>

#include "nibble/data/error.h"
#include "nibble/data/prepare.h"
#include "nibble/data/sampler.h"
#include "test_util.h"

namespace nibble::data {
namespace {

using Ids = std::vector<std::uint32_t>;
using testing::TempDir;

// Trains small models once (a few hundred pieces on ~100 KB of text: well under a second).
class SentencePiece : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir;
    auto rng = std::mt19937_64(nibble::test::fresh_seed());
    std::string corpus;
    // Mostly English with a few other scripts; characters it never saw are byte-encoded.
    const char* words[] = {"the", "model", "trains", "in", "four", "bits", "and", "loss", "goes", "down", "quickly",
                           "gradient", "scale", "block", "tensor", "weights", "training", "recipe", "format", "random",
                           "hadamard", "transform", "stochastic", "rounding", "nearest", "even", "layer", "attention",
                           "caf\xc3\xa9", "\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82", "\xe6\x97\xa5\xe6\x9c\xac"};
    for (int line = 0; line < 3000; ++line) {
      for (int w = 0; w < 8; ++w) corpus += std::string(words[rng() % std::size(words)]) + (rng() % 5 ? " " : ", ");
      corpus += std::to_string(rng() % 1000) + ".\n";
    }
    testing::write_bytes(*dir_ / "corpus.txt", corpus);
    for (const char* type : {"bpe", "unigram"}) {
      SentencePieceTrainOptions o;
      o.inputs = {*dir_ / "corpus.txt"};
      o.model_path = *dir_ / (std::string(type) + ".model");
      o.vocab_size = 360;
      o.model_type = type;
      o.threads = 2;
      train_sentencepiece(o);
    }
  }
  static void TearDownTestSuite() { delete dir_; }
  static TempDir* dir_;
};
TempDir* SentencePiece::dir_ = nullptr;

TEST_F(SentencePiece, TrainedModelsRoundTripVariedUnicode) {
  auto rng = std::mt19937_64(nibble::test::fresh_seed());
  for (const char* type : {"bpe", "unigram"}) {
    SentencePieceTokenizer tok(*dir_ / (std::string(type) + ".model"));
    EXPECT_EQ(tok.vocab_size(), 360u);
    EXPECT_EQ(tok.eot_id(), 2u);  // </s>
    for (const std::string& text : {std::string("the model trains in four bits"), std::string("  two  spaces\nand a newline\t"),
                                   std::string("caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x98\x80")}) {
      EXPECT_EQ(tok.decode(tok.encode(text)), text) << type;
    }
    for (int round = 0; round < 100; ++round) {
      std::string text = testing::random_text(rng, 1 + rng() % 80);
      if (text.find("\xe2\x96\x81") != std::string::npos) continue;  // U+2581 is SentencePiece's space
      Ids ids = tok.encode(text);
      for (auto id : ids) ASSERT_LT(id, tok.vocab_size());
      ASSERT_EQ(tok.decode(ids), text) << type << " round " << round;
    }
    // The model learned the corpus's words: it needs far fewer pieces than bytes.
    std::string corpus = testing::read_bytes(*dir_ / "corpus.txt");
    EXPECT_LT(tok.encode(corpus).size(), corpus.size() * 2 / 3) << type;
  }
}

TEST_F(SentencePiece, PrepareWithATrainedModel) {
  SentencePieceTokenizer tok(*dir_ / "bpe.model");
  PrepareOptions o;
  o.inputs = {*dir_ / "corpus.txt"};
  o.output_dir = *dir_ / "out";
  o.split = DocumentSplit::line;
  o.val_fraction = 0.05;
  PrepareResult r = prepare(o, tok);
  EXPECT_EQ(r.manifest["tokenizer"]["name"], "sentencepiece");
  TokenDataset train = TokenDataset::open_prepared(o.output_dir, "train");
  EXPECT_EQ(train.vocab_size(), 360u);
  Ids ids = train.file(0).read_all();
  EXPECT_EQ(ids.front(), 2u);
}

TEST_F(SentencePiece, BadModelFilesAreNamed) {
  testing::write_bytes(*dir_ / "junk.model", "this is not a model");
  try {
    SentencePieceTokenizer tok(*dir_ / "junk.model");
    FAIL() << "expected an error";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("junk.model"), std::string::npos) << e.what();
  }
  EXPECT_THROW(SentencePieceTokenizer(*dir_ / "missing.model"), DataError);
}

}  // namespace
}  // namespace nibble::data
