// The CUDA syntax that kernels compiled as host C++ use, for the emulation tests that run a block's
// threads as std::threads (emulated_grid.h): a block (of block_dim.x threads, 256 unless a test sets
// it) with its barriers and warp shuffles, the built-in indices, the qualifiers defined away,
// __syncthreads as the block's barrier, __reduce_max_sync, atomicMax and atomicMin. A test starts
// each block's state with emu::start_block (run_grid's start_block).
#pragma once

#include <atomic>
#include <barrier>
#include <memory>
#include <vector>

#include "cuda_emulation/emulated_atomics.h"
#include "cuda_emulation/emulated_grid.h"

namespace emu {

constexpr int kBlockThreads = 256;  // the default block size
struct Block {
  std::barrier<> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warp_sync;
  std::vector<double> lanes;  // each thread's shuffle operand (floats, doubles and 32-bit words fit exactly)
  explicit Block(unsigned threads) : sync(threads), lanes(threads) {
    for (unsigned w = 0; w < threads / 32; ++w) warp_sync.push_back(std::make_unique<std::barrier<>>(32));
  }
};
inline Block* block = nullptr;
inline uint3 block_dim{kBlockThreads, 1, 1};

// A block of block_dim.x threads (a multiple of 32).
inline std::unique_ptr<Block> start_block() {
  auto b = std::make_unique<Block>(block_dim.x);
  block = b.get();
  return b;
}

// __shfl_xor_sync: every lane of the warp posts its value, then reads its partner's.
template <typename T>
T shfl_xor(T v, int mask) {
  const unsigned t = thread_idx.x, w = t >> 5;
  block->lanes[t] = static_cast<double>(v);
  block->warp_sync[w]->arrive_and_wait();
  const T r = static_cast<T>(block->lanes[(t & ~31u) + ((t & 31u) ^ static_cast<unsigned>(mask))]);
  block->warp_sync[w]->arrive_and_wait();
  return r;
}

}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define gridDim (emu::grid_dim)
#define blockDim (emu::block_dim)
#undef __global__
#define __global__
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static  // one block runs at a time: a static is the block's shared variable
#define __syncthreads() (emu::block->sync.arrive_and_wait())

inline float __shfl_xor_sync(unsigned, float v, int mask) { return emu::shfl_xor(v, mask); }
inline double __shfl_xor_sync(unsigned, double v, int mask) { return emu::shfl_xor(v, mask); }
// The warp's maximum of 32-bit words (amax_device.cuh's block maximum).
inline uint32_t __reduce_max_sync(unsigned, uint32_t v) {
  for (int mask = 16; mask >= 1; mask /= 2) {
    const uint32_t o = emu::shfl_xor(v, mask);
    v = v > o ? v : o;
  }
  return v;
}
