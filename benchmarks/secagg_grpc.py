"""A secure round over gRPC on loopback beside the same plaintext round, side by side in one script.

The arbiter (a ``SecureArbiterServer`` / an ``ArbiterServer``) in this process and n parties (``Party``, each a
process of its own, spawned by this script) exchange a model of m float32 params. The parties' trainers do no
work: each answers with a fixed random delta, so the round's time is the transport's and, in the secure round,
the protocol's (keys, shares, masking at the party, unmasking at the arbiter). Both rounds fold the same way
(the runtime's updates, or its one unmasked Partial, into a WeightedMean). Plaintext (no TLS) on both sides:
TLS costs both the same per byte, and the masked upload is the plaintext's size plus one element.

    python benchmarks/secagg_grpc.py            # 10 parties x 10M params, k = 8, 6 rounds each (one warm-up)
    python benchmarks/secagg_grpc.py --quick    # 4 parties x 2M params, k = 3 (under a minute)
    python benchmarks/secagg_grpc.py --train-s 0.5   # each party's fit sleeps 0.5 s, as if it trained elsewhere

The secure side runs twice: with the parties making their masks ahead, once their inbox is in (the default,
SecureStages.prepare_masks), and with them making the masks at fit, after the update is there.

All n parties share this machine's cores, so the secure round measured here pays for the n parties' masking
one after another (two cores: n / 2 maskings in a row, while the arbiter receives), where deployed parties
mask at once, each on its own machine. Beside the measured ratio the script prints the parts: the key stages
and the unmasking as the arbiter timed them, one party's masking measured alone (at fit; and ahead, then
after the update), their sum with the plaintext round as an estimate for a party per machine (labelled as
such), and the CPU seconds each round took in the arbiter's process and in the party processes together (from
/proc): on a machine the n parties share, the secure round's extra wall time is the parties' extra CPU (their
masking) over the cores.

The last line printed is one JSON object: the median rounds, the parts, the measured ratio and the estimate.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import socket
import statistics
import sys
import threading
import time

import numpy as np
import torch

from fedfleet.core.aggregate import WeightedMean
from fedfleet.core.fit_config import FitConfig
from fedfleet.core.params import FlatParams
from fedfleet.core.update import Partial, Update
from fedfleet.runtime.grpc import ArbiterServer, Connection, GrpcRuntime, Party
from fedfleet.runtime.grpc.secure_arbiter import SecureArbiterServer
from fedfleet.runtime.grpc.secure_party import SecureStages
from fedfleet.secagg import SecAggConfig, SecAggParty, SecAggServer

SESSION = "bench"


class FixedDelta:
    """A trainer that answers every fit with the same delta (random, within the clip range)."""

    def __init__(self, spec, seed: int, train_s: float = 0.0) -> None:
        self.params, self.train_s = FlatParams.zeros(spec), train_s
        self.delta = FlatParams.zeros(spec)
        rng = np.random.default_rng(seed)
        values = rng.uniform(-0.5, 0.5, spec.numel).astype(np.float32)
        self.delta.buffers[torch.float32].copy_(torch.from_numpy(values))

    def fit(self, params, config, data=None) -> Update:
        time.sleep(self.train_s)  # training on the party's own accelerator: its CPU is free meanwhile
        return Update(self.delta, weight=100.0)

    def evaluate(self, params, data=None) -> dict[str, float]:
        return {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pids: list[int]) -> float | None:
    """CPU seconds (user + system) the processes ``pids`` have used so far, from /proc (None where it is absent)."""
    total = 0
    try:
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))
    except (OSError, IndexError, ValueError):
        return None
    return total / os.sysconf("SC_CLK_TCK")


def one_side(
    n: int,
    numel: int,
    config: SecAggConfig | None,
    rounds: int,
    port: int,
    threads: bool = False,
    ahead: bool = True,
    train_s: float = 0.0,
) -> list[dict[str, float]]:
    """Each of ``rounds`` rounds with n party processes (``threads``: threads of this one), secure when ``config``
    is given: its wall time ``round_s``, the CPU time the arbiter's process (``arbiter_cpu_s``) and the party
    processes (``parties_cpu_s``, all together) used in it, and the runtime's round metrics (a secure round's
    keys_s and unmask_s)."""
    spec = FlatParams.from_tensors({"w": torch.zeros(numel)}).spec
    names = [f"party-{i}" for i in range(n)]
    kwargs = dict(session=SESSION, parties=names, spec=spec, address=f"127.0.0.1:{port}", credentials=None)
    server = ArbiterServer(**kwargs) if config is None else SecureArbiterServer(secure_aggregation=config, **kwargs)
    runtime = GrpcRuntime(server, min_parties=n, round_timeout=600, join_timeout=120, wait_timeout=120,
                          federated_eval=False, secure_aggregation=config)  # fmt: skip
    server.start()
    if threads:
        workers = [threading.Thread(target=run_party, args=(port, names, i, numel, config, ahead, train_s),
                                    daemon=True) for i in range(n)]  # fmt: skip
    else:  # each its own interpreter, as deployed parties are (threads would take turns on the GIL to mask)
        spawn = multiprocessing.get_context("spawn")
        workers = [spawn.Process(target=run_party, args=(port, names, i, numel, config, ahead, train_s),
                                 daemon=True) for i in range(n)]  # fmt: skip
    for worker in workers:
        worker.start()
    times = []
    try:
        glob = FlatParams.zeros(spec)
        pids = [] if threads else [worker.pid for worker in workers]
        for r in range(rounds):
            began, arbiter_began, parties_began = time.perf_counter(), time.process_time(), cpu_s(pids)
            folded = WeightedMean(glob)
            for item in runtime.fit(glob, list(range(n)), FitConfig(round=r)):
                if isinstance(item, Partial):
                    folded.merge(item.aggregator)
                else:
                    folded.add(item)
            aggregate = folded.finish()
            parties_now = cpu_s(pids)
            times.append({"round_s": time.perf_counter() - began, "arbiter_cpu_s": time.process_time() - arbiter_began,
                          **({} if threads or parties_now is None else {"parties_cpu_s": parties_now - parties_began}),
                          **runtime.round_metrics()})  # fmt: skip
            assert aggregate.count == n, aggregate.count
    finally:
        runtime.finish()
        server.stop(2.0)
        for worker in workers:
            worker.join(30)
    return times


def run_party(port: int, names: list[str], i: int, numel: int, config: SecAggConfig | None, ahead: bool,
              train_s: float) -> None:  # fmt: skip
    """Party i until the arbiter says the session is done (in a thread, or as a spawned process's target);
    ``ahead``: whether it makes its masks before its update is there (SecureStages.prepare_masks)."""
    torch.set_num_threads(1)
    spec = FlatParams.from_tensors({"w": torch.zeros(numel)}).spec
    secure = None if config is None else SecureStages(config, SESSION, names[i], names, seed=0)
    if secure is not None:
        secure.prepare_masks = ahead
    conn = Connection(f"127.0.0.1:{port}", SESSION, names[i], None, heartbeat_s=30.0)
    Party(FixedDelta(spec, i, train_s), None, None, conn, secure=secure).run()


def mask_alone(n: int, numel: int, config: SecAggConfig) -> dict[str, float]:
    """Seconds one party takes, alone on the machine, to mask its update (quantise, self mask, a pairwise mask
    per neighbour: ``at_fit_s``), and, with its masks made ahead (``prepare_s``), to quantise its update into
    them once it is there (``after_prepare_s``): in a deployment each party masks on its own, so a round waits
    for one, not for n in turn."""
    plan = config.validate(n)
    values = np.random.default_rng(0).uniform(-0.5, 0.5, numel).astype(np.float32)
    times: dict[str, list[float]] = {"at_fit_s": [], "prepare_s": [], "after_prepare_s": []}
    for ahead in (False, True) * 3:
        server = SecAggServer("s", 0, config, list(range(1, n + 1)), graph_seed=7, length=numel)
        parties = {i: SecAggParty(i, "s", 0, config, plan, seed=i) for i in range(1, n + 1)}
        for party in parties.values():
            server.receive_advert(party.advertise())
        for i, roster in server.rosters().items():
            server.receive_shares(i, parties[i].share_keys(roster))
        inbox = server.inboxes()[1]
        if ahead:
            began = time.perf_counter()
            parties[1].prepare_masks(inbox, numel)
            times["prepare_s"].append(time.perf_counter() - began)
        began = time.perf_counter()
        parties[1].masked_input(values, 100.0, inbox)
        times["after_prepare_s" if ahead else "at_fit_s"].append(time.perf_counter() - began)
    return {key: statistics.median(value) for key, value in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 parties x 2M params (under a minute)")
    parser.add_argument("--parties", type=int, help="parties (default 10; 4 with --quick)")
    parser.add_argument("--params", type=int, help="float32 params of the model (default 10M; 2M with --quick)")
    parser.add_argument("--neighbours", type=int, help="k, the share graph's degree (default 8; 3 with --quick)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per side; the first is a warm-up")
    parser.add_argument("--threads", action="store_true", help="parties as threads of this process, not processes")
    parser.add_argument(
        "--train-s",
        type=float,
        default=0.0,
        help="seconds each party's fit sleeps, as if training on its own accelerator (default 0)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    n = args.parties or (4 if args.quick else 10)
    numel = args.params or (2_000_000 if args.quick else 10_000_000)
    k = args.neighbours or (3 if args.quick else 8)
    config = SecAggConfig(neighbours=k, clip=1.0, bits=16)
    plan = config.validate(n)
    torch.set_num_threads(1)
    print(f"{n} parties x {numel:,} float32 params ({numel * 4 / 2**20:.0f} MiB each way per party), "
          f"k = {plan.degree}, t = {plan.threshold}, {plan.ring_bits}-bit ring; {args.rounds} rounds each, "
          "the first a warm-up", flush=True)  # fmt: skip
    results: dict[str, dict[str, float]] = {}
    sides = (("plaintext", None, True), ("secure", config, True), ("secure, masks made at fit", config, False))
    for label, side, ahead in sides:
        rounds = one_side(n, numel, side, args.rounds, free_port(), args.threads, ahead, args.train_s)
        kept = rounds[1:] or rounds
        results[label] = {key: statistics.median(r[key] for r in kept) for key in kept[0]}
        walls = ", ".join(f"{r['round_s']:.2f}" for r in rounds)
        cpu = results[label]
        spent = (f"; CPU per round: arbiter {cpu['arbiter_cpu_s']:.2f} s, parties {cpu['parties_cpu_s']:.2f} s"
                 if "parties_cpu_s" in cpu else "")  # fmt: skip
        print(f"{label}: rounds {walls} s; median after warm-up {cpu['round_s']:.2f} s{spent}", flush=True)
    plain, secure, at_fit = results["plaintext"]["round_s"], results["secure"], results["secure, masks made at fit"]
    ratio, ratio_at_fit = secure["round_s"] / plain, at_fit["round_s"] / plain
    alone = mask_alone(n, numel, config)
    # what a round adds where every party has its own machine: the key stages, one party's masking after its
    # update is there (all mask at once; with masks made ahead, only the quantising into them, since making
    # them fits in the download and training) and the arbiter's unmasking; here the n parties share the cores
    deployed = plain + secure["secagg_keys_s"] + alone["after_prepare_s"] + secure["secagg_unmask_s"]
    deployed_at_fit = plain + at_fit["secagg_keys_s"] + alone["at_fit_s"] + at_fit["secagg_unmask_s"]
    print(
        f"secure / plaintext, measured here: {ratio:.2f}x, with masks made at fit {ratio_at_fit:.2f}x (key stages "
        f"{secure['secagg_keys_s']:.3f} s, unmasking {secure['secagg_unmask_s']:.3f} s at the arbiter; the {n} "
        "parties' masking shares this machine)"
    )
    print(f"one party alone: masking at fit {alone['at_fit_s']:.3f} s; masks made ahead {alone['prepare_s']:.3f} s, "
          f"then quantising into them {alone['after_prepare_s']:.3f} s; a party per machine: ~{deployed:.2f} s, "
          f"{deployed / plain:.2f}x the plaintext round ({deployed_at_fit / plain:.2f}x with masks made at fit; "
          "estimates)")  # fmt: skip
    print(json.dumps({"parties": n, "params": numel, "neighbours": plan.degree, "threshold": plan.threshold,
                      "train_s": args.train_s, "plaintext_round_s": round(plain, 3),
                      "secure_round_s": round(secure["round_s"], 3),
                      "secure_masks_at_fit_round_s": round(at_fit["round_s"], 3),
                      "keys_s": round(secure["secagg_keys_s"], 4), "unmask_s": round(secure["secagg_unmask_s"], 3),
                      "one_party_alone": {key: round(value, 3) for key, value in alone.items()},
                      "ratio": round(ratio, 3), "ratio_masks_at_fit": round(ratio_at_fit, 3),
                      "cpu_s_per_round": {label: {key: round(value, 3) for key, value in side.items()
                                                  if key.endswith("cpu_s")} for label, side in results.items()},
                      "load_avg_1min_end": round(os.getloadavg()[0], 2),
                      "ratio_party_per_machine_estimate": round(deployed / plain, 3),
                      "ratio_party_per_machine_estimate_masks_at_fit": round(deployed_at_fit / plain, 3)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
