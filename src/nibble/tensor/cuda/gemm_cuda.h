// GEMMs on the GPU through cuBLASLt, in nibble's row-major terms.
//
//   C[m x n] = alpha * op(A) op(B) + beta * C,   op(X) = X or X^T,  all matrices row-major
//
// with FP32 accumulation always. A and B are BF16, FP8 (E4M3/E5M2) or FP32; C is FP32 or BF16.
// alpha is a device pointer (the product of the operands' per-tensor decode scales, which the
// quantizers leave on the device; nullptr means 1), so nothing waits on the host. beta is 0 or 1
// (overwrite or accumulate). Batched calls take element strides between the matrices of a batch.
//
// Hopper's FP8 tensor cores need both operands with the reduction dimension contiguous
// (trans_a = false, trans_b = true: the "NT" layout of every operand in the recipe) and m, n, k
// multiples of 16; other FP8 layouts are rejected with std::invalid_argument.
//
// With BF16 or FP32 operands the result equals the CPU emulation (tensor/gemm_cpu.h) on the same
// operand values up to the order of FP32 accumulation; FP8 tensor cores accumulate in about 14 bits
// between cuBLASLt's promotions to FP32 (docs/numerics.md, "GEMMs").
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

namespace nibble::cuda {

enum class GemmType : uint8_t { kF32, kBF16, kE4M3, kE5M2 };

struct GemmMatrix {
  const void* data = nullptr;
  GemmType type = GemmType::kBF16;
  bool transposed = false;  // op(X) = X^T: the stored matrix is [k x m] (A) or [n x k] (B)
  int64_t batch_stride = 0;  // elements between consecutive matrices of a batch
};

struct GemmOutput {
  void* data = nullptr;
  GemmType type = GemmType::kF32;  // kF32 or kBF16
  int64_t batch_stride = 0;
};

class GemmRunner {
 public:
  // One cuBLASLt handle and a workspace; not thread-safe (one per stream of work).
  GemmRunner();
  ~GemmRunner();
  GemmRunner(const GemmRunner&) = delete;
  GemmRunner& operator=(const GemmRunner&) = delete;

  // alpha: device pointer to one float or nullptr (1). accumulate: beta = 1 instead of 0.
  void run(int64_t m, int64_t n, int64_t k, const GemmMatrix& a, const GemmMatrix& b, const GemmOutput& c,
           const float* alpha, bool accumulate, cudaStream_t stream, int64_t batch = 1);

 private:
  struct Plan;
  using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int, int, int, int, int, int, int64_t, int64_t, int64_t>;
  Plan& plan(const Key& key);

  void* handle_ = nullptr;  // cublasLtHandle_t
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  float* constants_ = nullptr;  // device {1, 0, 1}: default alpha, beta = 0, beta = 1
  std::map<Key, std::unique_ptr<Plan>> plans_;
};

// out = a * b (device scalars), e.g. alpha = g_a * g_b for a GEMM of two quantized operands.
void multiply_scalars(const float* a, const float* b, float* out, cudaStream_t stream);

}  // namespace nibble::cuda
