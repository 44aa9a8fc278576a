// Where a training step's arithmetic runs. The training loop (trainer.h) drives an Engine; the
// host model and optimizer stay the home of the run's state for checkpoints, and an engine that
// computes elsewhere (the GPU) copies its state there on to_host() and back on from_host().
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "nibble/model/gpt.h"
#include "nibble/train/optimizer.h"

namespace nibble::train {

class Engine {
 public:
  virtual ~Engine() = default;
  virtual std::string device() const = 0;  // "cpu", or the GPU's name
  virtual void set_bf16_everywhere(bool on) = 0;
  virtual void zero_grad() = 0;
  // One micro-batch: forward and backward at (step, microbatch), gradients accumulated with
  // grad_scale; returns the mean loss.
  virtual double forward_backward(uint64_t step, uint32_t microbatch, std::span<const uint32_t> inputs,
                                  std::span<const uint32_t> targets, int64_t batch, int64_t seq, float grad_scale) = 0;
  virtual double loss(std::span<const uint32_t> inputs, std::span<const uint32_t> targets, int64_t batch,
                      int64_t seq) = 0;
  virtual double grad_norm() = 0;
  // AdamW with the gradients times grad_multiplier (the clipping factor).
  virtual void update(double lr, float grad_multiplier) = 0;
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
