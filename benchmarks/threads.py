"""Local training with 1 torch thread vs torch's default (one per core), on a quiet machine and beside a busy one.

Why: a simulation trains many small clients in turn, and on a small model each op is too short for intra-op
threads to share; when another process holds a core, torch's threads spin-wait on each other. The demo job
once took 85 s instead of 9 s that way. This measures, per model size, samples/s of one client's local
training (fedfleet's TorchTrainer, plain SGD) with 1 thread and with every core, with nothing else running
and beside one process that keeps a core busy, and reports the ratio; ``runtime.threads: auto`` is set from it.

    python benchmarks/threads.py            # every model, 3 repeats
    python benchmarks/threads.py --quick    # fewer steps, 1 repeat (< 2 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedfleet.client import TorchTrainer
from fedfleet.core.fit_config import FitConfig
from fedfleet.data import FederatedDataset
from fedfleet.data.federated import Partition
from fedfleet.models import build_model


@dataclass(frozen=True)
class Case:
    input_shape: tuple[int, ...]
    build: Callable[[], nn.Module]
    batch_size: int


def _dlrm() -> nn.Module:
    from fedfleet.data import FeatureLayout

    # the MovieLens example's shape: 5 dense, 943 users, 1682 items and 3 small tables, embeddings of 16
    layout = FeatureLayout(("a", "b", "c", "d", "e"), ("user", "item", "g", "o", "z"), (943, 1682, 3, 21, 20))
    return build_model("dlrm", (10,), 2, features=layout, embedding_dim=16, bottom=[64], top=[64, 32])


# the demo's CNN, the DLRM example, then MLPs of growing size (params in the name)
CASES: dict[str, Case] = {
    "digits_cnn_0.1M": Case((1, 8, 8), lambda: build_model("simple_cnn", (1, 8, 8), 10, padding=1), 10),
    "dlrm_0.1M": Case((10,), _dlrm, 16),
    "mlp_0.5M": Case((784,), lambda: build_model("mlp", (784,), 10, hidden=(512, 128)), 32),
    "mlp_2M": Case((784,), lambda: build_model("mlp", (784,), 10, hidden=(1024, 1024)), 32),
    "mlp_8M": Case((784,), lambda: build_model("mlp", (784,), 10, hidden=(2048, 2048, 1024)), 32),
}


def _data(case: Case, n: int = 512) -> FederatedDataset:
    gen = torch.Generator().manual_seed(0)
    if case.input_shape == (10,):  # DLRM: 5 dense columns then 5 ids within each table
        dense = torch.rand(n, 5, generator=gen)
        ids = torch.stack([torch.randint(0, m, (n,), generator=gen) for m in (943, 1682, 3, 21, 20)], 1).float()
        x = torch.cat([dense, ids], 1)
    else:
        x = torch.rand(n, *case.input_shape, generator=gen)
    y = torch.randint(0, 2 if case.input_shape == (10,) else 10, (n,), generator=gen)
    part = Partition(np.arange(n), np.array([0, n]))
    return FederatedDataset.from_partition(x, y, part, int(y.max()) + 1)


def samples_per_s(name: str, threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    case = CASES[name]
    torch.manual_seed(0)
    trainer = TorchTrainer(case.build())
    data = _data(case).client(0)
    params = trainer.params.clone()
    config = FitConfig(steps=max(2, steps // 5), batch_size=case.batch_size, lr=0.01)
    trainer.fit(params, config, data)  # warm-up: allocations, first-call costs
    config = FitConfig(steps=steps, batch_size=case.batch_size, lr=0.01)
    start = time.perf_counter()
    trainer.fit(params, config, data)
    return steps * case.batch_size / (time.perf_counter() - start)


def _busy(stop: mp.Event) -> None:  # type: ignore[valid-type]
    x = 0
    while not stop.is_set():  # pure Python: holds one core, no threads of its own
        x = (x * 31 + 7) % 1_000_003


def measure(name: str, steps: int, repeats: int, cores: int) -> dict[str, float]:
    out: dict[str, float] = {"params": float(sum(p.numel() for p in CASES[name].build().parameters()))}
    for load in ("quiet", "busy"):
        stop = mp.Event()
        neighbour = mp.Process(target=_busy, args=(stop,), daemon=True) if load == "busy" else None
        if neighbour is not None:
            neighbour.start()
            time.sleep(0.2)
        try:
            for threads in (1, cores):
                runs = [samples_per_s(name, threads, steps) for _ in range(repeats)]
                out[f"{load}_t{threads}"] = statistics.median(runs)
        finally:
            stop.set()
            if neighbour is not None:
                neighbour.join()
        out[f"{load}_one_vs_all"] = out[f"{load}_t1"] / out[f"{load}_t{cores}"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps, one repeat")
    p.add_argument("--models", nargs="*", default=list(CASES), choices=list(CASES))
    args = p.parse_args()
    cores = os.cpu_count() or 1
    steps, repeats = (30, 1) if args.quick else (100, 3)
    results = {}
    for name in args.models:
        results[name] = measure(name, steps, repeats, cores)
        r = results[name]
        print(
            f"{name:16s} quiet: 1 thread {r['quiet_t1']:8.0f}/s, {cores} threads {r[f'quiet_t{cores}']:8.0f}/s "
            f"(x{r['quiet_one_vs_all']:.2f}) | busy: {r['busy_t1']:8.0f}/s vs {r[f'busy_t{cores}']:8.0f}/s "
            f"(x{r['busy_one_vs_all']:.2f})",
            flush=True,
        )
    summary = {
        "benchmark": "threads",
        "quick": args.quick,
        "machine": f"{platform.machine()} {cores} cores, torch {torch.__version__}",
        "one_thread_vs_all": {
            n: [round(r["quiet_one_vs_all"], 3), round(r["busy_one_vs_all"], 3)] for n, r in results.items()
        },
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
