"""What a round costs when each site's party is a batch job per round, beside a party that stays up (issue 18).

The same two-party job (digits, an MLP; its training takes a few tens of ms) runs three ways, side by side:

- ``grpc``: ``fedfleet arbiter`` and two ``fedfleet party`` processes over gRPC on loopback (--insecure), the
  parties up for the whole run;
- ``files``: ``fedfleet arbiter`` over ``runtime.kind: files`` and two ``fedfleet party`` processes that answer
  every round through the exchange folder (no scheduler: the folder's publish, polling and verification);
- ``sites``: ``fedfleet sites run`` on a real one-node SLURM cluster (tests/slurm_cluster.py), one sbatch job per
  site per round: what the files runtime costs on a batch site, where each round is a fresh process.

Each way's rounds after the first (the first also pays for starting up) are timed from the arbiter's metrics
(``wall_s``); for ``sites`` the submit-to-start latency comes from its progress lines (as seen by a state poll
every second). The
ratios are per round against ``grpc``. A small model on purpose: the overhead is what is measured (a large
model's exchange is benchmarks/files_exchange.py).

    python benchmarks/sites_round_overhead.py            # 6 rounds
    python benchmarks/sites_round_overhead.py --quick    # 4 rounds; one JSON line last

Needs SLURM and munge installed (.ci/run installs them); without them the ``sites`` way is skipped and said so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.slurm_cluster import SlurmCluster, missing_binaries  # noqa: E402

PARTIES = ["site-a", "site-b"]
JOB = """\
name: overhead
seed: 1
rounds: {rounds}
cohort: 2
eval_every: 0
data: {{dataset: digits, clients: 2}}
model: {{name: mlp, hidden: [32]}}
client: {{epochs: 1, batch_size: 32, lr: 0.1}}
output: {{dir: {root}/runs, progress: false, tensorboard: false}}
network: {{session: overhead, parties: [site-a, site-b], address: "127.0.0.1:{port}", round_timeout: 300}}
"""
FILES = "runtime: {{kind: files, exchange: {root}/exchange}}\n"
SITES = """\
sites:
  - {{name: site-a, partition: {partition}, time: "00:10:00", poll_s: 1, env: {{OMP_NUM_THREADS: "1"}},
      scheduler_env: {{SLURM_CONF: {conf}}}}}
  - {{name: site-b, partition: {partition}, time: "00:10:00", poll_s: 1, env: {{OMP_NUM_THREADS: "1"}},
      scheduler_env: {{SLURM_CONF: {conf}}}}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen([sys.executable, "-m", "fedfleet.cli.main", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(proc: subprocess.Popen, what: str) -> str:
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited with {proc.returncode}:\n{err[-3000:]}")
    return err


def round_walls(root: Path) -> list[float]:
    rows = (root / "runs" / "overhead" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(row)["wall_s"] for row in rows]


def run_parties(root: Path, job: Path, extra: list[str]) -> list[float]:
    arbiter = cli("arbiter", str(job), "--quiet", *extra, cwd=root)
    parties = [cli("party", str(job), "--name", name, *extra, cwd=root) for name in PARTIES]
    finish(arbiter, "the arbiter")
    for proc, name in zip(parties, PARTIES, strict=True):
        finish(proc, name)
    return round_walls(root)


def way(name: str, rounds: int, cluster: SlurmCluster | None) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"sites-overhead-{name}-", dir=ROOT / "benchmarks" / "out"))
    try:
        text = JOB.format(rounds=rounds, root=root, port=free_port())
        if name != "grpc":
            text += FILES.format(root=root)
        if name == "sites":
            text += SITES.format(partition=cluster.partition, conf=cluster.conf)
        job = root / "job.yaml"
        job.write_text(text)
        if name != "sites":
            walls = run_parties(root, job, ["--insecure"] if name == "grpc" else [])
            return {"round_s": walls}
        err = finish(cli("sites", "run", str(job), "--quiet", cwd=root), "fedfleet sites run")
        started = [float(m) for m in re.findall(r"RUNNING \(([\d.]+) s after submit\)", err)]
        return {"round_s": round_walls(root), "submit_to_start_s": started}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 rounds instead of 6")
    args = parser.parse_args()
    rounds = 4 if args.quick else 6
    (ROOT / "benchmarks" / "out").mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for name in ("grpc", "files"):
        results[name] = way(name, rounds, None)
    missing = missing_binaries()
    if missing:
        print(f"sites: skipped, SLURM is not installed (missing {', '.join(missing)})", file=sys.stderr)
    else:
        with tempfile.TemporaryDirectory(prefix="slurm-", dir=ROOT / "benchmarks" / "out") as state:
            ports = [free_port(), free_port()]
            with SlurmCluster(Path(state), "bench", ports[0], ports[1]) as cluster:
                results["sites"] = way("sites", rounds, cluster)
    summary: dict[str, float | int | str] = {"benchmark": "sites_round_overhead", "rounds": rounds}
    base = statistics.median(results["grpc"]["round_s"][1:])
    for name, found in results.items():
        later = statistics.median(found["round_s"][1:])  # the first round also pays for starting up
        summary[f"{name}_round_s"] = round(later, 4)
        summary[f"{name}_vs_grpc"] = round(later / base, 2)
        print(f"{name:6s} rounds after the first: median {later:.3f} s ({later / base:.1f}x grpc); all: "
              + ", ".join(f"{w:.3f}" for w in found["round_s"]), file=sys.stderr)  # fmt: skip
    if "sites" in results:
        start = results["sites"]["submit_to_start_s"]  # seen at most poll_s (1 s) late
        summary["sites_submit_to_start_s"] = round(statistics.median(start), 2) if start else "n/a"
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
