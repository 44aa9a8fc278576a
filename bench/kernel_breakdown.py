#!/usr/bin/env python3
"""Per-kernel-class time of a training step from Nsight Compute's per-launch CSV.

On the GPU machine (nsys is not there; ncu times every launch with its clocks left alone):
    ncu --clock-control none --metrics gpu__time_duration.sum --csv \\
        nibble train --device cuda ... --steps 1 > ncu.csv
    python3 bench/kernel_breakdown.py ncu.csv [--before OLD.csv]

Kernels are grouped by what their names say (ours are named after their job; cuBLASLt's GEMM
kernels contain "gemm" or the sm90 kernel prefixes). Prints a Markdown table: class, launches, ms,
share of the total kernel time; with --before, the same step of older code beside it (launches and
ms before and after), as docs/benchmarks.md records changes. Then the largest kernels.
"""
import argparse
import csv
import signal
import sys
from collections import defaultdict

CLASSES = [  # first match wins
    ("GEMM (cuBLASLt)", ("gemm", "sm90_xmma", "cutlass", "nvjet", "splitkreduce")),
    ("quantize / decode operands", ("rowcol", "tile16", "segment", "amax", "dequantize", "decode_fp4", "decode_nvfp4", "convert", "recode",
                                    "multiply_scalars")),
    ("attention (flash kernels, softmax, packing, RoPE)", ("flash", "softmax", "rope", "probs_from_lse", "pack_")),
    ("norms", ("norm",)),
    ("LM-head loss", ("cross_entropy", "mean_kernel")),
    ("embeddings", ("gather", "scatter", "radix", "sort", "cub::")),
    ("MLP activation, residual", ("gelu", "relu", "swiglu", "activation", "residual")),
    ("optimizer, gradient norm", ("adamw", "sq_partials", "sqrt_sum", "clip")),
]


def kernel_class(name):
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def read(path):
    """{class: ms}, {class: launches}, {kernel name: ms} of one ncu CSV."""
    scale = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0}
    lines = [l for l in open(path, encoding="utf-8", errors="replace") if l.startswith('"')]
    total = defaultdict(float)
    count = defaultdict(int)
    names = defaultdict(float)
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        ms = float(row["Metric Value"].replace(",", "")) * scale[row["Metric Unit"]]
        cls = kernel_class(row["Kernel Name"])
        total[cls] += ms
        count[cls] += 1
        names[row["Kernel Name"][:90]] += ms
    if not total:
        sys.exit(f"kernel_breakdown: {path} has no gpu__time_duration.sum rows (not an ncu --csv output?)")
    return total, count, names


def main(argv):
    ap = argparse.ArgumentParser(description="Per-kernel-class time of a training step from ncu's CSV.")
    ap.add_argument("csv")
    ap.add_argument("--before", help="the same step of older code, for a before / after table")
    a = ap.parse_args(argv)
    total, count, names = read(a.csv)
    all_ms = sum(total.values())
    if a.before:
        total0, count0, _ = read(a.before)
        all0 = sum(total0.values())
        print("| kernel class | launches before | ms before | launches | ms | change ms |")
        print("|---|---|---|---|---|---|")
        for cls in sorted(set(total) | set(total0), key=lambda c: -total.get(c, 0.0)):
            t0, t1 = total0.get(cls, 0.0), total.get(cls, 0.0)
            print(f"| {cls} | {count0.get(cls, 0)} | {t0:.2f} | {count.get(cls, 0)} | {t1:.2f} | {t1 - t0:+.2f} |")
        print(f"| all kernels | {sum(count0.values())} | {all0:.2f} | {sum(count.values())} | {all_ms:.2f} | "
              f"{all_ms - all0:+.2f} |")
    else:
        print("| kernel class | launches | ms | share |")
        print("|---|---|---|---|")
        for cls, ms in sorted(total.items(), key=lambda kv: -kv[1]):
            print(f"| {cls} | {count[cls]} | {ms:.2f} | {100 * ms / all_ms:.1f}% |")
        print(f"| all kernels | {sum(count.values())} | {all_ms:.2f} | 100% |")
    print("\nlargest kernels:")
    for n, ms in sorted(names.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {ms:8.2f} ms  {n}")


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet when piped into head
    main(sys.argv[1:])
