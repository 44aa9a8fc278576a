#!/usr/bin/env bash
# Runs on the GPU machine: the CUDA tests (bit-exact against the CPU reference), a memory and race
# check of the kernels, and the CUDA benchmarks, with logs under $OUT (default ./out).
# Build first, where the toolchain and GoogleTest are (nvcc 13.0, sm_90a and sm_100a):
#   cmake --preset cuda && cmake --build --preset cuda
# then bring build/cuda/tests and build/cuda/bench along (the device tool's `carry`) and run this
# (BUILD_DIR=other/build to use another build folder).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
build=${BUILD_DIR:-build/cuda}
mkdir -p "$out"
status=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$out/gpu.txt"

echo "== CUDA tests"
"$build"/tests/nibble_cuda_tests 2>&1 | tee "$out/cuda_tests.log" | grep -E "^\[  (PASSED|FAILED) |^\[==========\]|compared|random seed|Failure|linear   \]|gpt      \]|nvfp4    \]|SKIPPED" | head -80
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== compute-sanitizer (memcheck, racecheck) on small cases"
filter='CudaQuantize.FusedSidesCanBeSwitchedOff:CudaQuantize.NonFiniteAndZeroTensorsMatchCpu:CudaQuantize.RejectsShapesItCannotQuantize'
filter+=':CudaQuantize.FusedDecodedOutputSidesAndSpecialTensors:OperandCuda.*'
filter+=':CudaQuantize.Tile16KernelNonFiniteAndZeroTensors:CudaQuantize.Tile16UnalignedInputTakesTheGenericKernels'
filter+=':EmbeddingCuda.*:Kinds/NormCudaTest.*:Shapes/AttentionCudaTest.*:CrossEntropyCuda.*:LmHeadLossCuda.*:GradNormCuda.*'
filter+=':LinearCuda.*:Recipes/LinearCudaTest.MatchesCpuLayer/nvfp4:GptCuda.*:GpuTrain.ResumeAfterInterruptionRepeatsTheRunBitForBit'
filter+=':Nvfp4Native.*:AttentionCudaDeterminism.*-*T1024*'  # the seq-1024 attention shapes are too slow under the tools
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 9 "$build"/tests/nibble_cuda_tests --gtest_filter="$filter" \
    >"$out/sanitizer_$tool.log" 2>&1
  rc=$?
  echo "$tool: exit $rc ($(grep -E 'SUMMARY' "$out/sanitizer_$tool.log" | tail -1))"
  [ "$rc" -eq 0 ] || status=1
done

echo "== CUDA benchmarks"
"$build"/bench/nibble_quant_bench_cuda 2>&1 | tee "$out/quant_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
"$build"/bench/nibble_layers_bench_cuda 2>&1 | tee "$out/layers_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
"$build"/bench/nibble_gemm_bench_cuda 2>&1 | tee "$out/gemm_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
