// GEMMs on the GPU through cuBLASLt, in nibble's row-major terms.
//
//   C[m x n] = alpha * op(A) op(B) + beta * C,   op(X) = X or X^T,  all matrices row-major
//
// with FP32 accumulation always. A and B are BF16, FP8 (E4M3/E5M2), FP32 or, on Blackwell only,
// NVFP4 (see below); C is FP32 or BF16.
// alpha is a device pointer (the product of the operands' per-tensor decode scales, which the
// quantizers leave on the device; nullptr means 1), so nothing waits on the host. beta is 0 or 1
// (overwrite or accumulate). Batched calls take element strides between the matrices of a batch.
//
// The MLP's GELU can run in the GEMM's epilogue (GemmEpilogue; BF16 operands and output, beta = 0,
// no batches, n a multiple of 8): kGeluAux writes C = GELU(alpha op(A) op(B)) and `aux` = the GELU's
// input, both [m x n] BF16 rounded from the FP32 result; kGeluGrad reads `aux` (the GELU's input,
// [m x n] BF16) and writes C = (alpha op(A) op(B)) GELU'(aux). cuBLASLt's GELU is the tanh form,
// as nn::Mlp's (LinearCuda's test holds it to that form).
//
// Hopper's FP8 tensor cores need both operands with the reduction dimension contiguous
// (trans_a = false, trans_b = true: the "NT" layout of every operand in the recipe) and m, n, k
// multiples of 16; other FP8 layouts are rejected with std::invalid_argument.
//
// With BF16 or FP32 operands the result equals the CPU emulation (tensor/gemm_cpu.h) on the same
// operand values up to the order of FP32 accumulation; FP8 tensor cores accumulate in about 14 bits
// between cuBLASLt's promotions to FP32 (docs/numerics.md, "GEMMs").
//
// NVFP4 (GemmType::kNvfp4, compute capability >= 10.0 only; compiled but never run on hardware
// here): cuBLASLt's native block-scaled FP4 GEMM. Each operand is its packed E2M1 codes (two per
// byte, element 2i in the low nibble, row-major with K contiguous: A [m x k], B [n x k], so
// trans_a = false, trans_b = true as for FP8) plus `block_scales`, its E4M3 scales (one per 16
// elements along K) already rearranged into cuBLASLt's tiled layout (tile_block_scales below,
// tensor/block_scale_layout.h). The per-tensor decode scales go into alpha (g_a * g_b), as on the
// Hopper path. m, n must be multiples of 16, k of 32 (rows of whole 16-byte lines); no batches.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

namespace nibble::cuda {

enum class GemmType : uint8_t { kF32, kBF16, kE4M3, kE5M2, kNvfp4 };

struct GemmMatrix {
  const void* data = nullptr;
  GemmType type = GemmType::kBF16;
  bool transposed = false;  // op(X) = X^T: the stored matrix is [k x m] (A) or [n x k] (B)
  int64_t batch_stride = 0;  // elements between consecutive matrices of a batch
  const void* block_scales = nullptr;  // kNvfp4 only: E4M3 block scales in cuBLASLt's tiled layout
};

enum class GemmEpilogue : uint8_t { kNone, kGeluAux, kGeluGrad };

struct GemmOutput {
  void* data = nullptr;
  GemmType type = GemmType::kF32;  // kF32 or kBF16
  int64_t batch_stride = 0;
  GemmEpilogue epilogue = GemmEpilogue::kNone;
  void* aux = nullptr;  // the GELU's input [m x n] BF16: written (kGeluAux) or read (kGeluGrad)
};

class GemmRunner {
 public:
  // One cuBLASLt handle and a workspace; not thread-safe (one per stream of work).
  // tune: the first call of each shape and layout times up to kTuneCandidates kernels of cuBLASLt's
  // heuristic list on its own operands and keeps the fastest of those that give the same bits as
  // the heuristic's first choice (results never depend on it); GEMMs of 2^38 multiply-adds or
  // more keep the heuristic's choice (see plan()). NIBBLE_GEMM_TUNE=0 in the
  // environment turns it off everywhere; NIBBLE_GEMM_TUNE_LOG=1 prints each choice to stderr.
  explicit GemmRunner(bool tune = true);
  bool tunes() const { return autotune_; }
  ~GemmRunner();
  GemmRunner(const GemmRunner&) = delete;
  GemmRunner& operator=(const GemmRunner&) = delete;

  // alpha: device pointer to one float or nullptr (1). accumulate: beta = 1 instead of 0.
  void run(int64_t m, int64_t n, int64_t k, const GemmMatrix& a, const GemmMatrix& b, const GemmOutput& c,
           const float* alpha, bool accumulate, cudaStream_t stream, int64_t batch = 1);

 private:
  static constexpr int kTuneCandidates = 16;
  struct Plan;
  // m, n, k, batch, transposes, types of A, B, C, the epilogue, beta (a plan is tuned for the bits of
  // its beta: candidates that agree with beta = 0 may not with beta = 1), the pointers' alignments,
  // batch strides.
  using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int, int, int, int, int, int, int, int64_t, int64_t,
                         int64_t, int64_t>;
  // scales_first/second: the tiled block scales of cuBLASLt's first/second operand (kNvfp4 only);
  // aux: the epilogue's GELU input (its alignment is in the key).
  Plan& plan(const Key& key, const void* scales_first = nullptr, const void* scales_second = nullptr,
             const void* aux = nullptr);
  // aux_written: the GELU input a kGeluAux epilogue writes beside C (nullptr otherwise), checked
  // with C when the candidates are compared.
  void tune(Plan& p, const void* a, const void* b, void* c, size_t c_bytes, const void* aux_written,
            const float* alpha, const float* beta, bool accumulate, cudaStream_t stream);
  bool autotune_ = false;

  void* handle_ = nullptr;  // cublasLtHandle_t
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  float* constants_ = nullptr;  // device {1, 0, 1}: default alpha, beta = 0, beta = 1
  std::map<Key, std::unique_ptr<Plan>> plans_;
};

// Whether the current device can run kNvfp4 GEMMs (compute capability >= 10.0: Blackwell).
bool native_fp4_available();

// Rearranges an NVFP4 operand's block scales into cuBLASLt's tiled layout (tensor/block_scale_layout.h):
// `scales` row-major [ceil(rows / rows_per_scale_row) x scale_cols] (rows_per_scale_row = 1 for
// 1x16 blocks, 16 for 16x16 tiles) into `tiled`, tiled_scale_bytes(rows, scale_cols) bytes,
// padding zeroed. Stream-ordered; runs on any GPU.
void tile_block_scales(const uint8_t* scales, int64_t rows, int64_t scale_cols, int64_t rows_per_scale_row,
                       uint8_t* tiled, cudaStream_t stream);

// out = a * b (device scalars), e.g. alpha = g_a * g_b for a GEMM of two quantized operands.
void multiply_scalars(const float* a, const float* b, float* out, cudaStream_t stream);

}  // namespace nibble::cuda
