// General FP32 matrix multiply for the high-precision parts of the model (attention's batched
// matmuls, the LM head): C = alpha * op(A) op(B) + beta * C, row-major with leading dimensions, so
// a head's slice of a wider activation is multiplied in place without a copy. OpenBLAS sgemm.
#pragma once

#include <cstdint>

namespace nibble::nn {

// op(A) is m x k (A is k x m when trans_a), op(B) is k x n (B is n x k when trans_b), C is m x n.
void matmul(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
            const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

}  // namespace nibble::nn
