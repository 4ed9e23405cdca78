"""How one party shards its model with FSDP2 (``torch.distributed.fsdp.fully_shard``): strategy, mesh, precision.

The strategies carry the names FSDP users know (``torch.distributed.fsdp.ShardingStrategy``, and xFFL's
``_HYBRID_SHARD_ZERO2``), each a row of ``SHARDINGS``:

- ``FULL_SHARD`` (ZeRO-3): params, gradients and optimizer state sharded over every rank of the party; each
  block's params are gathered for its forward and again for its backward.
- ``SHARD_GRAD_OP`` (ZeRO-2): the same shards, but a block keeps its gathered params from forward to backward
  (``reshard_after_forward=False``): one all-gather per step instead of two, more memory.
- ``HYBRID_SHARD``: a 2-D mesh, replicas across nodes and shards within one (``shard_size`` ranks, by default
  the ranks of a node): the all-gathers stay on the node's fast links, only the gradients' all-reduce crosses.
- ``_HYBRID_SHARD_ZERO2``: hybrid with ``reshard_after_forward=False`` (xFFL ran LLaMA-2 7B on Leonardo so).
- ``NO_SHARD``: every rank keeps the whole model (DDP through FSDP2: a mesh of replicas with shards of one).

Each facility picks its own row in its own config; the exchanged params are the same whichever it picks, so
parties with different strategies and world sizes federate together.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from fedfleet.errors import ConfigError
from fedfleet.hpc.launch import set_launch_env
from fedfleet.hpc.precision import PRECISIONS


@dataclass(frozen=True)
class Sharding:
    name: str
    hybrid: bool  # a 2-D mesh: replicate across nodes, shard within one
    reshard_after_forward: bool  # False: a block keeps its gathered params until its backward (ZeRO-2)
    shards: bool = True  # False: shards of one rank (every rank holds the whole model)
    about: str = ""


SHARDINGS: dict[str, Sharding] = {
    s.name: s
    for s in (
        Sharding("FULL_SHARD", False, True, about="ZeRO-3: params, grads, optimizer state over every rank"),
        Sharding("SHARD_GRAD_OP", False, False, about="ZeRO-2: params stay gathered from forward to backward"),
        Sharding("HYBRID_SHARD", True, True, about="shard within a node, replicate across nodes"),
        Sharding("_HYBRID_SHARD_ZERO2", True, False, about="hybrid, params gathered from forward to backward"),
        Sharding("NO_SHARD", True, False, shards=False, about="every rank holds the whole model (DDP)"),
    )
}
ALIASES = {"HYBRID_SHARD_ZERO2": "_HYBRID_SHARD_ZERO2"}


def sharding(name: Any) -> Sharding:
    """A strategy by name (any case; torch's ``ShardingStrategy`` members too)."""
    key = str(getattr(name, "name", name)).upper()
    key = ALIASES.get(key, key)
    if key not in SHARDINGS:
        raise ConfigError(f"fsdp.strategy={name!r}: use one of {', '.join(SHARDINGS)}")
    return SHARDINGS[key]


@dataclass(frozen=True)
class FSDPConfig:
    """One party's FSDP settings (every rank of the party must give the same).

    ``strategy``: a row of ``SHARDINGS``. ``shard_size``: for the hybrid strategies, the ranks that shard one
    replica (None: the ranks of a node, torchrun's ``LOCAL_WORLD_SIZE``); it must divide the world size.
    ``precision``: ``"auto"`` (bf16 where the device computes it natively, else fp32), ``"bf16"`` or ``"fp32"``;
    the sharded master weights stay fp32 either way. ``activation_checkpointing``: recompute each block's
    activations in its backward instead of keeping them. ``grad_accum_steps``: micro-batches per optimizer step
    (the gradients are reduced once, at the last). ``wrap``: class names of the blocks sharded one unit each
    (None: a Hugging Face model's ``_no_split_modules``, else the children of the model's longest ModuleList).
    ``device``: None: ``cuda:<LOCAL_RANK>`` where CUDA is, else ``cpu``."""

    strategy: str = "FULL_SHARD"
    shard_size: int | None = None
    precision: str = "auto"
    activation_checkpointing: bool = False
    grad_accum_steps: int = 1
    wrap: tuple[str, ...] | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        sharding(self.strategy)  # a bad name fails when the config is made
        if self.precision not in PRECISIONS:
            hint = " (fp16 needs loss scaling, not done here: use bf16 or fp32)" if self.precision == "fp16" else ""
            raise ConfigError(f"fsdp.precision={self.precision!r}: use one of {', '.join(PRECISIONS)}{hint}")
        if isinstance(self.grad_accum_steps, bool) or not isinstance(self.grad_accum_steps, int):
            raise ConfigError(f"fsdp.grad_accum_steps={self.grad_accum_steps!r}: give a whole number >= 1")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"fsdp.grad_accum_steps={self.grad_accum_steps}: give a whole number >= 1")
        if self.shard_size is not None and (not isinstance(self.shard_size, int) or self.shard_size < 1):
            raise ConfigError(f"fsdp.shard_size={self.shard_size!r}: give a positive number of ranks, or None")
        if isinstance(self.wrap, str):
            object.__setattr__(self, "wrap", (self.wrap,))

    @property
    def sharding(self) -> Sharding:
        return sharding(self.strategy)


def party_device(config: FSDPConfig) -> torch.device:
    """This rank's device: the config's, else its node-local GPU (``LOCAL_RANK``, from torchrun or srun), else
    the CPU."""
    set_launch_env()  # under srun without torchrun: LOCAL_RANK and the rest from SLURM's variables
    if config.device is not None:
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(device: torch.device) -> bool:
    """Start the party's process group unless the script did: from torchrun's variables (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) or, under ``srun`` without torchrun, from SLURM's
    (``fedfleet.hpc.launch``), or as a group of one without either. NCCL for CUDA, gloo otherwise. True when this
    call started it (and so the party ends it)."""
    if dist.is_initialized():
        return False
    set_launch_env()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:  # one rank of its own: no rendezvous, no port
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def build_mesh(config: FSDPConfig, device: torch.device, world: int) -> DeviceMesh:
    """The party's device mesh: 1-D ``("shard",)`` of every rank, or 2-D ``("replicate", "shard")``."""
    rows = config.sharding
    if not rows.hybrid:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    size = 1 if not rows.shards else (config.shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if size > world or world % size:
        raise ConfigError(
            f"fsdp.shard_size={size}: it must divide the party's {world} ranks (the ranks of one replica)"
        )
    return init_device_mesh(device.type, (world // size, size), mesh_dim_names=("replicate", "shard"))


def blocks_of(model: nn.Module, wrap: tuple[str, ...] | None) -> list[nn.Module]:
    """The modules sharded one unit each: gathered just before their forward and freed after it."""
    names = set(wrap) if wrap is not None else set(getattr(model, "_no_split_modules", None) or ())
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        if not found:
            raise ConfigError(f"fsdp.wrap={sorted(names)}: no module of {type(model).__name__} has that class")
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def checkpoint_activations(block: nn.Module) -> None:
    """Recompute ``block``'s activations in its backward. The block's own ``forward`` is wrapped (not the module:
    parameter names stay as they were, so the exchanged tensors keep the names a plain party gives them), and
    the wrap sits inside FSDP's hooks: the recomputation runs while the block's params are gathered for backward.
    """
    inner = block.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward


def shard_model(model: nn.Module, config: FSDPConfig, mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> nn.Module:
    """``fully_shard`` each block, then the rest of the model (embeddings, head) as the root unit; in place."""
    rows = config.sharding
    blocks = blocks_of(model, config.wrap)
    if config.activation_checkpointing:
        if not blocks:
            raise ConfigError(f"fsdp.activation_checkpointing: {type(model).__name__} has no blocks; give fsdp.wrap")
        for block in blocks:
            checkpoint_activations(block)
        if getattr(getattr(model, "config", None), "use_cache", False):
            model.config.use_cache = False  # a KV cache is of no use in training and would be filled twice
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=rows.reshard_after_forward, mp_policy=policy)
    # the root's params (embeddings, final norm, head) are used last in forward and first in backward: kept
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    return model
