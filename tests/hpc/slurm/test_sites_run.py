"""``fedfleet sites run`` against two real SLURM clusters: each facility a party whose every round is an sbatch job
that fedfleet writes, submits and follows, exchanging through a folder (no network between arbiter and party).

The second site's template (a site template override) sleeps in its first round-2 job: the test cancels that job
with ``scancel`` mid-round, the run stops naming the job id and its log, and ``--resume`` finishes the run. The
final model is checked twice: against the weighted mean of the round-2 updates the sites published (computed here
in float64 from the exchange folder), and against the same job simulated in one process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedfleet.config import load_job
from fedfleet.jobs.simulation import Simulation
from tests.grpc_jobs import free_port, make_certs
from tests.paths import ROOT
from tests.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slow

SITES = ["site-a", "site-b"]
JOB = """\
name: two-sites
seed: 5
rounds: 2
cohort: 2
eval_every: 0
data:
  dataset: digits
  clients: 2
  partition: {{name: dirichlet, alpha: 1.0}}
model: {{name: mlp, hidden: [32]}}
client: {{epochs: 1, batch_size: 16, lr: 0.1}}
output: {{dir: {runs}, progress: false, tensorboard: false}}
runtime: {{kind: files, exchange: {exchange}}}
network: {{session: two-sites, parties: [site-a, site-b], round_timeout: 240, wait_timeout: 120}}
sites:
  - name: site-a
    partition: {part_a}
    time: "00:10:00"
    poll_s: 0.5
    setup: {setup_a}
    env: {{OMP_NUM_THREADS: "1"}}
    scheduler_env: {{SLURM_CONF: {conf_a}}}
  - name: site-b
    partition: {part_b}
    time: "00:10:00"
    poll_s: 0.5
    env: {{OMP_NUM_THREADS: "1"}}
    scheduler_env: {{SLURM_CONF: {conf_b}}}
    template: {template}
"""
# site-b's own template: what a site insists on goes around the party's line; here a stall in its first round-2 job
TEMPLATE = """\
#!/bin/bash
@{directives}
#SBATCH --comment=site-template
set -eo pipefail
@{environment}
cd @{workdir}
if [ @{round} = 2 ] && [ ! -e stalled-once ]; then touch stalled-once; sleep 120; fi
@{command}
"""


def write_job(tmp: Path, clusters: tuple[SlurmCluster, SlurmCluster], setup_a: str = "[]") -> Path:
    (tmp / "site-b.sh.in").write_text(TEMPLATE)
    a, b = clusters
    path = tmp / "job.yaml"
    path.write_text(JOB.format(runs=tmp / "runs", exchange=tmp / "exchange", part_a=a.partition, conf_a=a.conf,
                               part_b=b.partition, conf_b=b.conf, template=tmp / "site-b.sh.in",
                               setup_a=setup_a))  # fmt: skip
    return path


def sites_run(job: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.Popen(
        [sys.executable, "-m", "fedfleet.cli.main", "sites", "run", str(job), "--quiet", *args],
        cwd=job.parent, env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


class Lines:
    """A process's stderr, read in the background: wait for a line, or take all of it at the end."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines:
                    if found := re.search(pattern, line):
                        return found
                left = deadline - time.monotonic()
                assert left > 0, f"no line matching {pattern!r} in:\n{''.join(self.lines)}"
                self.changed.wait(left)

    def text(self) -> str:
        self.thread.join(30)
        return "".join(self.lines)


def test_two_slurm_sites_train_each_round_as_batch_jobs_and_a_cancelled_one_resumes(
    two_slurm_clusters: tuple[SlurmCluster, SlurmCluster], tmp_path: Path
) -> None:
    a, b = two_slurm_clusters
    job = write_job(tmp_path, two_slurm_clusters)
    run = sites_run(job)
    lines = Lines(run)
    stalled = lines.wait_for(r"round 2: site site-b: job (\d+) RUNNING", timeout=180).group(1)
    assert b.job(stalled)["JobState"] == "RUNNING" and b.job(stalled)["Comment"] == "site-template"
    b.cancel(stalled)  # the site's job dies mid-round, as a preemption or an admin would end it
    run.wait(120)
    err = lines.text()
    assert run.returncode == 2, err
    assert f"job {stalled} on site site-b ended CANCELLED" in err and "--resume" in err, err
    log = tmp_path / "runs" / "two-sites" / "sites" / "site-b" / f"round-0002-{stalled}.out"
    assert str(log) in err and log.exists()
    status = json.loads((tmp_path / "runs" / "two-sites" / "status.json").read_text())
    assert status["state"] == "failed" and status["round"] == 1
    assert_queues_empty(a, b)  # nothing fedfleet submitted is left queued or running

    resumed = sites_run(job, "--resume")
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    assert "resuming" in err and "after round 1" in err
    assert re.search(r"round 2: site site-b: submitted job \d+", err)
    status = json.loads((tmp_path / "runs" / "two-sites" / "status.json").read_text())
    assert status["state"] == "finished" and status["round"] == 2

    assert_the_mean_and_the_simulation(tmp_path, job)


def assert_the_mean_and_the_simulation(tmp_path: Path, job: Path) -> None:
    """The run's final model is the float64 weighted mean of round 2's published updates, and the simulated job's."""
    final = load_file(str(tmp_path / "runs" / "two-sites" / "model.safetensors"))
    for name, expected in weighted_mean_of_round(tmp_path / "exchange", 2).items():
        torch.testing.assert_close(final[name].double(), expected, rtol=0, atol=1e-6)
    sim = Simulation.from_config(load_job(job, ["runtime.kind=simulation", "runtime.exchange=null", "sites=[]"]))
    sim.run()
    for name, tensor in sim.loop.global_params.tensors().items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-5)


def assert_queues_empty(*clusters: SlurmCluster, timeout: float = 30) -> None:
    """No job left in any queue; a cancelled job may show as COMPLETING for a moment before it leaves."""
    deadline = time.monotonic() + timeout
    for cluster in clusters:
        while (left := cluster.command("squeue", "-h", "-o", "%i %T").stdout.strip()) and "COMPLETING" in left:
            assert time.monotonic() < deadline, left
            time.sleep(0.2)
        assert left == "", f"{cluster.name}: {left}"


def weighted_mean_of_round(exchange: Path, rnd: int) -> dict[str, torch.Tensor]:
    """The round's global params plus the weighted mean of the sites' deltas, in float64, from the folder."""
    folder = exchange / f"round-{rnd:04d}"
    start = {k: v.double() for k, v in load_file(str(folder / "global" / "params.safetensors")).items()}
    total, weights = {k: torch.zeros_like(v) for k, v in start.items()}, 0.0
    for site in SITES:
        manifest = json.loads((folder / "updates" / site / "manifest.json").read_text())
        delta = load_file(str(folder / "updates" / site / "params.safetensors"))
        assert manifest["is_delta"] is not False
        for k in total:
            total[k] += float(manifest["weight"]) * delta[k].double()
        weights += float(manifest["weight"])
    return {k: start[k] + total[k] / weights for k in start}


def test_ctrl_c_cancels_the_jobs_it_submitted_and_says_how_to_resume(
    two_slurm_clusters: tuple[SlurmCluster, SlurmCluster], tmp_path: Path
) -> None:
    a, b = two_slurm_clusters
    job = write_job(tmp_path, two_slurm_clusters, setup_a='["sleep 120"]')  # site-a's job never finishes here
    run = sites_run(job)
    lines = Lines(run)
    slow = lines.wait_for(r"round 1: site site-a: job (\d+) RUNNING", timeout=120).group(1)
    run.send_signal(signal.SIGINT)
    run.wait(60)
    err = lines.text()
    assert run.returncode == 130, err
    assert f"site site-a: cancelled job {slow} (round 1)" in err and "--resume" in err, err
    assert a.wait(slow, timeout=30)[0] == "CANCELLED"
    assert_queues_empty(a, b)


SSH_SITE = """\
  - name: site-b
    reach: {reach}
    remote_dir: {remote}
    ssh_key: {key}
    ssh_options: {options}
    python: {python}
    partition: {part_b}
    time: "00:10:00"
    poll_s: 0.5
    env: {{OMP_NUM_THREADS: "1"}}
    scheduler_env: {{SLURM_CONF: {conf_b}}}
"""


def test_a_site_reached_over_ssh_gets_the_rounds_copied_there_and_its_updates_back(
    two_slurm_clusters: tuple[SlurmCluster, SlurmCluster], ssh_server, tmp_path: Path
) -> None:
    b = two_slurm_clusters[1]
    job = write_job(tmp_path, two_slurm_clusters)
    text = job.read_text()
    remote = tmp_path / "site-b-home"  # "on the site": only ssh and rsync reach it
    ssh_site = SSH_SITE.format(reach=ssh_server.reach, remote=remote, key=ssh_server.key,
                               options=json.dumps(ssh_server.options), python=sys.executable, part_b=b.partition,
                               conf_b=b.conf)  # fmt: skip
    job.write_text(text[: text.index("  - name: site-b")] + ssh_site)
    run = sites_run(job)
    _, err = run.communicate(timeout=240)
    assert run.returncode == 0, err
    assert re.search(r"round 2: site site-b: submitted job \d+ on 127.0.0.1", err), err
    assert (remote / "job.yaml").read_text() == job.read_text()
    assert (remote / "exchange" / "round-0002" / "global" / "manifest.json").exists()  # pushed there
    assert (tmp_path / "exchange" / "round-0002" / "updates" / "site-b" / "manifest.json").exists()  # pulled back
    assert list((remote / "sites" / "site-b").glob("round-0002-*.out"))  # the logs stay on the site
    assert_the_mean_and_the_simulation(tmp_path, job)


@pytest.mark.parametrize("site_b", ["local", "ssh"])
def test_a_grpc_session_runs_one_job_per_site_whose_party_dials_the_arbiter(
    two_slurm_clusters: tuple[SlurmCluster, SlurmCluster], tmp_path: Path, site_b: str, request: pytest.FixtureRequest
) -> None:
    """site-b's job is submitted on this machine, or over SSH with its own certificate and key copied there."""
    a, b = two_slurm_clusters
    job = write_job(tmp_path, two_slurm_clusters)
    make_certs(tmp_path / "certs", SITES)
    text = (
        job.read_text()
        .replace("runtime: {kind: files, exchange: " + str(tmp_path / "exchange") + "}\n", "")
        .replace(
            "network: {session: two-sites,",
            f"network: {{address: '127.0.0.1:{free_port()}', certs: {tmp_path / 'certs'}, session: two-sites,",
        )
    )
    text = text.replace(f"    template: {tmp_path / 'site-b.sh.in'}\n", "")
    remote = tmp_path / "site-b-home"
    if site_b == "ssh":
        ssh_server = request.getfixturevalue("ssh_server")
        ssh_site = SSH_SITE.format(reach=ssh_server.reach, remote=remote, key=ssh_server.key,
                                   options=json.dumps(ssh_server.options), python=sys.executable,
                                   part_b=b.partition, conf_b=b.conf)  # fmt: skip
        text = text[: text.index("  - name: site-b")] + ssh_site
    job.write_text(text)
    run = sites_run(job)
    _, err = run.communicate(timeout=240)
    assert run.returncode == 0, err
    for site in SITES:
        assert re.search(rf"site {site}: submitted job \d+", err) and f"site {site}: job" in err, err
    assert not (tmp_path / "exchange").exists()  # nothing went through a folder
    logs = sorted((tmp_path / "runs" / "two-sites.sites").glob("*/session-*.out"))
    if site_b == "ssh":  # its log stays on the site; only its own party's keys went there
        logs += sorted((remote / "sites" / "site-b").glob("session-*.out"))
        assert sorted(p.name for p in (remote / "certs").iterdir()) == ["ca.crt", "site-b.crt", "site-b.key"]
        assert (remote / "certs" / "site-b.key").stat().st_mode & 0o077 == 0
    assert len(logs) == 2 and all("round 2: sent the update" in log.read_text() for log in logs), err
    assert_queues_empty(a, b)  # the parties ended with the session: nothing is left queued or running
    assert "cancelled job" not in err  # they ended by themselves, within the grace given to them
    final = load_file(str(tmp_path / "runs" / "two-sites" / "model.safetensors"))
    sim = Simulation.from_config(load_job(job, ["sites=[]"]))
    sim.run()
    for name, tensor in sim.loop.global_params.tensors().items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-5)
