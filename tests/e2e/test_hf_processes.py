"""Hugging Face parties as real processes: FATE-LLM's ported example as three roles with mutual TLS, and a
party of two torchrun ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from tests.grpc_jobs import free_port, make_certs
from tests.paths import ROOT

EXAMPLE = ROOT / "examples" / "hf" / "gpt2_sentiment.py"


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_example(launchers: list[list[str]], common: list[str]) -> list[dict]:
    """Start every role's process, wait for all, and return each one's last JSON line."""
    procs = [
        subprocess.Popen([*launcher, *common], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for launcher in launchers
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def saved_models_are_equal(work: Path) -> bool:
    guest, host = (load_file(work / n / "model" / "model.safetensors") for n in ("guest-9999", "host-10000"))
    return guest.keys() == host.keys() and all((guest[k] == host[k]).all() for k in guest)


def role(name: str, pid: str, launcher: tuple[str, ...] = (sys.executable,)) -> list[str]:
    return [*launcher, str(EXAMPLE), "--role", name, "--party-id", pid]


def test_the_ported_fate_llm_example_runs_as_three_processes_with_mtls(tmp_path):
    """examples/hf/gpt2_sentiment.py as the docs run it: arbiter, guest and host processes, mutual TLS."""
    make_certs(tmp_path / "certs", ["guest-9999", "host-10000"])
    common = [
        "--address",
        f"127.0.0.1:{free_port()}",
        "--certs",
        str(tmp_path / "certs"),
        "--work",
        str(tmp_path / "work"),
        "--reviews",
        "160",
        "--epochs",
        "2",
        "--log-every",
        "1",
    ]
    summaries = run_example([role("arbiter", "10000"), role("guest", "9999"), role("host", "10000")], common)
    assert summaries[0]["rounds"] == 2
    for s in summaries[1:]:
        assert s["syncs"] == 2
        assert s["last_loss"] < s["first_loss"]  # it learns from the real reviews (means of 3 steps)
    assert saved_models_are_equal(tmp_path / "work")  # both end with the final global model


def test_a_party_of_two_torchrun_ranks_syncs_through_its_rank_0(tmp_path):
    """The guest is a 2-process DDP group (gloo on CPU): rank 0 talks to the arbiter, rank 1 gets a broadcast."""
    torchrun = (
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    )
    common = [
        "--address",
        f"127.0.0.1:{free_port()}",
        "--insecure",
        "--work",
        str(tmp_path / "work"),
        "--reviews",
        "160",
        "--epochs",
        "2",
    ]
    summaries = run_example([role("arbiter", "10000"), role("guest", "9999", torchrun), role("host", "10000")], common)
    assert summaries[0]["rounds"] == 2
    assert all(s["syncs"] == 2 for s in summaries[1:])
    assert saved_models_are_equal(tmp_path / "work")
