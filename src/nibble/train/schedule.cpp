#include "nibble/train/schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <stdexcept>

namespace nibble::train {

ScheduleKind parse_schedule_kind(std::string_view name) {
  if (name == "cosine") return ScheduleKind::kCosine;
  if (name == "wsd") return ScheduleKind::kWsd;
  if (name == "constant") return ScheduleKind::kConstant;
  throw std::invalid_argument("unknown learning-rate schedule '" + std::string(name) +
                              "' (expected cosine, wsd or constant)");
}

const char* schedule_kind_name(ScheduleKind k) {
  switch (k) {
    case ScheduleKind::kCosine: return "cosine";
    case ScheduleKind::kWsd: return "wsd";
    case ScheduleKind::kConstant: return "constant";
  }
  return "?";
}

void LrSchedule::validate() const {
  if (!(max_lr > 0.0) || !std::isfinite(max_lr)) throw std::invalid_argument("learning rate must be positive and finite");
  if (!(min_lr >= 0.0) || min_lr > max_lr) throw std::invalid_argument("min_lr must be in [0, lr]");
  if (total <= 0) throw std::invalid_argument("the schedule needs a positive number of steps");
  if (warmup < 0 || warmup > total) throw std::invalid_argument("warmup must be in [0, steps]");
  if (kind == ScheduleKind::kWsd && (decay < 0 || warmup + decay > total))
    throw std::invalid_argument("wsd decay steps must be in [0, steps - warmup]");
}

double LrSchedule::at(int64_t step) const {
  if (step < warmup) return max_lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const int64_t last = total - 1;
  switch (kind) {
    case ScheduleKind::kConstant:
      return max_lr;
    case ScheduleKind::kCosine: {
      if (last <= warmup) return max_lr;
      const double t = std::clamp(static_cast<double>(step - warmup) / static_cast<double>(last - warmup), 0.0, 1.0);
      return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + std::cos(std::numbers::pi * t));
    }
    case ScheduleKind::kWsd: {
      const int64_t decay_start = total - decay;
      if (step < decay_start || decay == 0) return max_lr;
      const double t = std::clamp(static_cast<double>(step - decay_start + 1) / static_cast<double>(decay), 0.0, 1.0);
      return max_lr + (min_lr - max_lr) * t;
    }
  }
  return max_lr;
}

}  // namespace nibble::train
