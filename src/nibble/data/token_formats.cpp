#include "nibble/data/token_formats.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "nibble/data/error.h"

namespace nibble::data {

namespace {

// Little-endian loads from possibly unaligned bytes (x86 and every GPU host are little-endian).
template <typename T>
T load(std::span<const std::byte> bytes, std::uint64_t offset) {
  T value;
  std::memcpy(&value, bytes.data() + offset, sizeof(T));
  return value;
}

bool file_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The token width a vocabulary needs in llm.c's format: uint16 holds ids 0..65535.
bool fits_u16(std::uint64_t vocab_size) { return vocab_size <= 65536; }

}  // namespace

const char* format_name(TokenFormat format) {
  switch (format) {
    case TokenFormat::llmc: return "llmc";
    case TokenFormat::nanogpt: return "nanogpt";
    case TokenFormat::megatron: return "megatron";
  }
  return "?";
}

TokenFormat parse_format(const std::string& name) {
  if (name == "llmc") return TokenFormat::llmc;
  if (name == "nanogpt") return TokenFormat::nanogpt;
  if (name == "megatron") return TokenFormat::megatron;
  throw DataError("unknown token file format '" + name + "' (expected llmc, nanogpt or megatron)");
}

std::size_t token_type_bytes(TokenType type) {
  switch (type) {
    case TokenType::u8: case TokenType::i8: return 1;
    case TokenType::i16: case TokenType::u16: return 2;
    case TokenType::i32: case TokenType::u32: return 4;
    case TokenType::i64: return 8;
  }
  return 0;
}

TokenFile::TokenFile(TokenFile&&) noexcept = default;
TokenFile& TokenFile::operator=(TokenFile&&) noexcept = default;
TokenFile::~TokenFile() = default;

TokenFile TokenFile::parse_llmc(const std::string& name, std::span<const std::byte> bytes) {
  if (bytes.empty()) fail(name, "empty file (expected an llm.c token shard)");
  if (bytes.size() < kLlmcHeaderBytes) {
    fail_at(name, bytes.size(), "truncated llm.c header: the file has " + std::to_string(bytes.size()) +
                                    " bytes, the header alone needs " + std::to_string(kLlmcHeaderBytes));
  }
  auto magic = load<std::int32_t>(bytes, 0);
  if (magic != kLlmcMagic) {
    fail_at(name, 0, "wrong magic " + std::to_string(magic) + " (an llm.c shard starts with " +
                         std::to_string(kLlmcMagic) + ")");
  }
  auto version = load<std::int32_t>(bytes, 4);
  TokenFile f;
  if (version == 1) {
    f.type_ = TokenType::u16;
  } else if (version == 2) {
    f.type_ = TokenType::u32;
  } else {
    fail_at(name, 4, "unsupported llm.c shard version " + std::to_string(version) + " (expected 1 or 2)");
  }
  auto count = load<std::int32_t>(bytes, 8);
  if (count < 0) fail_at(name, 8, "negative token count " + std::to_string(count));
  std::uint64_t width = token_type_bytes(f.type_);
  std::uint64_t expected = kLlmcHeaderBytes + static_cast<std::uint64_t>(count) * width;
  if (bytes.size() < expected) {
    fail_at(name, bytes.size(), "truncated shard: the header promises " + std::to_string(count) + " tokens (" +
                                    std::to_string(expected) + " bytes), the file has " +
                                    std::to_string(bytes.size()) + " bytes");
  }
  if (bytes.size() > expected) {
    fail_at(name, expected, std::to_string(bytes.size() - expected) + " unexpected bytes after the " +
                                std::to_string(count) + " tokens the header announces");
  }
  f.name_ = name;
  f.format_ = TokenFormat::llmc;
  f.tokens_ = static_cast<std::uint64_t>(count);
  f.data_ = bytes;
  f.data_offset_ = kLlmcHeaderBytes;
  return f;
}

TokenFile TokenFile::parse_nanogpt(const std::string& name, std::span<const std::byte> bytes) {
  if (bytes.empty()) fail(name, "empty file (expected raw uint16 tokens)");
  if (bytes.size() % 2 != 0) {
    fail_at(name, bytes.size() - 1, "odd size " + std::to_string(bytes.size()) +
                                         ": raw uint16 tokens need an even number of bytes (truncated?)");
  }
  TokenFile f;
  f.name_ = name;
  f.format_ = TokenFormat::nanogpt;
  f.type_ = TokenType::u16;
  f.tokens_ = bytes.size() / 2;
  f.data_ = bytes;
  return f;
}

TokenFile TokenFile::parse_megatron(const std::string& name, std::span<const std::byte> idx,
                                    std::span<const std::byte> bin) {
  const std::string idx_name = ends_with(name, ".bin") ? name.substr(0, name.size() - 4) + ".idx" : name + ".idx";
  constexpr std::uint64_t kHeader = 9 + 8 + 1 + 8 + 8;
  if (idx.empty()) fail(idx_name, "empty index file");
  if (idx.size() < kHeader) {
    fail_at(idx_name, idx.size(), "truncated Megatron index header (" + std::to_string(idx.size()) + " of " +
                                      std::to_string(kHeader) + " bytes)");
  }
  if (std::memcmp(idx.data(), kMegatronMagic, sizeof(kMegatronMagic)) != 0) {
    fail_at(idx_name, 0, "wrong magic (a Megatron index starts with \"MMIDIDX\\0\\0\")");
  }
  auto version = load<std::uint64_t>(idx, 9);
  if (version != 1) fail_at(idx_name, 9, "unsupported Megatron index version " + std::to_string(version) + " (expected 1)");
  TokenFile f;
  auto code = load<std::uint8_t>(idx, 17);
  switch (code) {
    case 1: f.type_ = TokenType::u8; break;
    case 2: f.type_ = TokenType::i8; break;
    case 3: f.type_ = TokenType::i16; break;
    case 4: f.type_ = TokenType::i32; break;
    case 5: f.type_ = TokenType::i64; break;
    case 8: f.type_ = TokenType::u16; break;
    case 6: case 7: fail_at(idx_name, 17, "dtype code " + std::to_string(code) + " is a float type, not token ids");
    default: fail_at(idx_name, 17, "unknown dtype code " + std::to_string(code));
  }
  const std::uint64_t width = token_type_bytes(f.type_);
  const auto seqs = load<std::uint64_t>(idx, 18);
  const auto docs = load<std::uint64_t>(idx, 26);
  // 12 bytes per sequence and 8 per document must fit in the file; test without overflowing.
  const std::uint64_t room = idx.size() - kHeader;
  if (seqs > room / 12 || docs > (room - seqs * 12) / 8) {
    fail_at(idx_name, idx.size(), "truncated index: " + std::to_string(seqs) + " sequences and " +
                                      std::to_string(docs) + " documents need more than the file's " +
                                      std::to_string(idx.size()) + " bytes");
  }
  const std::uint64_t lengths_at = kHeader, pointers_at = lengths_at + 4 * seqs, docs_at = pointers_at + 8 * seqs;
  const std::uint64_t end = docs_at + 8 * docs;
  if (idx.size() != end && idx.size() != end + seqs) {
    fail_at(idx_name, end, "unexpected size " + std::to_string(idx.size()) + " (expected " + std::to_string(end) +
                               ", or " + std::to_string(end + seqs) + " with multimodal modes)");
  }
  // Every sequence must lie inside the data file, whole tokens, and the stream is their concatenation.
  std::uint64_t total = 0;
  bool contiguous = true;
  const std::uint64_t first_pointer = seqs > 0 ? load<std::int64_t>(idx, pointers_at) : 0;
  for (std::uint64_t i = 0; i < seqs; ++i) {
    auto length = load<std::int32_t>(idx, lengths_at + 4 * i);
    auto pointer = load<std::int64_t>(idx, pointers_at + 8 * i);
    if (length < 0) fail_at(idx_name, lengths_at + 4 * i, "sequence " + std::to_string(i) + " has negative length");
    if (pointer < 0 || static_cast<std::uint64_t>(pointer) % width != 0) {
      fail_at(idx_name, pointers_at + 8 * i, "sequence " + std::to_string(i) + " has an invalid pointer " +
                                                 std::to_string(pointer));
    }
    auto p = static_cast<std::uint64_t>(pointer);
    std::uint64_t bytes = static_cast<std::uint64_t>(length) * width;
    if (p > bin.size() || bytes > bin.size() - p) {
      fail_at(idx_name, pointers_at + 8 * i, "sequence " + std::to_string(i) + " (bytes " + std::to_string(p) +
                                                 ".." + std::to_string(p + bytes) + ") points past the end of " +
                                                 name + " (" + std::to_string(bin.size()) + " bytes)");
    }
    if (p != first_pointer + total * width) contiguous = false;
    total += static_cast<std::uint64_t>(length);
  }
  std::uint64_t previous = 0;
  for (std::uint64_t d = 0; d < docs; ++d) {
    auto at = load<std::int64_t>(idx, docs_at + 8 * d);
    if (at < 0 || static_cast<std::uint64_t>(at) > seqs || static_cast<std::uint64_t>(at) < previous) {
      fail_at(idx_name, docs_at + 8 * d, "document index " + std::to_string(at) +
                                             " is out of order or past the sequence count " + std::to_string(seqs));
    }
    previous = static_cast<std::uint64_t>(at);
  }
  if (seqs > 0 && total == 0) fail(idx_name, "every sequence is empty");
  if (seqs == 0) fail(idx_name, "no sequences");
  f.name_ = name;
  f.format_ = TokenFormat::megatron;
  f.tokens_ = total;
  f.documents_ = docs > 0 ? docs - 1 : 0;
  f.data_ = bin;
  if (contiguous) {
    f.data_offset_ = first_pointer;
  } else {
    f.seq_start_.resize(seqs + 1);
    f.seq_pointer_.resize(seqs);
    std::uint64_t run = 0;
    for (std::uint64_t i = 0; i < seqs; ++i) {
      f.seq_start_[i] = run;
      f.seq_pointer_[i] = static_cast<std::uint64_t>(load<std::int64_t>(idx, pointers_at + 8 * i));
      run += static_cast<std::uint64_t>(load<std::int32_t>(idx, lengths_at + 4 * i));
    }
    f.seq_start_[seqs] = run;
  }
  return f;
}

TokenFile TokenFile::open(const std::string& path, TokenFormat format) {
  if (format == TokenFormat::megatron) {
    std::string prefix = path;
    if (ends_with(prefix, ".bin") || ends_with(prefix, ".idx")) prefix.resize(prefix.size() - 4);
    auto index = std::make_unique<MappedFile>(prefix + ".idx");
    auto data = std::make_unique<MappedFile>(prefix + ".bin");
    TokenFile f = parse_megatron(prefix + ".bin", index->bytes(), data->bytes());
    f.owned_index_ = std::move(index);
    f.owned_data_ = std::move(data);
    return f;
  }
  auto data = std::make_unique<MappedFile>(path);
  TokenFile f = format == TokenFormat::llmc ? parse_llmc(path, data->bytes()) : parse_nanogpt(path, data->bytes());
  f.owned_data_ = std::move(data);
  return f;
}

TokenFile TokenFile::open(const std::string& path) {
  if (ends_with(path, ".idx")) return open(path, TokenFormat::megatron);
  if (ends_with(path, ".bin") && file_exists(path.substr(0, path.size() - 4) + ".idx")) {
    return open(path, TokenFormat::megatron);
  }
  auto data = std::make_unique<MappedFile>(path);
  auto bytes = data->bytes();
  bool llmc = bytes.size() >= 4 && load<std::int32_t>(bytes, 0) == kLlmcMagic;
  TokenFile f = llmc ? parse_llmc(path, bytes) : parse_nanogpt(path, bytes);
  f.owned_data_ = std::move(data);
  return f;
}

namespace {

template <typename T>
void convert(const std::string& name, std::span<const std::byte> data, std::uint64_t byte_offset,
             std::uint64_t first_token, std::size_t count, std::uint64_t vocab_limit, std::uint32_t* out) {
  const std::byte* src = data.data() + byte_offset;
  for (std::size_t i = 0; i < count; ++i) {
    T v;
    std::memcpy(&v, src + i * sizeof(T), sizeof(T));
    bool bad = false;
    if constexpr (std::is_signed_v<T>) bad = v < 0;
    if (!bad && vocab_limit != 0) bad = static_cast<std::uint64_t>(v) >= vocab_limit;
    if constexpr (sizeof(T) == 8) bad = bad || static_cast<std::uint64_t>(v) > 0xffffffffu;
    if (bad) {
      fail_at(name, byte_offset + i * sizeof(T),
              "token id " + std::to_string(v) + " at token " + std::to_string(first_token + i) +
                  (vocab_limit != 0 ? " is outside the vocabulary [0, " + std::to_string(vocab_limit) + ")"
                                    : " is not a valid token id"));
    }
    out[i] = static_cast<std::uint32_t>(v);
  }
}

}  // namespace

void TokenFile::read_segment(std::uint64_t byte_offset, std::uint64_t first_token, std::size_t count,
                             std::uint32_t* out) const {
  switch (type_) {
    case TokenType::u8: convert<std::uint8_t>(name_, data_, byte_offset, first_token, count, vocab_limit_, out); break;
    case TokenType::i8: convert<std::int8_t>(name_, data_, byte_offset, first_token, count, vocab_limit_, out); break;
    case TokenType::i16: convert<std::int16_t>(name_, data_, byte_offset, first_token, count, vocab_limit_, out); break;
    case TokenType::u16: convert<std::uint16_t>(name_, data_, byte_offset, first_token, count, vocab_limit_, out); break;
    case TokenType::i32: convert<std::int32_t>(name_, data_, byte_offset, first_token, count, vocab_limit_, out); break;
    case TokenType::u32: convert<std::uint32_t>(name_, data_, byte_offset, first_token, count, vocab_limit_, out); break;
    case TokenType::i64: convert<std::int64_t>(name_, data_, byte_offset, first_token, count, vocab_limit_, out); break;
  }
}

void TokenFile::read(std::uint64_t pos, std::size_t count, std::uint32_t* out) const {
  if (pos > tokens_ || count > tokens_ - pos) {
    fail(name_, "read of tokens [" + std::to_string(pos) + ", " + std::to_string(pos + count) +
                    ") past the end of the stream (" + std::to_string(tokens_) + " tokens)");
  }
  const std::uint64_t width = token_type_bytes(type_);
  if (seq_start_.empty()) {
    read_segment(data_offset_ + pos * width, pos, count, out);
    return;
  }
  // Sequences scattered in the .bin: walk them from the one that holds `pos`.
  auto it = std::upper_bound(seq_start_.begin(), seq_start_.end(), pos);
  std::size_t seq = static_cast<std::size_t>(it - seq_start_.begin()) - 1;
  while (count > 0) {
    std::uint64_t within = pos - seq_start_[seq];
    std::uint64_t take = std::min<std::uint64_t>(count, seq_start_[seq + 1] - pos);
    if (take > 0) read_segment(seq_pointer_[seq] + within * width, pos, take, out);
    pos += take;
    out += take;
    count -= take;
    ++seq;
  }
}

std::vector<std::uint32_t> TokenFile::read_all() const {
  std::vector<std::uint32_t> out(tokens_);
  read(0, out.size(), out.data());
  return out;
}

// ---- writers ----

namespace {

void check_ids(const std::string& path, std::span<const std::uint32_t> tokens, std::uint64_t vocab_size) {
  for (std::uint32_t t : tokens) {
    if (t >= vocab_size) {
      fail(path, "refusing to write token id " + std::to_string(t) + " >= vocabulary size " + std::to_string(vocab_size));
    }
  }
}

template <typename T>
void append_as(AtomicFile& file, std::span<const std::uint32_t> tokens) {
  if constexpr (sizeof(T) == 4) {
    file.write(tokens.data(), tokens.size() * 4);
  } else {
    T buffer[4096];
    for (std::size_t i = 0; i < tokens.size(); i += 4096) {
      std::size_t n = std::min<std::size_t>(4096, tokens.size() - i);
      for (std::size_t j = 0; j < n; ++j) buffer[j] = static_cast<T>(tokens[i + j]);
      file.write(buffer, n * sizeof(T));
    }
  }
}

std::string shard_name(const std::string& split, std::size_t index) {
  char suffix[32];
  std::snprintf(suffix, sizeof(suffix), "_%06zu.bin", index);
  return split + suffix;
}

class LlmcSink final : public TokenSink {
 public:
  LlmcSink(std::string dir, std::string split, std::uint64_t vocab_size, std::uint64_t shard_tokens)
      : dir_(std::move(dir)), split_(std::move(split)), vocab_(vocab_size), shard_tokens_(shard_tokens) {
    if (shard_tokens_ == 0 || shard_tokens_ > kLlmcMaxShardTokens) {
      throw DataError("llm.c shards hold 1 to " + std::to_string(kLlmcMaxShardTokens) + " tokens, not " +
                      std::to_string(shard_tokens_));
    }
  }
  void append(std::span<const std::uint32_t> document) override {
    check_ids(dir_ + "/" + shard_name(split_, names_.size()), document, vocab_);
    while (!document.empty()) {
      if (!file_) open_shard();
      std::size_t take = std::min<std::uint64_t>(document.size(), shard_tokens_ - in_shard_);
      if (fits_u16(vocab_)) append_as<std::uint16_t>(*file_, document.first(take));
      else append_as<std::uint32_t>(*file_, document.first(take));
      in_shard_ += take;
      total_ += take;
      document = document.subspan(take);
      if (in_shard_ == shard_tokens_) close_shard();
    }
  }
  std::vector<std::string> finish() override {
    if (file_) close_shard();
    return names_;
  }
  std::uint64_t tokens() const override { return total_; }

 private:
  void open_shard() {
    file_ = std::make_unique<AtomicFile>(dir_ + "/" + shard_name(split_, names_.size()));
    std::int32_t header[kLlmcHeaderInts] = {};
    file_->write(header, sizeof(header));  // patched with the count on close
    in_shard_ = 0;
  }
  void close_shard() {
    std::int32_t header[3] = {kLlmcMagic, fits_u16(vocab_) ? 1 : 2, static_cast<std::int32_t>(in_shard_)};
    file_->write_at(0, header, sizeof(header));
    file_->commit();
    file_.reset();
    names_.push_back(shard_name(split_, names_.size()));
  }
  std::string dir_, split_;
  std::uint64_t vocab_, shard_tokens_;
  std::unique_ptr<AtomicFile> file_;
  std::uint64_t in_shard_ = 0, total_ = 0;
  std::vector<std::string> names_;
};

class NanoGptSink final : public TokenSink {
 public:
  NanoGptSink(const std::string& dir, const std::string& split, std::uint64_t vocab_size)
      : name_(split + ".bin"), vocab_(vocab_size), file_(dir + "/" + name_) {
    if (!fits_u16(vocab_size)) {
      throw DataError("nanoGPT's format stores uint16 tokens: a vocabulary of " + std::to_string(vocab_size) +
                      " needs --format llmc or megatron");
    }
  }
  void append(std::span<const std::uint32_t> document) override {
    check_ids(file_.path(), document, vocab_);
    append_as<std::uint16_t>(file_, document);
    total_ += document.size();
  }
  std::vector<std::string> finish() override {
    file_.commit();
    return {name_};
  }
  std::uint64_t tokens() const override { return total_; }

 private:
  std::string name_;
  std::uint64_t vocab_;
  AtomicFile file_;
  std::uint64_t total_ = 0;
};

class MegatronSink final : public TokenSink {
 public:
  MegatronSink(const std::string& dir, const std::string& split, std::uint64_t vocab_size)
      : prefix_(split + "_text_document"), dir_(dir), vocab_(vocab_size), bin_(dir + "/" + prefix_ + ".bin") {
    // Megatron's own choice: uint16 below 65500 ids, int32 above.
    wide_ = vocab_size >= 65500;
  }
  void append(std::span<const std::uint32_t> document) override {
    check_ids(bin_.path(), document, vocab_);
    if (document.size() > 0x7fffffffu) fail(bin_.path(), "document longer than 2^31 tokens");
    lengths_.push_back(static_cast<std::int32_t>(document.size()));
    if (wide_) append_as<std::uint32_t>(bin_, document);  // ids < 2^31, so int32 and uint32 agree
    else append_as<std::uint16_t>(bin_, document);
    total_ += document.size();
  }
  std::vector<std::string> finish() override {
    std::string idx;
    auto put = [&idx](const auto& v) { idx.append(reinterpret_cast<const char*>(&v), sizeof(v)); };
    idx.append(kMegatronMagic, sizeof(kMegatronMagic));
    put(std::uint64_t{1});
    put(std::uint8_t{static_cast<std::uint8_t>(wide_ ? 4 : 8)});
    put(std::uint64_t{lengths_.size()});
    put(std::uint64_t{lengths_.size() + 1});
    for (auto length : lengths_) put(length);
    std::int64_t pointer = 0;
    for (auto length : lengths_) {
      put(pointer);
      pointer += static_cast<std::int64_t>(length) * (wide_ ? 4 : 2);
    }
    for (std::size_t d = 0; d <= lengths_.size(); ++d) put(static_cast<std::int64_t>(d));  // one sequence per document
    bin_.commit();
    write_file_atomically(dir_ + "/" + prefix_ + ".idx", idx);
    return {prefix_ + ".bin", prefix_ + ".idx"};
  }
  std::uint64_t tokens() const override { return total_; }

 private:
  std::string prefix_, dir_;
  std::uint64_t vocab_;
  bool wide_ = false;
  AtomicFile bin_;
  std::vector<std::int32_t> lengths_;
  std::uint64_t total_ = 0;
};

}  // namespace

std::unique_ptr<TokenSink> make_token_sink(TokenFormat format, const std::string& dir, const std::string& split,
                                           std::uint64_t vocab_size, std::uint64_t shard_tokens) {
  if (vocab_size == 0 || vocab_size > 0x80000000ull) throw DataError("invalid vocabulary size " + std::to_string(vocab_size));
  switch (format) {
    case TokenFormat::llmc: return std::make_unique<LlmcSink>(dir, split, vocab_size, shard_tokens);
    case TokenFormat::nanogpt: return std::make_unique<NanoGptSink>(dir, split, vocab_size);
    case TokenFormat::megatron: return std::make_unique<MegatronSink>(dir, split, vocab_size);
  }
  return nullptr;
}

void write_llmc_file(const std::string& path, std::span<const std::uint32_t> tokens, std::uint64_t vocab_size) {
  if (tokens.size() > kLlmcMaxShardTokens) fail(path, "too many tokens for one llm.c shard");
  check_ids(path, tokens, vocab_size);
  AtomicFile file(path);
  std::int32_t header[kLlmcHeaderInts] = {};
  header[0] = kLlmcMagic;
  header[1] = fits_u16(vocab_size) ? 1 : 2;
  header[2] = static_cast<std::int32_t>(tokens.size());
  file.write(header, sizeof(header));
  if (fits_u16(vocab_size)) append_as<std::uint16_t>(file, tokens);
  else append_as<std::uint32_t>(file, tokens);
  file.commit();
}

}  // namespace nibble::data
