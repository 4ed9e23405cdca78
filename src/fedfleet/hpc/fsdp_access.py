"""Reads and writes the exchanged params of an FSDP2-sharded model (a ``ParamAccess`` for the sync driver).

Under ``fully_shard`` every parameter is a DTensor: each rank holds one box of it (a slice along dim 0 of
the shard mesh dimension; replicated along the other of a hybrid mesh) in fp32, and that local tensor *is*
the master weight the optimizer steps and the next forward all-gathers. So:

- ``gather`` all-gathers each exchanged tensor into ``params`` on every rank (a collective: every rank calls
  it, in the same order), as the DeepSpeed access does;
- ``scatter`` writes each rank's own box of the aggregate into its local tensor, in place: no communication
  (every rank holds the whole aggregate after the driver's broadcast), and the optimizer's state and the
  next step's gathers see the new values.

``DTensorBoxes`` is the sharded exchange's access instead: no full-size buffer at all, each rank reading and
writing only its own boxes (``runtime/files/sharded_party.py``).

Names are the model's own ``named_parameters`` (FSDP2 keeps them; a ``checkpoint_wrapper`` prefix is dropped),
so a sharded party, a plain one and a party of another world size exchange the same layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fedfleet.core.params import FlatParams, ParamSpec, Selector, select_params
from fedfleet.errors import ConfigError

WRAPPER_PREFIX = "_checkpoint_wrapped_module."  # torch's checkpoint_wrapper puts it in front of every name


def exchanged_name(name: str) -> str:
    return name.replace(WRAPPER_PREFIX, "")


def local_box(param: DTensor) -> tuple[slice, ...]:
    """The slices of the full tensor that this rank's local tensor holds.

    DTensor splits a dim as ``torch.chunk`` does (chunks of ``ceil(n / k)``, the last ones shorter or empty),
    applying the mesh's dimensions left to right; ``Replicate`` keeps the whole extent."""
    box = [slice(0, n) for n in param.shape]
    coordinate = param.device_mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the param's mesh: it holds nothing of it
        return tuple(slice(0, 0) for _ in param.shape)
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_replicate():
            continue
        if not placement.is_shard() or type(placement).__name__ != "Shard":
            raise ConfigError(f"a parameter placed {placement} cannot be exchanged (only Shard and Replicate)")
        dim, parts, index = placement.dim, param.device_mesh.size(mesh_dim), coordinate[mesh_dim]
        start, stop = box[dim].start, box[dim].stop
        chunk = math.ceil((stop - start) / parts)
        lo = min(start + index * chunk, stop)
        box[dim] = slice(lo, min(lo + chunk, stop))
    return tuple(box)


class DTensorAccess:
    """The exchanged params of a model whose parameters are FSDP2 DTensors (plain parameters are read whole)."""

    def __init__(self, model: nn.Module, select: Selector = "trainable") -> None:
        chosen = select_params(model, select)
        self._chosen = [(exchanged_name(n), p) for n, p in chosen]
        shapes = [(name, tuple(p.shape), p.dtype) for name, p in self._chosen]  # a DTensor's shape is the full one
        self.params = FlatParams.zeros(ParamSpec(shapes), _local(self._chosen[0][1]).device)
        self._boxes = {name: local_box(p) if isinstance(p, DTensor) else None for name, p in self._chosen}
        for name, p in self._chosen:  # a placement this code would misread is refused now, not after a sync
            box = self._boxes[name]
            if box is not None and tuple(s.stop - s.start for s in box) != tuple(p.to_local().shape):
                raise ConfigError(f"{name}: its local shard {tuple(p.to_local().shape)} is not the box {box}")

    @property
    def device(self) -> torch.device:
        return self.params.device

    @property
    def boxes(self) -> dict[str, tuple[slice, ...] | None]:
        """Each exchanged tensor's box on this rank (None: held whole); what a sharded exchange would key on."""
        return dict(self._boxes)

    @torch.no_grad()
    def gather(self) -> None:
        views = self.params.tensors()
        for name, p in self._chosen:
            full = p.full_tensor() if isinstance(p, DTensor) else p.data
            views[name].copy_(full.reshape(views[name].shape))

    @torch.no_grad()
    def scatter(self) -> None:
        views = self.params.tensors()
        for name, p in self._chosen:
            box = self._boxes[name]
            if box is None:
                p.data.copy_(views[name].reshape(p.shape))
            else:
                p.to_local().copy_(views[name][box])


@dataclass(frozen=True)
class Piece:
    """One rank's box of one exchanged tensor: its name, where it sits, its parameter and whether this rank
    writes it (a replicated box is written once)."""

    name: str
    box: tuple[slice, ...]
    param: torch.Tensor
    writes: bool

    @property
    def local(self) -> torch.Tensor:
        """The tensor holding the box: the optimizer's own, written in place (looked up at each use, not kept)."""
        return _local(self.param).data

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(s.start for s in self.box)


class DTensorBoxes:
    """The exchanged params of an FSDP2 model as this rank's boxes only: what the sharded exchange reads and
    writes. ``spec`` is the full layout (names, shapes, dtypes: nothing allocated)."""

    sharded = True

    def __init__(self, model: nn.Module, select: Selector = "trainable", rank: int = 0) -> None:
        chosen = [(exchanged_name(n), p) for n, p in select_params(model, select)]
        self.spec = ParamSpec([(name, tuple(p.shape), p.dtype) for name, p in chosen])
        self.device = _local(chosen[0][1]).device
        self.pieces: list[Piece] = []
        for name, p in chosen:
            if isinstance(p, DTensor):
                box, local = local_box(p), p.to_local()
                if tuple(s.stop - s.start for s in box) != tuple(local.shape):
                    raise ConfigError(f"{name}: its local shard {tuple(local.shape)} is not the box {box}")
                piece = Piece(name, box, p, _first_replica(p))
            else:  # a plain parameter: every rank holds it whole; rank 0 writes it
                piece = Piece(name, tuple(slice(0, n) for n in p.shape), p, rank == 0)
            if piece.local.numel():  # an uneven split leaves some ranks nothing of a small tensor
                self.pieces.append(piece)


def _first_replica(p: DTensor) -> bool:
    """Whether this rank is the first of the replicas holding its box (coordinate 0 on every replicated dim)."""
    coordinate = p.device_mesh.get_coordinate()
    if coordinate is None:
        return False
    return all(coordinate[d] == 0 for d, placement in enumerate(p.placements) if placement.is_replicate())


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p
