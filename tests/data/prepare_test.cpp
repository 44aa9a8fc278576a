#include "nibble/data/prepare.h"

#include <gtest/gtest.h>
#include <zlib.h>

#include <filesystem>
#include <memory>

#include "nibble/data/error.h"
#include "nibble/data/gpt2_tokenizer.h"
#include "nibble/data/sampler.h"
#include "test_util.h"

namespace nibble::data {
namespace {

using Ids = std::vector<std::uint32_t>;
using testing::TempDir;
namespace fs = std::filesystem;

const Gpt2Tokenizer& gpt2() {
  static const std::unique_ptr<Gpt2Tokenizer> tokenizer = [] {
    std::string dir = Gpt2Tokenizer::default_dir();
    return std::make_unique<Gpt2Tokenizer>(dir + "/encoder.json", dir + "/vocab.bpe");
  }();
  return *tokenizer;
}

void write_gzip(const std::string& path, const std::string& text) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(gzwrite(f, text.data(), static_cast<unsigned>(text.size())), static_cast<int>(text.size()));
  gzclose(f);
}

// A small corpus: plain and gzip files in nested folders, varied scripts.
struct Corpus {
  TempDir dir;
  std::vector<std::string> docs;  // in the order prepare reads them (sorted paths)
  explicit Corpus(std::mt19937_64& rng, int files = 12) {
    fs::create_directories(dir / "in/sub");
    for (int i = 0; i < files; ++i) {
      std::string text = "Document " + std::to_string(i) + ": " + testing::random_text(rng, 20 + rng() % 200) + "\n";
      char name[32];
      std::snprintf(name, sizeof(name), "%s/doc%02d.txt%s", i % 3 == 0 ? "in/sub" : "in", i, i % 2 ? ".gz" : "");
      if (i % 2) write_gzip(dir / name, text);
      else testing::write_bytes(dir / name, text);
      paths.push_back(dir / name);
      texts.push_back(text);
    }
    // prepare walks the folder in sorted path order
    std::vector<std::size_t> order(paths.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](auto a, auto b) { return paths[a] < paths[b]; });
    for (auto i : order) docs.push_back(texts[i]);
  }
  std::vector<std::string> paths, texts;
};

Ids read_prepared(const std::string& dir, const std::string& split) {
  TokenDataset data = TokenDataset::open_prepared(dir, split);
  Ids all;
  for (std::size_t f = 0; f < data.file_count(); ++f) {
    Ids part = data.file(f).read_all();
    all.insert(all.end(), part.begin(), part.end());
  }
  return all;
}

// Splits a stream at the separators back into documents' texts.
std::vector<std::string> documents_of(const Ids& stream) {
  std::vector<std::string> docs;
  Ids current;
  for (std::size_t i = 0; i <= stream.size(); ++i) {
    if (i == stream.size() || stream[i] == gpt2().eot_id()) {
      if (i > 0) docs.push_back(gpt2().decode(current));
      current.clear();
    } else {
      current.push_back(stream[i]);
    }
  }
  return docs;
}

TEST(Prepare, ShardsHoldEveryDocumentOnceBehindASeparator) {
  auto rng = std::mt19937_64(nibble::test::fresh_seed());
  Corpus corpus(rng);
  for (TokenFormat format : {TokenFormat::llmc, TokenFormat::nanogpt, TokenFormat::megatron}) {
    PrepareOptions o;
    o.inputs = {corpus.dir / "in"};
    o.output_dir = corpus.dir / (std::string("out-") + format_name(format));
    o.format = format;
    o.val_fraction = 0.3;
    o.shard_tokens = 200;
    o.seed = 42;
    o.threads = 2;
    PrepareResult r = prepare(o, gpt2());
    Ids train = read_prepared(o.output_dir, "train"), val = read_prepared(o.output_dir, "val");
    ASSERT_FALSE(train.empty());
    ASSERT_FALSE(val.empty());
    EXPECT_EQ(train.front(), gpt2().eot_id());
    EXPECT_EQ(val.front(), gpt2().eot_id());
    EXPECT_EQ(r.tokens, train.size() + val.size());
    // Train and validation documents, put back in document order, are the corpus.
    auto train_docs = documents_of(train), val_docs = documents_of(val);
    std::vector<std::string> merged;
    std::size_t t = 0, v = 0;
    for (std::uint64_t d = 0; d < corpus.docs.size(); ++d) {
      if (is_validation_document(42, d, 0.3)) {
        ASSERT_LT(v, val_docs.size());
        merged.push_back(val_docs[v++]);
      } else {
        ASSERT_LT(t, train_docs.size());
        merged.push_back(train_docs[t++]);
      }
    }
    EXPECT_EQ(merged, corpus.docs) << format_name(format);
    const auto& m = r.manifest;
    EXPECT_EQ(m["tokenizer"]["vocab_size"], 50257);
    EXPECT_EQ(m["splits"]["train"]["tokens"], train.size());
    EXPECT_EQ(m["splits"]["val"]["documents"], val_docs.size());
    EXPECT_EQ(m["sources"].size(), corpus.paths.size());
    if (format == TokenFormat::llmc) {
      EXPECT_EQ(m["splits"]["train"]["files"].size(), (train.size() + 199) / 200);
      EXPECT_TRUE(fs::exists(o.output_dir + "/train_000000.bin"));
    }
  }
}

TEST(Prepare, SameSeedSameFilesOtherSeedOtherSplit) {
  auto rng = std::mt19937_64(nibble::test::fresh_seed());
  Corpus corpus(rng, 40);
  auto run = [&](std::uint64_t seed, const std::string& out, unsigned threads) {
    PrepareOptions o;
    o.inputs = {corpus.dir / "in"};
    o.output_dir = corpus.dir / out;
    o.val_fraction = 0.25;
    o.seed = seed;
    o.threads = threads;
    prepare(o, gpt2());
    return std::make_pair(read_prepared(o.output_dir, "train"), read_prepared(o.output_dir, "val"));
  };
  auto a = run(1, "a", 1), b = run(1, "b", 2), c = run(2, "c", 2);
  EXPECT_EQ(a, b);  // whatever the thread count
  EXPECT_NE(a.second, c.second);
}

TEST(Prepare, SmallCorpusStillGetsAValidationSplit) {
  TempDir dir;
  testing::write_bytes(dir / "one.txt", "Only one short document here, with a handful of tokens in it.");
  PrepareOptions o;
  o.inputs = {dir / "one.txt"};
  o.output_dir = dir / "out";
  o.val_fraction = 0.1;
  prepare(o, gpt2());
  Ids train = read_prepared(o.output_dir, "train"), val = read_prepared(o.output_dir, "val");
  ASSERT_GE(val.size(), 2u);
  EXPECT_EQ(val.front(), gpt2().eot_id());
  Ids joined(train);
  joined.insert(joined.end(), val.begin() + 1, val.end());
  EXPECT_EQ(joined, gpt2().encode_with_special("<|endoftext|>Only one short document here, with a handful of tokens in it."));
}

// A large document is cut at line starts and tokenized by several threads: same ids as in one go.
TEST(Prepare, LargeDocumentsInPiecesGiveTheSameIds) {
  auto rng = std::mt19937_64(nibble::test::fresh_seed());
  TempDir dir;
  std::string doc;
  const char* words[] = {"alpha", "Beta", "x", "42", "(y)", "--", "\xc3\xa9t\xc3\xa9", "'s", "z"};
  for (int line = 0; line < 2000; ++line) {
    int n = static_cast<int>(rng() % 8);
    for (int w = 0; w < n; ++w) doc += std::string(rng() % 4 ? " " : "  ") + words[rng() % std::size(words)];
    if (rng() % 5 == 0) doc += testing::random_text(rng, 5);
    doc += rng() % 7 ? "\n" : "\n\n";
  }
  testing::write_bytes(dir / "big.txt", doc);
  PrepareOptions o;
  o.inputs = {dir / "big.txt"};
  o.output_dir = dir / "out";
  o.val_fraction = 0;
  o.threads = 2;
  o.chunk_bytes = 300;  // hundreds of pieces
  prepare(o, gpt2());
  Ids expected{gpt2().eot_id()};
  gpt2().encode(doc, expected);
  EXPECT_EQ(read_prepared(o.output_dir, "train"), expected);
}

TEST(Prepare, DocumentSplitModes) {
  TempDir dir;
  testing::write_bytes(dir / "p.txt", "first paragraph\nstill first\n\n  \nsecond\n\n\nthird");
  testing::write_bytes(dir / "j.jsonl", "{\"text\": \"json one\"}\n\n{\"text\": \"json two\", \"id\": 2}\n");
  auto docs_of = [&](const std::string& input, DocumentSplit split) {
    PrepareOptions o;
    o.inputs = {dir / input};
    o.output_dir = dir / ("out-" + input + document_split_name(split));
    o.split = split;
    o.val_fraction = 0;
    prepare(o, gpt2());
    EXPECT_FALSE(fs::exists(o.output_dir + "/val_000000.bin"));
    return documents_of(read_prepared(o.output_dir, "train"));
  };
  EXPECT_EQ(docs_of("p.txt", DocumentSplit::paragraph),
            (std::vector<std::string>{"first paragraph\nstill first\n", "second\n", "third"}));
  EXPECT_EQ(docs_of("p.txt", DocumentSplit::line).size(), 4u);
  EXPECT_EQ(docs_of("j.jsonl", DocumentSplit::jsonl), (std::vector<std::string>{"json one", "json two"}));
  testing::write_bytes(dir / "bad.jsonl", "{\"text\": \"ok\"}\n{\"body\": \"no text field\"}\n");
  PrepareOptions o;
  o.inputs = {dir / "bad.jsonl"};
  o.output_dir = dir / "out-bad";
  o.split = DocumentSplit::jsonl;
  try {
    prepare(o, gpt2());
    FAIL() << "expected an error";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("bad.jsonl: JSON object has no string field \"text\" (at byte offset 15)"), std::string::npos) << e.what();
  }
}

// Bad input stops prepare with the file and offset named, and leaves an earlier output whole.
TEST(Prepare, BadInputKeepsEarlierOutput) {
  auto rng = std::mt19937_64(nibble::test::fresh_seed());
  Corpus corpus(rng);
  PrepareOptions o;
  o.inputs = {corpus.dir / "in"};
  o.output_dir = corpus.dir / "out";
  o.val_fraction = 0.2;
  prepare(o, gpt2());
  const std::string manifest = testing::read_bytes(o.output_dir + "/manifest.json");
  const Ids train = read_prepared(o.output_dir, "train");

  auto expect_failure = [&](const std::string& what) {
    try {
      prepare(o, gpt2());
      ADD_FAILURE() << "expected: " << what;
    } catch (const DataError& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
    EXPECT_EQ(testing::read_bytes(o.output_dir + "/manifest.json"), manifest);
    EXPECT_EQ(read_prepared(o.output_dir, "train"), train);
    for (const auto& entry : fs::directory_iterator(o.output_dir)) {
      EXPECT_EQ(entry.path().filename().string().find(".nibble-prepare"), std::string::npos) << "staging left behind";
    }
  };
  expect_failure("already holds prepared data");  // no --force
  o.force = true;
  testing::write_bytes(corpus.dir / "in/zz_bad.txt", "good text then \xc3\x28 bad");
  expect_failure("zz_bad.txt: invalid UTF-8 (offset in the decompressed text; --invalid-utf8 replace substitutes U+FFFD) (at byte offset 15)");
  fs::remove(corpus.dir / "in/zz_bad.txt");
  testing::write_bytes(corpus.dir / "in/zz_cut.txt.gz", std::string("\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\x4b\x4c", 12));
  expect_failure("zz_cut.txt.gz: gzip data ends early");
  fs::remove(corpus.dir / "in/zz_cut.txt.gz");
  // Named explicitly, an empty file is an error; inside a folder it is skipped and recorded.
  testing::write_bytes(corpus.dir / "empty.txt", "");
  o.inputs = {corpus.dir / "empty.txt"};
  expect_failure("empty.txt: empty file");
  o.inputs = {corpus.dir / "in", corpus.dir / "missing"};
  expect_failure("missing: no such file or directory");

  // With --force and good input the output is replaced, and nothing of the old one remains.
  testing::write_bytes(corpus.dir / "in/zz_empty.txt", "");
  o.inputs = {corpus.dir / "in"};
  o.shard_tokens = 100;
  PrepareResult r = prepare(o, gpt2());
  EXPECT_EQ(r.manifest["skipped_empty_files"].size(), 1u);
  EXPECT_NE(testing::read_bytes(o.output_dir + "/manifest.json"), manifest);
  std::size_t shards = 0;
  for (const auto& entry : fs::directory_iterator(o.output_dir)) shards += entry.path().extension() == ".bin";
  EXPECT_EQ(shards, r.manifest["splits"]["train"]["files"].size() + r.manifest["splits"]["val"]["files"].size());
}

TEST(Prepare, InvalidUtf8CanBeReplaced) {
  TempDir dir;
  testing::write_bytes(dir / "w.txt", "The stock market\x92s drop");
  PrepareOptions o;
  o.inputs = {dir / "w.txt"};
  o.output_dir = dir / "out";
  o.val_fraction = 0;
  o.replace_invalid_utf8 = true;
  PrepareResult r = prepare(o, gpt2());
  EXPECT_EQ(r.manifest["sources"][0]["invalid_utf8_bytes_replaced"], 1);
  EXPECT_EQ(documents_of(read_prepared(o.output_dir, "train")), (std::vector<std::string>{"The stock market\xef\xbf\xbds drop"}));
}

}  // namespace
}  // namespace nibble::data
