#include "nibble/data/prepare.h"

#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <exception>
#include <filesystem>
#include <regex>
#include <set>
#include <thread>

#include "nibble/data/error.h"
#include "nibble/data/file_io.h"
#include "nibble/data/utf8.h"

namespace nibble::data {

namespace fs = std::filesystem;

namespace {

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Names nibble prepare writes (any format); used to refuse or clean up an older output.
bool is_output_name(const std::string& name) {
  static const std::regex pattern(R"((train|val)(_\d{6}\.bin|\.bin|_text_document\.(bin|idx))|manifest\.json)");
  return std::regex_match(name, pattern);
}

// Removes the staging folder however prepare() ends.
struct StagingDir {
  fs::path path;
  ~StagingDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

bool printable_ascii(char c) { return c > ' ' && c < 0x7f; }

// Tokenizes a batch of documents with `threads` threads; result[i] = [eot] + ids of docs[i].
// Documents longer than `chunk_bytes` are cut at line starts into pieces that threads share, when
// the tokenizer guarantees that this changes no id (Tokenizer::splits_at_line_starts).
std::vector<std::vector<std::uint32_t>> encode_batch(const Tokenizer& tokenizer, const std::vector<std::string>& docs,
                                                     unsigned threads, std::size_t chunk_bytes) {
  struct Piece {
    std::size_t doc;
    std::string_view text;
  };
  std::vector<Piece> pieces;
  for (std::size_t d = 0; d < docs.size(); ++d) {
    std::string_view rest(docs[d]);
    while (tokenizer.splits_at_line_starts() && rest.size() > chunk_bytes) {
      std::size_t cut = rest.find('\n', chunk_bytes);
      while (cut != std::string_view::npos &&
             !(cut > 0 && cut + 1 < rest.size() && printable_ascii(rest[cut - 1]) && printable_ascii(rest[cut + 1]))) {
        cut = rest.find('\n', cut + 1);
      }
      if (cut == std::string_view::npos) break;
      pieces.push_back({d, rest.substr(0, cut + 1)});
      rest.remove_prefix(cut + 1);
    }
    pieces.push_back({d, rest});
  }
  std::vector<std::vector<std::uint32_t>> piece_ids(pieces.size());
  std::atomic<std::size_t> next{0};
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  auto work = [&] {
    try {
      for (std::size_t i = next++; i < pieces.size() && !failed; i = next++) {
        piece_ids[i].reserve(pieces[i].text.size() / 3 + 1);
        tokenizer.encode(pieces[i].text, piece_ids[i]);
      }
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
  };
  unsigned n = std::max(1u, std::min<unsigned>(threads, static_cast<unsigned>(pieces.size())));
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < n; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);

  std::vector<std::vector<std::uint32_t>> result(docs.size());
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    auto& ids = result[pieces[i].doc];
    if (ids.empty()) ids.push_back(tokenizer.eot_id());
    ids.insert(ids.end(), piece_ids[i].begin(), piece_ids[i].end());
  }
  return result;
}

double process_cpu_seconds() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  auto seconds = [](const timeval& t) { return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) * 1e-6; };
  return seconds(usage.ru_utime) + seconds(usage.ru_stime);
}

}  // namespace

bool is_validation_document(std::uint64_t seed, std::uint64_t document, double val_fraction) {
  if (val_fraction <= 0) return false;
  std::uint64_t h = splitmix64(splitmix64(seed) ^ document);
  return static_cast<double>(h >> 11) * 0x1.0p-53 < val_fraction;
}

PrepareResult prepare(const PrepareOptions& options, const Tokenizer& tokenizer,
                      const std::function<void(const PrepareProgress&)>& progress) {
  const auto started = std::chrono::steady_clock::now();
  const double cpu_started = process_cpu_seconds();
  auto elapsed = [&started] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count(); };
  if (!(options.val_fraction >= 0 && options.val_fraction < 1)) {
    throw DataError("--val-fraction must be in [0, 1), not " + std::to_string(options.val_fraction));
  }
  if (options.output_dir.empty()) throw DataError("no output directory");
  const auto inputs = list_inputs(options.inputs, options.include);

  // Refuse to mix with an older output unless asked to replace it.
  const fs::path out_dir(options.output_dir);
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) fail(options.output_dir, "cannot create the output directory: " + ec.message());
  std::vector<std::string> old_outputs;
  for (const auto& entry : fs::directory_iterator(out_dir)) {
    if (is_output_name(entry.path().filename().string())) old_outputs.push_back(entry.path().filename().string());
  }
  if (!old_outputs.empty() && !options.force) {
    fail(options.output_dir, "already holds prepared data (" + old_outputs.front() + ", ...); pass --force to replace it");
  }

  StagingDir staging{out_dir / (".nibble-prepare-" + std::to_string(::getpid()))};
  fs::remove_all(staging.path, ec);
  fs::create_directory(staging.path, ec);
  if (ec) fail(staging.path.string(), "cannot create the staging directory: " + ec.message());

  const std::uint32_t vocab = tokenizer.vocab_size();
  auto train = make_token_sink(options.format, staging.path.string(), "train", vocab, options.shard_tokens);
  std::unique_ptr<TokenSink> val;
  if (options.val_fraction > 0) val = make_token_sink(options.format, staging.path.string(), "val", vocab, options.shard_tokens);
  const unsigned threads = options.threads != 0 ? options.threads : std::max(1u, std::thread::hardware_concurrency());

  PrepareProgress state;
  state.files_total = inputs.size();
  nlohmann::json sources = nlohmann::json::array();
  nlohmann::json skipped = nlohmann::json::array();
  std::uint64_t document = 0, train_docs = 0, val_docs = 0;
  // The last train document is held back: if no document drew the validation coin, it becomes
  // the validation split, so that a small corpus still gets one.
  std::vector<std::uint32_t> held;
  bool holding = false;

  std::vector<std::string> batch;
  std::size_t batch_bytes = 0;
  constexpr std::size_t kBatchBytes = 8u << 20;
  auto flush = [&] {
    auto encoded = encode_batch(tokenizer, batch, threads, options.chunk_bytes);
    for (auto& ids : encoded) {
      state.tokens += ids.size();
      if (is_validation_document(options.seed, document++, options.val_fraction)) {
        val->append(ids);
        ++val_docs;
      } else {
        if (holding) train->append(held);
        held = std::move(ids);
        holding = true;
        ++train_docs;
      }
    }
    batch.clear();
    batch_bytes = 0;
    state.seconds = elapsed();
    if (progress) progress(state);
  };

  for (const auto& input : inputs) {
    std::string text = read_text_file(input.path);
    if (text.empty()) {
      if (input.named) fail(input.path, "empty file");
      skipped.push_back(input.path);  // an empty file inside a corpus folder is not an error
      ++state.files_done;
      continue;
    }
    std::size_t replaced = 0;
    if (options.replace_invalid_utf8) {
      replaced = replace_invalid_utf8(text);
    } else if (std::size_t bad = find_invalid_utf8(text); bad != kValidUtf8) {
      fail_at(input.path, bad, "invalid UTF-8 (offset in the decompressed text; --invalid-utf8 replace substitutes U+FFFD)");
    }
    std::size_t before = batch.size();
    split_documents(input.path, text, options.split, options.jsonl_field, batch);
    std::uint64_t docs_here = batch.size() - before;
    for (std::size_t i = before; i < batch.size(); ++i) batch_bytes += batch[i].size();
    sources.push_back({{"path", input.path}, {"bytes", text.size()}, {"documents", docs_here}});
    if (replaced != 0) sources.back()["invalid_utf8_bytes_replaced"] = replaced;
    state.text_bytes += text.size();
    ++state.files_done;
    if (batch_bytes >= kBatchBytes) flush();
  }
  if (!batch.empty()) flush();
  if (!holding && val_docs == 0) throw DataError("the inputs hold no text (only empty or blank documents)");
  if (!holding) throw DataError("every document went to the validation split; lower --val-fraction");

  if (val && val->tokens() == 0) {
    if (train_docs > 1) {
      val->append(held);  // the last document becomes the validation split
      --train_docs;
      ++val_docs;
    } else {
      // One document in all: its tail is the validation split, behind its own separator.
      std::size_t n = held.size();
      std::size_t tail = std::max<std::size_t>(1, static_cast<std::size_t>(std::ceil(options.val_fraction * static_cast<double>(n))));
      if (n < 3 || tail + 2 > n) throw DataError("the corpus is too small to hold out a validation split");
      std::vector<std::uint32_t> val_ids{tokenizer.eot_id()};
      val_ids.insert(val_ids.end(), held.end() - static_cast<std::ptrdiff_t>(tail), held.end());
      held.resize(n - tail);
      train->append(held);
      val->append(val_ids);
      state.tokens += 1;
      val_docs = 1;
    }
  } else {
    train->append(held);
  }

  nlohmann::json splits;
  std::vector<std::string> written;
  auto finish = [&](const char* name, TokenSink& sink, std::uint64_t docs) {
    auto files = sink.finish();
    written.insert(written.end(), files.begin(), files.end());
    splits[name] = {{"documents", docs}, {"tokens", sink.tokens()}, {"files", files}};
  };
  finish("train", *train, train_docs);
  if (val) finish("val", *val, val_docs);

  nlohmann::json tokenizer_json = options.tokenizer_info.is_object() ? options.tokenizer_info : nlohmann::json::object();
  tokenizer_json["name"] = tokenizer.name();
  tokenizer_json["vocab_size"] = vocab;
  tokenizer_json["eot_id"] = tokenizer.eot_id();
  const bool narrow = options.format == TokenFormat::megatron ? vocab < 65500 : vocab <= 65536;
  PrepareResult result;
  result.seconds = elapsed();
  result.cpu_seconds = process_cpu_seconds() - cpu_started;
  result.text_bytes = state.text_bytes;
  result.tokens = train->tokens() + (val ? val->tokens() : 0);
  result.manifest = {
      {"format", format_name(options.format)},
      {"token_dtype", narrow ? "uint16" : (options.format == TokenFormat::megatron ? "int32" : "uint32")},
      {"tokenizer", tokenizer_json},
      {"document_split", document_split_name(options.split)},
      {"separator", "end-of-text token before every document"},
      {"seed", options.seed},
      {"val_fraction", options.val_fraction},
      {"shard_tokens", options.shard_tokens},
      {"splits", splits},
      {"text_bytes", state.text_bytes},
      {"sources", sources},
      {"skipped_empty_files", skipped},
  };

  // Move the new files in, drop what is left of an older output, then the manifest last: a
  // manifest always describes files that are all there.
  std::set<std::string> fresh(written.begin(), written.end());
  for (const auto& name : written) {
    fs::rename(staging.path / name, out_dir / name, ec);
    if (ec) fail((out_dir / name).string(), "cannot move into place: " + ec.message());
  }
  for (const auto& name : old_outputs) {
    if (!fresh.count(name)) fs::remove(out_dir / name, ec);
  }
  write_file_atomically((out_dir / kManifestName).string(), result.manifest.dump(2) + "\n");
  return result;
}

}  // namespace nibble::data
