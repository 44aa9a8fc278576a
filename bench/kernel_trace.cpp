// A CUDA injection library that times every kernel a program launches (and its memsets and copies,
// listed as "[memset 8 B]" (by size), "[memcpy HtoD]", ...), at the clocks it runs at:
// CUPTI's activity records (the source torch.profiler reads), unlike ncu, which serialises the
// kernels and lets the clocks drop between them. Nothing in the program changes:
//   CUDA_INJECTION64_PATH=build/cuda/bench/libnibble_kernel_trace.so NIBBLE_KERNEL_TRACE=trace.tsv
//       nibble train --device cuda ... --steps 11
// At exit it writes trace.tsv: a header with the kernels' span (first start to last end) and busy
// time (the union of their intervals), the same two over the window from the first to the last
// launch of the kernel NIBBLE_KERNEL_TRACE_WINDOW names (default adamw_kernel: the optimizer ends
// each step, so the window holds all steps but the first, without start-up and shutdown; what it
// does not cover is the GPU idle between kernels), then per kernel name the total ms and the
// launches, largest first. Lines "# gap" list the largest idle stretches in the window, summed by
// the kernels on either side of them. bench/kernel_breakdown.py groups it by class;
// its --minus takes a shorter run of the same command (--steps 1), so that the difference over the
// extra steps is the steady per-step time without the one-time costs.
#include <cupti.h>

#include <cxxabi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace {

struct Interval {
  uint64_t start, end;
  bool marks_window;  // a launch of the window's kernel
  int name;           // index into names
};

std::mutex lock;
std::map<std::string, std::pair<double, long>> totals;  // name -> (ns, launches)
std::vector<Interval> intervals;
std::vector<std::string> names;
std::map<std::string, int> name_ids;
bool failed = false;
std::string window_kernel = "adamw_kernel";

void check(CUptiResult r, const char* what) {
  if (r == CUPTI_SUCCESS) return;
  const char* text = nullptr;
  cuptiGetResultString(r, &text);
  std::fprintf(stderr, "nibble kernel trace: %s failed: %s\n", what, text ? text : "unknown error");
  failed = true;
}

std::string demangled(const char* name) {
  int status = 0;
  char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string out = status == 0 && d != nullptr ? d : name;
  std::free(d);
  return out;
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *size = 8 << 20;
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, *size));
  *max_records = 0;
}

void add_interval(const std::string& name, uint64_t start, uint64_t end) {
  auto& t = totals[name];
  t.first += static_cast<double>(end - start);
  t.second += 1;
  const auto [it, added] = name_ids.try_emplace(name, static_cast<int>(names.size()));
  if (added) names.push_back(name);
  intervals.push_back({start, end, name.find(window_kernel) != std::string::npos, it->second});
}

const char* copy_name(uint8_t kind) {
  switch (kind) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD: return "[memcpy HtoD]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH: return "[memcpy DtoH]";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD: return "[memcpy DtoD]";
    default: return "[memcpy other]";
  }
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  CUpti_Activity* record = nullptr;
  std::lock_guard<std::mutex> guard(lock);
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
      const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
      add_interval(demangled(k->name), k->start, k->end);
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMSET) {  // GPU work too (zeroed gradients)
      // Named by size: the library's own (cuBLASLt's before some GEMMs) apart from ours.
      const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(record);
      add_interval("[memset " + std::to_string(m->bytes) + " B]", m->start, m->end);
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      const auto* c = reinterpret_cast<const CUpti_ActivityMemcpy6*>(record);
      add_interval(copy_name(c->copyKind), c->start, c->end);
    }
  }
  std::free(buffer);
}

void write_trace() {
  check(cuptiActivityFlushAll(1), "cuptiActivityFlushAll");
  const char* path = std::getenv("NIBBLE_KERNEL_TRACE");
  if (path == nullptr) path = "kernel_trace.tsv";
  std::lock_guard<std::mutex> guard(lock);
  std::sort(intervals.begin(), intervals.end(), [](const Interval& a, const Interval& b) { return a.start < b.start; });
  // The union of the intervals (kernels may overlap) that fall in [from, to].
  const auto busy_in = [](uint64_t from, uint64_t to) {
    uint64_t busy = 0, covered_to = from;
    for (const Interval& i : intervals) {
      const uint64_t start = std::max(i.start, covered_to), end = std::min(i.end, to);
      if (end > start) busy += end - start;
      covered_to = std::max(covered_to, std::min(i.end, to));
    }
    return static_cast<double>(busy);
  };
  uint64_t first = 0, last = 0, window_from = UINT64_MAX, window_to = 0;
  for (const Interval& i : intervals) {
    last = std::max(last, i.end);
    if (i.marks_window) window_from = std::min(window_from, i.start), window_to = std::max(window_to, i.end);
  }
  if (!intervals.empty()) first = intervals.front().start;
  const double span = static_cast<double>(last - first), busy = busy_in(first, last);
  const bool window = window_to > window_from;
  const double window_span = window ? static_cast<double>(window_to - window_from) : 0.0;
  const double window_busy = window ? busy_in(window_from, window_to) : 0.0;
  // The idle gaps inside the window, summed by the pair of kernels around them (the one that ended
  // last before the gap, the one after it): where the GPU waits for the host.
  std::map<std::pair<int, int>, std::pair<double, long>> gaps;
  if (window) {
    uint64_t covered_to = 0;
    int last_name = -1;
    for (const Interval& i : intervals) {
      if (i.end <= window_from || i.start >= window_to) continue;
      if (last_name >= 0 && i.start > covered_to) {
        auto& g = gaps[{last_name, i.name}];
        g.first += static_cast<double>(i.start - covered_to);
        g.second += 1;
      }
      if (i.end >= covered_to) covered_to = i.end, last_name = i.name;
    }
  }
  std::vector<std::pair<std::pair<int, int>, std::pair<double, long>>> gap_rows(gaps.begin(), gaps.end());
  std::sort(gap_rows.begin(), gap_rows.end(),
            [](const auto& a, const auto& b) { return a.second.first > b.second.first; });
  std::vector<std::pair<std::string, std::pair<double, long>>> rows(totals.begin(), totals.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.first > b.second.first; });
  const std::string tmp = std::string(path) + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "w");
  if (f == nullptr) {
    std::fprintf(stderr, "nibble kernel trace: cannot write %s\n", tmp.c_str());
    return;
  }
  std::fprintf(f,
               "# kernels %zu, span %.3f ms, busy %.3f ms, window %.3f ms, window_busy %.3f ms, window_kernel %s%s\n",
               intervals.size(), span * 1e-6, busy * 1e-6, window_span * 1e-6, window_busy * 1e-6,
               window_kernel.c_str(), failed ? ", CUPTI reported errors (stderr)" : "");
  const auto short_name = [](int id) { return names[static_cast<size_t>(id)].substr(0, 70); };
  for (size_t r = 0; r < gap_rows.size() && r < 15; ++r)
    std::fprintf(f, "# gap\t%.4f\t%ld\t%s\t%s\n", gap_rows[r].second.first * 1e-6, gap_rows[r].second.second,
                 short_name(gap_rows[r].first.first).c_str(), short_name(gap_rows[r].first.second).c_str());
  std::fprintf(f, "ms\tlaunches\tkernel\n");
  for (const auto& [name, t] : rows) std::fprintf(f, "%.4f\t%ld\t%s\n", t.first * 1e-6, t.second, name.c_str());
  const bool ok = std::fclose(f) == 0 && std::rename(tmp.c_str(), path) == 0;
  if (!ok) std::fprintf(stderr, "nibble kernel trace: cannot write %s\n", path);
}

}  // namespace

// Called by the CUDA driver when CUDA_INJECTION64_PATH names this library.
extern "C" int InitializeInjection(void) {
  const char* name = std::getenv("NIBBLE_KERNEL_TRACE_WINDOW");
  if (name != nullptr && *name != '\0') window_kernel = name;
  check(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed), "cuptiActivityRegisterCallbacks");
  check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "cuptiActivityEnable(kernels)");
  check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET), "cuptiActivityEnable(memsets)");
  check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY), "cuptiActivityEnable(copies)");
  std::atexit(write_trace);
  return 1;
}
