"""The sharded exchange through a folder: every rank of an FSDP party writes only its boxes of the update and reads
only its boxes of the global, and the parties still hold the weighted mean after every sync.

Real processes on gloo (CPU) with torchrun's variables set by hand, a FileRuntime's round loop in this test (the
global published with small block sums, so a rank's reads can be told from the whole file's). Three parties of
different world sizes and layouts: FULL_SHARD over 2 ranks, HYBRID_SHARD as 2 replicas of 1 shard (only the first
replica writes), and a party of one rank. What each rank wrote is read back from its own file; what it read is
its own count of the bytes it took from published files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fedfleet.core.params import FlatParams, select_params
from fedfleet.runtime.files.exchange import Exchange, publish
from tests.hpc.fsdp_rank import tiny_llama
from tests.hpc.test_fsdp_processes import FolderArbiter, check, launch, wait_all

pytestmark = pytest.mark.slow

BLOCK = 1024  # bytes per block sum of the published globals: the tiny model's tensors span many blocks
PARTIES = {  # name: (ranks, fsdp_rank arguments, examples per epoch)
    "guest-9999": (2, ["--strategy", "FULL_SHARD", "--examples", "32"], 32.0),
    "host-10000": (2, ["--strategy", "HYBRID_SHARD", "--shard-size", "1", "--examples", "24", "--model-seed", "1"],
                   24.0),
    "host-10001": (1, ["--strategy", "FULL_SHARD", "--examples", "16", "--model-seed", "2"], 16.0),
}  # fmt: skip


def test_three_fsdp_parties_of_1_and_2_ranks_exchange_only_their_shards_through_a_folder(tmp_path: Path) -> None:
    exchange = tmp_path / "exchange"
    arbiter = FolderArbiter(exchange, list(PARTIES), block_bytes=BLOCK)
    out = tmp_path / "out"
    out.mkdir()
    procs = []
    for name, (world, args, _) in PARTIES.items():
        role, pid = name.split("-")
        procs += launch(role, pid, world, ["--exchange", str(exchange)], out, *args)
    wait_all(procs)
    arbiter.join()
    logs = {name: [torch.load(out / f"{name}-rank{r}.pt") for r in range(PARTIES[name][0])] for name in PARTIES}
    means = check(logs, {name: weight for name, (_, _, weight) in PARTIES.items()})
    final = arbiter.loop.global_params.tensors()
    for name, tensor in means[-1].items():  # the arbiter's model is the mean every rank holds
        torch.testing.assert_close(final[name].double(), tensor, rtol=0, atol=2e-6)

    full_bytes = arbiter.initial.spec.nbytes
    for name, ranks in logs.items():
        assert all(rank["exchange"] == "sharded" for rank in ranks)
        for rnd in (1, 2):
            folder = exchange / f"round-{rnd:04d}" / "updates" / name
            files = sorted(p.name for p in folder.glob("rank-*.safetensors"))
            writers = [r for r, rank in enumerate(ranks) if rank["traffic"]["written"]]
            assert files == [f"rank-{r:05d}.safetensors" for r in writers], (name, files)
            for r in writers:  # a rank's file holds its own shard of every exchanged tensor, nothing more
                assert data_bytes(folder / f"rank-{r:05d}.safetensors") == shard_bytes(ranks[r]["after"][rnd - 1])
        for rank in ranks:
            held = shard_bytes(rank["start"])
            # 3 reads (start, after sync 1, the final params): the shard, plus the header's and the edges' blocks
            assert 3 * held <= rank["traffic"]["read"] <= 3 * (held + 2 * BLOCK * (len(rank["start"]) + 4)), name
    guest, replicas = logs["guest-9999"], logs["host-10000"]
    assert all(shard_bytes(rank["start"]) < 0.6 * full_bytes for rank in guest)  # half the model each
    assert [bool(rank["traffic"]["written"]) for rank in replicas] == [True, False]  # the second replica writes none
    assert all(rank["traffic"]["read"] < 3 * full_bytes for rank in guest)


def test_a_block_only_one_rank_reads_fails_that_rank_and_the_other_rank_stops_too(tmp_path: Path) -> None:
    """Round 1's global with one changed byte in the rows only rank 1 of a FULL_SHARD party reads (the end of the
    head): rank 1 refuses the block until its timeout; rank 0, which read its own rows fine, does not wait for
    ever in the next collective but stops at once with rank 1, saying another rank failed."""
    exchange = Exchange(tmp_path / "exchange")
    params = FlatParams.from_tensors({n: p.data for n, p in select_params(tiny_llama(0), "trainable")})
    assert params.spec.names[-1] == "lm_head.weight"  # the last tensor: rank 1 holds its second half
    manifest = {"session": "s-fsdp", "party": "arbiter", "round": 1, "kind": "global", "tasks": {}}
    publish(exchange.global_dir(1), params, manifest, block_bytes=BLOCK)
    path = exchange.global_dir(1) / "params.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    procs = launch("guest", "9999", 2, ["--exchange", str(exchange.root)], out, "--strategy", "FULL_SHARD",
                   "--sync-timeout", "4")  # fmt: skip
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        errors.append(err)
        assert proc.returncode != 0
    assert "does not match the manifest's sum" in errors[1] and "within 4 s" in errors[1], errors[1][-2000:]
    assert "1 other rank(s) failed to sync" in errors[0], errors[0][-2000:]
    assert not list(out.iterdir())  # neither rank got as far as training and recording


def shard_bytes(shards: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> int:
    return sum(local.numel() * local.element_size() for _, local in shards.values())


def data_bytes(path: Path) -> int:
    """The bytes of the tensors a safetensors file holds (read with the safetensors library, not fedfleet)."""
    with safe_open(str(path), "pt") as f:
        return sum(t.numel() * t.element_size() for t in (f.get_tensor(k) for k in f.keys()))  # noqa: SIM118 (safe_open is not iterable)
