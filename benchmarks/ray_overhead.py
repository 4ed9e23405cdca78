"""The Ray runtime's overhead over the single-process runtime at equal worker count, on workload W.

Pairs, each run in this one process, interleaved ``--repeats`` times, medians compared:

    single, 1 torch thread     vs  Ray, 1 worker  x 1 CPU
    single, 2 torch threads    vs  Ray, 2 workers x 1 CPU   (where the machine has 2 cores or more)

Both sides run W (``common.py``) from the same initial model with FedAvg, so the final models agree up to
float rounding (the Ray workers' partial sums group the additions differently). Ray's one-off costs are
reported apart and not in the ratios: starting Ray, and starting the workers (each imports torch, builds its
model and maps W's 123 MB of images from the object store). The timed runs reuse started workers, as every
round after the first of a long simulation does. Target: Ray / single <= 1.3 at equal worker count.

    python benchmarks/ray_overhead.py            # W: 20 rounds, 3 repeats
    python benchmarks/ray_overhead.py --quick    # 5 rounds, 2 repeats (under 2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any

from torch import Tensor

from common import (
    Workload,
    emit,
    environment,
    load_average,
    log,
    make_federation,
    make_model,
    max_abs_diff,
    median,
    run_fedfleet,
    set_threads,
    timed,
    workload,
)
from fedfleet.client import TorchTrainer
from fedfleet.core.loop import LoopConfig, RoundLoop
from fedfleet.core.params import FlatParams
from fedfleet.runtime.ray import RayOptions, RayRuntime, require_ray
from fedfleet.select import UniformSelector
from fedfleet.strategy import build_strategy


def run_ray(w: Workload, runtime: Any) -> tuple[dict[str, Tensor], float]:
    """W on already started Ray workers: a fresh initial model and loop, the same schedule as the other side."""
    initial = make_model(w)

    def go() -> dict[str, Tensor]:
        params = FlatParams.from_tensors({n: p.detach() for n, p in initial.named_parameters()})
        loop = RoundLoop(
            runtime.strategy,
            runtime,
            UniformSelector(),
            params,
            w.fit_config(),
            LoopConfig(rounds=w.rounds, cohort=w.cohort, seed=w.seed, eval_every=0),
        )
        loop.run()
        return {k: v.clone() for k, v in loop.global_params.tensors().items()}

    return timed(go)


def compare(w: Workload, fed: Any, workers: int, repeats: int) -> dict[str, Any]:
    """One pair: the single process with ``workers`` threads vs ``workers`` Ray workers of 1 CPU each."""
    single_threads, driver_threads = workers, 1  # the Ray driver only folds; its workers train

    def single(wl: Workload) -> tuple[dict[str, Tensor], float]:
        set_threads(single_threads)
        return run_fedfleet(wl, fed, "off")[:2]

    def on_ray(wl: Workload) -> tuple[dict[str, Tensor], float]:
        set_threads(driver_threads)
        return run_ray(wl, runtime)

    trainer = TorchTrainer(make_model(w))
    options = RayOptions(workers=workers, cpus_per_worker=1.0, vectorize="off")
    runtime = RayRuntime(trainer, fed, None, strategy=build_strategy("fedavg"), options=options)
    _, start_s = timed(runtime.start)
    log(f"{workers} Ray worker(s) started in {start_s:.2f} s")
    sides = {"single": single, "ray": on_ray}
    try:
        warm = dataclasses.replace(w, rounds=2)
        for name, side in sides.items():
            log(f"warm-up {name} x{workers}: {side(warm)[1]:.2f} s for 2 rounds")
        times: dict[str, list[float]] = {name: [] for name in sides}
        finals: dict[str, dict[str, Tensor]] = {}
        for rep in range(repeats):
            for name, side in sides.items():  # interleaved: drift in the machine's speed hits both alike
                finals[name], dt = side(w)
                times[name].append(dt)
                log(f"repeat {rep + 1}/{repeats} {name} x{workers}: {dt:.3f} s")
        one = dataclasses.replace(w, rounds=1)
        first = {name: side(one)[0] for name, side in sides.items()}
    finally:
        runtime.close()
    med = {name: median(ts) for name, ts in times.items()}
    return {
        "ratio": round(med["ray"] / med["single"], 4),
        "single_s": round(med["single"], 4),
        "ray_s": round(med["ray"], 4),
        "overhead_ms_per_round": round(1000 * (med["ray"] - med["single"]) / w.rounds, 1),
        "ray_workers_start_s": round(start_s, 2),
        "max_abs_diff": max_abs_diff(finals["ray"], finals["single"]),
        "max_abs_diff_round1": max_abs_diff(first["ray"], first["single"]),
        "times_s": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 rounds and 2 repeats instead of 20 and 3")
    ap.add_argument("--rounds", type=int, default=None, help="override the number of rounds")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per side (median reported)")
    ap.add_argument("--max-workers", type=int, default=min(2, os.cpu_count() or 1), help="the largest pair")
    args = ap.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.threads = "per pair: the single process gets as many threads as the Ray side has 1-CPU workers"

    ray = require_ray()  # a clear message where Ray is not installed
    load_start = load_average()
    if load_start > 0.5:
        log(f"warning: load average {load_start} before the start; other processes will distort the timings")
    w = workload(args.quick, args.rounds)
    fed = make_federation(w)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t = time.perf_counter()
    ray.init(num_cpus=args.max_workers, include_dashboard=False, object_store_memory=512 * 2**20)
    init_s = time.perf_counter() - t
    log(f"Ray started in {init_s:.2f} s")
    pairs = {}
    try:
        for workers in range(1, args.max_workers + 1):
            pairs[workers] = compare(w, fed, workers, args.repeats)
    finally:
        ray.shutdown()

    result: dict[str, Any] = {"benchmark": "ray_overhead"}
    result.update({f"ratio_{k}": p["ratio"] for k, p in pairs.items()})
    if len(pairs) > 1:
        result["speedup_ray_2_vs_single_1"] = round(pairs[1]["single_s"] / pairs[2]["ray_s"], 3)
    result.update(ray_init_s=round(init_s, 2), pairs={str(k): p for k, p in pairs.items()})
    result.update(ray=ray.__version__, **environment(args, w, load_start))
    for k, p in pairs.items():
        print(
            f"{k} worker(s): single {p['single_s']:7.3f} s   Ray {p['ray_s']:7.3f} s   ratio {p['ratio']:.3f}   "
            f"max |diff| {p['max_abs_diff']:.3g} (round 1: {p['max_abs_diff_round1']:.3g})"
        )
    starts = ", ".join(f"{p['ray_workers_start_s']:.1f}" for p in pairs.values())
    print(f"one-off: Ray start {init_s:.1f} s; workers start {starts} s")
    emit(result)


if __name__ == "__main__":
    main()
