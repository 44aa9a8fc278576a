// `nibble prepare`: text corpus -> token files + manifest.json.
//
// Every document is tokenized (in parallel), preceded by the end-of-text token, and sent to the
// train or the validation split by a coin that depends only on (seed, document number), so a
// rerun gives the same files. Output is staged in a hidden folder inside the output directory and
// moved into place only when everything succeeded: a failed run leaves earlier output untouched.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "nibble/data/text_source.h"
#include "nibble/data/token_formats.h"
#include "nibble/data/tokenizer.h"

namespace nibble::data {

struct PrepareOptions {
  std::vector<std::string> inputs;   // files or directories
  std::vector<std::string> include;  // globs for files found in directories (empty: all)
  std::string output_dir;
  TokenFormat format = TokenFormat::llmc;
  DocumentSplit split = DocumentSplit::file;
  std::string jsonl_field = "text";
  double val_fraction = 0.005;
  std::uint64_t shard_tokens = 100'000'000;  // llm.c's shard size
  std::uint64_t seed = 1337;
  unsigned threads = 0;                      // 0: all hardware threads
  std::size_t chunk_bytes = 1 << 20;         // larger documents are tokenized in pieces, in parallel
  bool force = false;                        // replace prepared data already in output_dir
  bool replace_invalid_utf8 = false;         // U+FFFD for bad bytes instead of an error
  nlohmann::json tokenizer_info;             // recorded in the manifest (files, model, ...)
};

struct PrepareProgress {
  std::uint64_t files_done = 0, files_total = 0;
  std::uint64_t text_bytes = 0, tokens = 0;
  double seconds = 0;
};

struct PrepareResult {
  nlohmann::json manifest;
  std::uint64_t text_bytes = 0;  // decompressed UTF-8 tokenized
  std::uint64_t tokens = 0;      // train + val, separators included
  double seconds = 0;
  double cpu_seconds = 0;        // user + system time of all threads (a busy machine inflates `seconds`)
};

inline constexpr const char* kManifestName = "manifest.json";

// Throws DataError (file and offset named) on bad input; nothing is left half-written.
PrepareResult prepare(const PrepareOptions& options, const Tokenizer& tokenizer,
                      const std::function<void(const PrepareProgress&)>& progress = {});

// Whether the document with this number goes to the validation split.
bool is_validation_document(std::uint64_t seed, std::uint64_t document, double val_fraction);

}  // namespace nibble::data
