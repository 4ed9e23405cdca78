"""Oort vs uniform selection: simulated time to a target test accuracy, side by side, over several seeds.

Workload O, a FedScale-style cross-device job shrunk to 2 cores:

- data: mnist5k (5,000 real MNIST digits), 80/20 split, the 4,000 training images dealt over 200 clients
  with a Dirichlet(0.5) label skew: each client holds a few classes and 1 to ~80 images (heavy-tailed sizes,
  like FEMNIST's writers);
- model: an MLP 784-512-256-10 (535k params, 2.1 MB as float32: the size class of the mobile CNNs in
  FedScale's benchmarks, so sending the model costs about as much as training it);
- clients: FedScale's local training, a fixed 20 SGD steps of batch 20 (lr 0.05) whatever the data size;
- system: generated traces (``fedfleet.traces.generate``): compute lognormal around 5 ms a sample (sigma 0.6,
  FedScale's lognormal completion-time model), download 2.5 MB/s and upload 1.25 MB/s lognormal with sigma 1
  (MobiPerf-like spread: the slowest tenth of links is ~4x slower than the median, the fastest tenth ~4x
  faster), each client online ~30% of a day in sessions (diurnal); a client that goes offline mid-round
  loses its update;
- rounds: cohort 10 with FedScale's over-commitment (13 asked, the first 10 updates kept), FedAvg.

So a round's length is the 10th fastest of 13 devices, and that is where selection matters: uniform picks
13 random checked-in devices; Oort prefers clients whose data still has high loss and whose devices are fast.

Arms (the same seed gives every arm the same data split, traces and initial model):

    uniform         uniform sampling among the checked-in clients
    oort            Oort, knowing nothing of a client until it took part (explores uniformly)
    oort_profiles   Oort told each client's data size and expected round duration when it registers
                    (``OortSelector.register``), as FedScale's clients report them; explores fast clients

Reported: for each target accuracy, the simulated seconds (virtual clock) until the test accuracy first
reaches it, per seed and the median, and the ratio uniform / Oort (median over seeds of the per-seed ratio).
A run stops once every target is reached or after ``--rounds``. The wall time of each run is noted too,
but it is not the result: the virtual clock is.

    python benchmarks/oort_vs_uniform.py            # 3 seeds, 3 arms, targets 0.80 0.85 0.87, <= 80 rounds
    python benchmarks/oort_vs_uniform.py --quick    # 3 seeds, uniform vs oort_profiles, target 0.80
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from common import cpu_model_name, emit, load_average, log
from fedfleet import FitConfig, Simulation
from fedfleet.core.clock import planned_samples
from fedfleet.core.loop import Callback, RoundLoop, RoundRecord
from fedfleet.core.round_end import OverCommit, RoundFeedback
from fedfleet.data import federate, load_dataset, train_test_split
from fedfleet.models import build_model
from fedfleet.select import OortSelector, UniformSelector
from fedfleet.traces import generate_traces


@dataclass(frozen=True)
class WorkloadO:
    dataset: str = "mnist5k"
    clients: int = 200
    alpha: float = 0.5  # Dirichlet label skew
    hidden: tuple[int, ...] = (512, 256)
    cohort: int = 10
    overcommit: float = 0.3
    steps: int = 20
    batch_size: int = 20
    lr: float = 0.05
    online_fraction: float = 0.3
    compute_median_s: float = 0.005
    compute_sigma: float = 0.6
    bandwidth_sigma: float = 1.0


class Recorder:
    """Wraps a selector: keeps who it picked each round (to measure what it prefers) and forwards feedback."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.picks: list[np.ndarray] = []

    def select(self, population: int, k: int, round: int, seed: int, available: np.ndarray | None = None):
        chosen = self.inner.select(population, k, round, seed, available=available)
        self.picks.append(np.asarray(chosen))
        return chosen

    def observe(self, round: int, feedback: RoundFeedback) -> None:
        if hasattr(self.inner, "observe"):
            self.inner.observe(round, feedback)


class StopAtTargets(Callback):
    """Ends the run once the test accuracy has reached every target: later rounds cannot change the result."""

    def __init__(self, targets: list[float]) -> None:
        self.highest = max(targets)

    def on_round_end(self, loop: RoundLoop, record: RoundRecord) -> None:
        if record.metrics.get("test_accuracy", 0.0) >= self.highest:
            loop.request_stop()


def oort_blind(expected: np.ndarray, sizes: np.ndarray) -> OortSelector:
    return OortSelector()


def oort_profiles(expected: np.ndarray, sizes: np.ndarray) -> OortSelector:
    oort = OortSelector()
    oort.register(durations=expected, sizes=sizes)
    return oort


# arm -> selector factory, given what clients would report at registration (expected seconds, data sizes)
ARMS: dict[str, Callable[[np.ndarray, np.ndarray], Any]] = {
    "uniform": lambda expected, sizes: UniformSelector(),
    "oort": oort_blind,
    "oort_profiles": oort_profiles,
}


def run_arm(w: WorkloadO, arm: str, seed: int, rounds: int, targets: list[float]) -> dict[str, Any]:
    torch.manual_seed(seed)
    train, test = train_test_split(load_dataset(w.dataset), 0.2, seed=seed)
    fed = federate(train, clients=w.clients, scheme="dirichlet", alpha=w.alpha, seed=seed)
    model = build_model("mlp", fed.input_shape, fed.num_classes, hidden=w.hidden)
    traces = generate_traces(
        w.clients,
        seed,
        online_fraction=w.online_fraction,
        compute_median_s=w.compute_median_s,
        compute_sigma=w.compute_sigma,
        bandwidth_sigma=w.bandwidth_sigma,
    )
    fit = FitConfig(steps=w.steps, batch_size=w.batch_size, lr=w.lr)
    recorder = Recorder(None)
    sim = Simulation.build(
        model,
        fed,
        test=test,
        rounds=rounds,
        cohort=w.cohort,
        client=fit,
        seed=seed,
        eval_every=1,
        selector=recorder,
        traces=traces,
        round_end=OverCommit(w.overcommit),
        callbacks=[StopAtTargets(targets)],
    )
    # what each client would tell the server at registration: its data size and the seconds a round takes on
    # its device (the same latency model the virtual clock charges; FedScale's Oort gets exactly this)
    sizes = fed.sizes().cpu().numpy()
    nbytes = sim.loop.global_params.nbytes
    expected = sim.loop.clock.latencies(np.arange(w.clients), planned_samples(sizes, fit), nbytes, nbytes)
    recorder.inner = ARMS[arm](expected, sizes)
    t = time.perf_counter()
    history = sim.run()
    wall = time.perf_counter() - t
    return summarise(history, recorder.picks, expected, sizes, targets, wall)


def summarise(
    history: list[RoundRecord],
    picks: list[np.ndarray],
    expected: np.ndarray,
    sizes: np.ndarray,
    targets: list[float],
    wall: float,
) -> dict[str, Any]:
    acc = np.array([r.metrics.get("test_accuracy", 0.0) for r in history])
    sim_t = np.array([r.metrics["sim_time_s"] for r in history])
    reached = {}
    for target in targets:
        hit = np.flatnonzero(acc >= target)
        reached[str(target)] = None if len(hit) == 0 else {"round": int(hit[0]) + 1, "sim_s": float(sim_t[hit[0]])}
    chosen = np.concatenate(picks)
    rounds_s = [r.metrics["sim_round_s"] for r in history]
    return {
        "reached": reached,
        "rounds": len(history),
        "best_accuracy": round(float(acc.max()), 4),
        "round_s_median": round(statistics.median(rounds_s), 3),
        "round_s_median_after_20": round(statistics.median(rounds_s[20:]), 3) if len(rounds_s) > 20 else None,
        # what the selector prefers: the devices' expected seconds and data sizes of its picks vs everyone's
        "picked_expected_s_median": round(float(np.median(expected[chosen])), 3),
        "picked_size_mean": round(float(sizes[chosen].mean()), 1),
        "distinct_clients": len(np.unique(chosen)),
        "dropped_offline": int(sum(r.metrics.get("dropped_offline", 0) for r in history)),
        "wall_s": round(wall, 1),
    }


def ratios(results: dict[str, list[dict[str, Any]]], arm: str, targets: list[float]) -> dict[str, Any]:
    """Per target: uniform's seconds / the arm's, per seed (None where either missed) and their median."""
    out = {}
    for target in targets:
        key = str(target)
        per_seed = []
        for u, o in zip(results["uniform"], results[arm], strict=True):
            a, b = u["reached"][key], o["reached"][key]
            per_seed.append(None if a is None or b is None else round(a["sim_s"] / b["sim_s"], 3))
        got = [r for r in per_seed if r is not None]
        out[key] = {"per_seed": per_seed, "median": round(statistics.median(got), 3) if got else None}
    return out


def median_seconds(runs: list[dict[str, Any]], target: float) -> float | None:
    times = [r["reached"][str(target)]["sim_s"] for r in runs if r["reached"][str(target)] is not None]
    return round(statistics.median(times), 1) if len(times) == len(runs) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="uniform vs oort_profiles, target 0.80, <= 40 rounds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=None, help="the most rounds a run may take")
    parser.add_argument("--targets", type=float, nargs="+", default=None)
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=None)
    args = parser.parse_args()
    targets = args.targets or ([0.80] if args.quick else [0.80, 0.85, 0.87])
    rounds = args.rounds or (40 if args.quick else 80)
    arms = args.arms or (["uniform", "oort_profiles"] if args.quick else list(ARMS))
    if "uniform" not in arms:
        arms = ["uniform", *arms]
    torch.set_num_threads(1)  # small steps: one thread is fastest, and the machine is shared
    w = WorkloadO()
    load_start = load_average()
    results: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for seed in args.seeds:
        for arm in arms:
            r = run_arm(w, arm, seed, rounds, targets)
            results[arm].append(r)
            times = ", ".join(
                f"{t}: {v['sim_s']:.0f} s (round {v['round']})" if v else f"{t}: missed"
                for t, v in r["reached"].items()
            )
            log(
                f"seed {seed} {arm:13s} {times}; round {r['round_s_median']:.2f} s median, picks' expected "
                f"{r['picked_expected_s_median']:.2f} s, {r['distinct_clients']} distinct clients, "
                f"best acc {r['best_accuracy']:.3f}, wall {r['wall_s']:.0f} s"
            )
    summary = {arm: {str(t): median_seconds(results[arm], t) for t in targets} for arm in arms}
    speedups = {arm: ratios(results, arm, targets) for arm in arms if arm != "uniform"}
    for arm, by_target in speedups.items():
        for t, r in by_target.items():
            print(f"target {t}: uniform / {arm} = {r['median']} (per seed {r['per_seed']})")
    emit(
        {
            "benchmark": "oort_vs_uniform",
            "primary_target": 0.80 if args.quick else 0.85,
            "speedup": speedups,
            "median_sim_s_to_target": summary,
            "runs": {arm: dict(zip(map(str, args.seeds), rs, strict=True)) for arm, rs in results.items()},
            "workload": asdict(w),
            "seeds": args.seeds,
            "max_rounds": rounds,
            "cpu": cpu_model_name(),
            "torch": torch.__version__,
            "load_avg_1min": {"start": load_start, "end": load_average()},
            "quick": args.quick,
        }
    )


if __name__ == "__main__":
    main()
