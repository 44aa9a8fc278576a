// E2M1 encoders of the fused NVFP4 passes: eight elements times their element scale, encoded and
// packed into one 32-bit word (element k in nibble k) in few instructions per element, round-to-
// nearest-even and stochastic rounding. Bit for bit E2M1::encode / e2m1_encode_sr_fast
// (minifloat.h) for finite values and infinities: tests/cuda/e2m1_pack_cuda_test.cu compares them
// on every float in [0, 16] and on random words, and the CUDA quantizer tests compare whole kernels
// with the CPU reference. NaN is not handled (the reference's code 0x7 is not produced): the fused
// passes encode no element of a tensor whose amax is not finite (its copy is all zeros).
// tests/cuda_emulation/quantize_emulation_test.cpp compiles this header as host C++ with its own
// __fmaf_rn, __fmaf_ru and __fadd_ru (the CPU's FMA and addition under the rounding mode asked for).
//
// Both work on |y| by "magic" float arithmetic: with an integer M in [2^23, 2^24), where floats are
// the integers, M + c rounded to a float is an integer rounding of c, done by the FPU in the same
// instruction as the multiply-add that forms c (stochastic rounding works on 128 c in [2^30, 2^31),
// where floats are the multiples of 128, see e2m1_sr_magic). E2M1's codes of a = |y| lie on three
// grids (step 0.5 below 2, 1 below 4, 2 above): code = 2a, a + 2 and a/2 + 4 on them. Each grid's
// rounding is exact on its own range and at least the true code elsewhere (E2M1's value-to-code map
// is concave and rounding is monotonic), so the code is the minimum of the three, capped at 7
// (saturation at 6).
#pragma once

#include <cstdint>

#include "nibble/formats/host_device.h"
#include "nibble/quant/fp4_decode_bf16.h"  // byte_perm: PTX prmt
#include "nibble/quant/philox.h"

namespace nibble::cuda {

// Round-to-nearest-even magnitude code of |y|, returned as the float 2^23 + code. Adding 2^23 in an
// FFMA rounds the exact a*m + c to an integer, ties to even, in one step:
//   lo = rint(2a), mid = rint(a) + 2, hi = rint(a/2) + 4.
// The cap is needed only where |y| >= 7 (hi <= 7 below): kSaturate = false leaves it out for blocks
// whose largest |y| is below 7.
inline constexpr float kE2m1RneMagic = 8388608.0f;  // 2^23: ulp 1 on [2^23, 2^24)
template <bool kSaturate>
__device__ __forceinline__ float e2m1_rne_magic(float y) {
  constexpr float kMagic = kE2m1RneMagic;
  const float a = fabsf(y);
  const float lo = __fmaf_rn(a, 2.0f, kMagic);
  const float mid = __fmaf_rn(a, 1.0f, kMagic + 2.0f);
  const float hi = __fmaf_rn(a, 0.5f, kMagic + 4.0f);
  return kSaturate ? fminf(fminf(lo, mid), fminf(hi, kMagic + 7.0f)) : fminf(fminf(lo, mid), hi);
}

// Stochastic-rounding magnitude code of |y| with the random byte b (u = (b + 1/2) / 256), returned as
// the float M + 128 code, M = 1.5 * 2^30 (its bits are those of M plus the code, as floats in
// [2^30, 2^31) are 128 apart). The rule (E2M1::encode): on a grid where a is q steps, the code is
// floor(q) + 1 when frac(q) > u, else floor(q); that is ceil(q - u), exactly (frac > u puts q - u in
// (floor(q), floor(q) + 1); frac <= u in (floor(q) - 1, floor(q)]). Everything is scaled by 128 so
// that the byte b enters as it is (sr_threshold): the FFMA rounded upward gives
// ru(128 q - 2^14 - 128 u) from threshold = -(2^14 + 128 u); ceil(./128) of that equals
// ceil((128 q - 2^14 - 128 u) / 128), since the multiples of 128 next to it are floats. The FADD rounded
// upward then adds M + 2^14 and takes that ceiling in one step, as the floats in [2^30, 2^31) are
// the multiples of 128 (128 (q - u) >= -128, so the sum stays in that range while q < 2^22; above,
// rounding upward only overshoots, and the cap at 7 applies anyway). The minimum over the grids holds
// as for rounding to nearest, since ceil(. - u) is monotonic too. Always capped: a code of 8 comes
// from any |y| in (6, 8).
inline constexpr float kE2m1SrMagic = 1610612736.0f;  // 1.5 * 2^30
__device__ __forceinline__ float e2m1_sr_magic(float y, float threshold) {
  constexpr float kMagic = kE2m1SrMagic, kBase = kMagic + 16384.0f;  // + 2^14, undoing the threshold's
  const float a = fabsf(y);
  const float lo = __fadd_ru(__fmaf_ru(a, 256.0f, threshold), kBase);
  const float mid = __fadd_ru(__fmaf_ru(a, 128.0f, threshold), kBase + 2.0f * 128.0f);
  const float hi = __fadd_ru(__fmaf_ru(a, 64.0f, threshold), kBase + 4.0f * 128.0f);
  return fminf(fminf(lo, mid), fminf(hi, kMagic + 7.0f * 128.0f));
}

// -(2^14 + 128 u) for the byte b that element j (0..15) of a Philox group draws (fp4_random_word:
// byte j % 4 of word j / 4), u = (b + 1/2) / 256, in one byte permute: with the exponent of 2^14 the
// mantissa's second byte (bits 8..15) counts halves, so b goes there as it is, and bit 7 is the 1/4.
// The other three bytes come from the constant -(2^14 + 1/4) = 0xC6800080.
__device__ __forceinline__ float sr_threshold(const Philox4x32& group, int j) {
  return bits_float(byte_perm(0xC6800080u, group.v[j >> 2], 0x3200u | static_cast<uint32_t>(4 + (j & 3)) << 4));
}

// Packs eight magnitude codes M + c_k (as float bits) and the signs of v[k] into one word.
// Magnitudes: summed as sum_k bits_k * 16^k (Horner, by integer multiply-adds, which run on the FMA
// pipe; the multiplier is hidden from the compiler, which would otherwise turn them into shift-adds
// on the busier integer pipe). Codes are at most 7, so no nibble carries into the next, and M's bits
// in every term add up to the constant bits(M) * 0x11111111 (mod 2^32), which the fix cancels.
// Signs: y = v * scale has v's sign (scale > 0; -0 included), so bit 3 of nibble k is the sign
// bit of v[k]. A byte permute with sign replication turns the sign of a float into a 0x00/0xFF
// byte; the even elements' bytes and the odd elements' bytes are merged nibble-wise and masked
// into the nibbles' bit 3, which the magnitudes leave clear (so adding them is OR-ing them).
template <uint32_t kMagicBits>
__device__ __forceinline__ uint32_t pack8_codes(const float* v, const float* magic_codes) {
  constexpr uint32_t kBiasFix = 0u - kMagicBits * 0x11111111u;
  uint32_t sixteen = 16;
  asm("" : "+r"(sixteen));
  uint32_t mags = 0;
#pragma unroll
  for (int k = 7; k >= 0; --k) mags = mags * sixteen + float_bits(magic_codes[k]);
  // Selector 0xFBFB: bytes 0 and 2 replicate the sign of the first operand's top byte (byte 3),
  // bytes 1 and 3 that of the second's (byte 7).
  const auto signs2 = [](float a, float b) { return byte_perm(float_bits(a), float_bits(b), 0xFBFBu); };
  const uint32_t even = byte_perm(signs2(v[0], v[2]), signs2(v[4], v[6]), 0x5410u);  // bytes S0 S2 S4 S6
  const uint32_t odd = byte_perm(signs2(v[1], v[3]), signs2(v[5], v[7]), 0x5410u);   // bytes S1 S3 S5 S7
  const uint32_t signs = (even & 0x0F0F0F0Fu) | (odd & 0xF0F0F0F0u);  // nibble k: S_k
  return mags + kBiasFix + (signs & 0x88888888u);
}

// Eight E2M1 round-to-nearest-even codes of v[k] * scale, packed.
template <bool kSaturate>
__device__ __forceinline__ uint32_t pack8_rne(const float* v, float scale) {
  float m[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) m[k] = e2m1_rne_magic<kSaturate>(v[k] * scale);
  return pack8_codes<0x4B000000u>(v, m);
}

// Eight E2M1 stochastic-rounding codes of v[k] * scale, packed; element k draws byte 8 * kHalf + k
// of the Philox group (the CPU's fp4_random_word(group, 8 * kHalf + k)).
template <int kHalf>
__device__ __forceinline__ uint32_t pack8_sr(const float* v, float scale, const Philox4x32& group) {
  float m[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) m[k] = e2m1_sr_magic(v[k] * scale, sr_threshold(group, 8 * kHalf + k));
  return pack8_codes<0x4EC00000u>(v, m);
}

}  // namespace nibble::cuda
