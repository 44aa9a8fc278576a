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

// One block per sorted entry and slice of kScatterThreads columns (blockIdx.y); only the first entry
// of each run of equal ids works: its threads (one per column) add the run's gradient rows in
// position order, as the CPU does. The slices run a long run's columns side by side, not one after
// another in each thread (GPT-2's 768 columns took three chains a thread). The additions are a
// chain per column, but the loads are not: a frequent token (runs of thousands in a batch of real
// text) would otherwise wait one memory latency per row. Rows are loaded kScatterBatch at a
// time, the next batch while the current one is added. The run's end: galloping over the sorted
// keys (one load for a run of one, the common case), then binary search in the last gap.
// Threads per block: 256 keep 8 runs resident per SM for the many short runs. Measured on an H200 at
// GPT-2's shapes (layers bench): one slice (a thread walking 3 columns) 0.18 ms with uniform ids and
// 0.35 ms with Zipf ids, 3 slices 0.23 and 0.24 ms (session 13; real text is Zipf-like); a block of
// 768 threads gave 0.30 and 0.19 ms (docs/benchmarks.md, session 7).
constexpr int kScatterBatch = 16;
constexpr int kScatterThreads = 256;
__global__ void __launch_bounds__(kScatterThreads) scatter_add_kernel(const uint32_t* __restrict__ keys,
                                                                      const uint32_t* __restrict__ positions,
                                                                      int64_t n, uint32_t rows, int64_t dim,
                                                                      const float* __restrict__ dout,
                                                                      float* __restrict__ grad) {
  const int64_t i = blockIdx.x;
  const uint32_t id = keys[i];
  if (id >= rows || (i > 0 && keys[i - 1] == id)) return;
  int64_t lo = i + 1, hi = i + 1, step = 1;  // keys[lo - 1] == id throughout
  while (hi < n && keys[hi] == id) {
    lo = hi + 1;
    step *= 2;
    hi = i + step;
  }
  hi = hi < n ? hi : n;  // keys[hi] != id, or hi == n
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] == id) lo = mid + 1;
    else hi = mid;
  }
  const int64_t end = lo;
  const auto load = [&](int64_t j0, int64_t d, float (&v)[kScatterBatch]) {
#pragma unroll
    for (int k = 0; k < kScatterBatch; ++k)
      v[k] = j0 + k < end ? dout[static_cast<int64_t>(positions[j0 + k]) * dim + d] : 0.0f;
  };
  for (int64_t d = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x; d < dim;
       d += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    float g = grad[static_cast<int64_t>(id) * dim + d];
    float v[kScatterBatch], next[kScatterBatch];
    load(i, d, v);
    for (int64_t j0 = i; j0 < end; j0 += kScatterBatch) {
      if (j0 + kScatterBatch < end) load(j0 + kScatterBatch, d, next);
#pragma unroll
      for (int k = 0; k < kScatterBatch; ++k)
        if (j0 + k < end) g += v[k];
#pragma unroll
      for (int k = 0; k < kScatterBatch; ++k) v[k] = next[k];
    }
    grad[static_cast<int64_t>(id) * dim + d] = g;
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
