#include "nibble/data/gpt2_tokenizer.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>

#include "nibble/data/error.h"
#include "test_util.h"

namespace nibble::data {
namespace {

const Gpt2Tokenizer& gpt2() {
  static const std::unique_ptr<Gpt2Tokenizer> tokenizer = [] {
    std::string dir = Gpt2Tokenizer::default_dir();
    return std::make_unique<Gpt2Tokenizer>(dir + "/encoder.json", dir + "/vocab.bpe");
  }();
  return *tokenizer;
}

using Ids = std::vector<std::uint32_t>;

// Ids that are common knowledge about GPT-2 (they appear in countless tutorials and in tiktoken's
// own README): these hold whatever the reference files say.
TEST(Gpt2Tokenizer, WellKnownIds) {
  EXPECT_EQ(gpt2().vocab_size(), 50257u);
  EXPECT_EQ(gpt2().eot_id(), 50256u);
  EXPECT_EQ(gpt2().encode("Hello world"), (Ids{15496, 995}));
  EXPECT_EQ(gpt2().encode("hello world"), (Ids{31373, 995}));
  EXPECT_EQ(gpt2().encode(" the"), (Ids{262}));
  EXPECT_EQ(gpt2().encode("!"), (Ids{0}));
  EXPECT_EQ(gpt2().encode("\n"), (Ids{198}));
  EXPECT_EQ(gpt2().encode("The quick brown fox jumps over the lazy dog."),
            (Ids{464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13}));
  EXPECT_EQ(gpt2().encode_with_special("<|endoftext|>"), (Ids{50256}));
  EXPECT_EQ(gpt2().encode_with_special("a<|endoftext|>b"), (Ids{64, 50256, 65}));
}

TEST(Gpt2Tokenizer, SpecialTokenSpellingInTextIsOrdinaryText) {
  Ids ids = gpt2().encode("<|endoftext|>");
  EXPECT_GT(ids.size(), 1u);
  for (auto id : ids) EXPECT_NE(id, gpt2().eot_id());
  EXPECT_EQ(gpt2().decode(ids), "<|endoftext|>");
}

nlohmann::json load_cases(const std::string& path) {
  std::string text = testing::read_bytes(path);
  auto json = nlohmann::json::parse(text);
  EXPECT_TRUE(json.contains("cases")) << path;
  EXPECT_GT(json["cases"].size(), 10u) << path;
  return json;
}

void expect_cases_match(const nlohmann::json& json, const std::string& source) {
  for (const auto& c : json["cases"]) {
    std::string text = c["text"].get<std::string>();
    Ids expected = c["ids"].get<Ids>();
    EXPECT_EQ(gpt2().encode(text), expected) << source << ": " << nlohmann::json(text).dump();
  }
}

// Ids recorded from the npm package gpt-3-encoder, a JavaScript port of OpenAI's encoder.py that
// shares no code with ours (tests/data/make_gpt2_npm_reference_ids.js regenerates them).
TEST(Gpt2Tokenizer, MatchesRecordedNpmEncoderIds) {
  const std::string path = std::string(NIBBLE_TEST_DATA_DIR) + "/gpt2_npm_reference_ids.json";
  expect_cases_match(load_cases(path), path);
}

// Ids from tiktoken 0.14.0 (the reference `gpt2` encoding), generated once on the device machine,
// which has the tiktoken Python package: tests/data/make_gpt2_reference_ids.py (see its header).
TEST(Gpt2Tokenizer, MatchesTiktokenIds) {
  const std::string path = std::string(NIBBLE_TEST_DATA_DIR) + "/gpt2_reference_ids.json";
  const auto json = load_cases(path);
  ASSERT_GE(json["cases"].size(), 40u) << path;  // the whole of gpt2_reference_strings.txt
  expect_cases_match(json, path);
}

TEST(Gpt2Tokenizer, RoundTripsRandomUnicode) {
  auto rng = std::mt19937_64(nibble::test::fresh_seed());
  for (int round = 0; round < 300; ++round) {
    std::string text = testing::random_text(rng, 1 + rng() % 120);
    Ids ids = gpt2().encode(text);
    ASSERT_FALSE(ids.empty());
    for (auto id : ids) ASSERT_LT(id, gpt2().eot_id());  // ordinary text never yields the separator
    ASSERT_EQ(gpt2().decode(ids), text) << "round " << round;
  }
}

TEST(Gpt2Tokenizer, RoundTripsFixedScriptsAndEdges) {
  for (const std::string& text : std::vector<std::string>{"", " ", "\n\n\n", "   \t  ", "caf\xc3\xa9 na\xc3\xafve", "\xd0\x9f\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82",
        "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e", "\xf0\x9f\x91\xa8\xe2\x80\x8d\xf0\x9f\x91\xa9", "\xef\xbb\xbf" "BOM",
        "a\xc2\x85" "b", "tab\there", std::string(5000, '=') + "x", std::string(3000, ' ') + "y"}) {
    EXPECT_EQ(gpt2().decode(gpt2().encode(text)), text) << nlohmann::json(text).dump();
  }
}

TEST(Gpt2Tokenizer, PreTokenizerSplitsLikeGpt2) {
  // Contractions split off, a single space joins the following word, whitespace before a word
  // leaves its last space to that word.
  auto pieces = [](const std::string& text) {
    std::vector<std::string> out;
    for (auto id : gpt2().encode(text)) out.push_back(gpt2().decode(Ids{id}));
    return out;
  };
  EXPECT_EQ(pieces("I'll go"), (std::vector<std::string>{"I", "'ll", " go"}));
  EXPECT_EQ(pieces("a   b"), (std::vector<std::string>{"a", " ", " ", " b"}));  // GPT-2 has no multi-space tokens
  EXPECT_EQ(pieces("42 apples"), (std::vector<std::string>{"42", " apples"}));
}

TEST(Gpt2Tokenizer, RejectsInvalidUtf8AndUnknownIds) {
  EXPECT_THROW(gpt2().encode("ab\xff"), DataError);
  EXPECT_THROW(gpt2().decode(Ids{50257}), DataError);
}

TEST(Gpt2Tokenizer, BadVocabularyFilesAreNamed) {
  testing::TempDir dir;
  testing::write_bytes(dir / "encoder.json", "{\"a\": 0, \"b\": 0}");
  testing::write_bytes(dir / "vocab.bpe", "#version: 0.2\na b\n");
  try {
    Gpt2Tokenizer tokenizer(dir / "encoder.json", dir / "vocab.bpe");
    FAIL() << "expected an error";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find(dir / "encoder.json"), std::string::npos) << e.what();
  }
  testing::write_bytes(dir / "encoder.json", "not json");
  EXPECT_THROW(Gpt2Tokenizer(dir / "encoder.json", dir / "vocab.bpe"), DataError);
}

}  // namespace
}  // namespace nibble::data
