#!/usr/bin/env python3
"""The GPU's SM clock and power during each run of the training benchmark (scripts/bench_training.sh
samples them with nvidia-smi every 100 ms into clocks-NAME.csv): at its power limit (700 W on an
H200) the GPU lowers its clocks within a second or two of training, by an amount that differs from
run to run, so a speed is read with the clock it ran at.

    python3 bench/gpu_clocks.py out/clocks-*.csv

Each file: nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,power.limit,clocks_throttle_reasons.active
--format=csv,noheader,nounits. Only samples drawing more than half the power limit count (the run's
busy part, not its start-up).
"""
import os
import statistics
import sys

POWER_CAP = 0x4  # clocks_throttle_reasons: software power cap
THERMAL = 0x20 | 0x40  # software and hardware thermal slowdown


def summary(path):
    busy = []
    for line in open(path):
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5:
            continue
        try:
            clock, power, limit, reasons = float(fields[1]), float(fields[2]), float(fields[3]), int(fields[4], 16)
        except ValueError:
            continue  # "[N/A]" and the like
        if power > 0.5 * limit:
            busy.append((clock, power, reasons))
    name = os.path.basename(path).removeprefix("clocks-").removesuffix(".csv")
    if not busy:
        return f"{name}: no sample above half the power limit"
    clocks = [c for c, _, _ in busy]
    capped = sum(1 for _, _, r in busy if r & POWER_CAP) / len(busy)
    hot = sum(1 for _, _, r in busy if r & THERMAL) / len(busy)
    return (f"{name}: SM clock median {statistics.median(clocks):,.0f} MHz ({min(clocks):,.0f}-{max(clocks):,.0f}), "
            f"power up to {max(p for _, p, _ in busy):.0f} W, power cap active in {100 * capped:.0f}% and thermal "
            f"slowdown in {100 * hot:.0f}% of {len(busy)} samples")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("GPU clocks while busy (nvidia-smi every 100 ms, samples above half the power limit):")
    for path in sys.argv[1:]:
        print("  " + summary(path))


if __name__ == "__main__":
    main()
