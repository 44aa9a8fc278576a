// cuBLASLt behind GemmRunner (see gemm_cuda.h).
//
// cuBLASLt is column-major. A row-major matrix read as column-major is its transpose, so the
// row-major product C = op(A) op(B) is computed as the column-major product C^T = op(B)^T op(A)^T:
// cuBLASLt's first operand is our B, its second our A, and the transpose flags carry over
// (our "B transposed" = B stored [n x k] = cuBLASLt's transa = T).
//
// NVFP4 GEMMs (Blackwell) are cuBLASLt's "TN" case: its first operand (our B, [n x k] row-major)
// with transa = T, its second (our A, [m x k] row-major) with transb = N, both K-contiguous; so its
// A scales are our B's and its B scales our A's.
#include "nibble/tensor/cuda/gemm_cuda.h"

#include <cublasLt.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>

#include "nibble/tensor/block_scale_layout.h"
#include "nibble/tensor/cuda/device_buffer.h"

namespace nibble::cuda {
namespace {

// cuBLASLt has no status-to-text function of its own (cublasGetStatusName is in libcublas).
std::string status_text(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    default: return "cublasStatus_t " + std::to_string(static_cast<int>(status));
  }
}

void check_cublas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error("cuBLASLt error " + status_text(status) + " in " + call);
}
#define NIBBLE_CUBLAS_CHECK(call) check_cublas((call), #call)

cudaDataType_t cuda_type(GemmType t) {
  switch (t) {
    case GemmType::kF32: return CUDA_R_32F;
    case GemmType::kBF16: return CUDA_R_16BF;
    case GemmType::kE4M3: return CUDA_R_8F_E4M3;
    case GemmType::kE5M2: return CUDA_R_8F_E5M2;
    case GemmType::kNvfp4: return CUDA_R_4F_E2M1;
  }
  throw std::invalid_argument("GemmRunner: unknown GemmType");
}

bool is_fp8(GemmType t) { return t == GemmType::kE4M3 || t == GemmType::kE5M2; }

// Largest power of two (up to 256) dividing the address: cuBLASLt picks kernels by alignment.
int64_t alignment(const void* p) {
  auto a = reinterpret_cast<uintptr_t>(p);
  int64_t align = 256;
  while (align > 1 && (a % static_cast<uintptr_t>(align)) != 0) align /= 2;
  return align;
}

constexpr size_t kWorkspaceBytes = 32u << 20;  // cuBLASLt's recommendation for Hopper

// Sum over the buffer of a mix of each 16-bit word with its index: any change of a word changes
// the sum but with probability about 2^-64, and the sum does not depend on the order of the adds.
constexpr int kHashBlocks = 264, kHashThreads = 256;
__global__ void hash_halfwords_kernel(const uint16_t* __restrict__ words, size_t count, unsigned long long* hash) {
  unsigned long long sum = 0;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    unsigned long long z = (static_cast<unsigned long long>(i) << 16 | words[i]) + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;  // splitmix64's finaliser: a bijection
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    sum += z ^ (z >> 31);
  }
  atomicAdd(hash, sum);
}

__global__ void multiply_scalars_kernel(const float* a, const float* b, float* out) { *out = *a * *b; }

// One thread per slot of the padded scale matrix (padding included, so every byte of `tiled` is
// written): the loop body of nibble::tile_block_scales (block_scale_layout.h), the same functions.
__global__ void tile_block_scales_kernel(const uint8_t* __restrict__ scales, int64_t rows, int64_t scale_cols,
                                         int64_t rows_per_scale_row, uint8_t* __restrict__ tiled) {
  const int64_t padded_cols = tiled_scale_cols(scale_cols);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= tiled_scale_rows(rows) * padded_cols) return;
  const int64_t row = i / padded_cols, kb = i % padded_cols;
  tiled[tiled_scale_offset(row, kb, scale_cols)] = source_scale(scales, rows, scale_cols, rows_per_scale_row, row, kb);
}

}  // namespace

struct GemmRunner::Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t layout_first = nullptr, layout_second = nullptr, layout_c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  // The heuristic's list (kTuneCandidates at most), until the first run times them.
  cublasLtMatmulAlgo_t candidates[GemmRunner::kTuneCandidates]{};
  int candidate_count = 0;
  std::string name;  // for the tuning log
  ~Plan() {
    if (layout_c) cublasLtMatrixLayoutDestroy(layout_c);
    if (layout_second) cublasLtMatrixLayoutDestroy(layout_second);
    if (layout_first) cublasLtMatrixLayoutDestroy(layout_first);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

GemmRunner::GemmRunner(bool tune) {
  cublasLtHandle_t handle = nullptr;
  NIBBLE_CUBLAS_CHECK(cublasLtCreate(&handle));
  handle_ = handle;
  NIBBLE_CUDA_CHECK(cudaMalloc(&workspace_, kWorkspaceBytes));
  workspace_bytes_ = kWorkspaceBytes;
  // NIBBLE_GEMM_WORKSPACE=<bytes> (at most the default) limits what the algorithms may use, for
  // measurements: cuBLASLt zeroes a 4-byte word of it before many of its Hopper kernels (a memset
  // and its gaps, about 100 a training step), which algorithms without a workspace may not need.
  if (const char* ws = std::getenv("NIBBLE_GEMM_WORKSPACE"); ws != nullptr && *ws != '\0')
    workspace_bytes_ = std::min<size_t>(kWorkspaceBytes, std::strtoull(ws, nullptr, 10));
  const char* setting = std::getenv("NIBBLE_GEMM_TUNE");
  autotune_ = tune && !(setting != nullptr && std::string(setting) == "0");
  const float constants[3] = {1.0f, 0.0f, 1.0f};
  NIBBLE_CUDA_CHECK(cudaMalloc(&constants_, sizeof(constants)));
  NIBBLE_CUDA_CHECK(cudaMemcpy(constants_, constants, sizeof(constants), cudaMemcpyHostToDevice));
}

GemmRunner::~GemmRunner() {
  plans_.clear();
  if (constants_) cudaFree(constants_);
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(static_cast<cublasLtHandle_t>(handle_));
}

GemmRunner::Plan& GemmRunner::plan(const Key& key, const void* scales_first, const void* scales_second,
                                   const void* aux) {
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;
  const auto [m, n, k, batch, ta, tb, type_a, type_b, type_c, epi, beta_one, align_pack, stride_a, stride_b,
              stride_c] = key;
  const bool trans_a = ta != 0, trans_b = tb != 0;
  const auto tya = static_cast<GemmType>(type_a), tyb = static_cast<GemmType>(type_b),
             tyc = static_cast<GemmType>(type_c);
  const auto epilogue = static_cast<GemmEpilogue>(epi);

  auto p = std::make_unique<Plan>();
  NIBBLE_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasLtPointerMode_t mode = CUBLASLT_POINTER_MODE_DEVICE;
  NIBBLE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_POINTER_MODE, &mode, sizeof(mode)));
  // cuBLASLt's first operand is our B, its second our A (see the top of this file).
  const cublasOperation_t op_first = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  NIBBLE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)));
  NIBBLE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)));
  if (tya == GemmType::kNvfp4) {  // E4M3 scales per 16 elements along K on both operands
    const int32_t scale_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC16_UE4M3;
    NIBBLE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &scale_mode,
                                                       sizeof(scale_mode)));
    NIBBLE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &scale_mode,
                                                       sizeof(scale_mode)));
    // The scale pointers change per call (run() sets them); the heuristic sees the first call's.
    NIBBLE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &scales_first,
                                                       sizeof(scales_first)));
    NIBBLE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &scales_second,
                                                       sizeof(scales_second)));
  }

  if (epilogue != GemmEpilogue::kNone) {
    const cublasLtEpilogue_t mode =
        epilogue == GemmEpilogue::kGeluAux ? CUBLASLT_EPILOGUE_GELU_AUX : CUBLASLT_EPILOGUE_DGELU;
    NIBBLE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &mode, sizeof(mode)));
    // The GELU input has C's shape and layout: column-major n x m (our row-major [m x n]), ld n.
    const int64_t aux_ld = n;
    NIBBLE_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld)));
    // The pointer changes per call (run() sets it); the heuristic reads the first call's alignment.
    NIBBLE_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux)));
  }

  // Column-major shapes as stored: our B is [k x n] row-major (n x k col-major) or, transposed,
  // [n x k] row-major (k x n col-major); likewise A.
  const uint64_t first_rows = trans_b ? k : n, first_cols = trans_b ? n : k;
  const uint64_t second_rows = trans_a ? m : k, second_cols = trans_a ? k : m;
  NIBBLE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->layout_first, cuda_type(tyb), first_rows, first_cols, first_rows));
  NIBBLE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->layout_second, cuda_type(tya), second_rows, second_cols, second_rows));
  NIBBLE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->layout_c, cuda_type(tyc), n, m, n));
  if (batch > 1) {
    const int32_t count = static_cast<int32_t>(batch);
    const std::pair<cublasLtMatrixLayout_t, int64_t> layouts[3] = {
        {p->layout_first, stride_b}, {p->layout_second, stride_a}, {p->layout_c, stride_c}};
    for (const auto& [layout, stride] : layouts) {
      NIBBLE_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
      NIBBLE_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                           sizeof(stride)));
    }
  }

  cublasLtMatmulPreference_t pref = nullptr;
  NIBBLE_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  NIBBLE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                           &workspace_bytes_, sizeof(workspace_bytes_)));
  // Alignments of the first/second/C pointers (and the epilogue's aux, which the heuristic reads from
  // the descriptor), packed 4 x 9 bits into the key's align_pack.
  const uint32_t align_first = static_cast<uint32_t>(align_pack & 511), align_second = static_cast<uint32_t>((align_pack >> 9) & 511),
                 align_c = static_cast<uint32_t>((align_pack >> 18) & 511);
  NIBBLE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_first, sizeof(align_first)));
  NIBBLE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_second, sizeof(align_second)));
  NIBBLE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c, sizeof(align_c)));
  NIBBLE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c, sizeof(align_c)));
  // Not tuned: native FP4 (untested hardware) and GEMMs of 2^38 multiply-adds or more (8192^3 is
  // 2^39), which run long enough to be bound by the GPU's power and clocks: a few short timed runs
  // at the first call then misjudge them (8192^3 kept a kernel 11-14% slower than the heuristic's
  // in the steady state, docs/benchmarks.md session 16). GPT-2 124M's largest GEMM, the LM head's
  // chunk, is about 2^36.6.
  const bool tunable = tya != GemmType::kNvfp4 && static_cast<double>(m) * n * k * batch < 0x1p38;
  const int wanted = autotune_ && tunable ? kTuneCandidates : 1;
  cublasLtMatmulHeuristicResult_t results[kTuneCandidates]{};
  int found = 0;
  const cublasStatus_t status =
      cublasLtMatmulAlgoGetHeuristic(static_cast<cublasLtHandle_t>(handle_), p->desc, p->layout_first, p->layout_second,
                                     p->layout_c, p->layout_c, pref, wanted, results, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (status != CUBLAS_STATUS_SUCCESS || found == 0) {
    throw std::invalid_argument("GemmRunner: cuBLASLt has no kernel for m=" + std::to_string(m) + " n=" +
                                std::to_string(n) + " k=" + std::to_string(k) + " batch=" + std::to_string(batch) +
                                " with these types/layouts (" + status_text(status) + ")");
  }
  p->algo = results[0].algo;
  p->name = "m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k) + " batch=" +
            std::to_string(batch) + (trans_a ? " A^T" : "") + (trans_b ? " B^T" : "") + " C " +
            (tyc == GemmType::kF32 ? "f32" : "bf16") + (beta_one != 0 ? " +=" : "") +
            (epilogue == GemmEpilogue::kGeluAux    ? " gelu"
             : epilogue == GemmEpilogue::kGeluGrad ? " dgelu"
                                                   : "");
  if (found > 1)
    for (int i = 0; i < found; ++i) p->candidates[p->candidate_count++] = results[i].algo;
  return *plans_.emplace(key, std::move(p)).first->second;
}

void GemmRunner::run(int64_t m, int64_t n, int64_t k, const GemmMatrix& a, const GemmMatrix& b, const GemmOutput& c,
                     const float* alpha, bool accumulate, cudaStream_t stream, int64_t batch) {
  if (m <= 0 || n <= 0 || k <= 0 || batch <= 0) {
    throw std::invalid_argument("GemmRunner: empty GEMM m=" + std::to_string(m) + " n=" + std::to_string(n) +
                                " k=" + std::to_string(k));
  }
  if (c.type != GemmType::kF32 && c.type != GemmType::kBF16) {
    throw std::invalid_argument("GemmRunner: the output must be FP32 or BF16");
  }
  if (a.type == GemmType::kNvfp4 || b.type == GemmType::kNvfp4) {
    if (a.type != b.type) throw std::invalid_argument("GemmRunner: an NVFP4 GEMM needs both operands NVFP4");
    if (!native_fp4_available()) {
      throw std::invalid_argument(
          "GemmRunner: NVFP4 GEMMs need compute capability >= 10.0 (Blackwell); on Hopper, decode FP4 "
          "operands to BF16");
    }
    if (a.transposed || !b.transposed) {
      throw std::invalid_argument("GemmRunner: NVFP4 GEMMs need A [m x k] and B [n x k] (reduction contiguous)");
    }
    if (m % 16 != 0 || n % 16 != 0 || k % 32 != 0) {
      throw std::invalid_argument("GemmRunner: NVFP4 GEMMs need m, n multiples of 16 and k of 32, got m=" +
                                  std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k));
    }
    if (a.block_scales == nullptr || b.block_scales == nullptr) {
      throw std::invalid_argument("GemmRunner: NVFP4 GEMMs need both operands' tiled block scales");
    }
    if (batch != 1) throw std::invalid_argument("GemmRunner: NVFP4 GEMMs are not batched");
  }
  if (is_fp8(a.type) != is_fp8(b.type) || (!is_fp8(a.type) && a.type != b.type)) {
    throw std::invalid_argument("GemmRunner: A and B must be both FP8 or of the same type");
  }
  if (is_fp8(a.type)) {
    if (a.transposed || !b.transposed) {
      throw std::invalid_argument("GemmRunner: FP8 GEMMs need A [m x k] and B [n x k] (reduction contiguous)");
    }
    if (m % 16 != 0 || n % 16 != 0 || k % 16 != 0) {
      throw std::invalid_argument("GemmRunner: FP8 GEMMs need m, n, k multiples of 16");
    }
    if (a.type == GemmType::kE5M2 && b.type == GemmType::kE5M2) {
      throw std::invalid_argument("GemmRunner: E5M2 x E5M2 has no FP8 tensor-core kernel");
    }
  }
  const bool epilogue = c.epilogue != GemmEpilogue::kNone;
  if (epilogue) {
    const char* refusal = a.type != GemmType::kBF16 || c.type != GemmType::kBF16 ? "BF16 operands and output"
                          : accumulate                                          ? "no accumulation"
                          : batch != 1                                          ? "no batches"
                          : c.aux == nullptr || c.aux == c.data                 ? "a GELU input (aux) apart from C"
                          : n % 8 != 0                                          ? "n a multiple of 8"
                                                                                : nullptr;
    if (refusal != nullptr)
      throw std::invalid_argument(std::string("GemmRunner: a GELU epilogue needs ") + refusal + " (m=" +
                                  std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k) + ")");
  }
  const int64_t align_pack = alignment(b.data) | (alignment(a.data) << 9) | (alignment(c.data) << 18) |
                             (epilogue ? alignment(c.aux) << 27 : 0);
  const Key key{m, n, k, batch, a.transposed, b.transposed, static_cast<int>(a.type), static_cast<int>(b.type),
                static_cast<int>(c.type), static_cast<int>(c.epilogue), accumulate ? 1 : 0, align_pack,
                batch > 1 ? a.batch_stride : 0, batch > 1 ? b.batch_stride : 0, batch > 1 ? c.batch_stride : 0};
  Plan& p = plan(key, b.block_scales, a.block_scales, c.aux);
  if (epilogue) {
    NIBBLE_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &c.aux, sizeof(c.aux)));
  }
  if (a.type == GemmType::kNvfp4) {  // cuBLASLt's A is our B (see the top of this file)
    NIBBLE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &b.block_scales,
                                                       sizeof(b.block_scales)));
    NIBBLE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &a.block_scales,
                                                       sizeof(a.block_scales)));
  }
  const float* alpha_ptr = alpha != nullptr ? alpha : constants_;
  const float* beta_ptr = accumulate ? constants_ + 2 : constants_ + 1;
  if (p.candidate_count > 0) {
    const int64_t c_elements = (batch - 1) * c.batch_stride + m * n;
    tune(p, a.data, b.data, c.data, c_elements * (c.type == GemmType::kF32 ? 4 : 2),
         c.epilogue == GemmEpilogue::kGeluAux ? c.aux : nullptr, alpha_ptr, beta_ptr, accumulate, stream);
  }
  NIBBLE_CUBLAS_CHECK(cublasLtMatmul(static_cast<cublasLtHandle_t>(handle_), p.desc, alpha_ptr, b.data, p.layout_first,
                                     a.data, p.layout_second, beta_ptr, c.data, p.layout_c, c.data, p.layout_c, &p.algo,
                                     workspace_, workspace_bytes_, stream));
}

// Picks the fastest of the heuristic's candidates that computes the same bits as its first choice
// (so tuning changes speed, never results: a resumed or repeated run takes the same values whatever
// the timings; a GELU_AUX epilogue's second output is compared too). Each runs on the call's own
// operands into C itself (the real call overwrites it after); when accumulating, C's values are kept
// in a copy and put back before each check and at the end. The timings take rounds over all
// candidates in turn (each candidate's median of kRounds), so that the clocks' drift while the GPU
// warms up falls on all of them alike.
void GemmRunner::tune(Plan& p, const void* a, const void* b, void* c, size_t c_bytes, const void* aux_written,
                      const float* alpha, const float* beta, bool accumulate, cudaStream_t stream) {
  const int count = std::exchange(p.candidate_count, 0);
  DeviceBuffer<uint8_t> saved(accumulate ? c_bytes : 0);
  if (accumulate) NIBBLE_CUDA_CHECK(cudaMemcpyAsync(saved.data(), c, c_bytes, cudaMemcpyDeviceToDevice, stream));
  DeviceBuffer<unsigned long long> hash(1);
  const auto handle = static_cast<cublasLtHandle_t>(handle_);
  auto matmul = [&](int i) {
    return cublasLtMatmul(handle, p.desc, alpha, b, p.layout_first, a, p.layout_second, beta, c, p.layout_c, c,
                          p.layout_c, &p.candidates[i], workspace_, workspace_bytes_, stream);
  };
  bool same[kTuneCandidates]{};  // runs here and gives the first candidate's bits
  unsigned long long reference = 0;
  for (int i = 0; i < count; ++i) {  // which candidates run here, and which give the first one's bits
    if (accumulate) NIBBLE_CUDA_CHECK(cudaMemcpyAsync(c, saved.data(), c_bytes, cudaMemcpyDeviceToDevice, stream));
    if (matmul(i) != CUBLAS_STATUS_SUCCESS) continue;  // the heuristic may list kernels that cannot run
    NIBBLE_CUDA_CHECK(cudaMemsetAsync(hash.data(), 0, sizeof(unsigned long long), stream));
    for (const void* out : {static_cast<const void*>(c), aux_written}) {
      if (out == nullptr) continue;
      hash_halfwords_kernel<<<kHashBlocks, kHashThreads, 0, stream>>>(static_cast<const uint16_t*>(out), c_bytes / 2,
                                                                       hash.data());
      NIBBLE_CUDA_CHECK_LAUNCH();
    }
    unsigned long long h = 0;
    NIBBLE_CUDA_CHECK(cudaMemcpyAsync(&h, hash.data(), sizeof(h), cudaMemcpyDeviceToHost, stream));
    NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (i == 0) reference = h;
    same[i] = h == reference;
  }
  constexpr int kRounds = 3, kRepeats = 5;
  float ms[kTuneCandidates][kRounds]{};
  cudaEvent_t start = nullptr, stop = nullptr;
  NIBBLE_CUDA_CHECK(cudaEventCreate(&start));
  NIBBLE_CUDA_CHECK(cudaEventCreate(&stop));
  for (int round = 0; round < kRounds && same[0]; ++round)
    for (int i = 0; i < count; ++i) {
      if (!same[i]) continue;
      NIBBLE_CUDA_CHECK(cudaEventRecord(start, stream));
      for (int r = 0; r < kRepeats; ++r) NIBBLE_CUBLAS_CHECK(matmul(i));
      NIBBLE_CUDA_CHECK(cudaEventRecord(stop, stream));
      NIBBLE_CUDA_CHECK(cudaEventSynchronize(stop));
      NIBBLE_CUDA_CHECK(cudaEventElapsedTime(&ms[i][round], start, stop));
    }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  if (accumulate) NIBBLE_CUDA_CHECK(cudaMemcpyAsync(c, saved.data(), c_bytes, cudaMemcpyDeviceToDevice, stream));
  NIBBLE_CUDA_CHECK(cudaStreamSynchronize(stream));  // `saved` is freed on return

  float median[kTuneCandidates]{};
  int best = 0, same_bits = 0;
  for (int i = 0; i < count; ++i) {
    if (!same[i]) continue;
    std::sort(ms[i], ms[i] + kRounds);
    median[i] = ms[i][kRounds / 2] / kRepeats;
    ++same_bits;
    if (median[i] < median[best]) best = i;
  }
  p.algo = p.candidates[best];  // the first choice when it cannot run: the real call then reports it
  if (std::getenv("NIBBLE_GEMM_TUNE_LOG"))
    std::fprintf(stderr, "gemm tune %s: %d candidates, %d give the first one's bits; first %.4f ms, kept #%d %.4f ms\n",
                 p.name.c_str(), count, same_bits, median[0], best, median[best]);
}

bool native_fp4_available() { return device_attribute(cudaDevAttrComputeCapabilityMajor) >= 10; }

void tile_block_scales(const uint8_t* scales, int64_t rows, int64_t scale_cols, int64_t rows_per_scale_row,
                       uint8_t* tiled, cudaStream_t stream) {
  if (rows <= 0 || scale_cols <= 0 || rows_per_scale_row <= 0)
    throw std::invalid_argument("tile_block_scales: empty scale matrix");
  const int64_t slots = tiled_scale_bytes(rows, scale_cols);
  constexpr int kThreads = 256;
  tile_block_scales_kernel<<<static_cast<unsigned>((slots + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      scales, rows, scale_cols, rows_per_scale_row, tiled);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

void multiply_scalars(const float* a, const float* b, float* out, cudaStream_t stream) {
  multiply_scalars_kernel<<<1, 1, 0, stream>>>(a, b, out);
  NIBBLE_CUDA_CHECK_LAUNCH();
}

}  // namespace nibble::cuda
