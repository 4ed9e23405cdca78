"""Params streaming over gRPC on loopback: fedfleet's chunked transport vs raw gRPC bytes, round overhead, RSS.

1. Raw: a bare gRPC server in a child process; this process streams S bytes to it in 4 MiB messages and gets
   S bytes back (the ceiling any transport on gRPC can reach: no encoding, no copies into tensors), in two
   patterns. "relay": the server takes all S bytes, then sends S bytes back: the shape of a round, where a
   party must hold the whole model before it trains and answers. "echo": each message is sent back as it
   arrives, so both directions overlap on the full-duplex connection, up to twice the relay's rate; no
   exchange of a model for training can overlap that way, so it is reported, not used as the ceiling.
2. fedfleet: an ArbiterServer here, one Party in a child process whose trainer answers with the params it
   received. One ``fit`` moves S bytes arbiter -> party -> arbiter as safetensors chunks into flat buffers.
   Ratio = fedfleet throughput / raw throughput (target >= 0.70).
3. Peak RSS of both fedfleet processes vs the model size (target <= 2 x S + 200 MB each).
4. Round overhead: FedAvg rounds of a 1M-parameter model with 3 party processes whose trainers do no
   work; the median round wall time is the framework's cost per round (target <= 50 ms).

    python benchmarks/streaming.py            # S = 1 GiB
    python benchmarks/streaming.py --quick    # S = 128 MiB
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import torch

from fedfleet.core.fit_config import FitConfig
from fedfleet.core.loop import LoopConfig, RoundLoop
from fedfleet.core.params import FlatParams, ParamSpec
from fedfleet.core.update import Update
from fedfleet.runtime.grpc import ArbiterServer, Connection, GrpcRuntime, Party
from fedfleet.runtime.grpc.service import channel_options, server_options
from fedfleet.select import UniformSelector
from fedfleet.strategy import build_strategy

RAW_METHODS = {"echo": "/bench.Raw/Echo", "relay": "/bench.Raw/Relay"}
MIB = 1 << 20


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """This process's own peak RSS. Not getrusage's ru_maxrss: a child started with fork/exec inherits the
    parent's peak there, so a party spawned by a 2 GiB arbiter would report 2 GiB it never held."""
    return _status_mib("VmHWM")


def rss_mib() -> float:
    """The RSS now: the interpreter with torch and grpc loaded is the baseline the model adds to."""
    return _status_mib("VmRSS")


def model(numel: int) -> FlatParams:
    return FlatParams.from_tensors({"w": torch.zeros(numel)})


class EchoTrainer:
    """Sends back what it received (as the update's params): the transport is all that is measured."""

    def __init__(self, spec: ParamSpec) -> None:
        self.params = SimpleNamespace(spec=spec)  # the party only needs the layout; its inbox is the one copy

    def fit(self, params, config, data=None):
        return Update(params, weight=1.0)

    def evaluate(self, params, data=None):
        return {"examples": 1.0}


# -- child processes --------------------------------------------------------------------------------
def run_raw_server(port_file: str) -> None:
    def echo(requests, context):
        yield from requests

    def relay(requests, context):
        sizes = [len(m) for m in requests]  # everything arrives first, as a model does before training
        block = os.urandom(max(sizes, default=0))
        for n in sizes:
            yield block[:n] if n != len(block) else block

    methods = {
        "Echo": grpc.stream_stream_rpc_method_handler(echo),
        "Relay": grpc.stream_stream_rpc_method_handler(relay),
    }
    handler = grpc.method_handlers_generic_handler("bench.Raw", methods)
    server = grpc.server(ThreadPoolExecutor(4), options=server_options())
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with open(port_file, "w") as f:
        f.write(str(port))
    server.wait_for_termination()


def run_party(port: int, name: str, numel: int) -> None:
    baseline = rss_mib()
    conn = Connection(f"127.0.0.1:{port}", "bench", name, None, heartbeat_s=5.0)
    party = Party(EchoTrainer(ParamSpec([("w", (numel,), torch.float32)])), None, None, conn)
    party.run()
    print(json.dumps({"party_peak_rss_mib": peak_rss_mib(), "party_baseline_mib": baseline}), flush=True)


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)


# -- measurements ------------------------------------------------------------------------------------
def raw_throughput(nbytes: int, tmp: str) -> dict[str, float]:
    """GB/s both ways for each raw pattern (``RAW_METHODS``), best of two runs."""
    port_file = os.path.join(tmp, "raw.port")
    proc = spawn("--child", "raw", port_file)
    try:
        port = Path(port_file)
        while not port.exists() or not port.read_text():
            time.sleep(0.05)
        channel = grpc.insecure_channel(f"127.0.0.1:{port.read_text()}", options=channel_options())
        block = os.urandom(4 * MIB)
        n = nbytes // len(block)
        best = dict.fromkeys(RAW_METHODS, 0.0)
        for pattern, method in RAW_METHODS.items():
            call = channel.stream_stream(method)
            for _ in range(2):
                start = time.perf_counter()
                received = sum(len(m) for m in call(iter([block] * n)))
                seconds = time.perf_counter() - start
                assert received == n * len(block)
                best[pattern] = max(best[pattern], 2 * received / seconds / 1e9)
        channel.close()
        return best
    finally:
        proc.kill()


def fedfleet_stream(numel: int) -> dict[str, float]:
    baseline = rss_mib()
    params = model(numel)
    params.buffers[torch.float32].uniform_()
    server = ArbiterServer(session="bench", parties=["p0"], spec=params.spec, address="127.0.0.1:0", credentials=None)
    server.start()
    runtime = GrpcRuntime(
        server, min_parties=1, round_timeout=600, join_timeout=60, wait_timeout=120, federated_eval=False
    )
    party = spawn("--child", "party", str(server.port), "p0", str(numel))
    best = 0.0
    for rnd in range(2):
        start = time.perf_counter()
        for update in runtime.fit(params, [0], FitConfig(round=rnd)):
            assert torch.equal(update.params.buffers[torch.float32][:1000], params.buffers[torch.float32][:1000])
        seconds = time.perf_counter() - start
        best = max(best, 2 * params.nbytes / seconds / 1e9)
    runtime.finish()
    out, _ = party.communicate(timeout=60)
    server.stop(0.5)
    party = json.loads(out.strip().splitlines()[-1])
    party_rss, party_base = party["party_peak_rss_mib"], party["party_baseline_mib"]
    return {
        "fedfleet_gbps": best,
        "arbiter_peak_rss_mib": peak_rss_mib(),
        "arbiter_baseline_mib": baseline,
        "party_peak_rss_mib": party_rss,
        "party_baseline_mib": party_base,
    }


def round_overhead(numel: int, rounds: int) -> float:
    params = model(numel)
    names = ["p0", "p1", "p2"]
    server = ArbiterServer(session="bench", parties=names, spec=params.spec, address="127.0.0.1:0", credentials=None)
    server.start()
    runtime = GrpcRuntime(
        server, min_parties=3, round_timeout=60, join_timeout=60, wait_timeout=120, federated_eval=False
    )
    parties = [spawn("--child", "party", str(server.port), name, str(numel)) for name in names]
    loop = RoundLoop(
        build_strategy("fedavg"), runtime, UniformSelector(), params, FitConfig(), LoopConfig(rounds, 3, eval_every=0)
    )
    walls = [r.metrics["wall_s"] for r in loop.run()]
    runtime.finish()
    for p in parties:
        p.communicate(timeout=60)
    server.stop(0.5)
    return statistics.median(walls[1:]) * 1000  # round 1 waits for the parties to start


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        {"raw": lambda: run_raw_server(sys.argv[3]), "party": lambda: run_party(*_party_args())}[sys.argv[2]]()
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 MiB instead of 1 GiB, 10 overhead rounds")
    args = ap.parse_args()
    size_mib = 128 if args.quick else 1024
    numel = size_mib * MIB // 4
    stream = fedfleet_stream(numel)  # first: this process's peak RSS is the arbiter's
    with tempfile.TemporaryDirectory() as tmp:
        raw = raw_throughput(size_mib * MIB, tmp)
    print(
        f"raw gRPC bytes, loopback, both ways : {raw['relay']:6.2f} GB/s relayed "
        f"(echoed, directions overlapping: {raw['echo']:.2f} GB/s)",
        file=sys.stderr,
    )
    ratio = stream["fedfleet_gbps"] / raw["relay"]
    print(
        f"fedfleet params {size_mib} MiB, both ways : {stream['fedfleet_gbps']:6.2f} GB/s ({ratio:.0%} of raw relayed, "
        f"{stream['fedfleet_gbps'] / raw['echo']:.0%} of raw echoed)",
        file=sys.stderr,
    )
    limit = 2 * size_mib + 200
    for side in ("arbiter", "party"):
        peak, base = stream[f"{side}_peak_rss_mib"], stream[f"{side}_baseline_mib"]
        print(
            f"peak RSS {side}: {peak:.0f} MiB = {base:.0f} MiB before the model (Python, torch, grpc) "
            f"+ {peak - base:.0f} MiB (limit 2 x {size_mib} + 200 = {limit} MiB)",
            file=sys.stderr,
        )
    overhead_ms = round_overhead(1_000_000, 10 if args.quick else 30)
    print(f"round overhead, 1M params, 3 parties: {overhead_ms:.1f} ms (median)", file=sys.stderr)
    print(
        json.dumps(
            {
                "benchmark": "streaming",
                "model_mib": size_mib,
                "raw_gbps": round(raw["relay"], 3),
                "raw_echo_gbps": round(raw["echo"], 3),
                "fedfleet_gbps": round(stream["fedfleet_gbps"], 3),
                "ratio": round(ratio, 3),
                "arbiter_peak_rss_mib": round(stream["arbiter_peak_rss_mib"]),
                "party_peak_rss_mib": round(stream["party_peak_rss_mib"]),
                "arbiter_growth_mib": round(stream["arbiter_peak_rss_mib"] - stream["arbiter_baseline_mib"]),
                "party_growth_mib": round(stream["party_peak_rss_mib"] - stream["party_baseline_mib"]),
                "rss_limit_mib": limit,
                "round_overhead_ms": round(overhead_ms, 2),
            }
        )
    )


def _party_args() -> tuple[int, str, int]:
    return int(sys.argv[3]), sys.argv[4], int(sys.argv[5])


if __name__ == "__main__":
    main()
