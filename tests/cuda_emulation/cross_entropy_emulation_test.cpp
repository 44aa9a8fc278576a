// Runs the cross-entropy kernels (src/nibble/nn/cuda/loss_kernels.cuh) on the CPU, without a GPU:
// the header is compiled as host C++ with every CUDA thread of a block a std::thread (blocks one
// after another), warp shuffles emulated, and the staged kernel's mbarriers and bulk copies
// emulated from their documented semantics. Every case runs twice, with the copies landing at the
// two ends of the window the hardware may use:
// - late, at the first wait that needs them, with shared memory NaN-filled at launch: reading a
//   chunk before its wait sees NaNs or the previous row's exps, a wrong result;
// - early, as they are issued: refilling a chunk that other threads may still read (a missing
//   __syncthreads before the next row's copy) overwrites it under them, a wrong result when the
//   threads interleave so and always a data race under -fsanitize=thread (the tsan build).
// The staged kernel is held to the strided one (the fallback) bit for bit: losses, outputs (FP32
// in place; BF16 chunks, to another buffer, in place, none) and the bad-target flag; and its FP32
// results to the softmax cross-entropy in double. Both run here
// with the host's exp2 for ex2.approx (exp2_ftz.cuh), so what this checks is that they do the same operations in
// the same order, whatever the exponential is; the device tests (tests/cuda/layers_cuda_test.cpp)
// check the same on the GPU.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "test_seed.h"

// ---------------------------------------------------------------- the emulated device

namespace emu {

alignas(16) unsigned char shared[256 * 1024];  // the dynamic shared memory
size_t shared_limit = 0;                       // the launch's size of it
enum class Landing { kLate, kEarly };
Landing landing = Landing::kLate;
std::atomic<bool> bad_copy{false};  // a bulk copy misaligned, of a bad size, or beyond shared_limit
std::atomic<bool> hung{false};      // a wait that never completed
std::atomic<int64_t> copies{0};     // bulk copies issued

// An mbarrier: phase completes when `expected` arrivals have come and the announced bytes landed.
struct Copy {
  void* dst;
  const void* src;
  uint32_t bytes;
};
struct Barrier {
  uint32_t expected = 0, arrivals = 0, phase = 0;  // phase: completed phases
  int64_t tx = 0;                                  // bytes announced and not yet landed
  std::vector<Copy> pending;                       // late landing: issued, not yet landed
};
std::mutex barriers_mutex;
std::map<const void*, Barrier> barriers;

void complete_if_done(Barrier& b) {
  if (b.arrivals == b.expected && b.tx == 0) {
    ++b.phase;
    b.arrivals = 0;
  }
}
void land(Barrier& b, const Copy& c) {
  std::memcpy(c.dst, c.src, c.bytes);
  b.tx -= c.bytes;
}

}  // namespace emu

#include "cuda_emulation/emulated_kernel_syntax.h"

inline float __fmul_rn(float a, float b) { return a * b; }  // -ffp-contract=off: no FMA
inline float __fsub_rn(float a, float b) { return a - b; }

namespace nibble::nn::cuda::detail {
namespace {

void* stage_memory() { return emu::shared; }
void mbar_init(uint64_t* bar, uint32_t count) {
  std::lock_guard<std::mutex> lock(emu::barriers_mutex);
  emu::barriers[bar] = emu::Barrier{count, 0, 0, 0, {}};
}
void mbar_init_fence() {}
void fence_proxy_async() {}
void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  std::lock_guard<std::mutex> lock(emu::barriers_mutex);
  emu::Barrier& b = emu::barriers.at(bar);
  b.tx += bytes;
  ++b.arrivals;
  emu::complete_if_done(b);
}
void bulk_load(void* smem, const void* gmem, uint32_t bytes, uint64_t* bar) {
  const auto offset = static_cast<size_t>(static_cast<unsigned char*>(smem) - emu::shared);
  if (bytes == 0 || bytes % 16 != 0 || offset % 16 != 0 || reinterpret_cast<uintptr_t>(gmem) % 16 != 0 ||
      offset + bytes > emu::shared_limit) {
    emu::bad_copy = true;
    return;
  }
  ++emu::copies;
  std::lock_guard<std::mutex> lock(emu::barriers_mutex);
  emu::Barrier& b = emu::barriers.at(bar);
  if (emu::landing == emu::Landing::kEarly) {
    emu::land(b, {smem, gmem, bytes});
    emu::complete_if_done(b);
  } else {
    b.pending.push_back({smem, gmem, bytes});
  }
}
// try_wait.parity: done once the phase of that parity has completed (the current one's parity
// differs). Late copies land here, at the first wait that needs them.
void mbar_wait(uint64_t* bar, uint32_t parity) {
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(emu::barriers_mutex);
      emu::Barrier& b = emu::barriers.at(bar);
      if ((b.phase & 1u) != parity) return;
      if (!b.pending.empty() && b.arrivals == b.expected) {
        for (const auto& c : b.pending) emu::land(b, c);
        b.pending.clear();
        emu::complete_if_done(b);
        continue;
      }
    }
    if (std::chrono::steady_clock::now() - start > std::chrono::seconds(30)) {
      emu::hung = true;
      return;
    }
    std::this_thread::yield();
  }
}

}  // namespace
}  // namespace nibble::nn::cuda::detail

#define NIBBLE_CE_HOST_EMULATION
#include "../../src/nibble/nn/cuda/loss_kernels.cuh"

namespace emu {

// Runs kernel() as every thread of every block of `grid` blocks, one block after another.
template <typename Kernel>
void launch(unsigned grid, size_t shared_bytes, Kernel kernel) {
  if (shared_bytes > sizeof(shared)) throw std::runtime_error("emulated shared memory too small");
  shared_limit = shared_bytes;
  std::memset(shared, 0xff, sizeof(shared));  // NaNs
  run_grid(dim3(grid), kBlockThreads, start_block, kernel);
  std::lock_guard<std::mutex> lock(barriers_mutex);
  for (const auto& [address, b] : barriers)
    if (!b.pending.empty() || b.tx != 0 || b.arrivals != 0) bad_copy = true;  // a copy still in flight at exit
  barriers.clear();
}

}  // namespace emu

namespace nibble::nn::cuda::detail {
namespace {

using bf16 = __nv_bfloat16;

uint32_t bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}
uint64_t bits(double x) {
  uint64_t b;
  std::memcpy(&b, &x, 8);
  return b;
}
// Index of the first element whose bits differ, or -1.
template <typename T>
int64_t first_difference(const std::vector<T>& a, const std::vector<T>& b) {
  for (size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return static_cast<int64_t>(i);
  return -1;
}

struct Results {
  std::vector<float> fp32;  // in place
  std::vector<bf16> bf16_out, bf16_in_place;
  std::vector<double> loss_fp32, loss_bf16, loss_in_place, loss_only;
  unsigned long long bad_fp32 = ~0ull, bad_bf16 = ~0ull, bad_in_place = ~0ull, bad_only = ~0ull;
};

// Every form of the computation through either kernel: in place over FP32 logits, and over BF16
// logits (logits16) a chunk with its output to another buffer, one in place, one with losses only.
// The chunk forms take the rows as rows [row0, row0 + rows) of a batch.
Results run(bool staged, unsigned blocks, const std::vector<float>& logits, const std::vector<bf16>& logits16,
            const std::vector<uint32_t>& batch_targets, int64_t row0, int64_t rows, int64_t vocab, float grad_scale) {
  Results res;
  std::vector<uint32_t> targets(batch_targets.begin() + row0, batch_targets.begin() + row0 + rows);
  res.fp32 = logits;
  res.loss_fp32.assign(static_cast<size_t>(rows), NAN);
  res.bf16_out.assign(logits.size(), __float2bfloat16_rn(NAN));
  res.bf16_in_place = logits16;
  const int64_t total = static_cast<int64_t>(batch_targets.size());
  res.loss_bf16.assign(static_cast<size_t>(total), NAN);
  res.loss_in_place.assign(static_cast<size_t>(total), NAN);
  res.loss_only.assign(static_cast<size_t>(total), NAN);
  const size_t bytes32 = stage_shared_bytes(vocab, 4), bytes16 = stage_shared_bytes(vocab, 2);
  bf16* const in_place = res.bf16_in_place.data();
  if (staged) {
    emu::launch(blocks, bytes32, [&] {
      cross_entropy_staged_kernel<float>(res.fp32.data(), targets.data(), 0, rows, vocab, grad_scale, res.fp32.data(),
                                         res.loss_fp32.data(), &res.bad_fp32);
    });
    emu::launch(blocks, bytes16, [&] {
      cross_entropy_staged_kernel<bf16>(logits16.data(), batch_targets.data(), row0, rows, vocab, grad_scale,
                                        res.bf16_out.data(), res.loss_bf16.data(), &res.bad_bf16);
    });
    emu::launch(blocks, bytes16, [&] {
      cross_entropy_staged_kernel<bf16>(in_place, batch_targets.data(), row0, rows, vocab, grad_scale, in_place,
                                        res.loss_in_place.data(), &res.bad_in_place);
    });
    emu::launch(blocks, bytes16, [&] {
      cross_entropy_staged_kernel<bf16>(logits16.data(), batch_targets.data(), row0, rows, vocab, 0.0f, nullptr,
                                        res.loss_only.data(), &res.bad_only);
    });
  } else {
    const auto grid = static_cast<unsigned>(rows);
    emu::launch(grid, 0, [&] {
      cross_entropy_kernel(res.fp32.data(), targets.data(), vocab, grad_scale, res.loss_fp32.data(), &res.bad_fp32);
    });
    emu::launch(grid, 0, [&] {
      cross_entropy_chunk_kernel(logits16.data(), batch_targets.data(), row0, vocab, grad_scale, res.bf16_out.data(),
                                 res.loss_bf16.data(), &res.bad_bf16);
    });
    emu::launch(grid, 0, [&] {
      cross_entropy_chunk_kernel(in_place, batch_targets.data(), row0, vocab, grad_scale, in_place,
                                 res.loss_in_place.data(), &res.bad_in_place);
    });
    emu::launch(grid, 0, [&] {
      cross_entropy_chunk_kernel(logits16.data(), batch_targets.data(), row0, vocab, 0.0f, nullptr,
                                 res.loss_only.data(), &res.bad_only);
    });
  }
  return res;
}

// The in-place FP32 results against the softmax cross-entropy in double: the loss to 1e-6 (of 1 at
// least), each row's gradient (or probabilities, grad_scale 0) to 1e-5 of the row's largest term
// before the target's subtraction (p grad_scale and grad_scale: where the target's p is near 1, its
// gradient p grad_scale - grad_scale cancels, and the float product's rounding at grad_scale's
// size is what remains). The host's exp2 stands in for ex2.approx here, so this checks the kernels' exponential as a formula
// (2^(x log2 e - max log2 e) is e^(x - max)); its accuracy on the GPU is CrossEntropyCuda.MatchesCpu's.
void expect_softmax_cross_entropy(const std::vector<float>& logits, const std::vector<uint32_t>& batch_targets,
                                  int64_t row0, int64_t rows, int64_t vocab, float grad_scale,
                                  const std::vector<float>& out, const std::vector<double>& loss) {
  int64_t wrong = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t t = batch_targets[static_cast<size_t>(row0 + r)];
    if (t >= vocab) continue;  // a bad target: zeroed, checked above
    const float* x = logits.data() + r * vocab;
    double mx = -INFINITY, sum = 0.0;
    for (int64_t j = 0; j < vocab; ++j) mx = std::max(mx, static_cast<double>(x[j]));
    for (int64_t j = 0; j < vocab; ++j) sum += std::exp(x[j] - mx);
    const double want_loss = std::log(sum) - (x[t] - mx);
    if (!(std::fabs(loss[static_cast<size_t>(r)] - want_loss) <= 1e-6 * std::max(1.0, want_loss)) && wrong++ < 3)
      ADD_FAILURE() << "row " << r << ": loss " << loss[static_cast<size_t>(r)] << " vs " << want_loss;
    std::vector<double> want(static_cast<size_t>(vocab));
    double scale = std::fabs(grad_scale);
    for (int64_t j = 0; j < vocab; ++j) {
      const double p = std::exp(x[j] - mx) / sum;
      want[j] = grad_scale != 0.0f ? p * grad_scale - (j == t ? grad_scale : 0.0) : p;
      scale = std::max(scale, grad_scale != 0.0f ? p * std::fabs(grad_scale) : p);
    }
    for (int64_t j = 0; j < vocab; ++j)
      if (!(std::fabs(out[static_cast<size_t>(r * vocab + j)] - want[j]) <= 1e-5 * scale) && wrong++ < 3)
        ADD_FAILURE() << "row " << r << ", logit " << j << ": " << out[static_cast<size_t>(r * vocab + j)] << " vs "
                      << want[j];
  }
  EXPECT_EQ(wrong, 0);
}

struct Case {
  int64_t vocab, rows;
  unsigned blocks;  // of the staged kernel (fewer than rows: each block takes several)
};

void run_case(const Case& c, std::mt19937_64& rng) {
  const int64_t row0 = 3, total = c.rows + 5;  // the rows sit inside a larger batch
  ASSERT_TRUE(stage_fits(c.vocab, nullptr, nullptr, 2, stage_shared_bytes(c.vocab, 2)));
  ASSERT_TRUE(stage_fits(c.vocab, nullptr, nullptr, 4, stage_shared_bytes(c.vocab, 4)));
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> logits(static_cast<size_t>(c.rows * c.vocab));
  for (auto& x : logits) x = dist(rng);
  ASSERT_EQ(reinterpret_cast<uintptr_t>(logits.data()) % 16, 0u) << "the host allocator's alignment";
  for (int64_t j = 0; j < c.vocab; ++j) logits[static_cast<size_t>(c.vocab + j)] = -1.5f;  // row 1: all equal
  // Row 3 makes the order of the double sums show in the loss: its max (target, loss log(sum)) is
  // thread 0's first element, every other exp ~0.63 * 2^-53. Added to thread 0's running 1 one at a
  // time, each rounds away (below half an ulp of 1); added in another order, some would not.
  // Elsewhere the sums of nearby exps are exact in double whatever their order.
  for (int64_t j = 0; j < c.vocab; ++j) logits[static_cast<size_t>(3 * c.vocab + j)] = j == 0 ? 0.0f : -37.2f;
  // Row 5: exps over 2^-120 .. 1 (tiny gradients).
  std::uniform_real_distribution<float> wide(-83.0f, 0.0f);
  for (int64_t j = 0; j < c.vocab; ++j) logits[static_cast<size_t>(5 * c.vocab + j)] = wide(rng);
  std::vector<uint32_t> targets(static_cast<size_t>(total));
  for (auto& t : targets) t = static_cast<uint32_t>(rng() % c.vocab);
  targets[row0 + 0] = 0;
  targets[row0 + 1] = static_cast<uint32_t>(c.vocab - 1);
  targets[row0 + 3] = 0;
  // Two bad targets (the smaller position must be reported), each followed by good rows of the same block.
  targets[row0 + 4] = static_cast<uint32_t>(c.vocab + 9);
  targets[row0 + 2] = ~0u;
  std::vector<bf16> logits16(logits.size());  // the BF16 forms' logits
  for (size_t i = 0; i < logits.size(); ++i) logits16[i] = __float2bfloat16_rn(logits[i]);

  for (const float grad_scale : {0.5f / static_cast<float>(total), 0.0f}) {
    for (const emu::Landing l : {
#ifndef NIBBLE_CE_EMULATION_TSAN
             emu::Landing::kLate,
#endif
             emu::Landing::kEarly}) {
      const std::string name = std::string(l == emu::Landing::kLate ? "late" : "early") + " landing, vocab " +
                               std::to_string(c.vocab) + ", grad_scale " + std::to_string(grad_scale);
      SCOPED_TRACE(name);
      emu::landing = l;
      emu::bad_copy = false;
      emu::hung = false;
      emu::copies = 0;
      const Results want = run(false, 0, logits, logits16, targets, row0, c.rows, c.vocab, grad_scale);
      EXPECT_EQ(emu::copies.load(), 0);
      const Results got = run(true, c.blocks, logits, logits16, targets, row0, c.rows, c.vocab, grad_scale);
      const int64_t chunks = (c.vocab + kStageChunk - 1) / kStageChunk;
      EXPECT_EQ(emu::copies.load(), 4 * c.rows * chunks) << "each row copied once per launch";
      EXPECT_FALSE(emu::bad_copy) << "a bulk copy misaligned, beyond the shared memory, or in flight at exit";
      EXPECT_FALSE(emu::hung) << "a wait never completed";

      const int64_t fp32 = first_difference(got.fp32, want.fp32), b16 = first_difference(got.bf16_out, want.bf16_out);
      EXPECT_EQ(fp32, -1) << "FP32 output differs at " << fp32 << ": " << got.fp32[std::max<int64_t>(fp32, 0)]
                          << " vs " << want.fp32[std::max<int64_t>(fp32, 0)];
      EXPECT_EQ(b16, -1) << "BF16 output differs at " << b16;
      EXPECT_EQ(first_difference(got.bf16_in_place, want.bf16_in_place), -1) << "BF16 in place";
      EXPECT_EQ(first_difference(got.bf16_in_place, got.bf16_out), -1) << "BF16 in place vs to another buffer";
      EXPECT_EQ(first_difference(got.loss_fp32, want.loss_fp32), -1) << "in-place losses";
      EXPECT_EQ(first_difference(got.loss_bf16, want.loss_bf16), -1) << "chunk losses";
      EXPECT_EQ(first_difference(got.loss_in_place, got.loss_bf16), -1) << "chunk losses in place";
      EXPECT_EQ(first_difference(got.loss_only, want.loss_only), -1) << "chunk losses without output";
      // The chunk forms leave the batch's other rows alone.
      for (int64_t r = 0; r < total; ++r)
        if (r < row0 || r >= row0 + c.rows) {
          EXPECT_TRUE(std::isnan(got.loss_bf16[r]) && std::isnan(got.loss_only[r])) << "row " << r;
        }
      const unsigned long long flag = static_cast<unsigned long long>(row0 + 2) << 32 | ~0u;
      EXPECT_EQ(got.bad_bf16, flag);
      EXPECT_EQ(got.bad_in_place, flag);
      EXPECT_EQ(got.bad_only, flag);
      EXPECT_EQ(got.bad_fp32, static_cast<unsigned long long>(2) << 32 | ~0u);  // in place: positions from 0
      EXPECT_EQ(got.bad_fp32, want.bad_fp32);
      // Sanity of the reference itself: the bad rows are zeroed, the good ones are not.
      for (int64_t j = 0; j < c.vocab; ++j) {
        EXPECT_EQ(bits(got.fp32[static_cast<size_t>(2 * c.vocab + j)]), 0u);
        EXPECT_EQ(bits(got.fp32[static_cast<size_t>(4 * c.vocab + j)]), 0u);
      }
      EXPECT_GT(got.loss_fp32[0], 0.0);
      EXPECT_EQ(bits(got.loss_fp32[2]), bits(0.0));
      expect_softmax_cross_entropy(logits, targets, row0, c.rows, c.vocab, grad_scale, got.fp32, got.loss_fp32);
      std::printf("[ compare  ] %s: staged == strided bit for bit (%lld rows on %u blocks, %lld chunks)\n",
                  name.c_str(), static_cast<long long>(c.rows), c.blocks, static_cast<long long>(chunks));
    }
  }
  emu::landing = emu::Landing::kLate;
}

// Vocabs below one chunk, exactly one, one and a sliver (8 logits), and several with a partial
// last one; blocks taking 2 to 4 rows each (the barriers' phase parity flips between rows).
TEST(CrossEntropyEmulation, SmallVocab) {
  std::mt19937_64 rng(nibble::test::fresh_seed());
  run_case({8, 7, 3}, rng);
  run_case({1000, 9, 4}, rng);
}
TEST(CrossEntropyEmulation, ChunkBoundaries) {
  std::mt19937_64 rng(nibble::test::fresh_seed());
  run_case({kStageChunk, 6, 2}, rng);
  run_case({kStageChunk + 8, 6, 3}, rng);
}
TEST(CrossEntropyEmulation, SeveralChunks) {
  std::mt19937_64 rng(nibble::test::fresh_seed());
  run_case({2 * kStageChunk + 1000, 8, 2}, rng);
}

// The host-side conditions of the staged kernel (no kernel runs).
TEST(CrossEntropyStageFits, Conditions) {
  alignas(16) static float buffer[64];
  const auto* b16 = reinterpret_cast<const unsigned char*>(buffer);
  const size_t hopper = 227 * 1024 - 448;  // opt-in shared memory less the kernel's static part
  EXPECT_TRUE(stage_fits(50304, buffer, buffer, 4, hopper));      // GPT-2's padded vocab, FP32 in place
  EXPECT_TRUE(stage_fits(50304, buffer, buffer, 2, hopper));      // BF16 in place
  EXPECT_TRUE(stage_fits(50304, buffer, b16 + 8, 2, hopper));     // BF16 out, 8-byte aligned
  EXPECT_TRUE(stage_fits(50304, buffer, nullptr, 2, hopper));     // losses only
  EXPECT_FALSE(stage_fits(50257, buffer, buffer, 4, hopper)) << "vocab not a multiple of 4";
  EXPECT_FALSE(stage_fits(50302, buffer, buffer, 4, hopper)) << "vocab not a multiple of 4";
  EXPECT_FALSE(stage_fits(50300, buffer, buffer, 2, hopper)) << "BF16 rows not a multiple of 16 bytes";
  EXPECT_TRUE(stage_fits(50300, buffer, buffer, 4, hopper));
  EXPECT_FALSE(stage_fits(50304, buffer + 1, buffer, 4, hopper)) << "logits not 16-byte aligned";
  EXPECT_FALSE(stage_fits(50304, b16 + 8, buffer, 2, hopper)) << "BF16 logits not 16-byte aligned";
  EXPECT_FALSE(stage_fits(50304, buffer, buffer + 2, 4, hopper)) << "FP32 out not 16-byte aligned";
  EXPECT_FALSE(stage_fits(50304, buffer, b16 + 2, 2, hopper)) << "BF16 out not 8-byte aligned";
  EXPECT_TRUE(stage_fits(58000, buffer, buffer, 4, hopper));  // exactly the shared memory
  EXPECT_FALSE(stage_fits(58004, buffer, buffer, 4, hopper)) << "row beyond the shared memory";
  EXPECT_TRUE(stage_fits(58008, buffer, buffer, 2, hopper)) << "a BF16 row takes half";
  EXPECT_FALSE(stage_fits(50304, buffer, buffer, 4, 99 * 1024)) << "a GPU with 99 KiB per block";
  EXPECT_TRUE(stage_fits(50304, buffer, buffer, 2, 99 * 1024)) << "a BF16 row fits 99 KiB";
  EXPECT_FALSE(stage_fits(kStageMaxChunks * kStageChunk + 4, buffer, buffer, 4, size_t{1} << 20)) << "too many chunks";
  EXPECT_TRUE(stage_fits(kStageMaxChunks * kStageChunk, buffer, buffer, 4, size_t{1} << 20));
  EXPECT_FALSE(stage_fits(0, buffer, buffer, 4, hopper));
  EXPECT_EQ(stage_shared_bytes(50304, 4), size_t{201216});
  EXPECT_EQ(stage_shared_bytes(50304, 2), size_t{100608});
}

}  // namespace
}  // namespace nibble::nn::cuda::detail
