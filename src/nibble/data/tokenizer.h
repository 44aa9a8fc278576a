// What the data pipeline needs of a tokenizer. Implementations: GPT-2 byte-level BPE
// (gpt2_tokenizer.h) and SentencePiece (sentencepiece_tokenizer.h).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace nibble::data {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::string name() const = 0;            // as the manifest records it, e.g. "gpt2"
  virtual std::uint32_t vocab_size() const = 0;    // ids are in [0, vocab_size)
  virtual std::uint32_t eot_id() const = 0;        // the separator written before each document
  // Appends the ids of `text`, which must be valid UTF-8. Special-token spellings inside the
  // text (e.g. "<|endoftext|>") are ordinary text. Safe to call from several threads at once.
  virtual void encode(std::string_view text, std::vector<std::uint32_t>& out) const = 0;
  // True if encoding the text before and after a line start "a\nb" (printable ASCII on both sides
  // of the newline) separately and concatenating gives the ids of the whole text, so that one large
  // document can be tokenized by several threads.
  virtual bool splits_at_line_starts() const { return false; }
  // Throws DataError for an id outside the vocabulary.
  virtual std::string decode(std::span<const std::uint32_t> ids) const = 0;

  std::vector<std::uint32_t> encode(std::string_view text) const {
    std::vector<std::uint32_t> out;
    encode(text, out);
    return out;
  }
};

}  // namespace nibble::data
