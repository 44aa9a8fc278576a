// Checkpoints: RUN_DIR/checkpoints/step_00000100/ holds
//   model.safetensors      the FP32 master weights under their parameter names (readable by any
//                          safetensors tool; metadata: the model config and recipe as TOML)
//   optimizer.safetensors  AdamW's moments and step count
//   state.json             steps done, data position, seeds, the late bf16 switch, config, recipe
// A checkpoint is written into a hidden temporary folder and renamed into place only when complete,
// so a crash leaves either the old set of checkpoints or the new one; the last `keep` are kept.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "nibble/data/sampler.h"
#include "nibble/model/gpt.h"
#include "nibble/train/optimizer.h"

namespace nibble::train {

struct CheckpointState {
  int64_t step = 0;  // optimizer steps completed
  data::SamplerPosition data_position;
  uint64_t seed = 0;  // the run seed: with `step` it determines every random draw still to come
  bool bf16_everywhere = false;
  nlohmann::json options;  // the training options, for the record and for resume checks
};

inline constexpr const char* kCheckpointsDir = "checkpoints";

// Writes the checkpoint of state.step and removes all but the newest `keep` (keep <= 0: keep all).
// Returns its folder.
std::filesystem::path save_checkpoint(const std::filesystem::path& run_dir, model::Gpt& model, const AdamW& optimizer,
                                      const CheckpointState& state, int keep);

// The newest complete checkpoint of a run, if any.
std::optional<std::filesystem::path> latest_checkpoint(const std::filesystem::path& run_dir);

// Loads weights and optimizer state into an already constructed model (whose config must equal the
// checkpoint's) and returns the rest. Throws std::runtime_error naming the file and the problem.
CheckpointState load_checkpoint(const std::filesystem::path& checkpoint_dir, model::Gpt& model, AdamW& optimizer);

}  // namespace nibble::train
