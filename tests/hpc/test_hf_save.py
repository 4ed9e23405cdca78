"""``save_hf_checkpoint``: two FSDP ranks save a sharded tiny LLaMA as a Hugging Face checkpoint that
``from_pretrained`` loads, in bf16 (or fp32) equal to the trained params, tied weights once, several shards,
``fedfleet merge`` reading its manifest; a failure on rank 0 fails every rank without leaving one waiting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from fedfleet.cli.main import main
from fedfleet.hpc.merge import read_manifest
from tests.grpc_jobs import free_port
from tests.paths import ROOT

TORCHRUN_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def run_ranks(out, *args: str, world: int = 2) -> list[dict]:
    base = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    base.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), base.get("PYTHONPATH")))))
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(base, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world))
        env.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
        cmd = [sys.executable, "-m", "tests.hpc.save_rank", "--out", str(out), *args]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


@pytest.mark.slow
def test_two_ranks_save_a_bf16_checkpoint_that_loads_and_equals_the_trained_params(tmp_path):
    ranks = run_ranks(tmp_path, "--dtype", "bf16", "--shard-size", "16KB")
    assert [r["error"] for r in ranks] == [None, None]
    reference = torch.load(tmp_path / "reference-rank0.pt")
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "model.safetensors.index.json").is_file()  # several shards of at most 16 KB
    assert len(list(ckpt.glob("model-*-of-*.safetensors"))) > 2
    loaded = LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.bfloat16)
    state = loaded.state_dict()
    assert set(state) == set(reference)
    for name, tensor in reference.items():
        assert state[name].dtype == torch.bfloat16
        assert torch.equal(state[name], tensor.to(torch.bfloat16)), name  # the cast is the only change
    assert json.loads((ckpt / "config.json").read_text())["torch_dtype"] == "bfloat16"
    manifest = read_manifest(ckpt)
    assert manifest.tokens == 1000 and set(manifest.sha256) == {p.name for p in ckpt.iterdir()} - {manifest_name()}
    # what fedfleet merge reads: weights from the manifest, sums verified
    assert main(["merge", str(tmp_path / "merged"), str(ckpt), str(ckpt), "--dtype", "fp32", "--quiet"]) == 0
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    assert all(torch.equal(merged[n], t.to(torch.bfloat16).float()) for n, t in reference.items())


def manifest_name() -> str:
    from fedfleet.hpc.merge import MANIFEST

    return MANIFEST


@pytest.mark.slow
def test_tied_weights_are_written_once_and_fp32_is_exact(tmp_path):
    ranks = run_ranks(tmp_path, "--dtype", "fp32", "--tied")
    assert [r["error"] for r in ranks] == [None, None]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    reference = torch.load(tmp_path / "reference-rank0.pt")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "ckpt").state_dict()
    assert torch.equal(loaded["lm_head.weight"], reference["model.embed_tokens.weight"])
    assert all(torch.equal(loaded[n], t) for n, t in reference.items())


@pytest.mark.slow
def test_an_existing_output_fails_every_rank_and_is_left_as_it_was(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "mine.txt").write_text("the user's")
    ranks = run_ranks(tmp_path, "--dtype", "bf16")
    assert "already exists" in ranks[0]["error"]
    assert ranks[1]["error"].startswith("RuntimeError: rank 0 could not save the checkpoint: MergeError:")
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["mine.txt"]
    assert not list(tmp_path.glob(".ckpt.partial-*"))
