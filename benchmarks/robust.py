"""Robust aggregation against attackers (issue 16): final test accuracy of FedAvg and each robust aggregator
with 0%, 10% and 20% attackers of each kind, and what each aggregator costs per round beside FedAvg.

Workload R, the embedded digits job made quick enough for a grid on 2 cores:

- data: scikit-learn's 1,797 real 8x8 digits, 80/20 split, the training images dealt iid over 50 clients;
- model: fedfleet's ``mlp`` (55K params); local training 2 epochs of batch 10, lr 0.3; cohort 20, FedAvg's
  server step under every aggregator (the rule replaces the round's weighted mean);
- attackers: a fixed, seeded 10% or 20% of the 50 clients (5 or 10; a cohort of 20 then holds 4 on average,
  more in some rounds), sending their delta sign-flipped and x3 (``sign_flip``, scale 3), boosted x10
  (``scale``: model replacement), or N(0, 3^2) noise in its place (``gaussian``);
- aggregators with the parameters a user would set for "at most 4 attackers a round": trimmed mean beta 0.2
  (4 per end), Krum f 4, multi-Krum f 4 m 12, Bulyan f 4 (n >= 19), geometric median (5 Weiszfeld steps),
  centered clipping tau 1 (about the honest deltas' norm; 3 iterations), adaptive norm bounding 2 x the median
  of recent norms.

Two costs per aggregator, as ratios to FedAvg:
1. the median wall time of a round of the digits job (training included: what a user sees);
2. the server side alone: K = 20 synthetic updates of D params (1M; 250K in quick mode) folded and finished
   through the aggregator, beside the strategy's streaming weighted mean; also the median spilled to a
   memory-mapped file (spill_mb: 0).

    python benchmarks/robust.py            # 20 rounds, every aggregator x 7 settings, D = 1M
    python benchmarks/robust.py --quick    # 8 rounds, every aggregator x (0%, 20% of each kind), D = 250K;
                                           # prints one JSON line last
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cpu_model_name, emit, load_average, log

AGGREGATORS: dict[str, dict[str, Any] | None] = {
    "fedavg": None,
    "median": {"name": "median"},
    "trimmed_mean": {"name": "trimmed_mean", "beta": 0.2},
    "krum": {"name": "krum", "f": 4},
    "multi_krum": {"name": "krum", "f": 4, "m": 12},
    "bulyan": {"name": "bulyan", "f": 4},
    "geomedian": {"name": "geomedian"},
    "centered_clip": {"name": "centered_clip", "tau": 1.0},
    "norm_bound": {"name": "norm_bound", "multiplier": 2.0, "max_norm": 3.0},
}
ATTACKS: dict[str, dict[str, Any]] = {
    "sign_flip": {"name": "sign_flip", "scale": 3.0},
    "scale": {"name": "scale", "boost": 10.0},
    "gaussian": {"name": "gaussian", "sigma": 3.0},
}


def job(aggregator: str, attack: str | None, fraction: float, rounds: int, seed: int, out: str) -> Any:
    from fedfleet.config import parse
    from fedfleet.config.schema import JobConfig

    rule = AGGREGATORS[aggregator]
    client = [{**ATTACKS[attack], "fraction": fraction}] if attack is not None and fraction > 0 else []
    data = {
        "name": "robust",
        "seed": seed,
        "rounds": rounds,
        "cohort": 20,
        "eval_every": rounds,
        "data": {"dataset": "digits", "clients": 50, "partition": {"name": "iid"}},
        "model": {"name": "mlp"},
        "client": {"epochs": 2, "batch_size": 10, "lr": 0.3},
        "runtime": {"threads": 1},
        "output": {"dir": out},
        "transforms": {"client": client, "server": [rule] if rule is not None else []},
    }
    return parse(JobConfig, data)


def run_job(aggregator: str, attack: str | None, fraction: float, rounds: int, seed: int) -> dict[str, float]:
    from fedfleet.jobs.simulation import Simulation

    with tempfile.TemporaryDirectory() as out:
        sim = Simulation.from_config(job(aggregator, attack, fraction, rounds, seed, out))
        history = sim.loop.run()
    last = history[-1].metrics
    return {
        "accuracy": last["test_accuracy"],
        "round_s": statistics.median(r.metrics["wall_s"] for r in history[1:] or history),
        "attackers_share": statistics.mean(r.metrics.get("train_attacker", 0.0) for r in history),
    }


def settings(quick: bool) -> list[tuple[str | None, float]]:
    fractions = (0.2,) if quick else (0.1, 0.2)
    return [(None, 0.0)] + [(a, f) for f in fractions for a in ATTACKS]


def server_cost(aggregator: str, k: int, dim: int, repeats: int, spill: bool = False) -> float:
    """Median seconds to fold and finish one round of ``k`` synthetic updates of ``dim`` params."""
    from fedfleet.core.params import FlatParams
    from fedfleet.core.update import Update
    from fedfleet.strategy import build_strategy
    from fedfleet.transforms import JobFacts, build_pipeline

    rule = AGGREGATORS[aggregator]
    server = [] if rule is None else [(rule["name"], {k_: v for k_, v in rule.items() if k_ != "name"})]
    if spill:
        server = [(server[0][0], {**server[0][1], "spill_mb": 0})]
    pipeline = build_pipeline(server=server, job=JobFacts(cohort=k))
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(dim, generator=gen) * 0.01 for _ in range(k)]
    like = FlatParams.from_tensors({"w": torch.zeros(dim)})
    strategy, times = build_strategy("fedavg"), []
    update = Update(FlatParams.from_tensors({"w": torch.zeros(dim)}), 1.0)
    for _ in range(repeats):
        start = time.perf_counter()
        agg = pipeline.aggregator(strategy, like)
        for i, row in enumerate(rows):
            update.params.buffers[torch.float32].copy_(row)  # one reused buffer, as the simulation sends
            update.client_id = i
            agg.add(update)
        agg.finish()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(results: dict[str, dict[str, dict[str, float]]], columns: list[str]) -> str:
    lines = ["| aggregator | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]['accuracy']:.3f}" for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # every refusal and retry would be logged; the metrics count them
    torch.set_num_threads(1)
    load_start, began = load_average(), time.perf_counter()
    rounds = args.rounds or (8 if args.quick else 20)
    dim, repeats = (250_000, 3) if args.quick else (1_000_000, 5)

    results: dict[str, dict[str, dict[str, float]]] = {}
    columns = []
    for aggregator in AGGREGATORS:
        results[aggregator] = {}
        for attack, fraction in settings(args.quick):
            column = "none" if attack is None else f"{attack} {fraction:.0%}"
            if column not in columns:
                columns.append(column)
            results[aggregator][column] = run_job(aggregator, attack, fraction, rounds, args.seed)
            log(f"{aggregator:14s} {column:14s} accuracy {results[aggregator][column]['accuracy']:.3f}")

    fedavg_round = results["fedavg"]["none"]["round_s"]
    server_cost("median", 20, dim, 1)  # warm-up: allocator, numpy's sort, torch's kernels
    fedavg_server = server_cost("fedavg", 20, dim, repeats)
    costs: dict[str, dict[str, float]] = {}
    for aggregator in AGGREGATORS:
        seconds = server_cost(aggregator, 20, dim, repeats) if aggregator != "fedavg" else fedavg_server
        costs[aggregator] = {
            "round_s": results[aggregator]["none"]["round_s"],
            "round_vs_fedavg": results[aggregator]["none"]["round_s"] / fedavg_round,
            "server_s": seconds,
            "server_vs_fedavg": seconds / fedavg_server,
        }
        log(f"{aggregator:14s} round x{costs[aggregator]['round_vs_fedavg']:.2f}  server {seconds * 1e3:.1f} ms "
            f"(x{costs[aggregator]['server_vs_fedavg']:.1f})")  # fmt: skip
    spilled = server_cost("median", 20, dim, repeats, spill=True)
    costs["median_spilled"] = {"server_s": spilled, "server_vs_fedavg": spilled / fedavg_server}
    log(table(results, columns))
    emit(
        {
            "benchmark": "robust",
            "quick": args.quick,
            "rounds": rounds,
            "seed": args.seed,
            "server_updates": 20,
            "server_params": dim,
            "accuracy": {a: {c: round(v["accuracy"], 4) for c, v in row.items()} for a, row in results.items()},
            "cost": {a: {k: round(v, 5) for k, v in c.items()} for a, c in costs.items()},
            "cpu": cpu_model_name(),
            "torch": torch.__version__,
            "load_avg_1min": {"start": load_start, "end": load_average()},
            "seconds": round(time.perf_counter() - began, 1),
        }
    )


if __name__ == "__main__":
    main()
