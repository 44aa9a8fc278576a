// The decisions a training step makes from its results, written once for the CPU engine and the
// GPU's step_control kernel (train/cuda/adamw_cuda.h), so that both decide alike.
#pragma once

#include <cstdint>

#include "nibble/formats/host_device.h"

namespace nibble::train {

// The step's loss as the trainer reports it: each micro-batch's loss / their count, added in order.
NIBBLE_HD double step_loss(const double* losses, int64_t count) {
  double loss = 0.0;
  for (int64_t i = 0; i < count; ++i) loss += losses[i] / static_cast<double>(count);
  return loss;
}

// The gradients' factor under global-norm clipping: min(1, grad_clip / norm); 1 with clipping off
// (grad_clip 0).
NIBBLE_HD float clip_multiplier(double grad_clip, double norm) {
  return grad_clip > 0 && norm > grad_clip ? static_cast<float>(grad_clip / norm) : 1.0f;
}

}  // namespace nibble::train
