"""L2-norm clipping of an update's delta: the first step of differential privacy and a cheap guard against a
party whose update is far too large. ``max_norm`` bounds ||delta||_2 over every exchanged tensor.

Party side (``clip``), the party bounds what it sends; before the fold (``clip``, in ``server``), the
arbiter bounds what it folds, whatever a party sent. Both scale the delta by min(1, max_norm / ||delta||),
in place, one fused multiply per dtype buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from fedfleet.core.pipeline import TransformContext
from fedfleet.core.update import Aggregate, Update
from fedfleet.transforms.base import FOLD_TRANSFORMS, PARTY_TRANSFORMS


def clip_delta(update: Update, max_norm: float) -> Update:
    if not update.is_delta:
        raise ValueError("clip bounds a delta; this update carries the params themselves (is_delta=False)")
    norm = math.sqrt(update.params.sq_norm())
    if norm > max_norm:
        update.params.mul_(max_norm / norm)
    return update


@dataclass(frozen=True)
class _Bound:
    max_norm: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ValueError(f"max_norm must be a positive number, got {self.max_norm}")


@PARTY_TRANSFORMS.register("clip")
@dataclass(frozen=True)
class ClipNorm(_Bound):
    def __call__(self, update: Update, context: TransformContext) -> Update:
        return clip_delta(update, self.max_norm)


@FOLD_TRANSFORMS.register("clip")
@dataclass(frozen=True)
class ClipNormBeforeFold(_Bound):
    """Scale each delta to L2 norm <= max_norm before it is folded."""

    mergeable: ClassVar[bool] = True  # each update alone
    memory: ClassVar[str] = "O(model), one update at a time"

    def before_fold(self, update: Update) -> Update | None:
        return clip_delta(update, self.max_norm)

    def after_fold(self, aggregate: Aggregate) -> Aggregate:
        return aggregate
