// The two words of the fused NVFP4 pass's amax (nvfp4_amax, quantize_cuda.h) from the CPU reference,
// for the emulation tests of kernels that compute them while they write a tensor (ProducerAmax).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>

#include "nibble/formats/host_device.h"
#include "nibble/quant/rht.h"

namespace nibble::test {

// x [rows x cols] (rows a multiple of 16; at(r, c) its value as a float): max |x| and, with the RHT,
// the maximum of |rht16(16-row column block)| (quant/rht.h), else max |x| again. Finite values.
template <typename At>
std::pair<uint32_t, uint32_t> amax_words(int64_t rows, int64_t cols, At at, bool rht, const RhtSigns& signs) {
  float row_max = 0.0f, col_max = 0.0f;
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
      float v[kRhtBlock];
      for (int k = 0; k < 16; ++k) {
        v[k] = at(r0 + k, c);
        row_max = std::max(row_max, std::fabs(v[k]));
      }
      rht16(v, signs);
      for (float e : v) col_max = std::max(col_max, std::fabs(e));
    }
  return {float_bits(row_max), float_bits(rht ? col_max : row_max)};
}

}  // namespace nibble::test
