// Tolerances of the GPU attention core (nn/cuda/layers_cuda.h) against the FP32 CPU attention,
// shared by the GPU test (tests/cuda/layers_cuda_test.cpp) and the CPU emulation that justifies
// them (tests/model/attention_bf16_emulation_test.cpp).
//
// The GPU rounds q, k, v, P, dO and dS to BF16 (relative error <= 2^-9 ~ 2e-3 each) and multiplies
// them with FP32 accumulation; the CPU keeps them FP32. The forward output passes two roundings per
// operand pair (q, k -> scores -> P; P, v -> O); backward chains more (dO, v -> dP; dS, k|q -> dq|dk;
// P, dO -> dv) plus the cancellation in dS = P (dP - rowsum(P dP)).
// Errors of that emulation over 1000 seeds per test shape (NIBBLE_ATTN_EMULATION_SEEDS=1000
// nibble_model_tests --gtest_filter='AttentionBf16*'):
// - RMS relative error ||gpu - cpu|| / ||cpu||: about 2 * 2^-9 and steady, at most 4.6e-3 (forward)
//   and 7.4e-3 (backward, the q, k and v parts of d_qkv each);
// - maximum over elements relative to max |cpu| (a tail statistic): at most 1.3e-2 forward and
//   2.0e-2 backward.
// The tolerances are about twice those peaks. An indexing error (wrong head, group, position, RoPE
// pairing, causal mask, scale) gives errors of order 1e-1 to 1.
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
