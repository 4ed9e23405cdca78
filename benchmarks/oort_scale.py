"""Oort at scale: 1,000,000 registered clients with generated system traces, cohort 100.

Measures what the server does per round before and after training, through the real round loop
(``RoundLoop.run_round`` with a runtime that trains nothing and answers with 2-float updates):
who is checked in (availability at the virtual time), Oort's selection of K x 1.3 (over-commitment),
latencies and the round-end decision, then Oort's update from the feedback.
Oort's selection is timed while it explores (few clients known), after every client has reported once
(exploitation over all checked-in clients), and choosing exactly the cohort with all 1,000,000 clients
checked in (the worst case).
Uniform selection among the same checked-in clients is timed beside it as the reference.

Targets: Oort select-100 <= 100 ms per round (median); RSS beyond the baseline (after imports) well under
2 GB for the traces, the clients' data sizes and Oort's state.

    python benchmarks/oort_scale.py            # 1,000,000 clients, 200 rounds per phase
    python benchmarks/oort_scale.py --quick    # the same population, 30 rounds per phase
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from common import cpu_model_name, emit, load_average, log, median
from fedfleet.core.clock import VirtualClock
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import LoopConfig, RoundLoop
from fedfleet.core.params import FlatParams
from fedfleet.core.round_end import OverCommit, RoundFeedback
from fedfleet.core.update import TrainStats, Update
from fedfleet.select import OortSelector, UniformSelector
from fedfleet.strategy import build_strategy
from fedfleet.traces import generate_traces


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class NoTraining:
    """A runtime for server-side timing: each trained client answers at once with a tiny update and its
    hidden loss (Oort needs a loss that differs between clients to have something to prefer)."""

    def __init__(self, population: int, loss: np.ndarray) -> None:
        self.population = population
        self.loss = loss
        self.delta = FlatParams.from_tensors({"w": torch.zeros(2)})

    def fit(self, global_params, clients, config):
        for c in clients:
            stats = TrainStats(samples=20.0, loss=float(self.loss[c]))
            yield Update(self.delta, weight=20.0, client_id=int(c), stats=stats)

    def round_metrics(self) -> dict[str, float]:
        return {}

    def evaluate(self, global_params) -> dict[str, float]:
        return {}


class Timed:
    """Wraps a selector and times each ``select`` call (the loop passes who is checked in)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.select_s: list[float] = []
        self.observe_s: list[float] = []

    def select(self, population: int, k: int, round: int, seed: int, available: np.ndarray | None = None):
        t = time.perf_counter()
        out = self.inner.select(population, k, round, seed, available=available)
        self.select_s.append(time.perf_counter() - t)
        return out

    def observe(self, round: int, feedback: RoundFeedback) -> None:
        t = time.perf_counter()
        getattr(self.inner, "observe", lambda *_: None)(round, feedback)
        self.observe_s.append(time.perf_counter() - t)


def run_rounds(loop: RoundLoop, first: int, rounds: int) -> list[float]:
    walls = []
    for rnd in range(first, first + rounds):
        walls.append(loop.run_round(rnd).metrics["wall_s"])
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=1_000_000)
    parser.add_argument("--cohort", type=int, default=100)
    args = parser.parse_args()
    rounds = 30 if args.quick else 200
    load_start = load_average()
    n = args.clients

    baseline = rss_bytes()
    peak_before = peak_rss_bytes()
    t = time.perf_counter()
    traces = generate_traces(n, seed=0, online_fraction=0.3)
    generate_s = time.perf_counter() - t
    rng = np.random.default_rng(1)
    sizes = rng.integers(10, 200, n)  # examples per client: what the loop plans latencies from
    hidden_loss = rng.lognormal(0.0, 0.5, n)
    log(f"{n:,} clients: traces {traces.nbytes / 2**20:.0f} MiB generated in {generate_s:.1f} s")

    oort = Timed(OortSelector())
    loop = RoundLoop(
        build_strategy("fedavg"),
        NoTraining(n, hidden_loss),
        oort,
        FlatParams.from_tensors({"w": torch.zeros(2)}),
        FitConfig(epochs=1, batch_size=20),
        LoopConfig(rounds=10**9, cohort=args.cohort, seed=0, eval_every=0),
        clock=VirtualClock(traces=traces),
        round_end=OverCommit(0.3),
        client_sizes=sizes,
    )
    online = traces.availability.online_clients(0.0)
    check_in_s = []
    for h in range(24):
        t = time.perf_counter()
        traces.availability.online_clients(h * 3600.0)
        check_in_s.append(time.perf_counter() - t)

    fresh_walls = run_rounds(loop, 0, rounds)
    fresh = list(oort.select_s)
    log(f"exploring: Oort select median {1e3 * median(fresh):.1f} ms, round {1e3 * median(fresh_walls):.1f} ms")

    everyone = np.arange(n)  # every client reports once: Oort now exploits over the whole population
    oort.inner.observe(
        rounds, RoundFeedback(everyone, np.ones(n, bool), hidden_loss, np.full(n, 20.0), rng.lognormal(3.0, 1.0, n))
    )
    oort.select_s.clear()
    explored_walls = run_rounds(loop, rounds + 1, rounds)
    explored = list(oort.select_s)
    log(f"exploiting: Oort select median {1e3 * median(explored):.1f} ms, round {1e3 * median(explored_walls):.1f} ms")

    all_online = []  # the worst case: no availability trace, every registered client is a candidate
    for rnd in range(2 * rounds + 1, 3 * rounds + 1):
        t = time.perf_counter()
        oort.inner.select(n, args.cohort, rnd, 0)
        all_online.append(time.perf_counter() - t)

    uniform = UniformSelector()
    uniform_s = []
    for rnd in range(rounds):
        t = time.perf_counter()
        uniform.select(n, int(args.cohort * 1.3), rnd, 0, available=online)
        uniform_s.append(time.perf_counter() - t)

    beyond = rss_bytes() - baseline
    peak_beyond = peak_rss_bytes() - max(peak_before, baseline)
    log(f"RSS beyond the baseline: {beyond / 2**20:.0f} MiB (peak {peak_beyond / 2**20:.0f} MiB)")
    emit(
        {
            "benchmark": "oort_scale",
            "clients": n,
            "cohort": args.cohort,
            "selected_per_round": int(args.cohort * 1.3),
            "rounds_per_phase": rounds,
            "online_fraction_at_t0": round(len(online) / n, 3),
            "traces_mib": round(traces.nbytes / 2**20, 1),
            "generate_s": round(generate_s, 2),
            "rss_beyond_baseline_mib": round(beyond / 2**20, 1),
            "peak_rss_beyond_baseline_mib": round(peak_beyond / 2**20, 1),
            "check_in_ms_median": round(1e3 * median(check_in_s), 2),
            "oort_select_ms_median_exploring": round(1e3 * median(fresh), 2),
            "oort_select_ms_median_exploiting": round(1e3 * median(explored), 2),
            "oort_select_ms_p99_exploiting": round(1e3 * float(np.percentile(explored, 99)), 2),
            "oort_select_cohort_ms_median_all_online": round(1e3 * median(all_online), 2),
            "oort_observe_ms_median": round(1e3 * median(oort.observe_s or [0.0]), 3),
            "uniform_select_ms_median": round(1e3 * median(uniform_s), 3),
            "server_round_ms_median_exploiting": round(1e3 * median(explored_walls), 2),
            "cpu": cpu_model_name(),
            "load_avg_1min": {"start": load_start, "end": load_average()},
            "quick": args.quick,
        }
    )


if __name__ == "__main__":
    main()
