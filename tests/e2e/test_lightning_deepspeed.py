"""FedLightningCallback under Lightning's DeepSpeed strategy (ZeRO-2 and ZeRO-3): arbiter, guest and host as
processes, each party a DeepSpeed run on the GPU. Lightning runs DeepSpeed on CUDA only (its DeepSpeedStrategy
raises on a CPU accelerator), so this needs a GPU; the CPU suite covers the same DeepSpeedAccess under the
Hugging Face Trainer (tests/e2e/test_hf_deepspeed.py) and the strategy -> access table
(tests/lightning/test_lightning_fed.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.e2e.test_lightning_processes import final_models_are_equal, role, run_roles
from tests.grpc_jobs import free_port

if importlib.util.find_spec("deepspeed") is None or not torch.cuda.is_available():
    pytest.skip(
        "needs deepspeed and a CUDA GPU: Lightning's DeepSpeedStrategy refuses CPU accelerators",
        allow_module_level=True,
    )


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_parties_sync_the_weighted_mean(tmp_path, stage):
    common = ["--address", f"127.0.0.1:{free_port()}", "--insecure", "--work", str(tmp_path / "work")]
    common += ["--epochs", "2", "--accelerator", "gpu", "--strategy", f"deepspeed_stage_{stage}"]
    arbiter, guest, host = run_roles(
        [role("arbiter", "10000"), role("guest", "9999", "--limit", "320"), role("host", "10000", "--limit", "288")],
        common,
    )
    assert arbiter["rounds"] == 2
    assert guest["weights"] == [320.0, 320.0] and host["weights"] == [288.0, 288.0]
    for party in (guest, host):
        assert party["round_train_loss"][-1] < party["round_train_loss"][0]
    if stage == 2:  # ZeRO-3 leaves each rank's module parameters partitioned: no whole state_dict to compare
        assert final_models_are_equal(tmp_path / "work")
