"""Scale: 100,000 registered clients, cohort 100.

Measures, per round, the server-side work before any training starts: selection (seeded uniform) plus
configuration (the strategy's instruction and each selected client's derived seed and data slice).
Targets: <= 10 ms per round; memory beyond the data <= 500 MB (RSS after registering the clients, minus
RSS before, minus the bytes of the data tensors themselves).

    python benchmarks/scale.py            # 100,000 clients x 20 samples of 32 features
    python benchmarks/scale.py --quick    # the same population, fewer rounds timed
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import time

import numpy as np
import torch

from fedfleet.core.fit_config import FitConfig
from fedfleet.data import FederatedDataset, partition
from fedfleet.runtime.sim import client_seed
from fedfleet.select import UniformSelector
from fedfleet.strategy import build_strategy


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--cohort", type=int, default=100)
    args = parser.parse_args()
    rounds = 200 if args.quick else 2000
    samples_per_client, features = 20, 32

    n = args.clients * samples_per_client
    x = torch.randn(n, features)
    y = torch.randint(0, 10, (n,))
    data_bytes = x.nbytes + y.nbytes
    before = rss_bytes()
    t0 = time.perf_counter()
    parts = partition("dirichlet", y.numpy(), args.clients, seed=0, alpha=0.5)
    federation = FederatedDataset.from_partition(x, y, parts, 10)
    register_s = time.perf_counter() - t0
    del parts
    beyond_data = rss_bytes() - before - data_bytes  # the reordered copy of x, y replaces the originals below
    x = y = None
    after_free = rss_bytes() - before

    selector = UniformSelector()
    strategy = build_strategy("fedprox", mu=0.01)
    base = FitConfig(epochs=1, batch_size=10, lr=0.1)
    times = []
    for rnd in range(rounds):
        t = time.perf_counter()
        clients = selector.select(federation.num_clients, args.cohort, rnd, 0)
        config = strategy.configure_fit(dataclasses.replace(base, round=rnd))
        for cid in clients:  # what the runtime does per client before training it
            local = dataclasses.replace(config, seed=client_seed(config, int(cid)))
            data = federation.client(int(cid))
            assert len(data.y) >= 0 and local.seed >= 0
        times.append(time.perf_counter() - t)
    per_round_ms = 1e3 * statistics.median(times)
    p99_ms = 1e3 * float(np.percentile(times, 99))

    print(f"{federation.num_clients:,} clients registered in {register_s:.2f} s")
    print(
        f"memory beyond the data: {beyond_data / 2**20:.0f} MiB "
        f"({after_free / 2**20:.0f} MiB once the caller drops its copy)"
    )
    print(f"selection + configuration of {args.cohort}: median {per_round_ms:.2f} ms, p99 {p99_ms:.2f} ms per round")
    print(
        json.dumps(
            {
                "benchmark": "scale",
                "clients": federation.num_clients,
                "cohort": args.cohort,
                "select_configure_ms": round(per_round_ms, 3),
                "select_configure_p99_ms": round(p99_ms, 3),
                "beyond_data_mib": round(beyond_data / 2**20, 1),
                "register_s": round(register_s, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
