#!/usr/bin/env python3
"""Table of the training benchmark (scripts/bench_training.sh): nibble runs' metrics.jsonl files and
the PyTorch reference's JSON lines -> tokens/s, MFU, memory, and the ratios issue 6 asks for; for
nibble on a GPU also the median time the host waited for each step at its end (device_wait_s in
metrics.jsonl): how far the host was ahead, near 0 where its enqueuing limited the step.

    python3 bench/training_table.py --nibble bf16=RUN_DIR nvfp4=RUN_DIR --pytorch FILE.jsonl [--skip 10]

With --ab, runs of two builds side by side (scripts/device_check.sh's ab phase: bench_training.sh
output folders, each with nibble-bf16.jsonl and nibble-nvfp4.jsonl, named new1, base1, new2, ...):
each run's median step and tokens/s per recipe, then new / base per recipe over the runs' medians.

    python3 bench/training_table.py --ab new1=OUT base1=OUT new2=OUT base2=OUT [--skip 10]

With --rounds, several rounds of the whole benchmark in one call (scripts/device_check.sh's train
phase with ROUNDS > 1: bench_training.sh output folders, each with nibble-bf16.jsonl,
nibble-nvfp4.jsonl and pytorch.jsonl): each round's tokens/s and ratios, then the median of each
ratio over the rounds (the GPU's power cap moves single runs by a percent or more).

    python3 bench/training_table.py --rounds round1=OUT round2=OUT [--skip 10]
"""
import argparse
import json
import statistics


def nibble_row(metrics_file, skip):
    steps = [json.loads(l) for l in open(metrics_file) if '"loss"' in l]
    steps = steps[skip:] if len(steps) > skip else steps
    waits = [s["device_wait_s"] for s in steps if "device_wait_s" in s]
    return {"tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps),
            "step_ms": 1e3 * statistics.median(s["step_s"] for s in steps),
            "mfu": statistics.median(s.get("mfu", float("nan")) for s in steps),
            "memory_mib": max(s["memory_mib"] for s in steps),
            # how long the host waited for the GPU at each step's end: near 0, the host limited the step
            "wait_ms": 1e3 * statistics.median(waits) if waits else None}


def wait_text(row):
    return "-" if row.get("wait_ms") is None else f"{row['wait_ms']:.2f}"


def ab_table(runs, skip):
    recipes = ("bf16", "nvfp4")
    rows = {name: {r: nibble_row(f"{out}/nibble-{r}.jsonl", skip) for r in recipes} for name, out in runs}
    print("| run | " + " | ".join(f"{r} step ms | {r} tokens/s | {r} MiB | {r} host wait ms" for r in recipes) + " |")
    print("|---" * (1 + 4 * len(recipes)) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(
            f"{row[r]['step_ms']:.3f} | {row[r]['tokens_per_s']:,.0f} | {row[r]['memory_mib']:,.0f} | {wait_text(row[r])}"
            for r in recipes) + " |")
    print()
    for r in recipes:
        med = {b: statistics.median(row[r]["step_ms"] for name, row in rows.items() if name.startswith(b))
               for b in ("new", "base") if any(name.startswith(b) for name in rows)}
        if len(med) == 2:
            print(f"{r}: median step {med['base']:.3f} ms (base) -> {med['new']:.3f} ms (new), "
                  f"tokens/s x{med['base'] / med['new']:.4f}")


def rounds_table(rounds, skip):
    ratios = {"bf16 / compile": [], "nvfp4 / bf16": [], "memory nvfp4 / bf16": []}
    print("| round | nibble bf16 | nibble nvfp4 | torch.compile | bf16 / compile | nvfp4 / bf16 | memory nvfp4 / bf16 |")
    print("|---|---|---|---|---|---|---|")
    for name, out in rounds:
        bf16, nvfp4 = (nibble_row(f"{out}/nibble-{r}.jsonl", skip) for r in ("bf16", "nvfp4"))
        compiled = [json.loads(l) for l in open(f"{out}/pytorch.jsonl") if l.strip()]
        compiled = [r for r in compiled if r["impl"].startswith("pytorch") and r["impl"].endswith("compile")]
        if not compiled:
            raise SystemExit(f"training_table: no torch.compile run in {out}/pytorch.jsonl")
        row = {"bf16 / compile": bf16["tokens_per_s"] / compiled[0]["tokens_per_s"],
               "nvfp4 / bf16": nvfp4["tokens_per_s"] / bf16["tokens_per_s"],
               "memory nvfp4 / bf16": nvfp4["memory_mib"] / bf16["memory_mib"]}
        for k, v in row.items():
            ratios[k].append(v)
        print(f"| {name} | {bf16['tokens_per_s']:,.0f} | {nvfp4['tokens_per_s']:,.0f} | "
              f"{compiled[0]['tokens_per_s']:,.0f} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
    print()
    targets = {"bf16 / compile": ">= 1.10", "nvfp4 / bf16": ">= 0.85", "memory nvfp4 / bf16": "<= 0.80"}
    for k, v in ratios.items():
        print(f"{k}: median {statistics.median(v):.3f} over {len(v)} rounds "
              f"(range {min(v):.3f}-{max(v):.3f}; target {targets[k]})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nibble", nargs="+", help="NAME=RUN_DIR")
    ap.add_argument("--pytorch")
    ap.add_argument("--ab", nargs="+", help="newN=OUT baseN=OUT ...: two builds' runs side by side")
    ap.add_argument("--rounds", nargs="+", help="roundN=OUT ...: rounds of the whole benchmark, and the ratios' medians")
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the medians")
    a = ap.parse_args()
    if a.ab:
        ab_table([item.split("=", 1) for item in a.ab], a.skip)
        return
    if a.rounds:
        rounds_table([item.split("=", 1) for item in a.rounds], a.skip)
        return
    if not a.nibble or not a.pytorch:
        ap.error("--nibble and --pytorch are needed (or --ab)")
    rows = {}
    for item in a.nibble:
        name, run = item.split("=", 1)
        rows["nibble " + name] = nibble_row(f"{run}/metrics.jsonl", a.skip)
    for line in open(a.pytorch):
        r = json.loads(line)
        rows[r["impl"]] = {"tokens_per_s": r["tokens_per_s"], "mfu": r["mfu"], "memory_mib": r["device_used_mib"]}
    print("| implementation | tokens/s | MFU | device memory in use (MiB) | host wait a step (ms) |")
    print("|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {r['memory_mib']:,.0f} | {wait_text(r)} |")
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
