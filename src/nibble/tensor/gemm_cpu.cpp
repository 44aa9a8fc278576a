#include "nibble/tensor/gemm_cpu.h"

#include <cblas.h>

#include <climits>
#include <stdexcept>
#include <string>

#include "nibble/formats/minifloat.h"
#include "nibble/quant/quantize.h"

namespace nibble {

namespace {

void check_size(std::span<const float> x, int64_t rows, int64_t cols, const char* what) {
  if (rows < 0 || cols < 0 || static_cast<int64_t>(x.size()) != rows * cols)
    throw std::invalid_argument(std::string(what) + ": the input holds " + std::to_string(x.size()) +
                                " elements, not " + std::to_string(rows) + "x" + std::to_string(cols));
}

// cblas takes int dimensions; nibble's tensors are indexed with int64_t.
int blas_int(int64_t v, const char* what) {
  if (v > INT_MAX) throw std::invalid_argument(std::string("sgemm: ") + what + " exceeds the BLAS int range");
  return static_cast<int>(v);
}

}  // namespace

GemmOperand gemm_operand(const QuantizedTensor& q) {
  return GemmOperand{q.rows, q.cols, dequantize_unscaled(q), q.decode_scale};
}

GemmOperand gemm_operand_fp32(std::span<const float> x, int64_t rows, int64_t cols) {
  check_size(x, rows, cols, "gemm_operand_fp32");
  return GemmOperand{rows, cols, std::vector<float>(x.begin(), x.end()), 1.0f};
}

GemmOperand gemm_operand_bf16(std::span<const float> x, int64_t rows, int64_t cols) {
  check_size(x, rows, cols, "gemm_operand_bf16");
  GemmOperand op{rows, cols, std::vector<float>(x.size()), 1.0f};
  for (size_t i = 0; i < x.size(); ++i) op.values[i] = BF16::decode(BF16::encode(x[i], Rounding::kNearestEven));
  return op;
}

void sgemm_nt(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k, float alpha,
              float beta) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS leaves c untouched scaled by beta; spell it out
    for (int64_t i = 0; i < m * n; ++i) c[i] = beta == 0.0f ? 0.0f : beta * c[i];
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, blas_int(m, "m"), blas_int(n, "n"), blas_int(k, "k"),
              alpha, a, blas_int(k, "lda"), b, blas_int(k, "ldb"), beta, c, blas_int(n, "ldc"));
}

void gemm_nt(const GemmOperand& a, const GemmOperand& b, std::span<float> c, bool accumulate) {
  if (a.cols != b.cols)
    throw std::invalid_argument("gemm_nt: reduction dimensions differ (A is " + std::to_string(a.rows) + "x" +
                                std::to_string(a.cols) + ", B is " + std::to_string(b.rows) + "x" +
                                std::to_string(b.cols) + ")");
  if (static_cast<int64_t>(c.size()) != a.rows * b.rows)
    throw std::invalid_argument("gemm_nt: the output holds " + std::to_string(c.size()) + " elements, not " +
                                std::to_string(a.rows) + "x" + std::to_string(b.rows));
  const float alpha = a.decode_scale * b.decode_scale;
  sgemm_nt(a.values.data(), b.values.data(), c.data(), a.rows, b.rows, a.cols, alpha, accumulate ? 1.0f : 0.0f);
}

}  // namespace nibble
