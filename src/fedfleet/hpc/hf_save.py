"""A sharded (FSDP) model saved as a plain Hugging Face checkpoint, in half precision, one tensor at a time.

xFFL's users patched llama-recipes to get this, and fast kernels broke it again: FSDP's own state-dict paths
either gather the whole model on rank 0 (``FULL_STATE_DICT``: a 7B model is 28 GB of fp32 host RAM) or write
torch.distributed.checkpoint files that ``from_pretrained`` cannot read. Here every rank calls::

    save_hf_checkpoint(party.model, "site-a/round-3", dtype="bf16", tokens=party_tokens)

and each tensor is gathered in turn (``DTensor.full_tensor``, a collective, so every rank walks the same list),
handed to rank 0's writer, cast to ``dtype`` block by block and streamed into safetensors shards whose layout
is fixed before the first byte (fedfleet.hpc.merge.writer). No rank holds more than one full tensor (plus the
writer's short queue). The folder gets ``config.json`` (``torch_dtype`` set to what was written), the index
when there are several shards, and a ``fedfleet-manifest.json`` with the tokens / samples seen and every
file's SHA-256, which is what ``fedfleet merge`` weighs and verifies. It is published by fsync and an atomic
rename, or not at all; a write that fails on rank 0 fails the call on every rank, after the gathers, so no
rank is left waiting in a collective.

Tied weights (an LM head sharing the embedding) are written once, under the first name, as
``save_pretrained`` does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from fedfleet.errors import ConfigError
from fedfleet.hpc.merge.checkpoint import INDEX
from fedfleet.hpc.merge.manifest import MANIFEST, Manifest
from fedfleet.hpc.merge.writer import Entry, ShardWriter, Staging, index_json, parse_size, plan_shards

DTYPES: dict[str, torch.dtype | None] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "auto": None,
}


def save_hf_checkpoint(
    model: nn.Module,
    out: str | Path,
    *,
    dtype: str = "bf16",
    max_shard_size: str | int = "5GB",
    tokens: int | None = None,
    samples: int | None = None,
    party: str | None = None,
) -> Path | None:
    """Save ``model`` (sharded by FSDP2, or plain) as the HF checkpoint folder ``out``; call it on every rank.

    ``dtype``: bf16 (default), fp16, fp32, or auto (as the params are stored); integer buffers keep theirs.
    Returns ``out`` on rank 0, None on the others.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    out = Path(out)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    tensors = list(_unique_state(model))
    entries: list[Entry] = [(name, tuple(t.shape), _out_dtype(t, DTYPES[dtype])) for name, t in tensors]
    failure: BaseException | None = None
    stage = _RankZeroWriter(out, entries, shard_bytes, model) if rank == 0 else None
    try:
        if stage is not None:
            stage.open()
    except BaseException as exc:  # e.g. out exists: still gather below, so the other ranks are not left waiting
        failure, stage = exc, None
    for name, tensor in tensors:
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if stage is not None:
            try:
                stage.write(name, full.detach().to("cpu"))
            except BaseException as exc:
                failure = exc
                stage.discard()
                stage = None
        del full
    if stage is not None:
        try:
            stage.finish(tokens=tokens, samples=samples, party=party, dtype=dtype)
        except BaseException as exc:
            failure = exc
    _agree(failure, rank)
    return out if rank == 0 else None


def _unique_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The state dict's tensors in order, a tensor shared by two names (tied weights) once."""
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        yield name, tensor


def _out_dtype(tensor: torch.Tensor, wanted: torch.dtype | None) -> torch.dtype:
    if wanted is None or not tensor.is_floating_point():
        return tensor.dtype
    return wanted


class _RankZeroWriter:
    """The checkpoint folder being written on rank 0: shards in order, then config, index and manifest."""

    def __init__(self, out: Path, entries: list[Entry], shard_bytes: int, model: nn.Module) -> None:
        self.out, self.model = out, model
        self.shards = plan_shards(entries, shard_bytes)
        self.stage = Staging(out)
        self.files: Iterator[tuple[str, list[Entry]]] = iter(self.shards)
        self.writer: ShardWriter | None = None
        self.left: list[Entry] = []

    def open(self) -> None:
        self.stage.__enter__()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if not self.left:
            self._next_file()
        expected = self.left.pop(0)[0]
        assert expected == name, (expected, name)  # the layout was planned from the same list
        assert self.writer is not None
        self.writer.write(name, tensor)

    def _next_file(self) -> None:
        if self.writer is not None:
            self.stage.sums[self.writer.path.name] = self.writer.close()
        file, group = next(self.files)
        self.writer = ShardWriter(self.stage.tmp / file, group)
        self.left = list(group)

    def finish(self, *, tokens: int | None, samples: int | None, party: str | None, dtype: str) -> None:
        if self.writer is not None:
            self.stage.sums[self.writer.path.name] = self.writer.close()
            self.writer = None
        if len(self.shards) > 1:
            self.stage.write_text(INDEX, index_json(self.shards))
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            data = config.to_dict()
            if dtype != "auto":
                data["torch_dtype"] = str(DTYPES[dtype]).removeprefix("torch.")
            self.stage.write_text("config.json", json.dumps(data, indent=2, sort_keys=True) + "\n")
        generation = getattr(self.model, "generation_config", None)
        if generation is not None and hasattr(generation, "to_json_string"):
            self.stage.write_text("generation_config.json", generation.to_json_string())
        manifest = Manifest(party=party, tokens=tokens, samples=samples, sha256=dict(self.stage.sums))
        self.stage.write_text(MANIFEST, manifest.to_json())
        self.stage.commit()

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.discard()
        self.stage.__exit__(RuntimeError, None, None)  # removes the temp folder it made


def _agree(failure: BaseException | None, rank: int) -> None:
    """Rank 0's outcome on every rank: its error raised there, a RuntimeError naming it on the others."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if failure is not None:
            raise failure
        return
    # a flag byte and the message's first bytes, as a tensor: nothing is unpickled, even from one's own ranks
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    text = b"" if failure is None else f"{type(failure).__name__}: {failure}".encode()[:_MESSAGE_BYTES]
    buf = torch.zeros(1 + _MESSAGE_BYTES, dtype=torch.uint8)
    buf[0] = failure is not None
    buf[1 : 1 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8) if text else buf[1:1]
    buf = buf.to(device)
    dist.broadcast(buf, src=0)
    if rank == 0 and failure is not None:
        raise failure
    if int(buf[0]):
        message = bytes(buf[1:].cpu().tolist()).rstrip(b"\0").decode(errors="replace")
        raise RuntimeError(f"rank 0 could not save the checkpoint: {message}")


_MESSAGE_BYTES = 1024
