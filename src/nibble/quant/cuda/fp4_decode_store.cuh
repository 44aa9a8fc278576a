// One NVFP4 1x16 block decoded to BF16 and stored: shared by the fused quantization pass (its
// decoded outputs, nvfp4_rowcol.cuh) and the separate decode pass of OperandCuda (operand_cuda.cu),
// so that both write the same bits the same way. Compiles as host C++ too, for
// tests/cuda_emulation/quantize_emulation_test.cpp (uint2 / uint4 from cuda_runtime.h).
#pragma once

#include <cstdint>

#include "nibble/quant/fp4_decode_bf16.h"

namespace nibble::cuda {

// The BF16 decode of one 1x16 block (code x block scale, no tensor scale) from its packed codes
// (elements 0-7 in .x) and E4M3 scale code: two 16-byte stores to dst, which is 32-byte aligned.
// About 2.5 instructions per element (fp4_decode_bf16.h).
__device__ __forceinline__ void store_decoded16(uint16_t* dst, uint2 packed, uint32_t scale_code) {
  const uint32_t scale2 = e4m3_scale_bf16x2(scale_code);
  uint32_t lo[4], hi[4];
  decode8_bf16(packed.x, scale2, lo);
  decode8_bf16(packed.y, scale2, hi);
  uint4* d = reinterpret_cast<uint4*>(dst);
  d[0] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
  d[1] = make_uint4(hi[0], hi[1], hi[2], hi[3]);
}

}  // namespace nibble::cuda
