"""One rank of tests/hpc/test_hf_save.py: a tiny LLaMA sharded by FSDP2 (gloo, the torchrun variables set by the
test), trained a few steps, then saved with ``save_hf_checkpoint`` on every rank. The rank also writes the full
params it trained, gathered with torch's own ``full_tensor`` (``<out>/reference-rank<r>.pt``), for the test to
compare the checkpoint with; the last stdout line is JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from fedfleet.hpc.fsdp import FSDPConfig, build_mesh, shard_model
from fedfleet.hpc.hf_save import save_hf_checkpoint
from fedfleet.hpc.precision import mixed_precision_policy
from fedfleet.sync import end_process_group
from tests.hpc.fsdp_rank import Tokens, tiny_llama


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--tied", action="store_true")
    p.add_argument("--shard-size", default="5GB")
    a = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_llama(0)
    if a.tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    config = FSDPConfig("FULL_SHARD", precision="fp32", device="cpu")
    model = shard_model(model, config, build_mesh(config, torch.device("cpu"), world), mixed_precision_policy(None))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = Tokens(8, seed=rank)
    for i in range(0, 8, 4):
        batch = data.ids[i : i + 4]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    reference = {
        n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone() for n, t in model.state_dict().items()
    }
    torch.save(reference, a.out / f"reference-rank{rank}.pt")
    error = None
    try:
        save_hf_checkpoint(model, a.out / "ckpt", dtype=a.dtype, max_shard_size=a.shard_size, tokens=1000 + rank)
    except Exception as exc:  # reported for the test to check, on every rank
        error = f"{type(exc).__name__}: {exc}"
    dist.destroy_process_group()
    print(json.dumps({"rank": rank, "world": world, "error": error}), flush=True)


if __name__ == "__main__":
    main()
    end_process_group()  # the mesh and the model's cycles freed while the interpreter is whole
