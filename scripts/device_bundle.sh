#!/usr/bin/env bash
# Packs what a GPU machine without the toolchain needs, for scripts/device_check.sh there: the CUDA
# binaries of a build (stripped: the tests, the benchmarks and the nibble program, about 20 MB
# compressed) and, optionally, a `nibble prepare` output folder for the training phases.
#   cmake --preset cuda && cmake --build --preset cuda
#   scripts/device_bundle.sh [DATA_DIR]       -> build/device/bin.tar.xz [, build/device/data.tar.xz]
# Then, on the GPU machine, from a copy of the repository holding build/device:
#   BUNDLE=build/device PHASES="tests train" DATA=... scripts/device_check.sh
# (BUILD_DIR=other/build packs another build folder.) For before / after figures in one call, keep the
# older bundle first (mkdir -p build/base && cp build/device/bin.tar.xz build/base/), rebuild and
# repack, carry both folders and add BASE_BUNDLE=build/base.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build/cuda}
dest=build/device
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
for f in tests/nibble_cuda_tests bench/nibble_quant_bench_cuda bench/nibble_layers_bench_cuda \
         bench/nibble_gemm_bench_cuda src/nibble/cli/nibble; do
  [ -x "$build/$f" ] || { echo "device_bundle: $build/$f is missing: build with the cuda preset first" >&2; exit 1; }
  mkdir -p "$stage/$(dirname "$f")"
  cp "$build/$f" "$stage/$f"
  strip "$stage/$f"
done
# The CUPTI kernel trace (bench/kernel_trace.cpp) and the toolkit's CUPTI, where the build has them.
if [ -f "$build/bench/libnibble_kernel_trace.so" ]; then
  cp "$build/bench/libnibble_kernel_trace.so" "$stage/bench/"
  cupti=$(ldd "$build/bench/libnibble_kernel_trace.so" | awk '/libcupti/ {print $3}')
  if [ -n "$cupti" ]; then mkdir -p "$stage/lib" && cp -L "$cupti" "$stage/lib/"; fi
fi
mkdir -p "$dest"
tar -C "$stage" -cJf "$dest/bin.tar.xz.tmp" . && mv "$dest/bin.tar.xz.tmp" "$dest/bin.tar.xz"
if [ $# -ge 1 ]; then
  data=$1
  [ -f "$data/manifest.json" ] || { echo "device_bundle: $data has no manifest.json (not a nibble prepare output)" >&2; exit 1; }
  tar -C "$(dirname "$data")" -cJf "$dest/data.tar.xz.tmp" "$(basename "$data")" && mv "$dest/data.tar.xz.tmp" "$dest/data.tar.xz"
fi
ls -l "$dest"
