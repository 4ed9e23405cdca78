"""A two-rank Hugging Face party whose rank 0 cannot sync (its arbiter was SIGKILLed): every rank raises
within seconds while rank 0 still lives, instead of the other ranks waiting in a broadcast until the
process group's timeout (30 min for gloo) or until rank 0's process ends."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.grpc_jobs import free_port
from tests.paths import ROOT

PATH = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)  # tests.* importable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": PATH}
ARBITER = """
import sys
from fedfleet.hf import FedAvgServer, create_context
parties = [("guest", "1"), ("arbiter", "2")]
FedAvgServer(create_context(parties[1], parties, "s-ranks", sys.argv[1], insecure=True)).train()
"""


def wait_for(proc: subprocess.Popen, text: str, seconds: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} not seen within {seconds} s: {''.join(lines)[-2000:]}")


@pytest.mark.slow
def test_every_rank_raises_within_seconds_when_rank_0_fails_a_sync(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    arbiter = subprocess.Popen([sys.executable, "-c", ARBITER, address], env=ENV)
    dist = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(
            # as a module from the repository: a script's own folder (tests/) first on sys.path would shadow
            # packages by the test folders' names
            [sys.executable, "-m", "tests.hf_rank_party", "--address", address, "--work", str(tmp_path)],
            cwd=ROOT,
            env={**ENV, **dist, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        wait_for(ranks[1], "rank 1 synced 2", 240)  # both ranks are past two syncs
        arbiter.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        other = ranks[1].communicate(timeout=60)[0]  # rank 0 is still alive, holding its error
        seconds = time.monotonic() - killed
        (tmp_path / "release").touch()
        outputs = [ranks[0].communicate(timeout=60)[0], other]
    finally:
        for p in (arbiter, *ranks):
            p.kill()
    assert [p.returncode for p in ranks] == [3, 3], outputs
    assert "rank 0 failed: ConnectionError" in outputs[0], outputs[0][-2000:]
    assert "rank 1 failed: RankFailed: guest-1: rank 0 failed to sync" in outputs[1], outputs[1][-2000:]
    assert seconds < 30, f"the ranks took {seconds:.0f} s to stop"
