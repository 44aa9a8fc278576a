// Learning-rate schedules, as functions of the optimizer step (0-based):
//   cosine    linear warmup from max_lr/warmup to max_lr over `warmup` steps, then a half cosine
//             down to min_lr at step `total - 1`
//   wsd       warmup-stable-decay: the same warmup, max_lr until the last `decay` steps, then a
//             linear decay to min_lr at step `total - 1`
//   constant  the same warmup, then max_lr
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace nibble::train {

enum class ScheduleKind : uint8_t { kCosine, kWsd, kConstant };
ScheduleKind parse_schedule_kind(std::string_view name);  // throws std::invalid_argument
const char* schedule_kind_name(ScheduleKind k);

struct LrSchedule {
  ScheduleKind kind = ScheduleKind::kCosine;
  double max_lr = 6e-4;
  double min_lr = 6e-5;
  int64_t warmup = 0;
  int64_t total = 1;
  int64_t decay = 0;  // wsd only

  void validate() const;  // throws std::invalid_argument naming the field
  double at(int64_t step) const;
};

}  // namespace nibble::train
