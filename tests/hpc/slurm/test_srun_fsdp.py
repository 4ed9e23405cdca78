"""Two facilities, each an sbatch job of 2 ranks started by ``srun`` without torchrun, federate a tiny LLaMA.

Each facility is its own real SLURM cluster (two_slurm_clusters). Its batch script's only launch line is
``srun python -m tests.hpc.fsdp_rank ...``: the ranks find each other from SLURM's variables alone
(fedfleet.hpc.launch), shard the model with FSDP on CPU (gloo), and sync over gRPC with an arbiter in this test
process, the compute nodes dialling out. After every sync each rank must hold the weighted mean the test
computes itself from the ranks' shards (tests/hpc/test_fsdp_processes.py's check).
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
import torch

from fedfleet.sync.arbiter import SyncArbiter, SyncSessionConfig
from tests.grpc_jobs import free_port
from tests.hpc.test_fsdp_processes import TORCHRUN_VARS, FolderArbiter, check
from tests.paths import ROOT
from tests.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slow


def batch_script(path: Path, role: str, pid: str, link: list[str], out: Path, *args: str) -> Path:
    """``link``: how the party reaches the others (``--address host:port`` or ``--exchange folder``)."""
    rank_argv = " ".join([sys.executable, "-m", "tests.hpc.fsdp_rank", "--role", role, "--party-id", pid, *link,
                          "--out", str(out), *args])  # fmt: skip
    path.write_text(
        "#!/bin/bash\n"
        "set -euo pipefail\n"
        f"unset {' '.join(TORCHRUN_VARS)}\n"  # nothing torchrun would set: only SLURM's variables
        "export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false\n"
        f"srun {rank_argv}\n"
    )
    return path


def test_two_facilities_of_two_srun_ranks_each_hold_the_weighted_mean_after_every_sync(
    two_slurm_clusters: tuple[SlurmCluster, SlurmCluster], tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    arbiter = SyncArbiter(SyncSessionConfig(session="s-fsdp", parties=["guest-9999", "host-10000"],
                                            address=address, certs=None))  # fmt: skip
    failures: list[BaseException] = []
    records: list = []

    def serve() -> None:
        try:
            records.extend(arbiter.serve())
        except BaseException as exc:  # seen by the assertion below
            failures.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    logs = run_two_facilities(two_slurm_clusters, tmp_path, ["--address", address])
    thread.join(30)
    assert not failures, failures
    assert len(records) == 2  # 2 epochs, a sync at the end of each
    check(logs, {"guest-9999": 32.0, "host-10000": 24.0})


def test_two_srun_facilities_sync_through_a_folder_and_hold_the_weighted_mean_after_every_sync(
    two_slurm_clusters: tuple[SlurmCluster, SlurmCluster], tmp_path: Path
) -> None:
    """The same two facilities with no network at all: each FSDP party's syncs are rounds of a FileRuntime
    (FileContext), whose round loop runs in this test from tiny_llama(0)'s params; its last sync loads the
    session's final params, published once the last round is committed."""
    exchange = tmp_path / "exchange"
    arbiter = FolderArbiter(exchange, ["guest-9999", "host-10000"])
    logs = run_two_facilities(two_slurm_clusters, tmp_path, ["--exchange", str(exchange)])
    arbiter.join()
    assert [r.round for r in arbiter.loop.history] == [0, 1]
    assert sorted(p.name for p in exchange.iterdir()) == ["final", "round-0001", "round-0002"]
    assert all(rank["exchange"] == "sharded" for ranks in logs.values() for rank in ranks)
    means = check(logs, {"guest-9999": 32.0, "host-10000": 24.0})
    final = arbiter.loop.global_params.tensors()
    for name, tensor in means[-1].items():  # the arbiter's model is the mean the ranks hold
        torch.testing.assert_close(final[name].double(), tensor, rtol=0, atol=2e-6)


def run_two_facilities(
    clusters: tuple[SlurmCluster, SlurmCluster], tmp_path: Path, link: list[str]
) -> dict[str, list[dict]]:
    """guest-9999 (FULL_SHARD, 32 examples) on the first cluster and host-10000 (HYBRID_SHARD as 2 replicas, 24
    examples, another initial model) on the second, each an sbatch job of 2 srun ranks reaching the others by
    ``link``; waits for both to complete and returns every rank's record."""
    out = tmp_path / "out"
    out.mkdir()
    guest = ["guest", "9999", "--strategy", "FULL_SHARD", "--examples", "32"]
    host = ["host", "10000", "--strategy", "HYBRID_SHARD", "--shard-size", "1", "--examples", "24", "--model-seed", "1"]
    sites = {"guest-9999": (clusters[0], guest), "host-10000": (clusters[1], host)}
    jobs = {}
    for name, (cluster, (role, pid, *args)) in sites.items():
        script = batch_script(tmp_path / f"{name}.sh", role, pid, link, out, *args)
        options = ["--ntasks=2", f"--output={tmp_path / name}-%j.out", "--time=00:10:00"]
        jobs[name] = (cluster, cluster.sbatch(script, options=options, cwd=ROOT))
    try:
        for name, (cluster, job_id) in jobs.items():
            state = cluster.wait(job_id, timeout=300)
            log = (tmp_path / f"{name}-{job_id}.out").read_text()
            assert state == ("COMPLETED", 0), f"{name} job {job_id} on {cluster.name}: {state}\n{log[-4000:]}"
            ranks = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
            assert sorted((r["rank"], r["world"]) for r in ranks) == [(0, 2), (1, 2)], log[-2000:]
    finally:
        for cluster, job_id in jobs.values():
            cluster.command("scancel", job_id, check=False)
    return {name: [torch.load(out / f"{name}-rank{r}.pt") for r in range(2)] for name in sites}
