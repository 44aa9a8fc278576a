// What the CUDA emulation tests share: a kernel launch run on the CPU, each block in turn as one
// std::thread per CUDA thread. Each test brings its own block state (barriers, the lanes' exchange
// arrays, shared memory) and its emulation of the instructions its kernels use.
#pragma once

#include <cuda_runtime.h>  // uint3, dim3

#include <thread>
#include <vector>

namespace emu {

// blockIdx, gridDim and threadIdx of the emulated kernels.
inline uint3 block_idx, grid_dim;
inline thread_local uint3 thread_idx;

// Runs the blocks of `grid` one after another. For each, start_block() runs first on the calling
// thread and returns what must outlive the block's threads (its shared state); then `threads`
// std::threads each set thread_idx and run run_thread().
template <typename StartBlock, typename RunThread>
void run_grid(dim3 grid, unsigned threads, StartBlock start_block, RunThread run_thread) {
  grid_dim = {grid.x, grid.y, grid.z};
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        block_idx = {x, y, z};
        [[maybe_unused]] const auto block_state = start_block();
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([t, &run_thread] {
            thread_idx = {t, 0, 0};
            run_thread();
          });
        for (auto& th : pool) th.join();
      }
}

}  // namespace emu
