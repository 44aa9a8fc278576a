#!/usr/bin/env bash
# The paper's comparisons at small scale (issue 7): the same model, data, seed and token budget under
# each recipe, then `nibble compare` against bf16. Runs resume from their newest checkpoint, so the
# set can be spread over several device calls or sessions; a run that is complete is skipped.
#
#   scripts/experiments.sh DATA_DIR OUT_DIR [RUN...]
#
# RUN (default: all): bf16 fp8 nvfp4 nvfp4_no_rht nvfp4_no_2d nvfp4_no_sr nvfp4_all_fp4 mxfp4
# nvfp4_bf16_switch. Environment: NIBBLE (binary, default build/cuda/src/nibble/cli/nibble),
# CONFIG (default configs/models/gpt2-124m.toml), STEPS (default 2000 = 32.8 M tokens at BATCH 16 x
# 1024), BATCH (16), DEVICE (cuda), SEED (1337), VAL_EVERY (100), CKPT_EVERY (100; 0: at the end
# only, for runs that must finish within one call), MINUTES (stop each run after this long, with a
# checkpoint; default none). The table goes to OUT_DIR/table.md, the plot to OUT_DIR/compare.svg.
# Several seeds: one OUT_DIR per seed (SEED=7 ... runs/s7), then `nibble compare --paired` over them.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 DATA_DIR OUT_DIR [RUN...]" >&2; exit 2; }
data=$1 out=$2
shift 2
nibble=${NIBBLE:-build/cuda/src/nibble/cli/nibble}
config=${CONFIG:-configs/models/gpt2-124m.toml}
steps=${STEPS:-2000} batch=${BATCH:-16} device=${DEVICE:-cuda} seed=${SEED:-1337}
val_every=${VAL_EVERY:-100} ckpt_every=${CKPT_EVERY:-100}
all=(bf16 fp8 nvfp4 nvfp4_no_rht nvfp4_no_2d nvfp4_no_sr nvfp4_all_fp4 mxfp4 nvfp4_bf16_switch)
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=("${all[@]}")

recipe_args() {  # the recipe of a run, as nibble train arguments
  case $1 in
    bf16) echo "--recipe bf16" ;;
    fp8) echo "--recipe fp8" ;;
    nvfp4) echo "--recipe nvfp4" ;;
    nvfp4_no_rht) echo "--recipe nvfp4 --recipe-set no_rht" ;;
    nvfp4_no_2d) echo "--recipe nvfp4 --recipe-set no_2d" ;;
    nvfp4_no_sr) echo "--recipe nvfp4 --recipe-set no_sr" ;;
    nvfp4_all_fp4) echo "--recipe nvfp4 --recipe-set bf16_first_blocks=0 --recipe-set bf16_last_blocks=0" ;;
    mxfp4) echo "--recipe mxfp4" ;;
    nvfp4_bf16_switch) echo "--recipe nvfp4 --recipe-set bf16_switch_fraction=0.82" ;;
    *) echo "unknown run '$1' (known: ${all[*]})" >&2; return 1 ;;
  esac
}

mkdir -p "$out"
for run in "${runs[@]}"; do
  args=$(recipe_args "$run")
  dir=$out/$run
  resume=()
  if [ -d "$dir/checkpoints" ]; then
    if grep -q "\"step\":$steps," "$dir/metrics.jsonl" 2>/dev/null; then
      echo "== $run: complete ($steps steps), skipped"
      continue
    fi
    resume=(--resume)
  fi
  echo "== $run: $args (${resume[*]:-new run})"
  limit=()
  [ -n "${MINUTES:-}" ] && limit=(timeout -s INT "${MINUTES}m")
  # shellcheck disable=SC2086  # $args is a list of flags
  "${limit[@]}" "$nibble" train --device "$device" --config "$config" $args --data "$data" --out "$dir" \
    --steps "$steps" --batch-size "$batch" --seed "$seed" --val-every "$val_every" --val-batches 8 \
    --ckpt-every "$ckpt_every" --progress plain --log-every "$val_every" "${resume[@]}" || echo "== $run stopped (rc $?); rerun to resume"
done

done_runs=()
for run in "${all[@]}"; do [ -f "$out/$run/metrics.jsonl" ] && done_runs+=("$out/$run"); done
if [ ${#done_runs[@]} -ge 2 ] && [ -f "$out/bf16/metrics.jsonl" ]; then
  "$nibble" compare "${done_runs[@]}" --baseline "$out/bf16" --out "$out/compare.svg" | tee "$out/table.md"
fi
