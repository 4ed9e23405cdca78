"""fedfleet's SecAgg+ beside Flower's SecAgg+ on the same round: n clients x m params, k = 2 log2(n)
neighbours, the same threshold, clipping range, quantisation levels, ring and weight cap, and the same 5% of
the clients dropping out after their masked input (their inputs count, their unmask replies never come).

fedfleet runs in this process: ``secagg.py``'s ``timed_round`` (the SecAggParty / SecAggServer state
machines of ``fedfleet.secagg.run_round``, every party and the server played one after another), a warm-up,
then ``--repeats`` timed rounds, median reported. Flower runs in its own venv (``benchmarks/.flower-venv``,
the one ``vs_flower.py`` creates on first use) through ``flower_secagg_side.py`` as a subprocess: Flower's
``SecAggPlusWorkflow`` (server) and ``secaggplus_mod`` (each client) driven stage by stage for the same n
clients in one process by an in-process Grid, without Ray or a SuperLink (see that file for what it
includes). Both sides pay only for the protocol: key generation and agreement, secret sharing and share
encryption, quantisation and masking, summing, unmasking. fedfleet runs on one thread; Flower's Shamir
code splits and combines each secret's 16-byte chunks in a thread pool of up to os.cpu_count() workers (its
own choice, kept), everything else on one thread.

Settings (both sides): k = round(2 log2 n), made even where it is odd (Flower's ring of neighbours links
num_shares // 2 on each side, so it gives every client an even number of neighbours; Flower's num_shares
is k + 1 because it counts the client's own share); threshold t = fedfleet's default for k (more than half
of the neighbours); clip 1.0; 2**16 - 1 quantisation steps over [-1, 1] (fedfleet bits = 16; Flower
quantization_range = 65535); a 2**32 ring; max_weight 1000.

Reported: both whole-round times, the server's unmask time (and the server's and all clients' time over
the round), and the ratios Flower / fedfleet. Each side's unmasked mean is checked against its own plain
weighted mean of the same clipped updates, within its quantisation bound. The generators differ: fedfleet
masks with AES-256-CTR keyed by the full agreed secret; Flower with numpy's RandomState (MT19937, not a
cryptographic generator) seeded with a 32-bit XOR fold of the seed.

    python benchmarks/secagg_vs_flower.py            # 1,000 clients x 100K params
    python benchmarks/secagg_vs_flower.py --quick    # 100 x 10K: under 2 minutes once the Flower venv
                                                     # exists (creating it takes a minute or more)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from flower_secagg_side import make_round
from secagg import cpu, log, timed_round

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"


def neighbours_for(n: int) -> int:
    """k = 2 log2(n) rounded, then up to even (both sides use this k)."""
    k = round(2 * math.log2(n))
    return k + (k % 2)


def seconds_rounded(side: dict[str, Any]) -> dict[str, Any]:
    """Times (keys ending in _s) to 4 decimals; error figures stay as they are."""
    out = dict(side)
    for key, value in side.items():
        if key.endswith("_s") and isinstance(value, float):
            out[key] = round(value, 4)
        elif key.endswith("_s") and isinstance(value, list):
            out[key] = [round(v, 4) for v in value]
    return out


def fedfleet_side(n: int, m: int, k: int, repeats: int) -> tuple[dict[str, Any], int]:
    from fedfleet.secagg import SecAggConfig, Stage

    config = SecAggConfig(neighbours=k, clip=1.0, bits=16, max_weight=1000.0)
    plan = config.validate(n)
    w_in, w_w, w_gone = make_round(10, 100, seed=1)  # warm-up: imports and first-use costs
    timed_round(w_in, {i: float(v) for i, v in w_w.items()}, SecAggConfig(neighbours=4), {Stage.UNMASK: w_gone})
    inputs, int_weights, gone = make_round(n, m)
    weights = {i: float(v) for i, v in int_weights.items()}
    runs = []
    for rep in range(repeats):
        run = timed_round(inputs, weights, config, {Stage.UNMASK: gone})
        res = run.pop("_result")
        runs.append(run)
        log(f"fedfleet {rep + 1}/{repeats}: {run}")
    survivors = sorted(res.survivors)
    plain = sum(weights[i] * np.clip(inputs[i].astype(np.float64), -1.0, 1.0) for i in survivors)
    err = float(np.abs(res.mean() - plain / sum(weights[i] for i in survivors)).max())
    bound = float(res.mean_bound())
    side = {
        "round_s": statistics.median(r["round_s"] for r in runs),
        "server_unmask_s": statistics.median(r["server_unmask_s"] for r in runs),
        "server_total_s": statistics.median(r["server_total_s"] for r in runs),
        "clients_total_s": statistics.median(r["parties_total_s"] for r in runs),
        "rounds_s": [r["round_s"] for r in runs],
        "unmask_s": [r["server_unmask_s"] for r in runs],
        "degree": plan.degree,
        "threshold": plan.threshold,
        "ring_bits": plan.ring_bits,
        "in_sum": len(survivors),
        "dropped_at_unmask": len(gone),
        "mean_abs_err": err,
        "mean_bound": bound,
        "correct": err <= bound,
        "mask_generator": "AES-256-CTR keyed by the full 256-bit agreed secret (cryptography / OpenSSL)",
    }
    return side, plan.threshold


def flower_side(n: int, m: int, k: int, t: int, repeats: int, timeout: float) -> dict[str, Any]:
    from vs_flower import ensure_flower_venv, venv_python

    venv = ensure_flower_venv()
    OUT.mkdir(exist_ok=True)
    side_log = OUT / "flower_secagg_side.log"
    cmd = [
        str(venv_python()),
        str(HERE / "flower_secagg_side.py"),
        f"--clients={n}",
        f"--params={m}",
        f"--neighbours={k}",
        f"--threshold={t}",
        "--clip=1.0",
        f"--range={2**16 - 1}",
        "--max-weight=1000",
        f"--repeats={repeats}",
    ]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(HERE)}
    log(f"running Flower: {' '.join(cmd)} (log: {side_log})")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    process_s = time.perf_counter() - t0
    side_log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"flower_secagg_side.py failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1])
    runs = out["runs"]
    for rep, run in enumerate(runs):
        brief = {key: value for key, value in run.items() if key != "stages"}
        log(f"Flower {rep + 1}/{len(runs)}: {brief}")
    return {
        "round_s": statistics.median(r["round_s"] for r in runs),
        "server_unmask_s": statistics.median(r["server_unmask_s"] for r in runs),
        "server_total_s": statistics.median(r["server_total_s"] for r in runs),
        "clients_total_s": statistics.median(r["clients_total_s"] for r in runs),
        "copy_s": statistics.median(r["copy_s"] for r in runs),
        "rounds_s": [r["round_s"] for r in runs],
        "unmask_s": [r["server_unmask_s"] for r in runs],
        "stages": runs[-1]["stages"],
        "num_shares": runs[-1]["num_shares"],
        "threshold": runs[-1]["threshold"],
        "in_sum": runs[-1]["in_sum"],
        "dropped_at_unmask": runs[-1]["dropped_at_unmask"],
        "mean_abs_err": max(r["mean_abs_err"] for r in runs),
        "mean_bound": runs[-1]["mean_bound"],
        "correct": all(r["correct"] for r in runs),
        "mask_generator": "numpy RandomState (MT19937, not cryptographic) seeded with a 32-bit XOR fold of the seed",
        "flwr": out["flwr"],
        "engine": "SecAggPlusWorkflow stages + secaggplus_mod per client, in-process Grid (no Ray, no SuperLink)",
        "process_s": process_s,
        **venv,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 clients x 10K params")
    ap.add_argument("--clients", type=int, default=None, help="override n")
    ap.add_argument("--params", type=int, default=None, help="override m")
    ap.add_argument("--repeats", type=int, default=3, help="timed fedfleet rounds (median reported)")
    ap.add_argument("--flower-repeats", type=int, default=None, help="timed Flower rounds (3 quick, 1 full)")
    ap.add_argument("--flower-timeout", type=float, default=1800, help="kill Flower after this (s)")
    args = ap.parse_args()
    n = args.clients or (100 if args.quick else 1000)
    m = args.params or (10_000 if args.quick else 100_000)
    flower_repeats = args.flower_repeats or (3 if args.quick else 1)
    k = neighbours_for(n)
    load_start = round(os.getloadavg()[0], 2)
    if load_start > 0.5:
        log(f"warning: load average {load_start} before the start; other processes will distort the timings")
    log(f"n={n} m={m} k={k} (2 log2 n = {2 * math.log2(n):.2f}), 5% dropping after their masked input")

    fed, t = fedfleet_side(n, m, k, args.repeats)
    try:
        fl = flower_side(n, m, k, t, flower_repeats, args.flower_timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        log(str(exc))
        print(json.dumps({"benchmark": "secagg_vs_flower", "error": str(exc).splitlines()[0]}), flush=True)
        sys.exit(1)

    result: dict[str, Any] = {
        "benchmark": "secagg_vs_flower",
        "quick": args.quick,
        "clients": n,
        "params": m,
        "neighbours": k,
        "threshold": t,
        "ratio_round": round(fl["round_s"] / fed["round_s"], 2),  # Flower / fedfleet, whole round
        "ratio_server_unmask": round(fl["server_unmask_s"] / fed["server_unmask_s"], 2),
        "ratio_server_total": round(fl["server_total_s"] / fed["server_total_s"], 2),
        "ratio_clients_total": round(fl["clients_total_s"] / fed["clients_total_s"], 2),
        "fedfleet": seconds_rounded(fed),
        "flower": seconds_rounded(fl),
        "both_correct": fed["correct"] and fl["correct"],
        "fedfleet_repeats": args.repeats,
        "flower_repeats": flower_repeats,
        "cpu": cpu(),
        "load_avg_1min": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
    }
    print(f"{'':10} {'whole round':>12} {'server unmask':>14} {'server total':>13} {'all clients':>12}")
    for name, side in (("fedfleet", fed), (f"Flower {fl['flwr']}", fl)):
        print(
            f"{name:10} {side['round_s']:11.3f}s {side['server_unmask_s']:13.3f}s "
            f"{side['server_total_s']:12.3f}s {side['clients_total_s']:11.3f}s"
        )
    print(
        f"Flower / fedfleet: round {result['ratio_round']}x, server unmask {result['ratio_server_unmask']}x "
        f"(n={n}, m={m}, k={k}, t={t}, {fed['dropped_at_unmask']} dropped after their masked input)"
    )
    for name, side in (("fedfleet", fed), ("Flower", fl)):
        verdict = "correct" if side["correct"] else "WRONG"
        print(
            f"{name}: mean within {side['mean_abs_err']:.3g} of its plain mean (bound {side['mean_bound']:.3g}): "
            f"{verdict}; masks: {side['mask_generator']}"
        )
    print(json.dumps(result), flush=True)
    if not result["both_correct"]:
        sys.exit(2)


if __name__ == "__main__":
    main()
