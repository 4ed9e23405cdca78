"""Offsite-Tuning deployed: the model owner and two data owners as separate processes over gRPC (loopback)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from fedfleet.config.offsite import load_job, parse_job
from fedfleet.errors import ConfigError
from fedfleet.offsite import AutoMainModel
from tests.grpc_jobs import free_port
from tests.paths import ROOT

EXAMPLES = ROOT / "examples" / "offsite"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_jobs(tmp: Path, **overrides) -> list[Path]:
    address, handout = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    paths = []
    for side in ("owner", "guest", "host"):
        raw = yaml.safe_load((EXAMPLES / f"{side}.yaml").read_text())
        raw.update(address=address, handout_address=handout, output=str(tmp / side), **overrides)
        paths.append(tmp / f"{side}.yaml")
        paths[-1].write_text(yaml.safe_dump(raw))
    return paths


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}])
def test_owner_and_two_data_owners_as_processes(tmp_path, lora):
    jobs = write_jobs(tmp_path, lora=lora)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fedfleet.cli.offsite", str(j), "--insecure"],  # the examples are plaintext
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for j in jobs
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    owner, guest, host = (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)
    assert owner["rounds"] == 3 and guest["syncs"] == host["syncs"] == 3
    # what a data owner received is the sub model, not the full model: its parameter count, tensor by tensor the
    # owner's adapters / emulator blocks / extras, and nothing of the dropped middle blocks
    job = load_job(jobs[0])
    main = AutoMainModel(job.model_config(), 2, 1, 1, seed=job.seed)  # the owner's model, rebuilt from its seed
    expected = main.get_submodel_weights()
    for party in (guest, host):
        assert party["received_numel"] == party["sub_numel"] == main.submodel_param_count() < party_numel(main)
        assert party["last_loss"] < party["first_loss"]
        assert party["emulator_fine_tuned_ppl"] < party["emulator_zero_shot_ppl"]
    received = load_file(tmp_path / "guest" / "received.safetensors")
    assert received.keys() == expected.keys() and all(torch.equal(received[k], expected[k]) for k in expected)
    # emulator = blocks 1 and 4 of 1..4; the random matrices of 2 and 3 (norms start equal in every block)
    dropped = [p for i in (2, 3) for p in main.blocks[i].parameters() if p.dim() > 1]
    assert main.layers["emulator"] == (1, 4)
    assert not any(r.shape == d.shape and torch.equal(r, d) for r in received.values() for d in dropped)
    # the plug-in: the owner's saved model has tuned adapters and the original middle and extras
    plugged = GPT2LMHeadModel.from_pretrained(tmp_path / "owner" / "plugged_in")
    orig = dict(main.model.named_parameters())
    lora_targets = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # LoRA changes only these adapter tensors
    for name, p in plugged.named_parameters():
        tuned = name.startswith(("transformer.h.0.", "transformer.h.5.")) and (
            lora is None or name.endswith(lora_targets)
        )
        assert torch.equal(p, orig[name]) != tuned, name


def party_numel(main):
    return sum(p.numel() for p in main.model.parameters())


def test_a_bad_job_file_names_the_key(tmp_path):
    raw = yaml.safe_load((EXAMPLES / "guest.yaml").read_text())
    with pytest.raises(ConfigError, match=r"offsite\.emulator_layers: unknown key \(did you mean 'emulator_layer_num'"):
        parse_job({**raw, "offsite": {"emulator_layers": 2}})
    with pytest.raises(ConfigError, match=r"^epochs: unknown key"):
        parse_job({**raw, "epochs": 2})
    with pytest.raises(ConfigError, match="missing required key 'offsite'"):
        parse_job({k: v for k, v in raw.items() if k != "offsite"})
