"""How a party's exchanged params are read from and written into a model being trained.

Plain PyTorch (one device, DDP): the trainable parameters are rebound as views into one flat buffer per
dtype, so a sync reads and writes the model in place: no copy at all. Under DeepSpeed the optimizer
owns fp32 master weights (ZeRO-1/2) or partitions every parameter (ZeRO-3): values are read and written
through DeepSpeed's full-fp32 accessors, on every rank, so the master weights follow the aggregate.
"""

from __future__ import annotations

from collections.abc import Callable
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
    """Reads and writes the optimizer's fp32 master weights through DeepSpeed's safe accessors."""

    def __init__(self, model: nn.Module, select: Selector) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        self._get, self._set = safe_get_full_fp32_param, safe_set_full_fp32_param
        # ZeRO-3 leaves each parameter with an empty local shard; ds_shape is the full shape
        self._chosen = select_params(model, select)
        shapes = [(n, tuple(getattr(p, "ds_shape", p.shape)), torch.float32) for n, p in self._chosen]
        self.params = FlatParams.zeros(ParamSpec(shapes), _device_of(self._chosen))

    def gather(self) -> None:
        views = self.params.tensors()
        for name, p in self._chosen:
            views[name].copy_(self._get(p).reshape(views[name].shape))

    def scatter(self) -> None:
        views = self.params.tensors()
        for name, p in self._chosen:
            self._set(p, views[name])


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


def param_access(trainer: Any, model: nn.Module, select: Selector = "trainable") -> ParamAccess:
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            f"{type(model).__name__} has no trainable parameters: nothing would be federated "
            f"(unfreeze some, or add a PEFT adapter)"
        )
    for kind in ACCESS_KINDS:
        if kind.applies(trainer):
            return kind.build(model, select)
    raise AssertionError("the last access kind always applies")
