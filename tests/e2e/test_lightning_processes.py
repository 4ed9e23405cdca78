"""examples/lightning/digits_party.py as real processes: arbiter, guest and host over gRPC (mutual TLS),
and a guest made of two Lightning DDP processes (gloo on CPU) of which only rank 0 talks to the arbiter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.grpc_jobs import free_port, make_certs
from tests.paths import ROOT

EXAMPLE = ROOT / "examples" / "lightning" / "digits_party.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def role(name: str, pid: str, *extra: str) -> list[str]:
    return [sys.executable, str(EXAMPLE), "--role", name, "--party-id", pid, *extra]


def run_roles(commands: list[list[str]], common: list[str]) -> list[dict]:
    """Start every role's process, wait for all, and return each one's summary (its last JSON line)."""
    procs = [
        subprocess.Popen([*cmd, *common], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cmd in commands
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [json.loads([line for line in out.splitlines() if line.startswith("{")][-1]) for out, _ in outputs]


def final_models_are_equal(work: Path) -> bool:
    guest, host = (load_file(work / n / "model.safetensors") for n in ("guest-9999", "host-10000"))
    return guest.keys() == host.keys() and all(torch_equal(guest[k], host[k]) for k in guest)


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


@pytest.mark.slow  # four processes, each ~10 s of CPU importing torch + Lightning: 40-140 s on 2 busy cores
def test_arbiter_a_ddp_guest_and_a_host_as_processes_with_mutual_tls(tmp_path):
    """One run covers the deployed path: mTLS, per-N-step syncs, and a guest of two DDP ranks (one test, since
    each of the four processes spends most of its time importing torch and Lightning on a 2-core machine)."""
    make_certs(tmp_path / "certs", ["guest-9999", "host-10000"])
    common = ["--address", f"127.0.0.1:{free_port()}", "--certs", str(tmp_path / "certs")]
    common += ["--work", str(tmp_path / "work"), "--epochs", "3", "--aggregate", "step", "--freq", "4"]
    # the guest's 320 examples over 2 ranks: 5 batches of 32 per rank and epoch, 15 steps in 3 epochs, syncs at
    # steps 4, 8, 12 and 15; the host's 160 examples on one process: the same 15 steps and 4 syncs
    ddp = ["--devices", "2", "--strategy", "ddp", "--limit", "320"]
    arbiter, guest, host = run_roles(
        [role("arbiter", "10000"), role("guest", "9999", *ddp), role("host", "10000", "--limit", "160")],
        common,
    )
    assert guest["world_size"] == 2 and host["world_size"] == 1
    assert arbiter["rounds"] == 4
    # a sync's weight is the examples of both ranks (2 x 4 batches of 32), not of rank 0 alone
    assert guest["weights"] == [256.0, 256.0, 256.0, 192.0]
    assert host["weights"] == [128.0, 128.0, 128.0, 96.0]
    for party in (guest, host):
        assert party["syncs"] == 4
        assert party["round_train_loss"][-1] < 0.7 * party["round_train_loss"][0]
        assert party["val_acc"] > 0.6  # the aggregated model on the held-out digits (chance: 0.1)
    assert final_models_are_equal(tmp_path / "work")
    header = (tmp_path / "work" / "guest-9999" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "fed/round_train_loss" in header and "fed/bytes_exchanged" in header
