// Embedding kernels behind EmbeddingCuda (layers_cuda.h); included by embedding_cuda.cu only, and
// compiled as host C++ by tests/cuda_emulation/embedding_emulation_test.cpp, which runs them against
// the CPU's nn::Embedding bit for bit.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "nibble/nn/cuda/kernel_util.cuh"

namespace nibble::nn::cuda::detail {
namespace {

// The forward's block: one row, kVec columns a thread, at most 256 threads.
inline int embed_threads(int64_t dim, int vec) {
  return static_cast<int>(std::min<int64_t>(256, round_up((dim + vec - 1) / vec, 32)));
}

// Row r of out = weight[ids[r]], plus the learned positions' row r % seq where `positions` is given
// (the CPU's x = token row, then x += position row: one FP32 addition, so the same bits), else plus
// out's row with `accumulate`. One block a row; kVec = 4 (dim a multiple of 4: 16-byte loads and
// stores) or 1. In one pass, where the token gather and the positions' accumulating gather read
// and wrote the activation twice (GPT-2 124M at 16k tokens: 100 MB of traffic instead of 250). A
// bad id flags `bad` and leaves its row unwritten (the caller's check throws).
template <int kVec>
__global__ void embed_rows_kernel(const uint32_t* __restrict__ ids, const float* __restrict__ weight, int64_t rows,
                                  int64_t dim, const float* __restrict__ positions, int64_t seq, bool accumulate,
                                  float* __restrict__ out, unsigned long long* bad) {
  const int64_t r = blockIdx.x;
  const uint32_t id = ids[r];
  if (id >= rows) {
    if (threadIdx.x == 0) flag_bad_id(bad, r, id);
    return;
  }
  const float* w = weight + static_cast<int64_t>(id) * dim;
  const float* p = positions != nullptr ? positions + (r % seq) * dim : nullptr;
  float* o = out + r * dim;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * kVec; c < dim; c += static_cast<int64_t>(blockDim.x) * kVec) {
    if constexpr (kVec == 4) {
      float4 v = *reinterpret_cast<const float4*>(w + c);
      if (p != nullptr || accumulate) {
        const float4 a = *reinterpret_cast<const float4*>(p != nullptr ? p + c : o + c);
        v = p != nullptr ? make_float4(v.x + a.x, v.y + a.y, v.z + a.z, v.w + a.w)
                         : make_float4(a.x + v.x, a.y + v.y, a.z + v.z, a.w + v.w);
      }
      *reinterpret_cast<float4*>(o + c) = v;
    } else {
      o[c] = p != nullptr ? w[c] + p[c] : accumulate ? o[c] + w[c] : w[c];
    }
  }
}

// Sort keys: the id, or `rows` for a bad one (sorted last, then skipped); values: the position.
__global__ void sort_input_kernel(const uint32_t* __restrict__ ids, int64_t n, uint32_t rows, uint32_t* keys,
                                  uint32_t* positions, unsigned long long* bad) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const uint32_t id = ids[i];
  if (id >= rows) flag_bad_id(bad, i, id);
  keys[i] = id < rows ? id : rows;
  positions[i] = static_cast<uint32_t>(i);
}

// The backward's scatter-add over the ids sorted with their positions (stable: a run of equal ids
// keeps its positions in increasing order). Each id's gradient row adds the run's dout rows in
// position order, as the CPU does: per column g = ((g + r1) + r2) + ..., the CPU's bits.
// One warp per sorted entry, kScatterWarps to a block; the warps of a run's first entries share its
// columns, in slices, and the others return at once:
// - a run shorter than a row's 32-column slices (nearly every id of a batch): slices of 128 columns,
//   a lane's 4 neighbouring columns in 16-byte loads (dim a multiple of 4); entry o of the run
//   takes slices o, o + w, ... with w = min(run length, slices), so a run of one is one warp's work;
// - a longer run (a frequent token: runs of thousands in a batch of real text): a warp a slice of 32
//   columns, each lane one column with kBatch1 rows in flight. The additions are a chain per column,
//   but the loads are not: each lane loads the next batch of rows while it adds the current one, so
//   a run waits one memory latency per batch, not per row.
// The run's end: galloping over the sorted keys (one load for a run of one, the common case), then
// binary search in the last gap. It replaced one block of up to 256 threads per sorted entry and
// slice of 256 columns (0.19 ms with uniform ids and 0.24 ms with Zipf ids on an H200 at GPT-2's
// shapes, session 13: 49k blocks for 16k tokens, most of them adding one row): the same additions
// in 2k blocks of fuller warps.
constexpr int kScatterWarps = 8;
// Rows in flight a lane: 4 in 16-byte columns (short runs: one batch for nearly every id; 8 took
// 94 registers, two blocks an SM), 16 in single columns (the long runs' chains). With four blocks an
// SM asked for, ptxas fits the kernel in 64 registers without spills (sm_90a): 32 warps an SM.
constexpr int kBatch4 = 4, kBatch1 = 16;

__device__ __forceinline__ void add_to(float4& g, const float4& v) { g.x += v.x, g.y += v.y, g.z += v.z, g.w += v.w; }
__device__ __forceinline__ void add_to(float& g, const float& v) { g += v; }

// One lane's columns c.. (a float4 or a float) of gradient row `id`: the run's rows [start, end) of
// dout added in order.
template <typename V, int kBatch>
__device__ __forceinline__ void add_run_columns(const uint32_t* __restrict__ positions, int64_t start, int64_t end,
                                                int64_t dim, int64_t c, const float* __restrict__ dout,
                                                float* __restrict__ g_at) {
  const auto load = [&](int64_t j0, V (&v)[kBatch]) {
#pragma unroll
    for (int k = 0; k < kBatch; ++k)
      v[k] = j0 + k < end ? *reinterpret_cast<const V*>(dout + static_cast<int64_t>(positions[j0 + k]) * dim + c)
                          : V{};
  };
  V g = *reinterpret_cast<const V*>(g_at);
  V v[kBatch], next[kBatch]{};  // next: copied into v after the last batch too, unread there
  load(start, v);
  for (int64_t j0 = start; j0 < end; j0 += kBatch) {
    if (j0 + kBatch < end) load(j0 + kBatch, next);
#pragma unroll
    for (int k = 0; k < kBatch; ++k)
      if (j0 + k < end) add_to(g, v[k]);
#pragma unroll
    for (int k = 0; k < kBatch; ++k) v[k] = next[k];
  }
  *reinterpret_cast<V*>(g_at) = g;
}

// kVec 4: the short runs in 16-byte columns (dim a multiple of 4, dout and grad 16-byte aligned);
// kVec 1: single columns for every run.
template <int kVec>
__global__ void __launch_bounds__(32 * kScatterWarps, 4) scatter_add_kernel(const uint32_t* __restrict__ keys,
                                                                         const uint32_t* __restrict__ positions,
                                                                         int64_t n, uint32_t rows, int64_t dim,
                                                                         const float* __restrict__ dout,
                                                                         float* __restrict__ grad) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kScatterWarps + threadIdx.x / 32;
  if (j >= n) return;
  const uint32_t id = keys[j];
  if (id >= rows) return;  // bad ids sort last; the forward flagged them
  const int64_t slices1 = (dim + 31) / 32, slices4 = (dim + 127) / 128;
  int64_t o = 0;  // j's offset in its run, where below slices1 (else this warp has nothing to do)
  while (o < slices1 && j - o > 0 && keys[j - o - 1] == id) ++o;
  if (o >= slices1) return;
  const int64_t start = j - o;
  int64_t lo = start + 1, hi = start + 1, step = 1;  // keys[lo - 1] == id throughout
  while (hi < n && keys[hi] == id) {
    lo = hi + 1;
    step *= 2;
    hi = start + step;
  }
  hi = hi < n ? hi : n;  // keys[hi] != id, or hi == n
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] == id) lo = mid + 1;
    else hi = mid;
  }
  const int64_t end = lo, len = end - start;
  float* row = grad + static_cast<int64_t>(id) * dim;
  if (kVec == 4 && len < slices1) {
    const int64_t workers = len < slices4 ? len : slices4;
    for (int64_t slice = o; slice < slices4; slice += workers) {
      const int64_t c = slice * 128 + lane * 4;
      if (c < dim) add_run_columns<float4, kBatch4>(positions, start, end, dim, c, dout, row + c);
    }
  } else {
    const int64_t workers = len < slices1 ? len : slices1;
    for (int64_t slice = o; slice < slices1; slice += workers) {
      const int64_t c = slice * 32 + lane;
      if (c < dim) add_run_columns<float, kBatch1>(positions, start, end, dim, c, dout, row + c);
    }
  }
}

// Position p's gradient row (i = p dim + column, one thread each): the batch's rows p, seq + p, ...
// added in that order.
__global__ void position_grad_kernel(const float* __restrict__ dout, int64_t batch, int64_t seq, int64_t dim,
                                     float* __restrict__ grad) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= seq * dim) return;
  float g = grad[i];
#pragma unroll 8
  for (int64_t b = 0; b < batch; ++b) g += dout[b * seq * dim + i];
  grad[i] = g;
}

}  // namespace
}  // namespace nibble::nn::cuda::detail
