"""fedfleet's simulation overhead over a hand-written PyTorch loop doing the identical SGD steps.

Both sides run workload W (see ``common.py``) in this one process, with the same thread count, the same
initial model, the same cohort per round (fedfleet's UniformSelector and seed), the same per-client batch
order (``batch_indices`` with ``client_seed``) and the same example-weighted FedAvg. The plain loop is
what a person would write by hand: load the global weights, ``torch.optim.SGD`` over the batches, add
``n_k * (w_k - w)`` into an accumulator, scale by ``1 / sum n_k`` and add it to ``w``. Its final model
matches fedfleet's sequential runtime bit for bit.

Why FedAvg in delta form, w + sum n_k (w_k - w) / sum n_k, and not sum n_k w_k / sum n_k: the two are equal
in exact arithmetic, but their float rounding differs by ~1e-8, and with random labels at lr 0.1 such a
difference flips some ReLU / max-pool decisions within a few rounds and grows to ~3e-3 after 20 rounds.
Only the identical formula gives a comparison that proves identical work. The vectorised runtime's
batched convolutions round differently again, so its agreement is also checked after one round.

Rows: fedfleet's RoundLoop with the SequentialRuntime (the same maths, one client at a time), and with
the VectorizedRuntime (the whole cohort per step through torch.func.vmap). Each side is warmed up
once, then the sides run interleaved ``--repeats`` times; the medians are compared. Target: the
sequential ratio fedfleet / plain <= 1.10.

    python benchmarks/overhead.py            # W: 20 rounds, 3 repeats
    python benchmarks/overhead.py --quick    # 5 rounds, 3 repeats (about a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import dataclasses
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
    plain_fedavg,
    run_fedfleet,
    set_threads,
    workload,
)


def run_plain(w: Workload, fed: Any) -> tuple[dict[str, Tensor], float]:
    """The same federated training as a hand-written loop over the model's parameter tensors."""
    return plain_fedavg(w, fed, make_model(w))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 rounds instead of 20")
    ap.add_argument("--rounds", type=int, default=None, help="override the number of rounds")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, the same for every side")
    ap.add_argument("--no-vectorized", action="store_true", help="skip the VectorizedRuntime row")
    args = ap.parse_args()

    load_start = load_average()
    if load_start > 0.5:
        log(f"warning: load average {load_start} before the start; other processes will distort the timings")
    set_threads(args.threads)
    w = workload(args.quick, args.rounds)
    fed = make_federation(w)
    sides = {
        "plain": lambda wl: run_plain(wl, fed),
        "fedfleet": lambda wl: run_fedfleet(wl, fed, "off")[:2],
    }
    if not args.no_vectorized:
        sides["fedfleet_vectorized"] = lambda wl: run_fedfleet(wl, fed, "on")[:2]

    warm = dataclasses.replace(w, rounds=2)
    for name, side in sides.items():
        _, dt = side(warm)
        log(f"warm-up {name}: {dt:.2f} s for 2 rounds")

    times: dict[str, list[float]] = {name: [] for name in sides}
    finals: dict[str, dict[str, Tensor]] = {}
    for rep in range(args.repeats):
        for name, side in sides.items():  # interleaved, so drift in machine speed hits every side alike
            finals[name], dt = side(w)
            times[name].append(dt)
            log(f"repeat {rep + 1}/{args.repeats} {name}: {dt:.3f} s")

    # agreement after one round: the same maths up to rounding, before chaos can amplify it
    one = dataclasses.replace(w, rounds=1)
    first = {name: side(one)[0] for name, side in sides.items()}

    med = {name: median(ts) for name, ts in times.items()}
    steps = w.rounds * w.cohort * -(-w.per_client // w.batch_size) * w.epochs
    result: dict[str, Any] = {
        "benchmark": "overhead",
        "ratio": round(med["fedfleet"] / med["plain"], 4),
        "plain_s": round(med["plain"], 4),
        "fedfleet_s": round(med["fedfleet"], 4),
        "max_abs_diff": max_abs_diff(finals["fedfleet"], finals["plain"]),
        "max_abs_diff_round1": max_abs_diff(first["fedfleet"], first["plain"]),
    }
    if "fedfleet_vectorized" in sides:
        result.update(
            ratio_vectorized=round(med["fedfleet_vectorized"] / med["plain"], 4),
            fedfleet_vectorized_s=round(med["fedfleet_vectorized"], 4),
            max_abs_diff_vectorized=max_abs_diff(finals["fedfleet_vectorized"], finals["plain"]),
            max_abs_diff_vectorized_round1=max_abs_diff(first["fedfleet_vectorized"], first["plain"]),
        )
    result.update(
        times_s={name: [round(t, 4) for t in ts] for name, ts in times.items()},
        sgd_steps=steps,
        plain_ms_per_step=round(1000 * med["plain"] / steps, 3),
        **environment(args, w, load_start),
    )
    print(f"plain PyTorch loop      {med['plain']:8.3f} s")
    print(f"fedfleet sequential     {med['fedfleet']:8.3f} s   ratio {result['ratio']:.3f}")
    if "fedfleet_vectorized" in sides:
        vec = med["fedfleet_vectorized"]
        print(f"fedfleet vectorised     {vec:8.3f} s   ratio {result['ratio_vectorized']:.3f}")
    print(f"final models: max |fedfleet - plain| = {result['max_abs_diff']:.3g}")
    if "fedfleet_vectorized" in sides:
        print(
            f"final models: max |vectorised - plain| = {result['max_abs_diff_vectorized']:.3g} "
            f"(after round 1: {result['max_abs_diff_vectorized_round1']:.3g})"
        )
    emit(result)


if __name__ == "__main__":
    main()
