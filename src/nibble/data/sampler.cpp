#include "nibble/data/sampler.h"

#include <algorithm>
#include <filesystem>

#include "nibble/data/error.h"
#include "nibble/data/file_io.h"
#include "nibble/data/prepare.h"

namespace nibble::data {

namespace {

std::uint64_t mix(std::uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  return x ^ (x >> 33);
}

}  // namespace

TokenDataset TokenDataset::open_prepared(const std::string& dir, const std::string& split) {
  const std::string manifest_path = (std::filesystem::path(dir) / kManifestName).string();
  std::string text;
  {
    MappedFile file(manifest_path);
    text.assign(reinterpret_cast<const char*>(file.bytes().data()), file.bytes().size());
  }
  auto manifest = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (manifest.is_discarded() || !manifest.is_object()) fail(manifest_path, "not valid JSON");
  try {
    TokenFormat format = parse_format(manifest.at("format").get<std::string>());
    std::uint64_t vocab = manifest.at("tokenizer").at("vocab_size").get<std::uint64_t>();
    if (!manifest.at("splits").contains(split)) fail(manifest_path, "has no split \"" + split + "\"");
    TokenDataset ds;
    ds.vocab_size_ = vocab;
    for (const auto& name : manifest.at("splits").at(split).at("files")) {
      std::string file = name.get<std::string>();
      if (format == TokenFormat::megatron) {
        if (file.size() < 4 || file.substr(file.size() - 4) != ".bin") continue;  // the .idx comes with it
      }
      ds.files_.push_back(TokenFile::open((std::filesystem::path(dir) / file).string(), format));
      ds.files_.back().set_vocab_limit(vocab);
    }
    if (ds.files_.empty()) fail(manifest_path, "split \"" + split + "\" lists no files");
    return ds;
  } catch (const nlohmann::json::exception& e) {
    fail(manifest_path, std::string("malformed manifest: ") + e.what());
  }
}

TokenDataset TokenDataset::open_files(const std::vector<std::string>& paths, std::optional<TokenFormat> format,
                                      std::uint64_t vocab_size) {
  if (paths.empty()) throw DataError("no token files given");
  TokenDataset ds;
  ds.vocab_size_ = vocab_size;
  for (const auto& path : paths) {
    ds.files_.push_back(format ? TokenFile::open(path, *format) : TokenFile::open(path));
    ds.files_.back().set_vocab_limit(vocab_size);
  }
  return ds;
}

std::uint64_t TokenDataset::tokens() const {
  std::uint64_t n = 0;
  for (const auto& f : files_) n += f.size();
  return n;
}

nlohmann::json SamplerPosition::to_json() const {
  return {{"seed", seed}, {"epoch", epoch}, {"index", index}, {"windows", windows}};
}

SamplerPosition SamplerPosition::from_json(const nlohmann::json& j) {
  try {
    return {j.at("seed").get<std::uint64_t>(), j.at("epoch").get<std::uint64_t>(), j.at("index").get<std::uint64_t>(),
            j.at("windows").get<std::uint64_t>()};
  } catch (const nlohmann::json::exception& e) {
    throw DataError(std::string("malformed sampler position: ") + e.what());
  }
}

WindowSampler::WindowSampler(const TokenDataset& data, std::size_t window, std::size_t stride, std::uint64_t seed)
    : data_(&data), window_(window), stride_(stride), seed_(seed) {
  if (window == 0 || stride == 0) throw DataError("window and stride must be positive");
  first_window_.push_back(0);
  for (std::size_t f = 0; f < data.file_count(); ++f) {
    std::uint64_t n = data.file(f).size();
    std::uint64_t windows = n >= window ? (n - window) / stride + 1 : 0;
    total_windows_ += windows;
    first_window_.push_back(total_windows_);
  }
  if (total_windows_ == 0) {
    throw DataError("no token file holds a window of " + std::to_string(window) + " tokens (the largest, " +
                    (data.file_count() ? data.file(0).path() : std::string("none")) + ", ...): use a shorter sequence");
  }
  while ((std::uint64_t{1} << (2 * half_bits_)) < total_windows_) ++half_bits_;
}

std::uint64_t WindowSampler::shuffled(std::uint64_t epoch, std::uint64_t index) const {
  // A 4-round Feistel network is a bijection on [0, 2^(2h)); cycle-walking (re-applying it until
  // the value lands below the window count) restricts it to a bijection on [0, windows).
  const std::uint64_t mask = (std::uint64_t{1} << half_bits_) - 1;
  const std::uint64_t key = mix(seed_ ^ mix(epoch + 0x632be59bd9b4e019ull));
  std::uint64_t x = index;
  do {
    std::uint64_t left = x >> half_bits_, right = x & mask;
    for (std::uint64_t round = 0; round < 4; ++round) {
      std::uint64_t f = mix(right ^ key ^ (round * 0x9e3779b97f4a7c15ull)) & mask;
      std::uint64_t next_right = left ^ f;
      left = right;
      right = next_right;
    }
    x = (left << half_bits_) | right;
  } while (x >= total_windows_);
  return x;
}

std::pair<std::size_t, std::uint64_t> WindowSampler::locate(std::uint64_t k) const {
  auto it = std::upper_bound(first_window_.begin(), first_window_.end(), k);
  std::size_t file = static_cast<std::size_t>(it - first_window_.begin()) - 1;
  return {file, (k - first_window_[file]) * stride_};
}

void WindowSampler::read_window(std::uint64_t epoch, std::uint64_t index, std::uint32_t* out) const {
  auto [file, offset] = locate(shuffled(epoch, index));
  data_->file(file).read(offset, window_, out);
}

void WindowSampler::next(std::size_t count, std::uint32_t* out) { next_for_rank(count, 0, 1, out); }

void WindowSampler::next_for_rank(std::size_t count, unsigned rank, unsigned world, std::uint32_t* out) {
  if (world == 0 || rank >= world) throw DataError("rank " + std::to_string(rank) + " is not below world size " + std::to_string(world));
  std::uint64_t epoch = epoch_, index = index_;
  auto advance = [&] {
    if (++index == total_windows_) {
      index = 0;
      ++epoch;
    }
  };
  for (std::uint64_t skip = 0; skip < std::uint64_t{rank} * count; ++skip) advance();
  for (std::size_t i = 0; i < count; ++i) {
    read_window(epoch, index, out + i * window_);
    advance();
  }
  // Every rank ends at the same position: world * count windows further on.
  std::uint64_t step = std::uint64_t{world} * count;
  epoch_ += (index_ + step) / total_windows_;
  index_ = (index_ + step) % total_windows_;
}

void WindowSampler::restore(const SamplerPosition& position) {
  if (position.windows != total_windows_) {
    throw DataError("the saved data position is for " + std::to_string(position.windows) + " windows per epoch, but the data now has " +
                    std::to_string(total_windows_) + " (different data, sequence length or stride)");
  }
  if (position.index >= total_windows_) throw DataError("the saved data position is past the end of the epoch");
  seed_ = position.seed;
  epoch_ = position.epoch;
  index_ = position.index;
}

}  // namespace nibble::data
