"""How a party's exchanged params are read from and written into a model being trained.

Plain PyTorch (one device, DDP): the trainable parameters are rebound as views into one flat buffer per
dtype, so a sync reads and writes the model in place: no copy at all. Under DeepSpeed the optimizer
owns fp32 master weights (ZeRO-1/2) or partitions every parameter (ZeRO-3): values are read through
DeepSpeed's full-fp32 accessors and written to both the master weights and the model's own, on every
rank, so training goes on from the aggregate (tests/e2e/test_hf_deepspeed.py checks both on CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from fedfleet.core.params import FlatParams, ParamSpec, Selector, bind_module, select_params
from fedfleet.errors import ConfigError


class ParamAccess(Protocol):
    params: FlatParams  # what is synced

    def gather(self) -> None:
        """model -> ``params`` (a collective under DeepSpeed: call on every rank)."""

    def scatter(self) -> None:
        """``params`` -> model (idem)."""


class BoundAccess:
    """The model's trainable parameters are views into ``params``: gather and scatter cost nothing."""

    def __init__(self, model: nn.Module, select: Selector) -> None:
        self.params = bind_module(model, select)

    def gather(self) -> None:
        pass

    def scatter(self) -> None:
        pass


class DeepSpeedAccess:
    """Reads and writes a DeepSpeed-trained model's weights: the optimizer's fp32 master copy and the model's own.

    ZeRO-1/2 (and the bf16 optimizer) keep each rank's slice of the master weights apart from the model's
    full weights; ZeRO-3 partitions both. DeepSpeed's ``safe_set_full_fp32_param`` writes the master copy
    only, and the model would pick it up at the next optimizer step: the step after a sync would compute
    its gradient at the old weights, and a sync at the last step would never reach the saved model. So
    ``scatter`` also writes the model's weights (under ZeRO-3 through ``GatheredParameters``, which
    repartitions them). Both are collectives: every rank calls ``gather`` and ``scatter``, in the same order.
    Parameters no ZeRO optimizer holds a master copy of (stage 0 in fp32) are read from the model itself.
    """

    def __init__(self, model: nn.Module, select: Selector) -> None:
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        self._get, self._set, self._gathered = safe_get_full_fp32_param, safe_set_full_fp32_param, GatheredParameters
        # ZeRO-3 leaves each parameter with an empty local shard; ds_shape is the full shape
        self._chosen = select_params(model, select)
        shapes = [(n, tuple(getattr(p, "ds_shape", p.shape)), torch.float32) for n, p in self._chosen]
        self.params = FlatParams.zeros(ParamSpec(shapes), _device_of(self._chosen))

    @torch.no_grad()
    def gather(self) -> None:
        views = self.params.tensors()
        for name, p in self._chosen:
            master = self._get(p)  # None: no optimizer holds a master copy of p
            if master is not None:
                views[name].copy_(master.reshape(views[name].shape))
                continue
            with self._gathered([p]):  # a no-op unless p is a ZeRO-3 partition
                views[name].copy_(p.data.reshape(views[name].shape))

    @torch.no_grad()
    def scatter(self) -> None:
        views = self.params.tensors()
        for name, p in self._chosen:
            self._set(p, views[name])  # this rank's slice of the master weights (a no-op without one)
            # every rank holds the same value; rank 0's is broadcast and repartitioned on exit under ZeRO-3
            with self._gathered([p], modifier_rank=0):
                p.data.copy_(views[name].reshape(p.data.shape))


def _device_of(chosen: list[tuple[str, nn.Parameter]]) -> torch.device:
    return chosen[0][1].device


@dataclass(frozen=True)
class AccessKind:
    name: str
    applies: Callable[[Any], bool]  # given the HF Trainer
    build: Callable[[nn.Module, Selector], ParamAccess]


# checked in order; the first that applies is used
ACCESS_KINDS: list[AccessKind] = [
    AccessKind("deepspeed", lambda trainer: bool(getattr(trainer, "is_deepspeed_enabled", False)), DeepSpeedAccess),
    AccessKind("bound", lambda trainer: True, BoundAccess),
]


def param_access(
    trainer: Any, model: nn.Module, select: Selector = "trainable", kinds: Sequence[AccessKind] = ACCESS_KINDS
) -> ParamAccess:
    """How to read and write ``model``'s exchanged params: the first of ``kinds`` that applies to ``trainer``
    (an HF Trainer by default; Lightning passes its own table)."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            f"{type(model).__name__} has no trainable parameters: nothing would be federated "
            f"(unfreeze some, or add a PEFT adapter)"
        )
    for kind in kinds:
        if kind.applies(trainer):
            return kind.build(model, select)
    raise AssertionError("the last access kind always applies")
