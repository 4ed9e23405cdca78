"""FSDP parties over gRPC on loopback, every rank a real process on gloo (CPU), and a model-less arbiter here.

The test starts each rank with torchrun's variables set by hand. After every sync each rank's own shard of every
exchanged tensor must be the weighted mean (by the examples each party trained on) of the two parties' params
just before the sync, which the test reassembles from the ranks' shards (read with torch's layout code) and
averages itself, in float64.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from fedfleet.sync.arbiter import SyncArbiter, SyncSessionConfig
from tests.grpc_jobs import free_port
from tests.hpc.fsdp_rank import Tokens, tiny_llama
from tests.paths import ROOT

pytestmark = pytest.mark.slow

TORCHRUN_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def launch(role: str, pid: str, world: int, link: list[str], out: Path, *args: str) -> list[subprocess.Popen]:
    """The party's ranks, reaching the others by ``link`` (``--address host:port`` or ``--exchange folder``); a
    party of one rank runs with no torchrun variables at all."""
    base = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    base.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(base)
        if world > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world))
            env.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        cmd = [sys.executable, "-m", "tests.hpc.fsdp_rank", "--role", role, "--party-id", pid]
        cmd += [*link, "--out", str(out), *args]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def run_session(tmp_path: Path, guest: tuple[int, list[str]], host: tuple[int, list[str]]) -> dict[str, list[dict]]:
    address = f"127.0.0.1:{free_port()}"
    names = ["guest-9999", "host-10000"]
    arbiter = SyncArbiter(SyncSessionConfig(session="s-fsdp", parties=names, address=address, certs=None))
    failures: list[BaseException] = []
    records: list = []

    def serve() -> None:
        try:
            records.extend(arbiter.serve())
        except BaseException as exc:  # seen by the assertion below, not lost in a thread
            failures.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    out = tmp_path / "out"
    out.mkdir()
    procs = launch("guest", "9999", guest[0], ["--address", address], out, *guest[1])
    procs += launch("host", "10000", host[0], ["--address", address], out, *host[1])
    wait_all(procs)
    thread.join(30)
    assert not failures, failures
    assert len(records) == 2  # 2 epochs, a sync at the end of each
    return {
        "guest-9999": [torch.load(out / f"guest-9999-rank{r}.pt") for r in range(guest[0])],
        "host-10000": [torch.load(out / f"host-10000-rank{r}.pt") for r in range(host[0])],
    }


class FolderArbiter:
    """A FileRuntime's round loop over ``exchange`` in a thread, from tiny_llama(0)'s params, publishing the
    session's final params after its last round (what FileContext parties' last sync loads)."""

    def __init__(self, exchange: Path, parties: list[str], rounds: int = 2, **runtime: Any) -> None:
        from fedfleet.core.fit_config import FitConfig
        from fedfleet.core.loop import LoopConfig, RoundLoop
        from fedfleet.core.params import FlatParams, select_params
        from fedfleet.runtime.files import FileRuntime
        from fedfleet.select import build_selector
        from fedfleet.strategy import build_strategy

        self.initial = FlatParams.from_tensors({n: p.data for n, p in select_params(tiny_llama(0), "trainable")})
        self.runtime = FileRuntime(exchange, session="s-fsdp", parties=parties, min_parties=len(parties),
                                   round_timeout=300, poll_s=0.2, **runtime)  # fmt: skip
        config = LoopConfig(rounds=rounds, cohort=len(parties), seed=0, eval_every=0)
        self.loop = RoundLoop(build_strategy("fedavg"), self.runtime, build_selector("uniform"), self.initial,
                              FitConfig(), config)  # fmt: skip
        self.failures: list[BaseException] = []
        self.thread = threading.Thread(target=self._drive, daemon=True)
        self.thread.start()

    def _drive(self) -> None:
        try:
            self.loop.run()
            self.runtime.publish_final(self.loop.global_params)
        except BaseException as exc:  # seen by join's assertion
            self.failures.append(exc)

    def join(self) -> None:
        self.thread.join(30)
        assert not self.failures, self.failures


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> None:
    """Every rank exits 0 (its stderr's tail in the failure); any left running is killed."""
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err[-4000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def assemble(ranks: list[dict], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """A party's full tensors from its ranks' shards; replicas of a shard must agree exactly."""
    full, seen = {}, {}
    for name, shape in shapes.items():
        full[name] = torch.zeros(shape, dtype=torch.float64)
        seen[name] = torch.zeros(shape, dtype=torch.bool)
    for shard in ranks:
        assert shard.keys() == shapes.keys()
        for name, (offset, local) in shard.items():
            box = tuple(slice(o, o + n) for o, n in zip(offset, local.shape, strict=True))
            if seen[name][box].any():
                assert torch.equal(full[name][box][seen[name][box]], local.double()[seen[name][box]]), name
            full[name][box] = local.double()
            seen[name][box] = True
    assert all(s.all() for s in seen.values())  # every element held by some rank
    return full


def shapes_of(freeze_embeddings: bool) -> dict[str, torch.Size]:
    model = tiny_llama(0)
    return {n: p.shape for n, p in model.named_parameters() if not (freeze_embeddings and "embed_tokens" in n)}


def check(logs: dict[str, list[dict]], weights: dict[str, float], freeze_embeddings: bool = False) -> list:
    """Every rank holds the weighted mean after every sync; returns the means."""
    shapes = shapes_of(freeze_embeddings)
    parties = list(logs)
    # every rank of both parties starts from the same params: the first party to join's
    first = assemble([r["start"] for r in logs[parties[0]]], shapes)
    for party in parties:
        start = assemble([r["start"] for r in logs[party]], shapes)
        assert all(torch.equal(start[n], first[n]) for n in shapes), party
    inits = [{n: p.double() for n, p in tiny_llama(seed).named_parameters() if n in shapes} for seed in (0, 1)]
    assert any(all(torch.equal(first[n], init[n]) for n in shapes) for init in inits)
    means = []
    for r in range(2):
        for party in parties:
            assert all(rank["weights"][r] == weights[party] for rank in logs[party]), (party, logs[party][0]["weights"])
        before = {p: assemble([rank["before"][r] for rank in logs[p]], shapes) for p in parties}
        total = sum(weights.values())
        mean = {n: sum(before[p][n] * (weights[p] / total) for p in parties) for n in shapes}
        assert not all(torch.equal(before[parties[0]][n], before[parties[1]][n]) for n in shapes)  # trained apart
        for party in parties:
            for rank in logs[party]:
                for name, (offset, local) in rank["after"][r].items():
                    box = tuple(slice(o, o + k) for o, k in zip(offset, local.shape, strict=True))
                    assert torch.allclose(local.double(), mean[name][box], rtol=0, atol=2e-6), (party, r, name)
        means.append(mean)
    return means


CHUNK_HEADER = 200  # bytes of a chunk's safetensors header, at most (one chunk per dtype at these sizes)


def check_streams(logs: dict[str, list[dict]], syncs: int = 2) -> None:
    """Every rank exchanged over a stream of its own, moving only its rows: it received its shard three times
    (the start, the second round, the final params) and the party's ranks sent its params once per sync between
    them (a replica's rows by the first holder only), once more from the party that gave the initial params.
    Nothing of another rank's rows went over its stream."""
    initial = []
    for party, ranks in logs.items():
        sent = 0
        for rank in ranks:
            assert rank["exchange"] == "sharded", (party, rank["exchange"])
            own = sum(local.numel() * 4 for _, local in rank["start"].values())  # fp32 master weights
            assert 3 * own <= rank["traffic"]["read"] <= 3 * (own + CHUNK_HEADER), (party, rank["traffic"], own)
            sent += rank["traffic"]["written"]
        total = sum(local.numel() * 4 for _, local in assemble_boxes(ranks).values())
        sends = [n for n in (syncs, syncs + 1) if n * total <= sent <= n * (total + len(ranks) * CHUNK_HEADER)]
        assert sends, (party, sent, total)
        initial += [party] if sends[0] > syncs else []
    assert len(initial) == 1, initial  # the model-less arbiter asked one party for its initial params


def assemble_boxes(ranks: list[dict]) -> dict[tuple[str, tuple[int, ...]], tuple]:
    """Each distinct box of the party's tensors once (replicas hold the same boxes)."""
    return {(name, offset): (offset, local) for rank in ranks for name, (offset, local) in rank["start"].items()}


def loss_of_plain_model(mean: dict[str, torch.Tensor], dtype: torch.dtype, seed: int = 0) -> float:
    """The loss the mean gives in a plain, unsharded model: what the party's sharded forward must compute."""
    model = tiny_llama(seed)
    model.load_state_dict({n: t.float() for n, t in mean.items()}, strict=False)
    model.to(dtype).eval()
    probe = Tokens(4, seed=7).ids
    with torch.no_grad():
        return float(model(input_ids=probe, labels=probe).loss)


def test_two_parties_of_two_ranks_hold_the_weighted_mean_after_every_sync(tmp_path):
    """guest: FULL_SHARD over 2 ranks, bf16 compute, activation checkpointing, 2 micro-batches per step; host:
    HYBRID_SHARD over 2 ranks as 2 replicas of 1 shard, fp32. Weights 32 and 24 examples per epoch."""
    guest = ["--strategy", "FULL_SHARD", "--precision", "bf16", "--checkpointing", "--accum", "2", "--examples", "32"]
    host = ["--strategy", "HYBRID_SHARD", "--shard-size", "1", "--examples", "24", "--model-seed", "1"]
    logs = run_session(tmp_path, (2, guest), (2, host))
    means = check(logs, {"guest-9999": 32.0, "host-10000": 24.0})
    check_streams(logs)
    assert logs["host-10000"][1]["traffic"]["written"] == 0  # the second replica: its rows are the first's
    assert logs["guest-9999"][0]["dtype"] == "torch.bfloat16" and logs["host-10000"][0]["dtype"] == "torch.float32"
    assert [h["step"] for h in logs["guest-9999"][0]["history"]] == [2, 4]  # 32 / 2 ranks / 4 per batch / 2 accum
    assert [h["step"] for h in logs["host-10000"][0]["history"]] == [3, 6]
    # the sharded forward after the last sync computes what a plain model holding the mean does
    fp32 = loss_of_plain_model(means[-1], torch.float32, seed=1)
    assert all(abs(rank["final_loss"] - fp32) < 1e-5 for rank in logs["host-10000"])
    bf16 = loss_of_plain_model(means[-1], torch.bfloat16, seed=1)
    assert all(abs(rank["final_loss"] - bf16) < 2e-2 for rank in logs["guest-9999"])


def test_a_party_of_one_rank_and_one_of_two_federate_their_trainable_params(tmp_path):
    """guest: one process, no torchrun variables, SHARD_GRAD_OP; host: _HYBRID_SHARD_ZERO2 over 2 ranks (1 replica
    of 2 shards). The token embeddings are frozen on both: only the rest is exchanged (as LoRA adapters would be)."""
    common = ["--freeze-embeddings", "--batch-size", "4"]
    guest = ["--strategy", "SHARD_GRAD_OP", "--examples", "16", *common]
    host = ["--strategy", "_HYBRID_SHARD_ZERO2", "--shard-size", "2", "--examples", "40", *common]
    logs = run_session(tmp_path, (1, guest), (2, host))
    assert all("model.embed_tokens.weight" not in rank["before"][0] for p in logs.values() for rank in p)
    means = check(logs, {"guest-9999": 16.0, "host-10000": 40.0}, freeze_embeddings=True)
    check_streams(logs)
    # the frozen embeddings stayed each party's own (both seed 0 here), so one plain model checks both parties
    fp32 = loss_of_plain_model(means[-1], torch.float32, seed=0)
    assert all(abs(rank["final_loss"] - fp32) < 1e-5 for p in logs.values() for rank in p)


def test_a_hybrid_party_of_two_replicas_of_two_shards_and_a_party_of_one_rank(tmp_path):
    """guest: _HYBRID_SHARD_ZERO2 over 4 ranks, a 2 x 2 mesh (each shard held by two replicas, which must agree
    exactly); host: one rank. The 4 ranks see 32 examples an epoch, the host 24."""
    guest = ["--strategy", "_HYBRID_SHARD_ZERO2", "--shard-size", "2", "--examples", "32"]
    host = ["--strategy", "FULL_SHARD", "--examples", "24", "--model-seed", "1"]
    logs = run_session(tmp_path, (4, guest), (1, host))
    means = check(logs, {"guest-9999": 32.0, "host-10000": 24.0})
    check_streams(logs)
    assert [h["step"] for h in logs["guest-9999"][0]["history"]] == [2, 4]
    fp32 = loss_of_plain_model(means[-1], torch.float32, seed=1)
    assert all(abs(rank["final_loss"] - fp32) < 1e-5 for p in logs.values() for rank in p)
