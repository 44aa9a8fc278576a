// The training engine on one GPU: the model (GptCuda), AdamW and the gradient norm on the device.
// The host model and optimizer receive the state only for checkpoints (to_host) and give it at the
// start (the constructor: fresh or resumed weights and moments).
#pragma once

#include <memory>

#include "nibble/train/engine.h"

namespace nibble::train::cuda {

struct CudaEngineOptions {
  // NVFP4 GEMMs on Hopper read the packed operands (GptCuda::set_packed_fp4_gemm); else BF16 copies.
  bool packed_fp4_gemm = false;
  // The MLP's GELU in the GEMM epilogues where they take it (GptCuda::set_gelu_in_gemm); else kernels.
  bool gelu_in_gemm = true;
};

// Throws std::runtime_error when no CUDA device can be used (the message says why).
std::unique_ptr<Engine> make_cuda_engine(model::Gpt& model, AdamW& optimizer, uint64_t run_seed,
                                         const CudaEngineOptions& options = {});

}  // namespace nibble::train::cuda
