// Where a training step's arithmetic runs. The training loop (trainer.h) drives an Engine; the
// host model and optimizer stay the home of the run's state for checkpoints, and an engine that
// computes elsewhere (the GPU) copies its state there on to_host() and back on from_host().
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "nibble/model/gpt.h"
#include "nibble/train/optimizer.h"
#include "nibble/train/step_rule.h"

namespace nibble::train {

// What a step gave: each micro-batch's mean loss, in order, and the gradient norm.
struct StepOutcome {
  std::vector<double> losses;
  double grad_norm = 0.0;
  bool updated = false;  // false: the update was skipped (the loss or the norm not finite)
  // How long finish_step() waited for a device that computes elsewhere (the GPU), -1 where none does:
  // what the host was ahead of the device by at the step's end. Near 0, the host's enqueuing limited
  // the step. (Not counted: a wait within the step, which the token staging makes from a step's
  // fourth micro-batch on, when the host is three micro-batches ahead.)
  double device_wait_s = -1.0;
};

// step_rule.h's step_loss over a step's outcome.
inline double step_loss(std::span<const double> losses) {
  return step_loss(losses.data(), static_cast<int64_t>(losses.size()));
}

// A step is enqueued whole (zero_grad, forward_backward for each micro-batch, update) and then
// finish_step() waits for it: an engine that computes elsewhere (the GPU) needs no host round trip
// within the step, and the host prepares the next batch meanwhile.
class Engine {
 public:
  virtual ~Engine() = default;
  virtual std::string device() const = 0;  // "cpu", or the GPU's name
  virtual void set_bf16_everywhere(bool on) = 0;
  virtual void zero_grad() = 0;
  // One micro-batch: forward and backward at (step, microbatch), gradients accumulated with
  // grad_scale; its mean loss comes back in finish_step()'s outcome. Micro-batches of a step are
  // numbered from 0 and run in order, each once, after the step's zero_grad(): an engine may have
  // micro-batch 0 write gradients instead of adding them to zeros (CudaEngine).
  virtual void forward_backward(uint64_t step, uint32_t microbatch, std::span<const uint32_t> inputs,
                                std::span<const uint32_t> targets, int64_t batch, int64_t seq, float grad_scale) = 0;
  // The update after the step's micro-batches: the gradient norm, then AdamW at lr with the
  // gradients times min(1, grad_clip / norm) (grad_clip 0: no clipping), unless the step's loss
  // (step_loss) or the norm is not finite: then nothing changes.
  virtual void update(double lr, double grad_clip) = 0;
  // Waits for the step; throws for a token id outside the vocabulary.
  virtual StepOutcome finish_step() = 0;
  // The mean loss of a batch, forward only (waits for it).
  virtual double loss(std::span<const uint32_t> inputs, std::span<const uint32_t> targets, int64_t batch,
                      int64_t seq) = 0;
  virtual void to_host() {}    // the host model and optimizer now hold the engine's state
  virtual void from_host() {}  // the engine now holds the host model's and optimizer's state
  // Memory: the process's peak RSS on the CPU; on a GPU the most device memory seen in use
  // (cudaMemGetInfo: the whole device, so the CUDA context and any other process count too).
  virtual double memory_mib() = 0;
  // Dense BF16 peak of the device in FLOP/s for model FLOPs utilisation (0: not reported).
  virtual double peak_flops() const { return 0.0; }
};

// The CPU engine: the host model and optimizer themselves.
std::unique_ptr<Engine> make_cpu_engine(model::Gpt& model, AdamW& optimizer);

}  // namespace nibble::train
