"""The FSDP party's two exchanges, side by side: "gathered" vs "sharded" (issue 17, item 2), through a folder or
over gRPC (``--runtime``).

One party of 2 CPU ranks (gloo), a model of stacked square ``Linear`` layers sharded with FSDP2 ``FULL_SHARD``,
syncing every optimizer step with an arbiter (fedavg) in the launching process: a FileRuntime's loop, or a
``SyncArbiter`` on loopback (each rank of the sharded party on a stream of its own). No training: each step only
counts examples, so a sync is all there is to time. Per rank and per exchange:

- ``sync_rss_mb``: how far the rank's resident memory rose, at its highest (sampled every 2 ms from
  /proc/self/statm), above where it stood before the model was built: the model (built whole on every rank,
  then sharded), the shards and what the exchange holds, the first two the same for both exchanges;
- ``read_mb`` / ``written_mb`` (sharded only: its own count of published-file bytes, or of params bytes on its
  stream; the gathered exchange has rank 0 move the whole model and the other rank nothing);
- ``sync_s``: the median seconds of a sync, seen from the rank (the arbiter's fold and publishing included).

The ratio to look at is each rank's ``sync_rss_mb``, sharded / gathered: the gathered exchange allocates a
full-size buffer on every rank and all-gathers into it (rank 0 also reads and writes the whole model); the sharded
one holds only the rank's boxes.

    python benchmarks/fsdp_sharded_exchange.py            # 64M params (256 MB fp32), 4 syncs
    python benchmarks/fsdp_sharded_exchange.py --quick    # 16M params, 3 syncs (< 1 min on 2 cores)
    python benchmarks/fsdp_sharded_exchange.py --quick --block-bytes 4194304   # coarser block sums
    python benchmarks/fsdp_sharded_exchange.py --quick --runtime grpc           # over gRPC on loopback
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PARTY = "guest-9999"
PARTIES = [("guest", "9999"), ("arbiter", "10000")]


def stacked(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])


def rank_main(a: argparse.Namespace) -> None:
    """One rank: shard the model, sync ``a.syncs`` times, print a JSON line of what it measured."""
    from fedfleet.hpc.fsdp import FSDPConfig
    from fedfleet.hpc.fsdp_party import FSDPParty
    from fedfleet.runtime.files import FileContext
    from fedfleet.sync import FedArguments

    torch.set_num_threads(1)
    if a.address:
        from fedfleet.sync import create_context

        ctx = create_context(("guest", "9999"), PARTIES, "bench", arbiter_address=a.address, insecure=True)
    else:
        ctx = FileContext(a.exchange, PARTY, "bench", timeout=300, poll_s=0.05)
    config = FSDPConfig("FULL_SHARD", precision="fp32", device="cpu")
    gc.collect()
    sampler = RssSampler()  # from before the model: its construction (whole on each rank) is the same either way
    party = FSDPParty(ctx, stacked(a.width, a.layers), FedArguments("step", 1), config, exchange=a.exchange_kind)
    party.begin(total_steps=a.syncs, steps_per_epoch=a.syncs)  # the first read of the global counts too
    for _ in range(a.syncs):
        party.count(8)
        party.end_step()
    rise = sampler.stop()
    party.close()
    seconds = sorted(r.seconds for r in party.history)
    record = {
        "rank": party.rank,
        "sync_rss_mb": rise / 1e6,
        "sync_s": seconds[len(seconds) // 2],
        "read_mb": party.traffic.get("read", 0) / 1e6,
        "written_mb": party.traffic.get("written", 0) / 1e6,
    }
    print(json.dumps(record), flush=True)
    party.destroy()


class RssSampler:
    """The highest resident set size above the one at construction, sampled in a thread until ``stop``."""

    def __init__(self, every_s: float = 0.002) -> None:
        self.base = self.peak = _rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._done.wait(every_s):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self.peak, _rss()) - self.base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def folder_arbiter(a: argparse.Namespace, exchange: Path, failures: list) -> threading.Thread:
    """A FileRuntime's round loop over ``exchange``, publishing the final params after the last round."""
    from fedfleet.core.fit_config import FitConfig
    from fedfleet.core.loop import LoopConfig, RoundLoop
    from fedfleet.core.params import FlatParams
    from fedfleet.runtime.files import FileRuntime
    from fedfleet.select import build_selector
    from fedfleet.strategy import build_strategy

    blocks = {} if a.block_bytes is None else {"block_bytes": a.block_bytes}
    initial = FlatParams.from_tensors({n: p.data for n, p in stacked(a.width, a.layers).named_parameters()})
    runtime = FileRuntime(exchange, session="bench", parties=[PARTY], min_parties=1, round_timeout=300,
                          poll_s=0.05, keep_last=1, **blocks)  # fmt: skip
    loop = RoundLoop(build_strategy("fedavg"), runtime, build_selector("uniform"), initial, FitConfig(),
                     LoopConfig(rounds=a.syncs, cohort=1, seed=0, eval_every=0))  # fmt: skip

    def drive() -> None:
        try:
            loop.run()
            runtime.publish_final(loop.global_params)
        except BaseException as exc:  # reported by run()
            failures.append(exc)

    return threading.Thread(target=drive, daemon=True)


def grpc_arbiter(a: argparse.Namespace, address: str, failures: list) -> threading.Thread:
    """A party-paced arbiter on loopback, from the model's initial params (no party is asked for them)."""
    from fedfleet.core.params import FlatParams
    from fedfleet.sync.arbiter import SyncArbiter, SyncSessionConfig

    initial = FlatParams.from_tensors({n: p.data for n, p in stacked(a.width, a.layers).named_parameters()})
    arbiter = SyncArbiter(SyncSessionConfig(session="bench", parties=[PARTY], address=address, certs=None,
                                            initial=initial, round_timeout=300))  # fmt: skip

    def drive() -> None:
        try:
            arbiter.serve()
        except BaseException as exc:  # reported by run()
            failures.append(exc)

    return threading.Thread(target=drive, daemon=True)


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run(kind: str, a: argparse.Namespace) -> list[dict]:
    """One session: the arbiter here, the party's 2 ranks as processes."""
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        exchange = Path(tmp) / "exchange"
        address = f"127.0.0.1:{free_port()}"
        failures: list[BaseException] = []
        if a.runtime == "grpc":
            thread, where = grpc_arbiter(a, address, failures), ["--address", address]
        else:
            thread, where = folder_arbiter(a, exchange, failures), ["--exchange", str(exchange)]
        thread.start()
        port = free_port()
        procs = []
        for rank in range(2):
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
                   "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}  # fmt: skip
            env["OMP_NUM_THREADS"] = "1"
            cmd = [sys.executable, __file__, "--rank-worker", *where, "--exchange-kind", kind,
                   "--width", str(a.width), "--layers", str(a.layers), "--syncs", str(a.syncs)]  # fmt: skip
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))  # fmt: skip
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise SystemExit(f"a {kind} rank failed:\n{err[-3000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        thread.join(60)
        if failures:
            raise SystemExit(f"the arbiter failed: {failures[0]!r}")
    return sorted(results, key=lambda r: r["rank"])


def _block_default() -> int:
    from fedfleet.runtime.files.runtime import BLOCK_BYTES

    return BLOCK_BYTES


def ratio(sides: dict[str, list[dict]], rank: int) -> float:
    return round(sides["sharded"][rank]["sync_rss_mb"] / sides["gathered"][rank]["sync_rss_mb"], 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16M params, 3 syncs")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--syncs", type=int, default=None)
    p.add_argument("--block-bytes", type=int, default=None, help="the global's block sums (default FileRuntime's)")
    p.add_argument("--tmp", default=None, help="where the exchange folder goes (default: the system's temp)")
    p.add_argument("--runtime", choices=("files", "grpc"), default="files", help="through a folder, or over gRPC")
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--exchange", help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--exchange-kind", default="sharded", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.width = a.width or (1024 if a.quick else 2048)
    a.layers = a.layers or 16
    a.syncs = a.syncs or (3 if a.quick else 4)
    if a.rank_worker:
        rank_main(a)
        return
    started = time.perf_counter()
    sides = {kind: run(kind, a) for kind in ("gathered", "sharded")}
    params = a.width * a.width * a.layers
    summary = {
        "benchmark": "fsdp_sharded_exchange",
        "params_m": params / 1e6,
        "model_mb": params * 4 / 1e6,
        "ranks": 2,
        "syncs": a.syncs,
        "runtime": a.runtime,
        **({"block_bytes": a.block_bytes or _block_default()} if a.runtime == "files" else {}),
        **{
            f"{kind}_{key}_rank{r['rank']}": round(r[key], 3)
            for kind, ranks in sides.items()
            for r in ranks
            for key in ("sync_rss_mb", "sync_s", "read_mb", "written_mb")
        },
        **{f"sync_rss_ratio_rank{r}": ratio(sides, r) for r in range(2)},
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}",
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
