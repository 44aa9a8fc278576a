// SentencePiece tokenizers (Debian's libsentencepiece): train a BPE or unigram model on the user's
// own corpus, and encode with it. Models trained here use identity normalization, no dummy prefix
// and byte fallback, so decode(encode(text)) gives the text back (except U+2581, SentencePiece's
// own spelling of a space). The end-of-text separator is the model's </s> (eos) piece.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "nibble/data/text_source.h"
#include "nibble/data/tokenizer.h"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace nibble::data {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  // Loads a .model file; throws DataError naming it if it cannot, or if it has no eos piece.
  explicit SentencePieceTokenizer(const std::string& model_path);
  ~SentencePieceTokenizer() override;

  std::string name() const override { return "sentencepiece"; }
  std::uint32_t vocab_size() const override { return vocab_size_; }
  std::uint32_t eot_id() const override { return eot_; }
  using Tokenizer::encode;
  void encode(std::string_view text, std::vector<std::uint32_t>& out) const override;
  std::string decode(std::span<const std::uint32_t> ids) const override;

 private:
  std::string path_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
  std::uint32_t vocab_size_ = 0;
  std::uint32_t eot_ = 0;
};

struct SentencePieceTrainOptions {
  std::vector<std::string> inputs;   // files or directories, as for prepare
  std::vector<std::string> include;
  DocumentSplit split = DocumentSplit::file;
  std::string jsonl_field = "text";
  std::string model_path;            // written atomically
  std::uint32_t vocab_size = 8000;
  std::string model_type = "bpe";    // bpe or unigram
  std::uint64_t max_sentences = 1'000'000;  // lines sampled for training
  unsigned threads = 0;
  std::uint64_t seed = 1337;
  bool replace_invalid_utf8 = false;
};

// Trains on the lines of the inputs' documents and writes the model. Throws DataError.
void train_sentencepiece(const SentencePieceTrainOptions& options);

}  // namespace nibble::data
