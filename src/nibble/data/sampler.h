// Training data out: a split's token files and the windows a trainer reads from them.
//
// Each file is its own stream; window j of a file covers tokens [j * stride, j * stride + window)
// (window = T + 1 so inputs and next-token targets come from one read; stride = T so windows do not
// overlap in targets). Windows never cross files. An epoch visits every window once in an order
// that is a pseudo-random permutation keyed by (seed, epoch): a Feistel network over the window
// numbers, so it costs no memory whatever the corpus size. The position (epoch, index) is two
// integers that a checkpoint saves; restoring it continues with exactly the windows that follow.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "nibble/data/token_formats.h"

namespace nibble::data {

class TokenDataset {
 public:
  // A split ("train", "val") of a directory written by `nibble prepare`, found through its
  // manifest.json. Token ids are checked against the manifest's vocabulary size as they are read.
  static TokenDataset open_prepared(const std::string& dir, const std::string& split);
  // Token files from other tools (llm.c shards, nanoGPT .bin, Megatron prefixes); the format is
  // guessed per file when not given. vocab_size 0: ids are not checked.
  static TokenDataset open_files(const std::vector<std::string>& paths, std::optional<TokenFormat> format,
                                 std::uint64_t vocab_size);

  std::size_t file_count() const { return files_.size(); }
  const TokenFile& file(std::size_t i) const { return files_[i]; }
  std::uint64_t tokens() const;
  std::uint64_t vocab_size() const { return vocab_size_; }

 private:
  std::vector<TokenFile> files_;
  std::uint64_t vocab_size_ = 0;
};

struct SamplerPosition {
  std::uint64_t seed = 0;
  std::uint64_t epoch = 0;
  std::uint64_t index = 0;    // windows of this epoch already handed out
  std::uint64_t windows = 0;  // windows per epoch when saved: a resume on other data is refused
  nlohmann::json to_json() const;
  static SamplerPosition from_json(const nlohmann::json& j);  // throws DataError
};

class WindowSampler {
 public:
  // Throws DataError when no file holds a single window. `data` must outlive the sampler.
  WindowSampler(const TokenDataset& data, std::size_t window, std::size_t stride, std::uint64_t seed);

  std::uint64_t windows_per_epoch() const { return total_windows_; }
  std::size_t window() const { return window_; }

  // Writes `count` windows (count * window() tokens) to `out` and advances; epochs roll over.
  void next(std::size_t count, std::uint32_t* out);
  // Data parallelism: all `world` ranks call this with the same count on each step; rank r gets
  // windows [r * count, (r + 1) * count) of the step's global batch, and every rank advances by
  // world * count, so their positions stay equal.
  void next_for_rank(std::size_t count, unsigned rank, unsigned world, std::uint32_t* out);

  SamplerPosition position() const { return {seed_, epoch_, index_, total_windows_}; }
  void restore(const SamplerPosition& position);  // throws DataError if it belongs to other data

  // Where window number `k` (in epoch order, before shuffling) lives: file and first token.
  std::pair<std::size_t, std::uint64_t> locate(std::uint64_t k) const;
  // The window number at position `index` of epoch `epoch` (the permutation).
  std::uint64_t shuffled(std::uint64_t epoch, std::uint64_t index) const;

 private:
  void read_window(std::uint64_t epoch, std::uint64_t index, std::uint32_t* out) const;

  const TokenDataset* data_;
  std::size_t window_, stride_;
  std::uint64_t seed_;
  std::vector<std::uint64_t> first_window_;  // per file, prefix sums of window counts
  std::uint64_t total_windows_ = 0;
  unsigned half_bits_ = 1;                   // the Feistel domain is 2^(2 * half_bits_)
  std::uint64_t epoch_ = 0, index_ = 0;
};

}  // namespace nibble::data
