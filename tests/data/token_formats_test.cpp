#include "nibble/data/token_formats.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "nibble/data/error.h"
#include "test_util.h"

namespace nibble::data {
namespace {

using Ids = std::vector<std::uint32_t>;
using testing::TempDir;

std::vector<Ids> random_documents(std::mt19937_64& rng, std::size_t count, std::uint32_t vocab) {
  std::vector<Ids> docs(count);
  for (auto& d : docs) {
    d.push_back(vocab - 1);  // the separator, as prepare writes it
    std::size_t n = rng() % 300;
    for (std::size_t i = 0; i < n; ++i) d.push_back(static_cast<std::uint32_t>(rng() % vocab));
  }
  return docs;
}

Ids concat(const std::vector<Ids>& docs) {
  Ids all;
  for (const auto& d : docs) all.insert(all.end(), d.begin(), d.end());
  return all;
}

Ids read_split(const std::string& dir, const std::vector<std::string>& files, TokenFormat format) {
  Ids all;
  for (const auto& name : files) {
    if (format == TokenFormat::megatron && name.ends_with(".idx")) continue;
    TokenFile f = TokenFile::open(dir + "/" + name, format);
    EXPECT_EQ(f.format(), format);
    Ids part = f.read_all();
    all.insert(all.end(), part.begin(), part.end());
    // Guessing the format gives the same stream.
    EXPECT_EQ(TokenFile::open(dir + "/" + name).read_all(), part) << name;
  }
  return all;
}

// Every writer's output reads back, through every reader, as the stream that went in; for a
// narrow and a wide vocabulary (uint16 vs 32-bit storage).
TEST(TokenFormats, WritersAndReadersAgree) {
  auto rng = std::mt19937_64(nibble::test::fresh_seed());
  for (std::uint32_t vocab : {50257u, 65536u, 128256u}) {
    auto docs = random_documents(rng, 40, vocab);
    const Ids expected = concat(docs);
    for (TokenFormat format : {TokenFormat::llmc, TokenFormat::nanogpt, TokenFormat::megatron}) {
      if (format == TokenFormat::nanogpt && vocab > 65536) {
        EXPECT_THROW(make_token_sink(format, "/tmp", "train", vocab, 1000), DataError);
        continue;
      }
      TempDir dir;
      auto sink = make_token_sink(format, dir.path(), "train", vocab, /*shard_tokens=*/1000);
      for (const auto& d : docs) sink->append(d);
      auto files = sink->finish();
      EXPECT_EQ(sink->tokens(), expected.size());
      if (format == TokenFormat::llmc) {
        EXPECT_EQ(files.size(), (expected.size() + 999) / 1000);
      }
      EXPECT_EQ(read_split(dir.path(), files, format), expected) << format_name(format) << " vocab " << vocab;
      if (format == TokenFormat::megatron) {
        EXPECT_EQ(TokenFile::open(dir / "train_text_document", format).documents(), docs.size());
      }
    }
  }
}

TEST(TokenFormats, LlmcHeaderIsLlmcs) {
  TempDir dir;
  Ids tokens{1, 2, 3, 70000};
  write_llmc_file(dir / "wide.bin", tokens, 100000);
  std::string bytes = testing::read_bytes(dir / "wide.bin");
  ASSERT_EQ(bytes.size(), 1024u + 4 * 4);
  std::int32_t header[3];
  std::memcpy(header, bytes.data(), sizeof(header));
  EXPECT_EQ(header[0], 20240520);
  EXPECT_EQ(header[1], 2);
  EXPECT_EQ(header[2], 4);
  write_llmc_file(dir / "narrow.bin", Ids{7, 8}, 50257);
  bytes = testing::read_bytes(dir / "narrow.bin");
  ASSERT_EQ(bytes.size(), 1024u + 2 * 2);
  std::memcpy(header, bytes.data(), sizeof(header));
  EXPECT_EQ(header[1], 1);
  EXPECT_EQ(static_cast<unsigned char>(bytes[1024]), 7);
}

// Expects a DataError whose message names `name` and contains `what`.
template <typename F>
void expect_error(F&& f, const std::string& name, const std::string& what) {
  try {
    f();
    ADD_FAILURE() << "expected an error about " << what;
  } catch (const DataError& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find(name), std::string::npos) << msg;
    EXPECT_NE(msg.find(what), std::string::npos) << msg;
  }
}

TEST(TokenFormats, BadLlmcShardsAreRefusedWithFileAndOffset) {
  TempDir dir;
  write_llmc_file(dir / "good.bin", Ids{5, 6, 7, 8}, 50257);
  const std::string good = testing::read_bytes(dir / "good.bin");

  testing::write_bytes(dir / "empty.bin", "");
  expect_error([&] { TokenFile::open(dir / "empty.bin", TokenFormat::llmc); }, dir / "empty.bin", "empty file");

  testing::write_bytes(dir / "short.bin", good.substr(0, good.size() - 1));
  expect_error([&] { TokenFile::open(dir / "short.bin", TokenFormat::llmc); }, dir / "short.bin", "truncated shard");

  testing::write_bytes(dir / "header.bin", good.substr(0, 500));
  expect_error([&] { TokenFile::open(dir / "header.bin", TokenFormat::llmc); }, dir / "header.bin", "at byte offset 500");

  std::string magic = good;
  magic[0] ^= 1;
  testing::write_bytes(dir / "magic.bin", magic);
  expect_error([&] { TokenFile::open(dir / "magic.bin", TokenFormat::llmc); }, dir / "magic.bin", "wrong magic");

  std::string version = good;
  version[4] = 3;
  testing::write_bytes(dir / "version.bin", version);
  expect_error([&] { TokenFile::open(dir / "version.bin", TokenFormat::llmc); }, dir / "version.bin",
               "unsupported llm.c shard version 3 (expected 1 or 2) (at byte offset 4)");

  testing::write_bytes(dir / "long.bin", good + "xy");
  expect_error([&] { TokenFile::open(dir / "long.bin", TokenFormat::llmc); }, dir / "long.bin", "unexpected bytes");

  // Ids at or above the vocabulary are caught when read, with the token's byte offset.
  TokenFile f = TokenFile::open(dir / "good.bin");
  f.set_vocab_limit(7);
  Ids out(4);
  EXPECT_NO_THROW(f.read(0, 2, out.data()));
  expect_error([&] { f.read(0, 4, out.data()); }, dir / "good.bin", "token id 7 at token 2 is outside the vocabulary [0, 7) (at byte offset 1028)");
  expect_error([&] { f.read(3, 2, out.data()); }, dir / "good.bin", "past the end");
}

TEST(TokenFormats, BadNanoGptFilesAreRefused) {
  TempDir dir;
  testing::write_bytes(dir / "odd.bin", "abc");
  expect_error([&] { TokenFile::open(dir / "odd.bin", TokenFormat::nanogpt); }, dir / "odd.bin", "odd size 3");
  testing::write_bytes(dir / "empty.bin", "");
  expect_error([&] { TokenFile::open(dir / "empty.bin"); }, dir / "empty.bin", "empty file");
  expect_error([&] { TokenFile::open(dir / "missing.bin"); }, dir / "missing.bin", "cannot open");
}

// A Megatron index built by hand: the reader must follow the pointers, not assume contiguity.
std::string megatron_index(std::uint8_t dtype, const std::vector<std::int32_t>& lengths,
                           const std::vector<std::int64_t>& pointers, const std::vector<std::int64_t>& docs) {
  std::string idx(kMegatronMagic, 9);
  auto put = [&idx](auto v) { idx.append(reinterpret_cast<const char*>(&v), sizeof(v)); };
  put(std::uint64_t{1});
  put(dtype);
  put(std::uint64_t{lengths.size()});
  put(std::uint64_t{docs.size()});
  for (auto v : lengths) put(v);
  for (auto v : pointers) put(v);
  for (auto v : docs) put(v);
  return idx;
}

TEST(TokenFormats, MegatronScatteredSequencesAndSignedTypes) {
  TempDir dir;
  // int32 tokens: sequence 0 = {10, 11} at byte 8, sequence 1 = {20, 21, 22} at byte 16; the
  // leading {-1, 99} belongs to no sequence.
  std::vector<std::int32_t> bin = {-1, 99, 10, 11, 20, 21, 22};
  testing::write_bytes(dir / "d.bin", std::string(reinterpret_cast<const char*>(bin.data()), bin.size() * 4));
  testing::write_bytes(dir / "d.idx", megatron_index(4, {2, 3}, {8, 16}, {0, 1, 2}));
  TokenFile f = TokenFile::open(dir / "d", TokenFormat::megatron);
  EXPECT_EQ(f.size(), 5u);
  EXPECT_EQ(f.read_all(), (Ids{10, 11, 20, 21, 22}));
  Ids mid(2);
  f.read(1, 2, mid.data());  // across the sequence boundary
  EXPECT_EQ(mid, (Ids{11, 20}));
  // A negative id is refused.
  testing::write_bytes(dir / "n.bin", std::string(reinterpret_cast<const char*>(bin.data()), bin.size() * 4));
  testing::write_bytes(dir / "n.idx", megatron_index(4, {2}, {0}, {0, 1}));
  TokenFile neg = TokenFile::open(dir / "n.idx");
  expect_error([&] { neg.read_all(); }, dir / "n.bin", "token id -1 at token 0");
}

TEST(TokenFormats, BadMegatronIndexesAreRefused) {
  TempDir dir;
  std::vector<std::uint16_t> bin = {1, 2, 3, 4};
  testing::write_bytes(dir / "d.bin", std::string(reinterpret_cast<const char*>(bin.data()), 8));
  auto try_index = [&](const std::string& idx) {
    testing::write_bytes(dir / "d.idx", idx);
    (void)TokenFile::open(dir / "d.bin", TokenFormat::megatron);
  };
  EXPECT_NO_THROW(try_index(megatron_index(8, {4}, {0}, {0, 1})));
  expect_error([&] { try_index(megatron_index(8, {3}, {4}, {0, 1})); }, dir / "d.idx", "points past the end of");
  expect_error([&] { try_index(megatron_index(8, {3}, {4}, {0, 1})); }, dir / "d.idx", "at byte offset 38");
  expect_error([&] { try_index(megatron_index(8, {5}, {0}, {0, 1})); }, dir / "d.idx", "points past the end");
  expect_error([&] { try_index(megatron_index(8, {-1}, {0}, {0, 1})); }, dir / "d.idx", "negative length");
  expect_error([&] { try_index(megatron_index(7, {4}, {0}, {0, 1})); }, dir / "d.idx", "float type");
  expect_error([&] { try_index(megatron_index(9, {4}, {0}, {0, 1})); }, dir / "d.idx", "unknown dtype code 9");
  expect_error([&] { try_index(megatron_index(8, {4}, {0}, {0, 2})); }, dir / "d.idx", "document index 2");
  std::string good = megatron_index(8, {4}, {0}, {0, 1});
  expect_error([&] { try_index(good.substr(0, good.size() - 3)); }, dir / "d.idx", "truncated index");
  expect_error([&] { try_index(good.substr(0, 20)); }, dir / "d.idx", "truncated Megatron index header");
  expect_error([&] { try_index(""); }, dir / "d.idx", "empty index file");
  std::string magic = good;
  magic[0] = 'X';
  expect_error([&] { try_index(magic); }, dir / "d.idx", "wrong magic");
  std::string version = good;
  version[9] = 2;
  expect_error([&] { try_index(version); }, dir / "d.idx", "unsupported Megatron index version 2");
}

TEST(TokenFormats, FailedWriteLeavesNoFileAndKeepsTheOldOne) {
  TempDir dir;
  write_llmc_file(dir / "shard.bin", Ids{1, 2, 3}, 50257);
  const std::string before = testing::read_bytes(dir / "shard.bin");
  EXPECT_THROW(write_llmc_file(dir / "shard.bin", Ids{1, 60000}, 50257), DataError);  // id out of range
  EXPECT_EQ(testing::read_bytes(dir / "shard.bin"), before);
  {
    AtomicFile file(dir / "other.bin");
    file.write("partial", 7);
    // destroyed without commit()
  }
  EXPECT_FALSE(std::filesystem::exists(dir / "other.bin"));
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir.path()), {}), 1);  // no temporaries left
}

}  // namespace
}  // namespace nibble::data
