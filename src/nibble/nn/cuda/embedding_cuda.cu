// Embedding lookup and its deterministic scatter-add backward; the id-error flag. See layers_cuda.h.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "nibble/nn/cuda/embedding_kernels.cuh"
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
  embed_rows(ids, n, nullptr, 1, accumulate, out, stream);
}

void EmbeddingCuda::forward_with_positions(const uint32_t* ids, int64_t batch, int64_t seq,
                                           const EmbeddingCuda& positions, float* out, cudaStream_t stream) {
  if (batch <= 0 || seq <= 0 || seq > positions.rows_ || positions.dim_ != dim_)
    throw std::invalid_argument("EmbeddingCuda::forward_with_positions: batch " + std::to_string(batch) + " x seq " +
                                std::to_string(seq) + " is empty, or seq exceeds the positions' " +
                                std::to_string(positions.rows_) + " rows, or their width " +
                                std::to_string(positions.dim_) + " is not " + std::to_string(dim_));
  embed_rows(ids, batch * seq, positions.weight_.data(), seq, false, out, stream);
}

void EmbeddingCuda::embed_rows(const uint32_t* ids, int64_t n, const float* positions, int64_t seq, bool accumulate,
                               float* out, cudaStream_t stream) {
  if (n > 0x7fffffffLL) throw std::invalid_argument("EmbeddingCuda::forward: too many positions");
  const auto grid = static_cast<unsigned>(n);
  if (dim_ % 4 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0) {  // the tables are cudaMalloc's, aligned
    detail::embed_rows_kernel<4><<<grid, detail::embed_threads(dim_, 4), 0, stream>>>(
        ids, weight_.data(), rows_, dim_, positions, seq, accumulate, out, bad_id_.device());
  } else {
    detail::embed_rows_kernel<1><<<grid, detail::embed_threads(dim_, 1), 0, stream>>>(
        ids, weight_.data(), rows_, dim_, positions, seq, accumulate, out, bad_id_.device());
  }
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void EmbeddingCuda::backward(const uint32_t* ids, int64_t n, const float* dout, cudaStream_t stream) {
  if (n <= 0) return;
  if (n > 0x7fffffffLL) throw std::invalid_argument("EmbeddingCuda::backward: too many positions");
  const size_t count = static_cast<size_t>(n);
  keys_in_.reserve(count), keys_out_.reserve(count), pos_in_.reserve(count), pos_out_.reserve(count);
  const uint32_t rows = static_cast<uint32_t>(rows_);
  detail::sort_input_kernel<<<blocks_for(n, 256), 256, 0, stream>>>(ids, n, rows, keys_in_.data(),
                                                                    pos_in_.data(), bad_id_.device());
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
  const unsigned blocks = blocks_for(n, detail::kScatterWarps);
  if (dim_ % 4 == 0 && reinterpret_cast<uintptr_t>(dout) % 16 == 0) {  // the gradient is cudaMalloc's, aligned
    detail::scatter_add_kernel<4><<<blocks, 32 * detail::kScatterWarps, 0, stream>>>(
        keys_out_.data(), pos_out_.data(), n, rows, dim_, dout, grad_.data());
  } else {
    detail::scatter_add_kernel<1><<<blocks, 32 * detail::kScatterWarps, 0, stream>>>(
        keys_out_.data(), pos_out_.data(), n, rows, dim_, dout, grad_.data());
  }
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void EmbeddingCuda::backward_positions(int64_t batch, int64_t seq, const float* dout, cudaStream_t stream) {
  if (batch <= 0 || seq <= 0 || seq > rows_)
    throw std::invalid_argument("EmbeddingCuda::backward_positions: batch " + std::to_string(batch) + " x seq " +
                                std::to_string(seq) + " is empty or seq exceeds the table's " + std::to_string(rows_) +
                                " rows");
  detail::position_grad_kernel<<<blocks_for(seq * dim_, 256), 256, 0, stream>>>(dout, batch, seq, dim_, grad_.data());
  NIBBLE_CUDA_CHECK_LAUNCH();
}

}  // namespace nibble::nn::cuda
