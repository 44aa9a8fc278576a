#!/usr/bin/env python3
"""Per-kernel-class time of a training step from Nsight Compute's per-launch CSV, or from the
kernel trace of bench/kernel_trace.cpp (CUPTI, at the clocks the program runs at).

On the GPU machine (nsys is not there; ncu times every launch with its clocks left alone, but runs
them one at a time, about 30% above the real step):
    ncu --clock-control none --metrics gpu__time_duration.sum --csv \\
        nibble train --device cuda ... --steps 1 > ncu.csv
    python3 bench/kernel_breakdown.py ncu.csv [--before OLD.csv]
or, with the trace of a run of 11 steps and of the same run with 1 step (--minus: the difference is
the 10 extra steps, which --steps 10 turns into one step's time):
    python3 bench/kernel_breakdown.py trace11.tsv --minus trace1.tsv --steps 10

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

CLASSES = [  # first match wins, on the short name (template arguments kept, parameter list not)
    ("memsets (kernel traces only)", ("[memset",)),  # "[memset 8 B]": by size
    ("GEMM (cuBLASLt)", ("gemm", "sm90_xmma", "cutlass", "nvjet", "splitkreduce")),
    ("optimizer, gradient norm", ("adamw", "sq_partials", "sqrt_sum", "clip")),  # before "segment"
    # Before "amax": a norm or an activation that computes a quantizing pass's amax is still that layer.
    ("norms", ("norm",)),
    ("MLP activation, residual", ("gelu", "relu", "swiglu", "activation", "residual")),
    ("quantize / decode operands", ("rowcol", "tile16", "segment", "amax", "dequantize", "decode_fp4", "decode_nvfp4", "convert", "recode",
                                    "multiply_scalars")),
    ("attention (flash kernels, softmax, packing, RoPE)", ("flash", "softmax", "rope", "probs_from_lse", "pack_")),
    ("LM-head loss", ("cross_entropy", "mean_kernel")),
    ("embeddings", ("gather", "embed_rows", "scatter", "position_grad", "radix", "sort")),
]


def short_name(name):
    """A kernel's name without its return type, namespaces and parameter list, template arguments
    kept: distinct instantiations stay apart (a cut at a fixed length merged them)."""
    depth, end = 0, len(name)
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and i > 0 and name[i - 1] not in " :":
            end = i  # the parameter list (a "(anonymous namespace)" follows "::" or a space)
            break
    head = name[:end]
    if head.startswith("void "):
        head = head[5:]
    lt = head.find("<")
    base, args = (head[:lt], head[lt:]) if lt >= 0 else (head, "")
    return base.rsplit("::", 1)[-1] + args


def kernel_class(name):
    low = short_name(name).lower()
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def read_trace(path):
    """{class: ms}, {class: launches}, {kernel name: ms} of one kernel_trace.cpp TSV."""
    total = defaultdict(float)
    count = defaultdict(int)
    names = defaultdict(float)
    for line in open(path, encoding="utf-8", errors="replace"):
        if line.startswith("#") or line.startswith("ms\t"):
            continue
        ms, launches, name = line.rstrip("\n").split("\t", 2)
        if name.startswith("[memcpy"):  # mostly the checkpoint's downloads after the last step: not step time
            continue
        cls = kernel_class(name)
        total[cls] += float(ms)
        count[cls] += int(launches)
        names[short_name(name)] += float(ms)
    return total, count, names


def trace_window(path):
    """(window ms, busy ms in it, its kernel) from a kernel trace's header: the stretch from the first
    to the last launch of the step's closing kernel (the optimizer), which holds every step but the
    first; None for an ncu CSV or a trace without the window."""
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.readline()
    if not head.startswith("# kernels"):
        return None
    fields = dict(part.strip().split(" ", 1) for part in head[2:].split(",") if " " in part.strip())
    if "window" not in fields or float(fields["window"].split()[0]) <= 0:
        return None
    return float(fields["window"].split()[0]), float(fields["window_busy"].split()[0]), fields["window_kernel"]


def read(path):
    """{class: ms}, {class: launches}, {kernel name: ms} of one ncu CSV or kernel trace."""
    with open(path, encoding="utf-8", errors="replace") as f:
        if f.readline().startswith("# kernels"):
            return read_trace(path)
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
        names[short_name(row["Kernel Name"])] += ms
    if not total:
        sys.exit(f"kernel_breakdown: {path} has no gpu__time_duration.sum rows (not an ncu --csv output?)")
    return total, count, names


def main(argv):
    ap = argparse.ArgumentParser(description="Per-kernel-class time of a training step from ncu's CSV.")
    ap.add_argument("csv")
    ap.add_argument("--before", help="the same step of older code, for a before / after table")
    ap.add_argument("--minus", help="a shorter run of the same command, subtracted (kernel traces)")
    ap.add_argument("--steps", type=float, default=1.0, help="divide by this many steps (after --minus)")
    a = ap.parse_args(argv)

    def load(path):
        total, count, names = read(path)
        if a.minus:
            t0, c0, n0 = read(a.minus)
            for d, d0 in ((total, t0), (count, c0), (names, n0)):
                for k, v in d0.items():
                    d[k] -= v
        for d in (total, names):
            for k in d:
                d[k] /= a.steps
        for k in count:
            count[k] = round(count[k] / a.steps)
        return total, count, names

    total, count, names = load(a.csv)
    all_ms = sum(total.values())
    if a.before:
        total0, count0, _ = load(a.before)
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
    window = trace_window(a.csv)
    if window is not None:  # the longer run's window covers --steps steps (all but its first)
        wall, busy, kernel = window[0] / a.steps, window[1] / a.steps, window[2]
        idle = 100 * (1 - busy / wall) if wall > 0 else 0
        print(f"\nfrom the first to the last {kernel} launch, per step: {wall:.2f} ms, busy "
              f"{busy:.2f} ms (kernels, memsets, copies): the GPU idles {idle:.1f}% of the step")
        gaps = [l.rstrip("\n").split("\t")[1:] for l in open(a.csv, encoding="utf-8", errors="replace")
                if l.startswith("# gap\t")]
        if gaps:
            print("\nlargest idle gaps, per step (ms, count, kernel before -> kernel after):")
            for ms, n, before, after in gaps:
                print(f"  {float(ms) / a.steps:6.3f} ms {int(n) / a.steps:6.1f}x  {before[:50]} -> {after[:50]}")
    print("\nlargest kernels:")
    for n, ms in sorted(names.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {ms:8.2f} ms  {n}")


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet when piped into head
    main(sys.argv[1:])
