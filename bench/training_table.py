#!/usr/bin/env python3
"""Table of the training benchmark (scripts/bench_training.sh): nibble runs' metrics.jsonl files and
the PyTorch reference's JSON lines -> tokens/s, MFU, memory, and the ratios issue 6 asks for.

    python3 bench/training_table.py --nibble bf16=RUN_DIR nvfp4=RUN_DIR --pytorch FILE.jsonl [--skip 10]
"""
import argparse
import json
import statistics


def nibble_row(run_dir, skip):
    steps = [json.loads(l) for l in open(f"{run_dir}/metrics.jsonl") if '"loss"' in l]
    steps = steps[skip:] if len(steps) > skip else steps
    return {"tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps),
            "mfu": statistics.median(s.get("mfu", float("nan")) for s in steps),
            "memory_mib": max(s["memory_mib"] for s in steps)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nibble", nargs="+", required=True, help="NAME=RUN_DIR")
    ap.add_argument("--pytorch", required=True)
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the medians")
    a = ap.parse_args()
    rows = {}
    for item in a.nibble:
        name, run = item.split("=", 1)
        rows["nibble " + name] = nibble_row(run, a.skip)
    for line in open(a.pytorch):
        r = json.loads(line)
        rows[r["impl"]] = {"tokens_per_s": r["tokens_per_s"], "mfu": r["mfu"], "memory_mib": r["device_used_mib"]}
    print("| implementation | tokens/s | MFU | device memory in use (MiB) |")
    print("|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {r['memory_mib']:,.0f} |")
    compiled = [r for k, r in rows.items() if k.startswith("pytorch") and k.endswith("compile")]
    bf16, nvfp4 = rows.get("nibble bf16"), rows.get("nibble nvfp4")
    print()
    if bf16 and compiled:
        print(f"nibble bf16 / PyTorch compiled tokens/s: {bf16['tokens_per_s'] / compiled[0]['tokens_per_s']:.2f} (target >= 1.10)")
    if bf16 and nvfp4:
        print(f"nibble nvfp4 / nibble bf16 tokens/s: {nvfp4['tokens_per_s'] / bf16['tokens_per_s']:.2f} (target >= 0.85)")
        print(f"nibble nvfp4 / nibble bf16 peak memory: {nvfp4['memory_mib'] / bf16['memory_mib']:.2f} (target <= 0.80)")


if __name__ == "__main__":
    main()
