// Device operand preparation (see operand_cuda.h). Built with -fmad=false: the RHT of an
// unquantized operand must round exactly as the CPU's (quant/rht.h is shared code).
#include "nibble/nn/cuda/operand_cuda.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "nibble/formats/minifloat.h"
#include "nibble/nn/operand.h"
#include "nibble/quant/cuda/fp4_decode_store.cuh"
#include "nibble/quant/cuda/quantize_cuda.h"
#include "nibble/quant/rht.h"
#include "nibble/tensor/block_scale_layout.h"

namespace nibble::nn::cuda {
namespace {

using nibble::cuda::QuantBuffers;

constexpr int kThreads = 256;
int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

template <typename Out>
__device__ Out from_float(float v);
template <>
__device__ float from_float<float>(float v) {
  return v;
}
// Round to nearest even, as BF16::encode does on the CPU (exact when v fits BF16).
template <>
__device__ uint16_t from_float<uint16_t>(float v) {
  return BF16::encode(v, Rounding::kNearestEven);
}

// An unquantized copy without RHT: same layout as the source, element by element.
template <typename T, typename Out>
__global__ void convert_kernel(const T* __restrict__ x, int64_t n, Out* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = from_float<Out>(to_float(x[i]));
}

// The same for FP32 -> BF16, four elements per thread (one 16-byte load, one 8-byte store): the
// conversion every bf16 operand goes through. The caller checks n % 4 == 0 and the alignment.
__global__ void convert_f32_bf16x4_kernel(const float4* __restrict__ x, int64_t n4, uint2* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n4) return;
  const float4 v = x[i];
  out[i] = make_uint2(from_float<uint16_t>(v.x) | static_cast<uint32_t>(from_float<uint16_t>(v.y)) << 16,
                      from_float<uint16_t>(v.z) | static_cast<uint32_t>(from_float<uint16_t>(v.w)) << 16);
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// An unquantized copy with RHT: one thread per 16-element segment of the operand's row; the
// operand is X^T when `transpose` (source rows x cols, operand cols x rows).
template <typename T, typename Out>
__global__ void convert_rht_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, bool transpose,
                                   RhtSigns signs, Out* __restrict__ out) {
  const int64_t q_rows = transpose ? cols : rows, q_cols = transpose ? rows : cols;
  const int64_t seg = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (seg >= q_rows * q_cols / kRhtBlock) return;
  // Segments of one operand column block are adjacent threads, so transposed reads coalesce.
  const int64_t r = seg % q_rows, c0 = (seg / q_rows) * kRhtBlock;
  float v[kRhtBlock];
#pragma unroll
  for (int j = 0; j < kRhtBlock; ++j) v[j] = to_float(transpose ? x[(c0 + j) * cols + r] : x[r * cols + c0 + j]);
  rht16(v, signs);
#pragma unroll
  for (int j = 0; j < kRhtBlock; ++j) out[r * q_cols + c0 + j] = from_float<Out>(v[j]);
}

// FP4 codes x block scales (no tensor scale), 16 elements per thread: one 8-byte load and 16-byte
// stores, so a warp reads and writes whole contiguous lines. The products have at most 6
// significant bits, so the BF16 output is exact (its upper 16 bits; the lower ones are zero).
template <typename Out>
__global__ void decode_fp4_kernel(Format format, Block block, int64_t rows, int64_t cols,
                                  const uint8_t* __restrict__ data, const uint8_t* __restrict__ scales,
                                  Out* __restrict__ out) {
  const int64_t seg = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (seg >= rows * cols / 16) return;
  const int64_t i0 = seg * 16, r = i0 / cols, c = i0 % cols;
  float scale;
  if (format == Format::kNvfp4) {
    const int64_t sr = block == Block::k16x16 ? r / 16 : r;
    scale = E4M3::decode(scales[sr * (cols / 16) + c / 16]);
  } else {
    scale = E8M0::decode(scales[r * (cols / 32) + c / 32]);
  }
  const uint2 packed = *reinterpret_cast<const uint2*>(data + i0 / 2);
  uint32_t bits[16];
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const uint32_t word = j < 8 ? packed.x : packed.y;
    bits[j] = __float_as_uint(E2M1::decode((word >> (4 * (j % 8))) & 0xF) * scale);
  }
  if constexpr (sizeof(Out) == 2) {
    uint4* dst = reinterpret_cast<uint4*>(out + i0);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t* b = bits + 8 * h;
      dst[h] = make_uint4((b[0] >> 16) | (b[1] & 0xFFFF0000u), (b[2] >> 16) | (b[3] & 0xFFFF0000u),
                          (b[4] >> 16) | (b[5] & 0xFFFF0000u), (b[6] >> 16) | (b[7] & 0xFFFF0000u));
    }
  } else {
    uint4* dst = reinterpret_cast<uint4*>(out + i0);
#pragma unroll
    for (int q = 0; q < 4; ++q) dst[q] = make_uint4(bits[4 * q], bits[4 * q + 1], bits[4 * q + 2], bits[4 * q + 3]);
  }
}

// NVFP4 codes x E4M3 block scales to BF16, the bits of decode_fp4_kernel in about 3 instructions
// per element (store_decoded16, as the fused pass writes its decoded values): grid (segments of a row /
// kThreads, rows), 16 elements a thread, no 64-bit division. `tiles16`: one scale per 16 x 16 tile.
__global__ void decode_nvfp4_bf16_kernel(int64_t cols, bool tiles16, const uint8_t* __restrict__ data,
                                         const uint8_t* __restrict__ scales, uint16_t* __restrict__ out) {
  const int64_t r = blockIdx.y, segs = cols / 16;
  const int64_t seg = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (seg >= segs) return;
  const int64_t i0 = r * cols + seg * 16;
  nibble::cuda::store_decoded16(out + i0, *reinterpret_cast<const uint2*>(data + i0 / 2),
                                scales[(tiles16 ? r / 16 : r) * segs + seg]);
}

// FP8 codes (or BF16 / FP32 values) to another GEMM type, element by element, exact.
template <typename In, typename Out>
__global__ void recode_kernel(Format fp8_format, const In* __restrict__ in, int64_t n, Out* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v;
  if constexpr (sizeof(In) == 1) {
    v = fp8_format == Format::kFp8E4M3 ? E4M3::decode(in[i]) : E5M2::decode(in[i]);
  } else if constexpr (sizeof(In) == 2) {
    v = BF16::decode(in[i]);
  } else {
    v = in[i];
  }
  out[i] = from_float<Out>(v);
}

// The fused NVFP4 pass (quantize_cuda.h) covers 1x16 blocks, RHT only on the columnwise side,
// and shapes of whole 16x16 tiles; it computes the same bits as the generic path.
bool fused_pass_applies(const QuantSpec& spec, int64_t rows, int64_t cols) {
  return spec.format == Format::kNvfp4 && spec.block == Block::k1x16 && (spec.columnwise || !spec.rht) &&
         rows % 16 == 0 && cols % 16 == 0;
}

nibble::cuda::RowColSpec rowcol_spec(RhtSigns signs, uint64_t seed) {
  nibble::cuda::RowColSpec s;
  s.rht_signs = signs;
  s.seed = seed;
  return s;
}

// Fills the rowwise or columnwise side of a fused-pass spec from one operand's QuantSpec.
void set_side(nibble::cuda::RowColSpec& s, bool columnwise, const QuantSpec& spec) {
  if (columnwise) {
    s.col_rounding = spec.rounding;
    s.col_rht = spec.rht;
    s.col_stream = spec.stream;
  } else {
    s.row_rounding = spec.rounding;
    s.row_stream = spec.stream;
  }
}

int64_t element_bytes(GemmType t) { return t == GemmType::kF32 ? 4 : t == GemmType::kBF16 ? 2 : 1; }

}  // namespace

void OperandCuda::allocate_packed(const QuantSpec& spec, int64_t q_rows, int64_t q_cols) {
  const int64_t n = q_rows * q_cols;
  const bool fp4 = spec.format == Format::kNvfp4 || spec.format == Format::kMxfp4;
  // Grow-only: the shared per-call operands of LinearContext serve layers of different shapes, and
  // a reallocation (cudaFree synchronises the device) per layer would stall every step.
  data_bytes_ = fp4 ? n / 2 : n;
  data_.reserve(static_cast<size_t>(data_bytes_));
  int64_t scale_count = 0;
  if (spec.block == Block::k1x16) scale_count = n / 16;
  if (spec.block == Block::k16x16) scale_count = n / 256;
  if (spec.block == Block::k1x32) scale_count = n / 32;
  scale_bytes_ = scale_count;
  scales_.reserve(static_cast<size_t>(scale_count));
  decode_scale_.reserve(1);
}

nibble::cuda::AmaxSlots AmaxSlotPair::take(cudaStream_t stream) {
  words_.reserve(4);
  const int current = turn_, next = 1 - turn_;
  if (!zero_[current]) NIBBLE_CUDA_CHECK(cudaMemsetAsync(words_.data() + 2 * current, 0, 2 * sizeof(uint32_t), stream));
  zero_[current] = false;
  zero_[next] = true;  // the pass zeroes it
  turn_ = next;
  return {words_.data() + 2 * current, words_.data() + 2 * next};
}

uint32_t* AmaxSlotPair::take_self_zeroing() {
  words_.reserve(4);
  zero_[turn_] = false;
  return words_.data() + 2 * turn_;
}

template <typename T>
void OperandCuda::make(const T* x, int64_t rows, int64_t cols, const OperandRecipe& r, Operand op,
                       RhtSigns signs, uint64_t seed, cudaStream_t stream, ForGemm for_gemm) {
  const bool columnwise = operand_columnwise(op);
  // Checked before anything changes, so that a rejected shape leaves no half-made operand behind.
  if (r.quantized()) validate(operand_quant_spec(r, op, signs, seed), rows, cols);
  if (!r.quantized() && r.rht && (columnwise ? rows : cols) % kRhtBlock != 0)
    throw std::invalid_argument(std::string(operand_name(op)) + ": the RHT needs the contiguous dimension (" +
                                std::to_string(columnwise ? rows : cols) + ") to be a multiple of 16");
  begin(r.format, r.quantized(), columnwise ? cols : rows, columnwise ? rows : cols, for_gemm);
  if (quantized_) {
    spec_ = operand_quant_spec(r, op, signs, seed);
    allocate_packed(spec_, rows_, cols_);
    if (fused_pass_applies(spec_, rows, cols)) {  // the faster kernel, with one side switched off
      nibble::cuda::RowColSpec s = rowcol_spec(signs, seed);
      (columnwise ? s.rowwise : s.columnwise) = false;
      set_side(s, columnwise, spec_);
      run_fused(x, rows, cols, s, amax_, columnwise ? nullptr : this, columnwise ? this : nullptr, stream);
      return;
    }
    if (nibble::cuda::nvfp4_tile16_applies(spec_) && aligned(x, 16)) {  // W or W^T alone, 16x16 tiles
      run_tile16(x, rows, cols, amax_, columnwise ? nullptr : this, columnwise ? this : nullptr, stream);
      return;
    }
    uint32_t* amax = amax_.take_self_zeroing();
    nibble::cuda::quantize_amax(x, rows, cols, spec_, amax, stream);
    nibble::cuda::quantize_segments(x, rows, cols, spec_, amax,
                                    QuantBuffers{data_.data(), scales_.data(), decode_scale_.data()}, stream);
    return;
  }
  const int64_t n = rows * cols;
  const bool bf16 = r.format == OperandFormat::kBf16;
  data_bytes_ = n * (bf16 ? 2 : 4);
  scale_bytes_ = 0;
  data_.reserve(static_cast<size_t>(data_bytes_));
  if (r.rht) {
    const int64_t segments = n / kRhtBlock;
    if (bf16)
      convert_rht_kernel<<<blocks_for(segments), kThreads, 0, stream>>>(
          x, rows, cols, columnwise, signs, reinterpret_cast<uint16_t*>(data_.data()));
    else
      convert_rht_kernel<<<blocks_for(segments), kThreads, 0, stream>>>(x, rows, cols, columnwise, signs,
                                                                         reinterpret_cast<float*>(data_.data()));
  } else {
    stored_as_source_ = columnwise;
    if constexpr (std::is_same_v<T, float>) {
      if (bf16 && n % 4 == 0 && aligned(x, 16)) {
        convert_f32_bf16x4_kernel<<<blocks_for(n / 4), kThreads, 0, stream>>>(
            reinterpret_cast<const float4*>(x), n / 4, reinterpret_cast<uint2*>(data_.data()));
        NIBBLE_CUDA_CHECK_LAUNCH();
        return;
      }
    }
    if (bf16)
      convert_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, n, reinterpret_cast<uint16_t*>(data_.data()));
    else
      convert_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, n, reinterpret_cast<float*>(data_.data()));
  }
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void OperandCuda::begin(OperandFormat format, bool quantized, int64_t rows, int64_t cols, ForGemm for_gemm) {
  format_ = format;
  quantized_ = quantized;
  rows_ = rows;
  cols_ = cols;
  stored_as_source_ = false;
  shared_values_ = nullptr;
  ++made_;
  decoded_wanted_ = for_gemm.decoded;
  decoded_valid_ = false;  // until run_fused writes them
  shared_decoded_ = nullptr;
  decoded_into_ = nullptr;
  packed_wanted_ = for_gemm.packed;
  packed_skipped_ = false;
  produced_amax_ = {};  // only the make_pair right after producer_amax reads it (taken before begin)
  // The alpha needs the partner's decode scale; an unquantized partner has none (the GEMM then
  // takes this operand's decode scale as its alpha).
  const bool alpha_wanted = quantized && for_gemm.partner != nullptr && for_gemm.partner->decode_scale() != nullptr;
  alpha_partner_ = alpha_wanted ? for_gemm.partner : nullptr;
  alpha_partner_made_ = alpha_wanted ? for_gemm.partner->made_ : 0;
  alpha_valid_ = false;  // until run_fused writes it
}

void OperandCuda::share_values_of(const OperandCuda& source, int64_t rows, int64_t cols) {
  begin(source.format_, /*quantized=*/false, rows, cols);
  data_bytes_ = source.data_bytes_;
  scale_bytes_ = 0;
  shared_values_ = source.data_.data();
}

bool OperandCuda::shared_pair_applies(const Recipe& recipe, Operand row_op, Operand col_op) {
  const OperandRecipe& rr = recipe[row_op];
  return !rr.quantized() && !rr.rht && rr == recipe[col_op] && !operand_columnwise(row_op) &&
         operand_columnwise(col_op);
}

bool OperandCuda::bf16_pair_applies(const Recipe& recipe, Operand row_op, Operand col_op) {
  return recipe[row_op].format == OperandFormat::kBf16 && shared_pair_applies(recipe, row_op, col_op);
}

bf16_t* OperandCuda::bf16_pair_source(int64_t rows, int64_t cols, OperandCuda& col) {
  col.data_.reserve(static_cast<size_t>(rows * cols * 2));
  return reinterpret_cast<bf16_t*>(col.data_.data());
}

void OperandCuda::adopt_bf16_pair(int64_t rows, int64_t cols, OperandCuda& row, OperandCuda& col) {
  // What make() leaves in a columnwise bf16 operand without RHT: the source tensor's values as they are.
  col.begin(OperandFormat::kBf16, /*quantized=*/false, cols, rows);
  col.stored_as_source_ = true;
  col.data_bytes_ = rows * cols * 2;
  col.scale_bytes_ = 0;
  row.share_values_of(col, rows, cols);
}

template <typename T>
bool OperandCuda::make_pair(const T* x, int64_t rows, int64_t cols, const Recipe& recipe, Operand row_op,
                            Operand col_op, uint64_t seed, OperandCuda& row, OperandCuda& col, cudaStream_t stream,
                            ForGemm row_gemm, ForGemm col_gemm, TailRequest tail) {
  const OperandRecipe& rr = recipe[row_op];
  const OperandRecipe& cr = recipe[col_op];
  const bool fused = fused_pair_applies(rows, cols, recipe, row_op, col_op);
  const nibble::cuda::AmaxSlots produced = std::exchange(row.produced_amax_, {});
  // Unquantized and untransformed on both sides (bf16, fp32): the columnwise operand is stored as the
  // source tensor, so it holds the very bytes the rowwise one needs: convert once, share.
  if (shared_pair_applies(recipe, row_op, col_op)) {
    col.make(x, rows, cols, cr, col_op, recipe.rht_signs(), seed, stream);
    row.share_values_of(col, rows, cols);
    return false;
  }
  if (!fused) {
    row.make(x, rows, cols, rr, row_op, recipe.rht_signs(), seed, stream, row_gemm);
    col.make(x, rows, cols, cr, col_op, recipe.rht_signs(), seed, stream, col_gemm);
    return false;
  }
  nibble::cuda::RowColSpec s = rowcol_spec(recipe.rht_signs(), seed);
  if (tail.operand != nullptr) s.tail_decode = tail.operand->bf16_decode_job(*tail.into);
  for (auto [o, op, r, for_gemm] :
       {std::tuple{&row, row_op, &rr, row_gemm}, std::tuple{&col, col_op, &cr, col_gemm}}) {
    const bool columnwise = operand_columnwise(op);
    o->begin(OperandFormat::kNvfp4, /*quantized=*/true, columnwise ? cols : rows, columnwise ? rows : cols, for_gemm);
    o->spec_ = operand_quant_spec(*r, op, recipe.rht_signs(), seed);
    o->allocate_packed(o->spec_, o->rows_, o->cols_);
    set_side(s, columnwise, o->spec_);
  }
  // The pass's amax words (rowwise, columnwise) live in the row operand's slots.
  run_fused(x, rows, cols, s, row.amax_, &row, &col, stream, produced);
  return s.tail_decode.out != nullptr;
}

nibble::cuda::TailDecode OperandCuda::bf16_decode_job(DeviceBuffer<uint8_t>& into) const {
  // gemm_matrix's decode_nvfp4_bf16_kernel case: packed NVFP4 codes, no decoded values of their own.
  if (!valid() || format_ != OperandFormat::kNvfp4 || !quantized_ || !has_packed() || decoded_valid_) return {};
  into.reserve(static_cast<size_t>(rows_ * cols_) * sizeof(uint16_t));
  return {data_.data(), scales_.data(), reinterpret_cast<uint16_t*>(into.data()), rows_, cols_,
          spec_.block == Block::k16x16};
}

bool OperandCuda::fused_pair_applies(int64_t rows, int64_t cols, const Recipe& recipe, Operand row_op,
                                     Operand col_op) {
  const OperandRecipe& rr = recipe[row_op];
  const OperandRecipe& cr = recipe[col_op];
  // The seed does not decide whether the pass applies.
  return operand_columnwise(col_op) && !operand_columnwise(row_op) && rr.quantized() && cr.quantized() &&
         fused_pass_applies(operand_quant_spec(rr, row_op, recipe.rht_signs(), 0), rows, cols) &&
         fused_pass_applies(operand_quant_spec(cr, col_op, recipe.rht_signs(), 0), rows, cols);
}

nibble::cuda::ProducerAmax OperandCuda::producer_amax(int64_t rows, int64_t cols, const Recipe& recipe,
                                                      Operand row_op, Operand col_op, OperandCuda& row,
                                                      cudaStream_t stream) {
  row.produced_amax_ = {};
  if (!fused_pair_applies(rows, cols, recipe, row_op, col_op)) return {};
  const QuantSpec col_spec = operand_quant_spec(recipe[col_op], col_op, recipe.rht_signs(), 0);
  nibble::cuda::ProducerAmax p;
  p.slots = row.amax_.take(stream);
  p.col_rht = col_spec.rht;
  p.rht_signs = col_spec.rht_signs;
  row.produced_amax_ = p.slots;
  return p;
}

template <typename T>
void OperandCuda::run_fused(const T* x, int64_t rows, int64_t cols, const nibble::cuda::RowColSpec& s,
                            AmaxSlotPair& amax, OperandCuda* row, OperandCuda* col, cudaStream_t stream,
                            nibble::cuda::AmaxSlots produced) {
  const auto buffers = [](OperandCuda* o) { return o ? o->pass_buffers(true, true) : QuantBuffers{}; };
  nibble::cuda::AmaxSlots slots = produced;
  if (slots.current == nullptr) {
    slots = amax.take(stream);
    nibble::cuda::nvfp4_amax(x, rows, cols, s, slots, stream);
  }
  nibble::cuda::nvfp4_quantize_rowcol(x, rows, cols, s, slots.current, buffers(row), buffers(col), stream);
}

QuantBuffers OperandCuda::pass_buffers(bool decoded, bool alpha) {
  QuantBuffers b{data_.data(), scales_.data(), decode_scale_.data()};
  if (decoded && decoded_wanted_) {
    DeviceBuffer<uint16_t>& decoded = decoded_buffer();
    decoded.reserve(static_cast<size_t>(rows_ * cols_));
    b.decoded = decoded.data();
    decoded_valid_ = true;
    if (!packed_wanted_) {
      b.data = b.scales = nullptr;
      packed_skipped_ = true;
    }
  }
  if (alpha && alpha_partner_ != nullptr) {
    alpha_.reserve(1);
    b.alpha_partner = alpha_partner_->decode_scale();
    b.alpha = alpha_.data();
    alpha_valid_ = true;
  }
  return b;
}

bool OperandCuda::tile16_pair_applies(const void* w, int64_t rows, int64_t cols, const Recipe& recipe, Operand row_op,
                                      Operand col_op) {
  const OperandRecipe& rr = recipe[row_op];
  const OperandRecipe& cr = recipe[col_op];
  if (!rr.quantized() || !cr.quantized() || operand_columnwise(row_op) || !operand_columnwise(col_op)) return false;
  // The seed does not decide whether the pass applies.
  if (!nibble::cuda::nvfp4_tile16_applies(operand_quant_spec(rr, row_op, recipe.rht_signs(), 0)) ||
      !nibble::cuda::nvfp4_tile16_applies(operand_quant_spec(cr, col_op, recipe.rht_signs(), 0)))
    return false;
  // Other shapes: make() reports them with the operand's name.
  return rows > 0 && cols > 0 && rows % 16 == 0 && cols % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
}

nibble::cuda::AmaxSlots OperandCuda::tile16_producer_amax(const void* w, int64_t rows, int64_t cols,
                                                          const Recipe& recipe, Operand row_op, Operand col_op,
                                                          OperandCuda& row, cudaStream_t stream) {
  row.produced_amax_ = tile16_pair_applies(w, rows, cols, recipe, row_op, col_op) ? row.amax_.take(stream)
                                                                                 : nibble::cuda::AmaxSlots{};
  return row.produced_amax_;
}

template <typename T>
bool OperandCuda::make_tile16_pair(const T* w, int64_t rows, int64_t cols, const Recipe& recipe, Operand row_op,
                                   Operand col_op, uint64_t seed, OperandCuda& row, OperandCuda& col,
                                   cudaStream_t stream, bool decoded, std::vector<nibble::cuda::Tile16Job>* jobs) {
  const nibble::cuda::AmaxSlots produced = std::exchange(row.produced_amax_, {});
  if (!tile16_pair_applies(w, rows, cols, recipe, row_op, col_op)) return false;
  const QuantSpec row_spec = operand_quant_spec(recipe[row_op], row_op, recipe.rht_signs(), seed);
  const QuantSpec col_spec = operand_quant_spec(recipe[col_op], col_op, recipe.rht_signs(), seed);
  for (auto [o, spec] : {std::pair{&row, row_spec}, std::pair{&col, col_spec}}) {
    o->begin(OperandFormat::kNvfp4, /*quantized=*/true, spec.columnwise ? cols : rows, spec.columnwise ? rows : cols,
             ForGemm{/*decoded=*/decoded && o == &row, nullptr, /*packed=*/!decoded});
    o->spec_ = spec;
    if (decoded) {  // no packed copies: the GEMMs read the decoded values alone
      o->decode_scale_.reserve(1);
      o->data_bytes_ = o->scale_bytes_ = 0;
      o->packed_skipped_ = true;
    } else {
      o->allocate_packed(spec, o->rows_, o->cols_);
    }
  }
  run_tile16(w, rows, cols, row.amax_, &row, &col, stream, produced, jobs);
  if (decoded) {
    col.shared_decoded_ = row.decoded_values();
    col.decoded_valid_ = true;
  }
  return true;
}

template <typename T>
void OperandCuda::run_tile16(const T* w, int64_t rows, int64_t cols, AmaxSlotPair& amax, OperandCuda* row,
                             OperandCuda* col, cudaStream_t stream, nibble::cuda::AmaxSlots produced,
                             std::vector<nibble::cuda::Tile16Job>* jobs) {
  // W's decoded values where asked for (W^T's are decoded by gemm_matrix, or read from W's); no
  // alphas. A side without packed copies takes its g alone.
  const auto buffers = [](OperandCuda* o, bool decoded) {
    if (o == nullptr) return QuantBuffers{};
    return o->packed_skipped_ && !o->decoded_wanted_ ? QuantBuffers{nullptr, nullptr, o->decode_scale_.data()}
                                                     : o->pass_buffers(decoded, false);
  };
  const QuantBuffers w_out = buffers(row, true), wt_out = buffers(col, false);
  nibble::cuda::AmaxSlots slots = produced;
  if (slots.current == nullptr) {
    nibble::cuda::RowColSpec amax_spec;  // max |w| alone: the 16x16 tiles take no RHT
    amax_spec.columnwise = false;
    slots = amax.take(stream);
    nibble::cuda::nvfp4_amax(w, rows, cols, amax_spec, slots, stream);
  }
  if constexpr (std::is_same_v<T, float>) {
    if (jobs != nullptr) {
      jobs->push_back({w, rows, cols, slots.current, w_out, wt_out});
      return;
    }
  }
  nibble::cuda::nvfp4_quantize_tile16(w, rows, cols, slots.current, w_out, wt_out, stream);
}

template void OperandCuda::make(const float*, int64_t, int64_t, const OperandRecipe&, Operand, RhtSigns, uint64_t,
                                cudaStream_t, ForGemm);
template void OperandCuda::make(const bf16_t*, int64_t, int64_t, const OperandRecipe&, Operand, RhtSigns, uint64_t,
                                cudaStream_t, ForGemm);
template bool OperandCuda::make_pair(const float*, int64_t, int64_t, const Recipe&, Operand, Operand, uint64_t,
                                     OperandCuda&, OperandCuda&, cudaStream_t, ForGemm, ForGemm,
                                     OperandCuda::TailRequest);
template bool OperandCuda::make_pair(const bf16_t*, int64_t, int64_t, const Recipe&, Operand, Operand, uint64_t,
                                     OperandCuda&, OperandCuda&, cudaStream_t, ForGemm, ForGemm,
                                     OperandCuda::TailRequest);
template bool OperandCuda::make_tile16_pair(const float*, int64_t, int64_t, const Recipe&, Operand, Operand, uint64_t,
                                            OperandCuda&, OperandCuda&, cudaStream_t, bool,
                                            std::vector<nibble::cuda::Tile16Job>*);
template bool OperandCuda::make_tile16_pair(const bf16_t*, int64_t, int64_t, const Recipe&, Operand, Operand,
                                            uint64_t, OperandCuda&, OperandCuda&, cudaStream_t, bool,
                                            std::vector<nibble::cuda::Tile16Job>*);

GemmType OperandCuda::native_type() const {
  switch (format_) {
    case OperandFormat::kFp32: return GemmType::kF32;
    case OperandFormat::kFp8E4M3: return GemmType::kE4M3;
    case OperandFormat::kFp8E5M2: return GemmType::kE5M2;
    default: return GemmType::kBF16;
  }
}

bool OperandCuda::native_nvfp4() const {
  return has_packed() && spec_.format == Format::kNvfp4 &&
         (spec_.block == Block::k1x16 || spec_.block == Block::k16x16);
}

GemmMatrix OperandCuda::nvfp4_matrix(bool as_b, DeviceBuffer<uint8_t>& scratch, cudaStream_t stream) const {
  if (!native_nvfp4())
    throw std::logic_error("OperandCuda::nvfp4_matrix: the operand is not NVFP4 with 16-element blocks along K");
  const int64_t scale_cols = cols_ / 16;
  scratch.reserve(static_cast<size_t>(tiled_scale_bytes(rows_, scale_cols)));
  nibble::cuda::tile_block_scales(scales_.data(), rows_, scale_cols, spec_.block == Block::k16x16 ? 16 : 1,
                                  scratch.data(), stream);
  GemmMatrix m;
  m.data = data_.data();
  m.type = GemmType::kNvfp4;
  m.transposed = as_b;  // quantized operands are stored as the operand, never as the source
  m.block_scales = scratch.data();
  return m;
}

nibble::cuda::Nvfp4Operand OperandCuda::nvfp4_operand() const {
  if (!native_nvfp4())
    throw std::logic_error("OperandCuda::nvfp4_operand: the operand is not NVFP4 with 16-element blocks along K");
  return nibble::cuda::Nvfp4Operand{data_.data(), scales_.data(), spec_.block == Block::k16x16 ? 16 : 1};
}

GemmMatrix OperandCuda::gemm_matrix(GemmType type, bool as_b, DeviceBuffer<uint8_t>& scratch,
                                    cudaStream_t stream) const {
  if (!valid()) throw std::logic_error("OperandCuda::gemm_matrix: the operand was not made");
  const int64_t n = rows_ * cols_;
  GemmMatrix m;
  m.type = type;
  // A reads the operand as stored ([rows x cols]); B reads its transpose. A copy stored as the
  // source tensor is already the transpose.
  m.transposed = as_b != stored_as_source_;
  if (type == native_type() && !is_fp4(format_)) {
    m.data = values();
    return m;
  }
  if (type == GemmType::kBF16 && decoded_valid_ && is_fp4(format_)) {  // written by the fused or 16x16 pass
    m.data = shared_decoded_ ? shared_decoded_ : decoded_values();
    if (shared_decoded_) m.transposed = !as_b;  // stored as the source tensor, the operand's transpose
    return m;
  }
  if (type == GemmType::kBF16 && decoded_into_ != nullptr) {  // bf16_decode_job's, run by another kernel
    m.data = decoded_into_;
    return m;
  }
  if (type != GemmType::kBF16 && type != GemmType::kF32)
    throw std::invalid_argument("OperandCuda::gemm_matrix: cannot feed this operand as FP8");
  if (quantized_ && !has_packed())
    throw std::logic_error("OperandCuda::gemm_matrix: the operand was made with its decoded BF16 values only");
  scratch.reserve(static_cast<size_t>(n * element_bytes(type)));
  const bool to_bf16 = type == GemmType::kBF16;
  auto* out_bf16 = reinterpret_cast<uint16_t*>(scratch.data());
  auto* out_f32 = reinterpret_cast<float*>(scratch.data());
  if (format_ == OperandFormat::kNvfp4 && to_bf16 && rows_ <= 65535) {  // grid y limit
    const int64_t segs = cols_ / 16, threads = std::min<int64_t>(kThreads, (segs + 31) / 32 * 32);  // short rows
    const dim3 grid(static_cast<unsigned>((segs + threads - 1) / threads), static_cast<unsigned>(rows_));
    decode_nvfp4_bf16_kernel<<<grid, static_cast<unsigned>(threads), 0, stream>>>(
        cols_, spec_.block == Block::k16x16, data_.data(), scales_.data(), out_bf16);
  } else if (is_fp4(format_)) {
    const int grid = blocks_for(n / 16);
    if (to_bf16)
      decode_fp4_kernel<<<grid, kThreads, 0, stream>>>(spec_.format, spec_.block, rows_, cols_, data_.data(),
                                                       scales_.data(), out_bf16);
    else
      decode_fp4_kernel<<<grid, kThreads, 0, stream>>>(spec_.format, spec_.block, rows_, cols_, data_.data(),
                                                       scales_.data(), out_f32);
  } else if (quantized_) {  // FP8 codes as BF16 / FP32
    if (to_bf16)
      recode_kernel<<<blocks_for(n), kThreads, 0, stream>>>(spec_.format, data_.data(), n, out_bf16);
    else
      recode_kernel<<<blocks_for(n), kThreads, 0, stream>>>(spec_.format, data_.data(), n, out_f32);
  } else if (format_ == OperandFormat::kBf16 && !to_bf16) {  // BF16 meeting an FP32 operand
    recode_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
        Format::kNvfp4, reinterpret_cast<const uint16_t*>(values()), n, out_f32);
  } else {
    throw std::logic_error("OperandCuda::gemm_matrix: an FP32 operand is never narrowed (see gemm_types)");
  }
  NIBBLE_CUDA_CHECK_LAUNCH();
  m.data = scratch.data();
  return m;
}

int64_t OperandCuda::bytes() const {
  return data_bytes_ + scale_bytes_ + (quantized_ ? static_cast<int64_t>(sizeof(float)) : 0);
}

QuantizedTensor OperandCuda::download() const {
  if (!quantized_) throw std::logic_error("OperandCuda::download: the operand is not quantized");
  if (!has_packed()) throw std::logic_error("OperandCuda::download: the operand was made without its packed copy");
  QuantizedTensor q;
  q.spec = spec_;
  q.rows = rows_;
  q.cols = cols_;
  q.data.resize(static_cast<size_t>(data_bytes_));
  q.scales.resize(static_cast<size_t>(scale_bytes_));
  NIBBLE_CUDA_CHECK(cudaMemcpy(q.data.data(), data_.data(), q.data.size(), cudaMemcpyDeviceToHost));
  if (!q.scales.empty())
    NIBBLE_CUDA_CHECK(cudaMemcpy(q.scales.data(), scales_.data(), q.scales.size(), cudaMemcpyDeviceToHost));
  q.decode_scale = decode_scale_.download()[0];
  return q;
}

std::pair<GemmType, GemmType> gemm_types(const OperandCuda& a, const OperandCuda& b) {
  const GemmType ta = a.native_type(), tb = b.native_type();
  const auto fp8 = [](GemmType t) { return t == GemmType::kE4M3 || t == GemmType::kE5M2; };
  const bool fp8_shape = a.rows() % 16 == 0 && b.rows() % 16 == 0 && a.cols() % 16 == 0;
  if (fp8(ta) && fp8(tb) && !(ta == GemmType::kE5M2 && tb == GemmType::kE5M2) && fp8_shape) return {ta, tb};
  if (ta == GemmType::kF32 || tb == GemmType::kF32) return {GemmType::kF32, GemmType::kF32};
  return {GemmType::kBF16, GemmType::kBF16};
}

bool use_native_nvfp4(const OperandCuda& a, const OperandCuda& b, bool native_available) {
  return native_available && a.native_nvfp4() && b.native_nvfp4() && a.rows() % 16 == 0 && b.rows() % 16 == 0 &&
         a.cols() % 32 == 0;
}

}  // namespace nibble::nn::cuda
