#!/usr/bin/env python3
"""Per-kernel-class time of a training step from Nsight Compute's per-launch CSV.

On the GPU machine (nsys is not there; ncu times every launch with its clocks left alone):
    ncu --clock-control none --metrics gpu__time_duration.sum --csv \\
        nibble train --device cuda ... --steps 1 > ncu.csv
    python3 bench/kernel_breakdown.py ncu.csv

Kernels are grouped by what their names say (ours are named after their job; cuBLASLt's GEMM
kernels contain "gemm" or the sm90 kernel prefixes). Prints a Markdown table: class, launches, ms,
share of the total kernel time.
"""
import csv
import sys
from collections import defaultdict

CLASSES = [  # first match wins
    ("GEMM (cuBLASLt)", ("gemm", "sm90_xmma", "cutlass", "nvjet", "splitkreduce")),
    ("quantize / decode operands", ("rowcol", "tile16", "segment", "amax", "dequantize", "decode_fp4", "convert", "recode",
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


def main(path):
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
    all_ms = sum(total.values())
    print("| kernel class | launches | ms | share |")
    print("|---|---|---|---|")
    for cls, ms in sorted(total.items(), key=lambda kv: -kv[1]):
        print(f"| {cls} | {count[cls]} | {ms:.2f} | {100 * ms / all_ms:.1f}% |")
    print(f"| all kernels | {sum(count.values())} | {all_ms:.2f} | 100% |")
    print("\nlargest kernels:")
    for n, ms in sorted(names.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {ms:8.2f} ms  {n}")


if __name__ == "__main__":
    main(sys.argv[1])
