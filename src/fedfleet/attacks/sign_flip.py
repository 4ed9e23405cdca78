"""Sign flipping: an attacker sends -scale x its honest delta, pulling the model back along its own descent
direction (scale 1 is the classic attack; larger scales outweigh the honest clients in a plain mean)."""

from __future__ import annotations

from dataclasses import dataclass

from fedfleet.attacks.base import Attack
from fedfleet.core.pipeline import TransformContext
from fedfleet.core.update import Update


@dataclass(frozen=True, kw_only=True)
class SignFlip(Attack):
    scale: float = 1.0  # the flipped delta is -scale x the honest one

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or self.scale <= 0:
            raise ValueError(f"scale must be a number > 0, got {self.scale!r}")

    def corrupt(self, update: Update, context: TransformContext) -> Update:
        update.params.mul_(-float(self.scale))
        return update
