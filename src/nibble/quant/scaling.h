// The scale arithmetic of each block-scaled format, shared by the CPU reference and the CUDA
// kernels (host + device), in TransformerEngine's float32 order of operations so that the bits
// equal theirs. The comments give the math; ../../../docs/numerics.md gives the why.
#pragma once

#include <cfloat>
#include <cstdint>

#include "nibble/formats/host_device.h"
#include "nibble/formats/minifloat.h"

namespace nibble {

// |x| as ordered bits: for non-negative floats, comparing the bit patterns as unsigned integers
// orders them like the values, and every NaN compares above +Inf. A max over these bits is an
// absolute maximum that propagates NaN whatever the reduction order (and works with atomicMax).
NIBBLE_HD uint32_t abs_bits(float x) { return float_bits(x) & 0x7FFFFFFFu; }
NIBBLE_HD bool amax_is_finite(uint32_t amax_bits) { return amax_bits < 0x7F800000u; }

// ---- NVFP4: E2M1 elements, E4M3 scale per 16 elements (or 16x16 tile), FP32 tensor scale ----

inline constexpr float kE2M1Max = 6.0f;
inline constexpr float kE4M3Max = 448.0f;

struct TensorScale {
  float encode;  // S: multiplies the data into the format's range
  float decode;  // g = 1/S: multiplies the decoded values back (in a GEMM: part of alpha)
};

// S = min(6 * 448 / amax, FLT_MAX), and S = 1 if that is 0; g = 1 / S. (amax = 0 gives S = FLT_MAX.)
// Only for finite amax: a tensor with NaN/Inf elements is marked non-finite instead (see below).
NIBBLE_HD TensorScale nvfp4_tensor_scale(float amax) {
  float s = fminf(kE2M1Max * kE4M3Max / amax, FLT_MAX);
  if (s == 0.0f) s = 1.0f;  // TransformerEngine's guard; unreachable for a finite amax
  return TensorScale{s, 1.0f / s};
}

// E4M3 code of the block's decode scale: E4M3_rne(min(amax_b * (S * (1/6)), 448)).
NIBBLE_HD uint8_t nvfp4_block_scale_code(float block_amax, float s_enc) {
  const float scaled = fminf(block_amax * (s_enc * (1.0f / kE2M1Max)), kE4M3Max);
  return E4M3::encode(scaled, Rounding::kNearestEven);
}

// Element encode scale e_b = min(1 / (float(s_b) * g), FLT_MAX). (s_b = 0 gives FLT_MAX; the
// block is then all zeros, since its amax rounded to a zero scale.)
NIBBLE_HD float nvfp4_element_encode_scale(uint8_t scale_code, float g) {
#if defined(__CUDA_ARCH__)
  const float inv = __frcp_rn(E4M3::decode(scale_code) * g);  // correctly rounded, like 1.0f / x
#else
  const float inv = 1.0f / (E4M3::decode(scale_code) * g);
#endif
  return fminf(inv, FLT_MAX);
}

// q = E2M1(clamp(x * scale, -6, 6)): the element encoder of NVFP4 (scale = e_b) and MXFP4 (scale = 1/X).
// The fast E2M1 encoders saturate at +-6 by themselves, which is the clamp.
NIBBLE_HD uint8_t fp4_encode_element(float x, float scale, Rounding rounding, uint32_t random_bits) {
  const float v = x * scale;
  return rounding == Rounding::kNearestEven ? e2m1_encode_rne_fast(v) : e2m1_encode_sr_fast(v, random_bits);
}

// ---- MXFP4 (OCP Microscaling v1.0): E2M1 elements, E8M0 scale per 32 elements, no tensor scale ----

inline constexpr int kE2M1Emax = 2;  // exponent of E2M1's largest normal (6 = 1.5 * 2^2)

// floor(log2(a)) for a finite a > 0 (float subnormals included).
NIBBLE_HD int floor_log2(float a) {
  const uint32_t b = abs_bits(a);
  if (b >= 0x00800000u) return static_cast<int>(b >> 23) - 127;
  int lead = 22;
  while (!((b >> lead) & 1u)) --lead;
  return lead - 149;
}

// Shared scale X = 2^(floor(log2(amax_b)) - emax_elem), clamped to E8M0's range; an all-zero
// block takes the smallest scale (2^-127). Elements then encode E2M1(x / X), saturating at 6.
NIBBLE_HD uint8_t mxfp4_block_scale_code(float block_amax) {
  if (block_amax == 0.0f) return 0;
  return E8M0::from_exponent(floor_log2(block_amax) - kE2M1Emax);
}

// 1/X, exact: X is a power of two in [2^-127, 2^125] for finite inputs.
NIBBLE_HD float mxfp4_element_encode_scale(uint8_t scale_code) {
  return pow2f(127 - static_cast<int>(scale_code));
}

// ---- FP8 with per-tensor current scaling (E4M3 or E5M2) ----

// S = fp8_max / amax (S = 1 when amax = 0, FLT_MAX when the quotient overflows); g = 1 / S.
NIBBLE_HD TensorScale fp8_tensor_scale(float amax, float fp8_max) {
  if (amax == 0.0f) return TensorScale{1.0f, 1.0f};
  const float s = fminf(fp8_max / amax, FLT_MAX);
  return TensorScale{s, 1.0f / s};
}

}  // namespace nibble
