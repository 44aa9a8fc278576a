// Token files on disk: the formats nibble writes and the ones it reads so that users can bring data
// prepared by other tools.
//
//   llmc      llm.c's shards: a header of 256 little-endian int32 (magic 20240520, version, token
//             count, then zeros), followed by the tokens: uint16 in version 1, uint32 in version 2
//             (vocabularies of more than 65536 ids).
//   nanogpt   nanoGPT's train.bin / val.bin: raw little-endian uint16 tokens, no header.
//   megatron  Megatron-LM's indexed dataset, a pair PREFIX.idx + PREFIX.bin. The .idx holds
//             "MMIDIDX\0\0", uint64 version 1, uint8 dtype code (1 u8, 2 i8, 3 i16, 4 i32, 5 i64,
//             6 f64, 7 f32, 8 u16), uint64 sequence count S, uint64 document count D, then int32
//             lengths[S] (tokens), int64 pointers[S] (byte offsets into .bin), int64
//             document_indices[D] (sequence index where each document starts, plus a final S);
//             multimodal datasets append int8 modes[S]. The .bin holds the tokens of every sequence.
//
// A TokenFile presents any of them as one flat stream of token ids (a Megatron dataset's sequences
// in index order), read through a memory map. Every inconsistency is reported with the file name
// and the byte offset of the bad field; token ids are checked against the vocabulary as they are
// read, so that opening a 100 GB corpus does not scan it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "nibble/data/file_io.h"

namespace nibble::data {

enum class TokenFormat { llmc, nanogpt, megatron };
const char* format_name(TokenFormat format);
TokenFormat parse_format(const std::string& name);  // throws DataError on an unknown name

inline constexpr std::int32_t kLlmcMagic = 20240520;
inline constexpr std::size_t kLlmcHeaderInts = 256;
inline constexpr std::size_t kLlmcHeaderBytes = kLlmcHeaderInts * 4;
inline constexpr std::uint64_t kLlmcMaxShardTokens = 0x7fffffff;  // the count is an int32
inline constexpr char kMegatronMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};

// The element type of stored token ids.
enum class TokenType : std::uint8_t { u8, i8, i16, i32, i64, u16, u32 };
std::size_t token_type_bytes(TokenType type);

class TokenFile {
 public:
  // Opens a file of the given format from disk (memory-mapped). For megatron, `path` may be the
  // prefix, PREFIX.idx or PREFIX.bin.
  static TokenFile open(const std::string& path, TokenFormat format);
  // Opens with the format guessed from the contents: the llm.c magic, else a Megatron .idx (or
  // a .bin with a sibling .idx), else raw uint16 (nanoGPT).
  static TokenFile open(const std::string& path);

  // The same parsers on bytes in memory (tests and fuzzers); `name` appears in error messages.
  // The bytes must outlive the TokenFile.
  static TokenFile parse_llmc(const std::string& name, std::span<const std::byte> bytes);
  static TokenFile parse_nanogpt(const std::string& name, std::span<const std::byte> bytes);
  static TokenFile parse_megatron(const std::string& name, std::span<const std::byte> idx,
                                  std::span<const std::byte> bin);

  TokenFile(TokenFile&&) noexcept;
  TokenFile& operator=(TokenFile&&) noexcept;
  ~TokenFile();

  std::uint64_t size() const { return tokens_; }  // tokens in the stream
  TokenFormat format() const { return format_; }
  TokenType token_type() const { return type_; }
  const std::string& path() const { return name_; }
  std::uint64_t documents() const { return documents_; }  // Megatron only; 0 when unknown

  // Ids at or above `vocab_size` make read() fail (0: no check). Signed types also reject < 0.
  void set_vocab_limit(std::uint64_t vocab_size) { vocab_limit_ = vocab_size; }

  // Copies tokens [pos, pos + count) of the stream to `out`. Throws DataError naming the file
  // and byte offset for a range past the end or an id out of range.
  void read(std::uint64_t pos, std::size_t count, std::uint32_t* out) const;
  std::vector<std::uint32_t> read_all() const;

 private:
  TokenFile() = default;
  void read_segment(std::uint64_t byte_offset, std::uint64_t first_token, std::size_t count, std::uint32_t* out) const;

  std::string name_;     // data file (the .bin for Megatron)
  TokenFormat format_ = TokenFormat::llmc;
  TokenType type_ = TokenType::u16;
  std::uint64_t tokens_ = 0;
  std::uint64_t documents_ = 0;
  std::uint64_t vocab_limit_ = 0;
  std::span<const std::byte> data_;  // the whole data file
  // Where the stream lives in data_: one contiguous run starting at data_offset_, or (Megatron with
  // gaps between sequences) one run per sequence: seq_start_[i] tokens precede sequence i.
  std::uint64_t data_offset_ = 0;
  std::vector<std::uint64_t> seq_start_;
  std::vector<std::uint64_t> seq_pointer_;
  std::unique_ptr<MappedFile> owned_data_;
  std::unique_ptr<MappedFile> owned_index_;
};

// Writes the tokens of one split ("train", "val") in one format. Documents arrive in order, each
// already starting with its end-of-text separator; files appear under their final names only when
// complete (see AtomicFile).
class TokenSink {
 public:
  virtual ~TokenSink() = default;
  virtual void append(std::span<const std::uint32_t> document) = 0;
  // Completes the last file; returns the names of all files written (relative to the directory).
  virtual std::vector<std::string> finish() = 0;
  virtual std::uint64_t tokens() const = 0;
};

// llmc: DIR/SPLIT_000000.bin, ... with `shard_tokens` tokens each (documents run across shard
// boundaries, as in llm.c). nanogpt: DIR/SPLIT.bin. megatron: DIR/SPLIT_text_document.{bin,idx},
// one sequence per document. The token width follows from vocab_size.
std::unique_ptr<TokenSink> make_token_sink(TokenFormat format, const std::string& dir, const std::string& split,
                                           std::uint64_t vocab_size, std::uint64_t shard_tokens);

// One llm.c shard in one call (tests, tools).
void write_llmc_file(const std::string& path, std::span<const std::uint32_t> tokens, std::uint64_t vocab_size);

}  // namespace nibble::data
