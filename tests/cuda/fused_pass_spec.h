// The fused NVFP4 pass's spec as the quantizer tests draw it (tests/cuda/quantize_cuda_test.cpp on
// the GPU, tests/cuda_emulation/quantize_emulation_test.cpp without one).
#pragma once

#include <cstdint>

#include "nibble/quant/cuda/quantize_cuda.h"
#include "nibble/quant/rht.h"

namespace nibble::test {

// Both sides on: the RHT on the columnwise side or not, each side's rounding, the seed and the RHT
// signs drawn from it.
inline cuda::RowColSpec fused_pass_spec(bool rht, Rounding row, Rounding col, uint64_t seed) {
  cuda::RowColSpec spec;
  spec.col_rht = rht;
  spec.row_rounding = row;
  spec.col_rounding = col;
  spec.seed = seed;
  spec.rht_signs = rht_signs_from_seed(seed);
  return spec;
}

}  // namespace nibble::test
