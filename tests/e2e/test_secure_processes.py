"""Secure aggregation with real processes on mutual TLS: an arbiter and four parties, one of them SIGKILLed at each
stage of the protocol. The round survives every one (SecAgg+ with k = 3, t = 2) and says where the party dropped."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedfleet.config import load_job
from fedfleet.jobs.simulation import Simulation
from tests.e2e.test_deploy_processes import finish, rows, start
from tests.runtime.grpc.secure_helpers import FOUR, PARTIES4, secure_job

KILLER = Path(__file__).parent / "secure_kill_party.py"
VICTIM = PARTIES4[2]


def sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.mark.parametrize(
    "stage, counts, clients",
    [
        # stage it is killed at -> (advertised, shared, masked, unmasked) and the parties in the sum
        ("setup", (3, 3, 3, 3), 3),  # before its advert: not in the share graph at all
        ("roster", (4, 3, 3, 3), 3),  # after its advert, before its shares: left out of the masks
        ("inbox", (4, 4, 3, 3), 3),  # after its shares, before its masked input: its pairwise masks unmasked
        ("unmask", (4, 4, 4, 3), 4),  # after its masked input, before its reply: its input is in the sum
    ],
)
def test_a_party_killed_at_any_stage_costs_the_round_only_that_party(tmp_path, stage, counts, clients):
    job = str(secure_job(tmp_path))
    common = sets([*FOUR, "rounds=1", "network.min_parties=3"])
    arbiter = start("arbiter", job, *common, "--quiet", cwd=tmp_path)
    parties = {name: start("party", job, *common, "--name", name, cwd=tmp_path) for name in PARTIES4 if name != VICTIM}
    victim = subprocess.Popen(
        [sys.executable, str(KILLER), stage, job, *common, "--name", VICTIM],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    finish(arbiter, 180)
    for proc in parties.values():
        finish(proc, 60)
    assert victim.wait(60) == -9  # it died by its own SIGKILL, at that stage
    (row,) = rows(tmp_path)
    assert tuple(row[f"secagg_{k}"] for k in ("advertised", "shared", "masked", "unmasked")) == counts
    assert row["clients"] == clients and row["lost"] == 1.0
    deployed = load_file(str(tmp_path / "runs" / "net" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in deployed.values())
    if stage == "unmask":  # every input is in the sum: the model is the simulation's, where nobody dropped
        sim = Simulation.from_config(load_job(job, [*FOUR, "rounds=1", "network.min_parties=3"]))
        sim.run()
        for name, tensor in sim.loop.global_params.tensors().items():
            torch.testing.assert_close(deployed[name], tensor, rtol=0, atol=1e-6)
