"""Aggregation throughput vs memory bandwidth, and server memory vs number of updates.

Folding one update into the running weighted sum (``sum += w * x``) reads two vectors and writes one,
exactly the traffic of a large in-place tensor add (``a += b``), which this script times first as the
machine's achievable bandwidth. Target: folding runs at >= 70% of it. Then it folds K = 10 and K = 1000
updates and reports the server's peak memory for both (target: the same, O(P)).

    python benchmarks/aggregation.py            # P = 50M float32 (200 MB), K up to 1000
    python benchmarks/aggregation.py --quick    # P = 10M, K up to 200
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from fedfleet.core.aggregate import WeightedMean
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Update


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_of(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on a GPU; the current resident set on a CPU (read from /proc)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def fold_growth(like: FlatParams, update: Update, k: int, device: torch.device) -> tuple[float, int]:
    """Seconds to fold k updates, and the server memory the aggregation added (measured while it is alive)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = memory_bytes(device)
    t0 = time.perf_counter()
    agg = WeightedMean(like)
    for _ in range(k):
        agg.add(update)
    agg.finish()
    sync(device)
    seconds = time.perf_counter() - t0
    growth = memory_bytes(device) - base
    agg = None
    return seconds, growth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    p = 10_000_000 if args.quick else 50_000_000
    k_small, k_large = (10, 200) if args.quick else (10, 1000)
    repeats = 5

    a = torch.randn(p, device=device)
    b = torch.randn(p, device=device)
    t_add = best_of(lambda: a.add_(b), repeats, device)
    bandwidth = 3 * 4 * p / t_add  # bytes moved per second: read a, read b, write a
    a = b = None  # free them before the memory measurements

    like = FlatParams.from_tensors({"w": torch.zeros(p, device=device)})
    update = Update(FlatParams.from_tensors({"w": torch.randn(p, device=device)}), weight=3.0)
    agg = WeightedMean(like)
    t_fold = best_of(lambda: agg.add(update), repeats, device)
    fold_bandwidth = 3 * 4 * p / t_fold

    agg = None  # free the running sum before the memory measurements
    t_small, peak_small = fold_growth(like, update, k_small, device)
    t_large, peak_large = fold_growth(like, update, k_large, device)

    model_mb = 4 * p / 2**20
    print(f"device {device}, P = {p:,} float32 ({model_mb:.0f} MiB)")
    print(f"in-place add a += b      : {bandwidth / 1e9:6.2f} GB/s")
    print(f"fold sum += w * update   : {fold_bandwidth / 1e9:6.2f} GB/s  ({fold_bandwidth / bandwidth:.0%} of it)")
    print(f"fold K={k_small:<5} {t_small:7.3f} s, server peak growth {peak_small / 2**20:8.1f} MiB")
    print(f"fold K={k_large:<5} {t_large:7.3f} s, server peak growth {peak_large / 2**20:8.1f} MiB")
    print(
        json.dumps(
            {
                "benchmark": "aggregation",
                "device": str(device),
                "params": p,
                "add_gbps": round(bandwidth / 1e9, 2),
                "fold_gbps": round(fold_bandwidth / 1e9, 2),
                "fold_vs_bandwidth": round(fold_bandwidth / bandwidth, 3),
                "peak_mib_k_small": round(peak_small / 2**20, 1),
                "peak_mib_k_large": round(peak_large / 2**20, 1),
                "k_small": k_small,
                "k_large": k_large,
            }
        )
    )


if __name__ == "__main__":
    main()
