// CPU reference quantizers: plain loops over the shared scalar math in scaling.h.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "nibble/quant/philox.h"
#include "nibble/quant/quantize.h"
#include "nibble/quant/scaling.h"

namespace nibble {

const char* format_name(Format f) {
  switch (f) {
    case Format::kNvfp4: return "nvfp4";
    case Format::kMxfp4: return "mxfp4";
    case Format::kFp8E4M3: return "fp8_e4m3";
    case Format::kFp8E5M2: return "fp8_e5m2";
  }
  return "?";
}

const char* block_name(Block b) {
  switch (b) {
    case Block::kTensor: return "tensor";
    case Block::k1x16: return "1x16";
    case Block::k16x16: return "16x16";
    case Block::k1x32: return "1x32";
  }
  return "?";
}

std::string describe(const QuantSpec& s) {
  std::string d = std::string(format_name(s.format)) + " " + block_name(s.block) + " " +
                  std::string(rounding_name(s.rounding));
  if (s.columnwise) d += " columnwise";
  if (s.rht) d += " rht";
  return d;
}

static bool is_fp8(Format f) { return f == Format::kFp8E4M3 || f == Format::kFp8E5M2; }

void validate(const QuantSpec& s, int64_t rows, int64_t cols) {
  const auto fail = [&](const std::string& why) {
    throw std::invalid_argument(describe(s) + " on a " + std::to_string(rows) + "x" + std::to_string(cols) +
                                " tensor: " + why);
  };
  if (rows <= 0 || cols <= 0) fail("the tensor is empty");
  const Block expected_1d = s.format == Format::kMxfp4 ? Block::k1x32 : Block::k1x16;
  if (is_fp8(s.format) && s.block != Block::kTensor) fail("fp8 uses one per-tensor scale (block 'tensor')");
  if (s.format == Format::kNvfp4 && s.block != Block::k1x16 && s.block != Block::k16x16)
    fail("nvfp4 takes 1x16 or 16x16 blocks");
  if (s.format == Format::kMxfp4 && s.block != Block::k1x32) fail("mxfp4 takes 1x32 blocks");
  if (s.rht && s.block == Block::k16x16) fail("the RHT applies to 1D blocks along the reduction dimension, not to 16x16 tiles");
  // Shape of the quantized matrix.
  const int64_t qr = s.columnwise ? cols : rows;
  const int64_t qc = s.columnwise ? rows : cols;
  const char* contiguous = s.columnwise ? "rows" : "columns";
  if (s.block == expected_1d || s.block == Block::k16x16) {
    const int64_t w = s.block == Block::k1x32 ? 32 : 16;
    if (qc % w != 0)
      fail(std::string("the number of ") + contiguous + " must be a multiple of " + std::to_string(w) +
           " (nibble does not pad)");
  }
  if (s.block == Block::k16x16 && qr % 16 != 0) fail("16x16 tiles need both dimensions to be multiples of 16");
  if (s.rht && qc % kRhtBlock != 0)
    fail(std::string("the RHT needs the number of ") + contiguous + " to be a multiple of 16");
}

int64_t QuantizedTensor::scale_rows() const {
  switch (spec.block) {
    case Block::kTensor: return 0;
    case Block::k16x16: return rows / 16;
    default: return rows;
  }
}

int64_t QuantizedTensor::scale_cols() const {
  switch (spec.block) {
    case Block::kTensor: return 0;
    case Block::k1x32: return cols / 32;
    default: return cols / 16;
  }
}

void rht_blocks(std::span<float> x, int64_t rows, int64_t cols, RhtSigns signs, bool inverse) {
  if (cols % kRhtBlock != 0) throw std::invalid_argument("rht_blocks: columns must be a multiple of 16");
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += kRhtBlock) {
      float* v = x.data() + r * cols + c;
      if (!inverse) {
        rht16(v, signs);
      } else {
        // H16 diag(signs) / 4: the butterfly with all-positive signs, then the signs.
        rht16(v, RhtSigns{0});
        for (int i = 0; i < kRhtBlock; ++i) v[i] *= signs.sign(i);
      }
    }
  }
}

namespace {

// Encodes n FP4 elements (n and index0, the index of v[0], even) with one element scale into n/2
// packed bytes; stochastic rounding draws one Philox block per 16 elements (fp4_random_word).
void encode_fp4_run(const float* v, int n, float scale, const QuantSpec& s, int64_t index0, uint8_t* out) {
  Philox4x32 bits{{0, 0, 0, 0}};
  for (int j = 0; j < n; j += 2) {
    const uint64_t index = static_cast<uint64_t>(index0 + j);
    const int in_group = static_cast<int>(index % kFp4ElementsPerGroup);
    if (s.rounding == Rounding::kStochastic && (j == 0 || in_group == 0))
      bits = random_words(s.seed, s.stream, index / kFp4ElementsPerGroup);
    const uint8_t lo = fp4_encode_element(v[j], scale, s.rounding, fp4_random_word(bits, in_group));
    const uint8_t hi = fp4_encode_element(v[j + 1], scale, s.rounding, fp4_random_word(bits, in_group + 1));
    out[j / 2] = static_cast<uint8_t>(lo | (hi << 4));
  }
}

// The matrix that gets quantized, in float: X or X^T, with the RHT applied if asked for.
template <typename T>
std::vector<float> prepare(std::span<const T> x, int64_t rows, int64_t cols, const QuantSpec& s) {
  if (static_cast<int64_t>(x.size()) != rows * cols)
    throw std::invalid_argument("quantize: the input holds " + std::to_string(x.size()) + " elements, not " +
                                std::to_string(rows) + "x" + std::to_string(cols));
  std::vector<float> m(static_cast<size_t>(rows * cols));
  if (!s.columnwise) {
    for (int64_t i = 0; i < rows * cols; ++i) m[i] = to_float(x[i]);
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) m[c * rows + r] = to_float(x[r * cols + c]);
  }
  if (s.rht) {
    const int64_t qr = s.columnwise ? cols : rows, qc = s.columnwise ? rows : cols;
    rht_blocks(m, qr, qc, s.rht_signs);
  }
  return m;
}

uint32_t amax_bits_of(const float* v, int64_t n) {
  uint32_t a = 0;
  for (int64_t i = 0; i < n; ++i) a = std::max(a, abs_bits(v[i]));
  return a;
}

void quantize_nvfp4(const std::vector<float>& m, QuantizedTensor& q) {
  const QuantSpec& s = q.spec;
  const int64_t tile_rows = s.block == Block::k16x16 ? 16 : 1;
  const TensorScale ts = nvfp4_tensor_scale(q.amax);
  q.decode_scale = ts.decode;
  for (int64_t r0 = 0; r0 < q.rows; r0 += tile_rows) {
    for (int64_t c0 = 0; c0 < q.cols; c0 += 16) {
      uint32_t block_amax = 0;
      for (int64_t r = r0; r < r0 + tile_rows; ++r) block_amax = std::max(block_amax, amax_bits_of(&m[r * q.cols + c0], 16));
      const uint8_t scale = nvfp4_block_scale_code(bits_float(block_amax), ts.encode);
      q.scales[(r0 / tile_rows) * q.scale_cols() + c0 / 16] = scale;
      const float e_b = nvfp4_element_encode_scale(scale, ts.decode);
      for (int64_t r = r0; r < r0 + tile_rows; ++r) {
        const int64_t i = r * q.cols + c0;
        encode_fp4_run(&m[i], 16, e_b, s, i, &q.data[i / 2]);
      }
    }
  }
}

void quantize_mxfp4(const std::vector<float>& m, QuantizedTensor& q) {
  const QuantSpec& s = q.spec;
  for (int64_t r = 0; r < q.rows; ++r) {
    for (int64_t c0 = 0; c0 < q.cols; c0 += 32) {
      const int64_t base = r * q.cols + c0;
      const uint32_t block_amax = amax_bits_of(&m[base], 32);
      const int64_t si = r * q.scale_cols() + c0 / 32;
      if (!amax_is_finite(block_amax)) {
        q.scales[si] = E8M0::kNanCode;  // elements stay zero
        continue;
      }
      const uint8_t scale = mxfp4_block_scale_code(bits_float(block_amax));
      q.scales[si] = scale;
      encode_fp4_run(&m[base], 32, mxfp4_element_encode_scale(scale), s, base, &q.data[base / 2]);
    }
  }
}

template <typename Fp8>
void quantize_fp8(const std::vector<float>& m, QuantizedTensor& q) {
  const TensorScale ts = fp8_tensor_scale(q.amax, Fp8::kMax);
  q.decode_scale = ts.decode;
  const QuantSpec& s = q.spec;
  for (int64_t i = 0; i < q.numel(); ++i) {
    const uint32_t bits =
        s.rounding == Rounding::kStochastic ? random_word(s.seed, s.stream, static_cast<uint64_t>(i)) : 0u;
    q.data[i] = Fp8::encode(m[i] * ts.encode, s.rounding, bits);
  }
}

template <typename T>
QuantizedTensor quantize_impl(std::span<const T> x, int64_t rows, int64_t cols, const QuantSpec& s) {
  validate(s, rows, cols);
  const std::vector<float> m = prepare(x, rows, cols, s);
  QuantizedTensor q;
  q.spec = s;
  q.rows = s.columnwise ? cols : rows;
  q.cols = s.columnwise ? rows : cols;
  q.data.assign(static_cast<size_t>(is_fp8(s.format) ? q.numel() : q.numel() / 2), 0);
  q.scales.assign(static_cast<size_t>(q.scale_rows() * q.scale_cols()), 0);
  const uint32_t amax = amax_bits_of(m.data(), q.numel());
  q.amax = bits_float(amax);
  if (s.format != Format::kMxfp4 && !amax_is_finite(amax)) {
    q.decode_scale = NAN;  // data and scales stay zero
    return q;
  }
  switch (s.format) {
    case Format::kNvfp4: quantize_nvfp4(m, q); break;
    case Format::kMxfp4: quantize_mxfp4(m, q); break;
    case Format::kFp8E4M3: quantize_fp8<E4M3>(m, q); break;
    case Format::kFp8E5M2: quantize_fp8<E5M2>(m, q); break;
  }
  return q;
}

}  // namespace

QuantizedTensor quantize(std::span<const float> x, int64_t rows, int64_t cols, const QuantSpec& spec) {
  return quantize_impl(x, rows, cols, spec);
}
QuantizedTensor quantize(std::span<const bf16_t> x, int64_t rows, int64_t cols, const QuantSpec& spec) {
  return quantize_impl(x, rows, cols, spec);
}

namespace {

// x' = code * block_scale * g for every element (g = 1 for MXFP4), block by block: the block scale
// is decoded once per block and E2M1 codes through a 16-entry table; same float operations, in the
// same order, as decoding element by element.
std::vector<float> dequantize_with(const QuantizedTensor& q, float g) {
  std::vector<float> out(static_cast<size_t>(q.numel()));
  if (!q.finite()) {
    std::fill(out.begin(), out.end(), NAN);
    return out;
  }
  float fp4[16];
  for (int c = 0; c < 16; ++c) fp4[c] = E2M1::decode(static_cast<uint8_t>(c));
  float* y = out.data();
  const uint8_t* d = q.data.data();
  switch (q.spec.format) {
    case Format::kNvfp4:
    case Format::kMxfp4: {
      const bool nv = q.spec.format == Format::kNvfp4;
      const int64_t width = nv ? 16 : 32;
      for (int64_t r = 0; r < q.rows; ++r) {
        const int64_t scale_row = q.spec.block == Block::k16x16 ? r / 16 : r;
        for (int64_t c0 = 0; c0 < q.cols; c0 += width) {
          const uint8_t code = q.scales[scale_row * q.scale_cols() + c0 / width];
          const float scale = nv ? E4M3::decode(code) : E8M0::decode(code);
          const int64_t i0 = r * q.cols + c0;
          for (int64_t k = 0; k < width; k += 2) {
            const uint8_t byte = d[(i0 + k) / 2];
            y[i0 + k] = nv ? fp4[byte & 0xF] * scale * g : fp4[byte & 0xF] * scale;
            y[i0 + k + 1] = nv ? fp4[byte >> 4] * scale * g : fp4[byte >> 4] * scale;
          }
        }
      }
      break;
    }
    case Format::kFp8E4M3:
      for (int64_t i = 0; i < q.numel(); ++i) y[i] = E4M3::decode(d[i]) * g;
      break;
    case Format::kFp8E5M2:
      for (int64_t i = 0; i < q.numel(); ++i) y[i] = E5M2::decode(d[i]) * g;
      break;
  }
  return out;
}

}  // namespace

std::vector<float> dequantize(const QuantizedTensor& q) { return dequantize_with(q, q.decode_scale); }

// Multiplying by g = 1 is exact, so these are dequantize()'s values without the tensor scale.
std::vector<float> dequantize_unscaled(const QuantizedTensor& q) { return dequantize_with(q, 1.0f); }

}  // namespace nibble
