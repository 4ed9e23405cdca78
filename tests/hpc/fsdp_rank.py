"""One rank of an FSDP party in tests/hpc/test_fsdp_processes.py (and benchmarks/fsdp_party.py's tiny LLaMA).

The test starts every rank itself with the variables torchrun would set (``MASTER_ADDR``, ``MASTER_PORT``,
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``). Around each sync the rank records its own
local shard of every exchanged tensor and where that shard sits in the full tensor, read with torch's own
DTensor layout code (``compute_local_shape_and_global_offset``), not fedfleet's: the test reassembles each
party's params from its ranks' shards and computes the weighted mean itself. ``<out>/<party>-rank<r>.pt``
holds the record; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import LlamaConfig, LlamaForCausalLM

from fedfleet.hpc.fsdp import FSDPConfig
from fedfleet.hpc.fsdp_party import FSDPParty
from fedfleet.runtime.files import FileContext
from fedfleet.sync import FedArguments, create_context, end_process_group

PARTIES = [("guest", "9999"), ("host", "10000"), ("arbiter", "10000")]
VOCAB, SEQ = 128, 16


def tiny_llama(seed: int, layers: int = 2, hidden: int = 32) -> LlamaForCausalLM:
    """A LLaMA-shaped causal LM with random weights (no download): GQA attention, SwiGLU MLP, RMSNorm, RoPE."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 8,  # not a multiple of the ranks: uneven shards
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    """``n`` random token sequences (a party's own, by ``seed``), as a causal LM's batch dicts."""

    def __init__(self, n: int, seed: int, seq: int = SEQ) -> None:
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(1000 + seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def shards(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
    """Every trainable tensor's local shard and its offset in the full tensor (torch's reading of the layout)."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if isinstance(p, DTensor):
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            local = p.to_local()
            assert tuple(local.shape) == tuple(shape), (name, local.shape, shape)
            out[name] = (tuple(offset), local.detach().clone())
        else:
            out[name] = ((0,) * p.dim(), p.detach().clone())
    return out


def record(party: FSDPParty, log: dict) -> None:
    """Wrap the driver's start and sync: the shards just after the start and just before and after each sync."""
    driver = party.driver
    start, sync = driver.start, driver.sync

    def recorded_start(*args, **kwargs):
        start(*args, **kwargs)
        log["start"] = shards(party.model)

    def recorded_sync(weight, stats, metrics=None):
        log["before"].append(shards(party.model))
        log["weights"].append(weight)
        going = sync(weight, stats, metrics)
        log["after"].append(shards(party.model))
        return going

    driver.start, driver.sync = recorded_start, recorded_sync


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--role", required=True)
    p.add_argument("--party-id", required=True)
    p.add_argument("--address", help="the arbiter's host:port (gRPC)")
    p.add_argument("--exchange", help="sync through this folder instead (the file runtime): no network at all")
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="FULL_SHARD")
    p.add_argument("--shard-size", type=int, default=None)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--model-seed", type=int, default=0)
    p.add_argument("--sync-timeout", type=float, default=120.0, help="seconds a sync waits for the others")
    p.add_argument("--exchange-kind", default="auto", help="FSDPParty's exchange=: auto, sharded or gathered")
    p.add_argument("--freeze-embeddings", action="store_true", help="exchange all but the token embeddings")
    a = p.parse_args()
    if a.exchange:
        ctx = FileContext(a.exchange, f"{a.role}-{a.party_id}", "s-fsdp", timeout=120, poll_s=0.2)
    else:
        ctx = create_context((a.role, a.party_id), PARTIES, "s-fsdp", a.address, insecure=True)
        ctx = dataclasses.replace(ctx, connect_attempts=20, reconnect_max_s=1.0)  # a dead arbiter fails fast
    model = tiny_llama(a.model_seed)
    if a.freeze_embeddings:
        model.model.embed_tokens.weight.requires_grad_(False)
    config = FSDPConfig(a.strategy, a.shard_size, a.precision, a.checkpointing, a.accum, device="cpu")
    party = FSDPParty(
        ctx, model, FedArguments("epoch", 1), config, sync_timeout=a.sync_timeout, exchange=a.exchange_kind
    )
    log: dict = {"before": [], "after": [], "weights": []}
    record(party, log)
    party.fit(Tokens(a.examples, seed=int(a.party_id)), epochs=a.epochs, batch_size=a.batch_size, lr=5e-3)
    probe = Tokens(4, seed=7).ids  # the model's own forward after the last sync (every rank: a collective)
    party.model.eval()
    with torch.no_grad():
        log["final_loss"] = float(party.model(input_ids=probe, labels=probe).loss)
    log["history"] = [dataclasses.asdict(r) for r in party.history]
    log["dtype"] = str(party.dtype)
    log["exchange"], log["traffic"] = party.exchange, party.traffic
    rank = party.rank
    torch.save(log, Path(a.out) / f"{ctx.name}-rank{rank}.pt")
    party.destroy()
    print(json.dumps({"party": ctx.name, "rank": rank, "world": int(os.environ.get("WORLD_SIZE", 1))}), flush=True)


if __name__ == "__main__":
    main()
    end_process_group()  # the mesh and the model's cycles freed while the interpreter is whole
