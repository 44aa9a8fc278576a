// Tolerances of the GPU attention core (nn/cuda/layers_cuda.h, both kernels) against the FP32 CPU attention,
// shared by the GPU test (tests/cuda/layers_cuda_test.cpp) and the CPU emulation that justifies
// them (tests/model/attention_bf16_emulation_test.cpp).
//
// The GPU rounds q, k, v, P, dO and dS to BF16 (relative error <= u = 2^-9 ~ 2e-3 each) and multiplies
// them with FP32 accumulation; the CPU keeps them FP32. The forward output passes two roundings per
// operand pair (q, k -> scores -> P; P, v -> O); backward chains more (dO, v -> dP; dS, k|q -> dq|dk;
// P, dO -> dv) plus the cancellation in dS = P (dP - D), D = rowsum(P dP) = rowsum(dO O).
// The two GPU kernels round differently (attention_bf16_emulation_test.cpp emulates each):
// - the batched-GEMM kernel rounds the normalised P = exp(s - max) / sum and takes D from P and dP;
// - the fused kernel rounds exp(s - m) relative to the running row maximum m of the key tiles seen
//   so far (and divides by the FP32 sum at the end), and takes D from the BF16 dO and a BF16 copy of O.
//   Each P element still carries one relative rounding of at most u, so the forward error has the
//   same size; D picks up the rounding of O (at most u per term of a sum of dO O), which adds
//   10-15% to the backward RMS error.
// Errors of that emulation over 200 seeds per test shape (NIBBLE_ATTN_EMULATION_SEEDS=200
// nibble_model_tests --gtest_filter='AttentionBf16*'), the worst of the two kernels:
// - RMS relative error ||gpu - cpu|| / ||cpu||: about 2 * u and steady, at most 4.4e-3 (forward)
//   and 6.8e-3 (backward, the q, k and v parts of d_qkv each);
// - maximum over elements relative to max |cpu| (a tail statistic): at most 1.2e-2 forward and
//   1.7e-2 backward (earlier 1000-seed runs of the GEMM kernel: 1.3e-2 and 2.0e-2).
// The tolerances are about twice those peaks. The GPU test's seq-1024 shapes are not emulated
// (too slow on a CPU): per-element errors are the same relative roundings, and the maximum over
// their ~20x more elements grows by a factor of order sqrt(log 20), well inside the factor 2.
// An indexing error (wrong head, group, position, RoPE pairing, causal mask, scale) gives errors
// of order 1e-1 to 1.
#pragma once

namespace nibble::test {

inline constexpr double kAttnRmsFwd = 1e-2;
inline constexpr double kAttnRmsBwd = 1.5e-2;
inline constexpr double kAttnMaxFwd = 3e-2;
inline constexpr double kAttnMaxBwd = 5e-2;

// The test's inputs: qkv ~ N(0, 1.5^2) (scores of standard deviation 2.25: peaked softmax rows),
// d_out ~ N(0, 1).
inline constexpr float kAttnQkvStddev = 1.5f;

}  // namespace nibble::test
