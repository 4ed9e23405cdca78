"""Scaling, or model replacement (Bagdasaryan et al. 2020): an attacker boosts its delta by ``boost``. With
boost about n / server_lr, one attacker's update replaces the global model in a plain mean of n updates;
smaller boosts overshoot the honest step. The direction stays honest, so it defeats no filter by looking odd:
it is what norm bounding is for."""

from __future__ import annotations

from dataclasses import dataclass

from fedfleet.attacks.base import Attack
from fedfleet.core.pipeline import TransformContext
from fedfleet.core.update import Update


@dataclass(frozen=True, kw_only=True)
class Scale(Attack):
    boost: float = 10.0  # the sent delta is boost x the honest one

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.boost, bool) or not isinstance(self.boost, (int, float)) or self.boost <= 0:
            raise ValueError(f"boost must be a number > 0, got {self.boost!r}")

    def corrupt(self, update: Update, context: TransformContext) -> Update:
        update.params.mul_(float(self.boost))
        return update
