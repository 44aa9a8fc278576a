#!/usr/bin/env bash
# The README's test command: set-up, build (with the CUDA backend when nvcc is found), CPU tests.
# GPU tests (ctest label "gpu") run on a machine with a GPU: scripts/device_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/cuda/bin:$PATH"
scripts/setup.sh
preset=cpu
if command -v nvcc >/dev/null; then preset=cuda; fi
cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset" -j "$(nproc)"
ctest --preset "$preset"
