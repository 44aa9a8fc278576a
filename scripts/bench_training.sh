#!/usr/bin/env bash
# Training speed and memory on one GPU (issue 6): nibble's bf16 and nvfp4 steps and the PyTorch
# reference (bench/pytorch_gpt2.py, eager and torch.compile) on the same model and batch, in one
# call, then the table (bench/training_table.py). Run on the GPU machine:
#   [CONFIG=model.toml] [PYTORCH=0] scripts/bench_training.sh DATA_DIR [NIBBLE_BINARY] [STEPS]
# DATA_DIR: GPT-2 tokens from `nibble prepare` (any text). Logs and the table go to $OUT (default ./out).
# PYTORCH=0 leaves the PyTorch runs out (nibble's own rows and the nvfp4 / bf16 ratios only).
# TRAIN_ARGS="..." adds options to nibble's training runs (e.g. "--gelu kernel"; split at spaces).
set -euo pipefail
cd "$(dirname "$0")/.."
data=$1
nibble=${2:-build/cuda/src/nibble/cli/nibble}
steps=${3:-100}  # enough to reach the GPU's power-capped clocks (docs/benchmarks.md, session 23)
out=${OUT:-out}
mkdir -p "$out"
config=${CONFIG:-configs/models/gpt2-124m.toml}  # CONFIG=configs/models/gpt2-350m.toml for the larger model
# Runs a command with the SM clock and power sampled every 100 ms into $out/clocks-NAME.csv, where
# nvidia-smi is there (summed up under the table by bench/gpu_clocks.py).
sampled() {  # NAME COMMAND...
  local name=$1 smi="" rc=0
  shift
  rm -f "$out/clocks-$name.csv"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,power.limit,clocks_throttle_reasons.active \
      --format=csv,noheader,nounits -lms 100 >"$out/clocks-$name.csv" 2>/dev/null &
    smi=$!
  fi
  "$@" || rc=$?
  if [ -n "$smi" ]; then kill "$smi" 2>/dev/null || true; wait "$smi" 2>/dev/null || true; fi
  return "$rc"
}
read -r -a train_args <<<"${TRAIN_ARGS:-}"
for recipe in bf16 nvfp4; do
  rm -rf "/tmp/bench-$recipe"
  sampled "nibble-$recipe" "$nibble" train --device cuda --config "$config" --recipe "$recipe" --data "$data" \
    --out "/tmp/bench-$recipe" --steps "$steps" --batch-size 16 --progress quiet --val-batches 1 \
    ${train_args[@]+"${train_args[@]}"} \
    >"$out/nibble-$recipe.log" 2>&1
  cp "/tmp/bench-$recipe/metrics.jsonl" "$out/nibble-$recipe.jsonl"
done
: >"$out/pytorch.jsonl"
# PyTorch trains on the same token files and runs as many steps as nibble (10 warm-up, the rest
# timed): at its 700 W cap the H200 lowers its clocks within a second or two of training, by an amount
# that can depend on the data, so both should reach the same point of that ramp on the same tokens.
timed=$((steps > 10 ? steps - 10 : steps))
if [ "${PYTORCH:-1}" != 0 ]; then
  sampled pytorch-eager python3 bench/pytorch_gpt2.py --config "$config" --batch 16 --steps "$timed" --data "$data" \
    >>"$out/pytorch.jsonl"
  sampled pytorch-compile python3 bench/pytorch_gpt2.py --config "$config" --batch 16 --steps "$timed" --data "$data" \
    --compile >>"$out/pytorch.jsonl" 2>"$out/compile.log"
fi
python3 bench/training_table.py --nibble bf16=/tmp/bench-bf16 nvfp4=/tmp/bench-nvfp4 --pytorch "$out/pytorch.jsonl" | tee "$out/table.md"
if compgen -G "$out/clocks-*.csv" >/dev/null; then
  echo | tee -a "$out/table.md"
  python3 bench/gpu_clocks.py "$out"/clocks-*.csv | tee -a "$out/table.md"
fi
