"""fedfleet vs Flower's simulation engine on workload W (see ``common.py``), same cohorts, same final model.

fedfleet runs in this process (RoundLoop + SequentialRuntime, and the VectorizedRuntime as a second
row): a warm-up, then ``--repeats`` timed runs, median reported. Flower runs in its own venv
(``benchmarks/.flower-venv``, created on first use: flwr pins its own protobuf / Ray) through
``flower_side.py`` as a subprocess: ``flwr.simulation.start_simulation`` on Ray, a FedAvg subclass that
picks fedfleet's cohort each round, a NumPyClient training on fedfleet's batch order. Both sides get the
same CPUs: fedfleet runs ``--threads`` torch threads; Ray gets ``--threads`` CPUs and runs client actors
of ``--cpus-per-client`` CPUs (as many torch threads) each. On 2 cores Flower is faster with two 1-thread
actors training in parallel (the default) than with one 2-thread actor (``--cpus-per-client 2``).

Reported: the end-to-end ratio (Flower's ``start_simulation`` call, Ray start included, over fedfleet's
run from a built model to the final params), and the steady-state ratio of median round times (rounds
2..R; round 1 carries Flower's actor start-up). The final models must agree within ``--tolerance``;
they agree bit for bit when both sides train with the same number of torch threads, so when Flower's
actors use fewer threads than fedfleet's timed run, one more (untimed) fedfleet run with the actors'
thread count is the reference.

    python benchmarks/vs_flower.py            # W: 20 rounds
    python benchmarks/vs_flower.py --quick    # 5 rounds (the Flower venv must already exist for < 2 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import (
    emit,
    environment,
    load_average,
    log,
    make_federation,
    max_abs_diff,
    median,
    run_fedfleet,
    set_threads,
    workload,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".flower-venv"
OUT = HERE / "out"
FLOWER_PACKAGES = ["torch==2.13.0", "flwr[simulation]", "numpy", "safetensors", "pyyaml", "rich"]


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_flower_venv() -> dict[str, Any]:
    """Create the Flower venv if it is missing or broken; make fedfleet's source importable in it."""
    py = venv_python()
    info: dict[str, Any] = {"venv": str(VENV.relative_to(ROOT))}
    probe = [str(py), "-c", "import flwr, ray, torch"]
    ok = py.exists() and subprocess.run(probe, capture_output=True).returncode == 0
    if not ok:
        OUT.mkdir(exist_ok=True)
        install_log = OUT / "flower-install.log"
        log(f"creating {VENV} and installing {' '.join(FLOWER_PACKAGES)} (log: {install_log})")
        t = time.perf_counter()
        with open(install_log, "w") as f:
            steps = [
                [sys.executable, "-m", "venv", str(VENV)],
                [str(py), "-m", "pip", "install", *FLOWER_PACKAGES],  # one command: one resolution
            ]
            for cmd in steps:
                f.write(f"$ {' '.join(cmd)}\n")
                f.flush()
                if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                    tail = install_log.read_text()[-3000:]
                    raise RuntimeError(f"installing Flower failed at: {' '.join(cmd)}\n{tail}")
        info["install_s"] = round(time.perf_counter() - t, 1)
    # fedfleet (src/) and these benchmarks on the Flower venv's path, for the driver and every Ray worker
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    pth = Path(site) / "fedfleet_bench.pth"
    pth.write_text(f"{ROOT / 'src'}\n{HERE}\n")
    return info


def run_flower(rounds: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run of flower_side.py in the Flower venv: its JSON result, final params, process seconds."""
    OUT.mkdir(exist_ok=True)
    params = OUT / "flower_params.npz"
    side_log = OUT / "flower_side.log"
    cmd = [
        str(venv_python()),
        str(HERE / "flower_side.py"),
        f"--rounds={rounds}",
        f"--params={params}",
        f"--threads={max(1, int(args.cpus_per_client))}",  # an actor uses the CPUs Ray gave it
        f"--cpus={args.threads}",
        f"--cpus-per-client={args.cpus_per_client}",
        f"--aggregate={args.aggregate}",
    ]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": f"{ROOT / 'src'}:{HERE}"}
    log(f"running Flower: {' '.join(cmd)} (log: {side_log})")
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.flower_timeout, cwd=ROOT)
    process_s = time.perf_counter() - t
    side_log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"flower_side.py failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result["process_s"] = process_s
    with np.load(params) as z:
        result["params"] = {k: torch.from_numpy(z[k].copy()) for k in z.files}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 rounds instead of 20")
    ap.add_argument("--rounds", type=int, default=None, help="override the number of rounds")
    ap.add_argument("--repeats", type=int, default=3, help="timed fedfleet runs per row (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides; Ray's CPU count")
    ap.add_argument(
        "--cpus-per-client",
        type=float,
        default=1,
        help="Ray num_cpus per Flower client actor (1: two 1-thread actors in parallel, the faster)",
    )
    ap.add_argument("--flower-repeats", type=int, default=1, help="Flower runs (median reported)")
    ap.add_argument("--aggregate", choices=("fedfleet", "flower"), default="fedfleet", help="Flower's fold")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference of the final models")
    ap.add_argument("--no-vectorized", action="store_true", help="skip the fedfleet VectorizedRuntime row")
    ap.add_argument("--flower-timeout", type=float, default=1800, help="kill Flower after this (s)")
    args = ap.parse_args()

    load_start = load_average()
    if load_start > 0.5:
        log(f"warning: load average {load_start} before the start; other processes will distort the timings")
    set_threads(args.threads)
    w = workload(args.quick, args.rounds)
    try:
        venv_info = ensure_flower_venv()
    except RuntimeError as exc:
        log(str(exc))
        emit({"benchmark": "vs_flower", "error": str(exc).splitlines()[0]})
        sys.exit(1)

    # fedfleet, in process: warm-up, then interleaved repeats
    fed = make_federation(w)
    rows = {"fedfleet": "off"} if args.no_vectorized else {"fedfleet": "off", "fedfleet_vectorized": "on"}
    for name, mode in rows.items():
        _, dt, _ = run_fedfleet(dataclasses.replace(w, rounds=2), fed, mode)
        log(f"warm-up {name}: {dt:.2f} s for 2 rounds")
    times: dict[str, list[float]] = {name: [] for name in rows}
    round_times: dict[str, list[float]] = {name: [] for name in rows}
    finals: dict[str, dict[str, torch.Tensor]] = {}
    flower_runs: list[dict[str, Any]] = []
    for rep in range(max(args.repeats, args.flower_repeats)):
        for name, mode in rows.items():
            if rep >= args.repeats:
                break
            finals[name], dt, walls = run_fedfleet(w, fed, mode)
            times[name].append(dt)
            round_times[name].extend(walls[1:])
            log(f"repeat {rep + 1}/{args.repeats} {name}: {dt:.3f} s")
        if rep < args.flower_repeats:  # Flower in its venv, interleaved with fedfleet's repeats
            try:
                run = run_flower(w.rounds, args)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                log(str(exc))
                emit({"benchmark": "vs_flower", "error": str(exc).splitlines()[0]})
                sys.exit(1)
            flower_runs.append(run)
            log(f"repeat {rep + 1}/{args.flower_repeats} Flower: {run['engine_s']:.3f} s")
    fl_params = flower_runs[-1]["params"]  # every run ends at the same model
    fl = {key: median(run[key] for run in flower_runs) for key in ("engine_s", "start_s", "process_s")}
    fl_rounds = [run["rounds_s"] for run in flower_runs]
    fl["round1_s"] = median(r[0] for r in fl_rounds)
    fl_steady = median(t for r in fl_rounds for t in r[1:]) if w.rounds > 1 else fl["round1_s"]
    fl.update({k: flower_runs[-1][k] for k in ("flwr", "engine", "aggregate")})

    # The agreement check compares against a fedfleet run with the Flower actors' thread count: how a
    # convolution splits its sums over threads changes the rounding, and 20 rounds amplify that to ~3e-3.
    actor_threads = max(1, int(args.cpus_per_client))
    reference = finals["fedfleet"]
    if actor_threads != args.threads:
        set_threads(actor_threads)
        reference, dt, _ = run_fedfleet(w, fed, "off")
        set_threads(args.threads)
        log(f"fedfleet with {actor_threads} thread(s), for the agreement check: {dt:.2f} s")
    diff = max_abs_diff(reference, fl_params)

    med = {name: median(ts) for name, ts in times.items()}
    steady = {name: median(ts) if ts else float("nan") for name, ts in round_times.items()}
    result: dict[str, Any] = {
        "benchmark": "vs_flower",
        "ratio": round(fl["engine_s"] / med["fedfleet"], 3),  # Flower time / fedfleet time, end to end
        "ratio_steady": round(fl_steady / steady["fedfleet"], 3),  # per round, rounds 2..R
        "fedfleet_s": round(med["fedfleet"], 3),
        "flower_s": round(fl["engine_s"], 3),
        "fedfleet_round_s": round(steady["fedfleet"], 4),
        "flower_round_s": round(fl_steady, 4),
        "flower_start_s": round(fl["start_s"], 3),
        "flower_round1_s": round(fl["round1_s"], 3),
        "flower_process_s": round(fl["process_s"], 3),
        "max_abs_diff": diff,
        "agree": diff <= args.tolerance,
        "check_threads": actor_threads,
        "max_abs_diff_timed_run": max_abs_diff(finals["fedfleet"], fl_params),
    }
    if "fedfleet_vectorized" in rows:
        result.update(
            ratio_vectorized=round(fl["engine_s"] / med["fedfleet_vectorized"], 3),
            fedfleet_vectorized_s=round(med["fedfleet_vectorized"], 3),
            fedfleet_vectorized_round_s=round(steady["fedfleet_vectorized"], 4),
            max_abs_diff_vectorized=max_abs_diff(finals["fedfleet_vectorized"], fl_params),
        )
    result.update(
        flower_rounds_s=[[round(t, 4) for t in r] for r in fl_rounds],
        flower_times_s=[round(run["engine_s"], 3) for run in flower_runs],
        fedfleet_times_s={name: [round(t, 4) for t in ts] for name, ts in times.items()},
        flwr=fl["flwr"],
        flower_engine=fl["engine"],
        flower_aggregate=fl["aggregate"],
        cpus_per_client=args.cpus_per_client,
        tolerance=args.tolerance,
        flower_repeats=args.flower_repeats,
        **environment(args, w, load_start),
        **venv_info,
    )
    print(f"fedfleet sequential   {med['fedfleet']:8.3f} s   ({steady['fedfleet']:.4f} s/round)")
    if "fedfleet_vectorized" in rows:
        vec, vec_round = med["fedfleet_vectorized"], steady["fedfleet_vectorized"]
        print(f"fedfleet vectorised   {vec:8.3f} s   ({vec_round:.4f} s/round)")
    print(
        f"Flower {fl['flwr']} (Ray)   {fl['engine_s']:8.3f} s   ({fl_steady:.4f} s/round; "
        f"start {fl['start_s']:.2f} s, round 1 {fl['round1_s']:.2f} s; process {fl['process_s']:.1f} s)"
    )
    print(f"Flower / fedfleet: end to end {result['ratio']:.2f}x, per round {result['ratio_steady']:.2f}x")
    verdict = "agree" if result["agree"] else "DISAGREE"
    print(
        f"final models: max |fedfleet - Flower| = {diff:.3g} ({verdict} at tolerance {args.tolerance:g}; "
        f"both at {actor_threads} torch thread(s) per client)"
    )
    emit(result)
    if not result["agree"]:
        sys.exit(2)


if __name__ == "__main__":
    main()
