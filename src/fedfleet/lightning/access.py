"""Which way a Lightning strategy's params are read and written (a table, like ``fedfleet.sync.access``).

Single device and DDP: the trainable parameters of the ``LightningModule`` become views into one flat
buffer per dtype (zero-copy, the optimizer keeps its state). DeepSpeed: the optimizer owns fp32 master
weights (ZeRO-1/2) or partitions the parameters (ZeRO-3), so values go through DeepSpeed's full-fp32
accessors on every rank. FSDP flattens and shards parameters itself: refused until it has an access.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedfleet.core.params import Selector
from fedfleet.errors import ConfigError
from fedfleet.sync.access import AccessKind, BoundAccess, DeepSpeedAccess, ParamAccess, param_access


def _strategy_named(*names: str) -> Any:
    """True for a Lightning strategy whose class (or a base of it) has one of ``names``.

    Matching by name keeps this table importable without DeepSpeed installed and covers subclasses.
    """

    def applies(trainer: Any) -> bool:
        return any(cls.__name__ in names for cls in type(trainer.strategy).__mro__)

    return applies


def _refuse_fsdp(model: nn.Module, select: Selector) -> ParamAccess:
    raise ConfigError(
        "FSDPStrategy shards and flattens the parameters, which FedLightningCallback cannot read in place yet; "
        "use strategy='ddp' or strategy='deepspeed_stage_3' (ZeRO-3 is supported through DeepSpeed's accessors)"
    )


# checked in order; the first that applies is used (the trainer is Lightning's)
LIGHTNING_ACCESS_KINDS: list[AccessKind] = [
    AccessKind("deepspeed", _strategy_named("DeepSpeedStrategy"), DeepSpeedAccess),
    AccessKind("fsdp", _strategy_named("FSDPStrategy", "ModelParallelStrategy"), _refuse_fsdp),
    AccessKind("bound", lambda trainer: True, BoundAccess),
]


def lightning_access(trainer: Any, module: nn.Module, select: Selector = "trainable") -> ParamAccess:
    """The access for ``module`` (the unwrapped ``LightningModule``) under ``trainer``'s strategy."""
    return param_access(trainer, module, select, LIGHTNING_ACCESS_KINDS)
