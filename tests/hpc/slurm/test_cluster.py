"""The test cluster itself: a batch job runs and writes its output, scancel ends a job as CANCELLED, and two
clusters (two facilities) run a job each at the same time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slow


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + body + "\n")
    path.chmod(0o755)
    return path


def test_a_batch_job_runs_and_writes_its_output(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = script(tmp_path / "echo.sh", 'echo "hello $1 from $SLURM_JOB_ID on $SLURM_JOB_PARTITION"')
    out = tmp_path / "out.txt"
    job_id = slurm_cluster.sbatch(job, "world", options=["--ntasks=1", f"--output={out}"])
    assert slurm_cluster.wait(job_id, timeout=60) == ("COMPLETED", 0)
    assert out.read_text().strip() == f"hello world from {job_id} on {slurm_cluster.partition}"


def test_a_failing_job_reports_its_exit_code(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = script(tmp_path / "fail.sh", "exit 3")
    job_id = slurm_cluster.sbatch(job, options=[f"--output={tmp_path / 'out.txt'}"])
    assert slurm_cluster.wait(job_id, timeout=60) == ("FAILED", 3)


def test_a_cancelled_job_reports_cancelled(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    started = tmp_path / "started"
    job = script(tmp_path / "sleep.sh", f"touch {started}\nsleep 300")
    job_id = slurm_cluster.sbatch(job, options=[f"--output={tmp_path / 'out.txt'}"])
    deadline = time.monotonic() + 60
    while not started.exists():  # cancel a running job, not a pending one
        assert time.monotonic() < deadline, slurm_cluster.job(job_id)
        time.sleep(0.05)
    slurm_cluster.cancel(job_id)
    state, _ = slurm_cluster.wait(job_id, timeout=60)
    assert state == "CANCELLED"


def test_two_clusters_run_a_job_each_at_once(
    two_slurm_clusters: tuple[SlurmCluster, SlurmCluster], tmp_path: Path
) -> None:
    a, b = two_slurm_clusters
    assert a.name != b.name and a.partition != b.partition and a.ctld_port != b.ctld_port
    # each job waits until the other has started: they can only both finish if they run at the same time
    marks = {c.name: tmp_path / f"{c.name}.running" for c in (a, b)}
    ids = {}
    for me, other in ((a, b), (b, a)):
        body = f"touch {marks[me.name]}\nfor _ in $(seq 600); do [ -e {marks[other.name]} ] && break; sleep 0.1; done\n"
        body += f'[ -e {marks[other.name]} ]\necho "$SLURM_CLUSTER_NAME $SLURM_JOB_PARTITION"'
        job = script(tmp_path / f"{me.name}.sh", body)
        ids[me.name] = me.sbatch(job, options=[f"--output={tmp_path / me.name}.out"])
    for c in (a, b):
        assert c.wait(ids[c.name], timeout=90) == ("COMPLETED", 0)
        assert (tmp_path / f"{c.name}.out").read_text().split() == [c.name, c.partition]
