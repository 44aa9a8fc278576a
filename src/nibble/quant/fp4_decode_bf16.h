// NVFP4 codes x E4M3 block scale as BF16 bits, in few instructions: what the fused quantization pass
// writes next to its packed output so that the Hopper GEMM path (FP4 decoded to BF16, DESIGN.md
// "Hopper emulation") needs no separate decode pass. Host and device code alike, so that a CPU test
// checks the device's bit manipulations (byte_perm and bf16x2_fma are emulated on the host from
// their PTX definitions).
//
// Every E2M1 value times every E4M3 value is exact in BF16: at most 2 x 4 significant bits, and
// between 2^-10 and 6 x 448 = 2688 when not zero. So the BF16 product of the two (one rounding of an
// exact value) is the upper half of the float32 product E2M1::decode(c) * E4M3::decode(s), whose
// lower half is zero: the bits decode_fp4_kernel writes.
#pragma once

#include <cstdint>

#include "nibble/formats/host_device.h"
#include "nibble/formats/minifloat.h"

namespace nibble {

// PTX prmt.b32 in its default mode: byte i of the result is byte (sel >> 4i) & 7 of the 8 bytes
// {b:a} (a's bytes are 0-3), or, when bit 4i+3 of sel is set, that byte's top bit copied to all 8.
NIBBLE_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
#else
  const uint64_t bytes = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t s = (sel >> (4 * i)) & 0xFu;
    uint32_t byte = static_cast<uint32_t>(bytes >> (8 * (s & 7u))) & 0xFFu;
    if (s & 8u) byte = (byte & 0x80u) ? 0xFFu : 0u;
    d |= byte << (8 * i);
  }
  return d;
#endif
}

// Two BF16 fused multiply-adds a * b + c (halves independent, one rounding to nearest even each):
// PTX fma.rn.bf16x2 (sm_80 and later). The host version is exact for the operands used here, whose
// products fit float32 exactly.
NIBBLE_HD uint32_t bf16x2_fma(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#else
  uint32_t d = 0;
  for (int h = 0; h < 2; ++h) {
    const auto half = [h](uint32_t w) { return bits_float((w >> (16 * h)) << 16); };
    const float r = half(a) * half(b) + half(c);
    d |= static_cast<uint32_t>(BF16::encode(r, Rounding::kNearestEven)) << (16 * h);
  }
  return d;
#endif
}

// An E4M3 block scale code (a non-negative finite one: 0 .. 0x7E, as the quantizers write) as BF16
// bits in both halves of the word. The code shifted into a float's exponent and mantissa fields is
// its value times 2^-120, subnormal codes included (E4M3 subnormals land on float subnormals with
// the same bias offset); one exact multiplication (denormals are not flushed) brings it back.
NIBBLE_HD uint32_t e4m3_scale_bf16x2(uint32_t code) {
  const float value = bits_float(code << 20) * 0x1p120f;
  const uint32_t b = float_bits(value);  // exact in BF16: the low 16 bits are zero
  return byte_perm(b, b, 0x3232u);
}

// The BF16 bits of 8 packed E2M1 codes (element k in nibble k, sign in the nibble's bit 3) times
// the block scale `scale2` (e4m3_scale_bf16x2): out[j] = elements 2j (low half) and 2j + 1.
// The E2M1 magnitudes are looked up by byte permutes, four elements per permute, in two 8-byte
// tables (the low and the high byte of each magnitude's BF16 bits); the signs are moved into the high
// bytes; one BF16 FMA per pair (adding -0, which keeps the sign of a zero product) applies the scale.
NIBBLE_HD void decode8_bf16(uint32_t codes, uint32_t scale2, uint32_t out[4]) {
  // BF16 of the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6: 0000 3F00 3F80 3FC0 4000 4040 4080 40C0.
  constexpr uint32_t kLo03 = 0xC0800000u, kLo47 = 0xC0804000u;  // low bytes, magnitude codes 0-3 / 4-7
  constexpr uint32_t kHi03 = 0x3F3F3F00u, kHi47 = 0x40404040u;  // high bytes
  const uint32_t mags = codes & 0x77777777u;  // selector nibbles 0-7: plain byte picks
  const uint32_t mags_hi = mags >> 16;
  // Element k's sign (bit 4k + 3) as the top bit of byte k of the high-byte words: even k from
  // codes << 4, odd k from codes, byte k/2 of either.
  const uint32_t shifted = codes << 4;
  const uint32_t signs03 = byte_perm(shifted, codes, 0x5140u) & 0x80808080u;
  const uint32_t signs47 = byte_perm(shifted, codes, 0x7362u) & 0x80808080u;
  const uint32_t lo03 = byte_perm(kLo03, kLo47, mags), hi03 = byte_perm(kHi03, kHi47, mags) | signs03;
  const uint32_t lo47 = byte_perm(kLo03, kLo47, mags_hi), hi47 = byte_perm(kHi03, kHi47, mags_hi) | signs47;
  constexpr uint32_t kMinusZero2 = 0x80008000u;
  out[0] = bf16x2_fma(byte_perm(lo03, hi03, 0x5140u), scale2, kMinusZero2);
  out[1] = bf16x2_fma(byte_perm(lo03, hi03, 0x7362u), scale2, kMinusZero2);
  out[2] = bf16x2_fma(byte_perm(lo47, hi47, 0x5140u), scale2, kMinusZero2);
  out[3] = bf16x2_fma(byte_perm(lo47, hi47, 0x7362u), scale2, kMinusZero2);
}

}  // namespace nibble
