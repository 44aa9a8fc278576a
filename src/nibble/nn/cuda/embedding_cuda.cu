// Embedding lookup and its deterministic scatter-add backward; the id-error flag. See layers_cuda.h.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "nibble/nn/cuda/kernel_util.cuh"
#include "nibble/nn/cuda/layers_cuda.h"

namespace nibble::nn::cuda {

using detail::blocks_for;

IdErrorFlag::IdErrorFlag() : flag_(1), host_(1) {
  NIBBLE_CUDA_CHECK(cudaMemset(flag_.data(), 0xff, sizeof(unsigned long long)));
  *host_.data() = ~0ull;
}

void IdErrorFlag::check(const char* what, int64_t limit, cudaStream_t stream) {
  read(stream);
  NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
  report(what, limit, stream);
}

void IdErrorFlag::read(cudaStream_t stream) {
  NIBBLE_CUDA_CHECK(
      cudaMemcpyAsync(host_.data(), flag_.data(), sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream));
}

void IdErrorFlag::report(const char* what, int64_t limit, cudaStream_t stream) {
  const unsigned long long v = *host_.data();
  if (v == ~0ull) return;
  NIBBLE_CUDA_CHECK(cudaMemsetAsync(flag_.data(), 0xff, sizeof v, stream));
  throw std::out_of_range(std::string(what) + ": id " + std::to_string(v & 0xffffffffu) + " at position " +
                          std::to_string(v >> 32) + " is not below " + std::to_string(limit));
}

namespace {

__global__ void gather_kernel(const uint32_t* __restrict__ ids, int64_t n, const float* __restrict__ weight,
                              int64_t rows, int64_t dim, float* __restrict__ out, bool accumulate,
                              unsigned long long* bad) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * dim) return;
  const int64_t pos = i / dim, d = i % dim;
  const uint32_t id = ids[pos];
  if (id >= rows) {
    if (d == 0) detail::flag_bad_id(bad, pos, id);
    return;
  }
  const float w = weight[static_cast<int64_t>(id) * dim + d];
  out[i] = accumulate ? out[i] + w : w;
}

// Sort keys: the id, or `rows` for a bad one (sorted last, then skipped); values: the position.
__global__ void sort_input_kernel(const uint32_t* __restrict__ ids, int64_t n, uint32_t rows, uint32_t* keys,
                                  uint32_t* positions, unsigned long long* bad) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const uint32_t id = ids[i];
  if (id >= rows) detail::flag_bad_id(bad, i, id);
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

int bits_for(uint32_t max_key) {
  int b = 1;
  while (b < 32 && (max_key >> b) != 0) ++b;
  return b;
}

}  // namespace

EmbeddingCuda::EmbeddingCuda(int64_t rows, int64_t dim) : rows_(rows), dim_(dim) {
  if (rows <= 0 || dim <= 0) throw std::invalid_argument("EmbeddingCuda: rows and dim must be positive");
  if (rows >= 0xffffffffLL) throw std::invalid_argument("EmbeddingCuda: too many rows for 32-bit ids");
  weight_.resize(static_cast<size_t>(rows * dim));
  grad_.resize(weight_.size());
  weight_.zero();
  grad_.zero();
}

void EmbeddingCuda::forward(const uint32_t* ids, int64_t n, float* out, bool accumulate, cudaStream_t stream) {
  if (n <= 0) return;
  gather_kernel<<<blocks_for(n * dim_, 256), 256, 0, stream>>>(ids, n, weight_.data(), rows_, dim_, out, accumulate,
                                                               bad_id_.device());
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void EmbeddingCuda::backward(const uint32_t* ids, int64_t n, const float* dout, cudaStream_t stream) {
  if (n <= 0) return;
  if (n > 0x7fffffffLL) throw std::invalid_argument("EmbeddingCuda::backward: too many positions");
  const size_t count = static_cast<size_t>(n);
  keys_in_.reserve(count), keys_out_.reserve(count), pos_in_.reserve(count), pos_out_.reserve(count);
  const uint32_t rows = static_cast<uint32_t>(rows_);
  sort_input_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(ids, n, rows, keys_in_.data(), pos_in_.data(),
                                                            bad_id_.device());
  NIBBLE_CUDA_CHECK_LAUNCH();
  // Radix sort is stable: equal ids keep their positions in increasing order.
  const int end_bit = bits_for(rows);
  size_t scratch_bytes = 0;
  NIBBLE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, scratch_bytes, keys_in_.data(), keys_out_.data(),
                                                    pos_in_.data(), pos_out_.data(), static_cast<int>(n), 0, end_bit,
                                                    stream));
  sort_scratch_.reserve(scratch_bytes);
  NIBBLE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(sort_scratch_.data(), scratch_bytes, keys_in_.data(),
                                                    keys_out_.data(), pos_in_.data(), pos_out_.data(),
                                                    static_cast<int>(n), 0, end_bit, stream));
  const int threads = static_cast<int>(std::min<int64_t>(kScatterThreads, detail::round_up(dim_, 32)));
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>((dim_ + threads - 1) / threads));
  scatter_add_kernel<<<grid, threads, 0, stream>>>(keys_out_.data(), pos_out_.data(), n, rows, dim_, dout,
                                                   grad_.data());
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void EmbeddingCuda::backward_positions(int64_t batch, int64_t seq, const float* dout, cudaStream_t stream) {
  if (batch <= 0 || seq <= 0 || seq > rows_)
    throw std::invalid_argument("EmbeddingCuda::backward_positions: batch " + std::to_string(batch) + " x seq " +
                                std::to_string(seq) + " is empty or seq exceeds the table's " + std::to_string(rows_) +
                                " rows");
  position_grad_kernel<<<blocks_for(seq * dim_, 256), 256, 0, stream>>>(dout, batch, seq, dim_, grad_.data());
  NIBBLE_CUDA_CHECK_LAUNCH();
}

}  // namespace nibble::nn::cuda
