#include "nibble/data/sentencepiece_tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <thread>
#include <unordered_map>

#include "nibble/data/error.h"
#include "nibble/data/file_io.h"
#include "nibble/data/utf8.h"

namespace nibble::data {

SentencePieceTokenizer::SentencePieceTokenizer(const std::string& model_path)
    : path_(model_path), processor_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  MappedFile file(model_path);  // a clear error for a missing file before SentencePiece's own
  if (file.bytes().empty()) fail(model_path, "empty file");
  auto status = processor_->LoadFromSerializedProto(
      std::string_view(reinterpret_cast<const char*>(file.bytes().data()), file.bytes().size()));
  if (!status.ok()) fail(model_path, "not a SentencePiece model: " + status.ToString());
  vocab_size_ = static_cast<std::uint32_t>(processor_->GetPieceSize());
  int eos = processor_->eos_id();
  if (eos < 0) fail(model_path, "the model has no end-of-sentence piece, needed to separate documents");
  eot_ = static_cast<std::uint32_t>(eos);
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

void SentencePieceTokenizer::encode(std::string_view text, std::vector<std::uint32_t>& out) const {
  if (std::size_t bad = find_invalid_utf8(text); bad != kValidUtf8) {
    throw DataError("invalid UTF-8 at byte offset " + std::to_string(bad) + " of the text to encode");
  }
  std::vector<int> ids;
  auto status = processor_->Encode(text, &ids);
  if (!status.ok()) throw DataError(path_ + ": SentencePiece cannot encode: " + status.ToString());
  out.insert(out.end(), ids.begin(), ids.end());
}

std::string SentencePieceTokenizer::decode(std::span<const std::uint32_t> ids) const {
  std::vector<int> as_int;
  as_int.reserve(ids.size());
  for (std::uint32_t id : ids) {
    if (id >= vocab_size_) {
      throw DataError(path_ + ": token id " + std::to_string(id) + " is outside the vocabulary of " +
                      std::to_string(vocab_size_));
    }
    as_int.push_back(static_cast<int>(id));
  }
  std::string text;
  auto status = processor_->Decode(as_int, &text);
  if (!status.ok()) throw DataError(path_ + ": SentencePiece cannot decode: " + status.ToString());
  return text;
}

namespace {

// Streams the non-empty lines of the inputs' documents, one file in memory at a time.
class LineIterator final : public sentencepiece::SentenceIterator {
 public:
  explicit LineIterator(const SentencePieceTrainOptions& options)
      : options_(options), files_(list_inputs(options.inputs, options.include)) {
    Next();
  }
  bool done() const override { return done_; }
  const std::string& value() const override { return line_; }
  sentencepiece::util::Status status() const override { return {}; }
  void Next() override {
    for (;;) {
      while (doc_ < docs_.size()) {
        const std::string& doc = docs_[doc_];
        if (pos_ >= doc.size()) {
          ++doc_;
          pos_ = 0;
          continue;
        }
        std::size_t nl = doc.find('\n', pos_);
        std::size_t end = nl == std::string::npos ? doc.size() : nl;
        line_.assign(doc, pos_, end - pos_);
        pos_ = end + 1;
        if (!line_.empty()) return;
      }
      if (file_ == files_.size()) {
        done_ = true;
        return;
      }
      const auto& input = files_[file_++];
      std::string text = read_text_file(input.path);
      if (text.empty() && !input.named) continue;
      if (text.empty()) fail(input.path, "empty file");
      if (options_.replace_invalid_utf8) {
        replace_invalid_utf8(text);
      } else if (std::size_t bad = find_invalid_utf8(text); bad != kValidUtf8) {
        fail_at(input.path, bad, "invalid UTF-8 (offset in the decompressed text)");
      }
      docs_.clear();
      split_documents(input.path, text, options_.split, options_.jsonl_field, docs_);
      doc_ = 0;
      pos_ = 0;
    }
  }

 private:
  const SentencePieceTrainOptions& options_;
  std::vector<InputFile> files_;
  std::size_t file_ = 0;
  std::vector<std::string> docs_;
  std::size_t doc_ = 0, pos_ = 0;
  std::string line_;
  bool done_ = false;
};

}  // namespace

void train_sentencepiece(const SentencePieceTrainOptions& options) {
  if (options.model_type != "bpe" && options.model_type != "unigram") {
    throw DataError("SentencePiece model type must be bpe or unigram, not '" + options.model_type + "'");
  }
  if (options.vocab_size < 260) throw DataError("a SentencePiece vocabulary needs at least 260 pieces (256 bytes + specials)");
  unsigned threads = options.threads != 0 ? options.threads : std::max(1u, std::thread::hardware_concurrency());
  std::unordered_map<std::string, std::string> args = {
      {"model_type", options.model_type},
      {"vocab_size", std::to_string(options.vocab_size)},
      // Keep the text exactly as it is, so that decoding gives it back byte for byte.
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "false"},
      {"byte_fallback", "true"},
      {"allow_whitespace_only_pieces", "true"},
      {"split_digits", "true"},
      {"character_coverage", "0.9995"},
      {"max_sentence_length", "16384"},
      {"input_sentence_size", std::to_string(options.max_sentences)},
      {"shuffle_input_sentence", "true"},
      {"num_threads", std::to_string(threads)},
      {"minloglevel", "1"},
  };
  sentencepiece::SetRandomGeneratorSeed(static_cast<unsigned>(options.seed));  // the sentence sample
  LineIterator lines(options);
  std::string model;
  auto status = sentencepiece::SentencePieceTrainer::Train(args, &lines, &model);
  if (!status.ok()) throw DataError("SentencePiece training failed: " + status.ToString());
  write_file_atomically(options.model_path, model);
}

}  // namespace nibble::data
