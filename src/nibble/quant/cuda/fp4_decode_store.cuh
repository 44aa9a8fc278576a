// One NVFP4 1x16 block decoded to BF16 and stored: shared by the fused quantization pass (its
// decoded outputs, nvfp4_rowcol.cuh) and the separate decode pass of OperandCuda (operand_cuda.cu),
// so that both write the same bits the same way. Compiles as host C++ too, for
// tests/cuda_emulation/quantize_emulation_test.cpp (uint2 / uint4 from cuda_runtime.h).
#pragma once

#include <cstdint>

#include "nibble/quant/fp4_decode_bf16.h"

namespace nibble::cuda {

// The BF16 decode of one 1x16 block (code x block scale, no tensor scale) from its packed codes
// (elements 0-7 in .x) and E4M3 scale code, as two 16-byte vectors: elements 0-7 in lo, 8-15 in hi.
// About 2.5 instructions per element (fp4_decode_bf16.h).
__device__ __forceinline__ void decode16_bf16(uint2 packed, uint32_t scale_code, uint4& lo, uint4& hi) {
  const uint32_t scale2 = e4m3_scale_bf16x2(scale_code);
  uint32_t a[4], b[4];
  decode8_bf16(packed.x, scale2, a);
  decode8_bf16(packed.y, scale2, b);
  lo = make_uint4(a[0], a[1], a[2], a[3]);
  hi = make_uint4(b[0], b[1], b[2], b[3]);
}

// decode16_bf16 stored to dst, which is 32-byte aligned (two 16-byte stores).
__device__ __forceinline__ void store_decoded16(uint16_t* dst, uint2 packed, uint32_t scale_code) {
  uint4* d = reinterpret_cast<uint4*>(dst);
  decode16_bf16(packed, scale_code, d[0], d[1]);
}

}  // namespace nibble::cuda
