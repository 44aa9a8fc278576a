// `nibble train`: trains a GPT from a model config and a recipe on prepared token data (see
// src/nibble/train/trainer.h and README.md "Training").
#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "nibble/cli/commands.h"
#include "nibble/data/sampler.h"
#include "nibble/model/config.h"
#include "nibble/nn/recipe.h"
#include "nibble/train/trainer.h"
#ifdef NIBBLE_HAVE_CUDA
#include "nibble/train/cuda/engine_cuda.h"
#endif

namespace nibble::cli {
namespace {

struct TrainArgs {
  std::string config;
  std::string recipe = "nvfp4";
  std::vector<std::string> recipe_set;
  std::vector<std::string> data, val_data;
  std::string out;
  int64_t steps = 0, batch_size = 8, grad_accum = 1, seq_len = 0;
  double lr = 6e-4, min_lr = -1;
  int64_t warmup = -1, decay_steps = -1;
  std::string schedule = "cosine";
  float weight_decay = 0.1f, beta1 = 0.9f, beta2 = 0.95f;
  double grad_clip = 1.0;
  uint64_t seed = 1337;
  int64_t val_every = 0, val_batches = 8, ckpt_every = 0, log_every = 10;
  int keep = 3;
  bool resume = false, skip_nonfinite = false;
  std::string progress = "auto";
  std::string device = "cpu";
  std::string fp4_gemm = "decode";
  std::string gelu = "gemm";
};

// Ctrl-C asks the trainer to checkpoint and stop after the current step; a second one kills.
std::atomic<bool> g_stop{false};
static_assert(std::atomic<bool>::is_always_lock_free, "set from a signal handler");
extern "C" void on_interrupt(int) {
  g_stop.store(true);
  std::signal(SIGINT, SIG_DFL);
}

// A directory written by `nibble prepare` (it has manifest.json), else token files of other tools.
data::TokenDataset open_data(const std::vector<std::string>& paths, const std::string& split, uint64_t vocab) {
  if (paths.size() == 1 && std::filesystem::is_directory(paths[0])) {
    if (!std::filesystem::exists(std::filesystem::path(paths[0]) / "manifest.json"))
      throw std::runtime_error(paths[0] + ": a directory without manifest.json (prepare it with `nibble prepare`, "
                               "or pass the token files themselves)");
    return data::TokenDataset::open_prepared(paths[0], split);
  }
  return data::TokenDataset::open_files(paths, std::nullopt, vocab);
}

void run_train(const TrainArgs& a) {
  const model::GptConfig config = model::load_gpt_config(a.config);
  const nn::Recipe recipe = nn::make_recipe(a.recipe, a.recipe_set);

  train::TrainOptions o;
  o.out_dir = a.out;
  o.steps = a.steps;
  o.batch_size = a.batch_size;
  o.grad_accum = a.grad_accum;
  o.seq_len = a.seq_len;
  o.schedule.kind = train::parse_schedule_kind(a.schedule);
  o.schedule.max_lr = a.lr;
  o.schedule.min_lr = a.min_lr >= 0 ? a.min_lr : a.lr / 10;
  o.schedule.warmup = a.warmup >= 0 ? a.warmup : std::min<int64_t>(a.steps / 10, 700);
  o.schedule.decay = a.decay_steps >= 0 ? a.decay_steps : a.steps / 5;
  o.adamw = {a.beta1, a.beta2, 1e-8f, a.weight_decay};
  o.grad_clip = a.grad_clip;
  o.seed = a.seed;
  o.val_every = a.val_every;
  o.val_batches = a.val_batches;
  o.ckpt_every = a.ckpt_every;
  o.keep_checkpoints = a.keep;
  if (a.fp4_gemm != "decode" && a.device != "cuda")
    throw std::runtime_error("--fp4-gemm " + a.fp4_gemm + " needs --device cuda (the CPU's GEMMs are FP32 emulation)");
  if (a.gelu != "gemm" && a.device != "cuda")
    throw std::runtime_error("--gelu " + a.gelu + " needs --device cuda (the CPU computes the GELU on its own)");
  if (a.device == "cuda") {
#ifdef NIBBLE_HAVE_CUDA
    const uint64_t run_seed = a.seed;
    const train::cuda::CudaEngineOptions engine_options{a.fp4_gemm == "packed", a.gelu == "gemm"};
    o.make_engine = [run_seed, engine_options](model::Gpt& model, train::AdamW& optimizer) {
      return train::cuda::make_cuda_engine(model, optimizer, run_seed, engine_options);
    };
#else
    throw std::runtime_error("--device cuda: this nibble was built without CUDA (configure with the cuda preset)");
#endif
  }
  o.resume = a.resume;
  o.skip_nonfinite = a.skip_nonfinite;
  o.log_every = a.log_every;
  o.progress = a.progress == "live"    ? train::Progress::Mode::kTerminal
               : a.progress == "plain" ? train::Progress::Mode::kPlain
               : a.progress == "quiet" ? train::Progress::Mode::kQuiet
                                       : train::Progress::Mode::kAuto;

  const data::TokenDataset train_data = open_data(a.data, "train", static_cast<uint64_t>(config.vocab_size));
  std::unique_ptr<data::TokenDataset> val_data;
  if (!a.val_data.empty()) {
    val_data = std::make_unique<data::TokenDataset>(open_data(a.val_data, "val", static_cast<uint64_t>(config.vocab_size)));
  } else if (a.data.size() == 1 && std::filesystem::is_directory(a.data[0])) {
    try {
      val_data = std::make_unique<data::TokenDataset>(data::TokenDataset::open_prepared(a.data[0], "val"));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "train: no validation split (%s); training without validation\n", e.what());
    }
  }

  const int64_t seq = a.seq_len > 0 ? a.seq_len : config.seq_len;
  std::fprintf(stderr, "train: %s, %.2fM parameters, recipe %s\ntrain: %lld steps x %lld tokens (batch %lld x seq %lld x accum %lld) -> %s\n",
               config.name.c_str(), static_cast<double>(config.parameter_count()) / 1e6, nn::describe(recipe).c_str(),
               static_cast<long long>(a.steps), static_cast<long long>(a.batch_size * seq * a.grad_accum),
               static_cast<long long>(a.batch_size), static_cast<long long>(seq), static_cast<long long>(a.grad_accum),
               a.out.c_str());
  g_stop.store(false);
  o.stop_requested = &g_stop;
  struct SigintGuard {
    void (*previous)(int) = std::signal(SIGINT, on_interrupt);
    ~SigintGuard() { std::signal(SIGINT, previous); }
  } guard;
  const train::TrainResult r = train::train(config, recipe, train_data, val_data.get(), o);
  if (!r.steps.empty())
    std::fprintf(stderr, "train: done at step %lld, loss %.4f%s%s\n", static_cast<long long>(r.end_step),
                 r.steps.back().loss, r.last_checkpoint ? ", checkpoint " : "",
                 r.last_checkpoint ? r.last_checkpoint->string().c_str() : "");
}

}  // namespace

void add_train_command(CLI::App& app) {
  auto args = std::make_shared<TrainArgs>();
  CLI::App* cmd = app.add_subcommand("train", "Train a GPT from a model config and a recipe on token data");
  cmd->add_option("--config", args->config, "Model config (configs/models/*.toml)")->required()->check(CLI::ExistingFile);
  cmd->add_option("--recipe", args->recipe, "Recipe preset (fp32, bf16, fp8, fp8_hybrid, nvfp4, mxfp4) or a .toml file")
      ->capture_default_str();
  cmd->add_option("--recipe-set", args->recipe_set, "Recipe override: an ablation (no_rht, no_2d, no_sr) or key=value");
  cmd->add_option("--data", args->data, "A directory from `nibble prepare`, or token files (llm.c, nanoGPT, Megatron)")
      ->required();
  cmd->add_option("--val-data", args->val_data, "Validation token files (default: the prepared directory's val split)");
  cmd->add_option("--out", args->out, "Run directory (metrics.jsonl, checkpoints/)")->required();
  cmd->add_option("--steps", args->steps, "Optimizer steps of the whole run")->required()->check(CLI::PositiveNumber);
  cmd->add_option("--batch-size", args->batch_size, "Sequences per micro-batch")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--grad-accum", args->grad_accum, "Micro-batches per step")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--seq-len", args->seq_len, "Tokens per sequence (default: the model's seq_len)");
  cmd->add_option("--lr", args->lr, "Peak learning rate")->capture_default_str();
  cmd->add_option("--min-lr", args->min_lr, "Final learning rate (default: lr / 10)");
  cmd->add_option("--warmup", args->warmup, "Warmup steps (default: steps / 10, at most 700)");
  cmd->add_option("--schedule", args->schedule, "cosine, wsd (warmup-stable-decay) or constant")
      ->capture_default_str()->check(CLI::IsMember({"cosine", "wsd", "constant"}));
  cmd->add_option("--decay-steps", args->decay_steps, "wsd: steps of the final decay (default: steps / 5)");
  cmd->add_option("--weight-decay", args->weight_decay, "AdamW decoupled weight decay (not on norms)")->capture_default_str();
  cmd->add_option("--beta1", args->beta1, "AdamW beta1")->capture_default_str();
  cmd->add_option("--beta2", args->beta2, "AdamW beta2")->capture_default_str();
  cmd->add_option("--grad-clip", args->grad_clip, "Clip the global gradient norm to this (0: off)")->capture_default_str();
  cmd->add_option("--seed", args->seed, "Run seed (initialization, data order, stochastic rounding)")->capture_default_str();
  cmd->add_option("--val-every", args->val_every, "Validation loss every N steps (0: at the end only)")->capture_default_str();
  cmd->add_option("--val-batches", args->val_batches, "Batches per validation")->capture_default_str();
  cmd->add_option("--ckpt-every", args->ckpt_every, "Checkpoint every N steps (0: at the end only)")->capture_default_str();
  cmd->add_option("--keep", args->keep, "Checkpoints to keep (0: all)")->capture_default_str();
  cmd->add_option("--device", args->device, "Where to train: cpu, or cuda (one GPU)")
      ->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--fp4-gemm", args->fp4_gemm,
                  "NVFP4 GEMMs on a Hopper GPU: decode (operands decoded to BF16, cuBLASLt) or packed (nibble's "
                  "GEMM reads the 4.5-bit operands; experimental, slower so far). Blackwell runs them natively")
      ->capture_default_str()->check(CLI::IsMember({"decode", "packed"}));
  cmd->add_option("--gelu", args->gelu,
                  "The MLP's GELU on a GPU: gemm (in the epilogues of the GEMMs around it, cuBLASLt, where their "
                  "operands are BF16 or decoded FP4) or kernel (separate passes over memory)")
      ->capture_default_str()->check(CLI::IsMember({"gemm", "kernel"}));
  cmd->add_flag("--resume", args->resume, "Continue the run in --out from its newest checkpoint");
  cmd->add_flag("--skip-nonfinite", args->skip_nonfinite, "Skip steps whose loss or gradient is not finite instead of stopping");
  cmd->add_option("--log-every", args->log_every, "Plain progress lines every N steps")->capture_default_str();
  cmd->add_option("--progress", args->progress, "auto (live line on a terminal, plain lines otherwise), live, plain, quiet")
      ->capture_default_str()->check(CLI::IsMember({"auto", "live", "plain", "quiet"}));
  cmd->callback([args] { run_train(*args); });
}

}  // namespace nibble::cli
