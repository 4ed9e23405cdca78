"""Workload S, the cross-device shape (a small model, 2,000 clients, 100 per round), side by side in one script.

Rows, all on S's data, initial model, cohorts and per-client batch order (``common.py``), one torch thread:

- ``fedfleet_vectorized``: RoundLoop + VectorizedRuntime (the cohort as one batched model, ``vectorize: on``);
- ``fedfleet_sequential``: RoundLoop + SequentialRuntime (``vectorize: off``); ``auto_picks`` says which one
  ``vectorize: auto`` trains S's rounds with;
- ``plain``: a hand-written PyTorch loop, client after client, ``torch.optim.SGD`` over the same batches and the
  same example-weighted FedAvg (as ``overhead.py``);
- ``limit``: the compute limit, the same FLOPs as one chain of batched matmuls (for every parameter layer, the
  forward, weight-gradient and input-gradient products of the whole cohort at the layer's matmul shapes; a
  convolution counted as its im2col product), with nothing else: no data, no activations, no optimizer;
- ``pfl``: pfl-research (``pfl`` on PyPI) in its own venv, ``benchmarks/.pfl-venv``: FederatedAveraging on a
  SimulatedBackend with a PyTorchModel, its user sampler handing out fedfleet's cohorts and each user's data in
  fedfleet's batch order, so its final model is comparable;
- ``flower``: Flower's Ray simulation in ``benchmarks/.flower-venv`` (as ``vs_flower.py`` makes it), client data
  built once inside each actor, one model per actor, two 1-CPU actors: Flower at its fastest. Timed on fewer
  rounds (``--flower-rounds``, at least 2) and compared per steady round (the median after the first, which
  starts the actors), Ray's start apart.

Also the accuracy run: S's MLP on MNIST-5k over ragged clients, vectorised beside sequential (``accuracy_run``).

Ratios: everything over fedfleet vectorised, and fedfleet vectorised over the limit, in wall seconds and, for the
in-process rows, in this process's CPU seconds too (a neighbour's share of a shared machine inflates the first).
Final models are compared with the plain loop's. Rows: ``mlp`` (S: 784-100-10), ``logreg`` (784-10) and
``femnist_cnn`` (28x28, 62 classes, the simple CNN; fewer rounds, it is compute-bound).

    python benchmarks/small_model.py                 # S and its two extra rows, 3 repeats
    python benchmarks/small_model.py --quick         # < 2 minutes: S 5 rounds, 1 repeat, Flower 2 rounds
    python benchmarks/small_model.py --sweep         # the vectorize: auto rule's data: speed-ups by model, cohort
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from common import (
    SMALL_MODELS,
    SWEEP_MODELS,
    SmallWorkload,
    cpu_model_name,
    emit,
    load_average,
    log,
    make_small_federation,
    make_small_model,
    max_abs_diff,
    median,
    plain_fedavg,
    set_threads,
    small_workload,
    timed,
)
from small_model_peers import run_side, side_main

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"


# -- fedfleet, the plain loop, the limit ------------------------------------------------------------------
def run_fedfleet(w: SmallWorkload, fed: Any, vectorize: str) -> tuple[dict[str, Tensor], float, str]:
    from fedfleet.client import TorchTrainer
    from fedfleet.core.loop import LoopConfig, RoundLoop
    from fedfleet.runtime.sim import make_runtime
    from fedfleet.select import UniformSelector
    from fedfleet.strategy import build_strategy

    model = make_small_model(w)

    def go() -> tuple[dict[str, Tensor], str]:
        trainer = TorchTrainer(model)
        runtime = make_runtime(trainer, fed, None, vectorize)
        loop = RoundLoop(
            build_strategy("fedavg"),
            runtime,
            UniformSelector(),
            trainer.params.clone(),
            w.fit_config(),
            LoopConfig(rounds=w.rounds, cohort=w.cohort, seed=w.seed, eval_every=0),
        )
        loop.run()
        return {k: v.clone() for k, v in loop.global_params.tensors().items()}, type(runtime).__name__

    (final, kind), seconds = timed(go)
    return final, seconds, kind


def auto_picks(w: SmallWorkload, fed: Any) -> str:
    """What ``vectorize: auto`` trains this workload's rounds with on this device."""
    from fedfleet.client import TorchTrainer
    from fedfleet.runtime.sim import AutoRuntime, cohort_wins_on_cpu, make_runtime

    trainer = TorchTrainer(make_small_model(w))
    runtime = make_runtime(trainer, fed, None, "auto")
    if isinstance(runtime, AutoRuntime):
        wins, why = cohort_wins_on_cpu(trainer.model, w.cohort)
        return f"{'vectorized' if wins else 'sequential'} ({why})"
    return type(runtime).__name__


def run_plain(w: SmallWorkload, fed: Any) -> tuple[dict[str, Tensor], float]:
    """The same federated training by hand: per client, load, plain SGD, fold n_k (w_k - w)."""
    return plain_fedavg(w, fed, make_small_model(w))


def matmul_shapes(w: SmallWorkload) -> list[tuple[int, int, int]]:
    """(M, K, N) of each parameter layer's forward product for one client's batch: a linear layer
    (B, in) x (in, out); a convolution as its im2col product (B * out_pixels, in_channels * kernel, out_channels)."""
    model = make_small_model(w)
    shapes: list[tuple[int, int, int]] = []

    def hook(m: nn.Module, args: tuple, out: Tensor) -> None:
        if isinstance(m, nn.Linear):
            shapes.append((out.numel() // m.out_features, m.in_features, m.out_features))
        elif isinstance(m, nn.Conv2d):
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            shapes.append((out.numel() // m.out_channels, k, m.out_channels))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(torch.zeros(w.batch_size, *w.shape))
    for h in handles:
        h.remove()
    return shapes


def compute_limit(w: SmallWorkload, repeats: int = 5) -> tuple[float, float]:
    """Seconds for S's training FLOPs as batched matmuls alone (the best of ``repeats`` chains of one step,
    times the steps), and the FLOPs. Per layer: forward (C, M, K) x (C, K, N), weight gradient (C, N, M) x (C, M, K),
    input gradient (C, M, N) x (C, N, K) except for the first layer (its input needs none)."""
    c = w.cohort
    chain = []
    flops = 0
    for i, (m, k, n) in enumerate(matmul_shapes(w)):
        products = [(m, k, n), (n, m, k)] + ([(m, n, k)] if i > 0 else [])
        for p, q, r in products:
            chain.append((torch.rand(c, p, q), torch.rand(c, q, r), torch.empty(c, p, r)))
            flops += 2 * c * p * q * r
    best = best_cpu = float("inf")
    for _ in range(repeats + 1):  # the first chain warms the allocator and caches
        t, c = time.perf_counter(), time.process_time()
        for a, b, out in chain:
            torch.bmm(a, b, out=out)
        best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    steps = w.rounds * w.epochs * -(-w.per_client // w.batch_size)
    return best * steps, float(flops * steps), best_cpu * steps


# -- the comparison ---------------------------------------------------------------------------------------
def row(model: str, args: argparse.Namespace) -> dict[str, Any]:
    rounds = args.rounds or (5 if args.quick else 20)
    if model == "femnist_cnn":  # compute-bound: fewer rounds keep the row within minutes
        rounds = 1 if args.quick else 3
    w = small_workload(model, rounds=rounds)
    fed = make_small_federation(w)
    sides = {
        "fedfleet_vectorized": lambda wl: run_fedfleet(wl, fed, "on")[:2],
        "fedfleet_sequential": lambda wl: run_fedfleet(wl, fed, "off")[:2],
        "plain": lambda wl: run_plain(wl, fed),
    }
    warm = dataclasses.replace(w, rounds=1)
    for side in sides.values():
        side(warm)
    times: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}  # this process's CPU seconds: what a busy
    finals: dict[str, dict[str, Tensor]] = {}  # neighbour's share of the cores does not inflate
    limits, cpu_limits = [], []
    for rep in range(args.repeats):
        for name, side in sides.items():  # interleaved: drift in the machine's speed hits every side alike
            c = time.process_time()
            finals[name], dt = side(w)
            times[name].append(dt)
            cpu[name].append(time.process_time() - c)
            log(f"{model} repeat {rep + 1}/{args.repeats} {name}: {dt:.3f} s (cpu {cpu[name][-1]:.3f} s)")
        limit, _, limit_cpu = compute_limit(w)
        limits.append(limit)
        cpu_limits.append(limit_cpu)
    med = {name: median(ts) for name, ts in times.items()}
    med["limit"] = min(limits)
    cpu_med = {name: median(ts) for name, ts in cpu.items()} | {"limit": min(cpu_limits)}
    vec = med["fedfleet_vectorized"]
    out: dict[str, Any] = {
        "model": model,
        "params": sum(p.numel() for p in make_small_model(w).parameters()),
        "rounds": w.rounds,
        "seconds": {k: round(v, 4) for k, v in med.items()},
        "times_s": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
        "cpu_seconds": {k: round(v, 4) for k, v in cpu_med.items()},
        "cpu_vectorized_over_limit": round(cpu_med["fedfleet_vectorized"] / cpu_med["limit"], 3),
        "cpu_plain_over_vectorized": round(cpu_med["plain"] / cpu_med["fedfleet_vectorized"], 3),
        "gflop": round(compute_limit(w, repeats=0)[1] / 1e9, 2),
        "vectorized_over_limit": round(vec / med["limit"], 3),
        "plain_over_vectorized": round(med["plain"] / vec, 3),
        "sequential_over_vectorized": round(med["fedfleet_sequential"] / vec, 3),
        "max_abs_diff_vs_plain": {
            name: max_abs_diff(finals[name], finals["plain"]) for name in ("fedfleet_vectorized", "fedfleet_sequential")
        },
        "auto_picks": auto_picks(w, fed),
    }
    if not args.no_pfl:
        try:
            pfl = run_side("pfl", w, args.side_timeout)
            out["seconds"]["pfl"] = round(pfl["seconds"], 4)
            out["pfl_over_vectorized"] = round(pfl["seconds"] / vec, 3)
            out["cpu_seconds"]["pfl"] = round(pfl["cpu_seconds"], 4)
            out["cpu_pfl_over_vectorized"] = round(pfl["cpu_seconds"] / cpu_med["fedfleet_vectorized"], 3)
            out["pfl_version"] = pfl["pfl"]
            out["max_abs_diff_vs_plain"]["pfl"] = max_abs_diff(pfl["params"], finals["plain"])
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            out["pfl_error"] = str(exc).splitlines()[0]
    flower_rows = args.flower_rows or ("mlp" if args.quick else "mlp,logreg")
    if not args.no_flower and model in flower_rows.split(","):
        fw = dataclasses.replace(w, rounds=max(2, args.flower_rounds or (2 if args.quick else 4)))
        try:
            fl = run_side("flower", fw, args.side_timeout)
            per_round = median(fl["rounds_s"][1:])  # steady rounds: the first one starts the actors
            out["flower"] = {k: fl[k] for k in ("engine_s", "start_s", "rounds_s", "flwr")} | {"rounds": fw.rounds}
            out["flower"]["round_s"] = round(per_round, 4)
            out["flower_round_over_vectorized_round"] = round(per_round / (vec / w.rounds), 2)
            out["flower_round_over_plain_round"] = round(per_round / (med["plain"] / w.rounds), 2)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            out["flower_error"] = str(exc).splitlines()[0]
    return out


def accuracy_run(args: argparse.Namespace) -> dict[str, Any]:
    """S's model on real digits: MNIST-5k (4,000 train / 1,000 test) over 125 clients of Dirichlet(0.5) sizes
    (ragged cohorts), cohort 50, batch 16, lr 0.1: the vectorised and the sequential run's test accuracy."""
    from fedfleet.client import TorchTrainer
    from fedfleet.core.loop import LoopConfig, RoundLoop
    from fedfleet.data import federate, load_dataset, train_test_split
    from fedfleet.models import build_model
    from fedfleet.runtime.sim import make_runtime
    from fedfleet.select import UniformSelector
    from fedfleet.strategy import build_strategy

    rounds = 10 if args.quick else 40
    train, test = train_test_split(load_dataset("mnist5k"), 0.2, seed=0)
    fed = federate(train, clients=125, scheme="dirichlet", seed=0, alpha=0.5)
    out: dict[str, Any] = {"rounds": rounds, "clients": 125, "cohort": 50}
    finals = {}
    for name, mode in (("vectorized", "on"), ("sequential", "off")):
        torch.manual_seed(0)
        trainer = TorchTrainer(build_model("mlp", (1, 28, 28), 10, hidden=[100]))
        loop = RoundLoop(
            build_strategy("fedavg"),
            make_runtime(trainer, fed, test, mode),
            UniformSelector(),
            trainer.params.clone(),
            dataclasses.replace(SmallWorkload().fit_config()),
            LoopConfig(rounds=rounds, cohort=50, seed=0, eval_every=rounds),
        )
        history, seconds = timed(loop.run)
        finals[name] = loop.global_params.tensors()
        out[name] = {"test_accuracy": round(history[-1].metrics["test_accuracy"], 4), "seconds": round(seconds, 3)}
    out["max_abs_diff"] = max_abs_diff(finals["vectorized"], finals["sequential"])
    return out


def sweep(args: argparse.Namespace) -> None:
    """Sequential over vectorised seconds per round, by model and cohort (the data behind vectorize: auto)."""
    results = []
    for model in args.rows.split(",") if args.rows else SWEEP_MODELS:
        for cohort in (2, 4, 8, 16, 32, 100):
            w = small_workload(model, clients=200, cohort=cohort, rounds=1 if model == "femnist_cnn" else 3)
            fed = make_small_federation(w)
            best = {}
            for mode in ("on", "off"):
                run_fedfleet(dataclasses.replace(w, rounds=1), fed, mode)
                best[mode] = min(run_fedfleet(w, fed, mode)[1] for _ in range(args.repeats))
            results.append({"model": model, "cohort": cohort, "speedup": round(best["off"] / best["on"], 2)})
            log(json.dumps(results[-1]))
    emit({"benchmark": "small_model_sweep", "threads": 1, "load_avg_1min": load_average(), "results": results})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="S at 5 rounds, 1 repeat, Flower 2 rounds; < 2 minutes")
    ap.add_argument("--rows", default=None, help=f"comma-separated, of {SWEEP_MODELS} (default: {SMALL_MODELS})")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of S (default 20, quick 5)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per side (median); default 3, quick 1")
    ap.add_argument("--flower-rounds", type=int, default=None, help="Flower's rounds (default 4, quick 2)")
    ap.add_argument("--flower-rows", default=None, help="rows Flower runs (default mlp,logreg; quick: mlp)")
    ap.add_argument("--no-pfl", action="store_true")
    ap.add_argument("--no-flower", action="store_true")
    ap.add_argument("--side-timeout", type=float, default=900)
    ap.add_argument("--sweep", action="store_true", help="sequential / vectorised by model and cohort size")
    ap.add_argument("--side", choices=("pfl", "flower"), help=argparse.SUPPRESS)  # inside the other venvs
    ap.add_argument("--workload", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--params", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        side_main(args)
        return
    args.repeats = args.repeats or (1 if args.quick else 3)
    set_threads(1)  # small models train with one thread (RESULTS.md, threads.py)
    load_start = load_average()
    if args.sweep:
        sweep(args)
        return
    rows = [m for m in (args.rows or ",".join(SMALL_MODELS)).split(",") if m]
    if args.quick:
        rows = [m for m in rows if m != "femnist_cnn"] or rows  # the CNN row alone takes minutes
    results = [row(m, args) for m in rows]
    accuracy = accuracy_run(args)
    log(f"MNIST-5k accuracy: {accuracy}")
    for r in results:
        s = r["seconds"]
        print(
            f"{r['model']:12s} vectorised {s['fedfleet_vectorized']:7.3f} s"
            f" | sequential {s['fedfleet_sequential']:7.3f}"
            f" | plain {s['plain']:7.3f} | limit {s['limit']:7.3f} | pfl {s.get('pfl', float('nan')):7.3f}"
            f" || vec/limit {r['vectorized_over_limit']:.2f}x (cpu {r['cpu_vectorized_over_limit']:.2f}x),"
            f" plain/vec {r['plain_over_vectorized']:.2f}x (cpu {r['cpu_plain_over_vectorized']:.2f}x)"
            + (f", pfl/vec {r['pfl_over_vectorized']:.2f}x" if "pfl_over_vectorized" in r else "")
            + (f", Flower round/vec round {r['flower_round_over_vectorized_round']:.1f}x" if "flower" in r else "")
        )
    emit(
        {
            "benchmark": "small_model",
            "rows": results,
            "mnist5k_accuracy": accuracy,
            "threads": 1,
            "repeats": args.repeats,
            "quick": args.quick,
            "load_avg_1min": {"start": load_start, "end": load_average()},
            "cpu": cpu_model_name(),
            "torch": torch.__version__,
        }
    )


if __name__ == "__main__":
    if "--side" in sys.argv:  # in a side's venv: import this file by name, so Ray pickles by reference
        sys.path.insert(0, str(HERE))
        import small_model

        small_model.main()
    else:
        main()
