#!/usr/bin/env bash
# The README's main job: set up, build, tokenize real English text (the Linux kernel's admin guide,
# installed from Debian's linux-doc-6.1 by setup), train the demo model under the bf16 and the
# nvfp4 recipes with the same data, seed and steps, and compare their validation losses (a table,
# and a plot of both loss curves and their gap in runs/demo-<time>.svg).
#   scripts/demo.sh              (STEPS=300 by default; runs go to runs/demo-<recipe>-<time>/)
# Training runs on the GPU when the build has the CUDA backend and nvidia-smi lists a GPU, else on
# the CPU; DEVICE=cpu or DEVICE=cuda forces one.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/cuda/bin:$PATH"
steps=${STEPS:-300}

scripts/setup.sh
cmake --preset default >/dev/null
cmake --build --preset default --target nibble_cli
nibble=build/default/src/nibble/cli/nibble
device=${DEVICE:-cpu}
if [ -z "${DEVICE:-}" ] && [ -f build/default/src/nibble/libnibble_cuda.a ] && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  device=cuda
fi

data=data/demo-admin-guide-8k
if [ ! -f "$data/manifest.json" ]; then
  mkdir -p data
  "$nibble" prepare --input /usr/share/doc/linux-doc-6.1/Documentation/admin-guide --include '*.rst.gz' \
    --output "$data" --tokenizer "sentencepiece:data/demo-admin-guide-8k.model" --spm-train-vocab 8192
fi

stamp=$(date +%Y%m%d-%H%M%S)
for recipe in bf16 nvfp4; do
  echo "== training the demo model under $recipe for $steps steps on $device"
  "$nibble" train --device "$device" --config configs/models/tiny-8k.toml --recipe "$recipe" --data "$data" \
    --out "runs/demo-$recipe-$stamp" --steps "$steps" --val-every 50 --seed 1337
done

echo
echo "== validation loss after $steps steps (same data, seed and token budget)"
"$nibble" compare "runs/demo-bf16-$stamp" "runs/demo-nvfp4-$stamp" --out "runs/demo-$stamp.svg"
echo "  metrics: runs/demo-bf16-$stamp/metrics.jsonl, runs/demo-nvfp4-$stamp/metrics.jsonl"
