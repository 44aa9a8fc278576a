// Runs the embedding kernels (src/nibble/nn/cuda/embedding_kernels.cuh) on the CPU, without a GPU:
// the header compiled as host C++, each kernel run as every thread of every block in turn on the
// calling thread (the kernels share nothing within a block: no barriers, shuffles or shared
// memory; two threads writing one element would show as a wrong sum), held to the CPU's
// nn::Embedding bit for bit:
// - the forward (one block a row, 16-byte columns or single ones): the token rows, the token rows
//   plus the learned positions' rows i % seq in one pass (what the CPU does in two), and rows added
//   onto an output already there; a bad id flagged with the smallest position and its row untouched;
// - the backward's scatter-add over ids sorted on the host as the device's stable radix sort leaves
//   them (long runs of one id, several column slices, a bad id sorted last and skipped), and the
//   positions' backward without the sort, both onto gradients already there.
// tests/cuda/layers_cuda_test.cpp (EmbeddingCuda.*) checks the same on the device.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "test_seed.h"

#include "cuda_emulation/emulated_kernel_syntax.h"

#include "../../src/nibble/nn/cuda/embedding_kernels.cuh"
#include "nibble/nn/embedding.h"

namespace nibble::nn::cuda::detail {
namespace {

using nibble::test::fresh_seed;

// A launch: kernel() as thread (x, 0, 0) of block (x, y, 0) of `grid`, one after another.
template <typename Kernel>
void launch(dim3 grid, unsigned threads, Kernel kernel) {
  emu::grid_dim = {grid.x, grid.y, 1};
  emu::block_dim = {threads, 1, 1};
  for (unsigned y = 0; y < grid.y; ++y)
    for (unsigned x = 0; x < grid.x; ++x) {
      emu::block_idx = {x, y, 0};
      for (unsigned t = 0; t < threads; ++t) {
        emu::thread_idx = {t, 0, 0};
        kernel();
      }
    }
}

std::vector<float> normal(std::mt19937_64& rng, int64_t n) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}

// Ids with repeats: half of them from the first 7 rows.
std::vector<uint32_t> random_ids(std::mt19937_64& rng, int64_t n, int64_t rows) {
  std::vector<uint32_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) id = static_cast<uint32_t>(rng() % 2 == 0 ? rng() % 7 : rng() % static_cast<uint64_t>(rows));
  return ids;
}

void expect_bits_equal(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0, first = -1;
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0 && bad++ == 0) first = static_cast<int64_t>(i);
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " differ, the first at " << first;
}

// EmbeddingCuda::embed_rows' launch: kVec 4 where dim allows (the device path also needs an aligned
// output, which a std::vector of floats from the heap is).
void embed_rows(const std::vector<uint32_t>& ids, const std::vector<float>& weight, int64_t rows, int64_t dim,
                const float* positions, int64_t seq, bool accumulate, std::vector<float>& out,
                unsigned long long* bad) {
  const auto n = static_cast<unsigned>(ids.size());
  const bool vec = dim % 4 == 0;
  launch(dim3(n), static_cast<unsigned>(embed_threads(dim, vec ? 4 : 1)), [&] {
    if (vec) embed_rows_kernel<4>(ids.data(), weight.data(), rows, dim, positions, seq, accumulate, out.data(), bad);
    else embed_rows_kernel<1>(ids.data(), weight.data(), rows, dim, positions, seq, accumulate, out.data(), bad);
  });
}

// Widths: 16-byte columns with fewer threads than a block has (96), single columns (98), and rows
// wider than 256 threads' 4 columns (1100), so that threads loop.
class EmbeddingEmulation : public ::testing::TestWithParam<int64_t> {};

TEST_P(EmbeddingEmulation, ForwardMatchesTheCpu) {
  std::mt19937_64 rng(fresh_seed());
  const int64_t vocab = 300, dim = GetParam(), batch = 3, seq = 37, n = batch * seq, pos_rows = 40;
  Embedding tokens(vocab, dim), positions(pos_rows, dim);
  const auto w = normal(rng, vocab * dim), p = normal(rng, pos_rows * dim);
  std::copy(w.begin(), w.end(), tokens.weight().begin());
  std::copy(p.begin(), p.end(), positions.weight().begin());
  const auto ids = random_ids(rng, n, vocab);
  std::vector<uint32_t> position_ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) position_ids[static_cast<size_t>(i)] = static_cast<uint32_t>(i % seq);
  unsigned long long bad = ~0ull;

  std::vector<float> want(static_cast<size_t>(n * dim)), got(want.size(), std::nanf(""));
  tokens.forward(ids, want);
  embed_rows(ids, w, vocab, dim, nullptr, 1, false, got, &bad);
  expect_bits_equal(got, want, "tokens");

  positions.forward(position_ids, want, /*accumulate=*/true);  // the CPU's two passes
  const std::vector<float> with_positions = want;
  std::fill(got.begin(), got.end(), std::nanf(""));
  embed_rows(ids, w, vocab, dim, p.data(), seq, false, got, &bad);
  expect_bits_equal(got, with_positions, "tokens + positions in one pass");

  const auto base = normal(rng, n * dim);
  want = base, got = base;
  tokens.forward(ids, want, /*accumulate=*/true);
  embed_rows(ids, w, vocab, dim, nullptr, 1, true, got, &bad);
  expect_bits_equal(got, want, "accumulate");
  EXPECT_EQ(bad, ~0ull) << "no id was out of range";

  // Two bad ids: the smaller position is recorded; their rows stay as they were, the others written.
  auto bad_ids = ids;
  bad_ids[41] = static_cast<uint32_t>(vocab + 5);
  bad_ids[17] = static_cast<uint32_t>(vocab);
  std::fill(got.begin(), got.end(), -7.0f);
  embed_rows(bad_ids, w, vocab, dim, p.data(), seq, false, got, &bad);
  EXPECT_EQ(bad, (17ull << 32) | static_cast<unsigned long long>(vocab));
  for (int64_t r = 0; r < n; ++r) {
    const auto row = static_cast<size_t>(r * dim);
    const std::vector<float> got_row(got.begin() + row, got.begin() + row + dim);
    if (r == 17 || r == 41) EXPECT_EQ(got_row, std::vector<float>(static_cast<size_t>(dim), -7.0f)) << "row " << r;
    else expect_bits_equal(got_row, {with_positions.begin() + row, with_positions.begin() + row + dim}, "row");
  }
}

// The backward: gradients already there, the CPU adding each id's rows in position order.
TEST_P(EmbeddingEmulation, BackwardMatchesTheCpu) {
  std::mt19937_64 rng(fresh_seed());
  const int64_t vocab = 50, dim = GetParam(), batch = 4, seq = 45, n = batch * seq;
  // One frequent id (about half the positions: runs of many scatter batches, not a multiple of one),
  // one in every 9th position (a run of 20 or so: between the 16-byte slices' count and the single
  // columns' at 1100 wide, so some of its warps find no slice), the rest spread; and one bad id,
  // which the scatter skips (the forward has flagged it).
  std::vector<uint32_t> ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    ids[static_cast<size_t>(i)] = static_cast<uint32_t>(i % 9 == 0 ? 7 : rng() % 2 == 0 ? 3 : rng() % vocab);
  ids[29] = static_cast<uint32_t>(vocab);
  const auto dout = normal(rng, n * dim), start = normal(rng, vocab * dim);
  std::vector<uint32_t> keys(ids.size()), positions(ids.size());
  unsigned long long bad = ~0ull;
  launch(dim3(static_cast<unsigned>((n + 255) / 256)), 256, [&] {
    sort_input_kernel(ids.data(), n, static_cast<uint32_t>(vocab), keys.data(), positions.data(), &bad);
  });
  EXPECT_EQ(bad, (29ull << 32) | static_cast<unsigned long long>(vocab));
  // cub::DeviceRadixSort::SortPairs is stable: equal keys keep their positions in order.
  std::vector<size_t> order(ids.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return keys[a] < keys[b]; });
  std::vector<uint32_t> sorted_keys(ids.size()), sorted_positions(ids.size());
  for (size_t i = 0; i < order.size(); ++i) sorted_keys[i] = keys[order[i]], sorted_positions[i] = positions[order[i]];
  ASSERT_EQ(sorted_keys.back(), static_cast<uint32_t>(vocab)) << "the bad id sorts last";
  // The bad id's row adds to no gradient: make it loud in case it did.
  auto dout_bad = dout;
  std::fill(dout_bad.begin() + 29 * dim, dout_bad.begin() + 30 * dim, 1e30f);

  // Both forms where dim allows 16-byte columns (the device takes them there), else single columns.
  std::vector<std::pair<int, std::vector<float>>> grads;  // columns a lane, the gradient
  const auto blocks = static_cast<unsigned>((n + kScatterWarps - 1) / kScatterWarps);
  for (const int vec : dim % 4 == 0 ? std::vector<int>{4, 1} : std::vector<int>{1}) {
    std::vector<float> grad = start;
    const auto* k = sorted_keys.data();
    const auto* p = sorted_positions.data();
    const auto v = static_cast<uint32_t>(vocab);
    launch(dim3(blocks), 32 * kScatterWarps, [&] {
      if (vec == 4) scatter_add_kernel<4>(k, p, n, v, dim, dout_bad.data(), grad.data());
      else scatter_add_kernel<1>(k, p, n, v, dim, dout_bad.data(), grad.data());
    });
    grads.emplace_back(vec, std::move(grad));
  }
  // The CPU (which rejects a bad id) on the same ids and rows without the bad one.
  Embedding cpu(vocab, dim);
  std::copy(start.begin(), start.end(), cpu.weight_grad().begin());
  auto cpu_ids = ids;
  cpu_ids.erase(cpu_ids.begin() + 29);
  auto cpu_dout = dout;
  cpu_dout.erase(cpu_dout.begin() + 29 * dim, cpu_dout.begin() + 30 * dim);
  cpu.backward(cpu_ids, cpu_dout);
  for (const auto& [vec, grad] : grads)
    expect_bits_equal(grad, {cpu.weight_grad().begin(), cpu.weight_grad().end()},
                      "scatter-add, " + std::to_string(vec) + " columns a lane");

  // The positions' backward: ids i % seq, without the sort.
  Embedding cpu_positions(seq + 3, dim);
  const auto pos_start = normal(rng, (seq + 3) * dim);
  std::copy(pos_start.begin(), pos_start.end(), cpu_positions.weight_grad().begin());
  std::vector<uint32_t> position_ids(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) position_ids[static_cast<size_t>(i)] = static_cast<uint32_t>(i % seq);
  cpu_positions.backward(position_ids, dout);
  std::vector<float> pos_grad = pos_start;
  launch(dim3(static_cast<unsigned>((seq * dim + 255) / 256)), 256,
         [&] { position_grad_kernel(dout.data(), batch, seq, dim, pos_grad.data()); });
  expect_bits_equal(pos_grad, {cpu_positions.weight_grad().begin(), cpu_positions.weight_grad().end()},
                    "positions' backward");
}

INSTANTIATE_TEST_SUITE_P(Widths, EmbeddingEmulation, ::testing::Values(96, 98, 1100),
                         [](const ::testing::TestParamInfo<int64_t>& i) { return "Dim" + std::to_string(i.param); });

}  // namespace
}  // namespace nibble::nn::cuda::detail
