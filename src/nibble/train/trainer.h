// The training loop: micro-batches from the data layer's window sampler, forward/backward with
// gradient accumulation, global-norm clipping, AdamW under a learning-rate schedule, the late switch
// to bf16, validation, metrics, checkpoints and exact resume.
//
// Reproducibility: a run is a function of (model config, recipe, options, data, seed). The seed
// keys the weight initialization, the sampler's shuffle and the recipe's stochastic rounding (whose
// draws depend only on seed, layer, step and micro-batch), so resuming from a checkpoint repeats the
// uninterrupted run's losses bit for bit on the same machine and thread count.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "nibble/data/sampler.h"
#include "nibble/model/config.h"
#include "nibble/model/gpt.h"
#include "nibble/nn/recipe.h"
#include "nibble/train/engine.h"
#include "nibble/train/metrics.h"
#include "nibble/train/optimizer.h"
#include "nibble/train/schedule.h"

namespace nibble::train {

class TrainError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct TrainOptions {
  std::filesystem::path out_dir;
  int64_t steps = 0;        // optimizer steps of the whole run
  int64_t batch_size = 8;   // sequences per micro-batch
  int64_t grad_accum = 1;   // micro-batches per step
  int64_t seq_len = 0;      // 0: the model's seq_len
  LrSchedule schedule;      // `total` is set to `steps`
  AdamWOptions adamw;
  double grad_clip = 1.0;   // global-norm clipping threshold; 0 turns clipping off
  uint64_t seed = 1337;
  int64_t val_every = 0;    // 0: validate only at the end (when there is validation data)
  int64_t val_batches = 8;
  int64_t ckpt_every = 0;   // 0: checkpoint only at the end
  int keep_checkpoints = 3;
  bool resume = false;      // continue from the newest checkpoint in out_dir
  bool skip_nonfinite = false;  // skip a step with a non-finite loss or gradient instead of stopping
  int64_t stop_after = 0;   // stop after this many steps of this invocation (0: run to `steps`)
  Progress::Mode progress = Progress::Mode::kAuto;
  int64_t log_every = 10;   // plain progress lines every this many steps
  // When set (e.g. by a SIGINT handler), the run stops after the current step with a checkpoint.
  const std::atomic<bool>* stop_requested = nullptr;
  // Called at the start of every step, before the forward passes (tests use it to inject faults).
  // It sees the host model: on the CPU engine that is the model being trained.
  std::function<void(int64_t step, model::Gpt& model)> on_step_start;
  // Where the arithmetic runs: given the host model and optimizer (holding the initial or resumed
  // state), an Engine; unset means the CPU (make_cpu_engine). The CLI sets a CUDA engine for --device cuda.
  std::function<std::unique_ptr<Engine>(model::Gpt& model, AdamW& optimizer)> make_engine;

  nlohmann::json to_json() const;
};

struct StepRecord {
  int64_t step = 0;  // 1-based: steps completed after this one
  double loss = 0, lr = 0, grad_norm = 0;
  bool skipped = false;
};

struct TrainResult {
  std::vector<StepRecord> steps;                   // of this invocation
  std::vector<std::pair<int64_t, double>> val;     // (step, validation loss)
  int64_t start_step = 0, end_step = 0;
  std::optional<std::filesystem::path> last_checkpoint;
};

// Trains (or resumes) a run in options.out_dir. Throws TrainError for unusable options, a run
// directory that already holds a run (without resume), or a non-finite loss/gradient (naming the
// step; the last good checkpoint stays as it was).
TrainResult train(const model::GptConfig& config, const nn::Recipe& recipe, const data::TokenDataset& train_data,
                  const data::TokenDataset* val_data, const TrainOptions& options);

}  // namespace nibble::train
