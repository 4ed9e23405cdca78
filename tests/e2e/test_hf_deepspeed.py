"""FedAvgClient under DeepSpeed ZeRO on CPU: a guest of 2 torchrun ranks, a host, a model-less arbiter, over gRPC.

DeepSpeed's CPU accelerator with gloo runs ZeRO-1/2/3 here. The guest's ranks read and write the optimizer's
(partitioned) fp32 master weights through DeepSpeedAccess; the checks read them back through DeepSpeed's own
accessors, and the model's own weights too, which the forward pass and save_model use.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedfleet.hf import FedAvgServer, create_context
from tests.grpc_jobs import free_port
from tests.hf_parties import review_shares

if importlib.util.find_spec("deepspeed") is None:
    reason = "deepspeed is not installed: DS_BUILD_OPS=0 pip install 'torch==<yours>' deepspeed (the [deepspeed] extra)"
    print(f"\nskipping tests/e2e/test_hf_deepspeed.py: {reason}", file=sys.stderr)
    pytest.skip(reason, allow_module_level=True)

from tests.hf_deepspeed_party import PARTIES, build_client, run
from tests.paths import ROOT

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DS_ACCELERATOR": "cpu",  # a CUDA machine would otherwise pick its GPUs
    # where DeepSpeed's CPU ops (the shared-memory all-reduce) are compiled once and found afterwards
    "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
}


SHM_OP = "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()"


@pytest.fixture(scope="module", autouse=True)
def compiled_cpu_ops() -> None:
    """DeepSpeed's CPU all-reduce op is compiled on first use (minutes): once here, not inside a timed party."""
    folder = Path(ENV["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm"
    if not any(folder.glob("*.so")):  # `make test` compiles it at install time; a bare checkout pays here once
        subprocess.run([sys.executable, "-c", SHM_OP], env=ENV, check=True, capture_output=True, timeout=1200)


def launch_guest(
    csv: Path, out: Path, address: str, stage: int, offload: bool, ranks: int = 2, aggregator: str = "plain"
) -> subprocess.Popen:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    cmd += ["-m", "tests.hf_deepspeed_party", "--role", "guest", "--party-id", "9999", "--csv", str(csv)]
    cmd += ["--out", str(out), "--address", address, "--stage", str(stage), "--batch-size", str(8 // ranks)]
    cmd += ["--aggregator", aggregator, *(["--offload"] if offload else [])]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_session(
    tmp_path: Path, guest_stage: int, offload: bool = False, aggregator: str = "plain"
) -> dict[str, list[dict]]:
    """The guest (2 torchrun ranks, ZeRO ``guest_stage``) in a subprocess; the arbiter and a plain host here;
    ``aggregator``: every party's (``"secure"``: the guest's rank 0 masks, the arbiter sees only masked inputs)."""
    csvs = review_shares(tmp_path / "data", 2, reviews=64)  # 32 examples each: 4 steps of 8 per epoch
    host_rows = csvs[1].read_text().splitlines()[: 1 + 24]  # the host keeps 24: unequal weights, 3 steps
    csvs[1].write_text("\n".join(host_rows) + "\n")
    address = f"127.0.0.1:{free_port()}"
    server = FedAvgServer(create_context(PARTIES[2], PARTIES, "s-ds", address, insecure=True), wait_timeout=120)
    records: list = []
    failures: list[BaseException] = []

    def serve() -> None:
        try:
            records.extend(server.train())
        except BaseException as exc:  # seen by the assertion below, not lost in a thread
            failures.append(exc)

    arbiter = threading.Thread(target=serve, daemon=True)
    arbiter.start()
    out = tmp_path / "out"
    guest = launch_guest(csvs[0], out, address, guest_stage, offload, aggregator=aggregator)
    try:
        client, log = build_client("host", "10000", str(csvs[1]), str(out), address, -1, 8, aggregator=aggregator)
        host = run(client, log, str(out))
        _, err = guest.communicate(timeout=240)
        assert guest.returncode == 0, err[-4000:]
    finally:
        if guest.poll() is None:
            guest.kill()
            guest.communicate()
    arbiter.join(30)
    assert not failures, failures
    assert len(records) == 2  # 2 epochs, a sync at the end of each
    if aggregator == "secure":  # both masked inputs unmasked as one sum, every round
        assert all(r.metrics["secagg_masked"] == 2.0 for r in records)
    return {"guest-9999": [torch.load(out / f"guest-9999-rank{r}.pt") for r in range(2)], "host-10000": [host]}


def saved_models_are_equal(out: Path) -> bool:
    guest, host = (load_file(out / n / "model" / "model.safetensors") for n in ("guest-9999", "host-10000"))
    return guest.keys() == host.keys() and all(torch.equal(guest[k], host[k]) for k in guest)


def check(logs: dict[str, list[dict]], guest_optimizer: str = "AdamW") -> None:
    guest, host = logs["guest-9999"], logs["host-10000"]
    assert guest[0]["optimizer"] == guest_optimizer  # what steps the fp32 master weights inside ZeRO
    # the path that read and wrote the weights: DeepSpeed's accessors on the guest, the bound flat buffer on the host
    assert [g["access"] for g in guest] == ["DeepSpeedAccess"] * 2
    assert host[0]["access"] == "BoundAccess"
    # the guest's ranks agree on everything, at every point
    for key in ("before", "after", "after_model"):
        for a, b in zip(guest[0][key], guest[1][key], strict=True):
            assert torch.equal(a, b), key
    g, h = guest[0], host[0]
    assert torch.equal(g["after"][0], h["after"][0])  # both start from the guest's params
    assert len(g["before"]) == len(h["before"]) == 2
    for r in range(2):
        wg, wh = g["weights"][r], h["weights"][r]
        assert (wg, wh) == (32.0, 24.0)  # each party's examples of one epoch (the guest's: 2 ranks x 16)
        assert not torch.allclose(g["before"][r], h["before"][r])  # they trained apart
        expected = g["before"][r] * (wg / (wg + wh)) + h["before"][r] * (wh / (wg + wh))
        for party in (g, h):
            # the optimizer's master weights and the model's own weights both hold the weighted mean
            assert torch.allclose(party["after"][r + 1], expected, rtol=0, atol=2e-6), f"master, sync {r + 1}"
            assert torch.allclose(party["after_model"][r + 1], expected, rtol=0, atol=2e-6), f"model, sync {r + 1}"


def test_a_zero_guest_whose_rank_0_masks_and_a_host_hold_the_weighted_mean_under_secure_aggregation(tmp_path):
    """FedArguments(aggregator="secure") on both: the guest's rank 0 masks the gathered params (ZeRO-2), the
    arbiter unmasks only the sum, and every rank holds the weighted mean within the quantisation bound."""
    check(run_session(tmp_path, guest_stage=2, aggregator="secure"))
    assert saved_models_are_equal(tmp_path / "out")


@pytest.mark.parametrize("stage", [2, 1, 3])
def test_a_zero_guest_of_two_ranks_and_a_plain_host_hold_the_weighted_mean(tmp_path, stage):
    """ZeRO-1/2: each rank holds half the fp32 master weights; ZeRO-3: half of every parameter as well."""
    check(run_session(tmp_path, guest_stage=stage))
    assert saved_models_are_equal(tmp_path / "out")  # the last sync reached the files save_model wrote
