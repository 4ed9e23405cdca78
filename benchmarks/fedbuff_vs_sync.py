"""FedBuff vs synchronous FedAvg with over-commitment: simulated time to a target accuracy, on the same traces.

Both runs are the same job (examples/digits_fedbuff.yaml's population: the digits data over 100 clients,
Dirichlet 0.5, simple CNN, 1 local epoch, generated phone-like traces with ~30% of clients online) and
differ only in how updates are collected:

    sync     cohort 10, over-commitment 0.3: 13 clients asked per round, the first 10 to finish are folded
    fedbuff  13 clients training at all times (the same concurrency), a server step every `buffer` arrivals,
             each arrival scaled by 1 / sqrt(1 + staleness)

Each run stops when the test accuracy (evaluated after every round / server step) first reaches the
target. Reported per mode: simulated seconds to the target (the virtual clock: download + compute +
upload from the traces), rounds or server steps, updates folded, clients trained (the simulation's work)
and wall seconds; and the ratio sync / fedbuff of simulated time to target.

    python benchmarks/fedbuff_vs_sync.py            # seeds 0, 1, 2; buffers 5 and 10; target 0.8
    python benchmarks/fedbuff_vs_sync.py --quick    # seed 0, buffer 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch

from common import cpu_model_name, emit, load_average, log
from fedfleet.config.loader import parse
from fedfleet.config.schema import JobConfig
from fedfleet.core.loop import Callback, RoundLoop, RoundRecord
from fedfleet.jobs.simulation import Simulation

COHORT, FACTOR = 10, 0.3
CONCURRENCY = 13  # floor(COHORT x (1 + FACTOR)): as many clients at work as the over-committed rounds ask


def job(seed: int, out: str, fedbuff: dict[str, Any] | None, target: float, limit: int) -> JobConfig:
    data: dict[str, Any] = {
        "name": "bench",
        "seed": seed,
        "rounds": limit,
        "cohort": COHORT,
        "eval_every": 1,
        "data": {"dataset": "digits", "clients": 100, "partition": {"name": "dirichlet", "alpha": 0.5}},
        "model": {"name": "simple_cnn", "padding": 1},
        "strategy": "fedavg",
        "client": {"epochs": 1, "batch_size": 10, "lr": 0.1},
        "runtime": {"vectorize": "off"},
        "output": {"dir": out},
        "system": {
            "traces": {"name": "generate", "online_fraction": 0.3, "compute_median_s": 0.005},
            "target_accuracy": target,
        },
    }
    if fedbuff is None:
        data["system"]["round_end"] = {"name": "overcommit", "factor": FACTOR}
    else:
        data["fedbuff"] = fedbuff
    return parse(JobConfig, data)


class StopAtTarget(Callback):
    def on_round_end(self, loop: RoundLoop, record: RoundRecord) -> None:
        if loop.time_to_target is not None:
            loop.request_stop()


class CountingRuntime:
    """Counts the clients the runtime trains (the simulation's real work), passing everything through."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.trained = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def fit(self, global_params, clients, config):
        for update in self.inner.fit(global_params, clients, config):
            self.trained += 1
            yield update


def run(seed: int, fedbuff: dict[str, Any] | None, target: float, limit: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        sim = Simulation.from_config(job(seed, out, fedbuff, target, limit), callbacks=[StopAtTarget()])
        counting = CountingRuntime(sim.loop.runtime)
        sim.loop.runtime = counting
        t = time.perf_counter()
        history = sim.run()
        wall = time.perf_counter() - t
    reached = sim.loop.time_to_target
    return {
        "reached": reached is not None,
        "sim_time_to_target_s": round(reached["sim_time_s"], 1) if reached else None,
        "steps": len(history),
        "updates_folded": int(sum(r.metrics["clients"] for r in history)),
        "clients_trained": counting.trained,
        "best_accuracy": round(max(r.metrics.get("test_accuracy", 0.0) for r in history), 4),
        "sim_time_s": round(history[-1].metrics["sim_time_s"], 1),
        "wall_s": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = load_average()
    seeds = [0] if args.quick else [0, 1, 2]
    buffers = [5] if args.quick else [5, 10]
    limit = 300  # rounds or server steps before a run gives up on the target
    modes: dict[str, dict[str, Any] | None] = {"sync_overcommit": None}
    for b in buffers:
        modes[f"fedbuff_b{b}"] = {"buffer": b, "concurrency": CONCURRENCY, "staleness": "polynomial"}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
    for seed in seeds:
        for name, fedbuff in modes.items():
            r = run(seed, fedbuff, args.target, limit)
            results[name].append(r)
            log(f"seed {seed} {name}: {r}")
    summary: dict[str, Any] = {}
    sync = [r["sim_time_to_target_s"] for r in results["sync_overcommit"]]
    for name, rows in results.items():
        times = [r["sim_time_to_target_s"] for r in rows]
        entry: dict[str, Any] = {
            "sim_time_to_target_s_median": statistics.median(times) if all(times) else None,
            "clients_trained_median": statistics.median(r["clients_trained"] for r in rows),
            "steps_median": statistics.median(r["steps"] for r in rows),
            "wall_s_median": statistics.median(r["wall_s"] for r in rows),
            "runs": rows,
        }
        if name != "sync_overcommit" and all(times) and all(sync):
            ratios = [s / t for s, t in zip(sync, times, strict=True)]
            entry["sync_over_fedbuff_sim_time"] = round(statistics.median(ratios), 2)
        summary[name] = entry
    emit(
        {
            "benchmark": "fedbuff_vs_sync",
            "target_accuracy": args.target,
            "seeds": seeds,
            "cohort": COHORT,
            "overcommit_factor": FACTOR,
            "concurrency": CONCURRENCY,
            "results": summary,
            "threads": args.threads,
            "cpu": cpu_model_name(),
            "torch": torch.__version__,
            "load_avg_1min": {"start": load_start, "end": load_average()},
            "quick": args.quick,
        }
    )


if __name__ == "__main__":
    main()
